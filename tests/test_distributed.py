"""gather="all_gather" and gather="ring" on 1, 2 and 4 CPU processes (gloo) against one process
on the global batch.

Convention under test (fastcl.distributed): the mean over ranks of the returned losses is the
global loss, and each rank's gradient with respect to its shard is world_size times the gradient
of the global loss with respect to that shard (replicated inputs: the mean over ranks of their
gradients is the global one); a DDP model trained on the ranks ends with the parameters of one
process trained on the global batch. Every world size is spawned once; its ranks compute every
case with both strategies.
"""

from __future__ import annotations

import functools
import tempfile
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dist_worker as W
from _processes import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

TOL = dict(rtol=1e-9, atol=1e-10)
REPLICATED = ("scale", "bias", "neg")  # inputs every rank holds in full


@functools.lru_cache(maxsize=None)
def _spawn(world: int) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(W.worker, args=(world, f"{tmp}/init", tmp), nprocs=world, join=True,
                           start_method="spawn")
        return [torch.load(f"{tmp}/rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module", params=[1, 2, 3, 4])
def ranks(request):
    return request.param, _spawn(request.param)


@pytest.mark.parametrize("gather", W.STRATEGIES)
@pytest.mark.parametrize("name", list(W.cases()))
def test_loss_and_gradients_match_one_process(ranks, gather, name):
    world, results = ranks
    loss, grads = W.run_case(name, world)
    losses = torch.stack([res[gather][name][0] for res in results])
    torch.testing.assert_close(losses.mean(), loss, **TOL)
    for key, full in grads.items():
        if key in REPLICATED:  # DDP averages their gradients over ranks
            mean = torch.stack([res[gather][name][1][key] for res in results]).mean(0)
            torch.testing.assert_close(mean, full, **TOL, msg=f"{name}: d/d{key}")
            continue
        for rank, res in enumerate(results):
            got = res[gather][name][1][key]
            dim = 1 if key == "views" else 0
            start = rank * W.N_PER_RANK
            want = world * full.narrow(dim, start, W.N_PER_RANK)
            torch.testing.assert_close(got.narrow(dim, start, W.N_PER_RANK), want, **TOL,
                                       msg=f"{name}: d/d{key} on rank {rank}")
            outside = got.clone()
            outside.narrow(dim, start, W.N_PER_RANK).zero_()
            assert not outside.any(), f"{name}: rank {rank} wrote gradients outside its shard"


@pytest.mark.parametrize("gather", W.STRATEGIES)
def test_ddp_two_steps_equal_one_process_on_the_global_batch(ranks, gather):
    world, results = ranks
    want = W.ddp_train(world)
    for res in results:
        for k, v in want.items():
            torch.testing.assert_close(res[gather]["ddp"][k], v, **TOL)


@pytest.mark.parametrize("gather", W.STRATEGIES)
def test_unequal_shards_are_refused(ranks, gather):
    world, results = ranks
    for res in results:
        if world == 1:
            assert res[gather]["unequal"] is None
        else:
            assert "needs equal shards on every rank" in res[gather]["unequal"]
            assert f"gather={gather!r}" in res[gather]["unequal"]


def test_ring_holds_at_most_two_foreign_key_blocks():
    """Per-rank shard fixed. Forward: the ring holds the block in hand and the one arriving (two
    foreign [n, D] blocks at most, plus O(n) statistics), all_gather the keys of every rank.
    Backward: two key blocks, the accumulator sent, the one arriving, this rank's contribution,
    dq and its per-block term: seven blocks at most, whatever the world size."""
    block = W.MEM_N * W.MEM_D * 4  # one fp32 [n, D] block
    slack = block // 4
    peak = {w: {g: {phase: max(res[g]["peak_bytes"][phase] for res in _spawn(w))
                    for phase in ("forward", "backward")} for g in W.STRATEGIES}
            for w in (2, 4)}
    for w in (2, 4):
        assert peak[w]["ring"]["forward"] <= 2 * block + slack, peak
        assert peak[w]["ring"]["backward"] <= 7 * block + slack, peak
        assert peak[w]["all_gather"]["forward"] >= w * block, peak
    assert peak[4]["ring"]["forward"] < peak[4]["all_gather"]["forward"] / 2, peak


@pytest.mark.parametrize("gather", W.STRATEGIES)
@pytest.mark.parametrize("name", W.ONE_PASS)
def test_one_kernel_call_per_key_block(ranks, gather, name):
    """Both log-sum-exps of the hard-negative loss (the second through the op's ``lse2``) and
    both directions of a symmetric loss (the second from the column statistics, merged across
    ranks) come from one kernel call per key block (per pair of views for cmc), forward and
    backward: ``world`` blocks on a ring, one gathered block with all_gather."""
    world, results = ranks
    blocks = world if gather == "ring" else 1
    want = (W.ONE_PASS[name] * blocks,) * 2
    for rank, res in enumerate(results):
        assert res[gather]["calls"][name] == want, (rank, res[gather]["calls"][name])


@pytest.mark.parametrize("name", W.SELF_SQUARE)
def test_all_gather_computes_half_of_a_symmetric_square(ranks, name):
    """NT-Xent, DCL, SupCon and the multi-view losses contrast one feature set with itself
    (the positives of SupCon's L_out from label sums, those of L_in without labels and of
    mv_infonce from each rank's own views): with all_gather each rank's forward computes half
    of its rows-by-all-columns rectangle (``world * m * m / 2`` logits for ``m`` rows per rank;
    odd ``m``: within ``m`` of it), and the ranks together half of the global square; the ring
    computes the whole rectangle."""
    world, results = ranks
    views = {"mv_dhel": 1, "mv_infonce": W.V}.get(name, 2)  # anchors per sample in one call
    m = views * W.N_PER_RANK
    per = W.V if name == "mv_dhel" else 1  # one call per view for DHEL
    half = per * world * m * m / 2
    work = [res["all_gather"]["work"][name] for res in results]
    assert sum(work) == world * half, work
    assert all(abs(w - half) <= per * m / 2 for w in work), (work, half)
    if m % 2 == 0:
        assert work == [half] * world, work
    if world > 1:
        assert [res["ring"]["work"][name] for res in results] == [2 * half] * world


def test_half_square_statistics_equal_the_whole_rectangle(ranks):
    """Every statistic of the half-square path (log-sum-exp, positive term and count, mean) and
    the gradients through them equal those of the rows-by-all-columns path, for the masks of
    NT-Xent, DCL, DHEL and labels (SupCon). The scale's and bias's gradients (replicated inputs)
    are compared summed over the ranks: the two paths split them between the ranks differently."""
    world, results = ranks
    for case in range(len(results[0]["half_square"])):
        sums = [0, 0]
        for res in results:
            (half, g_half), (full, g_full) = res["half_square"][case]
            for got, want in zip(half, full):
                torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"case {case}: {m}")
            torch.testing.assert_close(g_half[0], g_full[0], **TOL)
            sums = [sums[0] + torch.stack(g_half[1:]), sums[1] + torch.stack(g_full[1:])]
        torch.testing.assert_close(sums[0], sums[1], **TOL)


