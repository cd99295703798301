// Row kernel of the CPU sigmoid loss: one fused pass over a slab row of raw dot products.
//
// Compiled once per instruction-set variant: siglip.cpp includes this file (after simd.h) inside
// one namespace per variant, with FASTCL_TGT defined as that variant's function attribute. Hence
// no include guard. SigArgs comes from siglip.cpp.
//
// With t = -z s (the argument of the pair's softplus), kept in log2 units t2 = t log2(e), one
// e = 2^(-|t2|) = exp(-|t|) per element gives both
//   softplus(t) = max(t, 0) + log(1 + e)   (log1p_unit keeps full relative precision for tiny e)
//   sigmoid(t)  = 1 / (1 + e) for t >= 0, e / (1 + e) otherwise,
// and neither step overflows for any logit. A NaN logit gives a NaN loss and gradient (the
// max and the exponential alone would turn it into 0). The gradient of the pair with respect to s is
// G = -g z sigmoid(t): g sigmoid(s) off the positive diagonal, -g sigmoid(-s) on it.
//
// Slab rows have a stride that is a multiple of the vector width, so a row's last partial vector
// is loaded and stored whole: its extra lanes (padding, never read by the GEMMs) are masked out
// of every sum.

// Rows [i0, i1) of the slab. LOSS: P.loss[i] = the row's sum of softplus. GRAD: G written in
// place of the dot products, P.db[i] / P.ds[i] = the row's sums of G and of G * l.
template <class T, bool LOSS, bool GRAD>
FASTCL_TGT void siglip_rows_t(const SigArgs<T>& P, int64_t i0, int64_t i1) {
  using V = typename Lanes<T>::V;
  using M = typename Lanes<T>::M;
  using I = typename Lanes<T>::I;
  constexpr int W = Lanes<T>::W;
  const int64_t C = P.C;
  const V a2 = vsplat<V>(P.a2), b2 = vsplat<V>(P.b2);
  const V zero = vsplat<V>(T(0)), one = vsplat<V>(T(1)), ln2 = vsplat<V>(static_cast<T>(kLn2));
  const M iota = viota<M>(), cv = vsplat<M>(static_cast<I>(C));
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t gi = P.r0 + i;
    const int64_t dcol = (P.diag_pos && gi < C) ? gi : -1;
    const int64_t dvec = dcol < 0 ? -1 : dcol - dcol % W;
    const M dv = vsplat<M>(static_cast<I>(dcol));
    const V gv = vsplat<V>(P.g != nullptr ? P.g[gi] : P.g_uniform);
    T* row = P.L + i * P.ldl;
    double loss = 0.0, db = 0.0, ds = 0.0;
    for (int64_t c0 = 0; c0 < C; c0 += kSigChunk) {
      const int64_t c1 = std::min<int64_t>(C, c0 + kSigChunk);
      V sl = zero, sdb = zero, sds = zero;
      for (int64_t c = c0; c < c1; c += W) {
        const V l = vload<V>(row + c);
        const V s2 = l * a2 + b2;
        if (c != dvec && c + W <= C) {
          // off the diagonal, every lane valid: t = s
          const V e = vexp2(vmin(s2, -s2));
          if constexpr (LOSS) sl += (s2 <= zero ? zero : s2) * ln2 + vlog1p_unit(e);
          if constexpr (GRAD) {
            V g = gv * ((s2 >= zero ? one : e) / (e + one));
            g = s2 == s2 ? g : s2;
            vstore(row + c, g);
            sdb += g;
            sds += g * l;
          }
        } else {
          const M ci = iota + static_cast<I>(c);
          const M isd = ci == dv;
          const M valid = ci < cv;
          const V t2 = isd ? -s2 : s2;
          const V e = vexp2(vmin(t2, -t2));
          if constexpr (LOSS) sl += valid ? (t2 <= zero ? zero : t2) * ln2 + vlog1p_unit(e) : zero;
          if constexpr (GRAD) {
            V g = gv * ((t2 >= zero ? one : e) / (e + one));
            g = t2 == t2 ? (isd ? -g : g) : t2;
            vstore(row + c, g);
            sdb += valid ? g : zero;
            sds += valid ? g * l : zero;
          }
        }
      }
      if constexpr (LOSS) loss += hsum(sl);
      if constexpr (GRAD) {
        db += hsum(sdb);
        ds += hsum(sds);
      }
    }
    if constexpr (LOSS) P.loss[i] = loss;
    if constexpr (GRAD) {
      P.db[i] = db;
      P.ds[i] = ds;
    }
  }
}

template <class T>
FASTCL_TGT void siglip_rows(const SigArgs<T>& P, int64_t i0, int64_t i1) {
  if (P.want_loss && P.want_grad)
    siglip_rows_t<T, true, true>(P, i0, i1);
  else if (P.want_loss)
    siglip_rows_t<T, true, false>(P, i0, i1);
  else
    siglip_rows_t<T, false, true>(P, i0, i1);
}
