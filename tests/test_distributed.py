"""gather='all_gather' on 2 and 4 CPU processes (gloo) against one process on the global batch.

Convention under test (fastcl.distributed): the mean over ranks of the returned losses is the
global loss, and each rank's gradient with respect to its shard is world_size times the gradient
of the global loss with respect to that shard; a DDP model trained on the ranks ends with the
parameters of one process trained on the global batch.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dist_worker as W

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

TOL = dict(rtol=1e-9, atol=1e-10)


@pytest.fixture(scope="module", params=[2, 4])
def ranks(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"world{world}")
    mp.start_processes(W.worker, args=(world, str(tmp / "init"), str(tmp)), nprocs=world,
                       join=True, start_method="spawn")
    return world, [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("name", list(W.cases()))
def test_gathered_loss_and_gradients_match_one_process(ranks, name):
    world, results = ranks
    loss, grads = W.run_case(name, world)
    losses = torch.stack([res[name][0] for res in results])
    torch.testing.assert_close(losses.mean(), loss, **TOL)
    for key, full in grads.items():
        for rank, res in enumerate(results):
            got = res[name][1][key]
            if key == "scale":  # replicated: DDP averages it over ranks
                continue
            dim = 1 if key == "views" else 0
            start = rank * W.N_PER_RANK
            want = world * full.narrow(dim, start, W.N_PER_RANK)
            torch.testing.assert_close(got.narrow(dim, start, W.N_PER_RANK), want, **TOL,
                                       msg=f"{name}: d/d{key} on rank {rank}")
            outside = got.clone()
            outside.narrow(dim, start, W.N_PER_RANK).zero_()
            assert not outside.any(), f"{name}: rank {rank} wrote gradients outside its shard"
    if "scale" in grads:
        mean = torch.stack([res[name][1]["scale"] for res in results]).mean()
        torch.testing.assert_close(mean, grads["scale"], **TOL)


def test_ddp_two_steps_equal_one_process_on_the_global_batch(ranks):
    world, results = ranks
    want = W.ddp_train(world)
    for res in results:
        for k, v in want.items():
            torch.testing.assert_close(res["ddp"][k], v, **TOL)


def test_gather_needs_an_initialized_process_group():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        import fastcl

        fastcl.info_nce(x, x, temperature=0.1, gather="all_gather")


def test_unknown_gather_strategy_is_refused():
    import fastcl

    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="gather"):
        fastcl.nt_xent(x, x, gather="ring")
