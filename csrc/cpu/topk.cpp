// CPU backend of the tiled similarity search (top-k of query @ key.T per query row).
//
// Schedule: slabs of S query rows x blocks of CB key columns, S x CB within the byte budget of
// slab_bytes() (CB at most kTopkColBlock): one GEMM per (slab, block) into a reused fp32 / fp64
// buffer, then topk_rows.h merges each row's block into the row's running top-k (a heap kept in
// the row's own slots of the output tensors), rows split over threads by at::parallel_for. After
// the slab's last block each row's heap is sorted into decreasing order. Nothing of size R x C
// exists: the extra memory is one slab, fp32 copies of key (when not fp32) and of one query slab.
//
// Order: larger value first, then smaller column; NaN above every number. The values are those of
// the GEMM (fp32 for fp32 / bf16 / fp16 inputs, fp64 for fp64): wherever the products are exact
// they equal torch.topk of the materialized similarities bit for bit.
#include "topk.h"

#include "common.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace fastcl {
namespace cpu {
namespace {

using namespace detail;

// Widest block of key columns per GEMM.
constexpr int64_t kTopkColBlock = 8192;

template <class T>
struct TopkArgs {
  int64_t k, ldl, c0, cb, r0;  // k, slab row stride, first column and width of the block, row 0
  bool exclude_self;
  const T* L;                  // slab [rows, cb] of similarities, row stride ldl
  T* vals;                     // [R, k]: the rows' heaps, then the sorted values
  int64_t* idx;                // [R, k]
  int64_t* cnt;                // per slab row: entries in the heap
};

// Total order of values: an int64 that grows with the value (-0.0 equal to +0.0), NaN above all.
inline int64_t order_key(double v) {
  if (v != v) return std::numeric_limits<int64_t>::max();
  const int64_t b = __builtin_bit_cast(int64_t, v + 0.0);
  return b ^ ((b >> 63) & std::numeric_limits<int64_t>::max());
}

// Whether entry (va, ca) ranks below (vb, cb): smaller value, or equal value and larger column.
template <class T>
inline bool worse(T va, int64_t ca, T vb, int64_t cb) {
  const int64_t ka = order_key(static_cast<double>(va)), kb = order_key(static_cast<double>(vb));
  return ka < kb || (ka == kb && ca > cb);
}

// Heap of n entries (worst at the root) in the parallel arrays v, c.
template <class T>
inline void heap_sift_down(T* v, int64_t* c, int64_t n, int64_t i) {
  const T xv = v[i];
  const int64_t xc = c[i];
  for (;;) {
    int64_t ch = 2 * i + 1;
    if (ch >= n) break;
    if (ch + 1 < n && worse(v[ch + 1], c[ch + 1], v[ch], c[ch])) ++ch;
    if (!worse(v[ch], c[ch], xv, xc)) break;
    v[i] = v[ch];
    c[i] = c[ch];
    i = ch;
  }
  v[i] = xv;
  c[i] = xc;
}

template <class T>
inline void heap_push(T* v, int64_t* c, int64_t n, T xv, int64_t xc) {
  int64_t i = n;
  while (i > 0) {
    const int64_t p = (i - 1) / 2;
    if (!worse(xv, xc, v[p], c[p])) break;
    v[i] = v[p];
    c[i] = c[p];
    i = p;
  }
  v[i] = xv;
  c[i] = xc;
}

// Heap of n entries -> decreasing order (best first).
template <class T>
void heap_sort_desc(T* v, int64_t* c, int64_t n) {
  for (int64_t m = n; m > 1; --m) {
    std::swap(v[0], v[m - 1]);
    std::swap(c[0], c[m - 1]);
    heap_sift_down(v, c, m - 1, 0);
  }
}

#define FASTCL_ROWS_HEADER "topk_rows.h"
#include "isa_variants.h"

template <class T>
std::tuple<at::Tensor, at::Tensor> topk_impl(const at::Tensor& query, const at::Tensor& key,
                                             int64_t k, bool exclude_self) {
  constexpr int W = Lanes<T>::W;
  const int64_t R = query.size(0), C = key.size(0);
  const at::ScalarType st = scalar_type_of<T>();
  at::Tensor values = at::empty({R, k}, query.options().dtype(st));
  at::Tensor indices = at::empty({R, k}, query.options().dtype(at::kLong));
  if (R == 0) return {values, indices};

  const int64_t budget = std::max<int64_t>(W, slab_bytes() / static_cast<int64_t>(sizeof(T)));
  const int64_t CB = std::min(round_up(C, W), std::max<int64_t>(W, std::min(kTopkColBlock, budget) / W * W));
  const int64_t S = std::max<int64_t>(1, std::min(R, budget / CB));
  const at::Tensor kf = key.to(st).contiguous();
  at::Tensor buf = at::empty({S * CB}, query.options().dtype(st));
  std::vector<int64_t> cnt(static_cast<size_t>(S));

  TopkArgs<T> P;
  P.k = k;
  P.exclude_self = exclude_self;
  P.vals = values.data_ptr<T>();
  P.idx = indices.data_ptr<int64_t>();
  P.cnt = cnt.data();
  const auto kernel = FASTCL_ISA_SELECT(topk_rows<T>);
  for (int64_t r0 = 0; r0 < R; r0 += S) {
    const int64_t s = std::min(S, R - r0);
    const at::Tensor qs = query.narrow(0, r0, s).to(st).contiguous();
    std::fill(cnt.begin(), cnt.end(), int64_t(0));
    P.r0 = r0;
    for (int64_t c0 = 0; c0 < C; c0 += CB) {
      const int64_t cb = std::min(CB, C - c0);
      const int64_t ldl = round_up(cb, W);
      at::Tensor Ls = buf.narrow(0, 0, s * ldl).view({s, ldl}).narrow(1, 0, cb);
      at::mm_out(Ls, qs, kf.narrow(0, c0, cb).t());
      P.ldl = ldl;
      P.c0 = c0;
      P.cb = cb;
      P.L = Ls.data_ptr<T>();
      at::parallel_for(0, s, 16, [&](int64_t b, int64_t e) { kernel(P, b, e); });
    }
    T* vp = P.vals;
    int64_t* ip = P.idx;
    at::parallel_for(0, s, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) heap_sort_desc(vp + (r0 + i) * k, ip + (r0 + i) * k, cnt[i]);
    });
  }
  return {values, indices};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                int64_t k, bool exclude_self) {
  if (query.scalar_type() == at::kDouble) return topk_impl<double>(query, key, k, exclude_self);
  return topk_impl<float>(query, key, k, exclude_self);
}

}  // namespace cpu
}  // namespace fastcl
