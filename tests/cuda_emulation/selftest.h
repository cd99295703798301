// Launchers of the emulation's self-test kernels (selftest.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace emu_selftest {

// out[b] (int64, `blocks` entries) = sum over the threads of block b of 1000 b + thread index;
// blocks of tx x ty threads.
cudaError_t block_sum(int64_t* out, unsigned blocks, unsigned tx, unsigned ty);
// A shuffle reached by half a warp (the emulation must fail the launch).
cudaError_t divergent_shuffle(int* out);
// out[t] = stamp + (t + 1) % threads when sync; without the barrier, whatever the order of the
// threads gives.
cudaError_t neighbour(int* out, unsigned threads, int stamp, bool sync);

// out[t] = in[t + 1] for t < threads (an access out of bounds unless `in` has threads + 1
// elements: the AddressSanitizer build must report it).
cudaError_t shifted_copy(const int* in, int* out, unsigned threads);

// out[t] = in[4 t + offset] for t < threads, loaded as 16-byte vectors (misaligned unless offset
// is a multiple of 4: the sanitized build must report it).
cudaError_t vector_load(const float* in, float* out, unsigned threads, int offset);

}  // namespace emu_selftest
