// Pieces shared by the ATen drivers of the CUDA kernels (contrastive_cuda.cpp, siglip_cuda.cpp):
// slab sizing and the slab buffer, GEMMs with an fp32 (fp64) output, the statistics dtype, scalars
// on the device, and the feature gradients accumulated from gradient tiles.
//
// Every family follows one schedule: the rows of the first feature matrix are processed in slabs
// of S rows, S chosen so that the S x C slab of raw dot products fits a fixed byte budget
// (slab_bytes(); it does not grow with R); a gradient tile f * G (f: a power of two that keeps
// fp16 tiles in range) is written in place of a slab's logits, in the inputs' dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <tuple>
#include <utility>

#include "contrastive_kernels.h"  // DType

namespace fastcl {
namespace cuda {

// Row padding of the slab, in elements: rows start on 32-byte boundaries (vector loads) and the
// leading dimension of a half-precision gradient tile stays a multiple of 8 (tensor cores).
constexpr int64_t kRowPad = 8;

// Bytes of logits held per slab: FASTCL_CUDA_SLAB_BYTES when set (read at every call), else the
// default (512 MiB). The slab's row count never grows with the number of rows of q.
int64_t slab_bytes();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Statistics dtype of inputs like q: fp64 for fp64, else fp32.
at::ScalarType stat_type_of(const at::Tensor& q);
DType dtype_of(at::ScalarType t);

// Scale or bias as a 0-dim tensor of the statistics dtype on q's device.
at::Tensor device_scalar(const at::Tensor& t, const at::Tensor& q, at::ScalarType st);

inline const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Streaming multiprocessors of the current device (queried once per device).
int64_t multiprocessors();

// out = a @ b, out of the statistics dtype, a and b of the inputs' dtype (half-precision products
// accumulate in fp32 and are never rounded back to 16 bits).
void mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);
at::Tensor mm_new(const at::Tensor& a, const at::Tensor& b, at::ScalarType out_type);
// acc += a @ b, acc of the statistics dtype.
void addmm_into(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b);

// Slabs of the self-similarity forward and backward (the keys are the queries; those sweeps
// compute the blocks on and below the diagonal only, (n + 1) / (2 n) of the square with n
// slabs): at most about R / kSelfSlabs rows, but at least kMinSelfSlabRows (fewer launches where
// the square is small). The fused sweep keeps the budget's slabs: its forward GEMM covers whole
// rows whatever the slab, so finer slabs would trim only its tile pass, for more launches.
constexpr int64_t kSelfSlabs = 8;
constexpr int64_t kMinSelfSlabRows = 2048;

// The slab buffer: S rows of Cp = round_up(C, kRowPad) elements of the statistics dtype.
class Slabs {
 public:
  // For R rows of `q` against C columns (q gives the dtype and device); `self`: the rows and
  // the columns are the same (R == C), slabs of the self-similarity forward or backward.
  Slabs(int64_t R, int64_t C, const at::Tensor& q, bool self = false);
  int64_t rows() const { return S_; }  // S
  int64_t ld() const { return Cp_; }   // Cp
  // The logits of a_rows [s, D] against b [n, D] (contiguous, n <= C: the first n columns) in
  // the first s rows of the buffer: a [s, n] view with leading dimension Cp.
  at::Tensor logits(const at::Tensor& a_rows, const at::Tensor& b);
  // The gradient tile [s, C] of dtype gt stored in place of the logits (a narrower tile fills
  // the first bytes of each row).
  at::Tensor tile(int64_t s, at::ScalarType gt) const;

 private:
  int64_t C_, Cp_, S_;
  at::ScalarType st_;
  at::Tensor buf_;
};

// The gradients of two feature matrices x [R, D] and y [C, D], of scale and of bias, with the
// dtype, shape, device and (where dense) strides of each input; uninitialized until written.
struct GradOutputs {
  at::Tensor dx, dy, dscale, dbias;
  GradOutputs(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
              const at::Tensor& bias);
  // All four set to zero (no rows, no columns or no upstream gradient).
  GradOutputs& zero();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tuple() const {
    return {dx, dy, dscale, dbias};
  }
};

// dq and dk from the tiles f * G of the slabs: dq[r0 : r0 + s] = (scale / f) * tile @ k, and
// dk = (scale / f) * sum over slabs of tile^T @ q_slab, accumulated in the statistics dtype.
//
// Self-similarity (dk undefined: the keys are the queries q = kc): the tile of rows I = [r0, e)
// holds f * H = f * (G + G.T) on the columns [0, e) only (BwdTileArgs::self), and
// dq_I = H(I, <e) @ q_<e, then dq_<r0 += H(I, <r0)^T @ q_I (the blocks above the diagonal, by
// symmetry), accumulated in the statistics dtype: the gradient GEMMs of one feature set on half
// of the blocks.
class FeatureGrads {
 public:
  // dq, dk: the outputs (dtype and strides of q and k; dk undefined for self-similarity); kc: k,
  // contiguous (q for self-similarity); a_over_f: 0-dim tensor scale / f on the device.
  FeatureGrads(at::Tensor dq, at::Tensor dk, const at::Tensor& kc, at::ScalarType st,
               at::Tensor a_over_f);
  // The tile [s, C] of rows [r0, r0 + s) (self-similarity: its first r0 + s columns are read).
  void add(const at::Tensor& tile, int64_t r0, const at::Tensor& q_slab);
  // Scales the accumulated dk into the output; dq is complete after the last add. With `norm` (a
  // 0-dim tensor of the statistics dtype on the device) both are multiplied by it too: dk before
  // its rounding to the output dtype, dq after (a second rounding for half-precision dq).
  void finish(const at::Tensor& norm = at::Tensor());

 private:
  at::Tensor dq_, dk_, kc_, acc_, a_over_f_;  // acc_: dk's (self: dq's) accumulator
  at::ScalarType st_;
  bool self_;
  bool first_ = true;
};

// dscale = sum of parts[0] and dbias = sum of parts[1] (parts: [>= 2, R] fp64 row sums), times
// `norm` when defined (0-dim, on the device), written into the outputs (shape, dtype and device of
// scale and bias).
void write_scalar_grads(const at::Tensor& parts, at::Tensor& dscale, at::Tensor& dbias,
                        const at::Tensor& norm = at::Tensor());

}  // namespace cuda
}  // namespace fastcl
