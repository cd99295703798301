// CUDA kernels of the fused contrastive primitive: launchers over raw device pointers.
//
// This header and contrastive_kernels.cu include no torch header (plain CUDA: `nvcc -c` compiles
// them in seconds); the ATen driver (contrastive_cuda.cpp) holds the slabs, the GEMMs and the
// argument checks. See fastcl/reference/contrastive.py for the definitions of every statistic and
// of the gradient G.
//
// Every kernel works on one slab of L = q_slab @ k.T (raw dot products, statistics dtype: fp32,
// or fp64 for fp64 inputs), `rows` x C, row-major with leading dimension `ldl` (a multiple of 8
// elements, 16-byte aligned rows: each row is padded, and the padding is read but never used).
// The logits are s = scale * l + bias; scale and bias are read from device memory (0-dim tensors
// of the statistics dtype), so no value ever travels to the host. Exponentials are taken in log2
// units (scale and bias premultiplied by log2 e): every exp is a 2^x.
//
// The second log-sum-exp lse2[r] = log sum_{c in den(r)} exp(mu s[r, c]) (mu = lse2_mult > 0;
// 0: off) shares the running maximum m of lse's denominator set (max mu s = mu max s, mu > 0):
// the kernels keep one more running sum, e2 = sum 2^(mu (x - m)) in log2 units, rescaled by
// 2^(mu (m_old - m_new)) where m grows and merged like lse's sum with that factor; lse2 =
// (mu m + log2 e2) ln 2. The backward's term g_lse2[r] mu exp(mu s - lse2[r]) costs its
// exponential only when g_lse2 is given (BwdTileArgs::lse2_exp; a template switch).
//
// All launchers enqueue on `stream` and return cudaGetLastError().
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastcl {
namespace cuda {

// Element types. The statistics type is kFloat32 or kFloat64; the gradient tile G is stored in the
// inputs' type (kBFloat16 / kFloat16 with fp32 statistics, else the statistics type).
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Mask geometry (fastcl/reference/contrastive.py): allowed = !(exclude_diag && r == c); pos =
// label match (row_labels and col_labels both given) or c == targets[r] (a target outside
// [0, C) or on the excluded diagonal means no positive), within allowed; den = allowed minus pos
// when decoupled. Index arrays are int64 on the device, nullptr when absent.
struct MaskSpec {
  int64_t R;  // rows of q
  int64_t C;  // rows of k (columns of the logits)
  const int64_t* targets;     // [R] or nullptr
  const int64_t* row_labels;  // [R] or nullptr
  const int64_t* col_labels;  // [C] or nullptr
  bool exclude_diag;
  bool decoupled;
  bool pos_lse;
};

// The row statistics lse, pos, npos and mean: [R] arrays of the statistics dtype; lse2 too
// ([R]) when the kernel's lse2_mult > 0, else nullptr.
struct RowOutputs {
  void* lse;
  void* pos;
  void* npos;
  void* mean;
  void* lse2;
};

// Running row states of the self-similarity forward (k absent: the keys are the queries, R == C,
// the logits symmetric). A slab of rows I = [r0, e) holds the logits of the columns [0, e) only:
// the row kernel gives the rows of I their sets over those columns, and the transposed part
// (columns [0, r0), launch_fwd_self_cols) gives each earlier row c its sets over the columns I.
// A row's sets are merged into one of `nsplit` states (one per row part of the column kernel, so
// no atomics are needed), and launch_row_final finishes every row after the last slab.
//   t [4, nsplit, ld] (statistics dtype): max and sum of 2^(s - max) of the denominator set,
//     then of the positives (log2 units; -inf / 0 when empty);
//   d [3, nsplit, ld] (fp64): sums of raw dot products over the denominator set and over the
//     positives (target mode: the target's own), number of positives;
//   e2 [nsplit, ld] (statistics dtype), only when lse2_mult > 0 (else nullptr): the sum of
//     2^(lse2_mult (s - max)) of the denominator set, max that of t[0].
// Initialize to (-inf, 0, -inf, 0), (0, 0, 0) and 0.
struct RowStates {
  int nsplit;
  int64_t ld;  // >= R
  void* t;
  double* d;
  void* e2;
};

// Row statistics of one slab: one block per row over the columns [0, cend) of the slab.
// Without states (states.t == nullptr; cend == C) it writes rows [r0, r0 + rows) of `out`; with
// them (self-similarity, cend = r0 + rows) it merges each row's sets over those columns into its
// state of part 0 instead.
//
// The same arguments with states serve launch_fwd_self_cols (cend and out unused): the part of
// the slab left of its diagonal block (columns [0, r0)), read column by column, gives each row
// c < r0 its sets over the columns of the slab's rows, with the masks of row c (none of them is
// its diagonal), merged into its states. A block owns 32 x (16 / sizeof(stat)) columns and one of
// states.nsplit parts of the slab's rows.
//
// lse2_mult > 0: lse2 too (out.lse2, and states.e2 with states); 0: off (out.lse2 and
// states.e2 nullptr).
struct FwdRowsArgs {
  MaskSpec mask;
  const void* L;
  int64_t ldl;
  int64_t r0;
  int64_t rows;
  int64_t cend;
  const void* scale;
  const void* bias;
  RowOutputs out;
  RowStates states;
  double lse2_mult;
};

// Self-similarity, after the last slab: rows [0, R) of `out` from their merged states (lse2
// when lse2_mult > 0, as in FwdRowsArgs).
struct RowFinalArgs {
  MaskSpec mask;
  const void* scale;
  const void* bias;
  RowStates states;
  RowOutputs out;
  double lse2_mult;
};

// Column statistics of one slab merged into running per-column states (one state per row split
// of the slab: the rows of a slab are cut into `nsplit` parts, each part owned by one block per
// column group, so no atomics are needed). States, [nsplit, ldstate] each: max of s over the
// allowed rows seen so far (log2 units; -inf when none), sum of 2^(s - max), sum of raw dot
// products (fp64). Initialize to (-inf, 0, 0).
struct FwdColsArgs {
  int64_t R;
  int64_t C;
  bool exclude_diag;
  const void* L;
  int64_t ldl;
  int64_t r0;
  int64_t rows;
  const void* scale;
  const void* bias;
  int nsplit;
  int64_t ldstate;
  void* st_max;
  void* st_sum;
  double* st_lsum;
};

// col_lse and col_mean ([C], statistics dtype) from the states of FwdColsArgs after the last slab.
struct ColFinalArgs {
  int64_t R;
  int64_t C;
  bool exclude_diag;
  int nsplit;
  int64_t ldstate;
  const void* st_max;
  const void* st_sum;
  const double* st_lsum;
  const void* scale;
  const void* bias;
  void* col_lse;
  void* col_mean;
};

// Backward preparation (one block). Per column c < ldcol (zeros for c >= C), when cols != nullptr
// ([3, ldcol]): cols[0][c] = col_lse[c] in log2 units (0 where it is -inf),
// cols[1][c] = g_col_lse[c] (0 where col_lse[c] is -inf or g_col_lse is absent),
// cols[2][c] = g_col_mean[c] / |allowed(:, c)| (0 when absent or the set is empty).
// gscale[0] = a power of two f with f * max|G| <= 2^14 (from a bound on |G|), gscale[1] = 1 / f:
// the tile holds f * G, so that fp16 tiles neither overflow nor flush the small entries of a
// softmax to zero.
struct BwdPrepArgs {
  int64_t R;
  int64_t C;
  bool exclude_diag;
  const void* g_lse;       // [R] or nullptr
  const void* g_pos;       // [R] or nullptr
  const void* g_mean;      // [R] or nullptr
  const void* g_lse2;      // [R] or nullptr (its term is bounded by |g_lse2| lse2_mult)
  double lse2_mult;
  const void* g_col_lse;   // [C] or nullptr
  const void* g_col_mean;  // [C] or nullptr
  const void* col_lse;     // [C] (read only with g_col_lse)
  void* cols;              // [3, ldcol] or nullptr
  int64_t ldcol;
  void* gscale;            // [2]
};

// Gradient tile of one slab, in place: reads the raw dot products of L and overwrites each row
// with f * G (G's dtype; a narrower G occupies the first half of each row's bytes, so the tile
// is a [rows, C] matrix with leading dimension ldl * sizeof(stat) / sizeof(G)). Writes, per row,
// row_parts[r] = sum_c G[r, c] * l[r, c] and row_parts[R + r] = sum_c G[r, c] (for dscale and
// dbias; unscaled G, fp64).
//
// Self-similarity (`self`: the keys are the queries, R == C, so l is symmetric): the slab holds
// the columns [0, e) only, e = r0 + rows (the blocks on and below the diagonal), and each entry
// becomes f * H[r, c] = f * (G[r, c] + G[c, r]), G[c, r] from row c's coefficients (`coefs`,
// written by launch_bwd_coefs for every row below e) and the mask of (c, r). The row sums count
// G[r, c] for c < e and G[c, r] for c < r0: every entry of G once over the slabs. |H| is at most
// twice the bound of |G| that gives f: f * |H| <= 2^15, still inside fp16.
struct BwdTileArgs {
  MaskSpec mask;
  void* L;
  int64_t ldl;
  int64_t r0;
  int64_t rows;
  const void* scale;
  const void* bias;
  const void* g_lse;   // [R] or nullptr
  const void* g_pos;   // [R] or nullptr
  const void* g_mean;  // [R] or nullptr
  const void* lse;     // [R]
  const void* pos;     // [R]
  const void* npos;    // [R]
  const void* cols;    // [3, ldcol] from BwdPrepArgs, or nullptr (no column gradients)
  int64_t ldcol;
  bool col_exp;        // g_col_lse given (cols[1] may be nonzero)
  const void* gscale;  // [2] from BwdPrepArgs
  double* row_parts;   // [2, R]
  bool self;           // self-similarity (cols == nullptr)
  void* coefs;         // self: [kRowCoefs, R] (lse2_exp: [kRowCoefsLse2, R]), the rows'
                       // coefficients of G
  bool pos_rows_only;  // rows without a positive (npos == 0) have zero coefficients (the fused
                       // sweep's loss counts only the others)
  // The lse2 term g_lse2[r] den[r, c] mu exp(mu s[r, c] - lse2[r]), mu = lse2_mult > 0: only
  // when lse2_exp (g_lse2 given; the other tiles take no exponential more). Self: coefs then
  // holds kRowCoefsLse2 values per row.
  bool lse2_exp;
  const void* g_lse2;  // [R] (lse2_exp) or nullptr
  const void* lse2;    // [R] (lse2_exp) or nullptr
  double lse2_mult;
};

// Values per row of BwdTileArgs::coefs: without the lse2 term, with it.
constexpr int kRowCoefs = 6;
constexpr int kRowCoefsLse2 = 8;

// Columns covered by one block of the column kernels, fwd_cols and fwd_self_cols (the driver
// sizes nsplit from it).
int fwd_cols_block_columns(DType stat);

cudaError_t launch_fwd_rows(const FwdRowsArgs& args, DType stat, cudaStream_t stream);
cudaError_t launch_fwd_self_cols(const FwdRowsArgs& args, DType stat, cudaStream_t stream);
cudaError_t launch_row_final(const RowFinalArgs& args, DType stat, cudaStream_t stream);
cudaError_t launch_fwd_cols(const FwdColsArgs& args, DType stat, cudaStream_t stream);
cudaError_t launch_col_final(const ColFinalArgs& args, DType stat, cudaStream_t stream);
cudaError_t launch_bwd_prep(const BwdPrepArgs& args, DType stat, cudaStream_t stream);
// Self-similarity: the coefficients of G of rows [r0, r0 + rows) into args.coefs (from the
// statistics and gradients that the tile kernel reads), for the tile kernels of this slab and of
// the slabs after it.
cudaError_t launch_bwd_coefs(const BwdTileArgs& args, DType stat, cudaStream_t stream);
// stat/grad: (kFloat32, kFloat32 | kBFloat16 | kFloat16) or (kFloat64, kFloat64).
cudaError_t launch_bwd_tile(const BwdTileArgs& args, DType stat, DType grad, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastcl
