// CUDA kernels of the sigmoid loss (SigLIP): launchers over raw device pointers.
//
// This header and siglip_kernels.cu include no torch header; the ATen driver (siglip_cuda.cpp)
// holds the slabs, the GEMMs and the argument checks. The contract (all backends) is
// s_ij = scale * l_ij + bias with l_ij = <x_i, y_j>, z_ij = +1 if (diag_pos and i == j) else -1,
// the pair loss softplus(-z_ij s_ij) and, for an upstream gradient g_i of row i's sum, the
// gradient of the logit G_ij = -g_i z_ij sigmoid(-z_ij s_ij).
//
// The kernel works on one slab of L = x_slab @ y.T (raw dot products, statistics dtype: fp32, or
// fp64 for fp64 inputs), `rows` x C, row-major with leading dimension `ldl` (a multiple of 8
// elements, 16-byte aligned rows; the padding is read but never used). Scale and bias are read
// from device memory (0-dim tensors of the statistics dtype).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "contrastive_kernels.h"  // DType

namespace fastcl {
namespace cuda {

// What the tile kernel computes for each row of the slab.
enum class SiglipPass : int {
  kLoss = 0,      // rows_out[r] = sum_j softplus(-z s)
  kGrad = 1,      // the gradient tile and its row sums (parts[0], parts[1])
  kLossGrad = 2,  // both; the row's loss goes to parts[2] (fp64)
};

// One block per row of the slab; global row r = r0 + i. In the gradient passes the logits of
// the row are overwritten, in place, with f * G (G's dtype: a narrower G occupies the first half
// of each row's bytes, so the tile is a [rows, C] matrix with leading dimension
// ldl * sizeof(stat) / sizeof(G)), f = gscale[0] from launch_bwd_prep (a power of two with
// f * max|g| <= 2^14: |G_ij| <= |g_i|), and the row sums are written to the fp64 array parts
// ([3, R], row-major): parts[r] = sum_j G_rj l_rj, parts[R + r] = sum_j G_rj (unscaled G), and in
// the fused pass parts[2R + r] = the row's loss.
struct SiglipTileArgs {
  int64_t R;  // rows of x
  int64_t C;  // rows of y (columns of the logits)
  bool diag_pos;
  void* L;
  int64_t ldl;
  int64_t r0;
  int64_t rows;
  const void* scale;   // 0-dim, statistics dtype
  const void* bias;    // 0-dim, statistics dtype
  const void* g_row;   // [R], statistics dtype (gradient passes)
  const void* gscale;  // [2] (f, 1 / f), statistics dtype (gradient passes)
  void* rows_out;      // [R], statistics dtype (kLoss)
  double* parts;       // [3, R] (gradient passes)
};

// stat/grad: (kFloat32, kFloat32 | kBFloat16 | kFloat16) or (kFloat64, kFloat64); grad is ignored
// by kLoss.
cudaError_t launch_siglip_tile(const SiglipTileArgs& args, SiglipPass pass, DType stat, DType grad,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace fastcl
