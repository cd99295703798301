// CUDA kernels of the fused contrastive primitive (see contrastive_kernels.h for the contract of
// each launcher, and fastcl/reference/contrastive.py for the math).
//
// - fwd_rows: one block per row of the slab. Each thread streams 16-byte vectors of its row and
//   keeps an online log-sum-exp (running max, sum of 2^(x - max)) over the denominator set, and in
//   label mode the count, sum and (pos_lse) online LSE of the positives; a block reduction merges
//   the threads' partials.
// - fwd_cols: a block owns 32 x (16 / sizeof(stat)) columns and one of nsplit parts of the slab's
//   rows; 8 row lanes stream the rows (coalesced across the columns), merge in shared memory and
//   into the part's running column state. The states merge once, after the last slab (col_final).
// - self-similarity forward (k absent): fwd_rows over the columns up to the slab's end, merged
//   into running row states; fwd_self_cols, laid out as fwd_cols, over the part of the slab left
//   of its diagonal block, each column read as the sets of the row of the same index (its masks:
//   its target or label); row_final finishes every row from its states after the last slab.
// - bwd_tile: one block per row; G from the saved statistics, in place of the logits, with the
//   row's sums of G and G * l. A G narrower than the logits is written over the first half of
//   the row's bytes (for_each_row_vector, kernel_common.cuh: each sweep of the block loads,
//   synchronizes, then stores, so a store never lands on logits that a thread has yet to load).
//   Self-similarity: G + G.T on the columns up to the slab's end, G.T from the per-row
//   coefficients that bwd_coefs writes (the same row_coefs as the row's own).
// - lse2 (lse2_mult = mu > 0): the row kernel, the self column kernel and the row states keep one
//   more sum per denominator set, e2 = sum 2^(mu (x - m)) under lse's running maximum m (a
//   template switch of the streaming loops: no exponential more when off); the tile kernel adds
//   its term only in the instantiation for g_lse2 (BwdTileArgs::lse2_exp).
#include "contrastive_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernel_common.cuh"

namespace fastcl {
namespace cuda {
namespace {

constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;
constexpr int kColRowLanes = 8;     // row lanes (blockDim.y) of the column kernel
constexpr int kPrepThreads = 1024;  // threads of the (single-block) backward preparation

__device__ __forceinline__ float ex2(float x) { return exp2f(x); }
__device__ __forceinline__ double ex2(double x) { return exp2(x); }
__device__ __forceinline__ float lg2(float x) { return log2f(x); }
__device__ __forceinline__ double lg2(double x) { return log2(x); }



// (m, e) <- (m, e) merged with (m2, e2); e relative to m, e2 to m2; log2 units. kL2: q too (sum
// of 2^(mu (x - m)), the same set at mu > 0 times the logits), q2 relative to m2, with the same
// shifts times mu (an empty side, m = -inf, gets the factor 2^-inf = 0).
template <bool kL2, class T>
__device__ __forceinline__ void lse_merge(T& m, T& e, T& q, T m2, T e2, T q2, T mu) {
  const T big = m > m2 ? m : m2;
  if (!(big > neg_inf<T>())) return;  // both empty
  e = e * ex2(m - big) + e2 * ex2(m2 - big);
  if constexpr (kL2) q = q * ex2(mu * (m - big)) + q2 * ex2(mu * (m2 - big));
  m = big;
}

// lse_merge without q.
template <class T>
__device__ __forceinline__ void lse_merge(T& m, T& e, T m2, T e2) {
  lse_merge<false>(m, e, e, m2, e2, T(0), T(0));
}

// The lse2 statistic in a forward kernel: `on` (lse2_mult > 0), mu = lse2_mult.
template <class T>
struct Lse2 {
  bool on;
  T mu;
};

template <class T>
__device__ __forceinline__ Lse2<T> lse2_of(bool on, double mult) {
  return Lse2<T>{on, static_cast<T>(mult)};
}

// lse2 in natural units from the maximum m of the set (log2 units) and its sum q; -inf for an
// empty set.
template <class T>
__device__ __forceinline__ T lse2_value(T m, T q, T mu) {
  return m > neg_inf<T>() ? (mu * m + lg2(q)) * T(kLn2) : neg_inf<T>();
}


// Special columns of row gr: the excluded diagonal (dcol), the target (tcol, target mode), -1
// when absent; the row's label (label mode).
struct Geom {
  int64_t dcol;
  int64_t tcol;
  int64_t rlab;
  bool labels;
};

__device__ __forceinline__ Geom row_geom(const MaskSpec& M, int64_t gr) {
  Geom g;
  g.dcol = (M.exclude_diag && gr < M.C) ? gr : -1;
  g.tcol = -1;
  g.rlab = 0;
  g.labels = M.row_labels != nullptr && M.col_labels != nullptr;
  if (g.labels) {
    g.rlab = M.row_labels[gr];
  } else if (M.targets != nullptr) {
    const int64_t t = M.targets[gr];
    if (t >= 0 && t < M.C && t != g.dcol) g.tcol = t;
  }
  return g;
}

// Membership of column col (which may lie past the row's last column `end`, in the padding or
// outside the slab) in the sets of the row.
__device__ __forceinline__ void classify(const MaskSpec& M, const Geom& g, int64_t col,
                                         int64_t end, bool& valid, bool& allowed, bool& pos,
                                         bool& den) {
  valid = col < end;
  allowed = valid && col != g.dcol;
  pos = g.labels ? (allowed && M.col_labels[col] == g.rlab) : (valid && col == g.tcol);
  den = allowed && !(M.decoupled && pos);
}

// Whether the V columns from c all lie in the row's denominator set and none is a positive: target
// mode (or no positives), inside [0, end), neither the excluded diagonal nor the target. Such
// vectors (all but at most two per row) skip the per-column masks.
template <int V>
__device__ __forceinline__ bool plain_vector(const Geom& g, int64_t c, int64_t end) {
  return !g.labels && c + V <= end && (g.dcol < c || g.dcol >= c + V) &&
         (g.tcol < c || g.tcol >= c + V);
}


// ---------------------------------------------------------------------------------------------
// Forward: row statistics

// The lse2 sum of a row's partial, e2 = sum of 2^(mu (x - m)) over the denominator set: a member
// only with kL2 (without it, no register, shuffle or shared memory more).
template <class T, bool kL2>
struct RowPartLse2 {
  T e2;
};
template <class T>
struct RowPartLse2<T, false> {};

template <class T, bool kL2>
struct RowPart : RowPartLse2<T, kL2> {
  T m, e;     // denominator set: max (log2 units), sum of 2^(x - m)
  T pm, pe;   // positives (label mode, pos_lse)
  T sl, psl;  // sums of raw dot products over den / over the positives (label mode)
  int pc;     // number of positives (label mode)

