// CUDA backend of the fused contrastive primitive: the ATen driver around the kernels of
// contrastive_kernels.cu.
//
// Schedule: the rows of q are processed in slabs of S rows, S chosen so that the S x C slab of raw
// dot products l = q_r . k_c fits a fixed byte budget (slab_bytes(), 512 MiB by default; it does
// not grow with R). Per slab:
//
// - forward: one cuBLAS GEMM (through ATen) writes the slab's logits in fp32 (fp64 for fp64
//   inputs): bf16 and fp16 inputs go through the fp32-output overload of at::mm (products of
//   half-precision inputs accumulate in fp32 on the tensor cores and are never rounded back to
//   16 bits: at logit scale 100 a bf16 logit would be off by up to 0.4). Then the row kernel (one
//   block per row: online LSE in log2 units, positives, means) and, for column statistics, the
//   column kernel, which merges each part of the slab's rows into running per-column states
//   (max, sum of exponentials, sum of logits), merged once after the last slab.
// - backward: the same GEMM recomputes the logits; the tile kernel turns them, in place, into
//   f * G in the inputs' dtype (f: a power of two that keeps fp16 tiles in range, undone after
//   the GEMMs), with the row sums of G and G * l; then U = G @ k gives dq = (scale / f) * U, and
//   G^T @ q_slab accumulates into an fp32 dk (fp64 for fp64 inputs), scaled at the end;
//   dscale = sum G * l and dbias = sum G from the row sums (fp64).
// - fused (row statistics only, their gradients known before the forward: one-direction InfoNCE,
//   NT-Xent, SupCon, DCL with mean or sum): a slab holds whole rows, so the row kernel gives the
//   slab's final statistics and the tile kernel then turns the same logits into G: three GEMMs
//   per slab instead of the four of a forward and a backward. The mean's divisor (rows with a
//   positive) is known after the last slab only: it scales the gradients at the end.
// - self-similarity (k absent: the keys are q, as in NT-Xent, SupCon and DCL; the logits are
//   symmetric): forward and backward take slabs of at most about R / 8 rows (Slabs, at least
//   2048), so that the blocks on and below the diagonal are little more than half the square.
//   Forward: a slab of rows I takes the logits of the columns up to its end only (about half a
//   GEMM in all); the row kernel merges its rows' sets over those columns into running row
//   states, the self column kernel gives every earlier row its sets over the columns I from the
//   part left of the diagonal block (read column by column, with that row's masks), and the
//   states are finished after the last slab.
//   Backward: the gradient of q is scale * (G + G.T) @ q. A slab of rows I has every row
//   before it done, so its tile holds H = G + G.T on the columns below its end (G.T from the
//   coefficients of those rows, bwd_coefs), and dq_I = H(I, <=I) @ q, dq_<I += H(I, <I)^T @ q_I:
//   one GEMM's worth for the gradient instead of two, and the backward recomputes the logits
//   of those columns only (half a GEMM). Fused: two GEMMs' worth in all, not three.
//
// Scale and bias are read by the kernels from device memory: no host synchronization anywhere
// (unless scale or bias live on the CPU: their values and gradients are then copied). fp32 GEMMs
// use TF32 only where torch.backends.cuda.matmul.allow_tf32 allows it (ATen's choice).
//
// Memory beyond inputs and outputs: one slab of logits (the gradient tile lives in it), the dk
// accumulator (C x D fp32 when the inputs are not fp32; self-similarity: the dq accumulator,
// R x D), per-slab dq products (S x D) and O(R + C) statistics (self-similarity forward: the
// running row states, 7 values per row and row part of the column kernel, at most S / 64 parts;
// 8 with lse2).
//
// lse2 (lse2_mult = mu > 0, fwd and bwd): the second log-sum-exp of the denominator set at mu
// times the logits rides along in the same kernels: one more running sum per row (row kernel,
// self column kernel, running row states) under lse's maximum; in the backward, one more
// exponential per element in the tile kernel's instantiation for g_lse2 only.
#include "contrastive_cuda.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

#include "../checks.h"
#include "common.h"
#include "contrastive_kernels.h"

