// CPU kernels of the fused contrastive primitive (see fastcl/reference/contrastive.py for the
// definitions of every statistic and of the gradient).
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace fastcl {
namespace cpu {

// (lse, pos, npos, mean, col_lse, col_mean, lse2).
using FwdStats =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (lse, pos, npos, mean, col_lse, col_mean, lse2) of s = scale * q @ k.T + bias. Statistics are
// fp32 (fp64 for fp64 inputs); col_lse and col_mean are empty unless col_stats; lse2 (the LSE of
// lse2_mult * s over the denominator set, the running max shared with lse) is empty unless
// lse2_mult > 0 (the caller checks it is finite and >= 0). Without k the keys are q itself
// (self-similarity, no column statistics): the symmetric logits are computed on the blocks on
// and below the diagonal only.
FwdStats contrastive_fwd_cpu(const at::Tensor& q, const std::optional<at::Tensor>& k,
                             const at::Tensor& scale, const at::Tensor& bias,
                             const std::optional<at::Tensor>& targets,
                             const std::optional<at::Tensor>& row_labels,
                             const std::optional<at::Tensor>& col_labels, bool exclude_diag,
                             bool decoupled, bool pos_lse, bool col_stats, double lse2_mult);

// (dq, dk, dscale, dbias) from the gradients of the statistics (any of them may be absent).
// dq/dk have the dtype (and, where dense, the strides) of q/k; dscale/dbias those of scale/bias.
// g_lse2 (with the saved lse2 [R] and lse2_mult > 0, checked by the caller) adds the lse2 term.
// Without k the keys are q itself (self-similarity, no column statistics): dq is then the
// gradient with respect to q in both roles and dk is an empty [0, D] tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_bwd_cpu(const std::optional<at::Tensor>& g_lse, const std::optional<at::Tensor>& g_pos,
                    const std::optional<at::Tensor>& g_mean,
                    const std::optional<at::Tensor>& g_col_lse,
                    const std::optional<at::Tensor>& g_col_mean, const at::Tensor& q,
                    const std::optional<at::Tensor>& k, const at::Tensor& scale,
                    const at::Tensor& bias,
                    const std::optional<at::Tensor>& targets,
                    const std::optional<at::Tensor>& row_labels,
                    const std::optional<at::Tensor>& col_labels, const at::Tensor& lse,
                    const at::Tensor& pos, const at::Tensor& npos, const at::Tensor& col_lse,
                    bool exclude_diag, bool decoupled, bool pos_lse, bool col_stats,
                    const std::optional<at::Tensor>& g_lse2,
                    const std::optional<at::Tensor>& lse2, double lse2_mult);

// Forward and backward of the row statistics in one sweep, for a loss linear in them with
// coefficients known in advance: loss = norm * sum_r [npos_r > 0] (g_lse_r lse_r + g_pos_r pos_r
// + g_mean_r mean_r), norm = 1 / max(#{r: npos_r > 0}, 1) when mean, else 1. Returns
// (loss, npos, dq, dk, dscale, dbias): the loss (0-dim, statistics dtype), npos [R] and the
// gradients of the loss (dtypes as in contrastive_bwd_cpu). Without k the keys are q itself
// (self-similarity: symmetric logits, half of the gradient GEMMs); dq is then the gradient with
// respect to q in both roles and dk is an empty [0, D] tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_fused_cpu(const std::optional<at::Tensor>& g_lse,
                      const std::optional<at::Tensor>& g_pos,
                      const std::optional<at::Tensor>& g_mean, const at::Tensor& q,
                      const std::optional<at::Tensor>& k, const at::Tensor& scale,
                      const at::Tensor& bias,
                      const std::optional<at::Tensor>& targets,
                      const std::optional<at::Tensor>& row_labels,
                      const std::optional<at::Tensor>& col_labels, bool exclude_diag,
                      bool decoupled, bool pos_lse, bool mean);

}  // namespace cpu
}  // namespace fastcl