_ONE_ROW = textwrap.dedent(r'''
    import torch, torch.distributed as dist
    from _processes import process_group
    import fastcl
    with process_group() as (rank, world):
        g = torch.Generator().manual_seed(3)
        views = torch.randn(3, world, 4, generator=g, dtype=torch.float64)
        feats = torch.randn(world, 2, 4, generator=g, dtype=torch.float64)
        labels = torch.arange(world) // 2
        cases = [(views, 1, lambda x, lab, gather: fastcl.multiview_loss(
                      x, temperature=0.5, method="mv_dhel", gather=gather)),
                 (feats[:, :1], 0, lambda x, lab, gather: fastcl.supcon(
                      x, lab, temperature=0.5, gather=gather)),
                 (feats, 0, lambda x, lab, gather: fastcl.supcon(
                      x, temperature=0.5, variant="in", gather=gather))]
        for x_all, dim, fn in cases:
            x_all = x_all.clone().requires_grad_(True)
            want = fn(x_all, labels, None)
            (g_all,) = torch.autograd.grad(want, x_all)
            x = x_all.detach().narrow(dim, rank, 1).clone().requires_grad_(True)
            loss = fn(x, labels[rank:rank + 1], "all_gather")
            (g,) = torch.autograd.grad(loss, x)
            total = loss.detach().clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total / world, want, rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(g, world * g_all.narrow(dim, rank, 1), rtol=1e-9,
                                       atol=1e-11)
''')


