// CUDA backend of the sigmoid loss: the ATen driver around the kernel of siglip_kernels.cu.
//
// Same schedule as the contrastive driver (common.h): the rows of x are processed in slabs whose
// S x C logits fit the slab budget. Per slab, one fp32-output GEMM (fp64 for fp64 inputs) writes
// the raw dot products x_slab @ y^T; then
//
// - forward: the tile kernel sums the pair losses of each row;
// - backward and fused: the tile kernel turns the logits, in place, into f * G in the inputs'
//   dtype (f: a power of two from max |g_row| that keeps fp16 tiles in range, undone after the
//   GEMMs), with the row sums of G * l and G (fp64) and, fused, of the losses; then
//   dx_slab = (scale / f) * tile @ y and dy += tile^T @ x_slab (fp32 accumulator, scaled at the
//   end); dscale and dbias are the sums of the row sums.
//
// The fused pass is the backward with g_row = 1 / R (mean) or 1 (sum) and the row losses written
// on the way, so loss and gradients cost one GEMM per slab for the logits and two for the
// gradients. No host synchronization (unless scale or bias live on the CPU).
//
// Memory beyond inputs and outputs: one slab of logits (the tile lives in it), the dy accumulator
// (C x D fp32 when the inputs are not fp32), per-slab dx products (S x D) and O(R) row sums.
#include "siglip_cuda.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <optional>

#include "../checks.h"
#include "common.h"
#include "contrastive_kernels.h"
#include "siglip_kernels.h"

