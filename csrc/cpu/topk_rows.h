// Row kernel of the CPU top-k search: merges one block of a row's similarities into the row's
// running top-k.
//
// Compiled once per instruction-set variant: topk.cpp includes this file (after simd.h) inside
// one namespace per variant, with FASTCL_TGT defined as that variant's function attribute. Hence
// no include guard. TopkArgs and the heap helpers come from topk.cpp.
//
// Each row keeps its best entries so far as a heap (worst at the root) in its own rows of the
// output tensors. A vector comparison against the root's value rejects almost every entry once
// the heap is full: an entry equal to the root cannot displace it, as columns arrive in
// increasing order and the smaller column wins a tie. The test is !(v <= tau), which lets NaN
// through (NaN ranks highest) and, with tau = NaN while the heap is not full, every entry.

template <class T>
FASTCL_TGT void topk_rows(const TopkArgs<T>& P, int64_t i0, int64_t i1) {
  using V = typename Lanes<T>::V;
  using M = typename Lanes<T>::M;
  using I = typename Lanes<T>::I;
  constexpr int W = Lanes<T>::W;
  const int64_t k = P.k, cb = P.cb;
  const T qnan = std::numeric_limits<T>::quiet_NaN();
  const M iota = viota<M>(), cbv = vsplat<M>(static_cast<I>(cb));
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t gi = P.r0 + i;
    T* hv = P.vals + gi * k;
    int64_t* hc = P.idx + gi * k;
    int64_t n = P.cnt[i];
    const int64_t self_col = P.exclude_self ? gi : -1;
    T tau = n < k ? qnan : hv[0];
    V tv = vsplat<V>(tau);
    const T* row = P.L + i * P.ldl;
    for (int64_t c = 0; c < cb; c += W) {
      const V v = vload<V>(row + c);
      M m = ~(v <= tv);
      if (c + W > cb) m &= (iota + static_cast<I>(c)) < cbv;
      if (!vany(m)) continue;
      for (int j = 0; j < W; ++j) {
        if (!m[j]) continue;
        const int64_t col = P.c0 + c + j;
        if (col == self_col) continue;
        const T x = v[j] + T(0);  // -0.0 -> +0.0
        if (n < k) {
          heap_push(hv, hc, n, x, col);
          ++n;
        } else if (worse(hv[0], hc[0], x, col)) {
          hv[0] = x;
          hc[0] = col;
          heap_sift_down(hv, hc, n, 0);
        }
      }
      tau = n < k ? qnan : hv[0];
      tv = vsplat<V>(tau);
    }
    P.cnt[i] = n;
  }
}
