// Python bindings of the CUDA backend (see bindings.h).
#include "bindings.h"

#include <torch/extension.h>

#include "common.h"
#include "contrastive_cuda.h"
#include "siglip_cuda.h"

namespace fastcl {
namespace cuda {

namespace py = pybind11;

void bind(py::module_& m) {
  m.def("contrastive_fwd_cuda", &contrastive_fwd_cuda,
        "Statistics (lse, pos, npos, mean, col_lse, col_mean) of scale * q @ k.T + bias on CUDA "
        "tensors; see fastcl.reference.contrastive for the definitions.",
        py::arg("q"), py::arg("k"), py::arg("scale"), py::arg("bias"), py::arg("targets"),
        py::arg("row_labels"), py::arg("col_labels"), py::arg("exclude_diag"),
        py::arg("decoupled"), py::arg("pos_lse"), py::arg("col_stats"));
  m.def("contrastive_bwd_cuda", &contrastive_bwd_cuda,
        "Gradients (dq, dk, dscale, dbias) of the contrastive statistics on CUDA tensors, "
        "recomputing the logits slab by slab.",
        py::arg("g_lse"), py::arg("g_pos"), py::arg("g_mean"), py::arg("g_col_lse"),
        py::arg("g_col_mean"), py::arg("q"), py::arg("k"), py::arg("scale"), py::arg("bias"),
        py::arg("targets"), py::arg("row_labels"), py::arg("col_labels"), py::arg("lse"),
        py::arg("pos"), py::arg("npos"), py::arg("col_lse"), py::arg("exclude_diag"),
        py::arg("decoupled"), py::arg("pos_lse"), py::arg("col_stats"));
  m.def("contrastive_fused_cuda", &contrastive_fused_cuda,
        "(loss, npos, dq, dk, dscale, dbias) of a loss linear in the row statistics on CUDA "
        "tensors, from one sweep over the slabs (k=None: the keys are q).",
        py::arg("g_lse"), py::arg("g_pos"), py::arg("g_mean"), py::arg("q"), py::arg("k"),
        py::arg("scale"), py::arg("bias"), py::arg("targets"), py::arg("row_labels"),
        py::arg("col_labels"), py::arg("exclude_diag"), py::arg("decoupled"), py::arg("pos_lse"),
        py::arg("mean"));
  m.def("cuda_slab_bytes", &slab_bytes,
        "Bytes of logits per slab of the CUDA kernels (env FASTCL_CUDA_SLAB_BYTES, read per call).");
  m.def("siglip_fwd_cuda", &siglip_fwd_cuda,
        "Row sums [R] of the sigmoid pair losses softplus(-z * (scale * x @ y.T + bias)) on CUDA "
        "tensors, z = +1 on the diagonal when diag_pos, else -1.",
        py::arg("x"), py::arg("y"), py::arg("scale"), py::arg("bias"), py::arg("diag_pos"));
  m.def("siglip_bwd_cuda", &siglip_bwd_cuda,
        "Gradients (dx, dy, dscale, dbias) of sum_i g_row[i] * rows[i] of the sigmoid loss on "
        "CUDA tensors, recomputing the logits slab by slab.",
        py::arg("g_row"), py::arg("x"), py::arg("y"), py::arg("scale"), py::arg("bias"),
        py::arg("diag_pos"));
  m.def("siglip_fused_cuda", &siglip_fused_cuda,
        "(loss, dx, dy, dscale, dbias): the sigmoid loss summed over pairs (divided by R when "
        "mean) and its gradients, in one pass over the slabs, on CUDA tensors.",
        py::arg("x"), py::arg("y"), py::arg("scale"), py::arg("bias"), py::arg("diag_pos"),
        py::arg("mean"));
}

}  // namespace cuda
}  // namespace fastcl
