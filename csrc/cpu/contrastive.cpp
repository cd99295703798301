// CPU backend of the fused contrastive primitive.
//
// Schedule: the rows of q are processed in slabs of S rows, S chosen so that the S x C slab of
// raw dot products l = q_r . k_c fits a fixed byte budget (slab_bytes(), 64 MiB by default; it
// does not grow with R). One GEMM per slab (at::mm_out into a reused buffer, fp32 or fp64), then
// fused row kernels (contrastive_rows.h) run under at::parallel_for, one chunk of rows per thread:
//
// - forward: per tile of rows x columns, a pass for the row maxima (and the tile's column maxima)
//   and a pass for the sums of exponentials, merged online into running row statistics and into
//   each chunk's running column statistics; the chunks' column statistics are merged in chunk
//   order at the end, so one sweep gives row and column LSEs. Means need no pass over the logits:
//   sum_c s_rc = scale * q_r . sum_c k_c + C * bias (fp64), minus the excluded entries.
//   lse2 (lse2_mult = mu > 0) shares lse's running max m: one more running sum per row,
//   sum 2^(mu (s - m)) (rescaled by 2^(mu (m_old - m_new)) where lse's sum is by
//   2^(m_old - m_new)), with one more exponential per element only when it is on.
//   Without k (self-similarity, q . q^T symmetric) the logits are computed on the blocks on and
//   below the diagonal only (half a GEMM): the rows before a slab take their statistics over the
//   slab's columns from its transposed left part (FwdSweep).
// - backward: the slab's logits are recomputed and turned in place into G (one pass, the formula
//   of fastcl/reference/contrastive.py, also summing G and G * l for dbias and dscale), then
//   dq_slab = scale * G @ k and dk += scale * G.T @ q_slab (addmm); the lse2 term of G takes
//   one more exponential per element, only for the rows where g_lse2 is given and nonzero.
//   Without k (self-similarity, q . q^T symmetric) the gradient GEMMs run on the blocks on and
//   below the diagonal only, with G + G.T (BwdSweep): one GEMM's worth for the gradient instead
//   of two, and the logits are recomputed on those blocks only (half a GEMM).
// - fused (row statistics only, gradients of the statistics known before the forward): each
//   slab serves the forward row kernel and then, in place, the backward one, since a slab holds
//   whole rows; three GEMMs per slab instead of the four of a forward and a backward. Without k
//   (self-similarity, q . q^T symmetric) the gradient GEMMs run on the blocks on and below the
//   diagonal only, with G + G.T (BwdSweep): two GEMMs' worth in all.
//
// Logits are handled in log2 units (scale and bias premultiplied by log2 e) so that every
// exponential is a 2^x; where the maxima of a tile are close enough, one 2^(s - M) per element
// serves both the row and the column direction.
//
// Nothing of size R x C is held: the extra memory is one slab, fp32 copies of k (when k is not
// fp32) and of one q slab, the gradient accumulator of k, and O(R + C) statistics.
#include "contrastive.h"

#include "common.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace fastcl {
namespace cpu {
namespace {

using namespace detail;

constexpr int64_t kDefaultSlabBytes = int64_t(64) << 20;
// Forward tiles (rows x columns) sized for the L2 cache: the second pass re-reads the tile.
constexpr int kRowBlock = 32;
constexpr int64_t kColBlock = 2048;
// Backward tiles: one pass; the sizes set how often the per-row / per-column factors are made.
constexpr int kBwdRowBlock = 64;
constexpr int64_t kBwdColBlock = 1024;
// Self-similarity: columns per chunk of the slab's part before the diagonal block.
constexpr int64_t kSelfChunk = 32;
// Self-similarity: slabs at least (where the rows allow), so that the sweeps compute about
// (1 + 1/8) / 2 of the square even where one slab would hold every row.
constexpr int64_t kSelfSlabs = 8;

// Columns of row gr that are special: the excluded diagonal (dcol), the target (tcol, target
// mode), the row's label class (rid, label mode); -1 when absent.
struct RowGeom {
  int64_t dcol, tcol, rid;
};

template <class T>
T exp_span();

// What the forward and the backward sweeps both read: shape, scale, flags and masks.
template <class T>
struct TileArgs {
  using I = typename Lanes<T>::I;
  int64_t R, C, r0;
  T a, b;                  // scale and bias
  T a2, b2;                // the same times log2(e): the kernels work in log2 units
  T span;                  // widest spread of maxima (log2 units) for one shared shift per tile
  bool exclude_diag, decoupled, pos_lse, labels;
  const int64_t* targets;  // [R] or nullptr
  const I* row_id;         // label mode: class of each row (-1: no column has its label)
  const I* col_id;         // label mode: class of each column (padded with -1)

  void set(int64_t R_, int64_t C_, double scale, double bias, bool exclude_diag_,
           bool decoupled_, bool pos_lse_, bool labels_, const at::Tensor& tg,
           const std::vector<I>& rid, const std::vector<I>& cid) {
    R = R_;
    C = C_;
    r0 = 0;
    a = static_cast<T>(scale);
    b = static_cast<T>(bias);
    a2 = static_cast<T>(scale * kLog2e);
    b2 = static_cast<T>(bias * kLog2e);
    span = exp_span<T>();
    exclude_diag = exclude_diag_;
    decoupled = decoupled_;
    pos_lse = pos_lse_;
    labels = labels_;
    targets = tg.defined() ? tg.data_ptr<int64_t>() : nullptr;
    row_id = labels ? rid.data() : nullptr;
    col_id = labels ? cid.data() : nullptr;
  }
};

// A row's running forward state over some of its columns (log2 units, as the kernels keep it).
template <class T>
struct RowState {
  T m, se;       // denominator set: max and sum of 2^(s2 - max)
  T se2;         // lse2 (mu = lse2_mult > 0): sum of 2^(mu (s2 - m)) over the same set
  T pm, pse;     // positives (label mode, pos_lse): max and sum of 2^(s2 - max)
  double psum;   // positives (label mode): sum of s, natural units
  double pcnt;   // positives (label mode): count
  double tl;     // target mode: the target's logit s (0 until its column is seen)

