// Compiles a file of row kernels once per instruction-set variant. Usage, inside a kernel
// source's (anonymous) namespace, after the definitions the row kernels use:
//
//   #define FASTCL_ROWS_HEADER "siglip_rows.h"
//   #include "isa_variants.h"
//
// The row kernels then exist as generic_isa::f (portable) and, on x86-64 with GCC or Clang,
// avx2_isa::f (AVX2 + FMA); FASTCL_ISA_SELECT(f) picks the one to run. Each variant is compiled
// with FASTCL_TGT set to its function attribute, after simd.h's vector helpers. Hence no include
// guard.

namespace generic_isa {
#define FASTCL_TGT
#include "simd.h"
#include FASTCL_ROWS_HEADER
#undef FASTCL_FN
#undef FASTCL_TGT
}  // namespace generic_isa

#ifdef FASTCL_CPU_AVX2
namespace avx2_isa {
#define FASTCL_TGT __attribute__((target("avx2,fma")))
#include "simd.h"
#include FASTCL_ROWS_HEADER
#undef FASTCL_FN
#undef FASTCL_TGT
}  // namespace avx2_isa
#endif

#undef FASTCL_ROWS_HEADER