namespace fastcl {
namespace cuda {
namespace {

using OptT = std::optional<at::Tensor>;

constexpr int kMaxSplits = 1024;
constexpr int64_t kMinSplitRows = 64;

// -------------------------------------------------------------------------------------------
// Argument checks (before any CUDA call): csrc/checks.h, on q's CUDA device

void check_features(const char* fn, const at::Tensor& q, const at::Tensor& k) {
  checks::check_features(fn, q, k, "q", "k", c10::DeviceType::CUDA);
}

void check_scalar(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& q) {
  checks::check_scalar(fn, name, t, q.device());
}

void check_masks(const char* fn, const at::Tensor& q, const at::Tensor& k, const OptT& targets,
                 const OptT& row_labels, const OptT& col_labels) {
  checks::check_masks(fn, q, k, targets, row_labels, col_labels, q.device());
}

void check_vec(const char* fn, const char* name, const OptT& t, const at::Tensor& q, int64_t n,
               const char* what) {
  checks::check_vec(fn, name, t, n, what, q.device());
}

// The features, scalars and masks of every entry point.
void check_inputs(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                  const at::Tensor& bias, const OptT& targets, const OptT& row_labels,
                  const OptT& col_labels) {
  check_features(fn, q, k);
  check_scalar(fn, "scale", scale, q);
  check_scalar(fn, "bias", bias, q);
  check_masks(fn, q, k, targets, row_labels, col_labels);
}

// lse2_mult: 0 (no lse2) or a finite positive multiplier. Checked before the tensors' device.
void check_lse2_mult(const char* fn, double lse2_mult) {
  TORCH_CHECK(std::isfinite(lse2_mult) && lse2_mult >= 0.0, fn,
              ": lse2_mult must be a finite number >= 0 (0: no lse2), got ", lse2_mult);
}

// The lse2 arguments of the backward, before the tensors' device (q's rows when q is 2-D):
// g_lse2 needs lse2_mult > 0 and the forward's lse2 [R].
void check_lse2_grad(const char* fn, const OptT& g_lse2, const OptT& lse2, double lse2_mult,
                     const at::Tensor& q) {
  check_lse2_mult(fn, lse2_mult);
  if (!g_lse2.has_value()) return;
  TORCH_CHECK(lse2_mult > 0.0, fn,
              ": g_lse2 was given but lse2_mult is 0 (no lse2): pass the lse2_mult of the "
              "forward that computed lse2");
  TORCH_CHECK(lse2.has_value() && lse2->defined(), fn,
              ": g_lse2 was given but lse2 is None: pass the forward's lse2 output");
  if (!q.defined() || q.dim() != 2) return;  // check_features says what q must be
  const auto rows = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == q.size(0), fn, ": ", name,
                " must be a 1-D tensor of length R = ", q.size(0), ", got shape ",
                checks::shape_str(t));
  };
  rows("g_lse2", *g_lse2);
  rows("lse2", *lse2);
}

// The gradients of the row statistics, [R] each where given.
void check_row_grads(const char* fn, const OptT& g_lse, const OptT& g_pos, const OptT& g_mean,
                     const at::Tensor& q) {
  check_vec(fn, "g_lse", g_lse, q, q.size(0), "R");
  check_vec(fn, "g_pos", g_pos, q, q.size(0), "R");
  check_vec(fn, "g_mean", g_mean, q, q.size(0), "R");
}

// The dk of self-similarity (k=None): an empty [0, D] tensor.
at::Tensor no_keys(const at::Tensor& q) { return q.new_empty({0, q.size(1)}); }

const int64_t* index_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<int64_t>() : nullptr;
}

// Index arrays of the masks, int64 and contiguous on the device.
struct Masks {
  at::Tensor targets, row_labels, col_labels;
  MaskSpec spec(int64_t R, int64_t C, bool exclude_diag, bool decoupled, bool pos_lse) const {
    MaskSpec m;
    m.R = R;
    m.C = C;
    m.targets = index_ptr(targets);
    m.row_labels = index_ptr(row_labels);
    m.col_labels = index_ptr(col_labels);
    m.exclude_diag = exclude_diag;
    m.decoupled = decoupled;
    m.pos_lse = pos_lse;
    return m;
  }
};

