"""The Triton kernel of the tiled similarity search against torch.topk.

Inputs with small integer entries make every dot product exact in fp32 (and in bf16 / fp16
inputs), so the values must equal ``torch.topk`` of the materialized fp32 similarities bit for
bit and the ties are many; the indices must then be the expected ones under the kernel's
documented tie order (larger value first, then smaller index), which agrees with
``torch.topk`` up to ties. Random real-valued inputs are compared with a tolerance. Without
CUDA the kernel runs on CPU tensors through Triton's interpreter (small shapes).
"""

import os
import time

import pytest
import torch

if not torch.cuda.is_available():
    # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from _cases import expected, int_inputs_on, similarities  # noqa: E402
from _memory import LargestAllocation  # noqa: E402

import fastcl  # noqa: E402
from fastcl.kernels import contrastive as tc  # noqa: E402
from fastcl.kernels import topk as tk  # noqa: E402
from fastcl.ops import topk as ops  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

if not CUDA and not tc._INTERPRET:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set and there is no GPU",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def _fixed_config(monkeypatch):
    """Small tests launch one configuration instead of autotuning."""
    monkeypatch.setattr(tc, "AUTOTUNE", False)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

int_inputs = int_inputs_on(DEVICE)


def check_exact(q, k, kk, exclude_self, **kw):
    values, indices = tk.topk_fwd(q, k, kk, exclude_self, **kw)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == indices.shape == (q.shape[0], kk)
    # exactly torch.topk of the materialized fp32 similarities
    sim32 = q.float() @ k.float().T
    if exclude_self:
        n = min(q.shape[0], k.shape[0])
        sim32[torch.arange(n), torch.arange(n)] = float("-inf")
    ref_v, ref_i = torch.topk(sim32, kk, dim=1)
    assert torch.equal(values, ref_v)
    # indices equal up to ties: each one points at its value, and the deterministic tie order
    assert torch.equal(sim32.gather(1, indices), values)
    assert torch.equal(sim32.gather(1, ref_i), values)
    _, exp_i = expected(q, k, kk, exclude_self)
    assert torch.equal(indices.cpu(), exp_i.cpu())
    return values, indices


# --------------------------------------------------------------------------------------------
# exactness, shapes, ties, splits
# --------------------------------------------------------------------------------------------

CASES = [
    # (N, M, D, k, exclude_self, splits)
    (1, 1, 3, 1, False, None),
    (1, 2, 3, 1, True, None),
    (37, 53, 3, 7, True, None),
    (37, 29, 100, 29, False, None),            # k = M, D chunked
    (20, 70, 20, 1, True, 2),
    (17, 45, 8, 44, True, 3),                  # k = M - 1 with exclude_self
    (33, 150, 8, 128, False, 2),               # k = 128: wide buffer, several merges
    (45, 33, 5, 10, True, None),               # N > M: rows past M have no self column
]


@pytest.mark.parametrize("N,M,D,k,exclude_self,splits", CASES,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}-k{c[3]}" + ("-ex" if c[4] else "")
                              + (f"-s{c[5]}" if c[5] else "") for c in CASES])
def test_exact_against_torch_topk(N, M, D, k, exclude_self, splits):
    q, kk = int_inputs(N, M, D)
    check_exact(q, kk, k, exclude_self, splits=splits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_exact(dtype):
    q, k = int_inputs(29, 61, 20, dtype)
    check_exact(q, k, 9, True, splits=2)


def test_splits_agree():
    q, k = int_inputs(21, 100, 6, lo=-2, hi=2)          # values in a narrow range: many ties
    ref = tk.topk_fwd(q, k, 12, False, splits=1)
    for s in (2, 3, 7):
        out = tk.topk_fwd(q, k, 12, False, splits=s)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), s


def test_all_ties():
    """Every similarity equal: the k smallest indices (minus the query's own) in order."""
    q = torch.ones(18, 4, device=DEVICE)
    k = torch.ones(40, 4, device=DEVICE)
    values, indices = tk.topk_fwd(q, k, 6, True, splits=2)
    assert (values == 4).all()
    for i in range(18):
        want = [j for j in range(40) if j != i][:6]
        assert indices[i].tolist() == want