  static RowState empty() {
    const T ninf = -std::numeric_limits<T>::infinity();
    return {ninf, T(0), T(0), ninf, T(0), 0.0, 0.0, 0.0};
  }
  // e2 (lse2 on): se2 is merged too, with the args' mu (defined after lse_merge_scalar)
  void merge(const RowState& o, bool e2, T mu);
};

template <class T>
struct FwdArgs : TileArgs<T> {
  bool col_stats;
  // lse2: mu = lse2_mult (0: off, lse2 nullptr), in the kernels' dtype and in fp64 (finish_row)
  T mu;
  double mu_d;
  // Slab of raw dot products, row-major, padded: row b at L + b * ld holds columns
  // [cbeg, cend), column c at index c - cbeg (cbeg a multiple of the vector width).
  const T* L;
  int64_t ld, cbeg, cend;
  T *lse, *pos, *npos, *mean;
  T* lse2;  // [R], or nullptr when lse2 is off
  // nullptr: the rows' statistics are final when the kernel ends (every column in the range);
  // else the kernel merges each row's partial state into run[row].
  RowState<T>* run;
};

template <class T>
struct BwdArgs : TileArgs<T> {
  // Slab: raw dot products in, G out; row b at L + b * ld holds columns [cbeg, cend), column c
  // at index c - cbeg (cbeg a multiple of the vector width).
  T* L;
  int64_t ld, cbeg, cend;
  const T *g_lse, *g_pos, *g_mean;  // [R] or nullptr
  const T *lse, *pos, *npos;        // [R]
  // lse2 term (mu = lse2_mult): g_lse2 (nullptr: no term) and the saved lse2, both [R]
  const T *g_lse2, *lse2;
  T mu;
  // Per column, padded by one vector:
  const T* col_lse;                 // saved column LSE in log2 units (0 where it is -inf)
  const T* g_col_lse;               // g_col_lse (0 where the column LSE is -inf) or nullptr
  const T* g_col_mean;              // g_col_mean / |allowed(:, c)| (zeros when absent)
  // Per backward column block, over columns with g_col_lse != 0: max and min of col_lse.
  const T* cb_max;
  const T* cb_min;
};

template <class A>
inline RowGeom row_geom(const A& P, int64_t gr) {
  RowGeom g;
  g.dcol = (P.exclude_diag && gr < P.C) ? gr : -1;
  g.tcol = -1;
  g.rid = -1;
  if (P.labels) {
    g.rid = P.row_id[gr];
  } else if (P.targets != nullptr) {
    const int64_t t = P.targets[gr];
    if (t >= 0 && t < P.C && t != g.dcol) g.tcol = t;
  }
  return g;
}

// Running (max, sum of 2^(x - max)) merged with a partial (pm, ps), ps relative to pm; log2 units.
// kL2: a second sum s2 of 2^(mu (x - m)) too (relative to the same max m), ps2 relative to pm:
// its rescaling factors are those of s raised to mu.
template <bool kL2, class T>
inline void lse_merge_scalar(T& m, T& s, T& s2, T pm, T ps, T ps2, T mu) {
  const T ninf = -std::numeric_limits<T>::infinity();
  if (!(pm > ninf)) return;
  if constexpr (kL2) {
    if (!(m > ninf)) {  // nothing yet (and no mu * -inf)
      m = pm;
      s = ps;
      s2 = ps2;
      return;
    }
  }
  if (pm > m) {
    const T d = m - pm;
    s = s * std::exp2(d) + ps;
    if constexpr (kL2) s2 = s2 * std::exp2(mu * d) + ps2;
    m = pm;
  } else {
    const T d = pm - m;
    s += ps * std::exp2(d);
    if constexpr (kL2) s2 += ps2 * std::exp2(mu * d);
  }
}

// lse_merge_scalar without s2.
template <class T>
inline void lse_merge_scalar(T& m, T& s, T pm, T ps) {
  lse_merge_scalar<false, T>(m, s, s, pm, ps, T(0), T(0));
}

template <class T>
void RowState<T>::merge(const RowState& o, bool e2, T mu) {
  if (e2)
    lse_merge_scalar<true, T>(m, se, se2, o.m, o.se, o.se2, mu);
  else
    lse_merge_scalar<T>(m, se, o.m, o.se);
  lse_merge_scalar<T>(pm, pse, o.pm, o.pse);
  psum += o.psum;
  pcnt += o.pcnt;
  tl += o.tl;
}

// Final statistics of row gr (geometry g) from its state over every column: lse, pos, npos and,
// in mean, the sum of s over the row's positives (the sweep completes the mean).
template <class T>
inline void finish_row(const FwdArgs<T>& P, int64_t gr, const RowGeom& g, const RowState<T>& st) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const double npos = P.labels ? st.pcnt : (g.tcol >= 0 ? 1.0 : 0.0);
  P.npos[gr] = static_cast<T>(npos);
  P.lse[gr] = st.m > ninf ? static_cast<T>((static_cast<double>(st.m) +
                                            std::log2(static_cast<double>(st.se))) * kLn2)
                          : ninf;
  // lse2 = mu m + log(se2) (se2 >= 1 where the set is not empty: its maximum gives 2^0)
  if (P.lse2 != nullptr)
    P.lse2[gr] = st.m > ninf ? static_cast<T>((P.mu_d * static_cast<double>(st.m) +
                                               std::log2(static_cast<double>(st.se2))) * kLn2)
                             : ninf;
  P.mean[gr] = static_cast<T>(P.labels ? st.psum : st.tl);
  if (npos <= 0) {
    P.pos[gr] = T(0);
  } else if (!P.labels) {
    P.pos[gr] = static_cast<T>(st.tl);
  } else if (P.pos_lse) {
    P.pos[gr] = static_cast<T>(
        (static_cast<double>(st.pm) + std::log2(static_cast<double>(st.pse))) * kLn2);
  } else {
    P.pos[gr] = static_cast<T>(st.psum / npos);
  }
}

#define FASTCL_ROWS_HEADER "contrastive_rows.h"
#include "isa_variants.h"

template <class T>
struct Kernels {
  void (*fwd)(const FwdArgs<T>&, int64_t, int64_t, T*, T*, T*, T*);
  void (*bwd)(const BwdArgs<T>&, int64_t, int64_t, double*, double*, T*);
};

template <class T>
Kernels<T> kernels() {
  return {FASTCL_ISA_SELECT(fwd_rows<T>), FASTCL_ISA_SELECT(bwd_rows<T>)};
}

// Dense class ids of the labels: columns get 0..n-1, a row gets its label's id or -1.
template <class I>
void label_ids(const at::Tensor& row_labels, const at::Tensor& col_labels, std::vector<I>& rid,
               std::vector<I>& cid) {
  const at::Tensor rl = row_labels.to(at::kLong).contiguous();
  const at::Tensor cl = col_labels.to(at::kLong).contiguous();
  const int64_t R = rl.numel(), C = cl.numel();
  const int64_t* rp = rl.data_ptr<int64_t>();
  const int64_t* cp = cl.data_ptr<int64_t>();
  std::unordered_map<int64_t, I> ids;
  ids.reserve(static_cast<size_t>(C));
  cid.resize(static_cast<size_t>(C));
  rid.resize(static_cast<size_t>(R));
  for (int64_t c = 0; c < C; ++c)
    cid[c] = ids.emplace(cp[c], static_cast<I>(ids.size())).first->second;
  for (int64_t r = 0; r < R; ++r) {
    const auto it = ids.find(rp[r]);
    rid[r] = it == ids.end() ? I(-1) : it->second;
  }
}

// Largest spread between the maxima of a tile for which one shared shift M serves every exp of
// the tile: exp(x - M) then stays a normal number for every maximum x (fp32: e^-60 >> 1e-38).
// FASTCL_CPU_EXP_SPAN overrides it (a negative value always takes separate shifts). Returned in
// log2 units.
template <class T>
T exp_span() {
  double v = std::is_same<T, double>::value ? 600.0 : 60.0;
  const char* env = std::getenv("FASTCL_CPU_EXP_SPAN");
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const double e = std::strtod(env, &end);
    if (end != env) v = e;
  }
  return static_cast<T>(v * kLog2e);
}

