// Row kernels of the CPU contrastive primitive: fused elementwise passes over one slab of logits.
//
// Compiled once per instruction-set variant: contrastive.cpp includes this file (after simd.h,
// whose vector helpers it uses) several times, each time inside its own namespace and with
// FASTCL_TGT defined as that variant's function attribute. Hence no include guard. The argument
// structs come from contrastive.cpp.
//
// The slab holds raw dot products l = q_r . k_c; every pass recomputes the logit in log2 units,
// s2 = log2(e) * (scale * l + bias), so that every exponential is a 2^x. Work is done in tiles
// (kRowBlock rows x kColBlock columns in the forward) so that the second pass over a tile hits
// the cache. Per-column arrays are padded by one vector, and the slab by one vector at its end,
// so a row's last partial vector may be loaded whole (its extra lanes are masked).
//
// Exponentials: where all the maxima that matter in a tile (row maxima or LSEs, column maxima or
// LSEs) lie within P.span of the tile's largest one M, a single 2^(s2 - M) per element serves
// both the row and the column sums (forward) and both gradient terms (backward, through per-row
// and per-column factors 2^(M - lse)); otherwise each direction takes its own exponential with
// its own shift. Statistics leave the kernels in natural units.

// Per-row vector constants.
template <class T>
struct RowConst {
  using V = typename Lanes<T>::V;
  using M = typename Lanes<T>::M;
  V av, bv, ninf, zero;
  M iota, dcv, tcv, ridv, decm, all;
};

template <class T>
FASTCL_FN RowConst<T> row_const(T a, T b, const RowGeom& g, bool decoupled) {
  using V = typename Lanes<T>::V;
  using M = typename Lanes<T>::M;
  using I = typename Lanes<T>::I;
  RowConst<T> K;
  K.av = vsplat<V>(a);
  K.bv = vsplat<V>(b);
  K.ninf = vsplat<V>(-std::numeric_limits<T>::infinity());
  K.zero = vsplat<V>(T(0));
  K.iota = viota<M>();
  K.dcv = vsplat<M>(static_cast<I>(g.dcol));
  K.tcv = vsplat<M>(static_cast<I>(g.tcol));
  K.ridv = vsplat<M>(static_cast<I>(g.rid));
  K.decm = vsplat<M>(static_cast<I>(decoupled ? -1 : 0));
  K.all = vsplat<M>(static_cast<I>(-1));
  return K;
}

// Lane masks of the vector of columns starting at c: not the excluded diagonal (notd), positive
// (pm), in the denominator set (dm).
template <class T, bool LABELS>
FASTCL_FN void lane_masks(const RowConst<T>& K, int64_t c, const typename Lanes<T>::M& valid,
                          const typename Lanes<T>::I* idp, typename Lanes<T>::M& notd,
                          typename Lanes<T>::M& pm, typename Lanes<T>::M& dm) {
  using M = typename Lanes<T>::M;
  using I = typename Lanes<T>::I;
  const M ci = K.iota + static_cast<I>(c);
  notd = (ci != K.dcv) & valid;
  if constexpr (LABELS) {
    pm = (vload<M>(idp) == K.ridv) & notd;
  } else {
    pm = (ci == K.tcv) & valid;
  }
  dm = notd & ~(pm & K.decm);
}

// Start of the vector holding column c (columns are processed in vectors aligned on multiples of
// W from 0), or -1 for no column.
template <class T>
FASTCL_FN int64_t vec_of(int64_t c) {
  return c < 0 ? -1 : c - c % Lanes<T>::W;
}

