// Pieces shared by the ATen drivers of the CUDA kernels (see common.h).
#include "common.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

namespace fastcl {
namespace cuda {
namespace {

constexpr int64_t kDefaultSlabBytes = int64_t(512) << 20;

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

int64_t slab_rows(int64_t R, int64_t Cp, int64_t elem) {
  if (Cp <= 0) return std::max<int64_t>(R, 1);
  const int64_t rows = slab_bytes() / (Cp * elem);
  return std::max<int64_t>(1, std::min<int64_t>(rows, std::max<int64_t>(R, 1)));
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

at::Tensor device_scalar(const at::Tensor& t, const at::Tensor& q, at::ScalarType st) {
  return t.to(q.device(), st).reshape({}).contiguous();
}

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

void addmm_into(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == acc.scalar_type()) {
    acc.addmm_(a, b);
    return;
  }
  with_fallback(
      g_addmm_dtype, [&] { at::addmm_out(acc, acc, a, b, acc.scalar_type()); },
      [&] { acc.add_(mm_new(a, b, acc.scalar_type())); });
}

Slabs::Slabs(int64_t R, int64_t C, const at::Tensor& q, bool self)
    : C_(C), Cp_(round_up(C, kRowPad)), st_(stat_type_of(q)) {
  S_ = slab_rows(R, Cp_, static_cast<int64_t>(at::elementSize(st_)));
  if (self) {
    const int64_t part = round_up((R + kSelfSlabs - 1) / kSelfSlabs, kRowPad);
    S_ = std::min(S_, std::max(part, kMinSelfSlabRows));
  }
  buf_ = at::empty({S_ * Cp_}, q.options().dtype(st_));
}

at::Tensor Slabs::logits(const at::Tensor& a_rows, const at::Tensor& b) {
  const int64_t s = a_rows.size(0);
  TORCH_CHECK(b.size(0) <= C_, "Slabs::logits: more columns than the slab holds");
  at::Tensor L = buf_.narrow(0, 0, s * Cp_).view({s, Cp_}).narrow(1, 0, b.size(0));
  mm_into(L, a_rows, b.t());
  return L;
}

at::Tensor Slabs::tile(int64_t s, at::ScalarType gt) const {
  if (gt == st_) return buf_.as_strided({s, C_}, {Cp_, 1});
  const int64_t ratio =
      static_cast<int64_t>(at::elementSize(st_)) / static_cast<int64_t>(at::elementSize(gt));
  return buf_.view(gt).as_strided({s, C_}, {Cp_ * ratio, 1});
}

GradOutputs::GradOutputs(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                         const at::Tensor& bias)
    : dx(at::empty_like(x)),
      dy(at::empty_like(y)),
      dscale(at::empty_like(scale)),
      dbias(at::empty_like(bias)) {}

GradOutputs& GradOutputs::zero() {
  dx.zero_();
  dy.zero_();
  dscale.zero_();
  dbias.zero_();
  return *this;
}

FeatureGrads::FeatureGrads(at::Tensor dq, at::Tensor dk, const at::Tensor& kc, at::ScalarType st,
                           at::Tensor a_over_f)
    : dq_(std::move(dq)),
      dk_(std::move(dk)),
      kc_(kc),
      a_over_f_(std::move(a_over_f)),
      st_(st),
      self_(!dk_.defined()) {
  const at::Tensor& target = self_ ? dq_ : dk_;
  acc_ = (target.scalar_type() == st_ && target.is_contiguous())
             ? target
             : at::empty({target.size(0), target.size(1)}, target.options().dtype(st_));
}

void FeatureGrads::add(const at::Tensor& tile, int64_t r0, const at::Tensor& q_slab) {
  const int64_t s = tile.size(0);
  if (self_) {
    const int64_t e = r0 + s;
    at::Tensor rows = acc_.narrow(0, r0, s);
    mm_into(rows, tile.narrow(1, 0, e), kc_.narrow(0, 0, e));
    if (r0 > 0) {
      at::Tensor above = acc_.narrow(0, 0, r0);
      addmm_into(above, tile.narrow(1, 0, r0).t(), q_slab);
    }
    first_ = false;
    return;
  }
  at::Tensor dqs = dq_.narrow(0, r0, s);
  at::mul_out(dqs, mm_new(tile, kc_, st_), a_over_f_);
  if (first_) {
    mm_into(acc_, tile.t(), q_slab);
    first_ = false;
  } else {
    addmm_into(acc_, tile.t(), q_slab);
  }
}

void FeatureGrads::finish(const at::Tensor& norm) {
  const at::Tensor factor = norm.defined() ? a_over_f_ * norm : a_over_f_;
  at::Tensor& out = self_ ? dq_ : dk_;
  if (first_) {
    out.zero_();
  } else if (acc_.is_same(out)) {
    out.mul_(factor);
  } else {
    at::mul_out(out, acc_, factor);
  }
  if (norm.defined() && !self_) dq_.mul_(norm);
}

void write_scalar_grads(const at::Tensor& parts, at::Tensor& dscale, at::Tensor& dbias,
                        const at::Tensor& norm) {
  at::Tensor sums = parts.narrow(0, 0, 2).sum(1);
  if (norm.defined()) sums = sums * norm.to(sums.scalar_type());
  dscale.copy_(sums.select(0, 0).reshape(dscale.sizes()));
  dbias.copy_(sums.select(0, 1).reshape(dbias.sizes()));
}

}  // namespace cuda
}  // namespace fastcl