namespace fastcl {
namespace cuda {
namespace {

void check_inputs(const char* fn, const at::Tensor& x, const at::Tensor& y,
                  const at::Tensor& scale, const at::Tensor& bias) {
  checks::check_features(fn, x, y, "x", "y", c10::DeviceType::CUDA);
  checks::check_scalar(fn, "scale", scale, x.device());
  checks::check_scalar(fn, "bias", bias, x.device());
}

// Every slab of one pass: the GEMM of the slab's logits, the tile kernel and, in the gradient
// passes, the products of the tile. R, C > 0. kLoss writes `rows` ([R], statistics dtype); the
// gradient passes (g: [R] of the statistics dtype, contiguous) write the four gradients of `out`
// and return the fp64 row sums [2, R] (kGrad) or [3, R] (kLossGrad; row 2: the losses).
at::Tensor run_slabs(SiglipPass pass, const at::Tensor& x, const at::Tensor& y,
                     const at::Tensor& scale, const at::Tensor& bias, bool diag_pos,
                     const at::Tensor& g, const at::Tensor& rows, GradOutputs* out) {
  const int64_t R = x.size(0), C = y.size(0);
  const at::ScalarType st = stat_type_of(x);
  const DType sdt = dtype_of(st);
  const auto opt = x.options().dtype(st);
  const bool grad = pass != SiglipPass::kLoss;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor sc = device_scalar(scale, x, st), bi = device_scalar(bias, x, st);
  const at::Tensor yc = y.contiguous();
  Slabs slabs(R, C, x);

  SiglipTileArgs ta{};
  ta.R = R;
  ta.C = C;
  ta.diag_pos = diag_pos;
  ta.ldl = slabs.ld();
  ta.scale = sc.data_ptr();
  ta.bias = bi.data_ptr();
  at::Tensor parts, gscale;  // alive until the last kernel that reads them has been enqueued
  std::optional<FeatureGrads> feature_grads;
  if (grad) {
    // f and 1 / f from the bound |G_ij| <= |g_i| (the contrastive preparation with g as its
    // only row gradient and no column terms).
    gscale = at::empty({2}, opt);
    BwdPrepArgs pa{};
    pa.R = R;
    pa.C = C;
    pa.exclude_diag = false;
    pa.g_lse = g.data_ptr();
    pa.cols = nullptr;
    pa.ldcol = 0;
    pa.gscale = gscale.data_ptr();
    C10_CUDA_CHECK(launch_bwd_prep(pa, sdt, stream));
    feature_grads.emplace(out->dx, out->dy, yc, st, sc * gscale.select(0, 1));
    parts = at::empty({pass == SiglipPass::kLossGrad ? 3 : 2, R}, opt.dtype(at::kDouble));
    ta.g_row = g.data_ptr();
    ta.gscale = gscale.data_ptr();
    ta.parts = parts.data_ptr<double>();
  } else {
    ta.rows_out = rows.data_ptr();
  }

  const int64_t S = slabs.rows();
  for (int64_t r0 = 0; r0 < R; r0 += S) {
    const int64_t s = std::min(S, R - r0);
    const at::Tensor xs = x.narrow(0, r0, s);
    const at::Tensor L = slabs.logits(xs, yc);
    ta.L = L.data_ptr();
    ta.r0 = r0;
    ta.rows = s;
    C10_CUDA_CHECK(launch_siglip_tile(ta, pass, sdt, dtype_of(x.scalar_type()), stream));
    if (grad) feature_grads->add(slabs.tile(s, x.scalar_type()), r0, xs);
  }
  if (grad) {
    feature_grads->finish();
    write_scalar_grads(parts, out->dscale, out->dbias);
  }
  return parts;
}

}  // namespace

at::Tensor siglip_fwd_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                           const at::Tensor& bias, bool diag_pos) {
  check_inputs("siglip_fwd_cuda", x, y, scale, bias);
  c10::NoGradGuard no_grad;
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t R = x.size(0), C = y.size(0);
  const at::ScalarType st = stat_type_of(x);
  at::Tensor rows = at::empty({R}, x.options().dtype(st));
  if (R == 0) return rows;
  if (C == 0) return rows.zero_();

  run_slabs(SiglipPass::kLoss, x, y, scale, bias, diag_pos, at::Tensor(), rows, nullptr);
  return rows;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_bwd_cuda(
    const at::Tensor& g_row, const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
    const at::Tensor& bias, bool diag_pos) {
  const char* fn = "siglip_bwd_cuda";
  check_inputs(fn, x, y, scale, bias);
  TORCH_CHECK(g_row.defined(), fn, ": g_row must be a tensor");
  const int64_t R = x.size(0), C = y.size(0);
  checks::check_vec(fn, "g_row", std::optional<at::Tensor>(g_row), R, "R (rows of x)",
                    x.device());
  c10::NoGradGuard no_grad;
  const c10::cuda::CUDAGuard guard(x.device());

  GradOutputs out(x, y, scale, bias);
  if (R == 0 || C == 0) return out.zero().tuple();
  const at::Tensor g = g_row.to(stat_type_of(x)).contiguous();
  run_slabs(SiglipPass::kGrad, x, y, scale, bias, diag_pos, g, at::Tensor(), &out);
  return out.tuple();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_fused_cuda(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& bias,
    bool diag_pos, bool mean) {
  check_inputs("siglip_fused_cuda", x, y, scale, bias);
  c10::NoGradGuard no_grad;
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t R = x.size(0), C = y.size(0);
  const at::ScalarType st = stat_type_of(x);
  const auto opt = x.options().dtype(st);
  GradOutputs out(x, y, scale, bias);
  if (R == 0 || C == 0) {
    out.zero();
    return {at::zeros({}, opt), out.dx, out.dy, out.dscale, out.dbias};
  }
  const at::Tensor g = at::full({R}, mean ? 1.0 / static_cast<double>(R) : 1.0, opt);
  const at::Tensor parts =
      run_slabs(SiglipPass::kLossGrad, x, y, scale, bias, diag_pos, g, at::Tensor(), &out);
  at::Tensor loss = parts.select(0, 2).sum();
  if (mean) loss.div_(static_cast<double>(R));
  return {loss.to(st), out.dx, out.dy, out.dscale, out.dbias};
}

}  // namespace cuda
}  // namespace fastcl