def test_random_inputs_close():
    """Real-valued inputs: values within fp32 rounding of the fp64 similarities."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(37, 40, generator=g).to(DEVICE)
    k = torch.randn(90, 40, generator=g).to(DEVICE)
    values, indices = tk.topk_fwd(q, k, 16, True, splits=2)
    sim = similarities(q, k, True)
    ref_v = torch.topk(sim, 16, dim=1).values
    torch.testing.assert_close(values.double(), ref_v, rtol=0, atol=1e-5)
    torch.testing.assert_close(sim.gather(1, indices), values.double(), rtol=0, atol=1e-5)
    assert (indices != torch.arange(37, device=DEVICE)[:, None]).all()
    assert all(len(set(r)) == 16 for r in indices.tolist())


def test_noncontiguous_inputs():
    q, k = int_inputs(23, 41, 12)
    q_t = q.T.contiguous().T
    k_big = torch.zeros(2 * 41, 12 + 5, device=DEVICE)
    k_big[::2, 2:14] = k
    k_s = k_big[::2, 2:14]
    assert not q_t.is_contiguous() and not k_s.is_contiguous()
    a = check_exact(q, k, 5, True)
    b = check_exact(q_t, k_s, 5, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_query_chunks_and_large_k_fallback(monkeypatch):
    """Rows processed in several launches (small scratch budget), and k above MAX_K."""
    q, k = int_inputs(300, 50, 4)
    ref = tk.topk_fwd(q, k, 5, True)
    monkeypatch.setattr(tk, "SCRATCH_BYTES", 1)           # one 128-row chunk per launch
    out = tk.topk_fwd(q, k, 5, True)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    monkeypatch.setattr(tk, "MAX_K", 4)                   # materialized slabs
    q2, k2 = int_inputs(9, 30, 4)
    check_exact(q2, k2, 7, True)


def test_no_quadratic_allocation():
    """No tensor as large as the fp32 N x M similarities is created (the int64 scratch is
    ``splits x N x W`` with ``W ~ 2k``; the interpreter also views it as bytes)."""
    N, M, D = 40, 600, 3
    q, k = int_inputs(N, M, D)
    with LargestAllocation() as rec:
        tk.topk_fwd(q, k, 5, True)
        tk.topk_fwd(q, k, 5, False, splits=3)
        fastcl.topk_similarity(q, k, 5, exclude_self=True, backend="triton")
    assert rec.largest_bytes[0] < N * M * 4, rec.largest_bytes


# --------------------------------------------------------------------------------------------
# the custom op and the public function
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    q, k = int_inputs(7, 11, 5)
    for kk, ex in ((3, False), (10, True)):
        torch.library.opcheck(ops.topk_fwd, (q, k, kk, ex, backend))


def test_public_function():
    q, k = int_inputs(25, 31, 6)
    v, i = fastcl.topk_similarity(q, k, 4, exclude_self=True, backend="triton")
    rv, ri = fastcl.topk_similarity(q, k, 4, exclude_self=True, backend="reference")
    assert torch.equal(v, rv)
    sim = q @ k.T
    assert torch.equal(sim.gather(1, i), v)
    qg = q.clone().requires_grad_(True)
    v2, _ = fastcl.topk_similarity(qg, k, 4, backend="triton")
    assert not v2.requires_grad                    # no gradient through the search


# --------------------------------------------------------------------------------------------
# real sizes on a GPU
# --------------------------------------------------------------------------------------------

def chunked_torch_topk(q, k, kk, chunk=65536, fp32=False):
    """Baseline: materialized similarity slabs of ``chunk`` keys, torch.topk, then a merge."""
    vals, idxs = [], []
    for c0 in range(0, k.shape[0], chunk):
        kc = k[c0:c0 + chunk]
        sim = (q.float() @ kc.float().T) if fp32 else (q @ kc.T)
        v, i = torch.topk(sim, min(kk, sim.shape[1]), dim=1)
        vals.append(v.float())
        idxs.append(i + c0)
    v, pos = torch.topk(torch.cat(vals, 1), kk, dim=1)
    return v, torch.cat(idxs, 1).gather(1, pos)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
class TestGPU:
    @pytest.fixture(autouse=True)
    def _autotune(self, monkeypatch):
        monkeypatch.setattr(tc, "AUTOTUNE", True)

    @pytest.mark.parametrize("N,M,D,k,dtype", [
        (1000, 50000, 64, 7, torch.bfloat16),
        (2048, 100003, 100, 128, torch.float16),
        (512, 20000, 256, 1000, torch.bfloat16),
        (777, 30000, 32, 16, torch.float32),
    ])
    def test_exact_integer_inputs(self, N, M, D, k, dtype):
        q, key = int_inputs(N, M, D, dtype, lo=-2, hi=2)
        check_exact(q, key, k, True)

    def test_one_million_keys(self):
        N, M, D, k = 4096, 1 << 20, 768, 128
        g = torch.Generator(device=DEVICE).manual_seed(0)
        q = torch.nn.functional.normalize(
            torch.randn(N, D, device=DEVICE, generator=g), dim=1).to(torch.bfloat16)
        key = torch.nn.functional.normalize(
            torch.randn(M, D, device=DEVICE, generator=g), dim=1).to(torch.bfloat16)
        values, indices = tk.topk_fwd(q, key, k, False)        # autotune
        torch.cuda.synchronize()

        def timed(fn, reps=3):
            fn()
            torch.cuda.synchronize()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            return sorted(ts)[len(ts) // 2]

        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t_fast = timed(lambda: tk.topk_fwd(q, key, k, False))
        extra = torch.cuda.max_memory_allocated() - base
        t_torch = timed(lambda: chunked_torch_topk(q, key, k))
        print(f"\ntopk {N} x {M} x {D} bf16, k={k}: fastcl {t_fast * 1e3:.1f} ms "
              f"(extra {extra / 2**20:.0f} MiB), chunked torch.topk {t_torch * 1e3:.1f} ms "
              f"({t_torch / t_fast:.2f}x)")
        assert extra < (1 << 30), extra
        # against fp32 similarities of the same bf16 inputs
        ref_v, _ = chunked_torch_topk(q, key, k, fp32=True)
        torch.testing.assert_close(values, ref_v, rtol=0, atol=1e-4)
        got = torch.einsum("nd,nkd->nk", q.float(), key[indices].float())
        torch.testing.assert_close(got, values, rtol=0, atol=1e-4)
        assert (indices.sort(1).values.diff(dim=1) > 0).all()       # distinct per row
