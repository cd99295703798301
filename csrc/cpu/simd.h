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

// 2^x in fp64 with a relative error of a few ulp; exactly 0 below -1021 (so -inf gives 0) and
// never a subnormal; x above 1023 is taken as 1023. 2^r on [-0.5, 0.5] by its Taylor series to
// degree 13 (remainder below 2e-17 relative).
FASTCL_FN VecD vexp2(const VecD& x) {
  using M = Lanes<double>::M;
  const VecD lo = vsplat<VecD>(-1021.0);
  const VecD shift = vsplat<VecD>(6755399441055744.0 + 1023.0);  // 1.5 * 2^52 + exponent bias
  const VecD xc = vmin(vmax(x, lo), vsplat<VecD>(1023.0));
  const VecD t = xc + shift;  // round(xc) + 1023 in the low mantissa bits
  const VecD r = xc - (t - shift);  // in [-0.5, 0.5], exact
  VecD y = vsplat<VecD>(1.36914888539041241e-12);  // (ln 2)^13 / 13!
  y = y * r + 2.56784359934881958e-11;
  y = y * r + 4.44553827187081007e-10;
  y = y * r + 7.05491162080112088e-09;
  y = y * r + 1.01780860092396960e-07;
  y = y * r + 1.32154867901443053e-06;
  y = y * r + 1.52527338040598377e-05;
  y = y * r + 1.54035303933816061e-04;
  y = y * r + 1.33335581464284411e-03;
  y = y * r + 9.61812910762847688e-03;
  y = y * r + 5.55041086648215762e-02;
  y = y * r + 2.40226506959100694e-01;
  y = y * r + 6.93147180559945286e-01;
  y = y * r + 1.00000000000000000e+00;
  const M bits = __builtin_bit_cast(M, t) << 52;
  const VecD res = y * __builtin_bit_cast(VecD, bits);
  const M keep = x >= lo;
  return __builtin_bit_cast(VecD, __builtin_bit_cast(M, res) & keep);
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

// The same in fp64, the series cut after w^32 (remainder below 2e-17 relative).
FASTCL_FN VecD vlog1p_unit(const VecD& e) {
  const VecD w = e / (e + 2.0);
  const VecD w2 = w * w;
  VecD p = vsplat<VecD>(1.0 / 33.0);
  p = p * w2 + 1.0 / 31.0;
  p = p * w2 + 1.0 / 29.0;
  p = p * w2 + 1.0 / 27.0;
  p = p * w2 + 1.0 / 25.0;
  p = p * w2 + 1.0 / 23.0;
  p = p * w2 + 1.0 / 21.0;
  p = p * w2 + 1.0 / 19.0;
  p = p * w2 + 1.0 / 17.0;
  p = p * w2 + 1.0 / 15.0;
  p = p * w2 + 1.0 / 13.0;
  p = p * w2 + 1.0 / 11.0;
  p = p * w2 + 1.0 / 9.0;
  p = p * w2 + 1.0 / 7.0;
  p = p * w2 + 1.0 / 5.0;
  p = p * w2 + 1.0 / 3.0;
  p = p * w2 + 1.0;
  return (w + w) * p;
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
