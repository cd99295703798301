// CPU backend of the sigmoid loss (SigLIP).
//
// Schedule: the rows of x are processed in slabs of S rows, S chosen so that the S x C slab of
// raw dot products l = x_r . y_c fits the byte budget of slab_bytes() (it does not grow with R).
// One GEMM per slab (at::mm_out into a reused buffer whose row stride is padded to the vector
// width, fp32 or fp64), then one fused pass per row (siglip_rows.h, under at::parallel_for) that
// produces the row's loss and / or turns the dot products into the gradient tile G in place,
// with the row's sums of G and G * l (dbias, dscale). Then dx_slab = scale G y and
// dy += scale G^T x_slab (addmm into an fp32 / fp64 accumulator). The backward recomputes the
// dot products: nothing is saved between forward and backward; the fused call does both in one
// sweep when every row has the same upstream gradient (the loss reduced by mean or sum).
//
// Row sums, dscale and dbias are accumulated in fp64 (vector partial sums over chunks of
// kSigChunk columns, then per row, then over rows in order), so results do not depend on the
// number of threads. Extra memory: one slab, fp32 copies of y (when not fp32) and of one x slab,
// the accumulator of dy, and O(R) row sums.
#include "siglip.h"

#include "common.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace fastcl {
namespace cpu {
namespace {

using namespace detail;

// Columns per partial vector sum of a row (the fp32 lanes then sum kSigChunk / W terms).
constexpr int64_t kSigChunk = 1024;

template <class T>
struct SigArgs {
  int64_t C, ldl, r0;  // columns, row stride of the slab, global index of slab row 0
  T a2, b2;            // scale and bias times log2(e)
  bool diag_pos, want_loss, want_grad;
  const T* g;          // upstream gradient per global row, or nullptr: g_uniform for every row
  T g_uniform;
  T* L;                // slab: raw dot products in, G out (want_grad)
  double *loss, *db, *ds;  // per slab row
};

#define FASTCL_ROWS_HEADER "siglip_rows.h"
#include "isa_variants.h"

struct SigResult {
  at::Tensor rows;  // per-row sums (want_loss without want_grad)
  at::Tensor dx, dy;
  double loss = 0.0, dscale = 0.0, dbias = 0.0;
};

// The shared sweep. g: per-row upstream gradient (defined) or g_uniform for every row.
template <class T>
SigResult siglip_impl(const at::Tensor& x, const at::Tensor& y, double scale, double bias,
                      bool diag_pos, const at::Tensor& g, double g_uniform, bool want_loss,
                      bool want_grad) {
  constexpr int W = Lanes<T>::W;
  const int64_t R = x.size(0), C = y.size(0), D = x.size(1);
  const at::ScalarType st = scalar_type_of<T>();
  const auto opt = x.options().dtype(st);
  SigResult out;
  const bool rows_out = want_loss && !want_grad;
  if (rows_out) out.rows = at::zeros({R}, opt);
  if (want_grad) {
    out.dx = at::empty_like(x);
    out.dy = at::empty_like(y);
  }
  if (R == 0 || C == 0) {
    if (want_grad) {
      out.dx.zero_();
      out.dy.zero_();
    }
    return out;
  }

  const int64_t ldl = round_up(C, W);
  const at::Tensor yf = y.to(st).contiguous();
  const at::Tensor ga = g.defined() ? g.to(st).contiguous() : at::Tensor();
  const int64_t S = slab_rows(R, ldl, sizeof(T));
  at::Tensor buf = at::empty({S * ldl}, opt);
  at::Tensor dy_acc;
  if (want_grad) {
    dy_acc = (y.scalar_type() == st && out.dy.is_contiguous()) ? out.dy : at::empty({C, D}, opt);
    dy_acc.zero_();
  }
  const bool dx_direct = want_grad && x.scalar_type() == st && out.dx.is_contiguous();

  std::vector<double> loss_r(static_cast<size_t>(S)), db_r(static_cast<size_t>(S)),
      ds_r(static_cast<size_t>(S));
  SigArgs<T> P;
  P.C = C;
  P.ldl = ldl;
  P.r0 = 0;
  P.a2 = static_cast<T>(scale * kLog2e);
  P.b2 = static_cast<T>(bias * kLog2e);
  P.diag_pos = diag_pos;
  P.want_loss = want_loss;
  P.want_grad = want_grad;
  P.g = ga.defined() ? ga.data_ptr<T>() : nullptr;
  P.g_uniform = static_cast<T>(g_uniform);
  P.loss = loss_r.data();
  P.db = db_r.data();
  P.ds = ds_r.data();
  const auto kernel = FASTCL_ISA_SELECT(siglip_rows<T>);
  T* rows_p = rows_out ? out.rows.data_ptr<T>() : nullptr;
  const double a = static_cast<double>(static_cast<T>(scale));

  for (int64_t r0 = 0; r0 < R; r0 += S) {
    const int64_t s = std::min(S, R - r0);
    const at::Tensor xs = x.narrow(0, r0, s).to(st).contiguous();
    // [s, C] with row stride ldl: the padding lanes are scratch of the row kernel
    at::Tensor Ls = buf.narrow(0, 0, s * ldl).view({s, ldl}).narrow(1, 0, C);
    at::mm_out(Ls, xs, yf.t());
    P.r0 = r0;
    P.L = Ls.data_ptr<T>();
    at::parallel_for(0, s, 16, [&](int64_t b, int64_t e) { kernel(P, b, e); });
    for (int64_t i = 0; i < s; ++i) {
      if (want_loss) out.loss += loss_r[i];
      if (rows_out) rows_p[r0 + i] = static_cast<T>(loss_r[i]);
      if (want_grad) {
        out.dbias += db_r[i];
        out.dscale += ds_r[i];
      }
    }
    if (want_grad) {
      if (dx_direct) {
        at::Tensor dxs = out.dx.narrow(0, r0, s);
        at::mm_out(dxs, Ls, yf);
        dxs.mul_(a);
      } else {
        out.dx.narrow(0, r0, s).copy_(at::mm(Ls, yf).mul_(a));
      }
      dy_acc.addmm_(Ls.t(), xs, 1.0, a);
    }
  }
  if (want_grad && !dy_acc.is_same(out.dy)) out.dy.copy_(dy_acc);
  return out;
}

template <class F>
auto by_dtype(const at::Tensor& x, F&& f) {
  if (x.scalar_type() == at::kDouble) return f(double{});
  return f(float{});
}

}  // namespace

at::Tensor siglip_fwd_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                          const at::Tensor& bias, bool diag_pos) {
  const double a = scalar_value(scale), b = scalar_value(bias);
  return by_dtype(x, [&](auto t) {
    using T = decltype(t);
    return siglip_impl<T>(x, y, a, b, diag_pos, at::Tensor(), 0.0, true, false).rows;
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
siglip_bwd_cpu(const at::Tensor& g_row, const at::Tensor& x, const at::Tensor& y,
               const at::Tensor& scale, const at::Tensor& bias, bool diag_pos) {
  const double a = scalar_value(scale), b = scalar_value(bias);
  SigResult r = by_dtype(x, [&](auto t) {
    using T = decltype(t);
    return siglip_impl<T>(x, y, a, b, diag_pos, g_row, 0.0, false, true);
  });
  return {r.dx, r.dy, at::empty_like(scale).fill_(r.dscale),
          at::empty_like(bias).fill_(r.dbias)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
siglip_fused_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                 const at::Tensor& bias, bool diag_pos, bool mean) {
  const double a = scalar_value(scale), b = scalar_value(bias);
  const int64_t R = x.size(0);
  const double g = (mean && R > 0) ? 1.0 / static_cast<double>(R) : 1.0;
  SigResult r = by_dtype(x, [&](auto t) {
    using T = decltype(t);
    return siglip_impl<T>(x, y, a, b, diag_pos, at::Tensor(), g, true, true);
  });
  const double loss = (mean && R > 0) ? r.loss / static_cast<double>(R) : r.loss;
  const at::ScalarType st = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {at::full({}, loss, x.options().dtype(st)), r.dx, r.dy,
          at::empty_like(scale).fill_(r.dscale), at::empty_like(bias).fill_(r.dbias)};
}

}  // namespace cpu
}  // namespace fastcl
