// Argument checks of the compiled kernels, shared by the CPU and CUDA boundaries: every message
// names the function, the argument and what was expected. `dev` is the device the kernels run on:
// the CPU, or the CUDA device of the features (a CUDA device without an index until that is known).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>

namespace fastcl {
namespace checks {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

inline std::string dtype_str(const at::Tensor& t) {
  return std::string(c10::toString(t.scalar_type()));
}

// `t` lives on `dev`.
inline void check_on(const char* fn, const char* name, const at::Tensor& t, const at::Device& dev) {
  if (dev.is_cpu()) {
    TORCH_CHECK(t.device().is_cpu(), fn, " expects CPU tensors, got ", t.device().str(), " for ",
                name);
    return;
  }
  TORCH_CHECK(t.is_cuda(), fn, " expects CUDA tensors, got ", t.device().str(), " for ", name);
  TORCH_CHECK(!dev.has_index() || t.device() == dev, fn, ": ", name, " is on ", t.device().str(),
              " but the features are on ", dev.str(), "; all tensors must be on one CUDA device");
}

// Two feature matrices a [R, D] and b [C, D] of one floating dtype, on the kernels' device type
// (and, for CUDA, on one device: a's).
inline void check_features(const char* fn, const at::Tensor& a, const at::Tensor& b,
                           const char* a_name, const char* b_name, c10::DeviceType type) {
  TORCH_CHECK(a.defined() && b.defined(), fn, ": ", a_name, " and ", b_name, " must be tensors");
  const at::Device dev =
      (type == c10::DeviceType::CUDA && a.is_cuda()) ? a.device() : at::Device(type);
  check_on(fn, a_name, a, dev);
  check_on(fn, b_name, b, dev);
  TORCH_CHECK(a.dim() == 2, fn, ": ", a_name, " must be a 2-D tensor [R, D], got shape ",
              shape_str(a));
  TORCH_CHECK(b.dim() == 2, fn, ": ", b_name, " must be a 2-D tensor [C, D], got shape ",
              shape_str(b));
  TORCH_CHECK(a.size(1) == b.size(1), fn, ": ", a_name, " and ", b_name,
              " must have the same feature size D, got ", a_name, " of shape ", shape_str(a),
              " and ", b_name, " of shape ", shape_str(b));
  const auto st = a.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              fn, ": ", a_name, " and ", b_name,
              " must be float32, float64, bfloat16 or float16, got ", dtype_str(a));
  TORCH_CHECK(b.scalar_type() == st, fn, ": ", a_name, " and ", b_name,
              " must have the same dtype, got ", a_name, " ", dtype_str(a), " and ", b_name, " ",
              dtype_str(b));
  TORCH_CHECK(a.size(0) < (int64_t(1) << 31) && b.size(0) < (int64_t(1) << 31), fn,
              ": R and C must be below 2^31, got R = ", a.size(0), " and C = ", b.size(0));
}

// A 0-dim (or one-element) floating tensor on `dev`; on the CPU as well when `dev` is a CUDA
// device (its value is then copied).
inline void check_scalar(const char* fn, const char* name, const at::Tensor& t,
                         const at::Device& dev) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor");
  if (dev.is_cpu()) {
    check_on(fn, name, t, dev);
  } else {
    TORCH_CHECK(t.is_cpu() || t.device() == dev, fn, ": ", name, " is on ", t.device().str(),
                "; it must be on the features' device (", dev.str(), ") or on the CPU");
  }
  TORCH_CHECK(t.numel() == 1 && t.dim() <= 1, fn, ": ", name,
              " must be a scalar (0-dim) tensor, got shape ", shape_str(t));
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), fn, ": ", name,
              " must be a floating-point tensor, got ", dtype_str(t));
}

// An optional 1-D integer tensor of length n (`what` names n) on `dev`.
inline void check_index(const char* fn, const char* name, const std::optional<at::Tensor>& t,
                        int64_t n, const char* what, const at::Device& dev) {
  if (!t.has_value()) return;
  check_on(fn, name, *t, dev);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, fn, ": ", name, " must be a 1-D tensor of length ",
              what, " = ", n, ", got shape ", shape_str(*t));
  TORCH_CHECK(at::isIntegralType(t->scalar_type(), /*includeBool=*/false), fn, ": ", name,
              " must be an integer tensor (int64), got ", dtype_str(*t));
}

// An optional 1-D floating tensor of length n (`what` names n) on `dev`.
inline void check_vec(const char* fn, const char* name, const std::optional<at::Tensor>& t,
                      int64_t n, const char* what, const at::Device& dev) {
  if (!t.has_value()) return;
  check_on(fn, name, *t, dev);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, fn, ": ", name, " must be a 1-D tensor of length ",
              what, " = ", n, ", got shape ", shape_str(*t));
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), fn, ": ", name,
              " must be a floating-point tensor, got ", dtype_str(*t));
}

// The mask arguments of the contrastive primitive (targets or row/col labels) for q [R, D] and
// k [C, D].
inline void check_masks(const char* fn, const at::Tensor& q, const at::Tensor& k,
                        const std::optional<at::Tensor>& targets,
                        const std::optional<at::Tensor>& row_labels,
                        const std::optional<at::Tensor>& col_labels, const at::Device& dev) {
  TORCH_CHECK(row_labels.has_value() == col_labels.has_value(), fn,
              ": row_labels and col_labels must be given together (label mode) or both be None");
  check_index(fn, "targets", targets, q.size(0), "R (rows of q)", dev);
  check_index(fn, "row_labels", row_labels, q.size(0), "R (rows of q)", dev);
  check_index(fn, "col_labels", col_labels, k.size(0), "C (rows of k)", dev);
}

}  // namespace checks
}  // namespace fastcl
