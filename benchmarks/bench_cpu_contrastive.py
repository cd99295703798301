"""Symmetric CLIP loss on CPU, forward + backward: the fused C++ kernels against the baselines.

Implementations:

- ``eager``: materialized logits, ``F.cross_entropy`` in both directions;
- ``fastcl``: :func:`fastcl.clip_loss` with ``backend="cpu"`` (the compiled kernels of
  ``fastcl._C``);
- ``compile``: ``eager`` under ``torch.compile`` (compiled at the measured size in the warm-up);
- ``open_clip``: open_clip's ``ClipLoss`` (where open_clip is installed);
- ``slabs``: what a careful user writes without custom kernels: row slabs of plain PyTorch ops
  (1024 rows), logits recomputed in the backward;
- ``pml`` and ``pml-supcon``: pytorch-metric-learning's ``NTXentLoss`` and ``SupConLoss`` in
  their cross-batch form, both directions (where the package is installed; see
  :func:`benchmarks._common.pml_info_nce`). ``NTXentLoss`` holds N x N(N - 1) pair masks and
  refuses above a few hundred rows; ``SupConLoss`` holds several N x N buffers and int64 pair
  indices (~70 bytes per logit);
- ``eager-one``, ``fastcl-one``, ``pml-one`` and ``pml-supcon-one``: one direction only (InfoNCE,
  query -> key), eager ``F.cross_entropy`` and pytorch-metric-learning against
  :func:`fastcl.info_nce`; their ratios are taken to ``eager-one``;
- ``eager-ntxent`` and ``fastcl-ntxent``: NT-Xent (SimCLR) over two views of N / 2 samples, so
  that its logit matrix is N x N like the others': eager ``F.cross_entropy`` on the concatenated
  views with the diagonal masked, against :func:`fastcl.nt_xent` (whose CPU kernel uses the
  symmetry of that matrix); their ratios are taken to ``eager-ntxent``;
- ``fastcl-stats-ntxent`` and ``fastcl-pairs-ntxent``: the same loss through the statistics op
  and its backward (the per-anchor losses, ``reduction="none"``, then averaged; the path of the
  multi-view losses and of the unreduced ones), with ``k=None`` (the symmetric backward) and
  with the keys passed as a second feature set (``k = z``: the two-feature-set backward), an
  A/B of the symmetric backward in the same run;
- ``eager-hcl``, ``fastcl-hcl`` and ``fastcl-hcl-twopass``: the hard-negative loss
  (:func:`fastcl.hard_negative_nce`, ``beta = 1``, ``tau_plus = 0.1``) over two views of N / 2
  samples: the materializing reference, the C++ kernels with both log-sum-exps of the
  negatives from one pass (the statistics op's ``lse2``), and the same with the second one from
  a second run of the kernels (:func:`benchmarks._common.lse2_second_pass`), an A/B of the
  one-pass ``lse2`` in the same run; their ratios are taken to ``eager-hcl``.

Each implementation runs in a fresh subprocess (so its peak RSS is its own): one warm-up at a
small size, then ``--reps`` timed forward + backward passes on unit-norm fp32 inputs with logit
scale 1/0.07 (a leaf that requires grad, as in CLIP). Reported: the median time, the peak RSS
beyond what the process held before the pass (reset through ``/proc/self/clear_refs``), the
effective GFLOP/s (``8 N^2 D / s``, four GEMMs), and the ratios to eager.

    python -m benchmarks.bench_cpu_contrastive --n 16384 --d 256
    python -m benchmarks.bench_cpu_contrastive --n 8192 16384 32768 --impl eager fastcl slabs --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from ._common import (RssPeak, eager_clip, eager_info_nce, eager_nt_xent, keys_given,
                      lse2_second_pass, open_clip_clip, pml_clip, pml_info_nce)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# pytorch-metric-learning's losses by implementation name: (kind, symmetric)
PML = {"pml": ("ntxent", True), "pml-supcon": ("supcon", True),
       "pml-one": ("ntxent", False), "pml-supcon-one": ("supcon", False)}
IMPLS = ("eager", "fastcl", "compile", "open_clip", "slabs", "eager-one", "fastcl-one",
         "eager-ntxent", "fastcl-ntxent", "fastcl-stats-ntxent", "fastcl-pairs-ntxent",
         "eager-hcl", "fastcl-hcl", "fastcl-hcl-twopass", *PML)
# losses other than the symmetric CLIP loss, by the part of their implementations' names
SUFFIXES = ("-one", "-ntxent", "-hcl")
# the two-view losses (N / 2 samples per view: N logit rows in all)
TWO_VIEWS = ("-ntxent", "-hcl")


def suffix(impl: str) -> str:
    """``"-one"`` (InfoNCE, one direction), ``"-ntxent"``, ``"-hcl"`` (hard negatives) or
    ``""`` (symmetric CLIP)."""
    return next((x for x in SUFFIXES if x in impl), "")


def baseline(impl: str) -> str:
    """The eager implementation of ``impl``'s loss, which its ratios are taken to."""
    return "eager" + suffix(impl)


