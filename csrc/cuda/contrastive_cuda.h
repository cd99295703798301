// CUDA backend of the fused contrastive primitive (see fastcl/reference/contrastive.py for the
// definitions of every statistic and of the gradient). Same signatures as the CPU backend
// (csrc/cpu/contrastive.h); every argument is checked here, with messages for the user, before
// any CUDA call: CPU tensors are refused even on a machine without a GPU.
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace fastcl {
namespace cuda {

// (lse, pos, npos, mean, col_lse, col_mean, lse2) of s = scale * q @ k.T + bias. q, k, targets
// and labels on one CUDA device; scale and bias 0-dim tensors on that device (or on the CPU).
// fp32, bf16, fp16 (fp32 statistics) or fp64 (fp64 statistics); col_lse and col_mean are empty
// unless col_stats. k absent means the keys are q (self-similarity, row statistics only,
// col_stats refused): the statistics come from the symmetric logits on and below the diagonal
// blocks. lse2[r] = log sum_{c in den(r)} exp(lse2_mult s[r, c]) when lse2_mult > 0 (-inf for an
// empty set), else an empty [0]; lse2_mult negative or not finite is refused.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_fwd_cuda(const at::Tensor& q, const std::optional<at::Tensor>& k,
                     const at::Tensor& scale,
                     const at::Tensor& bias, const std::optional<at::Tensor>& targets,
                     const std::optional<at::Tensor>& row_labels,
                     const std::optional<at::Tensor>& col_labels, bool exclude_diag,
                     bool decoupled, bool pos_lse, bool col_stats, double lse2_mult);

// (dq, dk, dscale, dbias) from the gradients of the statistics (any of them may be absent).
// dq/dk have the dtype (and, where dense, the strides) of q/k; dscale/dbias the dtype, shape and
// device of scale/bias. A scale or bias on the CPU costs a synchronization (its value is copied to
// the device, its gradient back); on q's device nothing waits for the GPU. k absent means the keys
// are q (self-similarity, row statistics only): dq is then the whole gradient of q and dk an
// empty [0, D] tensor, from the symmetric logits on and below the diagonal blocks. g_lse2 [R]
// (optional) is the gradient of the forward's lse2 [R] (then required) at lse2_mult (then > 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_bwd_cuda(const std::optional<at::Tensor>& g_lse,
                     const std::optional<at::Tensor>& g_pos,
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

// (loss, npos, dq, dk, dscale, dbias) of a loss linear in the row statistics, from one sweep:
// loss = norm * sum over rows with npos > 0 of g_lse lse + g_pos pos + g_mean mean (absent
// coefficients are zero), norm = 1 / max(#{rows with npos > 0}, 1) when `mean`, else 1; the
// gradients of that loss. Same contract as the CPU backend's contrastive_fused_cpu: k absent means
// the keys are q (dq is then the whole gradient of q and dk an empty [0, D] tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_fused_cuda(const std::optional<at::Tensor>& g_lse,
                       const std::optional<at::Tensor>& g_pos,
                       const std::optional<at::Tensor>& g_mean, const at::Tensor& q,
                       const std::optional<at::Tensor>& k, const at::Tensor& scale,
                       const at::Tensor& bias, const std::optional<at::Tensor>& targets,
                       const std::optional<at::Tensor>& row_labels,
                       const std::optional<at::Tensor>& col_labels, bool exclude_diag,
                       bool decoupled, bool pos_lse, bool mean);

}  // namespace cuda
}  // namespace fastcl
