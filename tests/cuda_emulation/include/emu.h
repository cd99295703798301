// The CUDA execution model on the CPU, for tests: compiles the device code of csrc/cuda (a
// `.cu` file rewritten by tests/_cuda_emulation.py, which turns each `kernel<<<grid, block, smem,
// stream>>>(args)` into `::emu::launch(kernel, grid, block, smem, stream)(args)`) with a host
// compiler and runs its kernels on host memory.
//
// Every block runs on its own, one after another; its threads are cooperative user-level threads
// (ucontext) of one OS thread, each running until it reaches a barrier (__syncthreads, or the
// warp-wide exchange of a __shfl_xor_sync) or its end. Between two barriers the threads of a
// block run one at a time in a fresh pseudo-random order, so a kernel whose result depends on the
// order of its threads between barriers (a missing __syncthreads) gives varying results. A
// shuffle reached by only some lanes of a warp, a barrier that not every thread reaches, or a
// launch configuration the hardware refuses (more than 1024 threads per block, a grid dimension
// out of range) fails the launch: cudaGetLastError() returns the error, with a message.
//
// What it does not model: memory spaces (device pointers are host pointers), the hardware's
// rounding of the fast math intrinsics, concurrent blocks (a race between blocks goes unseen),
// fresh shared memory per block (`__shared__` becomes `static`: a block sees what the previous
// one left there, where the hardware leaves it undefined), and the limits of registers and
// shared memory (the nvcc build of the extension checks those).
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

// The running thread's coordinates (set by the scheduler before it resumes a thread).
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetDevice(int* dev);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev);

namespace emu {

// Streaming multiprocessors reported by cudaDeviceGetAttribute (env FASTCL_EMU_SMS, default 132,
// an H100 SXM).
int sm_count();

// The message of the last failed launch ("" if none).
std::string last_error_message();

// Runs body() as every thread of every block of a grid (see the header comment).
cudaError_t run_grid(dim3 grid, dim3 block, const std::function<void()>& body);

// Fails the running launch with `msg` (called from a kernel's thread; does not return).
[[noreturn]] void fail(const std::string& msg);

// __syncthreads.
void syncthreads();

// The warp-wide exchange of a shuffle: publishes the 8 bytes `mine` of this lane, waits for every
// lane of the warp, and returns the bytes of lane `src` (within the warp).
uint64_t exchange(uint64_t mine, int src_lane);

template <class T>
T shfl_xor(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of at most 8 bytes");
  if (mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask is not emulated");
  const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int lane = static_cast<int>(tid & 31u);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = exchange(bits, lane ^ (lane_mask & 31));
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// Records the error of a launch for cudaGetLastError; config_error records a refused launch.
void record_launch_error(cudaError_t e);
void config_error(const std::string& msg);

// The callable that `kernel<<<grid, block, smem, stream>>>` becomes: called with the kernel's
// arguments (copied, as a launch copies them), runs the grid; the error goes to cudaGetLastError.
template <class... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <class... A>
  void operator()(A&&... args) const {
    if (smem != 0) return config_error("dynamic shared memory is not emulated");
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto k = kernel;
    record_launch_error(run_grid(grid, block, [&] { std::apply(k, params); }));
  }
};

template <class... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  return Launch<P...>{kernel, grid, block, smem};
}

}  // namespace emu

#define __syncthreads() ::emu::syncthreads()

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  if (width != 32) ::emu::fail("__shfl_xor_sync with width != 32 is not emulated");
  return ::emu::shfl_xor(mask, v, lane_mask);
}

inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}
inline double __longlong_as_double(long long x) {
  double d;
  std::memcpy(&d, &x, sizeof d);
  return d;
}