  __device__ T lse2_sum() const {
    if constexpr (kL2) {
      return this->e2;
    } else {
      return T(0);
    }
  }
  // The q argument of online_add, online_add1 and lse_merge: e2 with kL2; without kL2 they leave
  // q alone, and it is e.
  __device__ T& lse2_arg() {
    if constexpr (kL2) {
      return this->e2;
    } else {
      return e;
    }
  }
  __device__ static RowPart identity() {
    RowPart p;
    if constexpr (kL2) p.e2 = T(0);
    p.m = neg_inf<T>();
    p.e = T(0);
    p.pm = neg_inf<T>();
    p.pe = T(0);
    p.sl = T(0);
    p.psl = T(0);
    p.pc = 0;
    return p;
  }
  __device__ void merge(const RowPart& o, const Lse2<T>& l2) {
    lse_merge<kL2>(m, e, lse2_arg(), o.m, o.e, o.lse2_sum(), l2.mu);
    lse_merge(pm, pe, o.pm, o.pe);
    sl += o.sl;
    psl += o.psl;
    pc += o.pc;
  }
  __device__ RowPart shfl(int o) const {
    RowPart p;
    if constexpr (kL2) p.e2 = shfl_xor(this->e2, o);
    p.m = shfl_xor(m, o);
    p.e = shfl_xor(e, o);
    p.pm = shfl_xor(pm, o);
    p.pe = shfl_xor(pe, o);
    p.sl = shfl_xor(sl, o);
    p.psl = shfl_xor(psl, o);
    p.pc = shfl_xor(pc, o);
    return p;
  }
};

// NaN-propagating maximum.
template <class T>
__device__ __forceinline__ T nmax(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// A row's sets merged over all of its columns: RowPart's fields with the sums and the count in
// fp64.
template <class T>
struct RowTotals {
  T m, e, e2, pm, pe;
  double sl, psl, pc;
};

template <class T, bool kL2>
__device__ __forceinline__ RowTotals<T> totals_of(const RowPart<T, kL2>& p) {
  return RowTotals<T>{p.m,
                      p.e,
                      p.lse2_sum(),
                      p.pm,
                      p.pe,
                      static_cast<double>(p.sl),
                      static_cast<double>(p.psl),
                      static_cast<double>(p.pc)};
}

// Writes the statistics of row gr from its totals; tl: the raw dot product of its target (target
// mode with a target); lse2 when l2.on.
template <class T>
__device__ void finish_row(const MaskSpec& M, const Geom& g, int64_t gr, const RowTotals<T>& p,
                           T tl, T a, T b, const RowOutputs& out, const Lse2<T>& l2) {
  const T ninf = neg_inf<T>();
  if (l2.on) static_cast<T*>(out.lse2)[gr] = lse2_value(p.m, p.e2, l2.mu);
  const double npos = g.labels ? p.pc : (g.tcol >= 0 ? 1.0 : 0.0);
  const double nden =
      static_cast<double>(M.C) - (g.dcol >= 0 ? 1.0 : 0.0) - (M.decoupled ? npos : 0.0);
  static_cast<T*>(out.npos)[gr] = static_cast<T>(npos);
  static_cast<T*>(out.lse)[gr] = p.m > ninf ? (p.m + lg2(p.e)) * T(kLn2) : ninf;
  static_cast<T*>(out.mean)[gr] = nden > 0 ? a * static_cast<T>(p.sl / nden) + b : T(0);
  T pv = T(0);
  if (npos > 0) {
    if (!g.labels) {
      pv = a * tl + b;
    } else if (M.pos_lse) {
      pv = (p.pm + lg2(p.pe)) * T(kLn2);
    } else {
      pv = a * static_cast<T>(p.psl / npos) + b;
    }
  }
  static_cast<T*>(out.pos)[gr] = pv;
}

// Self-similarity: the sets p of row `row` merged into its state of part `split` (e2 too with
// kL2).
template <class T, bool kL2>
__device__ void state_merge(const RowStates& S, int split, int64_t row,
                            const RowPart<T, kL2>& p, const Lse2<T>& l2) {
  T* t = static_cast<T*>(S.t);
  const int64_t n = int64_t(S.nsplit) * S.ld, at = int64_t(split) * S.ld + row;
  T m = t[at], e = t[n + at], pm = t[2 * n + at], pe = t[3 * n + at];
  T* q = static_cast<T*>(S.e2);  // read and written with kL2 only
  T e2 = T(0);
  if constexpr (kL2) e2 = q[at];
  lse_merge<kL2>(m, e, e2, p.m, p.e, p.lse2_sum(), l2.mu);
  if constexpr (kL2) q[at] = e2;
  lse_merge(pm, pe, p.pm, p.pe);
  t[at] = m;
  t[n + at] = e;
  t[2 * n + at] = pm;
  t[3 * n + at] = pe;
  S.d[at] += static_cast<double>(p.sl);
  S.d[n + at] += static_cast<double>(p.psl);
  S.d[2 * n + at] += static_cast<double>(p.pc);
}

// Self-similarity: the totals of row `row`, its states of every part merged (e2 too when l2.on).
template <class T>
__device__ RowTotals<T> state_totals(const RowStates& S, int64_t row, const Lse2<T>& l2) {
  const T* t = static_cast<const T*>(S.t);
  const T* q = static_cast<const T*>(S.e2);
  const int64_t n = int64_t(S.nsplit) * S.ld;
  RowTotals<T> p{neg_inf<T>(), T(0), T(0), neg_inf<T>(), T(0), 0.0, 0.0, 0.0};
  for (int j = 0; j < S.nsplit; ++j) {
    const int64_t at = int64_t(j) * S.ld + row;
    if (l2.on) {
      lse_merge<true>(p.m, p.e, p.e2, t[at], t[n + at], q[at], l2.mu);
    } else {
      lse_merge(p.m, p.e, t[at], t[n + at]);
    }
    lse_merge(p.pm, p.pe, t[2 * n + at], t[3 * n + at]);
    p.sl += S.d[at];
    p.psl += S.d[n + at];
    p.pc += S.d[2 * n + at];
  }
  return p;
}

// Adds the N values x (log2 units, -inf for the masked ones) of maximum vmax to (m, e); kL2: to
// the lse2 sum q too (sum of 2^(mu (x - m)), mu > 0), under the same maximum m. A NaN reaches e
// (and q).
template <bool kL2, class T, int N>
__device__ __forceinline__ void online_add(T& m, T& e, T& q, const T (&x)[N], T vmax, T mu) {
  if (vmax == neg_inf<T>()) return;
  if (vmax > m) {
    e *= ex2(m - vmax);
    if constexpr (kL2) q *= ex2(mu * (m - vmax));
    m = vmax;
  }
#pragma unroll
  for (int j = 0; j < N; ++j) {
    e += ex2(x[j] - m);
    if constexpr (kL2) q += ex2(mu * (x[j] - m));
  }
}

// online_add without q.
template <class T, int N>
__device__ __forceinline__ void online_add(T& m, T& e, const T (&x)[N], T vmax) {
  online_add<false>(m, e, e, x, vmax, T(0));
}

// Adds one value x (log2 units) to (m, e); kL2: to the lse2 sum q too (mu > 0), under the same
// maximum m. A NaN reaches e (and q).
template <bool kL2, class T>
__device__ __forceinline__ void online_add1(T& m, T& e, T& q, T x, T mu) {
  if (x > m) {
    e = e * ex2(m - x) + T(1);
    if constexpr (kL2) q = q * ex2(mu * (m - x)) + T(1);
    m = x;
  } else if (x != neg_inf<T>()) {
    e += ex2(x - m);
    if constexpr (kL2) q += ex2(mu * (x - m));
  }
}

// online_add1 without q.
template <class T>
__device__ __forceinline__ void online_add1(T& m, T& e, T x) {
  online_add1<false>(m, e, e, x, T(0));
}

// kL2: lse2 on (P.lse2_mult > 0).
template <class T, bool kL2>
__global__ void fwd_rows_kernel(const FwdRowsArgs P) {
  constexpr int V = VecWidth<T>::value;
  const MaskSpec& M = P.mask;
  const int64_t i = blockIdx.x;
  const int64_t gr = P.r0 + i;
  const int64_t end = P.cend;
  const T* x = static_cast<const T*>(P.L) + i * P.ldl;
  const T a = *static_cast<const T*>(P.scale);
  const T b = *static_cast<const T*>(P.bias);
  const T a2 = a * T(kLog2e), b2 = b * T(kLog2e);
  const Geom g = row_geom(M, gr);
  const bool pexp = g.labels && M.pos_lse;
  // with states the target's logit may lie past the slab: its sum over the positives holds it
  const bool partial = P.states.t != nullptr;
  const bool pos_sums = g.labels || partial;
  const T ninf = neg_inf<T>();
  const Lse2<T> l2 = lse2_of<T>(kL2, P.lse2_mult);

  RowPart<T, kL2> p = RowPart<T, kL2>::identity();
  for (int64_t c = int64_t(threadIdx.x) * V; c < end; c += int64_t(blockDim.x) * V) {
    const Pack<T, V> v = *reinterpret_cast<const Pack<T, V>*>(x + c);
    T xd[V], xp[V];
    T dmax = ninf, pmax = ninf;
    if (plain_vector<V>(g, c, end)) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        xd[j] = v.v[j] * a2 + b2;
        dmax = nmax(xd[j], dmax);
        p.sl += v.v[j];
      }
      online_add<kL2>(p.m, p.e, p.lse2_arg(), xd, dmax, l2.mu);
      continue;
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      bool valid, allowed, pos, den;
      classify(M, g, c + j, end, valid, allowed, pos, den);
      const T l = v.v[j];
      const T s2 = l * a2 + b2;
      xd[j] = den ? s2 : ninf;
      dmax = nmax(xd[j], dmax);
      p.sl += den ? l : T(0);
      xp[j] = ninf;
      if (pos_sums) {
        p.psl += pos ? l : T(0);
        p.pc += pos ? 1 : 0;
      }
      if (pexp) {
        xp[j] = pos ? s2 : ninf;
        pmax = nmax(xp[j], pmax);
      }
    }
    online_add<kL2>(p.m, p.e, p.lse2_arg(), xd, dmax, l2.mu);
    if (pexp) online_add(p.pm, p.pe, xp, pmax);
  }
  p = block_reduce(p, l2);
  if (threadIdx.x != 0) return;
  if (partial) {
    state_merge(P.states, 0, gr, p, l2);
  } else {
    finish_row(M, g, gr, totals_of(p), g.tcol >= 0 ? x[g.tcol] : T(0), a, b, P.out, l2);
  }
}

// Self-similarity: the sets of the rows c < r0 over the columns of the slab's rows, from the
// part of the slab left of its diagonal block. kL2: lse2 on (P.lse2_mult > 0).
template <class T, bool kL2>
__global__ void fwd_self_cols_kernel(const FwdRowsArgs P) {
  constexpr int V = VecWidth<T>::value;
  constexpr int W = 32 * V;  // columns per block
  __shared__ RowPart<T, kL2> sm[kColRowLanes][W];

  const MaskSpec& M = P.mask;
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int64_t c0 = (int64_t(blockIdx.x) * 32 + tx) * V;
  const int split = static_cast<int>(blockIdx.y);
  const int nsplit = P.states.nsplit;
  const int64_t rb = P.rows * split / nsplit;
  const int64_t re = P.rows * (split + 1) / nsplit;
  const T a = *static_cast<const T*>(P.scale);
  const T b = *static_cast<const T*>(P.bias);
  const T a2 = a * T(kLog2e), b2 = b * T(kLog2e);
  const bool labels = M.row_labels != nullptr && M.col_labels != nullptr;
  const bool pexp = labels && M.pos_lse;
  const Lse2<T> l2 = lse2_of<T>(kL2, P.lse2_mult);

  // Column c0 + j is row c0 + j of the statistics: its label, or its target (-1: none), decides
  // which of the slab's rows (its columns here) are its positives; none is its diagonal.
  RowPart<T, kL2> p[V];
  int64_t key[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    p[j] = RowPart<T, kL2>::identity();
    const int64_t c = c0 + j;
    key[j] = -1;
    if (c < P.r0) {
      if (labels) {
        key[j] = M.row_labels[c];
      } else if (M.targets != nullptr) {
        key[j] = M.targets[c];
      }
    }
  }
  if (c0 < P.r0) {
    const T* base = static_cast<const T*>(P.L) + c0;
    for (int64_t i = rb + ty; i < re; i += kColRowLanes) {
      const int64_t gr = P.r0 + i;
      const int64_t glab = labels ? M.col_labels[gr] : 0;
      const Pack<T, V> v = *reinterpret_cast<const Pack<T, V>*>(base + i * P.ldl);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (c0 + j >= P.r0) continue;  // the diagonal block: the slab's own rows
        const bool pos = labels ? key[j] == glab : key[j] == gr;
        const T l = v.v[j];
        const T s2 = l * a2 + b2;
        if (!(M.decoupled && pos)) {
          online_add1<kL2>(p[j].m, p[j].e, p[j].lse2_arg(), s2, l2.mu);
          p[j].sl += l;
        }
        if (pos) {
          p[j].psl += l;
          p[j].pc += 1;
          if (pexp) online_add1(p[j].pm, p[j].pe, s2);
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) sm[ty][tx * V + j] = p[j];
  __syncthreads();
  // Each of the block's threads merges the row lanes of at most one column of the block.
  const int t = ty * 32 + tx;
  for (int w = t; w < W; w += 32 * kColRowLanes) {
    const int64_t col = int64_t(blockIdx.x) * W + w;
    if (col >= P.r0) continue;
    RowPart<T, kL2> s = sm[0][w];
    for (int y = 1; y < kColRowLanes; ++y) s.merge(sm[y][w], l2);
    state_merge(P.states, split, col, s, l2);
  }
}

template <class T>
__global__ void row_final_kernel(const RowFinalArgs P) {
  const int64_t gr = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (gr >= P.mask.R) return;
  const T a = *static_cast<const T*>(P.scale);
  const T b = *static_cast<const T*>(P.bias);
  const Lse2<T> l2 = lse2_of<T>(P.states.e2 != nullptr, P.lse2_mult);
  const RowTotals<T> p = state_totals<T>(P.states, gr, l2);
  // target mode: the target is the only positive, its logit the positives' sum
  finish_row(P.mask, row_geom(P.mask, gr), gr, p, static_cast<T>(p.psl), a, b, P.out, l2);
}

// ---------------------------------------------------------------------------------------------
// Forward: column statistics

template <class T>
__global__ void fwd_cols_kernel(const FwdColsArgs P) {
  constexpr int V = VecWidth<T>::value;
  constexpr int W = 32 * V;  // columns per block
  __shared__ T sm_m[kColRowLanes][W];
  __shared__ T sm_e[kColRowLanes][W];
  __shared__ T sm_l[kColRowLanes][W];

  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int64_t c0 = (int64_t(blockIdx.x) * 32 + tx) * V;
  const int split = static_cast<int>(blockIdx.y);
  const int64_t rb = P.rows * split / P.nsplit;
  const int64_t re = P.rows * (split + 1) / P.nsplit;
  const T a = *static_cast<const T*>(P.scale);
  const T b = *static_cast<const T*>(P.bias);
  const T a2 = a * T(kLog2e), b2 = b * T(kLog2e);
  const T ninf = neg_inf<T>();

  T m[V], e[V], sl[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    m[j] = ninf;
    e[j] = T(0);
    sl[j] = T(0);
  }
  if (c0 < P.C) {
    const T* base = static_cast<const T*>(P.L) + c0;
    for (int64_t i = rb + ty; i < re; i += kColRowLanes) {
      const int64_t gr = P.r0 + i;
      const Pack<T, V> v = *reinterpret_cast<const Pack<T, V>*>(base + i * P.ldl);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int64_t col = c0 + j;
        const bool allowed = col < P.C && !(P.exclude_diag && gr == col);
        if (allowed) {
          const T l = v.v[j];
          const T s2 = l * a2 + b2;
          if (s2 > m[j]) {
            e[j] = e[j] * ex2(m[j] - s2) + T(1);
            m[j] = s2;
          } else {
            e[j] += ex2(s2 - m[j]);
          }
          sl[j] += l;
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    sm_m[ty][tx * V + j] = m[j];
    sm_e[ty][tx * V + j] = e[j];
    sm_l[ty][tx * V + j] = sl[j];
  }
  __syncthreads();
  // Each of the block's threads merges the row lanes of at most one column of the block.
  const int t = ty * 32 + tx;
  for (int w = t; w < W; w += 32 * kColRowLanes) {
    const int64_t col = int64_t(blockIdx.x) * W + w;
    if (col >= P.C) continue;
    T mm = sm_m[0][w], ee = sm_e[0][w];
    double ll = static_cast<double>(sm_l[0][w]);
    for (int y = 1; y < kColRowLanes; ++y) {
      lse_merge(mm, ee, sm_m[y][w], sm_e[y][w]);
      ll += static_cast<double>(sm_l[y][w]);
    }
    const int64_t at = int64_t(split) * P.ldstate + col;
    T* stm = static_cast<T*>(P.st_max);
    T* ste = static_cast<T*>(P.st_sum);
    T sm = stm[at], se = ste[at];
    lse_merge(sm, se, mm, ee);
    stm[at] = sm;
    ste[at] = se;
    P.st_lsum[at] += ll;
  }
}

template <class T>
__global__ void col_final_kernel(const ColFinalArgs P) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= P.C) return;
  const T a = *static_cast<const T*>(P.scale);
  const T b = *static_cast<const T*>(P.bias);
  const T ninf = neg_inf<T>();
  const T* stm = static_cast<const T*>(P.st_max);
  const T* ste = static_cast<const T*>(P.st_sum);
  T m = ninf, e = T(0);
  double sl = 0.0;
  for (int j = 0; j < P.nsplit; ++j) {
    const int64_t at = int64_t(j) * P.ldstate + c;
    lse_merge(m, e, stm[at], ste[at]);
    sl += P.st_lsum[at];
  }
  const double cnt = static_cast<double>(P.R) - ((P.exclude_diag && c < P.R) ? 1.0 : 0.0);
  static_cast<T*>(P.col_lse)[c] = m > ninf ? (m + lg2(e)) * T(kLn2) : ninf;
  static_cast<T*>(P.col_mean)[c] = cnt > 0 ? a * static_cast<T>(sl / cnt) + b : T(0);
}

// ---------------------------------------------------------------------------------------------
// Backward

template <class T>
struct MaxPart {
  T v;
  __device__ static MaxPart identity() { return MaxPart{T(0)}; }
  __device__ void merge(const MaxPart& o) { v = o.v > v ? o.v : v; }
  __device__ MaxPart shfl(int o) const { return MaxPart{shfl_xor(v, o)}; }
};

template <class T>
__device__ __forceinline__ T load_or_zero(const void* p, int64_t i) {
  return p != nullptr ? static_cast<const T*>(p)[i] : T(0);
}

template <class T>
__global__ void bwd_prep_kernel(const BwdPrepArgs P) {
  const T ninf = neg_inf<T>();
  T bound_r = T(0), bound_c = T(0);
  for (int64_t r = threadIdx.x; r < P.R; r += blockDim.x) {
    const T v = absv(load_or_zero<T>(P.g_lse, r)) + absv(load_or_zero<T>(P.g_pos, r)) +
                absv(load_or_zero<T>(P.g_mean, r)) +
                absv(load_or_zero<T>(P.g_lse2, r)) * static_cast<T>(P.lse2_mult);
    bound_r = v > bound_r ? v : bound_r;
  }
  T* cols = static_cast<T*>(P.cols);
  for (int64_t c = threadIdx.x; c < (cols != nullptr ? P.ldcol : P.C); c += blockDim.x) {
    T shift = T(0), coef = T(0), cst = T(0);
    if (c < P.C) {
      if (P.g_col_lse != nullptr) {
        const T cl = static_cast<const T*>(P.col_lse)[c];
        if (cl > ninf) {
          shift = cl * T(kLog2e);
          coef = static_cast<const T*>(P.g_col_lse)[c];
        }
      }
      if (P.g_col_mean != nullptr) {
        const double cnt = static_cast<double>(P.R) - ((P.exclude_diag && c < P.R) ? 1.0 : 0.0);
        const double gcm = static_cast<double>(static_cast<const T*>(P.g_col_mean)[c]);
        if (cnt > 0) cst = static_cast<T>(gcm / cnt);
      }
      const T v = absv(coef) + absv(cst);
      bound_c = v > bound_c ? v : bound_c;
    }
    if (cols != nullptr) {
      cols[c] = shift;
      cols[P.ldcol + c] = coef;
      cols[2 * P.ldcol + c] = cst;
    }
  }
  // A NaN bound stays NaN through the max: it gives f = 1 below.
  MaxPart<T> br = block_reduce(MaxPart<T>{bound_r});
  __syncthreads();
  MaxPart<T> bc = block_reduce(MaxPart<T>{bound_c});
  if (threadIdx.x != 0) return;
  const double bound = static_cast<double>(br.v) + static_cast<double>(bc.v);
  int ex = 0;
  if (bound > 0 && bound < 1e300) {
    ex = static_cast<int>(floor(log2(static_cast<double>(kGradHeadroom) / bound)));
    ex = ex > kGradScaleMaxExp ? kGradScaleMaxExp : ex;
    ex = ex < -kGradScaleMaxExp ? -kGradScaleMaxExp : ex;
  }
  T* gs = static_cast<T*>(P.gscale);
  gs[0] = static_cast<T>(ldexp(1.0, ex));
  gs[1] = static_cast<T>(ldexp(1.0, -ex));
}

struct SumPart {
  double ds, db;
  __device__ static SumPart identity() { return SumPart{0.0, 0.0}; }
  __device__ void merge(const SumPart& o) {
    ds += o.ds;
    db += o.db;
  }
  __device__ SumPart shfl(int o) const { return SumPart{shfl_xor(ds, o), shfl_xor(db, o)}; }
};

// The coefficients of G on one row: G = den * (gl 2^(s2 - lser2) + gmd + gl2 2^(mu s2 - lse2r2))
// + pos * (gpe 2^(s2 - posr2) or gpc) + allowed * (column terms), s2 the logit in log2 units
// (fastcl/reference/contrastive.py); the lse2 term (mu = lse2_mult) only in the tiles with kL2.
template <class T>
struct RowCoefs {
  T gl, lser2;    // lse in log2 units; gl = 0: no exponential term (no g_lse, or an empty set)
  T gmd;          // g_mean / max(|den|, 1)
  T gpe, posr2;   // pos_lse in label mode: g_pos times the positives' softmax (gpe = 0: none)
  T gpc;          // otherwise: g_pos per positive
  T gl2, lse2r2;  // g_lse2 * mu and lse2 in log2 units (gl2 = 0: no term), read with kL2 only

  template <bool kL2>
  __device__ T den_term(T s2, T mu) const {
    T v = gl != T(0) ? gmd + gl * ex2(s2 - lser2) : gmd;
    if constexpr (kL2) {
      if (gl2 != T(0)) v += gl2 * ex2(mu * s2 - lse2r2);
    }
    return v;
  }
  __device__ T pos_term(T s2) const { return gpe != T(0) ? gpe * ex2(s2 - posr2) : gpc; }
};

template <class T>
__device__ RowCoefs<T> row_coefs(const BwdTileArgs& P, const Geom& g, int64_t gr) {
  const MaskSpec& M = P.mask;
  const T npos = g.labels ? static_cast<const T*>(P.npos)[gr] : T(g.tcol >= 0 ? 1 : 0);
  if (P.pos_rows_only && !(npos > T(0))) return RowCoefs<T>{};  // all zero: no term
  const double nden = static_cast<double>(M.C) - (g.dcol >= 0 ? 1.0 : 0.0) -
                      (M.decoupled ? static_cast<double>(npos) : 0.0);
  const T lse = static_cast<const T*>(P.lse)[gr];
  const T gl = load_or_zero<T>(P.g_lse, gr);
  const bool rexp = gl != T(0) && lse > neg_inf<T>();
  const double gm = static_cast<double>(load_or_zero<T>(P.g_mean, gr));
  const T gp = (P.g_pos != nullptr && npos > T(0)) ? static_cast<const T*>(P.g_pos)[gr] : T(0);
  const bool pexp = g.labels && M.pos_lse && gp != T(0);
  RowCoefs<T> k;
  k.gl = rexp ? gl : T(0);
  k.lser2 = rexp ? lse * T(kLog2e) : T(0);
  // the contract's count max(|den|, 1): a ring block passes the global npos (see fastcl.reference)
  k.gmd = static_cast<T>(gm / (nden > 1.0 ? nden : 1.0));
  k.gpe = pexp ? gp : T(0);
  k.posr2 = pexp ? static_cast<const T*>(P.pos)[gr] * T(kLog2e) : T(0);
  k.gpc = pexp ? T(0) : ((g.labels && !M.pos_lse && gp != T(0)) ? gp / npos : gp);
  k.gl2 = T(0);
  k.lse2r2 = T(0);
  if (P.lse2_exp) {
    // an empty denominator set (lse2 = -inf) has no term
    const T l2 = static_cast<const T*>(P.lse2)[gr];
    const T g2 = static_cast<const T*>(P.g_lse2)[gr];
    if (g2 != T(0) && l2 > neg_inf<T>()) {
      k.gl2 = g2 * static_cast<T>(P.lse2_mult);
      k.lse2r2 = l2 * T(kLog2e);
    }
  }
  return k;
}

template <class T>
__global__ void bwd_coefs_kernel(const BwdTileArgs P) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= P.rows) return;
  const int64_t gr = P.r0 + i, R = P.mask.R;
  const RowCoefs<T> k = row_coefs<T>(P, row_geom(P.mask, gr), gr);
  T* out = static_cast<T*>(P.coefs);
  out[gr] = k.gl;
  out[R + gr] = k.lser2;
  out[2 * R + gr] = k.gmd;
  out[3 * R + gr] = k.gpe;
  out[4 * R + gr] = k.posr2;
  out[5 * R + gr] = k.gpc;
  if (P.lse2_exp) {  // coefs holds kRowCoefsLse2 rows
    out[6 * R + gr] = k.gl2;
    out[7 * R + gr] = k.lse2r2;
  }
}

// Self-similarity: G[col, gr] from the logit s2 of (gr, col), with row col's coefficients and
// the mask of (col, gr).
template <class T, bool kL2>
__device__ __forceinline__ T transposed_grad(const BwdTileArgs& P, int64_t gr, int64_t col,
                                             int64_t glab, T s2, T mu) {
  const MaskSpec& M = P.mask;
  const int64_t R = M.R;
  const T* cf = static_cast<const T*>(P.coefs);
  const bool allowed = !(M.exclude_diag && col == gr);
  bool pos = false;
  if (M.row_labels != nullptr && M.col_labels != nullptr) {
    pos = allowed && M.row_labels[col] == glab;
  } else if (M.targets != nullptr) {
    pos = allowed && M.targets[col] == gr;
  }
  const bool den = allowed && !(M.decoupled && pos);
  RowCoefs<T> k;  // loaded where a term needs them
  T gv = T(0);
  if (den) {
    k.gl = cf[col];
    k.lser2 = cf[R + col];
    k.gmd = cf[2 * R + col];
    if constexpr (kL2) {
      k.gl2 = cf[6 * R + col];
      k.lse2r2 = cf[7 * R + col];
    }
    gv = k.template den_term<kL2>(s2, mu);
  }
  if (pos) {
    k.gpe = cf[3 * R + col];
    k.posr2 = cf[4 * R + col];
    k.gpc = cf[5 * R + col];
    gv += k.pos_term(s2);
  }
  return gv;
}

// kL2: the lse2 term (P.lse2_exp).
template <class T, class G, bool kL2>
__global__ void bwd_tile_kernel(const BwdTileArgs P) {
  constexpr int V = VecWidth<T>::value;
  const MaskSpec& M = P.mask;
  const int64_t i = blockIdx.x;
  const int64_t gr = P.r0 + i;
  T* x = static_cast<T*>(P.L) + i * P.ldl;
  const T a = *static_cast<const T*>(P.scale);
  const T b = *static_cast<const T*>(P.bias);
  const T a2 = a * T(kLog2e), b2 = b * T(kLog2e);
  const T f = static_cast<const T*>(P.gscale)[0];
  const T mu = static_cast<T>(P.lse2_mult);
  const Geom g = row_geom(M, gr);
  const RowCoefs<T> k = row_coefs<T>(P, g, gr);
  const T* cshift = static_cast<const T*>(P.cols);
  const T* ccoef = cshift != nullptr ? cshift + P.ldcol : nullptr;
  const T* cconst = cshift != nullptr ? cshift + 2 * P.ldcol : nullptr;
  const bool cexp = cshift != nullptr && P.col_exp;
  // self: the columns of the blocks on and below the diagonal; the label of gr as a column
  const int64_t end = P.self ? P.r0 + P.rows : M.C;
  const int64_t glab = (P.self && g.labels) ? M.col_labels[gr] : 0;

  T ds = T(0), db = T(0);
  // The column term of one column (s2: its logit in log2 units).
  auto col_term = [&](T s2, int64_t col) -> T {
    if (cshift == nullptr) return T(0);
    T colt = cconst[col];
    if (cexp) colt += ccoef[col] * ex2(s2 - cshift[col]);
    return colt;
  };
  // self: H = G[gr, col] + G[col, gr]; G[col, gr] counts in the sums below the diagonal block.
  auto add_transposed = [&](T gv, T l, T s2, int64_t col) -> T {
    if (!P.self || col >= end) return gv;
    const T gt = transposed_grad<T, kL2>(P, gr, col, glab, s2, mu);
    if (col < P.r0) {
      ds += gt * l;
      db += gt;
    }
    return gv + gt;
  };
  for_each_row_vector<T, G, true>(x, end, [&](int64_t c, const Pack<T, V>& v, Pack<G, V>& out) {
    if (plain_vector<V>(g, c, end)) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const T l = v.v[j];
        const T s2 = l * a2 + b2;
        const T gv = k.template den_term<kL2>(s2, mu) + col_term(s2, c + j);
        ds += gv * l;
        db += gv;
        store_as(add_transposed(gv, l, s2, c + j) * f, out.v[j]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        bool valid, allowed, pos, den;
        classify(M, g, c + j, end, valid, allowed, pos, den);
        const T l = valid ? v.v[j] : T(0);
        const T s2 = l * a2 + b2;
        T gv = (den ? k.template den_term<kL2>(s2, mu) : T(0)) +
               (allowed ? col_term(s2, c + j) : T(0));
        if (pos) gv += k.pos_term(s2);
        ds += gv * l;
        db += gv;
        store_as(add_transposed(gv, l, s2, c + j) * f, out.v[j]);
      }
    }
  });
  const SumPart sp = block_reduce(SumPart{static_cast<double>(ds), static_cast<double>(db)});
  if (threadIdx.x == 0) {
    P.row_parts[gr] = sp.ds;
    P.row_parts[M.R + gr] = sp.db;
  }
}

// Calls launch(T()) with T the kernels' statistics type for `stat`: double for fp64, else float.
template <class F>
void for_stat(DType stat, F&& launch) {
  if (stat == DType::kFloat64) {
    launch(double());
  } else {
    launch(float());
  }
}

// Calls launch(T(), std::bool_constant<l2>()): for_stat with lse2 on or off as a type.
template <class F>
void for_stat_lse2(DType stat, bool l2, F&& launch) {
  for_stat(stat, [&](auto t) {
    if (l2) {
      launch(t, std::true_type());
    } else {
      launch(t, std::false_type());
    }
  });
}

}  // namespace