// What every sweep over row slabs shares: k in the statistics dtype, the label ids or targets,
// the slab size and the slab buffer (S x C raw dot products, padded by one vector).
template <class T>
struct Slabs {
  using I = typename Lanes<T>::I;
  static constexpr int W = Lanes<T>::W;
  int64_t R, C, D, S;
  at::ScalarType st;
  at::TensorOptions opt;
  bool labels;
  std::vector<I> rid, cid;
  at::Tensor tg, kf, buf;

  // align: a multiple the slab size must be (unless one slab holds every row); min_slabs: at
  // least that many slabs where the rows allow (the self-similarity sweeps skip the blocks
  // above the diagonal between slabs only: with n slabs they compute (n + 1) / 2n of the square).
  Slabs(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& targets,
        const std::optional<at::Tensor>& row_labels, const std::optional<at::Tensor>& col_labels,
        int64_t align = 1, int64_t min_slabs = 1)
      : R(q.size(0)), C(k.size(0)), D(q.size(1)), st(scalar_type_of<T>()),
        opt(q.options().dtype(st)),
        labels(row_labels.has_value() && col_labels.has_value()) {
    if (labels) {
      label_ids<I>(*row_labels, *col_labels, rid, cid);
      cid.resize(static_cast<size_t>(C + W), I(-1));
    } else if (targets.has_value()) {
      tg = targets->to(at::kLong).contiguous();
    }
    kf = k.to(st).contiguous();
    S = std::min(slab_rows(R, C, sizeof(T)),
                 std::max<int64_t>(1, (R + min_slabs - 1) / min_slabs));
    if (S < R) S = std::max(align, S / align * align);
    buf = at::empty({R > 0 ? S * C + W : 0}, opt);
    if (buf.numel() > 0) buf.narrow(0, S * C, W).zero_();  // read by the last vector, masked
  }

  // Rows r0 .. r0 + s of q in the statistics dtype, and their dot products with every key
  // (computed into the slab buffer, row stride C), or with the first `ncols` keys only.
  std::pair<at::Tensor, at::Tensor> slab(const at::Tensor& q, int64_t r0, int64_t s,
                                         int64_t ncols = -1) {
    at::Tensor qs = q.narrow(0, r0, s).to(st).contiguous();
    at::Tensor Ls = buf.narrow(0, 0, s * C).view({s, C});
    if (ncols >= 0 && ncols < C) {
      at::Tensor part = Ls.narrow(1, 0, ncols);
      at::mm_out(part, qs, kf.narrow(0, 0, ncols).t());
    } else {
      at::mm_out(Ls, qs, kf.t());
    }
    return {qs, Ls};
  }

  template <class A>
  void set(A& P, double scale, double bias, bool exclude_diag, bool decoupled, bool pos_lse) const {
    P.set(R, C, scale, bias, exclude_diag, decoupled, pos_lse, labels, tg, rid, cid);
  }
};

// dst[j][i] (+)= src[i][j] for i < n, j < m (row strides lds, ldd), in cache blocks.
template <bool ADD, class T>
void transpose(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t n, int64_t m) {
  constexpr int64_t B = 16;
  for (int64_t i0 = 0; i0 < n; i0 += B) {
    const int64_t i1 = std::min(n, i0 + B);
    for (int64_t j = 0; j < m; ++j) {
      T* d = dst + j * ldd;
      for (int64_t i = i0; i < i1; ++i) {
        if (ADD)
          d[i] += src[i * lds + j];
        else
          d[i] = src[i * lds + j];
      }
    }
  }
}

// The forward over slabs: row statistics per slab, column statistics merged at the end.
//
// Self-similarity (`self`: the keys are the queries, the logits symmetric; no column
// statistics): the slab of rows I holds the dot products of the columns up to its end only
// (half of the logits). Its rows take their states over those columns; the columns before the
// slab, transposed in chunks of kSelfChunk, give the rows before the slab their states over the
// columns I, through the same row kernel. Every row's state is merged slab after slab, in slab
// order whatever the threads' schedule, and finished after the last one.
template <class T>
struct FwdSweep {
  static constexpr int W = Lanes<T>::W;
  Slabs<T>& sl;
  bool exclude_diag, decoupled, col_stats, self;
  at::Tensor lse, pos, npos, mean, col_lse, col_mean, lse2;
  at::Tensor ksum, qsum;
  std::vector<double> sdiag;
  std::vector<double> rsum;          // self: q_r . ksum of every row, for the means
  std::vector<RowState<T>> run;      // self: every row's running state
  int64_t nchunks, per_chunk;
  std::vector<T> cstate;
  FwdArgs<T> P;
  Kernels<T> K;

