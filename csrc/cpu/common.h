// Pieces shared by the CPU kernels of every family: vector lane types, slab sizing, the choice of
// instruction-set variant, scalar arguments. The per-variant vector helpers are in simd.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__)
// 32-byte vector types passed between inline helpers of the generic (SSE2) variant.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#define FASTCL_CPU_AVX2 1
#endif

// The variant of row kernel fn (compiled by isa_variants.h) to run: AVX2 + FMA when use_avx2().
#ifdef FASTCL_CPU_AVX2
#define FASTCL_ISA_SELECT(fn) \
  (::fastcl::cpu::detail::use_avx2() ? &avx2_isa::fn : &generic_isa::fn)
#else
#define FASTCL_ISA_SELECT(fn) (&generic_isa::fn)
#endif

namespace fastcl {
namespace cpu {

// Bytes of logits held per slab: FASTCL_CPU_SLAB_BYTES when set, else the default (64 MiB).
int64_t slab_bytes();

// Name of the instruction-set variant of the row kernels in use ("avx2" or "generic");
// FASTCL_CPU_ISA=generic forces the portable one.
const char* kernel_isa();

namespace detail {

constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;

typedef float VecF __attribute__((vector_size(32)));
typedef double VecD __attribute__((vector_size(32)));

template <class T>
struct Lanes;

template <>
struct Lanes<float> {
  using V = VecF;
  using M = decltype(V{} < V{});
  using I = std::remove_cv_t<std::remove_reference_t<decltype(M{}[0])>>;
  static constexpr int W = 8;
};

template <>
struct Lanes<double> {
  using V = VecD;
  using M = decltype(V{} < V{});
  using I = std::remove_cv_t<std::remove_reference_t<decltype(M{}[0])>>;
  static constexpr int W = 4;
};

// Whether the AVX2 + FMA variant of the row kernels runs (the CPU has them and
// FASTCL_CPU_ISA is not "generic"; the variable is read at every call).
inline bool use_avx2() {
#ifdef FASTCL_CPU_AVX2
  const char* env = std::getenv("FASTCL_CPU_ISA");
  if (env != nullptr && std::string(env) == "generic") return false;
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return supported;
#else
  return false;
#endif
}

// Rows per slab so that rows x C elements of elem bytes fit slab_bytes() (at least one row, at
// most max(R, 1)).
inline int64_t slab_rows(int64_t R, int64_t C, int64_t elem) {
  if (C <= 0) return std::max<int64_t>(R, 1);
  const int64_t rows = slab_bytes() / (C * elem);
  return std::max<int64_t>(1, std::min<int64_t>(rows, std::max<int64_t>(R, 1)));
}

// n rounded up to a multiple of m.
inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

template <class T>
constexpr at::ScalarType scalar_type_of() {
  return std::is_same<T, double>::value ? at::kDouble : at::kFloat;
}

// Chunks of a slab's rows, one per thread (fixed for the whole call: per-chunk state merges in
// chunk order, so results do not depend on scheduling).
inline int64_t num_chunks(int64_t S) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), S));
}

inline double scalar_value(const at::Tensor& t) {
  return t.to(at::kDouble).reshape({}).item<double>();
}

}  // namespace detail
}  // namespace cpu
}  // namespace fastcl
