// Python bindings of fastcl._C: the CPU (and, when built with CUDA, the CUDA) kernels of the
// fused ops. Argument checks with user-facing messages live here, at the boundary.
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <sstream>
#include <string>

#include "checks.h"
#include "cpu/common.h"
#include "cpu/contrastive.h"
#include "cpu/siglip.h"
#include "cpu/topk.h"
#include "signatures.h"
#ifdef FASTCL_WITH_CUDA
#include "cuda/bindings.h"
#endif

namespace {

namespace sig = fastcl::signatures;
using OptT = std::optional<at::Tensor>;

// Checks of the CPU functions (csrc/checks.h, with the CPU as the kernels' device).
using fastcl::checks::dtype_str;
using fastcl::checks::shape_str;

const at::Device kCpu(at::kCPU);

void check_cpu(const char* fn, const char* name, const at::Tensor& t) {
  fastcl::checks::check_on(fn, name, t, kCpu);
}

// Two feature matrices a [R, D] and b [C, D] of the same floating dtype, on CPU.
void check_feature_pair(const char* fn, const char* an, const at::Tensor& a, const char* bn,
                        const at::Tensor& b) {
  fastcl::checks::check_features(fn, a, b, an, bn, at::kCPU);
}

void check_features(const char* fn, const at::Tensor& q, const at::Tensor& k) {
  check_feature_pair(fn, "q", q, "k", k);
}

void check_scalar(const char* fn, const char* name, const at::Tensor& t) {
  fastcl::checks::check_scalar(fn, name, t, kCpu);
}

void check_index(const char* fn, const char* name, const OptT& t, int64_t n, const char* what) {
  fastcl::checks::check_index(fn, name, t, n, what, kCpu);
}

void check_masks(const char* fn, const at::Tensor& q, const at::Tensor& k, const OptT& targets,
                 const OptT& row_labels, const OptT& col_labels) {
  fastcl::checks::check_masks(fn, q, k, targets, row_labels, col_labels, kCpu);
}

void check_vec(const char* fn, const char* name, const OptT& t, int64_t n, const char* what) {
  fastcl::checks::check_vec(fn, name, t, n, what, kCpu);
}

// lse2_mult: 0 (no lse2) or a finite positive multiplier of the logits.
void check_lse2_mult(const char* fn, double lse2_mult) {
  TORCH_CHECK(std::isfinite(lse2_mult) && lse2_mult >= 0, fn,
              ": lse2_mult must be a finite number >= 0 (0: no second log-sum-exp), got ",
              lse2_mult);
}

fastcl::cpu::FwdStats fwd_cpu(const at::Tensor& q, const OptT& k, const at::Tensor& scale,
                              const at::Tensor& bias, const OptT& targets, const OptT& row_labels,
                              const OptT& col_labels, bool exclude_diag, bool decoupled,
                              bool pos_lse, bool col_stats, double lse2_mult) {
  const char* fn = "contrastive_fwd_cpu";
  const at::Tensor& keys = k.has_value() ? *k : q;  // none: the keys are q (self-similarity)
  check_features(fn, q, keys);
  check_scalar(fn, "scale", scale);
  check_scalar(fn, "bias", bias);
  check_masks(fn, q, keys, targets, row_labels, col_labels);
  TORCH_CHECK(k.has_value() || !col_stats, fn,
              ": column statistics need k (with k=None the keys are q: use the row statistics)");
  check_lse2_mult(fn, lse2_mult);
  at::NoGradGuard no_grad;
  return fastcl::cpu::contrastive_fwd_cpu(q, k, scale, bias, targets, row_labels, col_labels,
                                          exclude_diag, decoupled, pos_lse, col_stats, lse2_mult);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const OptT& g_lse, const OptT& g_pos, const OptT& g_mean, const OptT& g_col_lse,
    const OptT& g_col_mean, const at::Tensor& q, const OptT& k, const at::Tensor& scale,
    const at::Tensor& bias, const OptT& targets, const OptT& row_labels, const OptT& col_labels,
    const at::Tensor& lse, const at::Tensor& pos, const at::Tensor& npos,
    const at::Tensor& col_lse, bool exclude_diag, bool decoupled, bool pos_lse, bool col_stats,
    const OptT& g_lse2, const OptT& lse2, double lse2_mult) {
  const char* fn = "contrastive_bwd_cpu";
  const at::Tensor& keys = k.has_value() ? *k : q;  // none: the keys are q (self-similarity)
  check_features(fn, q, keys);
  check_scalar(fn, "scale", scale);
  check_scalar(fn, "bias", bias);
  check_masks(fn, q, keys, targets, row_labels, col_labels);
  TORCH_CHECK(k.has_value() || !col_stats, fn,
              ": column statistics need k (with k=None the keys are q: use the row statistics)");
  const int64_t R = q.size(0), C = keys.size(0);
  check_vec(fn, "g_lse", g_lse, R, "R");
  check_vec(fn, "g_pos", g_pos, R, "R");
  check_vec(fn, "g_mean", g_mean, R, "R");
  check_vec(fn, "g_col_lse", g_col_lse, C, "C");
  check_vec(fn, "g_col_mean", g_col_mean, C, "C");
  TORCH_CHECK(col_stats || (!g_col_lse.has_value() && !g_col_mean.has_value()), fn,
              ": g_col_lse / g_col_mean were given but col_stats is False");
  check_vec(fn, "lse", lse, R, "R");
  check_vec(fn, "pos", pos, R, "R");
  check_vec(fn, "npos", npos, R, "R");
  if (col_stats && g_col_lse.has_value()) check_vec(fn, "col_lse", col_lse, C, "C");
  check_lse2_mult(fn, lse2_mult);
  if (g_lse2.has_value()) {
    TORCH_CHECK(lse2_mult > 0, fn,
                ": g_lse2 was given but lse2_mult is 0 (no lse2 statistic to differentiate)");
    check_vec(fn, "g_lse2", g_lse2, R, "R");
    TORCH_CHECK(lse2.has_value(), fn,
                ": g_lse2 was given without lse2 (the forward's lse2 output, a 1-D tensor of "
                "length R = ", R, ")");
    check_vec(fn, "lse2", lse2, R, "R");
  }
  at::NoGradGuard no_grad;
  return fastcl::cpu::contrastive_bwd_cpu(g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, k,
                                          scale, bias, targets, row_labels, col_labels, lse, pos,
                                          npos, col_lse, exclude_diag, decoupled, pos_lse,
                                          col_stats, g_lse2, lse2, lse2_mult);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_cpu(
    const OptT& g_lse, const OptT& g_pos, const OptT& g_mean, const at::Tensor& q,
    const OptT& k, const at::Tensor& scale, const at::Tensor& bias, const OptT& targets,
    const OptT& row_labels, const OptT& col_labels, bool exclude_diag, bool decoupled,
    bool pos_lse, bool mean) {
  const char* fn = "contrastive_fused_cpu";
  const at::Tensor& keys = k.has_value() ? *k : q;  // none: the keys are q (self-similarity)
  check_features(fn, q, keys);
  check_scalar(fn, "scale", scale);
  check_scalar(fn, "bias", bias);
  check_masks(fn, q, keys, targets, row_labels, col_labels);
  const int64_t R = q.size(0);
  check_vec(fn, "g_lse", g_lse, R, "R");
  check_vec(fn, "g_pos", g_pos, R, "R");
  check_vec(fn, "g_mean", g_mean, R, "R");
  at::NoGradGuard no_grad;
  return fastcl::cpu::contrastive_fused_cpu(g_lse, g_pos, g_mean, q, k, scale, bias, targets,
                                            row_labels, col_labels, exclude_diag, decoupled,
                                            pos_lse, mean);
}

at::Tensor siglip_fwd_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                          const at::Tensor& bias, bool diag_pos) {
  const char* fn = "siglip_fwd_cpu";
  check_feature_pair(fn, "x", x, "y", y);
  check_scalar(fn, "scale", scale);
  check_scalar(fn, "bias", bias);
  at::NoGradGuard no_grad;
  return fastcl::cpu::siglip_fwd_cpu(x, y, scale, bias, diag_pos);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_bwd_cpu(
    const at::Tensor& g_row, const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
    const at::Tensor& bias, bool diag_pos) {
  const char* fn = "siglip_bwd_cpu";
  check_feature_pair(fn, "x", x, "y", y);
  check_scalar(fn, "scale", scale);
  check_scalar(fn, "bias", bias);
  TORCH_CHECK(g_row.defined(), fn, ": g_row must be a tensor");
  check_vec(fn, "g_row", g_row, x.size(0), "R (rows of x)");
  at::NoGradGuard no_grad;
  return fastcl::cpu::siglip_bwd_cpu(g_row, x, y, scale, bias, diag_pos);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_fused_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& bias,
    bool diag_pos, bool mean) {
  const char* fn = "siglip_fused_cpu";
  check_feature_pair(fn, "x", x, "y", y);
  check_scalar(fn, "scale", scale);
  check_scalar(fn, "bias", bias);
  at::NoGradGuard no_grad;
  return fastcl::cpu::siglip_fused_cpu(x, y, scale, bias, diag_pos, mean);
}

std::tuple<at::Tensor, at::Tensor> topk_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                int64_t k, bool exclude_self) {
  const char* fn = "topk_fwd_cpu";
  check_feature_pair(fn, "query", query, "key", key);
  const int64_t limit = key.size(0) - (exclude_self ? 1 : 0);
  TORCH_CHECK(k >= 1 && k <= limit, fn, ": k must lie in [1, ", limit, "] (C = ", key.size(0),
              " rows of key", exclude_self ? ", minus one for exclude_self" : "", "), got k = ",
              k);
  at::NoGradGuard no_grad;
  return fastcl::cpu::topk_fwd_cpu(query, key, k, exclude_self);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcl compiled kernels";
#ifdef FASTCL_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  sig::def_contrastive_fwd(m, "contrastive_fwd_cpu", &fwd_cpu,
        "Statistics (lse, pos, npos, mean, col_lse, col_mean, lse2) of scale * q @ k.T + bias on "
        "CPU (k=None: the keys are q, half of the symmetric logits computed; lse2 empty unless "
        "lse2_mult > 0); see fastcl.reference.contrastive for the definitions.");
  sig::def_contrastive_bwd(m, "contrastive_bwd_cpu", &bwd_cpu,
        "Gradients (dq, dk, dscale, dbias) of the contrastive statistics on CPU, recomputing the "
        "logits slab by slab (g_lse2 with the forward's lse2 and lse2_mult > 0: the lse2 term "
        "too). k=None: the keys are q (self-similarity); dq is then the whole gradient of q and "
        "dk is empty.");
  sig::def_contrastive_fused(m, "contrastive_fused_cpu", &fused_cpu,
        "(loss, npos, dq, dk, dscale, dbias) on CPU: the loss sum_r [npos_r > 0] (g_lse lse + "
        "g_pos pos + g_mean mean)_r (divided by the number of such rows when mean) and its "
        "gradients, from one sweep over the logits. k=None: the keys are q (self-similarity); "
        "dq is then the whole gradient of q and dk is empty.");
  m.def("cpu_slab_bytes", &fastcl::cpu::slab_bytes,
        "Bytes of logits per slab of the CPU kernels (env FASTCL_CPU_SLAB_BYTES, read per call).");
  m.def("cpu_kernel_isa", &fastcl::cpu::kernel_isa,
        "Instruction-set variant of the CPU row kernels: 'avx2' or 'generic' "
        "(FASTCL_CPU_ISA=generic forces the portable one).");
  sig::def_siglip_fwd(m, "siglip_fwd_cpu", &siglip_fwd_cpu,
        "Per-row sums [R] of softplus(-z_ij s_ij), s = scale * x @ y.T + bias, z_ij = +1 if "
        "diag_pos and i == j else -1, on CPU (fp32; fp64 for fp64 inputs).");
  sig::def_siglip_bwd(m, "siglip_bwd_cpu", &siglip_bwd_cpu,
        "Gradients (dx, dy, dscale, dbias) of sum_i g_row[i] * rows[i] of the sigmoid loss on "
        "CPU, recomputing the logits slab by slab.");
  sig::def_siglip_fused(m, "siglip_fused_cpu", &siglip_fused_cpu,
        "(loss, dx, dy, dscale, dbias): the sigmoid loss summed over pairs (divided by R when "
        "mean) and its gradients, from one pass over the logits on CPU.");
  m.def("topk_fwd_cpu", &topk_fwd_cpu,
        "(values [R, k], indices [R, k]): the k largest <query_i, key_j> per row in decreasing "
        "order (smaller index first among ties) on CPU; exclude_self drops j == i.",
        py::arg("query"), py::arg("key"), py::arg("k"), py::arg("exclude_self"));
#ifdef FASTCL_WITH_CUDA
  fastcl::cuda::bind(m);
#endif
}