  // lse2_mult > 0: lse2 too (else it is empty)
  FwdSweep(Slabs<T>& s, double scale, double bias, bool exclude_diag_, bool decoupled_,
           bool pos_lse, bool col_stats_, bool self_ = false, double lse2_mult = 0.0)
      : sl(s), exclude_diag(exclude_diag_), decoupled(decoupled_), col_stats(col_stats_),
        self(self_ && !col_stats_), K(kernels<T>()) {
    const T ninf = -std::numeric_limits<T>::infinity();
    const int64_t R = sl.R, C = sl.C;
    lse = at::empty({R}, sl.opt);
    pos = at::empty({R}, sl.opt);
    npos = at::empty({R}, sl.opt);
    mean = at::empty({R}, sl.opt);
    col_lse = at::empty({col_stats ? C : 0}, sl.opt);
    col_mean = at::empty({col_stats ? C : 0}, sl.opt);
    const bool e2 = lse2_mult > 0;
    lse2 = at::empty({e2 ? R : 0}, sl.opt);
    // Sum of the keys in fp64: row sums of s (for the means) are q_r . ksum, no pass over s.
    const auto dopt = sl.opt.dtype(at::kDouble);
    ksum = at::zeros({sl.D}, dopt);
    for (int64_t c0 = 0; c0 < C; c0 += 4096)
      ksum.add_(sl.kf.narrow(0, c0, std::min<int64_t>(4096, C - c0)).to(at::kDouble).sum(0));
    qsum = at::zeros({sl.D}, dopt);
    sdiag.resize(static_cast<size_t>(exclude_diag ? std::min(R, C) : 0));
    sl.set(P, scale, bias, exclude_diag, decoupled, pos_lse);
    P.col_stats = col_stats;
    P.L = nullptr;
    P.ld = C;
    P.cbeg = 0;
    P.cend = C;
    P.run = nullptr;
    if (self) {
      run.assign(static_cast<size_t>(R), RowState<T>::empty());
      rsum.resize(static_cast<size_t>(R));
    }
    P.lse = lse.data_ptr<T>();
    P.pos = pos.data_ptr<T>();
    P.npos = npos.data_ptr<T>();
    P.mean = mean.data_ptr<T>();
    P.lse2 = e2 ? lse2.data_ptr<T>() : nullptr;
    P.mu = e2 ? static_cast<T>(lse2_mult) : T(0);
    P.mu_d = e2 ? lse2_mult : 0.0;
    // Per chunk: running column max and sum (C + W each), tile scratch (kColBlock + W each).
    nchunks = num_chunks(sl.S);
    per_chunk = 2 * (C + W) + 2 * (kColBlock + W);
    cstate.resize(static_cast<size_t>(col_stats ? nchunks * per_chunk : 0));
    for (int64_t t = 0; t < (col_stats ? nchunks : 0); ++t) {
      T* base = cstate.data() + t * per_chunk;
      std::fill(base, base + C + W, ninf);
      std::fill(base + C + W, base + per_chunk, T(0));
    }
  }

  // Statistics of rows r0 .. r0 + s from their slab (qs, Ls) of raw dot products (self: states,
  // from the columns up to r0 + s).
  void slab(int64_t r0, int64_t s, const at::Tensor& qs, const at::Tensor& Ls) {
    const int64_t C = sl.C;
    P.r0 = r0;
    P.L = Ls.data_ptr<T>();
    if (self) {
      self_slab(r0, s);
    } else {
      const int64_t nc = std::min(nchunks, s);
      T* cs = cstate.data();
      at::parallel_for(0, nc, 1, [&](int64_t cb, int64_t ce) {
        for (int64_t t = cb; t < ce; ++t) {
          T* base = col_stats ? cs + t * per_chunk : nullptr;
          T* cm = base;
          T* cse = col_stats ? base + (C + W) : nullptr;
          T* tcm = col_stats ? base + 2 * (C + W) : nullptr;
          T* tcs = col_stats ? tcm + (kColBlock + W) : nullptr;
          K.fwd(P, s * t / nc, s * (t + 1) / nc, cm, cse, tcm, tcs);
        }
      });
    }
    // Means: sum over the denominator set = sum over all columns (q_r . ksum, fp64) minus the
    // excluded diagonal and, decoupled, the positives (the kernel left their sum in mean):
    // completed here, or (self) once the positives are complete, in finish().
    const double a = static_cast<double>(P.a), b = static_cast<double>(P.b);
    const at::Tensor qd = qs.to(at::kDouble);
    const at::Tensor rs = at::mv(qd, ksum).contiguous();
    qsum.add_(qd.sum(0));
    const int64_t nd = exclude_diag ? std::max<int64_t>(0, std::min(s, C - r0)) : 0;
    at::Tensor dd;
    if (nd > 0)
      dd = (qd.narrow(0, 0, nd) * sl.kf.narrow(0, r0, nd).to(at::kDouble)).sum(1).contiguous();
    const double* rsp = rs.data_ptr<double>();
    for (int64_t i = 0; i < nd; ++i) sdiag[r0 + i] = a * dd.data_ptr<double>()[i] + b;
    for (int64_t i = 0; i < s; ++i) {
      if (self)
        rsum[r0 + i] = rsp[i];
      else
        complete_mean(r0 + i, rsp[i]);
    }
  }

  // Self-similarity, rows I = r0 .. r0 + s (r0 a multiple of W), the slab holding the columns
  // up to r0 + s: the states of rows I over those columns, then those of the rows before the
  // slab over the columns I (the slab's left part transposed, chunk by chunk, each thread with
  // its own chunks and so its own rows).
  void self_slab(int64_t r0, int64_t s) {
    const int64_t C = sl.C, e = r0 + s;
    P.cbeg = 0;
    P.cend = e;
    P.run = run.data();
    const int64_t nc = std::min(nchunks, s);
    at::parallel_for(0, nc, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t t = cb; t < ce; ++t)
        K.fwd(P, s * t / nc, s * (t + 1) / nc, nullptr, nullptr, nullptr, nullptr);
    });
    const int64_t lt = round_up(s, W) + 2 * W;  // padded: no power-of-two stride in the cache
    const int64_t nch = (r0 + kSelfChunk - 1) / kSelfChunk;
    const T* L = P.L;
    at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
      std::vector<T> tt(static_cast<size_t>(kSelfChunk * lt + W), T(0));
      FwdArgs<T> Q = P;
      Q.L = tt.data();
      Q.ld = lt;
      Q.cbeg = r0;
      Q.cend = e;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t j0 = c * kSelfChunk, nj = std::min(kSelfChunk, r0 - j0);
        transpose<false>(L + j0, C, tt.data(), lt, s, nj);
        Q.r0 = j0;
        K.fwd(Q, 0, nj, nullptr, nullptr, nullptr, nullptr);
      }
    });
  }

  // mean[r] from the row's sum over all columns (rs = q_r . ksum) once its positives are known.
  void complete_mean(int64_t r, double rs) {
    const int64_t C = sl.C;
    const double a = static_cast<double>(P.a), b = static_cast<double>(P.b);
    double sum = a * rs + b * static_cast<double>(C);
    double nden = static_cast<double>(C);
    if (exclude_diag && r < C) {
      sum -= sdiag[r];
      nden -= 1.0;
    }
    if (decoupled) {
      sum -= static_cast<double>(P.mean[r]);
      nden -= static_cast<double>(P.npos[r]);
    }
    P.mean[r] = nden > 0 ? static_cast<T>(sum / nden) : T(0);
  }

  // Self: every row's statistics from its state. Else the column statistics from the chunks'
  // running states. After the last slab.
  void finish() {
    if (self) {
      at::parallel_for(0, sl.R, 4096, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          finish_row(P, r, row_geom(P, r), run[static_cast<size_t>(r)]);
          complete_mean(r, rsum[static_cast<size_t>(r)]);
        }
      });
      return;
    }
    if (!col_stats) return;
    const T ninf = -std::numeric_limits<T>::infinity();
    const int64_t R = sl.R, C = sl.C;
    const double a = static_cast<double>(P.a), b = static_cast<double>(P.b);
    T* cl = col_lse.data_ptr<T>();
    T* cmn = col_mean.data_ptr<T>();
    const int64_t nc = std::min(nchunks, R);
    // Column sums of s: k_c . qsum (fp64) in blocks of rows of k.
    at::Tensor csum = at::empty({C}, sl.opt.dtype(at::kDouble));
    for (int64_t c0 = 0; c0 < C; c0 += 4096) {
      const int64_t n = std::min<int64_t>(4096, C - c0);
      csum.narrow(0, c0, n).copy_(at::mv(sl.kf.narrow(0, c0, n).to(at::kDouble), qsum));
    }
    const double* csp = csum.data_ptr<double>();
    const T* cs = cstate.data();
    const int64_t pc = per_chunk;
    at::parallel_for(0, C, 2048, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        T m = ninf, e = T(0);
        for (int64_t t = 0; t < nc; ++t) {
          const T* base = cs + t * pc;
          lse_merge_scalar<T>(m, e, base[c], base[C + W + c]);
        }
        cl[c] = m > ninf ? static_cast<T>((static_cast<double>(m) +
                                           std::log2(static_cast<double>(e))) * kLn2)
                         : ninf;
        double sum = a * csp[c] + b * static_cast<double>(R);
        double cnt = static_cast<double>(R);
        if (exclude_diag && c < R) {
          sum -= sdiag[c];
          cnt -= 1.0;
        }
        cmn[c] = cnt > 0 ? static_cast<T>(sum / cnt) : T(0);
      }
    });
  }
};

