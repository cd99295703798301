// CUDA backend of the sigmoid loss (SigLIP), rectangular: x [R, D] against y [C, D], with
// s_ij = scale * <x_i, y_j> + bias and z_ij = +1 if (diag_pos and i == j) else -1; the pair loss is
// softplus(-z_ij s_ij). Same contract as the CPU and Triton backends. Every argument is checked
// here, with messages for the user, before any CUDA call: CPU tensors are refused even on a
// machine without a GPU. x and y: fp32, bf16, fp16 (fp32 statistics) or fp64, on one CUDA device;
// scale and bias: 0-dim floating tensors on that device (or on the CPU, at the cost of a copy).
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace fastcl {
namespace cuda {

// Row sums [R] (fp32; fp64 for fp64 inputs): rows[i] = sum_j softplus(-z_ij s_ij).
at::Tensor siglip_fwd_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                           const at::Tensor& bias, bool diag_pos);

// (dx, dy, dscale, dbias): the gradients of sum_i g_row[i] rows[i] (g_row [R], floating). With
// G_ij = -g_row[i] z_ij sigmoid(-z_ij s_ij): dx = scale G y, dy = scale G^T x,
// dscale = sum G_ij <x_i, y_j>, dbias = sum G_ij. dx/dy have the dtype (and, where dense, the
// strides) of x/y; dscale/dbias the dtype, shape and device of scale/bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_bwd_cuda(
    const at::Tensor& g_row, const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
    const at::Tensor& bias, bool diag_pos);

// (loss, dx, dy, dscale, dbias) in one pass over the slabs: loss = sum_ij softplus(-z s), divided
// by R when `mean` (0 when R or C is 0), 0-dim fp32 (fp64 for fp64 inputs), and its gradients
// (those of siglip_bwd_cuda with g_row = 1 / R or 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_fused_cuda(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& bias,
    bool diag_pos, bool mean);

}  // namespace cuda
}  // namespace fastcl
