// The CUDA functions of fastcl._C (csrc/cuda/bindings.cpp), compiled for the emulation (see
// include/emu.h) into a module of their own, with the emulation's self-test kernels.
#include <torch/extension.h>

#include <string>
#include <utility>

#include "cuda/bindings.h"
#include "selftest.h"

namespace {

// (error code, message) of a launch of the emulation.
std::pair<int, std::string> result(cudaError_t e) {
  return {static_cast<int>(e), e == cudaSuccess ? std::string() : emu::last_error_message()};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The CUDA backend of fastcl._C on the CPU (tests/cuda_emulation)";
  fastcl::cuda::bind(m);
  m.def("selftest_block_sum", [](at::Tensor out, unsigned tx, unsigned ty) {
    TORCH_CHECK(out.dtype() == at::kLong && out.is_contiguous());
    return result(emu_selftest::block_sum(out.data_ptr<int64_t>(),
                                          static_cast<unsigned>(out.numel()), tx, ty));
  });
  m.def("selftest_divergent_shuffle", [](at::Tensor out) {
    TORCH_CHECK(out.dtype() == at::kInt && out.numel() >= 32);
    return result(emu_selftest::divergent_shuffle(out.data_ptr<int>()));
  });
  m.def("selftest_neighbour", [](at::Tensor out, int stamp, bool sync) {
    TORCH_CHECK(out.dtype() == at::kInt && out.is_contiguous());
    return result(emu_selftest::neighbour(out.data_ptr<int>(),
                                          static_cast<unsigned>(out.numel()), stamp, sync));
  });
  m.def("selftest_shifted_copy", [](at::Tensor in, at::Tensor out) {
    TORCH_CHECK(in.dtype() == at::kInt && out.dtype() == at::kInt && out.is_contiguous());
    return result(emu_selftest::shifted_copy(in.data_ptr<int>(), out.data_ptr<int>(),
                                             static_cast<unsigned>(out.numel())));
  });
  m.def("selftest_vector_load", [](at::Tensor in, at::Tensor out, int offset) {
    TORCH_CHECK(in.dtype() == at::kFloat && out.dtype() == at::kFloat && out.is_contiguous());
    TORCH_CHECK(in.numel() >= 4 * out.numel() + offset && offset >= 0);
    return result(emu_selftest::vector_load(in.data_ptr<float>(), out.data_ptr<float>(),
                                            static_cast<unsigned>(out.numel()), offset));
  });
}
