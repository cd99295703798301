"""Worker of tests/test_distributed.py: one rank computing every loss on its shard (gloo, CPU)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import fastcl
import fastcl.nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_distributed import LiveBytes  # noqa: E402

N_PER_RANK, D, V = 3, 5, 3
STRATEGIES = ("all_gather", "ring")
# cases whose every kernel call serves the whole loss (both log-sum-exps of the hard-negative
# loss, both directions of a symmetric loss): one per key block, forward and backward
# (name -> passes: cmc takes one per pair of views)
ONE_PASS = {"hcl_two_view": 1, "hcl_paired": 1, "clip": 1, "clip_smooth_sum": 1, "clip_negatives": 1,
            "cmc": V * (V - 1) // 2}
# the memory case: per-rank batch and width large enough that O(n) statistics are negligible
MEM_N, MEM_D = 64, 256


def global_inputs(world: int) -> dict:
    """The global batch, identical on every rank (same seed)."""
    g = torch.Generator().manual_seed(1234)
    n = N_PER_RANK * world
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {
        "x": r(n, D), "y": r(n, D), "views": r(V, n, D), "neg": r(4, D),
        "labels": torch.randint(0, max(2, n // 2), (n,), generator=g),
    }


# name -> (function of (inputs, shard slice or None, gather), names of the differentiated inputs)
def cases():
    def sl(t, s, dim=0):
        return t if s is None else t.narrow(dim, s.start, s.stop - s.start)

    return {
        "info_nce": (lambda I, s, g: fastcl.info_nce(sl(I["x"], s), sl(I["y"], s), temperature=0.5,
                                                      label_smoothing=0.1, gather=g), ("x", "y")),
        # the torch backend (reference under a shard) and the kernels' mean-count contract
        "info_nce_torch": (lambda I, s, g: fastcl.info_nce(
            sl(I["x"], s), sl(I["y"], s), temperature=0.5, label_smoothing=0.2,
            backend="reference", gather=g), ("x", "y")),
        # a queue of extra negatives that every rank holds (replicated, like the scale)
        "info_nce_negatives": (lambda I, s, g: fastcl.info_nce(
            sl(I["x"], s), sl(I["y"], s), negatives=I["neg"], temperature=0.5,
            label_smoothing=0.1, gather=g), ("x", "y", "neg")),
        # both directions from one pass, with local extra columns that only the rows see
        "clip_negatives": (lambda I, s, g: fastcl.info_nce(
            sl(I["x"], s), sl(I["y"], s), negatives=I["neg"], temperature=0.5, symmetric=True,
            symmetric_weight=0.75, label_smoothing=0.1, gather=g), ("x", "y", "neg")),
        "clip": (lambda I, s, g: fastcl.clip_loss(sl(I["x"], s), sl(I["y"], s), I["scale"],
                                                   symmetric_weight=0.75, gather=g),
                 ("x", "y", "scale")),
        "clip_smooth_sum": (lambda I, s, g: fastcl.clip_loss(
            sl(I["x"], s), sl(I["y"], s), I["scale"], label_smoothing=0.1, reduction="sum",
            gather=g), ("x", "y", "scale")),
        "clip_module": (lambda I, s, g: fastcl.nn.ClipLoss(gather=g)(sl(I["x"], s), sl(I["y"], s),
                                                                     I["scale"]),
                        ("x", "y", "scale")),
        "nt_xent": (lambda I, s, g: fastcl.nt_xent(sl(I["x"], s), sl(I["y"], s), temperature=0.5,
                                                    normalize=True, gather=g), ("x", "y")),
        "supcon": (lambda I, s, g: fastcl.supcon(torch.stack([sl(I["x"], s), sl(I["y"], s)], 1),
                                                  sl(I["labels"], s), temperature=0.5, gather=g),
                   ("x", "y")),
        "supcon_in_selfsup": (lambda I, s, g: fastcl.supcon(
            torch.stack([sl(I["x"], s), sl(I["y"], s)], 1), temperature=0.5, variant="in",
            gather=g), ("x", "y")),
        "dcl_w": (lambda I, s, g: fastcl.dcl(sl(I["x"], s), sl(I["y"], s), temperature=0.5,
                                              weighted=True, gather=g), ("x", "y")),
        "hcl_two_view": (lambda I, s, g: fastcl.hard_negative_nce(
            sl(I["x"], s), sl(I["y"], s), temperature=0.5, beta=0.5, tau_plus=0.1,
            normalize=True, gather=g), ("x", "y")),
        "hcl_paired": (lambda I, s, g: fastcl.hard_negative_nce(
            sl(I["x"], s), sl(I["y"], s), temperature=0.5, beta=1.0, tau_plus=0.0,
            layout="paired", normalize=True, gather=g), ("x", "y")),
        "mv_infonce": (lambda I, s, g: fastcl.multiview_loss(sl(I["views"], s, 1), temperature=0.5,
                                                             gather=g), ("views",)),
        "mv_dhel": (lambda I, s, g: fastcl.multiview_loss(sl(I["views"], s, 1), temperature=0.5,
                                                          method="mv_dhel", gather=g), ("views",)),
        "cmc": (lambda I, s, g: fastcl.multiview_loss(sl(I["views"], s, 1), temperature=0.5,
                                                      method="cmc", gather=g), ("views",)),
        "uniformity": (lambda I, s, g: fastcl.uniformity(sl(I["x"], s), gather=g), ("x",)),
        "align_uniform_module": (lambda I, s, g: fastcl.nn.AlignUniformLoss(
            0.5, 2.0, gather=g)(sl(I["x"], s), sl(I["y"], s)), ("x", "y")),
        "siglip": (lambda I, s, g: fastcl.siglip_loss(sl(I["x"], s), sl(I["y"], s), I["scale"],
                                                       I["bias"], gather=g),
                   ("x", "y", "scale", "bias")),
        "siglip_sum_module": (lambda I, s, g: fastcl.nn.SigLipLoss(
            normalize=True, reduction="sum", gather=g)(sl(I["x"], s), sl(I["y"], s),
                                                       I["scale"], I["bias"]),
            ("x", "y", "scale", "bias")),
    }


def run_case(name, world, shard=None, gather=None):
    fn, wrt = cases()[name]
    inputs = global_inputs(world)
    inputs["scale"] = torch.tensor(3.0, dtype=torch.float64)
    inputs["bias"] = torch.tensor(-2.0, dtype=torch.float64)
    for k in wrt:
        inputs[k].requires_grad_(True)
    loss = fn(inputs, shard, gather)
    grads = torch.autograd.grad(loss, [inputs[k] for k in wrt])
    return loss.detach(), {k: g for k, g in zip(wrt, grads)}


def ddp_train(world, rank=None, gather=None):
    """Two SGD steps of a linear two-tower model with the CLIP loss; returns the parameters."""
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 4).double()
    inputs = global_inputs(world)
    if rank is not None:
        model = torch.nn.parallel.DistributedDataParallel(model)
        s = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    else:
        s = slice(None)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        x, y = inputs["x"][s], inputs["y"][s]
        loss = fastcl.clip_loss(model(x), model(y), 3.0, gather=gather)
        opt.zero_grad()
        loss.backward()
        opt.step()
    module = model.module if rank is not None else model
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def peak_bytes(rank, gather):
    """Peak bytes of the tensors created during the forward, then the backward, of a one-way
    InfoNCE loss (one pass over the keys of every rank) on this rank."""
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(MEM_N, MEM_D, generator=g, requires_grad=True)
    y = torch.randn(MEM_N, MEM_D, generator=g, requires_grad=True)
    with LiveBytes() as mem:
        loss = fastcl.info_nce(x, y, temperature=0.1, gather=gather)
        forward = mem.peak
        mem.peak = mem.live
        loss.backward()
    return {"forward": forward, "backward": mem.peak}


def kernel_calls(name, gather):
    """``(forward, backward)`` kernel calls of the statistics op made by case ``name`` with
    ``gather`` (loss and gradients), counted at the ring's and the op layer's entry points."""
    from fastcl.distributed import ring
    from fastcl.ops import contrastive

    counts = {"fwd": 0, "bwd": 0}

    def counting(module, attr, key):
        real = getattr(module, attr)

        def call(*args, **kw):
            counts[key] += 1
            return real(*args, **kw)
        return real, call

    patched = [(m, attr, *counting(m, attr, key))
               for m in (ring, contrastive)
               for attr, key in (("contrastive_fwd", "fwd"), ("contrastive_bwd", "bwd"))]
    for module, attr, _real, call in patched:
        setattr(module, attr, call)
    try:
        world = dist.get_world_size()
        shard = slice(dist.get_rank() * N_PER_RANK, (dist.get_rank() + 1) * N_PER_RANK)
        run_case(name, world, shard, gather)
    finally:
        for module, attr, real, _call in patched:
            setattr(module, attr, real)
    return counts["fwd"], counts["bwd"]


# cases over the logits of one feature set with itself (the global square is symmetric)
SELF_SQUARE = ("nt_xent", "dcl_w", "mv_dhel", "supcon", "supcon_in_selfsup", "mv_infonce")


def logit_work(name, gather):
    """Logit entries this rank's forward computes for case ``name``: ``R * C`` per call of the
    statistics op, ``R * R / 2`` for a call on one feature set with itself (``k=None``)."""
    from fastcl.distributed import ring
    from fastcl.ops import contrastive

    real, work = contrastive.contrastive_fwd, []

    def call(q, k, *args, **kw):
        work.append(q.shape[0] * q.shape[0] / 2 if k is None else q.shape[0] * k.shape[0])
        return real(q, k, *args, **kw)
    for module in (ring, contrastive):
        module.contrastive_fwd = call
    try:
        world = dist.get_world_size()
        shard = slice(dist.get_rank() * N_PER_RANK, (dist.get_rank() + 1) * N_PER_RANK)
        run_case(name, world, shard, gather)
    finally:
        for module in (ring, contrastive):
            module.contrastive_fwd = real
    return sum(work)


def half_square_stats(world):
    """``Shard.stats`` of this rank's rows against every rank's, from the half square
    (``symmetric=True``) and from the whole rectangle, for several masks: a list of
    ``((lse, pos, npos, mean), gradients)`` pairs, the gradients those of a random weighting of
    every statistic with respect to the rows, the scale and the bias."""
    from fastcl.distributed import Shard

    sh, rank, m = Shard("all_gather"), dist.get_rank(), 2 * N_PER_RANK
    g = torch.Generator().manual_seed(99)
    x_all = torch.randn(world * m, D, generator=g, dtype=torch.float64)
    weights = torch.randn(4, world * m, generator=g, dtype=torch.float64)
    own = slice(rank * m, (rank + 1) * m)
    two_view = torch.arange(m).roll(m // 2)
    labels = torch.randint(0, 3, (world * m,), generator=g)[own]
    out = []
    for targets, lab, exclude_diag, decoupled in (
            (two_view, None, True, False), (two_view, None, True, True),
            (None, None, True, False), (two_view, None, False, True),
            (None, labels, True, False), (None, labels, False, False)):
        pair = []
        for symmetric in (True, False):
            x = x_all[own].clone().requires_grad_(True)
            a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
            b = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
            stats = sh.stats(x, x, a, b, targets, lab, lab, exclude_diag=exclude_diag,
                             decoupled=decoupled, symmetric=symmetric, backend="cpu")[:4]
            total = sum((w[own] * t).sum() for w, t in zip(weights, stats) if t.requires_grad)
            pair.append(([t.detach() for t in stats], torch.autograd.grad(total, [x, a, b])))
        out.append(pair)
    return out


def unequal_shards(rank, gather):
    """The error of a loss called with shards of different sizes (None if none was raised)."""
    x = torch.randn(N_PER_RANK + rank, D, dtype=torch.float64)
    try:
        fastcl.nt_xent(x, x, gather=gather)
    except ValueError as e:
        return str(e)
    return None


def compile_ring():
    """torch.compile around a ring loss: ``(eager loss, compiled loss, fullgraph error)``."""
    inputs = global_inputs(1)
    x, y = inputs["x"], inputs["y"]

    def f(a, b):
        return fastcl.clip_loss(a, b, 3.0, gather="ring")

    try:
        torch.compile(f, fullgraph=True)(x, y)
        error = None
    except Exception as e:  # the error raised while tracing, wrapped by the compiler
        error = str(e)
    torch._dynamo.reset()
    compiled = torch.compile(f)(x, y)
    return f(x, y), compiled, error


def compile_all_gather(world):
    """torch.compile(fullgraph=True) around the all_gather CLIP, NT-Xent and SupCon losses on
    this rank's shard: ``(eager loss, compiled loss, eager gradients, compiled gradients)``."""
    inputs = global_inputs(world)
    rank = dist.get_rank()
    shard = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    x = inputs["x"][shard].clone().requires_grad_(True)
    y = inputs["y"][shard].clone().requires_grad_(True)

    def f(a, b):  # column statistics merged across ranks; the half squares, SupCon's labels
        return (fastcl.clip_loss(a, b, 3.0, label_smoothing=0.1, gather="all_gather")
                + fastcl.nt_xent(a, b, temperature=0.5, gather="all_gather")
                + fastcl.supcon(torch.stack([a, b], 1), inputs["labels"][shard],
                                temperature=0.5, gather="all_gather"))

    eager = f(x, y)
    eager_grads = torch.autograd.grad(eager, [x, y])
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)(x, y)
    compiled_grads = torch.autograd.grad(compiled, [x, y])
    return eager.detach(), compiled.detach(), eager_grads, compiled_grads


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shard = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        results = {}
        for gather in STRATEGIES:
            results[gather] = {name: run_case(name, world, shard, gather) for name in cases()}
            results[gather]["ddp"] = ddp_train(world, rank, gather)
            results[gather]["peak_bytes"] = peak_bytes(rank, gather)
            results[gather]["unequal"] = unequal_shards(rank, gather)
            results[gather]["calls"] = {name: kernel_calls(name, gather) for name in ONE_PASS}
            results[gather]["work"] = {name: logit_work(name, gather) for name in SELF_SQUARE}
        results["half_square"] = half_square_stats(world)
        if world == 1:
            results["compile"] = compile_ring()
        if world <= 2:
            results["compile_all_gather"] = compile_all_gather(world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
