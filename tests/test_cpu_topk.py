"""The C++ CPU kernel of the tiled similarity search (``fastcl._C.topk_fwd_cpu``).

Inputs with small integer entries make every dot product exact (in fp32 for fp32 / bf16 / fp16
inputs, in fp64 for fp64), so the values must equal those of the fp64 materialized similarities
bit for bit, and ties are many: the indices must then be exactly those of the documented order
(larger value first, then smaller index), i.e. a stable descending sort of the fp64 similarities,
which agrees with ``torch.topk`` up to ties. Random real-valued inputs are compared with a
tolerance. Slab and column-block boundaries are exercised through ``FASTCL_CPU_SLAB_BYTES``.
"""

from __future__ import annotations

import pytest
import torch
from _cases import expected, int_inputs, similarities
from _memory import peak_rss_growth

try:
    from fastcl import _C
except ImportError:  # pragma: no cover - depends on the build
    _C = None

if _C is None or not hasattr(_C, "topk_fwd_cpu"):
    pytest.skip("fastcl._C with the CPU top-k kernel is not built", allow_module_level=True)

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPES = (F64, F32, BF16, F16)


def check_exact(q, k, kk, exclude_self):
    values, indices = _C.topk_fwd_cpu(q, k, kk, exclude_self)
    vdt = F64 if q.dtype == F64 else F32
    assert values.dtype == vdt and indices.dtype == torch.int64
    assert values.shape == indices.shape == (q.shape[0], kk)
    ev, ei = expected(q, k, kk, exclude_self)
    assert torch.equal(values.double(), ev)
    assert torch.equal(indices, ei)
    # and torch.topk of the materialized similarities in the compute dtype gives the same values
    if q.shape[0]:
        sim = similarities(q, k, exclude_self).to(vdt)
        assert torch.equal(values, torch.topk(sim, kk, dim=1).values)
    return values, indices


@pytest.fixture
def slab_bytes(monkeypatch):
    def set_(n):
        monkeypatch.setenv("FASTCL_CPU_SLAB_BYTES", str(n))
    return set_


# ---------------------------------------------------------------------------------------------
# Exact: integer inputs, ties, every dtype and awkward shapes


EXACT_SHAPES = [(1, 1, 1, 1), (1, 2, 3, 1), (5, 2, 1, 1), (7, 13, 3, 5), (13, 7, 129, 6),
                (31, 31, 5, 30), (29, 61, 2, 1), (61, 29, 4, 28), (3, 200, 1, 199),
                (17, 1031, 3, 11), (50, 77, 8, 64)]
# exclude_self: k at most C - 1
EXACT_CASES = [(R, C, D, kk, ex) for R, C, D, kk in EXACT_SHAPES for ex in (False, True)
               if not ex or C > 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R,C,D,kk,exclude_self", EXACT_CASES)
def test_exact_with_ties(R, C, D, kk, exclude_self, dtype):
    kk = min(kk, C - 1) if exclude_self else kk
    q, k = int_inputs(R, C, D, dtype, seed=R + C + D)
    check_exact(q, k, kk, exclude_self)


def test_empty_query():
    q, k = int_inputs(0, 9, 4)
    values, indices = _C.topk_fwd_cpu(q, k, 3, False)
    assert values.shape == indices.shape == (0, 3)


@pytest.mark.parametrize("dtype", (F64, F32), ids=str)
@pytest.mark.parametrize("slab", [8, 64, 7 * 16 * 4, 1000, 50 * 1024])
def test_slab_and_block_boundaries(dtype, slab, slab_bytes):
    """Tiny budgets: one-row slabs and column blocks of one vector, merged into the heaps."""
    slab_bytes(slab)
    q, k = int_inputs(37, 203, 6, dtype, seed=4)
    for kk, ex in ((1, False), (9, True), (202, True), (203, False)):
        check_exact(q, k, kk, ex)


def test_all_equal_similarities_keep_index_order(slab_bytes):
    slab_bytes(300)
    q = torch.ones(9, 4)
    k = torch.ones(50, 4)
    values, indices = check_exact(q, k, 20, True)
    assert (values == 4).all()


def test_negative_zero_and_infinities():
    """-0.0 ties with +0.0 (smaller index first), +-inf rank as numbers."""
    q = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    k = torch.tensor([[0.0, -1.0], [0.0, 1.0], [float("inf"), 0.0], [-0.0, 0.0], [2.0, 0.0]])
    values, indices = _C.topk_fwd_cpu(q, k, 5, False)
    ev, ei = expected(q, k, 5, False)
    assert torch.equal(values.double(), ev) and torch.equal(indices, ei)


def test_nan_ranks_first():
    q, k = int_inputs(6, 20, 3, seed=1)
    k[7, 0] = float("nan")
    values, indices = _C.topk_fwd_cpu(q, k, 4, False)
    assert (indices[:, 0] == 7).all() and torch.isnan(values[:, 0]).all()
    sim = similarities(q, k, False)
    sim[:, 7] = float("-inf")
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :3]
    assert torch.equal(indices[:, 1:], order)


