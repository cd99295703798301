// Vector helpers of the CPU row kernels, compiled once per instruction-set variant.
//
// A kernel source includes this file inside its own namespace per variant, with FASTCL_TGT
// defined as that variant's function attribute (e.g. target("avx2,fma")), then its row kernels
// (which use FASTCL_FN), and undefines FASTCL_FN after them. Hence no include guard. The code uses
// GCC/Clang vector extensions (32-byte vectors: 8 floats or 4 doubles, types in common.h), so one
// source serves every variant.

#define FASTCL_FN FASTCL_TGT inline __attribute__((always_inline))

template <class V, class S>
FASTCL_FN V vsplat(S x) {
  V v = {};
  return v + x;
}

template <class M>
FASTCL_FN M viota() {
  M m = {};
  for (int i = 0; i < static_cast<int>(sizeof(M) / sizeof(m[0])); ++i) m[i] = i;
  return m;
}

template <class V, class T>
FASTCL_FN V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <class V, class T>
FASTCL_FN void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

template <class V>
FASTCL_FN V vmax(const V& a, const V& b) {
  return a > b ? a : b;
}

template <class V>
FASTCL_FN V vmin(const V& a, const V& b) {
  return a < b ? a : b;
}

typedef unsigned long long VecU64 __attribute__((vector_size(32)));

// Whether any lane of a (32-byte) comparison mask is set.
template <class M>
FASTCL_FN bool vany(const M& m) {
  const VecU64 u = __builtin_bit_cast(VecU64, m);
  return ((u[0] | u[1]) | (u[2] | u[3])) != 0;
}

// 2^x with a relative error below 3e-7; exactly 0 below -125 (so -inf gives 0) and never a
// subnormal. The lanes that are used have x <= ~0: the kernels take 2^(s - an upper bound of s),
// all logits being kept in log2 units (scale and bias premultiplied by log2(e)).
FASTCL_FN VecF vexp2(const VecF& x) {
  using M = Lanes<float>::M;
  const VecF lo = vsplat<VecF>(-125.0f);
  const VecF shift = vsplat<VecF>(12582912.0f + 127.0f);  // 1.5 * 2^23 + exponent bias
  const VecF xc = vmax(x, lo);
  const VecF t = xc + shift;  // round(xc) + 127 in the low mantissa bits
  const VecF r = xc - (t - shift);  // in [-0.5, 0.5], exact
  VecF y = vsplat<VecF>(1.327644452e-3f);  // minimax fit of 2^r on [-0.5, 0.5]
  y = y * r + 9.675537236e-3f;
  y = y * r + 5.550713465e-2f;
  y = y * r + 2.402212024e-1f;
  y = y * r + 6.931469440e-1f;
  y = y * r + 1.000000119e+0f;
  const M bits = __builtin_bit_cast(M, t) << 23;
  const VecF res = y * __builtin_bit_cast(VecF, bits);
  const M keep = x >= lo;
  return __builtin_bit_cast(VecF, __builtin_bit_cast(M, res) & keep);
}

FASTCL_FN VecD vexp2(const VecD& x) {
  VecD r;
  for (int i = 0; i < 4; ++i) r[i] = std::exp2(x[i]);
  return r;
}

// log(1 + e) for e in [0, 1] with a relative error below 1e-7, also for tiny e: with
// w = e / (2 + e) in [0, 1/3], log(1 + e) = 2 atanh(w) = 2 w (1 + w^2/3 + w^4/5 + ...), the
// series cut after w^12 (remainder below 2e-8 relative at w = 1/3).
FASTCL_FN VecF vlog1p_unit(const VecF& e) {
  const VecF w = e / (e + 2.0f);
  const VecF w2 = w * w;
  VecF p = vsplat<VecF>(1.0f / 13.0f);
  p = p * w2 + 1.0f / 11.0f;
  p = p * w2 + 1.0f / 9.0f;
  p = p * w2 + 1.0f / 7.0f;
  p = p * w2 + 1.0f / 5.0f;
  p = p * w2 + 1.0f / 3.0f;
  p = p * w2 + 1.0f;
  return (w + w) * p;
}

FASTCL_FN VecD vlog1p_unit(const VecD& e) {
  VecD r;
  for (int i = 0; i < 4; ++i) r[i] = std::log1p(e[i]);
  return r;
}

template <class V>
FASTCL_FN double hsum(const V& v) {
  double s = 0.0;
  for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(v[0])); ++i) s += static_cast<double>(v[i]);
  return s;
}

template <class V>
FASTCL_FN double hmax(const V& v) {
  double m = -std::numeric_limits<double>::infinity();
  for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(v[0])); ++i)
    m = static_cast<double>(v[i]) > m ? static_cast<double>(v[i]) : m;
  return m;
}
