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
//
// Scale and bias are read by the kernels from device memory: no host synchronization anywhere
// (unless scale or bias live on the CPU: their values and gradients are then copied). fp32 GEMMs
// use TF32 only where torch.backends.cuda.matmul.allow_tf32 allows it (ATen's choice).
//
// Memory beyond inputs and outputs: one slab of logits (the gradient tile lives in it), the dk
// accumulator (C x D fp32 when the inputs are not fp32), per-slab dq products (S x D) and
// O(R + C) statistics.
#include "contrastive_cuda.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <limits>

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

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                     const at::Tensor& bias, const std::optional<at::Tensor>& targets,
                     const std::optional<at::Tensor>& row_labels,
                     const std::optional<at::Tensor>& col_labels, bool exclude_diag,
                     bool decoupled, bool pos_lse, bool col_stats) {
  const char* fn = "contrastive_fwd_cuda";
  check_features(fn, q, k);
  check_scalar(fn, "scale", scale, q);
  check_scalar(fn, "bias", bias, q);
  check_masks(fn, q, k, targets, row_labels, col_labels);
  c10::NoGradGuard no_grad;
  const c10::cuda::CUDAGuard guard(q.device());

  const int64_t R = q.size(0), C = k.size(0);
  const at::ScalarType st = stat_type_of(q);
  const DType sdt = dtype_of(st);
  const auto opt = q.options().dtype(st);
  at::Tensor lse = at::empty({R}, opt), pos = at::empty({R}, opt);
  at::Tensor npos = at::empty({R}, opt), mean = at::empty({R}, opt);
  at::Tensor col_lse = at::empty({col_stats ? C : 0}, opt);
  at::Tensor col_mean = at::empty({col_stats ? C : 0}, opt);
  const double ninf = -std::numeric_limits<double>::infinity();
  if (C == 0) {
    lse.fill_(ninf);
    pos.zero_();
    npos.zero_();
    mean.zero_();
    return {lse, pos, npos, mean, col_lse, col_mean};
  }
  if (R == 0) {
    col_lse.fill_(ninf);
    col_mean.zero_();
    return {lse, pos, npos, mean, col_lse, col_mean};
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor sc = device_scalar(scale, q, st), bi = device_scalar(bias, q, st);
  const Masks masks = make_masks(targets, row_labels, col_labels);
  const at::Tensor kc = k.contiguous();
  Slabs slabs(R, C, q);
  const int64_t Cp = slabs.ld(), S = slabs.rows();

  int nsplit = 0;
  at::Tensor st_max, st_sum, st_lsum;
  if (col_stats) {
    nsplit = column_splits(C, S, sdt);
    st_max = at::full({nsplit, Cp}, ninf, opt);
    st_sum = at::zeros({nsplit, Cp}, opt);
    st_lsum = at::zeros({nsplit, Cp}, opt.dtype(at::kDouble));
  }

  FwdRowsArgs ra;
  ra.mask = masks.spec(R, C, exclude_diag, decoupled, pos_lse);
  ra.ldl = Cp;
  ra.scale = sc.data_ptr();
  ra.bias = bi.data_ptr();
  ra.lse = lse.data_ptr();
  ra.pos = pos.data_ptr();
  ra.npos = npos.data_ptr();
  ra.mean = mean.data_ptr();
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
  return {lse, pos, npos, mean, col_lse, col_mean};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_bwd_cuda(const std::optional<at::Tensor>& g_lse,
                     const std::optional<at::Tensor>& g_pos,
                     const std::optional<at::Tensor>& g_mean,
                     const std::optional<at::Tensor>& g_col_lse,
                     const std::optional<at::Tensor>& g_col_mean, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& scale, const at::Tensor& bias,
                     const std::optional<at::Tensor>& targets,
                     const std::optional<at::Tensor>& row_labels,
                     const std::optional<at::Tensor>& col_labels, const at::Tensor& lse,
                     const at::Tensor& pos, const at::Tensor& npos, const at::Tensor& col_lse,
                     bool exclude_diag, bool decoupled, bool pos_lse, bool col_stats) {
  const char* fn = "contrastive_bwd_cuda";
  check_features(fn, q, k);
  check_scalar(fn, "scale", scale, q);
  check_scalar(fn, "bias", bias, q);
  check_masks(fn, q, k, targets, row_labels, col_labels);
  const int64_t R = q.size(0), C = k.size(0);
  check_vec(fn, "g_lse", g_lse, q, R, "R");
  check_vec(fn, "g_pos", g_pos, q, R, "R");
  check_vec(fn, "g_mean", g_mean, q, R, "R");
  check_vec(fn, "g_col_lse", g_col_lse, q, C, "C");
  check_vec(fn, "g_col_mean", g_col_mean, q, C, "C");
  TORCH_CHECK(col_stats || (!g_col_lse.has_value() && !g_col_mean.has_value()), fn,
              ": g_col_lse / g_col_mean were given but col_stats is False");
  check_vec(fn, "lse", lse, q, R, "R");
  check_vec(fn, "pos", pos, q, R, "R");
  check_vec(fn, "npos", npos, q, R, "R");
  if (col_stats && g_col_lse.has_value()) check_vec(fn, "col_lse", col_lse, q, C, "C");
  c10::NoGradGuard no_grad;
  const c10::cuda::CUDAGuard guard(q.device());

  const at::ScalarType st = stat_type_of(q);
  const DType sdt = dtype_of(st);
  const auto opt = q.options().dtype(st);
  auto acc = [&](const OptT& t) -> at::Tensor {
    return t.has_value() ? t->to(st).contiguous() : at::Tensor();
  };
  const at::Tensor gl = acc(g_lse), gp = acc(g_pos), gm = acc(g_mean);
  const at::Tensor gcl = col_stats ? acc(g_col_lse) : at::Tensor();
  const at::Tensor gcm = col_stats ? acc(g_col_mean) : at::Tensor();

  GradOutputs out(q, k, scale, bias);  // dx = dq, dy = dk
  const bool any = gl.defined() || gp.defined() || gm.defined() || gcl.defined() || gcm.defined();
  if (!any || R == 0 || C == 0) return out.zero().tuple();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor sc = device_scalar(scale, q, st), bi = device_scalar(bias, q, st);
  const Masks masks = make_masks(targets, row_labels, col_labels);
  const at::Tensor lse_a = lse.to(st).contiguous(), pos_a = pos.to(st).contiguous();
  const at::Tensor npos_a = npos.to(st).contiguous();
  const at::Tensor col_lse_a = gcl.defined() ? col_lse.to(st).contiguous() : at::Tensor();
  const at::Tensor kc = k.contiguous();
  Slabs slabs(R, C, q);
  const int64_t Cp = slabs.ld(), S = slabs.rows();

  // Per-column terms and the power-of-two factor f of the stored tile.
  at::Tensor cols;
  if (gcl.defined() || gcm.defined()) cols = at::empty({3, Cp}, opt);
  at::Tensor gscale = at::empty({2}, opt);
  BwdPrepArgs pa;
  pa.R = R;
  pa.C = C;
  pa.exclude_diag = exclude_diag;
  pa.g_lse = ptr_or_null(gl);
  pa.g_pos = ptr_or_null(gp);
  pa.g_mean = ptr_or_null(gm);
  pa.g_col_lse = ptr_or_null(gcl);
  pa.g_col_mean = ptr_or_null(gcm);
  pa.col_lse = ptr_or_null(col_lse_a);
  pa.cols = cols.defined() ? cols.data_ptr() : nullptr;
  pa.ldcol = Cp;
  pa.gscale = gscale.data_ptr();
  C10_CUDA_CHECK(launch_bwd_prep(pa, sdt, stream));
  FeatureGrads feature_grads(out.dx, out.dy, kc, st, sc * gscale.select(0, 1));
  at::Tensor parts = at::empty({2, R}, opt.dtype(at::kDouble));

  BwdTileArgs ta;
  ta.mask = masks.spec(R, C, exclude_diag, decoupled, pos_lse);
  ta.ldl = Cp;
  ta.scale = sc.data_ptr();
  ta.bias = bi.data_ptr();
  ta.g_lse = pa.g_lse;
  ta.g_pos = pa.g_pos;
  ta.g_mean = pa.g_mean;
  ta.lse = lse_a.data_ptr();
  ta.pos = pos_a.data_ptr();
  ta.npos = npos_a.data_ptr();
  ta.cols = pa.cols;
  ta.ldcol = Cp;
  ta.col_exp = gcl.defined();
  ta.gscale = gscale.data_ptr();
  ta.row_parts = parts.data_ptr<double>();

  for (int64_t r0 = 0; r0 < R; r0 += S) {
    const int64_t s = std::min(S, R - r0);
    const at::Tensor qs = q.narrow(0, r0, s);
    const at::Tensor L = slabs.logits(qs, kc);
    ta.L = L.data_ptr();
    ta.r0 = r0;
    ta.rows = s;
    C10_CUDA_CHECK(launch_bwd_tile(ta, sdt, dtype_of(q.scalar_type()), stream));
    feature_grads.add(slabs.tile(s, q.scalar_type()), r0, qs);
  }
  feature_grads.finish();
  write_scalar_grads(parts, out.dscale, out.dbias);
  return out.tuple();
}

}  // namespace cuda
}  // namespace fastcl
