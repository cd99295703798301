// CPU kernels of the sigmoid loss (SigLIP), rectangular: x [R, D] against y [C, D].
//
// s_ij = scale * <x_i, y_j> + bias, z_ij = +1 if (diag_pos and i == j) else -1, and the loss of a
// pair is softplus(-z_ij s_ij) = -log sigmoid(z_ij s_ij). Statistics are fp32 (fp64 for fp64
// inputs); inputs may be fp32, fp64, bf16 or fp16, scale and bias any floating 0-dim tensors.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace fastcl {
namespace cpu {

// rows [R]: rows[i] = sum_j softplus(-z_ij s_ij).
at::Tensor siglip_fwd_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                          const at::Tensor& bias, bool diag_pos);

// (dx, dy, dscale, dbias): gradients of sum_i g_row[i] rows[i]. With
// G_ij = -g_row[i] z_ij sigmoid(-z_ij s_ij): dx = scale G y, dy = scale G^T x,
// dscale = sum G_ij <x_i, y_j>, dbias = sum G_ij. dx/dy in the dtypes of x/y, dscale/dbias in
// those of scale/bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
siglip_bwd_cpu(const at::Tensor& g_row, const at::Tensor& x, const at::Tensor& y,
               const at::Tensor& scale, const at::Tensor& bias, bool diag_pos);

// (loss, dx, dy, dscale, dbias): loss = sum_ij softplus(-z_ij s_ij), divided by R when mean
// (0 when R = 0), and its gradients (g_row = 1/R or 1), from one pass over the logits.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
siglip_fused_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                 const at::Tensor& bias, bool diag_pos, bool mean);

}  // namespace cpu
}  // namespace fastcl
