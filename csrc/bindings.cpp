// Python bindings of fastcl._C: the CPU (and, when built with CUDA, the CUDA) kernels of the
// fused ops. Argument checks with user-facing messages live here, at the boundary.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcl compiled kernels";
#ifdef FASTCL_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
