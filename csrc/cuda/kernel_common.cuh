// Device helpers shared by the CUDA kernels of every family (plain CUDA, no torch header):
// element types, vector loads, warp and block reductions, the launch width of the row kernels.
//
// Everything here is a template or an inline function: each .cu file compiles its own copy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastcl {
namespace cuda {

constexpr int kMaxRowWarps = 8;            // warps per block of the row kernels
constexpr float kGradHeadroom = 16384.0f;  // bound of |f * G| in a stored tile (fp16 max 65504)
constexpr int kGradScaleMaxExp = 60;       // |log2 f| of the tile factor f

template <class T>
__device__ __forceinline__ T neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() {
  return -__int_as_float(0x7f800000);
}
template <>
__device__ __forceinline__ double neg_inf<double>() {
  return -__longlong_as_double(0x7ff0000000000000LL);
}

__device__ __forceinline__ float absv(float x) { return fabsf(x); }
__device__ __forceinline__ double absv(double x) { return fabs(x); }

// Rounds a statistic-type value to the gradient tile's type.
__device__ __forceinline__ void store_as(float x, float& o) { o = x; }
__device__ __forceinline__ void store_as(float x, __nv_bfloat16& o) { o = __float2bfloat16_rn(x); }
__device__ __forceinline__ void store_as(float x, __half& o) { o = __float2half_rn(x); }
__device__ __forceinline__ void store_as(double x, double& o) { o = x; }

// N elements loaded or stored as one vector.
template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements of T in one 16-byte vector.
template <class T>
struct VecWidth {
  static constexpr int value = static_cast<int>(16 / sizeof(T));
};

constexpr unsigned kFullMask = 0xffffffffu;
template <class T>
__device__ __forceinline__ T shfl_xor(T v, int m) {
  return __shfl_xor_sync(kFullMask, v, m);
}

// Block-wide reduction of a partial P (P::merge, P::shfl, P::identity); the result is valid in
// thread 0. `ctx`, the same in every thread, is passed on to each P::merge(other, ctx...). Every
// thread of the block must call it; blockDim.x * blockDim.y is a multiple of 32.
template <class P, class... Ctx>
__device__ P block_reduce(P p, const Ctx&... ctx) {
  __shared__ P part[32];
  const int tid = static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int nwarps = static_cast<int>((blockDim.x * blockDim.y) >> 5);
  for (int o = 16; o > 0; o >>= 1) p.merge(p.shfl(o), ctx...);
  if (lane == 0) part[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < nwarps ? part[lane] : P::identity();
    for (int o = 16; o > 0; o >>= 1) p.merge(p.shfl(o), ctx...);
  }
  return p;
}

// The sweeps of a row kernel (one block per row) over the row x[0, C) of the logits, 16-byte
// vectors (the row is padded to a whole number of them): thread t takes the vector at column
// c = base + t * V of each sweep, calls body(c, v, out) with the loaded logits v, and, when kStore,
// writes `out` as the vector of the tile G at column c in place of the row. A G narrower than the
// logits occupies the first bytes of the row, so a store at column c covers logits of columns
// below c + V, all of them loaded by then: each sweep loads, synchronizes, then stores, and no
// store lands on logits that a thread has yet to load. Every thread of the block must call it.
template <class T, class G, bool kStore, class Body>
__device__ __forceinline__ void for_each_row_vector(T* x, int64_t C, Body&& body) {
  constexpr int V = VecWidth<T>::value;
  constexpr bool kNarrow = kStore && sizeof(G) < sizeof(T);
  const int64_t step = int64_t(blockDim.x) * V;
  for (int64_t base = 0; base < C; base += step) {
    const int64_t c = base + int64_t(threadIdx.x) * V;
    const bool active = c < C;
    Pack<T, V> v;
    if (active) v = *reinterpret_cast<const Pack<T, V>*>(x + c);
    if constexpr (kNarrow) __syncthreads();
    if (!active) continue;
    Pack<G, V> out;
    body(c, v, out);
    if constexpr (kStore) *reinterpret_cast<Pack<G, V>*>(reinterpret_cast<G*>(x) + c) = out;
  }
}

// Threads of a row kernel (one block per row of C elements, `vec` per vector): enough warps for
// about four vectors per thread, at most kMaxRowWarps warps.
inline int row_threads(int64_t C, int vec) {
  const int64_t per_warp = int64_t(32) * vec * 4;
  int64_t warps = (C + per_warp - 1) / per_warp;
  if (warps < 1) warps = 1;
  if (warps > kMaxRowWarps) warps = kMaxRowWarps;
  return static_cast<int>(32 * warps);
}

}  // namespace cuda
}  // namespace fastcl
