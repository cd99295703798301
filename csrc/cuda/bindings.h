// Python bindings of the CUDA backend, added to fastcl._C by csrc/bindings.cpp when the extension
// is built with CUDA. Kept apart from the CPU bindings so that the CUDA functions can be bound
// into a module of their own.
#pragma once

#include <pybind11/pybind11.h>

namespace fastcl {
namespace cuda {

// Defines contrastive_{fwd,bwd,fused}_cuda, siglip_{fwd,bwd,fused}_cuda and cuda_slab_bytes on m.
// The CUDA functions check their arguments themselves (before any CUDA call).
void bind(pybind11::module_& m);

}  // namespace cuda
}  // namespace fastcl