// Runs op.template step<MASKED>(c, valid) over the vectors of columns [c0, c1) of one row: the
// masked variant on the vectors holding special columns (sp1, sp2) or on all of them
// (ALL_MASKED); then op.tail(c, valid, n) on the row's last partial vector (n lanes below C).
template <class T, bool ALL_MASKED, class Op>
FASTCL_FN void for_vectors(Op& op, const RowConst<T>& K, int64_t c0, int64_t c1, int64_t C,
                           int64_t sp1, int64_t sp2) {
  using M = typename Lanes<T>::M;
  using I = typename Lanes<T>::I;
  constexpr int W = Lanes<T>::W;
  int64_t c = c0;
  for (; c + W <= c1; c += W) {
    if (ALL_MASKED || c == sp1 || c == sp2)
      op.template step<true>(c, K.all);
    else
      op.template step<false>(c, K.all);
  }
  if (c < c1) {
    const M valid = (K.iota + static_cast<I>(c)) < vsplat<M>(static_cast<I>(C));
    op.tail(c, valid, static_cast<int>(C - c));
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

// Pass A over a tile row: the row's max over its denominator set, (label mode) max, sum and count
// over its positives, and (col_stats) the tile's column max over allowed entries.
template <class T, bool LABELS, bool COL>
struct PassA {
  using V = typename Lanes<T>::V;
  using M = typename Lanes<T>::M;
  using I = typename Lanes<T>::I;
  const RowConst<T>& K;
  const T* x;       // slab row: column c at x[c - xoff]
  int64_t xoff;
  const I* cid;     // label ids of the columns (label mode)
  T* tcm;           // tile column max, indexed by column
  V mx, pmx, psm;
  M pc;

  template <bool MASKED>
  FASTCL_FN void step(int64_t c, const M& valid) {
    const V s = vload<V>(x + (c - xoff)) * K.av + K.bv;
    if constexpr (!MASKED && !LABELS) {
      mx = vmax(mx, s);
      if constexpr (COL) vstore(tcm + c, vmax(vload<V>(tcm + c), s));
    } else {
      M notd, pm, dm;
      lane_masks<T, LABELS>(K, c, valid, LABELS ? cid + c : nullptr, notd, pm, dm);
      mx = vmax(mx, dm ? s : K.ninf);
      if constexpr (LABELS) {
        pmx = vmax(pmx, pm ? s : K.ninf);
        psm += pm ? s : K.zero;
        pc -= pm;
      }
      if constexpr (COL) vstore(tcm + c, vmax(vload<V>(tcm + c), notd ? s : K.ninf));
    }
  }

  // The slab is padded and read-only here: the partial vector is loaded whole, lanes masked.
  FASTCL_FN void tail(int64_t c, const M& valid, int) { step<true>(c, valid); }
};

// Pass B over a tile row: sums of 2^(s2 - shift). MODE 0: row sums only, shifted by the row max.
// MODE 1: one 2^(s2 - M) feeds the row, positive and column sums. MODE 2: separate exponentials,
// shifted by the row max (positive max) and by the tile column max. PEXP: (label mode, pos_lse)
// the sum over the positives too. E2 (lse2): the sum of 2^(mu (s2 - m)) over the denominator
// set, m the row's tile max (whatever the mode: a shared shift M would leave mu (M - m) to
// underflow), its own exponential.
template <class T, bool LABELS, int MODE, bool PEXP, bool E2>
struct PassB {
  using V = typename Lanes<T>::V;
  using M = typename Lanes<T>::M;
  using I = typename Lanes<T>::I;
  const RowConst<T>& K;
  const T* x;       // column c at x[c - xoff]
  int64_t xoff;
  const I* cid;
  const T* tcm;
  T* tcs;           // tile column sums
  V mr, mp;         // shifts: row max (MODE 0/2) or M (MODE 1); positive max (MODE 0/2)
  V se, spe;
  V mu, m2;         // E2: mu and the row's tile max (log2 units)
  V se2;

  // E2: 2^(mu (s2 - m)); d = s2 - m where the caller has it (the row max is the shift)
  FASTCL_FN V e2_of(const V& s, const V& d) const {
    if constexpr (MODE == 1) {
      return vexp2((s - m2) * mu);
    } else {
      (void)s;
      return vexp2(d * mu);
    }
  }

  template <bool MASKED>
  FASTCL_FN void step(int64_t c, const M& valid) {
    const V s = vload<V>(x + (c - xoff)) * K.av + K.bv;
    if constexpr (!MASKED && !LABELS) {
      if constexpr (MODE == 1) {
        const V e = vexp2(s - mr);
        se += e;
        if constexpr (E2) se2 += e2_of(s, s);
        vstore(tcs + c, vload<V>(tcs + c) + e);
      } else {
        const V d = s - mr;
        se += vexp2(d);
        if constexpr (E2) se2 += e2_of(s, d);
        if constexpr (MODE == 2) vstore(tcs + c, vload<V>(tcs + c) + vexp2(s - vload<V>(tcm + c)));
      }
    } else {
      M notd, pm, dm;
      lane_masks<T, LABELS>(K, c, valid, LABELS ? cid + c : nullptr, notd, pm, dm);
      if constexpr (MODE == 1) {
        const V e = vexp2(s - mr);
        se += dm ? e : K.zero;
        if constexpr (E2) se2 += dm ? e2_of(s, s) : K.zero;
        if constexpr (PEXP) spe += pm ? e : K.zero;
        vstore(tcs + c, vload<V>(tcs + c) + (notd ? e : K.zero));
      } else {
        const V d = s - mr;
        se += dm ? vexp2(d) : K.zero;
        if constexpr (E2) se2 += dm ? e2_of(s, d) : K.zero;
        if constexpr (PEXP) spe += pm ? vexp2(s - mp) : K.zero;
        if constexpr (MODE == 2)
          vstore(tcs + c, vload<V>(tcs + c) + (notd ? vexp2(s - vload<V>(tcm + c)) : K.zero));
      }
    }
  }

  FASTCL_FN void tail(int64_t c, const M& valid, int) { step<true>(c, valid); }
};

// Running statistics of the rows of one row block.
template <class T>
struct RowRun {
  RowState<T> st[kRowBlock];         // over the columns seen (tl: set at the end)
  T trm[kRowBlock], tpm[kRowBlock];  // tile: row max over the denominator set / the positives
  RowGeom geom[kRowBlock];
};

template <class T, bool LABELS, bool COL>
FASTCL_TGT void fwd_pass_a(const FwdArgs<T>& P, RowRun<T>& RR, int64_t i0, int nr, int64_t c0,
                           int64_t c1, T* tcm) {
  using M = typename Lanes<T>::M;
  for (int j = 0; j < nr; ++j) {
    const RowGeom& g = RR.geom[j];
    const RowConst<T> K = row_const<T>(P.a2, P.b2, g, P.decoupled);
    PassA<T, LABELS, COL> op{K, P.L + (i0 + j) * P.ld, P.cbeg, P.col_id, tcm,
                             K.ninf, K.ninf, K.zero, M{}};
    const int64_t sp2 = P.decoupled ? vec_of<T>(g.tcol) : -1;
    for_vectors<T, LABELS>(op, K, c0, c1, P.cend, vec_of<T>(g.dcol), sp2);
    RR.trm[j] = static_cast<T>(hmax(op.mx));
    if constexpr (LABELS) {
      RR.tpm[j] = static_cast<T>(hmax(op.pmx));
      RR.st[j].psum += hsum(op.psm) * kLn2;  // log2 units -> natural
      RR.st[j].pcnt += hsum(op.pc);
    }
  }
}

template <class T, bool LABELS, int MODE, bool PEXP, bool E2>
FASTCL_TGT void fwd_pass_b(const FwdArgs<T>& P, RowRun<T>& RR, int64_t i0, int nr, int64_t c0,
                           int64_t c1, const T* tcm, T* tcs, T shared_max) {
  using V = typename Lanes<T>::V;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int j = 0; j < nr; ++j) {
    const RowGeom& g = RR.geom[j];
    const bool row_live = RR.trm[j] > ninf;
    const bool pos_live = PEXP && RR.tpm[j] > ninf;
    if (MODE == 0 && !row_live && !pos_live) continue;
    const RowConst<T> K = row_const<T>(P.a2, P.b2, g, P.decoupled);
    const T mr = MODE == 1 ? shared_max : (row_live ? RR.trm[j] : T(0));
    const T mp = MODE == 1 ? shared_max : (pos_live ? RR.tpm[j] : T(0));
    const T m2 = row_live ? RR.trm[j] : T(0);
    PassB<T, LABELS, MODE, PEXP, E2> op{K, P.L + (i0 + j) * P.ld, P.cbeg, P.col_id, tcm, tcs,
                                        vsplat<V>(mr), vsplat<V>(mp), K.zero, K.zero,
                                        vsplat<V>(P.mu), vsplat<V>(m2), K.zero};
    const int64_t sp2 = P.decoupled ? vec_of<T>(g.tcol) : -1;
    for_vectors<T, LABELS>(op, K, c0, c1, P.cend, vec_of<T>(g.dcol), sp2);
    RowState<T>& st = RR.st[j];
    if (row_live) {
      T se = static_cast<T>(hsum(op.se)), shift = mr, se2 = T(0);
      if constexpr (E2) {
        // both sums relative to the row's tile max (MODE 1: the row sum rescaled from M, by at
        // most 2^span), so that the running max stays the row's own and se2 cannot underflow
        if (MODE == 1) se *= static_cast<T>(std::exp2(mr - m2));
        shift = m2;
        se2 = static_cast<T>(hsum(op.se2));
      }
      lse_merge_scalar<E2, T>(st.m, st.se, st.se2, shift, se, se2, P.mu);
    }
    if (pos_live) lse_merge_scalar<T>(st.pm, st.pse, mp, static_cast<T>(hsum(op.spe)));
  }
}

// Forward over rows [i0, i1) of the slab, columns [P.cbeg, P.cend). cm/cse: this chunk's running
// column statistics over allowed entries (max and sum of 2^(s2 - max), log2 units); tcm/tcs: tile
// scratch. Writes lse, pos, npos and, in mean, the sum of s over the row's positives (the caller
// completes the mean); with P.run, merges the rows' partial states into P.run instead.
template <class T>
FASTCL_TGT void fwd_rows(const FwdArgs<T>& P, int64_t i0, int64_t i1, T* cm, T* cse, T* tcm,
                         T* tcs) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t cbeg = P.cbeg, cend = P.cend;
  const bool col = P.col_stats, labels = P.labels;
  const bool pexp = labels && P.pos_lse;
  const bool e2 = P.lse2 != nullptr;  // lse2 on (also when the states go to P.run)
  RowRun<T> RR;
  for (int64_t b0 = i0; b0 < i1; b0 += kRowBlock) {
    const int nr = static_cast<int>(std::min<int64_t>(kRowBlock, i1 - b0));
    for (int j = 0; j < nr; ++j) {
      RR.geom[j] = row_geom(P, P.r0 + b0 + j);
      RR.st[j] = RowState<T>::empty();
    }
    for (int64_t c0 = cbeg; c0 < cend; c0 += kColBlock) {
      const int64_t c1 = std::min<int64_t>(cend, c0 + kColBlock);
      const int64_t c1v = std::min<int64_t>(c1 + Lanes<T>::W, cend + Lanes<T>::W);
      if (col)
        for (int64_t c = c0; c < c1v; ++c) {
          tcm[c - c0] = ninf;
          tcs[c - c0] = T(0);
        }
      T* tm = col ? tcm - c0 : nullptr;  // indexed by column
      T* ts = col ? tcs - c0 : nullptr;
      if (labels) {
        if (col) fwd_pass_a<T, true, true>(P, RR, b0, nr, c0, c1, tm);
        else fwd_pass_a<T, true, false>(P, RR, b0, nr, c0, c1, tm);
      } else {
        if (col) fwd_pass_a<T, false, true>(P, RR, b0, nr, c0, c1, tm);
        else fwd_pass_a<T, false, false>(P, RR, b0, nr, c0, c1, tm);
      }
      // MODE 1 when every maximum that matters is within the span of the tile maximum.
      int mode = 0;
      T big = ninf;
      if (col) {
        T small = std::numeric_limits<T>::infinity();
        for (int64_t c = c0; c < c1; ++c) {
          const T v = tm[c];
          if (v > ninf) {
            big = v > big ? v : big;
            small = v < small ? v : small;
          }
        }
        for (int j = 0; j < nr; ++j) {
          if (RR.trm[j] > ninf) small = RR.trm[j] < small ? RR.trm[j] : small;
          if (pexp && RR.tpm[j] > ninf) small = RR.tpm[j] < small ? RR.tpm[j] : small;
        }
        mode = (big > ninf && big - small <= P.span) ? 1 : 2;
      }
#define FASTCL_PB2(L_, M_, P_, E_)                                                             \
  if (labels == L_ && mode == M_ && pexp == P_ && e2 == E_)                                   \
    fwd_pass_b<T, L_, M_, P_, E_>(P, RR, b0, nr, c0, c1, tm, ts, big);
#define FASTCL_PB(L_, M_, P_) FASTCL_PB2(L_, M_, P_, false) FASTCL_PB2(L_, M_, P_, true)
      FASTCL_PB(false, 0, false)
      FASTCL_PB(false, 1, false)
      FASTCL_PB(false, 2, false)
      FASTCL_PB(true, 0, false)
      FASTCL_PB(true, 1, false)
      FASTCL_PB(true, 2, false)
      FASTCL_PB(true, 0, true)
      FASTCL_PB(true, 1, true)
      FASTCL_PB(true, 2, true)
#undef FASTCL_PB
#undef FASTCL_PB2
      if (col) {
        for (int64_t c = c0; c < c1; ++c) {
          const T pm = mode == 1 ? (tm[c] > ninf ? big : ninf) : tm[c];
          lse_merge_scalar<T>(cm[c], cse[c], pm, ts[c]);
        }
      }
    }
    for (int j = 0; j < nr; ++j) {
      const RowGeom& g = RR.geom[j];
      const int64_t gr = P.r0 + b0 + j;
      RowState<T>& st = RR.st[j];
      // target mode: the target's logit, where its column is in the range
      if (!labels && g.tcol >= cbeg && g.tcol < cend)
        st.tl = static_cast<double>(P.L[(b0 + j) * P.ld + (g.tcol - cbeg)] * P.a + P.b);
      if (P.run != nullptr)
        P.run[gr].merge(st, e2, P.mu);
      else
        finish_row(P, gr, g, st);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: G of one row from the saved statistics, written in place of the raw dot products l,
// with the row's partial sums of G (for dbias) and of G * l (for dscale).
//
//   G = dm * (e_row + gmd) + pm * pos_term + notd * (e_col + gcm[c])
// with e_row = gl * 2^(s2 - lse2) and e_col = gcl[c] * 2^(s2 - col_lse2[c]) (log2 units),
// computed either directly (DUAL) or as e * frg and e * fcg[c] with one e = 2^(s2 - M) (SINGLE),
// frg = gl * 2^(M - lse2), fcg[c] = gcl[c] * 2^(M - col_lse2[c]). E2 (the statistic lse2 at
// the multiplier mu): e_row gains g_lse2 * mu * 2^(mu s2 - l2), l2 the saved lse2 in log2
// units, with its own exponential.
template <class T, bool LABELS, bool REXP, bool CEXP, bool SINGLE, bool PEXP, bool E2>
struct BwdOp {
  using V = typename Lanes<T>::V;
  using M = typename Lanes<T>::M;
  using I = typename Lanes<T>::I;
  const RowConst<T>& K;
  T* x;             // the row's G / dot product of column c at x[c - xoff]
  int64_t xoff;
  const I* cid;
  const T* clse;    // DUAL: column LSE (safe)
  const T* gclc;    // DUAL: gcl; SINGLE: gcl * 2^(M - col_lse2)
  const T* gcm;     // g_col_mean / count (zeros when absent)
  V gl, lse, gmd, gpc, posr;  // SINGLE: gl holds gl * 2^(M - lse), lse holds M
  V db, ds;                   // sums of G and of G * l
  V gl2, lse2, mu;            // E2: g_lse2 * mu, lse2 (log2 units), mu

  template <bool MASKED>
  FASTCL_FN void step_at(int64_t c, const M& valid, T* xp) {
    const V l = vload<V>(xp);
    const V s = l * K.av + K.bv;
    V rowt = gmd, colt = vload<V>(gcm + c);
    if constexpr (SINGLE) {
      const V e = vexp2(s - lse);
      rowt += e * gl;
      colt += e * vload<V>(gclc + c);
    } else {
      if constexpr (REXP) rowt += gl * vexp2(s - lse);
      if constexpr (CEXP) colt += vload<V>(gclc + c) * vexp2(s - vload<V>(clse + c));
    }
    if constexpr (E2) rowt += gl2 * vexp2(s * mu - lse2);
    V g;
    if constexpr (!MASKED && !LABELS) {
      g = rowt + colt;
    } else {
      M notd, pm, dm;
      lane_masks<T, LABELS>(K, c, valid, LABELS ? cid + c : nullptr, notd, pm, dm);
      g = (dm ? rowt : K.zero) + (notd ? colt : K.zero);
      if constexpr (PEXP) {
        g += pm ? gpc * vexp2(s - posr) : K.zero;
      } else {
        g += pm ? gpc : K.zero;
      }
    }
    db += g;
    ds += g * l;
    vstore(xp, g);
  }

  template <bool MASKED>
  FASTCL_FN void step(int64_t c, const M& valid) {
    step_at<MASKED>(c, valid, x + (c - xoff));
  }

  // G is written in place and other threads write the next rows: the row's last partial vector
  // goes through a local copy.
  FASTCL_FN void tail(int64_t c, const M& valid, int n) {
    T buf[Lanes<T>::W] = {};
    std::memcpy(buf, x + (c - xoff), sizeof(T) * n);
    step_at<true>(c, valid, buf);
    std::memcpy(x + (c - xoff), buf, sizeof(T) * n);
  }
};

// Row block geometry and per-row gradient coefficients.
template <class T>
struct BwdRow {
  RowGeom geom;
  T gl, lse, gmd, gpc, posr;
  T gl2, lse2;  // lse2 term: g_lse2 * mu and lse2 in log2 units
  bool rexp, pexp, e2;
};

template <class T, bool LABELS, bool REXP, bool CEXP, bool SINGLE, bool PEXP, bool E2>
FASTCL_TGT void bwd_row(const BwdArgs<T>& P, const BwdRow<T>& br, T* x, int64_t c0, int64_t c1,
                        const T* gclc, T shared_max, double& db, double& ds) {
  using V = typename Lanes<T>::V;
  const RowConst<T> K = row_const<T>(P.a2, P.b2, br.geom, P.decoupled);
  T gl = br.gl, lse = br.lse;
  if (SINGLE) {
    gl = br.rexp ? static_cast<T>(br.gl * std::exp2(shared_max - br.lse)) : T(0);
    lse = shared_max;
  }
  BwdOp<T, LABELS, REXP, CEXP, SINGLE, PEXP, E2> op{
      K, x, P.cbeg, P.col_id, P.col_lse, gclc, P.g_col_mean, vsplat<V>(gl), vsplat<V>(lse),
      vsplat<V>(br.gmd), vsplat<V>(br.gpc), vsplat<V>(br.posr), K.zero, K.zero,
      vsplat<V>(br.gl2), vsplat<V>(br.lse2), vsplat<V>(P.mu)};
  for_vectors<T, LABELS>(op, K, c0, c1, P.cend, vec_of<T>(br.geom.dcol),
                         vec_of<T>(br.geom.tcol));
  db += hsum(op.db);  // per tile: float lanes sum at most kBwdColBlock / W terms
  ds += hsum(op.ds);
}

// Backward over rows [i0, i1) of the slab (row b at P.L + b * P.ld), columns [P.cbeg, P.cend),
// G written in place; db[i] and ds[i] receive row i's sums of G and of G * l over those columns.
// fcg: scratch of kBwdColBlock + W entries.
template <class T>
FASTCL_TGT void bwd_rows(const BwdArgs<T>& P, int64_t i0, int64_t i1, double* db, double* ds,
                         T* fcg) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t C = P.C;
  const bool labels = P.labels;
  const bool cexp = P.g_col_lse != nullptr;
  BwdRow<T> rows[kBwdRowBlock];
  for (int64_t b0 = i0; b0 < i1; b0 += kBwdRowBlock) {
    const int nr = static_cast<int>(std::min<int64_t>(kBwdRowBlock, i1 - b0));
    T rmax = ninf, rmin = std::numeric_limits<T>::infinity();
    for (int j = 0; j < nr; ++j) {
      BwdRow<T>& br = rows[j];
      const int64_t gr = P.r0 + b0 + j;
      br.geom = row_geom(P, gr);
      const double npos =
          labels ? static_cast<double>(P.npos[gr]) : (br.geom.tcol >= 0 ? 1.0 : 0.0);
      const double nden = static_cast<double>(C) - (br.geom.dcol >= 0 ? 1.0 : 0.0) -
                          (P.decoupled ? npos : 0.0);
      br.lse = static_cast<T>(static_cast<double>(P.lse[gr]) * kLog2e);
      br.gl = P.g_lse ? P.g_lse[gr] : T(0);
      br.rexp = br.gl != T(0) && br.lse > ninf;
      // lse2: no term where g_lse2 is 0 or the set is empty (lse2 -inf)
      br.gl2 = P.g_lse2 ? static_cast<T>(P.g_lse2[gr] * P.mu) : T(0);
      br.lse2 = P.g_lse2 ? static_cast<T>(static_cast<double>(P.lse2[gr]) * kLog2e) : T(0);
      br.e2 = P.g_lse2 != nullptr && P.g_lse2[gr] != T(0) && br.lse2 > ninf;
      if (!br.e2) {
        br.gl2 = T(0);
        br.lse2 = T(0);
      }
      if (!br.rexp) {
        br.gl = T(0);
        br.lse = T(0);
      } else {
        rmax = br.lse > rmax ? br.lse : rmax;
        rmin = br.lse < rmin ? br.lse : rmin;
      }
      // the contract's count max(|den|, 1): a ring block passes the global npos
      br.gmd = P.g_mean ? static_cast<T>(P.g_mean[gr] / std::max(nden, 1.0)) : T(0);
      const T gp = (P.g_pos && npos > 0) ? P.g_pos[gr] : T(0);
      br.pexp = false;
      br.gpc = gp;
      br.posr = T(0);
      if (labels && gp != T(0)) {
        if (P.pos_lse) {
          br.pexp = true;
          br.posr = static_cast<T>(static_cast<double>(P.pos[gr]) * kLog2e);
        } else {
          br.gpc = static_cast<T>(gp / npos);
        }
      }
      db[b0 + j] = 0.0;
      ds[b0 + j] = 0.0;
    }
    for (int64_t c0 = P.cbeg; c0 < P.cend; c0 += kBwdColBlock) {
      const int64_t c1 = std::min<int64_t>(P.cend, c0 + kBwdColBlock);
      const int64_t cb = c0 / kBwdColBlock;  // column-LSE terms come with cbeg = 0
      // One exp per element when the row and column LSEs of the tile lie within the span.
      bool single = false;
      T big = ninf;
      if (cexp && rmax > ninf && P.cb_max[cb] > ninf) {
        big = rmax > P.cb_max[cb] ? rmax : P.cb_max[cb];
        const T small = rmin < P.cb_min[cb] ? rmin : P.cb_min[cb];
        single = big - small <= P.span;
      }
      const T* gclc = P.g_col_lse;
      if (single) {
        const int64_t c1v = std::min<int64_t>(c1 + Lanes<T>::W, C + Lanes<T>::W);
        for (int64_t c = c0; c < c1v; ++c)
          fcg[c - c0] = (c < C && P.g_col_lse[c] != T(0))
                            ? static_cast<T>(P.g_col_lse[c] * std::exp2(big - P.col_lse[c]))
                            : T(0);
        gclc = fcg - c0;
      }
      for (int j = 0; j < nr; ++j) {
        const BwdRow<T>& br = rows[j];
        T* x = P.L + (b0 + j) * P.ld;
        const bool re = br.rexp;
        double& dbr = db[b0 + j];
        double& dsr = ds[b0 + j];
#define FASTCL_BW2(L_, R_, C_, S_, P_, E_)                                                  \
  if (labels == L_ && re == R_ && cexp == C_ && single == S_ && br.pexp == P_ && br.e2 == E_) \
    bwd_row<T, L_, R_, C_, S_, P_, E_>(P, br, x, c0, c1, gclc, big, dbr, dsr);
#define FASTCL_BW(L_, R_, C_, S_, P_) \
  FASTCL_BW2(L_, R_, C_, S_, P_, false) FASTCL_BW2(L_, R_, C_, S_, P_, true)
        FASTCL_BW(false, false, false, false, false)
        FASTCL_BW(false, true, false, false, false)
        FASTCL_BW(false, false, true, false, false)
        FASTCL_BW(false, true, true, false, false)
        FASTCL_BW(false, false, true, true, false)
        FASTCL_BW(false, true, true, true, false)
        FASTCL_BW(true, false, false, false, false)
        FASTCL_BW(true, true, false, false, false)
        FASTCL_BW(true, false, true, false, false)
        FASTCL_BW(true, true, true, false, false)
        FASTCL_BW(true, false, true, true, false)
        FASTCL_BW(true, true, true, true, false)
        FASTCL_BW(true, false, false, false, true)
        FASTCL_BW(true, true, false, false, true)
        FASTCL_BW(true, false, true, false, true)
        FASTCL_BW(true, true, true, false, true)
        FASTCL_BW(true, false, true, true, true)
        FASTCL_BW(true, true, true, true, true)
#undef FASTCL_BW
#undef FASTCL_BW2
      }
    }
  }
}