int fwd_cols_block_columns(DType stat) { return stat == DType::kFloat64 ? 32 * 2 : 32 * 4; }

cudaError_t launch_fwd_rows(const FwdRowsArgs& args, DType stat, cudaStream_t stream) {
  if (args.rows <= 0) return cudaSuccess;
  if (args.lse2_mult > 0 && (args.states.t != nullptr ? args.states.e2 == nullptr
                                                       : args.out.lse2 == nullptr))
    return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(args.rows));
  for_stat_lse2(stat, args.lse2_mult > 0, [&](auto t, auto l2) {
    using T = decltype(t);
    const int threads = row_threads(args.cend, VecWidth<T>::value);
    fwd_rows_kernel<T, decltype(l2)::value><<<grid, threads, 0, stream>>>(args);
  });
  return cudaGetLastError();
}

cudaError_t launch_fwd_self_cols(const FwdRowsArgs& args, DType stat, cudaStream_t stream) {
  if (args.rows <= 0 || args.r0 <= 0) return cudaSuccess;
  if (args.states.t == nullptr || args.states.nsplit < 1) return cudaErrorInvalidValue;
  const bool l2 = args.lse2_mult > 0;
  if (l2 && args.states.e2 == nullptr) return cudaErrorInvalidValue;
  const int64_t w = fwd_cols_block_columns(stat);
  const dim3 grid(static_cast<unsigned>((args.r0 + w - 1) / w),
                  static_cast<unsigned>(args.states.nsplit));
  const dim3 block(32, kColRowLanes);
  for_stat_lse2(stat, l2, [&](auto t, auto kl2) {
    fwd_self_cols_kernel<decltype(t), decltype(kl2)::value><<<grid, block, 0, stream>>>(args);
  });
  return cudaGetLastError();
}

