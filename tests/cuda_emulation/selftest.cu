// Kernels that check the CUDA emulation itself (tests/test_cuda_emulation.py): the results of
// shuffles and barriers, and the faults the emulation must report.
#include "selftest.h"

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_common.cuh"

namespace emu_selftest {
namespace {

// out[b] = the sum over the threads of block b of (1000 b + linear thread index): warp shuffles,
// then one partial per warp through shared memory.
__global__ void block_sum_kernel(int64_t* out) {
  __shared__ int64_t part[32];
  const unsigned tid = threadIdx.x + blockDim.x * threadIdx.y;
  int64_t v = int64_t(blockIdx.x) * 1000 + tid;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((tid & 31u) == 0) part[tid >> 5] = v;
  __syncthreads();
  if (tid != 0) return;
  int64_t s = 0;
  for (unsigned w = 0; w < blockDim.x * blockDim.y / 32; ++w) s += part[w];
  out[blockIdx.x] = s;
}

// A shuffle that only the first 16 lanes of the warp reach.
__global__ void divergent_shuffle_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Thread t writes stamp + t to shared memory and reads its neighbour's entry, with a barrier in
// between only when `sync`.
__global__ void neighbour_kernel(int* out, int stamp, bool sync) {
  __shared__ int s[1024];
  s[threadIdx.x] = stamp + static_cast<int>(threadIdx.x);
  if (sync) __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// out[t] = in[t + 1]: reads one element past `in` when it has as many elements as there are
// threads.
__global__ void shifted_copy_kernel(const int* in, int* out) {
  out[threadIdx.x] = in[threadIdx.x + 1];
}

// out[t] = in[4 t + offset], read as a 16-byte vector of 4 floats (misaligned unless offset is
// a multiple of 4).
__global__ void vector_load_kernel(const float* in, float* out, int offset) {
  const fastcl::cuda::Pack<float, 4> v =
      *reinterpret_cast<const fastcl::cuda::Pack<float, 4>*>(in + 4 * threadIdx.x + offset);
  out[threadIdx.x] = v.v[0];
}

}  // namespace

cudaError_t block_sum(int64_t* out, unsigned blocks, unsigned tx, unsigned ty) {
  block_sum_kernel<<<blocks, dim3(tx, ty), 0, nullptr>>>(out);
  return cudaGetLastError();
}

cudaError_t divergent_shuffle(int* out) {
  divergent_shuffle_kernel<<<1, 32, 0, nullptr>>>(out);
  return cudaGetLastError();
}

cudaError_t neighbour(int* out, unsigned threads, int stamp, bool sync) {
  neighbour_kernel<<<1, threads, 0, nullptr>>>(out, stamp, sync);
  return cudaGetLastError();
}

cudaError_t shifted_copy(const int* in, int* out, unsigned threads) {
  shifted_copy_kernel<<<1, threads, 0, nullptr>>>(in, out);
  return cudaGetLastError();
}

cudaError_t vector_load(const float* in, float* out, unsigned threads, int offset) {
  vector_load_kernel<<<1, threads, 0, nullptr>>>(in, out, offset);
  return cudaGetLastError();
}

}  // namespace emu_selftest