# ---------------------------------------------------------------------------------------------
# Real-valued inputs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("exclude_self", (False, True))
def test_random_inputs(dtype, exclude_self, slab_bytes):
    slab_bytes(20 * 64 * 4)
    g = torch.Generator().manual_seed(3)
    R, C, D, kk = 70, 300, 33, 17
    q = torch.randn(R, D, generator=g).to(dtype)
    k = torch.randn(C, D, generator=g).to(dtype)
    values, indices = _C.topk_fwd_cpu(q, k, kk, exclude_self)
    sim = similarities(q, k, exclude_self)
    ev, _ = torch.topk(sim, kk, dim=1)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.double(), ev, **tol)
    # the indices point at entries whose similarity is the value returned, each column once
    torch.testing.assert_close(sim.gather(1, indices), values.double(), **tol)
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all()
    assert (values[:, :-1] >= values[:, 1:]).all()
    if exclude_self:
        assert not (indices == torch.arange(R)[:, None]).any()


def test_generic_and_avx2_variants_agree(monkeypatch):
    q, k = int_inputs(40, 300, 5, F32, seed=6)
    res = []
    for isa in ("generic", "auto"):
        monkeypatch.setenv("FASTCL_CPU_ISA", isa)
        res.append(_C.topk_fwd_cpu(q, k, 25, True))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


def test_non_contiguous_inputs():
    q, k = int_inputs(30, 45, 6, F64, seed=2)
    wide = torch.zeros(30, 12, dtype=F64)
    wide[:, ::2] = q
    tall = torch.zeros(90, 6, dtype=F64)
    tall[::2] = k
    ev, ei = expected(q, k, 7, True)
    for qq, kk in ((wide[:, ::2], k.t().contiguous().t()), (q.t().contiguous().t(), tall[::2])):
        assert not qq.is_contiguous() or not kk.is_contiguous()
        values, indices = _C.topk_fwd_cpu(qq, kk, 7, True)
        assert torch.equal(values, ev) and torch.equal(indices, ei)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("q,k,kk,ex,match", [
    (torch.randn(4, 3), torch.randn(5, 3), 6, False, r"k must lie in \[1, 5\]"),
    (torch.randn(4, 3), torch.randn(5, 3), 5, True, r"k must lie in \[1, 4\].*exclude_self"),
    (torch.randn(4, 3), torch.randn(5, 3), 0, False, r"k must lie in \[1, 5\]"),
    (torch.randn(4, 3), torch.randn(5, 3), -2, False, r"got k = -2"),
    (torch.randn(4, 3), torch.randn(0, 3), 1, False, r"k must lie in \[1, 0\]"),
    (torch.randn(4), torch.randn(5, 3), 1, False, r"query must be a 2-D tensor"),
    (torch.randn(4, 3), torch.randn(5, 2), 1, False, r"query and key must have the same feature size"),
    (torch.randn(4, 3), torch.randn(5, 3, dtype=F64), 1, False, r"same dtype"),
    (torch.randint(0, 3, (4, 3)), torch.randint(0, 3, (5, 3)), 1, False, r"float32, float64"),
    (torch.randn(4, 3), torch.empty(5, 3, device="meta"), 1, False,
     r"expects CPU tensors, got meta for key"),
])
def test_bad_input(q, k, kk, ex, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        _C.topk_fwd_cpu(q, k, kk, ex)


# ---------------------------------------------------------------------------------------------
# Memory: nothing of size R x C


MEMORY_SCRIPT = """
    from fastcl import _C

    n, d, kk = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    q = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    k = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    _C.topk_fwd_cpu(q[:64], k[:64], 3, True)  # load libraries, start threads
    reset_peak()
    values, indices = _C.topk_fwd_cpu(q, k, kk, True)
    assert torch.isfinite(values).all()
    sim = q[:100] @ k.T
    sim[torch.arange(100), torch.arange(100)] = float("-inf")
    ref = torch.topk(sim, kk, dim=1).values
    assert torch.allclose(values[:100], ref, atol=1e-5)
    print(peak_growth())
"""


def test_peak_memory_is_linear():
    n, d, kk = 16384, 64, 10
    slab = 16 << 20
    growth = peak_rss_growth(MEMORY_SCRIPT, n, d, kk, env={"FASTCL_CPU_SLAB_BYTES": str(slab)})
    logits_bytes = n * n * 4
    assert growth < 0.1 * logits_bytes, (
        f"peak RSS grew by {growth / 2**20:.1f} MiB at N={n}: not far below the "
        f"{logits_bytes / 2**20:.0f} MiB of the similarities")
    # one slab, the outputs, the check's 100 rows of similarities, allocator slack
    linear = slab + n * kk * 16 + 2 * 100 * n * 4 + (24 << 20)
    assert growth < linear, f"peak RSS grew by {growth / 2**20:.1f} MiB, expected < {linear / 2**20:.0f} MiB"