Masks make_masks(const OptT& targets, const OptT& row_labels, const OptT& col_labels) {
  Masks m;
  if (row_labels.has_value() && col_labels.has_value()) {
    m.row_labels = row_labels->to(at::kLong).contiguous();
    m.col_labels = col_labels->to(at::kLong).contiguous();
  } else if (targets.has_value()) {
    m.targets = targets->to(at::kLong).contiguous();
  }
  return m;
}

// Row parts of the column kernel's slab: enough blocks for every SM, parts of at least
// kMinSplitRows rows.
int column_splits(int64_t C, int64_t S, DType stat) {
  const int64_t w = fwd_cols_block_columns(stat);
  const int64_t blocks = std::max<int64_t>(1, (C + w - 1) / w);
  const int64_t sms = multiprocessors();
  const int64_t want = (4 * sms + blocks - 1) / blocks;
  const int64_t cap = std::max<int64_t>(1, std::min<int64_t>(kMaxSplits, S / kMinSplitRows));
  return static_cast<int>(std::max<int64_t>(1, std::min(want, cap)));
}

// Row statistics [R] of the statistics dtype, as the row kernel writes them; lse2 [R] when
// lse2_mult > 0, else empty.
struct RowStats {
  at::Tensor lse, pos, npos, mean, lse2;
  double lse2_mult;
  RowStats(int64_t R, const at::TensorOptions& opt, double lse2_mult = 0.0)
      : lse(at::empty({R}, opt)),
        pos(at::empty({R}, opt)),
        npos(at::empty({R}, opt)),
        mean(at::empty({R}, opt)),
        lse2(at::empty({lse2_mult > 0 ? R : 0}, opt)),
        lse2_mult(lse2_mult) {}
  bool with_lse2() const { return lse2_mult > 0; }
  // The statistics of rows over no column: an empty set.
  void set_empty() {
    lse.fill_(-std::numeric_limits<double>::infinity());
    lse2.fill_(-std::numeric_limits<double>::infinity());
    pos.zero_();
    npos.zero_();
    mean.zero_();
  }
  RowOutputs outputs() {
    return RowOutputs{lse.data_ptr(), pos.data_ptr(), npos.data_ptr(), mean.data_ptr(),
                      with_lse2() ? lse2.data_ptr() : nullptr};
  }
  // The forward's outputs with the column statistics.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  tuple(const at::Tensor& col_lse, const at::Tensor& col_mean) const {
    return {lse, pos, npos, mean, col_lse, col_mean, lse2};
  }
};

// The row kernel's arguments writing `stats` (lse2 with it) from slabs of leading dimension ldl
// (whole rows: the columns [0, C)).
FwdRowsArgs rows_args(const MaskSpec& mask, int64_t ldl, const at::Tensor& sc,
                      const at::Tensor& bi, RowStats& stats) {
  FwdRowsArgs ra;
  ra.mask = mask;
  ra.ldl = ldl;
  ra.cend = mask.C;
  ra.scale = sc.data_ptr();
  ra.bias = bi.data_ptr();
  ra.out = stats.outputs();
  ra.states = RowStates{0, 0, nullptr, nullptr, nullptr};
  ra.lse2_mult = stats.lse2_mult;
  return ra;
}

// Self-similarity forward: the running row states (RowStates) of R rows in `nsplit` parts,
// initialized to empty sets; the lse2 sums too when `lse2`.
struct SelfStates {
  at::Tensor t, d, e2;
  RowStates states;
  SelfStates(int64_t R, int nsplit, const at::TensorOptions& opt, bool lse2) {
    const int64_t ld = round_up(R, kRowPad);
    const double ninf = -std::numeric_limits<double>::infinity();
    t = at::empty({4, nsplit, ld}, opt);
    t.select(0, 0).fill_(ninf);
    t.select(0, 1).zero_();
    t.select(0, 2).fill_(ninf);
    t.select(0, 3).zero_();
    d = at::zeros({3, nsplit, ld}, opt.dtype(at::kDouble));
    if (lse2) e2 = at::zeros({nsplit, ld}, opt);
    states = RowStates{nsplit, ld, t.data_ptr(), d.data_ptr<double>(),
                       lse2 ? e2.data_ptr() : nullptr};
  }
};