// The backward over slabs: each slab of raw dot products turned into G in place, then
// dq_slab = scale * G @ k and dk += scale * G.T @ q_slab. dq and dk are accumulated in the
// statistics dtype (in dq / dk themselves when their dtype and layout allow) and scaled by
// `norm` when finished.
//
// Self-similarity (`self`: the keys are the queries, so the logits are symmetric and
// dz = scale * (G + G.T) @ z): a slab of rows I, once its row statistics are known, yields
// H = G + G.T on the blocks (I, J) with J <= I only, since every row before the slab has its
// statistics already: G(I, <=I) from the slab's rows, G(<I, I) from the transposed left part of
// the slab run through the same row kernel (rows < I against columns I), H(I, <I) = G(I, <I) +
// G(<I, I).T and H(I, I) = G(I, I) + G(I, I).T. Then dz_I = scale * H(I, <=I) @ z_<=I and
// dz_<I += scale * H(I, <I).T @ z_I: half of the gradient GEMMs of two separate feature sets.
template <class T>
struct BwdSweep {
  static constexpr int W = Lanes<T>::W;
  Slabs<T>& sl;
  const at::Tensor& q;
  const at::Tensor& k;
  double scale;
  bool self;
  at::Tensor dq, dk, dq_acc, dk_acc;
  std::vector<T> clse_v, gcl_v, gcm_v, cb_max, cb_min, scratch;
  std::vector<double> db, ds;
  double dscale_acc = 0.0, dbias_acc = 0.0;
  int64_t nchunks;
  BwdArgs<T> P;
  Kernels<T> K;

  // g_* are in the statistics dtype (or undefined); lse, pos and npos too, and are read only
  // when slab() runs, so a fused caller may fill them slab by slab. gl2 (g_lse2, or undefined:
  // no lse2 term) and lse2 are in the statistics dtype too, lse2_mult > 0 where gl2 is given.
  BwdSweep(Slabs<T>& s, const at::Tensor& q_, const at::Tensor& k_, double scale_, double bias,
           const at::Tensor& gl, const at::Tensor& gp, const at::Tensor& gm,
           const at::Tensor& gcl, const at::Tensor& gcm, const at::Tensor& lse,
           const at::Tensor& pos, const at::Tensor& npos, const at::Tensor& col_lse,
           bool exclude_diag, bool decoupled, bool pos_lse, bool self_ = false,
           const at::Tensor& gl2 = at::Tensor(), const at::Tensor& lse2 = at::Tensor(),
           double lse2_mult = 0.0)
      : sl(s), q(q_), k(k_), scale(scale_), self(self_), K(kernels<T>()) {
    const T ninf = -std::numeric_limits<T>::infinity();
    const int64_t R = sl.R, C = sl.C, D = sl.D;
    // Per-column terms, padded by one vector; an empty column (LSE -inf) has no gradient.
    clse_v.assign(static_cast<size_t>(C + W), T(0));
    gcm_v.assign(static_cast<size_t>(C + W), T(0));
    const int64_t nblocks = (C + kBwdColBlock - 1) / kBwdColBlock;
    cb_max.assign(static_cast<size_t>(nblocks), ninf);
    cb_min.assign(static_cast<size_t>(nblocks), ninf);
    if (gcl.defined()) {
      gcl_v.assign(static_cast<size_t>(C + W), T(0));
      const at::Tensor cl = col_lse.to(sl.st).contiguous();
      const T* clp = cl.data_ptr<T>();
      const T* g = gcl.data_ptr<T>();
      for (int64_t c = 0; c < C; ++c) {
        const bool ok = clp[c] > ninf;
        clse_v[c] = ok ? static_cast<T>(static_cast<double>(clp[c]) * kLog2e) : T(0);
        gcl_v[c] = ok ? g[c] : T(0);
        if (gcl_v[c] != T(0)) {
          T& mx = cb_max[c / kBwdColBlock];
          T& mn = cb_min[c / kBwdColBlock];
          if (!(mx > ninf)) {
            mx = mn = clse_v[c];
          } else {
            mx = clse_v[c] > mx ? clse_v[c] : mx;
            mn = clse_v[c] < mn ? clse_v[c] : mn;
          }
        }
      }
    }
    if (gcm.defined()) {
      const T* g = gcm.data_ptr<T>();
      for (int64_t c = 0; c < C; ++c) {
        const double cnt = static_cast<double>(R) - ((exclude_diag && c < R) ? 1.0 : 0.0);
        gcm_v[c] = cnt > 0 ? static_cast<T>(g[c] / cnt) : T(0);
      }
    }
    dq = at::empty_like(q);
    dq_acc = (q.scalar_type() == sl.st && dq.is_contiguous()) ? dq : at::empty({R, D}, sl.opt);
    if (!self) {
      dk = at::empty_like(k);
      dk_acc = (k.scalar_type() == sl.st && dk.is_contiguous()) ? dk : at::empty({C, D}, sl.opt);
      dk_acc.zero_();
    }

    sl.set(P, scale, bias, exclude_diag, decoupled, pos_lse);
    P.L = nullptr;
    P.ld = C;
    P.cbeg = 0;
    P.cend = C;
    P.g_lse = gl.defined() ? gl.data_ptr<T>() : nullptr;
    P.g_pos = gp.defined() ? gp.data_ptr<T>() : nullptr;
    P.g_mean = gm.defined() ? gm.data_ptr<T>() : nullptr;
    P.lse = lse.data_ptr<T>();
    P.pos = pos.data_ptr<T>();
    P.npos = npos.data_ptr<T>();
    P.g_lse2 = gl2.defined() ? gl2.data_ptr<T>() : nullptr;
    P.lse2 = gl2.defined() ? lse2.data_ptr<T>() : nullptr;
    P.mu = gl2.defined() ? static_cast<T>(lse2_mult) : T(0);
    P.col_lse = clse_v.data();
    P.g_col_lse = gcl.defined() ? gcl_v.data() : nullptr;
    P.g_col_mean = gcm_v.data();
    P.cb_max = cb_max.data();
    P.cb_min = cb_min.data();
    nchunks = num_chunks(sl.S);
    scratch.resize(static_cast<size_t>(nchunks * (kBwdColBlock + W)));
    db.resize(static_cast<size_t>(sl.S));
    ds.resize(db.size());
  }