cudaError_t launch_row_final(const RowFinalArgs& args, DType stat, cudaStream_t stream) {
  if (args.mask.R <= 0) return cudaSuccess;
  if ((args.states.e2 != nullptr) != (args.out.lse2 != nullptr)) return cudaErrorInvalidValue;
  const int threads = 256;
  const dim3 grid(static_cast<unsigned>((args.mask.R + threads - 1) / threads));
  for_stat(stat, [&](auto t) {
    row_final_kernel<decltype(t)><<<grid, threads, 0, stream>>>(args);
  });
  return cudaGetLastError();
}

cudaError_t launch_fwd_cols(const FwdColsArgs& args, DType stat, cudaStream_t stream) {
  if (args.rows <= 0 || args.C <= 0) return cudaSuccess;
  const int64_t w = fwd_cols_block_columns(stat);
  const dim3 grid(static_cast<unsigned>((args.C + w - 1) / w), static_cast<unsigned>(args.nsplit));
  const dim3 block(32, kColRowLanes);
  for_stat(stat, [&](auto t) {
    fwd_cols_kernel<decltype(t)><<<grid, block, 0, stream>>>(args);
  });
  return cudaGetLastError();
}

cudaError_t launch_col_final(const ColFinalArgs& args, DType stat, cudaStream_t stream) {
  if (args.C <= 0) return cudaSuccess;
  const int threads = 256;
  const dim3 grid(static_cast<unsigned>((args.C + threads - 1) / threads));
  for_stat(stat, [&](auto t) {
    col_final_kernel<decltype(t)><<<grid, threads, 0, stream>>>(args);
  });
  return cudaGetLastError();
}