// The self-similarity forward (the rows of qc, contiguous, against themselves; `slabs` made
// for it): per slab of rows I = [r0, e), the logits of the columns [0, e), the row kernel over
// them into the running states of the rows I, the self column kernel over the columns [0, r0)
// into those of the earlier rows; `stats` from the states after the last slab.
void self_forward(Slabs& slabs, const at::Tensor& qc, const MaskSpec& spec, const at::Tensor& sc,
                  const at::Tensor& bi, RowStats& stats, cudaStream_t stream) {
  const int64_t R = spec.R, S = slabs.rows();
  const DType sdt = dtype_of(stat_type_of(qc));
  // parts sized for the average width of the transposed part, R / 2 columns
  SelfStates st(R, column_splits(std::max<int64_t>(R / 2, 1), S, sdt), stats.lse.options(),
                stats.with_lse2());
  FwdRowsArgs ra = rows_args(spec, slabs.ld(), sc, bi, stats);
  ra.states = st.states;
  for (int64_t r0 = 0; r0 < R; r0 += S) {
    const int64_t s = std::min(S, R - r0);
    const at::Tensor L = slabs.logits(qc.narrow(0, r0, s), qc.narrow(0, 0, r0 + s));
    ra.L = L.data_ptr();
    ra.r0 = r0;
    ra.rows = s;
    ra.cend = r0 + s;
    C10_CUDA_CHECK(launch_fwd_rows(ra, sdt, stream));
    C10_CUDA_CHECK(launch_fwd_self_cols(ra, sdt, stream));
  }
  RowFinalArgs fa;
  fa.mask = spec;
  fa.scale = ra.scale;
  fa.bias = ra.bias;
  fa.states = st.states;
  fa.out = stats.outputs();
  fa.lse2_mult = stats.lse2_mult;
  C10_CUDA_CHECK(launch_row_final(fa, sdt, stream));
}

// An optional vector of the statistics dtype st, contiguous (the caller's tensor itself when it
// already is; read only); undefined when absent.
at::Tensor stat_vector(const OptT& t, at::ScalarType st) {
  return t.has_value() ? t->to(st).contiguous() : at::Tensor();
}

// The gradients of the statistics ([R] / [C], statistics dtype, contiguous, on the device;
// undefined when absent). g_lse2 comes with the forward's lse2 ([R], same form) and its
// lse2_mult > 0.
struct GradCoefs {
  at::Tensor g_lse, g_pos, g_mean, g_col_lse, g_col_mean;
  at::Tensor g_lse2 = at::Tensor(), lse2 = at::Tensor();
  double lse2_mult = 0.0;
  bool any() const {
    return g_lse.defined() || g_pos.defined() || g_mean.defined() || g_col_lse.defined() ||
           g_col_mean.defined() || g_lse2.defined();
  }
};