  // G of n rows, rows r0 .. r0 + n of q, from P's slab and column range; their sums of G and of
  // G * l go to dbias and dscale.
  void rows(int64_t r0, int64_t n) {
    P.r0 = r0;
    const int64_t nc = std::min(nchunks, n);
    T* scr = scratch.data();
    at::parallel_for(0, nc, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t t = cb; t < ce; ++t)
        K.bwd(P, n * t / nc, n * (t + 1) / nc, db.data(), ds.data(),
              scr + t * (kBwdColBlock + W));
    });
    for (int64_t i = 0; i < n; ++i) {
      dbias_acc += db[i];
      dscale_acc += ds[i];
    }
  }

  // Rows r0 .. r0 + s: Ls (raw dot products) becomes G; their gradient terms are accumulated.
  void slab(int64_t r0, int64_t s, const at::Tensor& qs, const at::Tensor& Ls) {
    if (self) return self_slab(r0, s, qs, Ls);
    P.L = Ls.data_ptr<T>();
    rows(r0, s);
    at::Tensor dqs = dq_acc.narrow(0, r0, s);
    at::mm_out(dqs, Ls, sl.kf);  // G @ k
    dqs.mul_(scale);
    dk_acc.addmm_(Ls.t(), qs, 1.0, scale);
  }

  // Self-similarity, rows I = r0 .. r0 + s (r0 a multiple of W): Ls becomes H(I, <=I).
  // The columns before the slab go in chunks of kSelfChunk, each thread with its own: the
  // chunk's raw dot products transposed into a scratch block, G(I, chunk) in place, G(chunk, I)
  // in the scratch block, which is then added transposed; all of it while the chunk is in
  // cache. Partial sums of G per chunk are added in chunk order (results do not depend on
  // scheduling).
  void self_slab(int64_t r0, int64_t s, const at::Tensor& qs, const at::Tensor& Ls) {
    const int64_t C = sl.C, e = r0 + s;
    const int64_t lt = round_up(s, W) + 2 * W;  // padded: no power-of-two stride in the cache
    T* L = Ls.data_ptr<T>();
    const int64_t nch = (r0 + kSelfChunk - 1) / kSelfChunk;
    std::vector<double> cdb(static_cast<size_t>(nch)), cds(static_cast<size_t>(nch));
    at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
      std::vector<T> tt(static_cast<size_t>(kSelfChunk * lt + W));
      std::vector<T> fcg(static_cast<size_t>(kBwdColBlock + W));
      std::vector<double> rdb(static_cast<size_t>(std::max(s, kSelfChunk)));
      std::vector<double> rds(rdb.size());
      BwdArgs<T> Q = P;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t j0 = c * kSelfChunk, nj = std::min(kSelfChunk, r0 - j0);
        transpose<false>(L + j0, C, tt.data(), lt, s, nj);
        double db_c = 0.0, ds_c = 0.0;
        // G(I, chunk) in place, then G(chunk, I) in the scratch block
        const std::pair<T*, int64_t> passes[2] = {{L + j0, C}, {tt.data(), lt}};
        for (int pass = 0; pass < 2; ++pass) {
          Q.L = passes[pass].first;
          Q.ld = passes[pass].second;
          Q.r0 = pass == 0 ? r0 : j0;
          Q.cbeg = pass == 0 ? j0 : r0;
          Q.cend = pass == 0 ? j0 + nj : e;
          const int64_t n = pass == 0 ? s : nj;
          K.bwd(Q, 0, n, rdb.data(), rds.data(), fcg.data());
          for (int64_t i = 0; i < n; ++i) {
            db_c += rdb[i];
            ds_c += rds[i];
          }
        }
        transpose<true>(tt.data(), lt, L + j0, C, nj, s);
        cdb[c] = db_c;
        cds[c] = ds_c;
      }
    });
    for (int64_t c = 0; c < nch; ++c) {
      dbias_acc += cdb[c];
      dscale_acc += cds[c];
    }
    P.L = L + r0;
    P.cbeg = r0;
    P.cend = e;
    rows(r0, s);  // G(I, I)
    P.cbeg = 0;
    P.cend = C;
    symmetrize(L + r0, C, s);  // H(I, I)
    at::Tensor dzs = dq_acc.narrow(0, r0, s);
    at::mm_out(dzs, Ls.narrow(1, 0, e), sl.kf.narrow(0, 0, e));
    dzs.mul_(scale);
    if (r0 > 0) dq_acc.narrow(0, 0, r0).addmm_(Ls.narrow(1, 0, r0).t(), qs, 1.0, scale);
  }

  // The s x s block at X (row stride ld) becomes X + X.T.
  static void symmetrize(T* X, int64_t ld, int64_t s) {
    at::parallel_for(0, s, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        X[i * ld + i] *= T(2);
        for (int64_t j = i + 1; j < s; ++j) {
          const T v = X[i * ld + j] + X[j * ld + i];
          X[i * ld + j] = v;
          X[j * ld + i] = v;
        }
      }
    });
  }

  // (dq, dk, dscale, dbias), every term multiplied by norm.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish(const at::Tensor& scale_t,
                                                                   const at::Tensor& bias_t,
                                                                   double norm) {
    if (norm != 1.0) {
      dq_acc.mul_(norm);
      if (!self) dk_acc.mul_(norm);
    }
    if (!dq_acc.is_same(dq)) dq.copy_(dq_acc);
    if (self) {
      dk = at::empty({0, sl.D}, q.options());
    } else if (!dk_acc.is_same(dk)) {
      dk.copy_(dk_acc);
    }
    at::Tensor dscale = at::empty_like(scale_t), dbias = at::empty_like(bias_t);
    dscale.fill_(dscale_acc * norm);
    dbias.fill_(dbias_acc * norm);
    return {dq, dk, dscale, dbias};
  }
};

