// CUDA kernels of the sigmoid loss (see siglip_kernels.h for the contract of the launcher).
//
// One kernel, one block per row of the slab, serves the three passes. Each thread streams
// 16-byte vectors of the row's raw dot products l and, per element, with t = -z s:
// e = exp(-|t|), softplus(t) = max(t, 0) + log1p(e), sigmoid(t) = 1 / (1 + e) for t >= 0 and
// e / (1 + e) otherwise (neither overflows for any logit, and log1p keeps the small losses of the
// far negative pairs exact). The pair's gradient is G = -g z sigmoid(t): g sigmoid(t) off the
// positive diagonal, -g sigmoid(t) on it. Per-thread sums in the statistics dtype, merged in fp64
// by a block reduction. A G narrower than the logits is written over the first half of the row's
// bytes (for_each_row_vector, kernel_common.cuh).
#include "siglip_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_common.cuh"

namespace fastcl {
namespace cuda {
namespace {

__device__ __forceinline__ float expv(float x) { return expf(x); }
__device__ __forceinline__ double expv(double x) { return exp(x); }
__device__ __forceinline__ float log1pv(float x) { return log1pf(x); }
__device__ __forceinline__ double log1pv(double x) { return log1p(x); }

// A row's sums of G * l, G and the pair losses.
struct RowSums {
  double ds, db, loss;
  __device__ static RowSums identity() { return RowSums{0.0, 0.0, 0.0}; }
  __device__ void merge(const RowSums& o) {
    ds += o.ds;
    db += o.db;
    loss += o.loss;
  }
  __device__ RowSums shfl(int o) const {
    return RowSums{shfl_xor(ds, o), shfl_xor(db, o), shfl_xor(loss, o)};
  }
};

template <class T, class G, bool kLoss, bool kGrad>
__global__ void siglip_tile_kernel(const SiglipTileArgs P) {
  constexpr int V = VecWidth<T>::value;
  const int64_t i = blockIdx.x;
  const int64_t gr = P.r0 + i;
  T* x = static_cast<T*>(P.L) + i * P.ldl;
  const T a = *static_cast<const T*>(P.scale);
  const T b = *static_cast<const T*>(P.bias);
  // The positive column of the row (-1: none). Padding columns may equal it; they are masked.
  const int64_t dcol = P.diag_pos ? gr : -1;
  T g = T(0), f = T(0);
  if constexpr (kGrad) {
    g = static_cast<const T*>(P.g_row)[gr];
    f = static_cast<const T*>(P.gscale)[0];
  }

  T loss = T(0), ds = T(0), db = T(0);
  for_each_row_vector<T, G, kGrad>(x, P.C, [&](int64_t c, const Pack<T, V>& v, Pack<G, V>& out) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const bool valid = c + j < P.C;
      const T l = valid ? v.v[j] : T(0);
      const T s = a * l + b;
      const bool pos = c + j == dcol;
      const T t = pos ? -s : s;  // -z s
      const T e = expv(-absv(t));
      if constexpr (kLoss) {
        const T sp = (t > T(0) ? t : T(0)) + log1pv(e);
        loss += valid ? sp : T(0);
      }
      if constexpr (kGrad) {
        const T sg = (t >= T(0) ? T(1) : e) / (T(1) + e);
        const T gv = valid ? (pos ? -g * sg : g * sg) : T(0);
        ds += gv * l;
        db += gv;
        store_as(gv * f, out.v[j]);
      }
    }
  });
  const RowSums rs = block_reduce(
      RowSums{static_cast<double>(ds), static_cast<double>(db), static_cast<double>(loss)});
  if (threadIdx.x != 0) return;
  if constexpr (kGrad) {
    P.parts[gr] = rs.ds;
    P.parts[P.R + gr] = rs.db;
    if constexpr (kLoss) P.parts[2 * P.R + gr] = rs.loss;
  } else {
    static_cast<T*>(P.rows_out)[gr] = static_cast<T>(rs.loss);
  }
}

template <class T, class G>
cudaError_t launch_pass(const SiglipTileArgs& args, SiglipPass pass, int threads,
                        cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(args.rows));
  switch (pass) {
    case SiglipPass::kLoss:
      siglip_tile_kernel<T, T, true, false><<<grid, threads, 0, stream>>>(args);
      break;
    case SiglipPass::kGrad:
      siglip_tile_kernel<T, G, false, true><<<grid, threads, 0, stream>>>(args);
      break;
    case SiglipPass::kLossGrad:
      siglip_tile_kernel<T, G, true, true><<<grid, threads, 0, stream>>>(args);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_siglip_tile(const SiglipTileArgs& args, SiglipPass pass, DType stat, DType grad,
                               cudaStream_t stream) {
  if (args.rows <= 0) return cudaSuccess;
  if (stat == DType::kFloat64) {
    if (pass != SiglipPass::kLoss && grad != DType::kFloat64) return cudaErrorInvalidValue;
    return launch_pass<double, double>(args, pass, row_threads(args.C, 2), stream);
  }
  if (stat != DType::kFloat32) return cudaErrorInvalidValue;
  const int threads = row_threads(args.C, 4);
  if (pass == SiglipPass::kLoss) return launch_pass<float, float>(args, pass, threads, stream);
  switch (grad) {
    case DType::kFloat32:
      return launch_pass<float, float>(args, pass, threads, stream);
    case DType::kBFloat16:
      return launch_pass<float, __nv_bfloat16>(args, pass, threads, stream);
    case DType::kFloat16:
      return launch_pass<float, __half>(args, pass, threads, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fastcl
