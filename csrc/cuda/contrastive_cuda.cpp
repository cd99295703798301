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
#include <atomic>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <string>

#include "contrastive_kernels.h"

namespace fastcl {
namespace cuda {
namespace {

using OptT = std::optional<at::Tensor>;

constexpr int64_t kDefaultSlabBytes = int64_t(512) << 20;
// Row padding of the slab, in elements: rows start on 32-byte boundaries (vector loads) and the
// leading dimension of a half-precision gradient tile stays a multiple of 8 (tensor cores).
constexpr int64_t kRowPad = 8;
constexpr int kMaxSplits = 1024;
constexpr int64_t kMinSplitRows = 64;

// -------------------------------------------------------------------------------------------
// Argument checks (before any CUDA call)

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

std::string dtype_str(const at::Tensor& t) { return std::string(c10::toString(t.scalar_type())); }

void check_on_device(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), fn, " expects CUDA tensors, got ", t.device().str(), " for ", name);
  TORCH_CHECK(t.device() == q.device(), fn, ": ", name, " is on ", t.device().str(),
              " but q is on ", q.device().str(), "; all tensors must be on one CUDA device");
}

void check_features(const char* fn, const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.defined() && k.defined(), fn, ": q and k must be tensors");
  TORCH_CHECK(q.is_cuda(), fn, " expects CUDA tensors, got ", q.device().str(), " for q");
  check_on_device(fn, "k", k, q);
  TORCH_CHECK(q.dim() == 2, fn, ": q must be a 2-D tensor [R, D], got shape ", shape_str(q));
  TORCH_CHECK(k.dim() == 2, fn, ": k must be a 2-D tensor [C, D], got shape ", shape_str(k));
  TORCH_CHECK(q.size(1) == k.size(1), fn,
              ": q and k must have the same feature size D, got q of shape ", shape_str(q),
              " and k of shape ", shape_str(k));
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              fn, ": q and k must be float32, float64, bfloat16 or float16, got ", dtype_str(q));
  TORCH_CHECK(k.scalar_type() == st, fn, ": q and k must have the same dtype, got q ",
              dtype_str(q), " and k ", dtype_str(k));
  TORCH_CHECK(q.size(0) < (int64_t(1) << 31) && k.size(0) < (int64_t(1) << 31), fn,
              ": R and C must be below 2^31, got R = ", q.size(0), " and C = ", k.size(0));
}

void check_scalar(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor");
  TORCH_CHECK(t.is_cpu() || t.device() == q.device(), fn, ": ", name, " is on ",
              t.device().str(), "; it must be on q's device (", q.device().str(),
              ") or on the CPU");
  TORCH_CHECK(t.numel() == 1 && t.dim() <= 1, fn, ": ", name,
              " must be a scalar (0-dim) tensor, got shape ", shape_str(t));
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), fn, ": ", name,
              " must be a floating-point tensor, got ", dtype_str(t));
}

void check_index(const char* fn, const char* name, const OptT& t, const at::Tensor& q, int64_t n,
                 const char* what) {
  if (!t.has_value()) return;
  check_on_device(fn, name, *t, q);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, fn, ": ", name, " must be a 1-D tensor of length ",
              what, " = ", n, ", got shape ", shape_str(*t));
  TORCH_CHECK(at::isIntegralType(t->scalar_type(), /*includeBool=*/false), fn, ": ", name,
              " must be an integer tensor (int64), got ", dtype_str(*t));
}

void check_masks(const char* fn, const at::Tensor& q, const at::Tensor& k, const OptT& targets,
                 const OptT& row_labels, const OptT& col_labels) {
  TORCH_CHECK(row_labels.has_value() == col_labels.has_value(), fn,
              ": row_labels and col_labels must be given together (label mode) or both be None");
  check_index(fn, "targets", targets, q, q.size(0), "R (rows of q)");
  check_index(fn, "row_labels", row_labels, q, q.size(0), "R (rows of q)");
  check_index(fn, "col_labels", col_labels, q, k.size(0), "C (rows of k)");
}

void check_vec(const char* fn, const char* name, const OptT& t, const at::Tensor& q, int64_t n,
               const char* what) {
  if (!t.has_value()) return;
  check_on_device(fn, name, *t, q);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, fn, ": ", name, " must be a 1-D tensor of length ",
              what, " = ", n, ", got shape ", shape_str(*t));
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), fn, ": ", name,
              " must be a floating-point tensor, got ", dtype_str(*t));
}

// -------------------------------------------------------------------------------------------
// GEMMs

// Whether ATen takes half-precision inputs with an fp32 output (mm.dtype, CUDA) and an fp32
// `self` in addmm.dtype: -1 not tried yet, 1 yes, 0 no. Without them the same products are
// formed from fp32 copies of the operands (exact: the products of two half-precision numbers
// are exact in fp32), which is slower.
std::atomic<int> g_mm_dtype{-1};
std::atomic<int> g_addmm_dtype{-1};

template <class Fast, class Slow>
void with_fallback(std::atomic<int>& state, Fast fast, Slow slow) {
  if (state.load() != 0) {
    try {
      fast();
      state.store(1);
      return;
    } catch (const c10::OutOfMemoryError&) {
      throw;
    } catch (const c10::Error&) {
      if (state.load() == 1) throw;
      state.store(0);
    }
  }
  slow();
}

// out = a @ b, out of the statistics dtype, a and b of the inputs' dtype.
void mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b);
    return;
  }
  with_fallback(
      g_mm_dtype, [&] { at::mm_out(out, a, b, out.scalar_type()); },
      [&] { at::mm_out(out, a.to(out.scalar_type()), b.to(out.scalar_type())); });
}

