"""Symmetric CLIP loss (or, with ``--loss siglip``, the sigmoid loss; with ``--loss ntxent``,
NT-Xent over two views of N samples, 2N anchors; with ``--loss infonce``, InfoNCE in one
direction; with ``--loss hcl``, the hard-negative loss over two views), forward + backward:
fastcl against its baselines, in one process.

Implementations (each skipped with a note where it cannot run):

- ``eager``: materialized logits and ``F.cross_entropy`` in both directions (what open_clip does);
- ``compile``: the same function under ``torch.compile``;
- ``infcl``: Inf-CL's Triton loss (``pip install inf-cl``), both directions;
- ``open_clip``: open_clip's ``ClipLoss`` where open_clip is installed;
- ``pml`` and ``pml-supcon``: pytorch-metric-learning's ``NTXentLoss`` and ``SupConLoss`` in their
  cross-batch form, both directions, where the package is installed
  (:func:`benchmarks._common.pml_info_nce`; ``NTXentLoss`` refuses above a few hundred rows);
- ``fastcl-<backend>``: :func:`fastcl.clip_loss` (``siglip_loss``, ``nt_xent``, ``info_nce``)
  on each available backend; for NT-Xent on Triton and CUDA C++ also ``fastcl-<backend>-pairs``,
  the same loss without the self-similarity paths (Triton: separate dq and dk launches instead
  of the one-launch symmetric backward; CUDA C++: the forward and the backward of two feature
  sets, on every block, instead of the fused sweep on the blocks on and below the diagonal), to
  compare them;
  on Triton ``fastcl-triton-noslabs``, without the schedule by slabs (column statistics in a
  second launch, the backward in one launch per orientation at every ``D``), against the
  default, which from ``SLAB_MIN_D`` features on takes the column statistics from the row pass
  and the backward by slabs of ``G`` and GEMMs; and ``fastcl-triton-acc``, the backward by
  slabs with ``SLAB_ACCUMULATE`` (the gradient of the columns accumulated from the slabs of
  rows: one logit recompute instead of two, for an fp32 ``C x D`` buffer); for NT-Xent also
  ``fastcl-triton-squarefwd`` and ``fastcl-triton-halffwd``, the forward over the full square
  of logits, or over the blocks on and below the diagonal, whatever the size (the default
  takes the half square where the full one would take more than one wave of programs); for
  NT-Xent on CUDA C++ ``fastcl-cuda-stats``, the loss through the statistics op and its
  backward (``reduction="none"``, then averaged: the path of the unreduced and multi-view
  losses) instead of the fused sweep, and ``fastcl-cuda-stats-squarefwd``, the same with the
  forward over the full square instead of the blocks on and below the diagonal; for the
  hard-negative loss (``hard_negative_nce``, ``beta = 1``, ``tau_plus = 0.1``; eager: its
  materializing reference) ``fastcl-<backend>-twopass``, the second log-sum-exp of the
  negatives from a second run of the kernels (:func:`benchmarks._common.lse2_second_pass`)
  instead of the same pass.

For every N it reports the median time of forward + backward, the peak memory beyond the inputs,
effective TFLOP/s (``8 N^2 D / s``: four GEMMs; ``6 N^2 D / s`` for SigLIP, whose gradient is
known in the forward; ``32 N^2 D / s`` for NT-Xent and the hard-negative loss, four GEMMs over
their 2N x 2N logits) and
ratios to eager and to Inf-CL, as a
Markdown table and as JSON (``--json``). GPU: CUDA events around ``triton.testing.do_bench``-like
repeats, memory from ``torch.cuda.max_memory_allocated``. CPU: wall time only.

    python -m benchmarks.bench_clip --n 4096 8192 16384 32768 65536 --d 1024 --dtype bf16
    python -m benchmarks.bench_clip --loss siglip --n 16384 65536 --d 1024
    python -m benchmarks.bench_clip --loss ntxent --n 16384 32768 --d 1024
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch
import torch.nn.functional as F

import fastcl
from fastcl import dispatch

from ._common import (DTYPES, PML_LOSSES, eager_clip, eager_info_nce, eager_nt_xent,
                      eager_siglip, environment, infcl_clip, keys_given, lse2_second_pass,
                      open_clip_clip, pml_clip, self_forward, slab_accumulate, timed,
                      without_slabs)

def hard_negatives(x, y, s, backend):
    """The hard-negative loss over the two views ``x`` and ``y`` (``beta = 1``,
    ``tau_plus = 0.1``, temperature ``1 / s``)."""
    return fastcl.hard_negative_nce(x, y, temperature=1 / s, beta=1.0, tau_plus=0.1,
                                    backend=backend)


# per loss: the eager baseline, fastcl's function f(x, y, scale, backend), the op that
# dispatch checks, and the GEMMs' worth of work counted in the effective TFLOP/s (in units of
# 2 N^2 D)
LOSSES = {
    "clip": (eager_clip, lambda x, y, s, be: fastcl.clip_loss(x, y, s, backend=be),
             "info_nce", 4),
    "siglip": (eager_siglip, lambda x, y, s, be: fastcl.siglip_loss(x, y, s, -10.0, backend=be),
               "siglip_loss", 3),
    "ntxent": (eager_nt_xent, lambda x, y, s, be: fastcl.nt_xent(x, y, logit_scale=s, backend=be),
               "nt_xent", 16),
    "infonce": (eager_info_nce,
                lambda x, y, s, be: fastcl.info_nce(x, y, logit_scale=s, backend=be),
                "info_nce", 4),
    "hcl": (lambda x, y, s: hard_negatives(x, y, s, "reference"), hard_negatives,
            "hard_negative_nce", 16),
}


def implementations(device: torch.device, dtype: torch.dtype, which, loss: str = "clip"):
    """``{name: f(x, y, scale) -> loss}`` of every implementation that can run here."""
    eager, fast, op, _gemms = LOSSES[loss]
    impls = {"eager": eager}
    if device.type == "cuda":
        impls["compile"] = torch.compile(eager)
    if loss == "clip":
        infcl = infcl_clip() if device.type == "cuda" else None
        if infcl is not None:
            impls["infcl"] = infcl
        oc = open_clip_clip()
        if oc is not None:
            impls["open_clip"] = oc
        for kind in PML_LOSSES:
            pml = pml_clip(kind)
            if pml is not None:
                impls["pml" if kind == "ntxent" else f"pml-{kind}"] = pml
    for backend in ("triton", "cuda", "cpu"):
        if dispatch.why_not(backend, op, device, dtype) is None:
            impls[f"fastcl-{backend}"] = (lambda x, y, s, _b=backend: fast(x, y, s, _b))
            if loss == "hcl":
                impls[f"fastcl-{backend}-twopass"] = _in_context(
                    fast, backend, lambda _b=backend: lse2_second_pass(_b))
                continue
            if loss == "ntxent" and backend in ("triton", "cuda"):
                impls[f"fastcl-{backend}-pairs"] = _pairs(fast, backend)
            if backend == "triton":
                impls[f"fastcl-{backend}-noslabs"] = _in_context(fast, backend, without_slabs)
                impls[f"fastcl-{backend}-acc"] = _in_context(fast, backend, slab_accumulate)
                if loss == "ntxent":
                    for mode in ("square", "half"):
                        impls[f"fastcl-{backend}-{mode}fwd"] = _in_context(
                            fast, backend, lambda _m=mode: self_forward(_m))
            if loss == "ntxent" and backend == "cuda":
                impls["fastcl-cuda-stats"] = lambda x, y, s: nt_xent_unreduced(x, y, s, "cuda")
                impls["fastcl-cuda-stats-squarefwd"] = _in_context(
                    nt_xent_unreduced, backend, lambda: self_forward("square", "cuda"))
    return {k: v for k, v in impls.items() if not which or k in which}


def nt_xent_unreduced(x, y, s, backend):
    """NT-Xent through the statistics op and its backward: the per-anchor losses
    (``reduction="none"``), then their mean, instead of the fused one-sweep path."""
    return fastcl.nt_xent(x, y, logit_scale=s, reduction="none", backend=backend).mean()


def _pairs(fast, backend):
    """fastcl's loss without the self-similarity paths (``-pairs``): the statistics op with the
    keys passed as a second feature set (:func:`benchmarks._common.keys_given`), so that its
    backward is that of two feature sets (and no fused sweep over the symmetric logits), for an
    A/B comparison in the same process."""

    def fn(x, y, s):
        with keys_given():
            return fast(x, y, s, backend)
    return fn


def _in_context(fast, backend, context):
    """fastcl's loss with another schedule: ``context()`` (``without_slabs``,
    ``slab_accumulate``, ``self_forward`` of :mod:`benchmarks._common`) around forward and
    backward, as its ``step_context``, against the default in the same process."""

    def fn(x, y, s):
        return fast(x, y, s, backend)
    fn.step_context = context
    return fn


def measure(fn, n: int, d: int, dtype, device, reps: int, seed: int = 0, gemms: int = 4,
            warmup: int = 2) -> dict:
    """Median time, peak extra memory and effective TFLOP/s of forward + backward (under
    ``fn.step_context()`` where ``fn`` has one)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = F.normalize(torch.randn(n, d, device=device, generator=gen, dtype=torch.float32), dim=1)
    y = F.normalize(torch.randn(n, d, device=device, generator=gen, dtype=torch.float32), dim=1)
    x = x.to(dtype).requires_grad_(True)
    y = y.to(dtype).requires_grad_(True)
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)

    context = getattr(fn, "step_context", contextlib.nullcontext)

    def step():
        x.grad = y.grad = scale.grad = None
        with context():
            loss = fn(x, y, scale)
            loss.backward()
        return loss.detach()

    r = timed(step, device, reps, warmup=warmup)
    if "error" in r:
        return r
    return {"seconds": r["seconds"], "extra_bytes": r["extra_bytes"], "loss": float(r["out"]),
            "tflops": 2 * gemms * n * n * d / r["seconds"] / 1e12}