// The backward over slabs: the preparation kernel (per-column terms, the tile factor f) once,
// then per slab the tile kernel, which turns the slab's logits into f * G in place, and the
// GEMMs of the tile (FeatureGrads). The vectors it is given are read by kernels enqueued later:
// they must stay alive, and hold their final values for a slab's rows when that slab is passed.
//
// Self-similarity (`self`: kc is q, out.dy the empty [0, D]): per slab of rows [r0, e), the
// coefficients of its rows' G first (bwd_coefs), then the tile kernel turns the logits of the
// columns [0, e) into f * (G + G.T) and FeatureGrads gives the whole gradient of q from the
// blocks on and below the diagonal: the slab needs only those columns' logits.
class TileSweep {
 public:
  TileSweep(GradOutputs& out, const at::Tensor& q, const at::Tensor& kc, const MaskSpec& mask,
            int64_t ldl, const at::Tensor& sc, const at::Tensor& bi, const GradCoefs& g,
            const at::Tensor& lse, const at::Tensor& pos, const at::Tensor& npos,
            const at::Tensor& col_lse, bool self, bool pos_rows_only, cudaStream_t stream)
      : out_(out), st_(stat_type_of(q)), gt_(q.scalar_type()), stream_(stream) {
    const auto opt = q.options().dtype(st_);
    const bool lse2 = g.g_lse2.defined();
    if (g.g_col_lse.defined() || g.g_col_mean.defined()) cols_ = at::empty({3, ldl}, opt);
    if (self) coefs_ = at::empty({lse2 ? kRowCoefsLse2 : kRowCoefs, mask.R}, opt);
    gscale_ = at::empty({2}, opt);
    parts_ = at::empty({2, mask.R}, opt.dtype(at::kDouble));
    BwdPrepArgs pa;
    pa.R = mask.R;
    pa.C = mask.C;
    pa.exclude_diag = mask.exclude_diag;
    pa.g_lse = ptr_or_null(g.g_lse);
    pa.g_pos = ptr_or_null(g.g_pos);
    pa.g_mean = ptr_or_null(g.g_mean);
    pa.g_lse2 = ptr_or_null(g.g_lse2);
    pa.lse2_mult = lse2 ? g.lse2_mult : 0.0;
    pa.g_col_lse = ptr_or_null(g.g_col_lse);
    pa.g_col_mean = ptr_or_null(g.g_col_mean);
    pa.col_lse = ptr_or_null(col_lse);
    pa.cols = cols_.defined() ? cols_.data_ptr() : nullptr;
    pa.ldcol = ldl;
    pa.gscale = gscale_.data_ptr();
    C10_CUDA_CHECK(launch_bwd_prep(pa, dtype_of(st_), stream_));
    grads_.emplace(out.dx, self ? at::Tensor() : out.dy, kc, st_, sc * gscale_.select(0, 1));

    ta_.mask = mask;
    ta_.ldl = ldl;
    ta_.scale = sc.data_ptr();
    ta_.bias = bi.data_ptr();
    ta_.g_lse = pa.g_lse;
    ta_.g_pos = pa.g_pos;
    ta_.g_mean = pa.g_mean;
    ta_.lse = lse.data_ptr();
    ta_.pos = pos.data_ptr();
    ta_.npos = npos.data_ptr();
    ta_.cols = pa.cols;
    ta_.ldcol = ldl;
    ta_.col_exp = g.g_col_lse.defined();
    ta_.gscale = gscale_.data_ptr();
    ta_.row_parts = parts_.data_ptr<double>();
    ta_.self = self;
    ta_.coefs = self ? coefs_.data_ptr() : nullptr;
    ta_.pos_rows_only = pos_rows_only;
    ta_.lse2_exp = lse2;
    ta_.g_lse2 = pa.g_lse2;
    ta_.lse2 = lse2 ? g.lse2.data_ptr() : nullptr;
    ta_.lse2_mult = pa.lse2_mult;
  }

  // The slab of rows [r0, r0 + q_slab.size(0)) whose logits `slabs` holds (L: its view; self:
  // of the columns [0, r0 + q_slab.size(0)) at least).
  void slab(const Slabs& slabs, const at::Tensor& L, int64_t r0, const at::Tensor& q_slab) {
    ta_.L = L.data_ptr();
    ta_.r0 = r0;
    ta_.rows = q_slab.size(0);
    if (ta_.self) C10_CUDA_CHECK(launch_bwd_coefs(ta_, dtype_of(st_), stream_));
    C10_CUDA_CHECK(launch_bwd_tile(ta_, dtype_of(st_), dtype_of(gt_), stream_));
    grads_->add(slabs.tile(ta_.rows, gt_), r0, q_slab);
  }

  // After the last slab: the gradients in `out`, times `norm` (0-dim, statistics dtype, on the
  // device) when it is defined.
  void finish(const at::Tensor& norm) {
    grads_->finish(norm);
    write_scalar_grads(parts_, out_.dscale, out_.dbias, norm);
  }