@pytest.mark.parametrize("world", [2, 4])
def test_half_square_with_one_row_per_rank(tmp_path, world):
    """One row per rank: of the pair of ranks world / 2 apart, the lower one's share is empty
    (a call on zero columns, which keeps the backward's collectives the same on every rank);
    losses and gradients equal one process on the global batch."""
    run_ranks(_ONE_ROW, tmp_path, world=world)


@pytest.mark.parametrize("world", [1, 2])
def test_all_gather_compiles_with_fullgraph(world):
    """gather="all_gather" (the gathered keys and the column statistics merged by all_reduce,
    NT-Xent's half square) traces whole under torch.compile(fullgraph=True) and gives the eager
    loss and gradients."""
    for res in _spawn(world):
        eager, compiled, eager_grads, compiled_grads = res["compile_all_gather"]
        torch.testing.assert_close(compiled, eager, **TOL)
        for got, want in zip(compiled_grads, eager_grads):
            torch.testing.assert_close(got, want, **TOL)


def test_ring_under_torch_compile_runs_eagerly_or_is_refused_with_fullgraph():
    eager, compiled, error = _spawn(1)[0]["compile"]
    torch.testing.assert_close(compiled, eager, **TOL)
    assert error is not None and "gather='ring' is not supported under torch.compile" in error


@pytest.mark.parametrize("gather", W.STRATEGIES)
def test_gather_needs_an_initialized_process_group(gather):
    import fastcl

    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fastcl.info_nce(x, x, temperature=0.1, gather=gather)


def test_unknown_gather_strategy_is_refused():
    import fastcl

    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="gather"):
        fastcl.nt_xent(x, x, gather="tree")
    with pytest.raises(ValueError, match="gather"):
        fastcl.nn.NTXentLoss(gather="tree")


@pytest.mark.parametrize("more", ["some", "beyond_block"])
@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_backward_counts_den_from_the_npos_passed_in(backend, more):
    """The ring passes the global npos to each block and rescales g_mean by the block's count:
    the backward counts |den(r)| as max(C - [exclude_diag and r < C] - [decoupled] npos[r], 1)
    from the npos it is given (the contract of fastcl.reference.contrastive), also when the
    global positives outnumber the block's columns (the count is then clamped to 1)."""
    from fastcl.ops.contrastive import contrastive_bwd, contrastive_fwd
    from fastcl.reference.contrastive import contrastive_masks_ref

    if backend == "triton":
        pytest.importorskip("triton")
    dt = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=1e-5, atol=1e-6) if dt == torch.float32 else TOL
    g = torch.Generator().manual_seed(0)
    R, C, D = 5, 7, 4
    q = torch.randn(R, D, dtype=torch.float64, generator=g).to(dt)
    k = torch.randn(C, D, dtype=torch.float64, generator=g).to(dt)
    rl = torch.tensor([0, 1, 0, 2, 1])
    cl = torch.tensor([0, 0, 1, 3, 1, 0, 2])
    scale, bias = torch.tensor(2.0, dtype=dt), torch.tensor(0.0, dtype=dt)
    flags = (True, True, False, False)  # exclude_diag, decoupled, pos_lse, col_stats
    lse, pos, npos, _mean, col_lse, *_ = contrastive_fwd(q, k, scale, bias, None, rl, cl, *flags,
                                                         0.0, backend)
    # a caller's counts, not this block's
    npos_in = npos + (torch.arange(R) % 2 if more == "some" else C)
    g_mean = torch.randn(R, dtype=torch.float64, generator=g).to(dt)
    dq, dk, _ds, _db = contrastive_bwd(None, None, g_mean, None, None, q, k, scale, bias, None,
                                       rl, cl, lse, pos, npos_in, col_lse, *flags, None,
                                       lse.new_empty(0), 0.0, backend)
    _allowed, _pos, den = contrastive_masks_ref(R, C, None, rl, cl, True, True, q.device)
    count = (C - (torch.arange(R) < C).double() - npos_in.double()).clamp_min(1)
    G = den.double() * (g_mean.double() / count)[:, None]
    torch.testing.assert_close(dq.double(), 2.0 * G @ k.double(), **tol)
    torch.testing.assert_close(dk.double(), 2.0 * G.T @ q.double(), **tol)
