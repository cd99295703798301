// CPU kernel of the tiled similarity search: the k largest <q_i, key_j> of every query row.
#pragma once

#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace fastcl {
namespace cpu {

// (values [R, k], indices [R, k] int64) of query [R, D] against key [C, D]: per row the k
// largest similarities in decreasing order, ties broken by the smaller column first (NaN ranks
// above every number, -0.0 is returned as +0.0). Values are fp32 (fp64 for fp64 inputs): those
// of the fp32 / fp64 product of the inputs. exclude_self drops column j == i from row i.
// Requires 1 <= k <= C - exclude_self (checked by the caller).
std::tuple<at::Tensor, at::Tensor> topk_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                int64_t k, bool exclude_self);

}  // namespace cpu
}  // namespace fastcl