 private:
  GradOutputs& out_;
  at::ScalarType st_, gt_;
  cudaStream_t stream_;
  at::Tensor cols_, coefs_, gscale_, parts_;
  std::optional<FeatureGrads> grads_;
  BwdTileArgs ta_;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_fwd_cuda(const at::Tensor& q, const std::optional<at::Tensor>& k_opt,
                     const at::Tensor& scale, const at::Tensor& bias,
                     const std::optional<at::Tensor>& targets,
                     const std::optional<at::Tensor>& row_labels,
                     const std::optional<at::Tensor>& col_labels, bool exclude_diag,
                     bool decoupled, bool pos_lse, bool col_stats, double lse2_mult) {
  const char* fn = "contrastive_fwd_cuda";
  const bool self = !k_opt.has_value();
  const at::Tensor& k = self ? q : *k_opt;  // none: the keys are q
  TORCH_CHECK(!self || !col_stats, fn,
              ": column statistics need k (with k=None the keys are q: use the row statistics)");
  check_lse2_mult(fn, lse2_mult);
  check_inputs(fn, q, k, scale, bias, targets, row_labels, col_labels);
  c10::NoGradGuard no_grad;
  const c10::cuda::CUDAGuard guard(q.device());

  const int64_t R = q.size(0), C = k.size(0);
  const at::ScalarType st = stat_type_of(q);
  const DType sdt = dtype_of(st);
  const auto opt = q.options().dtype(st);
  RowStats stats(R, opt, lse2_mult);
  at::Tensor col_lse = at::empty({col_stats ? C : 0}, opt);
  at::Tensor col_mean = at::empty({col_stats ? C : 0}, opt);
  const double ninf = -std::numeric_limits<double>::infinity();
  if (C == 0) {
    stats.set_empty();
    return stats.tuple(col_lse, col_mean);
  }
  if (R == 0) {
    col_lse.fill_(ninf);
    col_mean.zero_();
    return stats.tuple(col_lse, col_mean);
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor sc = device_scalar(scale, q, st), bi = device_scalar(bias, q, st);
  const Masks masks = make_masks(targets, row_labels, col_labels);
  const MaskSpec spec = masks.spec(R, C, exclude_diag, decoupled, pos_lse);
  const at::Tensor kc = k.contiguous();
  Slabs slabs(R, C, q, self);
  if (self && slabs.rows() < R) {  // one slab for all rows: the square, as with k = q
    self_forward(slabs, kc, spec, sc, bi, stats, stream);
    return stats.tuple(col_lse, col_mean);
  }
  const int64_t Cp = slabs.ld(), S = slabs.rows();

  int nsplit = 0;
  at::Tensor st_max, st_sum, st_lsum;
  if (col_stats) {
    nsplit = column_splits(C, S, sdt);
    st_max = at::full({nsplit, Cp}, ninf, opt);
    st_sum = at::zeros({nsplit, Cp}, opt);
    st_lsum = at::zeros({nsplit, Cp}, opt.dtype(at::kDouble));
  }

  FwdRowsArgs ra = rows_args(spec, Cp, sc, bi, stats);
  FwdColsArgs ca;
  ca.R = R;
  ca.C = C;
  ca.exclude_diag = exclude_diag;
  ca.ldl = Cp;
  ca.scale = ra.scale;
  ca.bias = ra.bias;
  ca.nsplit = nsplit;
  ca.ldstate = Cp;
  ca.st_max = col_stats ? st_max.data_ptr() : nullptr;
  ca.st_sum = col_stats ? st_sum.data_ptr() : nullptr;
  ca.st_lsum = col_stats ? st_lsum.data_ptr<double>() : nullptr;

  for (int64_t r0 = 0; r0 < R; r0 += S) {
    const int64_t s = std::min(S, R - r0);
    const at::Tensor L = slabs.logits(q.narrow(0, r0, s), kc);
    ra.L = L.data_ptr();
    ra.r0 = r0;
    ra.rows = s;
    C10_CUDA_CHECK(launch_fwd_rows(ra, sdt, stream));
    if (col_stats) {
      ca.L = ra.L;
      ca.r0 = r0;
      ca.rows = s;
      C10_CUDA_CHECK(launch_fwd_cols(ca, sdt, stream));
    }
  }
  if (col_stats) {
    ColFinalArgs fa;
    fa.R = R;
    fa.C = C;
    fa.exclude_diag = exclude_diag;
    fa.nsplit = nsplit;
    fa.ldstate = Cp;
    fa.st_max = st_max.data_ptr();
    fa.st_sum = st_sum.data_ptr();
    fa.st_lsum = st_lsum.data_ptr<double>();
    fa.scale = ra.scale;
    fa.bias = ra.bias;
    fa.col_lse = col_lse.data_ptr();
    fa.col_mean = col_mean.data_ptr();
    C10_CUDA_CHECK(launch_col_final(fa, sdt, stream));
  }
  return stats.tuple(col_lse, col_mean);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_bwd_cuda(const std::optional<at::Tensor>& g_lse,
                     const std::optional<at::Tensor>& g_pos,
                     const std::optional<at::Tensor>& g_mean,
                     const std::optional<at::Tensor>& g_col_lse,
                     const std::optional<at::Tensor>& g_col_mean, const at::Tensor& q,
                     const std::optional<at::Tensor>& k_opt, const at::Tensor& scale,
                     const at::Tensor& bias, const std::optional<at::Tensor>& targets,
                     const std::optional<at::Tensor>& row_labels,
                     const std::optional<at::Tensor>& col_labels, const at::Tensor& lse,
                     const at::Tensor& pos, const at::Tensor& npos, const at::Tensor& col_lse,
                     bool exclude_diag, bool decoupled, bool pos_lse, bool col_stats,
                     const std::optional<at::Tensor>& g_lse2,
                     const std::optional<at::Tensor>& lse2, double lse2_mult) {
  const char* fn = "contrastive_bwd_cuda";
  const bool self = !k_opt.has_value();
  const at::Tensor& k = self ? q : *k_opt;  // none: the keys are q
  check_lse2_grad(fn, g_lse2, lse2, lse2_mult, q);
  check_inputs(fn, q, k, scale, bias, targets, row_labels, col_labels);
  TORCH_CHECK(!self || !col_stats, fn,
              ": column statistics need k (with k=None the keys are q: use the row statistics)");
  const int64_t R = q.size(0), C = k.size(0);
  check_row_grads(fn, g_lse, g_pos, g_mean, q);
  check_vec(fn, "g_col_lse", g_col_lse, q, C, "C");
  check_vec(fn, "g_col_mean", g_col_mean, q, C, "C");
  TORCH_CHECK(col_stats || (!g_col_lse.has_value() && !g_col_mean.has_value()), fn,
              ": g_col_lse / g_col_mean were given but col_stats is False");
  check_vec(fn, "lse", lse, q, R, "R");
  check_vec(fn, "pos", pos, q, R, "R");
  check_vec(fn, "npos", npos, q, R, "R");
  if (col_stats && g_col_lse.has_value()) check_vec(fn, "col_lse", col_lse, q, C, "C");
  if (g_lse2.has_value()) {
    check_vec(fn, "g_lse2", g_lse2, q, R, "R");
    check_vec(fn, "lse2", lse2, q, R, "R");
  }
  c10::NoGradGuard no_grad;
  const c10::cuda::CUDAGuard guard(q.device());

  const at::ScalarType st = stat_type_of(q);
  GradCoefs g{stat_vector(g_lse, st), stat_vector(g_pos, st), stat_vector(g_mean, st),
              col_stats ? stat_vector(g_col_lse, st) : at::Tensor(),
              col_stats ? stat_vector(g_col_mean, st) : at::Tensor()};
  if (g_lse2.has_value()) {
    g.g_lse2 = stat_vector(g_lse2, st);
    g.lse2 = stat_vector(lse2, st);
    g.lse2_mult = lse2_mult;
  }

  GradOutputs out(q, self ? no_keys(q) : k, scale, bias);  // dx = dq, dy = dk
  if (!g.any() || R == 0 || C == 0) return out.zero().tuple();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor sc = device_scalar(scale, q, st), bi = device_scalar(bias, q, st);
  const Masks masks = make_masks(targets, row_labels, col_labels);
  const at::Tensor lse_a = lse.to(st).contiguous(), pos_a = pos.to(st).contiguous();
  const at::Tensor npos_a = npos.to(st).contiguous();
  const at::Tensor col_lse_a = g.g_col_lse.defined() ? col_lse.to(st).contiguous() : at::Tensor();
  const at::Tensor kc = k.contiguous();
  Slabs slabs(R, C, q, self);
  TileSweep sweep(out, q, kc, masks.spec(R, C, exclude_diag, decoupled, pos_lse), slabs.ld(), sc,
                  bi, g, lse_a, pos_a, npos_a, col_lse_a, self, /*pos_rows_only=*/false, stream);
  for (int64_t r0 = 0; r0 < R; r0 += slabs.rows()) {
    const int64_t s = std::min(slabs.rows(), R - r0);
    const at::Tensor qs = q.narrow(0, r0, s);
    // self: the logits on and below the diagonal blocks only (half of them)
    sweep.slab(slabs, slabs.logits(qs, self ? kc.narrow(0, 0, r0 + s) : kc), r0, qs);
  }
  sweep.finish(at::Tensor());
  return out.tuple();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_fused_cuda(const std::optional<at::Tensor>& g_lse,
                       const std::optional<at::Tensor>& g_pos,
                       const std::optional<at::Tensor>& g_mean, const at::Tensor& q,
                       const std::optional<at::Tensor>& k_opt, const at::Tensor& scale,
                       const at::Tensor& bias, const std::optional<at::Tensor>& targets,
                       const std::optional<at::Tensor>& row_labels,
                       const std::optional<at::Tensor>& col_labels, bool exclude_diag,
                       bool decoupled, bool pos_lse, bool mean) {
  const char* fn = "contrastive_fused_cuda";
  const bool self = !k_opt.has_value();
  const at::Tensor& k = self ? q : *k_opt;  // none: the keys are q
  check_inputs(fn, q, k, scale, bias, targets, row_labels, col_labels);
  const int64_t R = q.size(0), C = k.size(0);
  check_row_grads(fn, g_lse, g_pos, g_mean, q);
  c10::NoGradGuard no_grad;
  const c10::cuda::CUDAGuard guard(q.device());

  const at::ScalarType st = stat_type_of(q);
  const auto opt = q.options().dtype(st);
  // rows without a positive count for nothing: the tile kernel skips them (pos_rows_only)
  GradCoefs g{stat_vector(g_lse, st), stat_vector(g_pos, st), stat_vector(g_mean, st),
              at::Tensor(), at::Tensor()};
  RowStats stats(R, opt);
  GradOutputs out(q, self ? no_keys(q) : k, scale, bias);
  std::optional<TileSweep> sweep;
  if (C == 0) stats.set_empty();

  if (R > 0 && C > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const at::Tensor sc = device_scalar(scale, q, st), bi = device_scalar(bias, q, st);
    const Masks masks = make_masks(targets, row_labels, col_labels);
    const MaskSpec spec = masks.spec(R, C, exclude_diag, decoupled, pos_lse);
    const at::Tensor kc = k.contiguous();
    Slabs slabs(R, C, q);  // the budget's slabs (common.h)
    FwdRowsArgs ra = rows_args(spec, slabs.ld(), sc, bi, stats);
    if (g.any())
      sweep.emplace(out, q, kc, spec, slabs.ld(), sc, bi, g, stats.lse, stats.pos, stats.npos,
                    at::Tensor(), self, /*pos_rows_only=*/true, stream);
    // A slab holds whole rows: its row statistics are final after the row kernel, and the same
    // logits then become the gradient tile (three GEMMs per slab, not the four of a forward
    // and a backward; self: two, the gradient's on the blocks on and below the diagonal).
    for (int64_t r0 = 0; r0 < R; r0 += slabs.rows()) {
      const int64_t s = std::min(slabs.rows(), R - r0);
      const at::Tensor qs = q.narrow(0, r0, s);
      const at::Tensor L = slabs.logits(qs, kc);
      ra.L = L.data_ptr();
      ra.r0 = r0;
      ra.rows = s;
      C10_CUDA_CHECK(launch_fwd_rows(ra, dtype_of(st), stream));
      if (sweep) sweep->slab(slabs, L, r0, qs);
    }
  }

  const at::Tensor has_pos = stats.npos > 0;
  const at::Tensor count = has_pos.sum().clamp_min(1);  // the rows of the mean
  if (sweep)
    sweep->finish(mean ? at::reciprocal(count.to(st)) : at::Tensor());
  else
    out.zero();
  // Rows without a positive count for nothing and may hold infinite statistics: select, not
  // multiply.
  at::Tensor rows = at::zeros({R}, opt.dtype(at::kDouble));
  const std::pair<const at::Tensor*, const at::Tensor*> terms[] = {
      {&g.g_lse, &stats.lse}, {&g.g_pos, &stats.pos}, {&g.g_mean, &stats.mean}};
  for (const auto& t : terms)
    if (t.first->defined()) rows.add_(t.first->to(at::kDouble) * t.second->to(at::kDouble));
  at::Tensor loss = at::where(has_pos, rows, at::zeros_like(rows)).sum();
  if (mean) loss = loss / count.to(at::kDouble);
  return {loss.to(st), stats.npos, out.dx, out.dy, out.dscale, out.dbias};
}

}  // namespace cuda
}  // namespace fastcl