at::Tensor mm_new(const at::Tensor& a, const at::Tensor& b, at::ScalarType out_type) {
  if (a.scalar_type() == out_type) return at::mm(a, b);
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options().dtype(out_type));
  mm_into(out, a, b);
  return out;
}

// acc += a @ b, acc of the statistics dtype.
void addmm_into(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == acc.scalar_type()) {
    acc.addmm_(a, b);
    return;
  }
  with_fallback(
      g_addmm_dtype, [&] { at::addmm_out(acc, acc, a, b, acc.scalar_type()); },
      [&] { acc.add_(mm_new(a, b, acc.scalar_type())); });
}

// -------------------------------------------------------------------------------------------

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

int64_t slab_rows(int64_t R, int64_t Cp, int64_t elem) {
  if (Cp <= 0) return std::max<int64_t>(R, 1);
  const int64_t rows = slab_bytes() / (Cp * elem);
  return std::max<int64_t>(1, std::min<int64_t>(rows, std::max<int64_t>(R, 1)));
}

at::ScalarType stat_type_of(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return DType::kFloat64;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      return DType::kFloat32;
  }
}

// Scale or bias as a 0-dim tensor of the statistics dtype on q's device.
at::Tensor device_scalar(const at::Tensor& t, const at::Tensor& q, at::ScalarType st) {
  return t.to(q.device(), st).reshape({}).contiguous();
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

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

// Streaming multiprocessors of the current device (queried once per device).
int64_t multiprocessors() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 0 && dev < kMaxDevices && cache[dev].load() > 0) return cache[dev].load();
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  n = std::max(n, 1);
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(n);
  return n;
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

int64_t slab_bytes() {
  const char* env = std::getenv("FASTCL_CUDA_SLAB_BYTES");
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    if (end != env && v > 0) return static_cast<int64_t>(v);
  }
  return kDefaultSlabBytes;
}

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
  const int64_t Cp = round_up(C, kRowPad);
  const int64_t S = slab_rows(R, Cp, static_cast<int64_t>(at::elementSize(st)));
  at::Tensor buf = at::empty({S * Cp}, opt);

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
    at::Tensor L = buf.narrow(0, 0, s * Cp).view({s, Cp}).narrow(1, 0, C);
    mm_into(L, q.narrow(0, r0, s), kc.t());
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
  const int64_t R = q.size(0), C = k.size(0), D = q.size(1);
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

  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k);
  at::Tensor dscale = at::empty_like(scale), dbias = at::empty_like(bias);
  const bool any = gl.defined() || gp.defined() || gm.defined() || gcl.defined() || gcm.defined();
  if (!any || R == 0 || C == 0) {
    dq.zero_();
    dk.zero_();
    dscale.zero_();
    dbias.zero_();
    return {dq, dk, dscale, dbias};
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor sc = device_scalar(scale, q, st), bi = device_scalar(bias, q, st);
  const Masks masks = make_masks(targets, row_labels, col_labels);
  const at::Tensor lse_a = lse.to(st).contiguous(), pos_a = pos.to(st).contiguous();
  const at::Tensor npos_a = npos.to(st).contiguous();
  const at::Tensor col_lse_a = gcl.defined() ? col_lse.to(st).contiguous() : at::Tensor();
  const at::Tensor kc = k.contiguous();
  const int64_t Cp = round_up(C, kRowPad);

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
  const at::Tensor a_over_f = sc * gscale.select(0, 1);

  const int64_t S = slab_rows(R, Cp, static_cast<int64_t>(at::elementSize(st)));
  at::Tensor buf = at::empty({S * Cp}, opt);
  // The tile: in place of the logits; a half-precision tile fills the first half of each row.
  const bool narrow = q.scalar_type() != st;
  const at::Tensor tile = narrow ? buf.view(q.scalar_type()) : buf;
  const int64_t ldt =
      narrow ? Cp * static_cast<int64_t>(at::elementSize(st) / at::elementSize(q.scalar_type()))
             : Cp;
  at::Tensor dk_acc = (k.scalar_type() == st && dk.is_contiguous()) ? dk : at::empty({C, D}, opt);
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
    at::Tensor L = buf.narrow(0, 0, s * Cp).view({s, Cp}).narrow(1, 0, C);
    mm_into(L, qs, kc.t());
    ta.L = L.data_ptr();
    ta.r0 = r0;
    ta.rows = s;
    C10_CUDA_CHECK(launch_bwd_tile(ta, sdt, dtype_of(q.scalar_type()), stream));
    const at::Tensor G = tile.as_strided({s, C}, {ldt, 1});
    at::Tensor dqs = dq.narrow(0, r0, s);
    at::mul_out(dqs, mm_new(G, kc, st), a_over_f);
    if (r0 == 0) {
      mm_into(dk_acc, G.t(), qs);
    } else {
      addmm_into(dk_acc, G.t(), qs);
    }
  }
  if (dk_acc.is_same(dk)) {
    dk.mul_(a_over_f);
  } else {
    at::mul_out(dk, dk_acc, a_over_f);
  }
  const at::Tensor sums = parts.sum(1);
  dscale.copy_(sums.select(0, 0).reshape(dscale.sizes()));
  dbias.copy_(sums.select(0, 1).reshape(dbias.sizes()));
  return {dq, dk, dscale, dbias};
}

}  // namespace cuda
}  // namespace fastcl