def table(records: list[dict]) -> str:
    lines = ["| N | D | dtype | impl | ms | extra GB | TFLOP/s | vs eager | vs infcl |",
             "|---|---|---|---|---|---|---|---|---|"]
    by_key = {}
    for r in records:
        by_key.setdefault((r["n"], r["d"], r["dtype"]), {})[r["impl"]] = r
    for (n, d, dt), group in by_key.items():
        for impl, r in group.items():
            if "error" in r:
                lines.append(f"| {n} | {d} | {dt} | {impl} | {r['error']} | | | | |")
                continue
            gb = "" if r["extra_bytes"] is None else f"{r['extra_bytes'] / 1e9:.3f}"
            ratios = []
            for base in ("eager", "infcl"):
                b = group.get(base)
                ratios.append(f"{b['seconds'] / r['seconds']:.2f}x" if b and "seconds" in b else "")
            lines.append(f"| {n} | {d} | {dt} | {impl} | {r['seconds'] * 1e3:.2f} | {gb} | "
                         f"{r['tflops']:.1f} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", choices=tuple(LOSSES), default="clip")
    p.add_argument("--n", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--d", type=int, nargs="+", default=[512])
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impl", nargs="*", default=None, help="subset of implementations to run")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--max-eager-n", type=int, default=None,
                   help="skip the materializing baselines (eager, compile, open_clip, "
                   "pml*) above this N (they need N^2 memory)")
    p.add_argument("--json", default=None, help="write the records and environment here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    impls = implementations(device, dtype, args.impl, args.loss)
    gemms = LOSSES[args.loss][3]
    records = []
    for d in args.d:
        for n in args.n:
            for name, fn in impls.items():
                if (args.max_eager_n and n > args.max_eager_n
                        and (name in ("eager", "compile", "open_clip") or name.startswith("pml"))):
                    rec = {"error": "skipped (N^2 memory)"}
                else:
                    rec = measure(fn, n, d, dtype, device, args.reps, gemms=gemms)
                rec.update(n=n, d=d, dtype=str(dtype).replace("torch.", ""), impl=name,
                           loss=args.loss)
                records.append(rec)
                shown = (f"{rec['seconds'] * 1e3:9.2f} ms" if "seconds" in rec else rec["error"])
                print(f"N={n:<8d} D={d:<5d} {name:<14s} {shown}", flush=True)
    print()
    print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(device), "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