template <class T>
at::Tensor stat_vec(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(scalar_type_of<T>()).contiguous() : at::Tensor();
}

template <class T>
FwdStats fwd_impl(
    const at::Tensor& q, const std::optional<at::Tensor>& k_opt, double scale, double bias,
    const std::optional<at::Tensor>& targets, const std::optional<at::Tensor>& row_labels,
    const std::optional<at::Tensor>& col_labels, bool exclude_diag, bool decoupled, bool pos_lse,
    bool col_stats, double lse2_mult) {
  const bool self = !k_opt.has_value();
  const at::Tensor& k = self ? q : *k_opt;
  Slabs<T> sl(q, k, targets, row_labels, col_labels, self ? Lanes<T>::W : 1,
              self ? kSelfSlabs : 1);
  FwdSweep<T> F(sl, scale, bias, exclude_diag, decoupled, pos_lse, col_stats, self, lse2_mult);
  for (int64_t r0 = 0; r0 < sl.R; r0 += sl.S) {
    const int64_t s = std::min(sl.S, sl.R - r0);
    // self: the columns up to the slab's end only (half of the logits)
    const auto qL = sl.slab(q, r0, s, F.self ? r0 + s : -1);
    F.slab(r0, s, qL.first, qL.second);
  }
  F.finish();
  return {F.lse, F.pos, F.npos, F.mean, F.col_lse, F.col_mean, F.lse2};
}

// Gradients when nothing flows back; self: dk is the empty [0, D] of self-similarity.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> zero_grads(const at::Tensor& q,
                                                                      const at::Tensor& k,
                                                                      const at::Tensor& scale_t,
                                                                      const at::Tensor& bias_t,
                                                                      bool self) {
  return {at::zeros_like(q), self ? at::empty({0, q.size(1)}, q.options()) : at::zeros_like(k),
          at::zeros_like(scale_t), at::zeros_like(bias_t)};
}

template <class T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_impl(
    const std::optional<at::Tensor>& g_lse, const std::optional<at::Tensor>& g_pos,
    const std::optional<at::Tensor>& g_mean, const std::optional<at::Tensor>& g_col_lse,
    const std::optional<at::Tensor>& g_col_mean, const at::Tensor& q,
    const std::optional<at::Tensor>& k_opt, const at::Tensor& scale_t, const at::Tensor& bias_t,
    double scale, double bias, const std::optional<at::Tensor>& targets,
    const std::optional<at::Tensor>& row_labels, const std::optional<at::Tensor>& col_labels,
    const at::Tensor& lse, const at::Tensor& pos, const at::Tensor& npos,
    const at::Tensor& col_lse, bool exclude_diag, bool decoupled, bool pos_lse, bool col_stats,
    const std::optional<at::Tensor>& g_lse2, const std::optional<at::Tensor>& lse2,
    double lse2_mult) {
  const bool self = !k_opt.has_value();
  const at::Tensor& k = self ? q : *k_opt;
  const at::Tensor gl = stat_vec<T>(g_lse), gp = stat_vec<T>(g_pos), gm = stat_vec<T>(g_mean);
  const at::Tensor gcl = col_stats ? stat_vec<T>(g_col_lse) : at::Tensor();
  const at::Tensor gcm = col_stats ? stat_vec<T>(g_col_mean) : at::Tensor();
  // the lse2 term needs lse2_mult > 0 and the saved lse2 (checked by the caller)
  const bool e2 = g_lse2.has_value() && lse2_mult > 0 && lse2.has_value();
  const at::Tensor gl2 = e2 ? stat_vec<T>(g_lse2) : at::Tensor();
  const at::Tensor lse2_a = e2 ? stat_vec<T>(lse2) : at::Tensor();
  const bool any = gl.defined() || gp.defined() || gm.defined() || gcl.defined() ||
                   gcm.defined() || gl2.defined();
  if (!any || q.size(0) == 0 || k.size(0) == 0) return zero_grads(q, k, scale_t, bias_t, self);

  Slabs<T> sl(q, k, targets, row_labels, col_labels, self ? Lanes<T>::W : 1,
              self ? kSelfSlabs : 1);
  const at::ScalarType st = sl.st;
  const at::Tensor lse_a = lse.to(st).contiguous(), pos_a = pos.to(st).contiguous();
  const at::Tensor npos_a = npos.to(st).contiguous();
  BwdSweep<T> B(sl, q, k, scale, bias, gl, gp, gm, gcl, gcm, lse_a, pos_a, npos_a, col_lse,
                exclude_diag, decoupled, pos_lse, self, gl2, lse2_a, lse2_mult);
  for (int64_t r0 = 0; r0 < sl.R; r0 += sl.S) {
    const int64_t s = std::min(sl.S, sl.R - r0);
    // self: the sweep reads the columns up to the slab's end only (half of the logits)
    const auto qL = sl.slab(q, r0, s, self ? r0 + s : -1);
    B.slab(r0, s, qL.first, qL.second);
  }
  return B.finish(scale_t, bias_t, 1.0);
}