# ---------------------------------------------------------------------------------------------
# The losses


def fastcl_clip(q, k, scale):
    import fastcl

    return fastcl.clip_loss(q, k, scale, backend="cpu")


class _SlabCLIP(torch.autograd.Function):
    """Symmetric CLIP loss in row slabs of plain PyTorch ops (no N x N buffer)."""

    ROWS = 1024

    @staticmethod
    def forward(ctx, q, k, scale):
        n, rows = q.shape[0], _SlabCLIP.ROWS
        lse = torch.empty(n)
        col_m = torch.full((n,), float("-inf"))
        col_s = torch.zeros(n)
        diag = (q * k).sum(1) * scale
        for r0 in range(0, n, rows):
            s = scale * (q[r0:r0 + rows] @ k.T)
            lse[r0:r0 + rows] = torch.logsumexp(s, 1)
            m = torch.maximum(col_m, s.max(0).values)
            col_s = col_s * torch.exp(col_m - m) + torch.exp(s - m).sum(0)
            col_m = m
        col_lse = col_m + torch.log(col_s)
        ctx.save_for_backward(q, k, scale, lse, col_lse)
        return 0.5 * (lse - diag).mean() + 0.5 * (col_lse - diag).mean()

    @staticmethod
    def backward(ctx, g):
        q, k, scale, lse, col_lse = ctx.saved_tensors
        n, rows = q.shape[0], _SlabCLIP.ROWS
        dq, dk = torch.empty_like(q), torch.zeros_like(k)
        dscale = torch.zeros(())
        w = g / (2 * n)
        for r0 in range(0, n, rows):
            qs = q[r0:r0 + rows]
            raw = qs @ k.T
            s = scale * raw
            G = torch.exp(s - lse[r0:r0 + rows, None]) + torch.exp(s - col_lse[None, :])
            idx = torch.arange(r0, min(r0 + rows, n))
            G[idx - r0, idx] -= 2
            G *= w
            dscale += (G * raw).sum()
            dq[r0:r0 + rows] = scale * (G @ k)
            dk.addmm_(G.T, qs, alpha=float(scale))
        return dq, dk, dscale


def slab_clip(q, k, scale):
    return _SlabCLIP.apply(q, k, scale)


def fastcl_one_direction(q, k, scale):
    import fastcl

    return fastcl.info_nce(q, k, logit_scale=scale, backend="cpu")


def fastcl_nt_xent(z1, z2, scale):
    import fastcl

    return fastcl.nt_xent(z1, z2, logit_scale=scale, backend="cpu")


def fastcl_nt_xent_stats(z1, z2, scale):
    import fastcl

    return fastcl.nt_xent(z1, z2, logit_scale=scale, reduction="none", backend="cpu").mean()


def fastcl_nt_xent_pairs(z1, z2, scale):
    """fastcl_nt_xent_stats with the keys given as a second feature set (k = z, not None)."""
    with keys_given():
        return fastcl_nt_xent_stats(z1, z2, scale)


def _hcl(backend: str):
    def loss(z1, z2, scale):
        import fastcl

        return fastcl.hard_negative_nce(z1, z2, temperature=1 / scale, beta=1.0, tau_plus=0.1,
                                        backend=backend)
    return loss


def fastcl_hcl_twopass(z1, z2, scale):
    """The hard-negative loss with the second log-sum-exp from a second run of the kernels."""
    with lse2_second_pass("cpu"):
        return _hcl("cpu")(z1, z2, scale)


def _loss(impl: str):
    if impl == "compile":
        return torch.compile(eager_clip)
    if impl == "open_clip":
        fn = open_clip_clip()
        if fn is None:
            raise RuntimeError("open_clip is not installed")
        return fn
    if impl in PML:
        kind, symmetric = PML[impl]
        fn = (pml_clip if symmetric else pml_info_nce)(kind)
        if fn is None:
            raise RuntimeError("pytorch-metric-learning is not installed")
        return fn
    return {"eager": eager_clip, "fastcl": fastcl_clip, "slabs": slab_clip,
            "eager-one": eager_info_nce, "fastcl-one": fastcl_one_direction,
            "eager-ntxent": eager_nt_xent, "fastcl-ntxent": fastcl_nt_xent,
            "fastcl-stats-ntxent": fastcl_nt_xent_stats,
            "fastcl-pairs-ntxent": fastcl_nt_xent_pairs,
            "eager-hcl": _hcl("reference"), "fastcl-hcl": _hcl("cpu"),
            "fastcl-hcl-twopass": fastcl_hcl_twopass}[impl]