cudaError_t launch_bwd_prep(const BwdPrepArgs& args, DType stat, cudaStream_t stream) {
  for_stat(stat, [&](auto t) {
    bwd_prep_kernel<decltype(t)><<<1, kPrepThreads, 0, stream>>>(args);
  });
  return cudaGetLastError();
}

cudaError_t launch_bwd_coefs(const BwdTileArgs& args, DType stat, cudaStream_t stream) {
  if (args.rows <= 0) return cudaSuccess;
  if (args.coefs == nullptr) return cudaErrorInvalidValue;
  const int threads = 256;
  const dim3 grid(static_cast<unsigned>((args.rows + threads - 1) / threads));
  for_stat(stat, [&](auto t) {
    bwd_coefs_kernel<decltype(t)><<<grid, threads, 0, stream>>>(args);
  });
  return cudaGetLastError();
}

namespace {

// The tile kernel with (kL2) or without the lse2 term.
template <bool kL2>
cudaError_t launch_tile(const BwdTileArgs& args, DType stat, DType grad, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(args.rows));
  const int64_t width = args.self ? args.r0 + args.rows : args.mask.C;
  if (stat == DType::kFloat64) {
    if (grad != DType::kFloat64) return cudaErrorInvalidValue;
    bwd_tile_kernel<double, double, kL2><<<grid, row_threads(width, 2), 0, stream>>>(args);
    return cudaGetLastError();
  }
  const int threads = row_threads(width, 4);
  switch (grad) {
    case DType::kFloat32:
      bwd_tile_kernel<float, float, kL2><<<grid, threads, 0, stream>>>(args);
      break;
    case DType::kBFloat16:
      bwd_tile_kernel<float, __nv_bfloat16, kL2><<<grid, threads, 0, stream>>>(args);
      break;
    case DType::kFloat16:
      bwd_tile_kernel<float, __half, kL2><<<grid, threads, 0, stream>>>(args);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_bwd_tile(const BwdTileArgs& args, DType stat, DType grad, cudaStream_t stream) {
  if (args.rows <= 0) return cudaSuccess;
  if (args.self && (args.coefs == nullptr || args.cols != nullptr)) return cudaErrorInvalidValue;
  if (args.lse2_exp && (args.g_lse2 == nullptr || args.lse2 == nullptr || !(args.lse2_mult > 0)))
    return cudaErrorInvalidValue;
  if (args.lse2_exp) return launch_tile<true>(args, stat, grad, stream);
  return launch_tile<false>(args, stat, grad, stream);
}

}  // namespace cuda
}  // namespace fastcl
