// The Python signatures of the kernels' entry points, shared by the CPU bindings
// (csrc/bindings.cpp) and the CUDA ones (csrc/cuda/bindings.cpp): each op's argument names are
// written once, so both backends take the same names in the same order, and fastcl.ops calls
// them alike.
#pragma once

#include <torch/extension.h>

#include <utility>

namespace fastcl {
namespace signatures {

namespace py = pybind11;

// (q, k, scale, bias, targets, row_labels, col_labels, exclude_diag, decoupled, pos_lse,
// col_stats, lse2_mult=0) -> (lse, pos, npos, mean, col_lse, col_mean, lse2); lse2 is empty
// unless lse2_mult > 0
template <typename F>
void def_contrastive_fwd(py::module_& m, const char* name, F&& fn, const char* doc) {
  m.def(name, std::forward<F>(fn), doc, py::arg("q"), py::arg("k"), py::arg("scale"),
        py::arg("bias"), py::arg("targets"), py::arg("row_labels"), py::arg("col_labels"),
        py::arg("exclude_diag"), py::arg("decoupled"), py::arg("pos_lse"), py::arg("col_stats"),
        py::arg("lse2_mult") = 0.0);
}

// (g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, k, scale, bias, targets, row_labels,
// col_labels, lse, pos, npos, col_lse, exclude_diag, decoupled, pos_lse, col_stats,
// g_lse2=None, lse2=None, lse2_mult=0) -> (dq, dk, dscale, dbias)
template <typename F>
void def_contrastive_bwd(py::module_& m, const char* name, F&& fn, const char* doc) {
  m.def(name, std::forward<F>(fn), doc, py::arg("g_lse"), py::arg("g_pos"), py::arg("g_mean"),
        py::arg("g_col_lse"), py::arg("g_col_mean"), py::arg("q"), py::arg("k"),
        py::arg("scale"), py::arg("bias"), py::arg("targets"), py::arg("row_labels"),
        py::arg("col_labels"), py::arg("lse"), py::arg("pos"), py::arg("npos"),
        py::arg("col_lse"), py::arg("exclude_diag"), py::arg("decoupled"), py::arg("pos_lse"),
        py::arg("col_stats"), py::arg("g_lse2") = py::none(), py::arg("lse2") = py::none(),
        py::arg("lse2_mult") = 0.0);
}

// (g_lse, g_pos, g_mean, q, k, scale, bias, targets, row_labels, col_labels, exclude_diag,
// decoupled, pos_lse, mean) -> (loss, npos, dq, dk, dscale, dbias)
template <typename F>
void def_contrastive_fused(py::module_& m, const char* name, F&& fn, const char* doc) {
  m.def(name, std::forward<F>(fn), doc, py::arg("g_lse"), py::arg("g_pos"), py::arg("g_mean"),
        py::arg("q"), py::arg("k"), py::arg("scale"), py::arg("bias"), py::arg("targets"),
        py::arg("row_labels"), py::arg("col_labels"), py::arg("exclude_diag"),
        py::arg("decoupled"), py::arg("pos_lse"), py::arg("mean"));
}

// (x, y, scale, bias, diag_pos=True) -> row sums [R]
template <typename F>
void def_siglip_fwd(py::module_& m, const char* name, F&& fn, const char* doc) {
  m.def(name, std::forward<F>(fn), doc, py::arg("x"), py::arg("y"), py::arg("scale"),
        py::arg("bias"), py::arg("diag_pos") = true);
}

// (g_row, x, y, scale, bias, diag_pos=True) -> (dx, dy, dscale, dbias)
template <typename F>
void def_siglip_bwd(py::module_& m, const char* name, F&& fn, const char* doc) {
  m.def(name, std::forward<F>(fn), doc, py::arg("g_row"), py::arg("x"), py::arg("y"),
        py::arg("scale"), py::arg("bias"), py::arg("diag_pos") = true);
}

// (x, y, scale, bias, diag_pos, mean) -> (loss, dx, dy, dscale, dbias)
template <typename F>
void def_siglip_fused(py::module_& m, const char* name, F&& fn, const char* doc) {
  m.def(name, std::forward<F>(fn), doc, py::arg("x"), py::arg("y"), py::arg("scale"),
        py::arg("bias"), py::arg("diag_pos"), py::arg("mean"));
}

}  // namespace signatures
}  // namespace fastcl
