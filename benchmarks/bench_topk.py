"""Tiled similarity search (top-k per query): fastcl against chunked torch.topk, in one process.

Implementations (each skipped with a note where it cannot run):

- ``torch-chunked``: what a careful user writes without a custom kernel: the similarities of
  all queries against a slab of keys materialized by one GEMM (input dtype), ``torch.topk`` per
  slab, then ``torch.topk`` over the per-slab candidates;
- ``torch-full``: one GEMM over all keys and one ``torch.topk`` (only where ``N x M`` fits);
- ``fastcl-<backend>``: :func:`fastcl.topk_similarity` on each available backend (the Triton
  kernel streams tiles of ``q @ k.T`` through a per-row top-k, never materializing a slab).

For every shape it reports the median time, peak memory beyond the inputs, effective TFLOP/s
of the similarity GEMM (``2 N M D / s``) and the ratio to ``torch-chunked``, as a Markdown
table and as JSON (``--json``). GPU: CUDA events; CPU (Triton's interpreter or the reference):
wall time, small sizes.

    python -m benchmarks.bench_topk                       # GPU: 4096 x 1M keys, D = 768, k = 128
    TRITON_INTERPRET=1 python -m benchmarks.bench_topk --n 64 --m 2048 --d 32 --k 16  # CPU
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import fastcl
from fastcl import dispatch

from ._common import DTYPES, environment, timed


def torch_chunked(q, k, kk, chunk):
    vals, idxs = [], []
    for c0 in range(0, k.shape[0], chunk):
        sim = q @ k[c0:c0 + chunk].T
        v, i = torch.topk(sim, min(kk, sim.shape[1]), dim=1)
        vals.append(v.float())
        idxs.append(i + c0)
    v, pos = torch.topk(torch.cat(vals, 1), kk, dim=1)
    return v, torch.cat(idxs, 1).gather(1, pos)


def torch_full(q, k, kk):
    v, i = torch.topk(q @ k.T, kk, dim=1)
    return v.float(), i


def implementations(device, dtype, which, chunk, n, m):
    impls = {"torch-chunked": lambda q, k, kk: torch_chunked(q, k, kk, chunk)}
    full_bytes = n * m * torch.empty((), dtype=dtype).element_size()
    if device.type == "cpu" or full_bytes <= (8 << 30):
        impls["torch-full"] = torch_full
    for backend in ("triton", "cuda", "cpu"):
        if dispatch.why_not(backend, "topk_similarity", device, dtype) is None:
            impls[f"fastcl-{backend}"] = (
                lambda q, k, kk, _b=backend: fastcl.topk_similarity(q, k, kk, backend=_b))
    return {name: fn for name, fn in impls.items() if not which or name in which}


def measure(fn, q, k, kk, reps):
    """Median time, peak extra memory and effective TFLOP/s of the similarity GEMM."""
    r = timed(lambda: fn(q, k, kk), q.device, reps)
    if "error" in r:
        return r
    n, d = q.shape
    return {"seconds": r["seconds"], "extra_bytes": r["extra_bytes"],
            "tflops": 2 * n * k.shape[0] * d / r["seconds"] / 1e12}


def agreement(fn, ref, q, k, kk) -> float:
    """Fraction of the reference's top-k indices that ``fn`` also returns (recall@k)."""
    _, i = fn(q, k, kk)
    _, j = ref
    hits = (i[:, :, None] == j[:, None, :]).any(-1).float().mean()
    return float(hits)


def table(records: list[dict]) -> str:
    lines = ["| N | M | D | k | dtype | impl | ms | extra GB | TFLOP/s | vs torch-chunked "
             "| recall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in records:
        groups.setdefault((r["n"], r["m"], r["d"], r["k"], r["dtype"]), {})[r["impl"]] = r
    for (n, m, d, kk, dt), group in groups.items():
        base = group.get("torch-chunked")
        for impl, r in group.items():
            head = f"| {n} | {m} | {d} | {kk} | {dt} | {impl} |"
            if "error" in r:
                lines.append(f"{head} {r['error']} | | | | |")
                continue
            gb = "" if r["extra_bytes"] is None else f"{r['extra_bytes'] / 1e9:.3f}"
            ratio = (f"{base['seconds'] / r['seconds']:.2f}x"
                     if base and "seconds" in base else "")
            recall = "" if r.get("recall") is None else f"{r['recall']:.4f}"
            lines.append(f"{head} {r['seconds'] * 1e3:.2f} | {gb} | {r['tflops']:.1f} | "
                         f"{ratio} | {recall} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--n", type=int, nargs="+", default=[4096] if cuda else [256])
    p.add_argument("--m", type=int, nargs="+", default=[1 << 20] if cuda else [4096])
    p.add_argument("--d", type=int, default=768 if cuda else 64)
    p.add_argument("--k", type=int, nargs="+", default=[128] if cuda else [16])
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--chunk", type=int, default=65536, help="keys per slab of torch-chunked")
    p.add_argument("--impl", nargs="*", default=None, help="subset of implementations to run")
    p.add_argument("--reps", type=int, default=5 if cuda else 2)
    p.add_argument("--json", default=None, help="write the records and environment here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    records = []
    for m in args.m:
        for n in args.n:
            gen = torch.Generator(device=device).manual_seed(0)
            q = F.normalize(torch.randn(n, args.d, device=device, generator=gen), dim=1)
            k = F.normalize(torch.randn(m, args.d, device=device, generator=gen), dim=1)
            q, k = q.to(dtype), k.to(dtype)
            impls = implementations(device, dtype, args.impl, args.chunk, n, m)
            for kk in args.k:
                ref = torch_chunked(q.float(), k.float(), kk, max(1, args.chunk // 4))
                for name, fn in impls.items():
                    rec = measure(fn, q, k, kk, args.reps)
                    if "error" not in rec:
                        rec["recall"] = agreement(fn, ref, q, k, kk)
                    rec.update(n=n, m=m, d=args.d, k=kk, dtype=args.dtype if device.type ==
                               "cuda" else "fp32", impl=name)
                    records.append(rec)
                    shown = (f"{rec['seconds'] * 1e3:9.2f} ms" if "seconds" in rec
                             else rec["error"])
                    print(f"N={n:<6d} M={m:<8d} k={kk:<5d} {name:<14s} {shown}", flush=True)
                del ref
            del q, k
    print()
    print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(device), "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