// Forward and backward in one sweep, for a loss whose gradients with respect to the row
// statistics are known before the forward: loss = norm * sum over rows with a positive of
// g_lse lse + g_pos pos + g_mean mean. Each slab of dot products serves the row statistics and
// then, in place, the gradient tile: no slab is computed twice. Without k the keys are the
// queries (self-similarity, see BwdSweep): dq is then the whole gradient and dk is empty.
template <class T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_impl(
    const std::optional<at::Tensor>& g_lse, const std::optional<at::Tensor>& g_pos,
    const std::optional<at::Tensor>& g_mean, const at::Tensor& q,
    const std::optional<at::Tensor>& k_opt, const at::Tensor& scale_t, const at::Tensor& bias_t,
    double scale, double bias, const std::optional<at::Tensor>& targets,
    const std::optional<at::Tensor>& row_labels, const std::optional<at::Tensor>& col_labels,
    bool exclude_diag, bool decoupled, bool pos_lse, bool mean) {
  const bool self = !k_opt.has_value();
  const at::Tensor& k = self ? q : *k_opt;
  Slabs<T> sl(q, k, targets, row_labels, col_labels, self ? Lanes<T>::W : 1,
              self ? kSelfSlabs : 1);
  FwdSweep<T> F(sl, scale, bias, exclude_diag, decoupled, pos_lse, false);
  // The coefficients are masked slab by slab: rows without a positive count for nothing.
  at::Tensor gl = stat_vec<T>(g_lse), gp = stat_vec<T>(g_pos), gm = stat_vec<T>(g_mean);
  for (at::Tensor* g : {&gl, &gp, &gm})
    if (g->defined()) *g = g->clone();
  const at::Tensor none;
  BwdSweep<T> B(sl, q, k, scale, bias, gl, gp, gm, none, none, F.lse, F.pos, F.npos, none,
                exclude_diag, decoupled, pos_lse, self);
  const T* np = F.npos.template data_ptr<T>();
  const bool run_bwd = sl.R > 0 && sl.C > 0 && (gl.defined() || gp.defined() || gm.defined());
  for (int64_t r0 = 0; r0 < sl.R; r0 += sl.S) {
    const int64_t s = std::min(sl.S, sl.R - r0);
    const auto qL = sl.slab(q, r0, s);
    F.slab(r0, s, qL.first, qL.second);
    if (!run_bwd) continue;
    for (at::Tensor* g : {&gl, &gp, &gm}) {
      if (!g->defined()) continue;
      T* gv = g->template data_ptr<T>();
      for (int64_t r = r0; r < r0 + s; ++r)
        if (!(np[r] > T(0))) gv[r] = T(0);
    }
    B.slab(r0, s, qL.first, qL.second);
  }
  const at::Tensor has_pos = F.npos > 0;
  const double count = static_cast<double>(has_pos.sum().item<int64_t>());
  const double norm = mean ? 1.0 / std::max(count, 1.0) : 1.0;
  // Masked rows hold zero coefficients but possibly infinite statistics: select, not multiply.
  at::Tensor rows = at::zeros({sl.R}, sl.opt.dtype(at::kDouble));
  const std::pair<const at::Tensor*, const at::Tensor*> terms[] = {
      {&gl, &F.lse}, {&gp, &F.pos}, {&gm, &F.mean}};
  for (const auto& t : terms)
    if (t.first->defined()) rows.add_(t.first->to(at::kDouble) * t.second->to(at::kDouble));
  rows = at::where(has_pos, rows, at::zeros_like(rows));
  at::Tensor loss = (rows.sum() * norm).to(sl.st);
  auto grads =
      run_bwd ? B.finish(scale_t, bias_t, norm) : zero_grads(q, k, scale_t, bias_t, self);
  return {loss, F.npos, std::get<0>(grads), std::get<1>(grads), std::get<2>(grads),
          std::get<3>(grads)};
}

}  // namespace

int64_t slab_bytes() {
  const char* env = std::getenv("FASTCL_CPU_SLAB_BYTES");
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    if (end != env && v > 0) return static_cast<int64_t>(v);
  }
  return kDefaultSlabBytes;
}

const char* kernel_isa() { return use_avx2() ? "avx2" : "generic"; }

FwdStats contrastive_fwd_cpu(const at::Tensor& q, const std::optional<at::Tensor>& k,
                             const at::Tensor& scale, const at::Tensor& bias,
                             const std::optional<at::Tensor>& targets,
                             const std::optional<at::Tensor>& row_labels,
                             const std::optional<at::Tensor>& col_labels, bool exclude_diag,
                             bool decoupled, bool pos_lse, bool col_stats, double lse2_mult) {
  const double a = scalar_value(scale), b = scalar_value(bias);
  if (q.scalar_type() == at::kDouble)
    return fwd_impl<double>(q, k, a, b, targets, row_labels, col_labels, exclude_diag, decoupled,
                            pos_lse, col_stats, lse2_mult);
  return fwd_impl<float>(q, k, a, b, targets, row_labels, col_labels, exclude_diag, decoupled,
                         pos_lse, col_stats, lse2_mult);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_bwd_cpu(const std::optional<at::Tensor>& g_lse, const std::optional<at::Tensor>& g_pos,
                    const std::optional<at::Tensor>& g_mean,
                    const std::optional<at::Tensor>& g_col_lse,
                    const std::optional<at::Tensor>& g_col_mean, const at::Tensor& q,
                    const std::optional<at::Tensor>& k, const at::Tensor& scale,
                    const at::Tensor& bias, const std::optional<at::Tensor>& targets,
                    const std::optional<at::Tensor>& row_labels,
                    const std::optional<at::Tensor>& col_labels, const at::Tensor& lse,
                    const at::Tensor& pos, const at::Tensor& npos, const at::Tensor& col_lse,
                    bool exclude_diag, bool decoupled, bool pos_lse, bool col_stats,
                    const std::optional<at::Tensor>& g_lse2,
                    const std::optional<at::Tensor>& lse2, double lse2_mult) {
  const double a = scalar_value(scale), b = scalar_value(bias);
  if (q.scalar_type() == at::kDouble)
    return bwd_impl<double>(g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, k, scale, bias, a, b,
                            targets, row_labels, col_labels, lse, pos, npos, col_lse,
                            exclude_diag, decoupled, pos_lse, col_stats, g_lse2, lse2,
                            lse2_mult);
  return bwd_impl<float>(g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, k, scale, bias, a, b,
                         targets, row_labels, col_labels, lse, pos, npos, col_lse, exclude_diag,
                         decoupled, pos_lse, col_stats, g_lse2, lse2, lse2_mult);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_fused_cpu(const std::optional<at::Tensor>& g_lse,
                      const std::optional<at::Tensor>& g_pos,
                      const std::optional<at::Tensor>& g_mean, const at::Tensor& q,
                      const std::optional<at::Tensor>& k, const at::Tensor& scale,
                      const at::Tensor& bias,
                      const std::optional<at::Tensor>& targets,
                      const std::optional<at::Tensor>& row_labels,
                      const std::optional<at::Tensor>& col_labels, bool exclude_diag,
                      bool decoupled, bool pos_lse, bool mean) {
  const double a = scalar_value(scale), b = scalar_value(bias);
  if (q.scalar_type() == at::kDouble)
    return fused_impl<double>(g_lse, g_pos, g_mean, q, k, scale, bias, a, b, targets, row_labels,
                              col_labels, exclude_diag, decoupled, pos_lse, mean);
  return fused_impl<float>(g_lse, g_pos, g_mean, q, k, scale, bias, a, b, targets, row_labels,
                           col_labels, exclude_diag, decoupled, pos_lse, mean);
}

}  // namespace cpu
}  // namespace fastcl