# ---------------------------------------------------------------------------------------------
# Worker: one implementation in its own process


def _inputs(n: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(True)
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    return q, k, scale


def _step(loss_fn, q, k, scale):
    for x in (q, k, scale):
        x.grad = None
    loss = loss_fn(q, k, scale)
    loss.backward()
    return loss


def worker(impl: str, n: int, d: int, reps: int, seed: int) -> dict:
    loss_fn = _loss(impl)
    rows = n // 2 if suffix(impl) in TWO_VIEWS else n  # two views: N logit rows in all
    # warm-up: libraries, thread pools, the extension; torch.compile at the measured size
    _step(loss_fn, *_inputs(n if impl == "compile" else 256, d, seed))
    q, k, scale = _inputs(rows, d, seed)
    times, peaks = [], []
    loss = None
    can_reset = True
    for _ in range(reps):
        for x in (q, k, scale):
            x.grad = None
        with RssPeak() as peak:
            t0 = time.perf_counter()
            loss = _step(loss_fn, q, k, scale)
            times.append(time.perf_counter() - t0)
        can_reset = can_reset and peak.reset
        peaks.append(peak.extra)
    return dict(impl=impl, n=n, d=d, times_s=times, time_s=statistics.median(times),
                peak_extra_bytes=max(peaks), peak_reset=can_reset, loss=float(loss.detach()),
                grad_norms=[float(x.grad.norm()) for x in (q, k, scale)],
                threads=torch.get_num_threads())


# ---------------------------------------------------------------------------------------------
# Driver


def run_one(impl: str, n: int, d: int, reps: int, seed: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_cpu_contrastive", "--worker", impl,
           "--n", str(n), "--d", str(d), "--reps", str(reps), "--seed", str(seed)]
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(impl=impl, n=n, d=d, error=f"timed out after {timeout:.0f} s")
    if out.returncode != 0:
        # a traceback's last line names the exception (kept short: it goes into table cells)
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:]
        return dict(impl=impl, n=n, d=d, error=tail[0] if tail else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def table(results: list) -> str:
    rows = ["| N x D | impl | fwd+bwd (s) | peak extra RSS | GFLOP/s | time / eager | memory / eager |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        eager = baseline(r["impl"])
        base = next((x for x in results if x["impl"] == eager and x["n"] == r["n"]
                     and "error" not in x), None)
        if "error" in r:
            rows.append(f"| {r['n']} x {r['d']} | {r['impl']} | - | - | - | - | - ({r['error']}) |")
            continue
        gflops = 8 * r["n"] ** 2 * r["d"] / r["time_s"] / 1e9
        tr = f"{r['time_s'] / base['time_s']:.2f}" if base else "-"
        mr = f"{r['peak_extra_bytes'] / base['peak_extra_bytes']:.3f}" if base else "-"
        rows.append(f"| {r['n']} x {r['d']} | {r['impl']} | {r['time_s']:.2f} | "
                    f"{_fmt_bytes(r['peak_extra_bytes'])} | {gflops:.0f} | {tr} | {mr} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[16384], help="N = M (rows of q and k)")
    p.add_argument("--d", type=int, default=256, help="feature dimension D")
    p.add_argument("--impl", nargs="+", default=["eager", "fastcl"], choices=IMPLS)
    p.add_argument("--reps", type=int, default=1, help="timed passes per implementation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per implementation")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.n[0], args.d, args.reps, args.seed)))
        return 0

    results = []
    for n in args.n:
        for impl in args.impl:
            r = run_one(impl, n, args.d, args.reps, args.seed, args.timeout)
            results.append(r)
            if "error" in r:
                print(f"N={n} {impl}: {r['error']}", flush=True)
            else:
                print(f"N={n} {impl}: {r['time_s']:.2f} s, peak extra "
                      f"{_fmt_bytes(r['peak_extra_bytes'])}, loss {r['loss']:.6f}", flush=True)
    ok = [r for r in results if "error" not in r]
    for n in args.n:
        losses = {r["impl"]: r["loss"] for r in ok if r["n"] == n}
        for impl, v in losses.items():
            eager = baseline(impl)
            if eager in losses and abs(v - losses[eager]) > 1e-4 * max(1.0, abs(losses[eager])):
                print(f"WARNING: N={n} {impl} loss {v} differs from {eager} {losses[eager]}")
    print()
    print(f"Symmetric CLIP loss (-one: one direction, -ntxent: NT-Xent, -hcl: hard negatives), "
          f"fp32, forward + backward, "
          f"{platform.machine()} "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {ok[0]['threads'] if ok else '?'} "
          f"threads, median of {args.reps}")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=results, torch=torch.__version__, cpus=os.cpu_count(),
                           machine=platform.machine()), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
