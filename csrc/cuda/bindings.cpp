// Python bindings of the CUDA backend (see bindings.h).
#include "bindings.h"

#include <torch/extension.h>

#include "../signatures.h"
#include "common.h"
#include "contrastive_cuda.h"
#include "siglip_cuda.h"

namespace fastcl {
namespace cuda {

namespace py = pybind11;
namespace sig = fastcl::signatures;

void bind(py::module_& m) {
  sig::def_contrastive_fwd(m, "contrastive_fwd_cuda", &contrastive_fwd_cuda,
        "Statistics (lse, pos, npos, mean, col_lse, col_mean, lse2) of scale * q @ k.T + bias on "
        "CUDA tensors (lse2 empty unless lse2_mult > 0); see fastcl.reference.contrastive for the "
        "definitions.");
  sig::def_contrastive_bwd(m, "contrastive_bwd_cuda", &contrastive_bwd_cuda,
        "Gradients (dq, dk, dscale, dbias) of the contrastive statistics on CUDA tensors, "
        "recomputing the logits slab by slab.");
  sig::def_contrastive_fused(m, "contrastive_fused_cuda", &contrastive_fused_cuda,
        "(loss, npos, dq, dk, dscale, dbias) of a loss linear in the row statistics on CUDA "
        "tensors, from one sweep over the slabs (k=None: the keys are q).");
  m.def("cuda_slab_bytes", &slab_bytes,
        "Bytes of logits per slab of the CUDA kernels (env FASTCL_CUDA_SLAB_BYTES, read per call).");
  sig::def_siglip_fwd(m, "siglip_fwd_cuda", &siglip_fwd_cuda,
        "Row sums [R] of the sigmoid pair losses softplus(-z * (scale * x @ y.T + bias)) on CUDA "
        "tensors, z = +1 on the diagonal when diag_pos, else -1.");
  sig::def_siglip_bwd(m, "siglip_bwd_cuda", &siglip_bwd_cuda,
        "Gradients (dx, dy, dscale, dbias) of sum_i g_row[i] * rows[i] of the sigmoid loss on "
        "CUDA tensors, recomputing the logits slab by slab.");
  sig::def_siglip_fused(m, "siglip_fused_cuda", &siglip_fused_cuda,
        "(loss, dx, dy, dscale, dbias): the sigmoid loss summed over pairs (divided by R when "
        "mean) and its gradients, in one pass over the slabs, on CUDA tensors.");
}

}  // namespace cuda
}  // namespace fastcl
