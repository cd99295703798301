"""Run the benchmark suite of this machine and write JSON, a Markdown table and plots.

    python -m benchmarks.report            # CPU suite on a CPU machine, GPU suite on a GPU
    python -m benchmarks.report --quick    # smaller sizes (what `make bench` runs)
    python -m benchmarks.report --full     # CPU: also N = 16384 and 32768 (the CPU targets)

CPU suite: the symmetric CLIP loss, forward + backward, fp32, D = 256: eager PyTorch,
torch.compile, open_clip's ClipLoss, plain-PyTorch row slabs, pytorch-metric-learning's
NTXentLoss (``pml``) and SupConLoss (``pml-supcon``) where installed, and fastcl's fused C++
kernels; InfoNCE in one direction (``eager-one``, ``pml-one`` and ``pml-supcon-one`` against
``fastcl-one``, whose ratios are taken to ``eager-one``); and NT-Xent over two views of N / 2
samples (``eager-ntxent`` against ``fastcl-ntxent``). Each implementation runs in its own
subprocess so that its peak RSS is its own (see :mod:`benchmarks.bench_cpu_contrastive`). GPU
suite: the same loss in bf16 at D = 1024 against eager PyTorch, torch.compile, open_clip, Inf-CL
and pytorch-metric-learning when installed (:mod:`benchmarks.bench_clip`), then fastcl alone at
N = 1,048,576 (the linear-memory target; skipped when the time at 65536 predicts more than a
minute per step).
Both end with the targets of PERFORMANCE.md for their device: met or not, and by how much.

Outputs: ``benchmarks/results/<suite>.json``, ``docs/benchmarks.md`` (the section of this suite
replaced) and ``docs/img/<suite>_{time,memory}.png`` (log-log, one line per implementation).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import torch

from ._common import environment
from .bench_cpu_contrastive import baseline, suffix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
IMG = os.path.join(ROOT, "docs", "img")
RESULTS = os.path.join(ROOT, "benchmarks", "results")

CPU_IMPLS = ("eager", "compile", "open_clip", "slabs", "fastcl", "eager-one", "fastcl-one",
             "eager-ntxent", "fastcl-ntxent")
# the loss of each group of implementations (by the suffix of their names)
LOSSES = {"": "clip", "-one": "info_nce", "-ntxent": "nt_xent", "-hcl": "hard_negative_nce"}
CPU_PML = ("pml", "pml-supcon", "pml-one", "pml-supcon-one")
if importlib.util.find_spec("pytorch_metric_learning") is not None:
    CPU_IMPLS += CPU_PML
# the N^2-memory baselines are skipped above this N in the full CPU suite (one 32768^2 fp32
# logit matrix and its softmax already take 16 GB of the machine's 24); eager and eager-one, the
# ratios' baselines, still run there
CPU_QUADRATIC = ("compile", "open_clip", *CPU_PML)
QUADRATIC_MAX_N = 16384
# baselines with a lower ceiling: SupConLoss holds ~35 bytes per logit and direction (masks, int64
# pair indices), 19 GB for both directions at N = 16384 (NTXentLoss refuses by itself above a few
# hundred rows: benchmarks._common.PML_NTXENT_MAX_BYTES)
CPU_MAX_N = {"pml-supcon": 8192, "pml-supcon-one": 8192}


def _cpu_max_n(impl: str) -> float:
    """The largest N at which the CPU suite runs ``impl`` (unbounded for fastcl and eager)."""
    if impl in CPU_MAX_N:
        return CPU_MAX_N[impl]
    return QUADRATIC_MAX_N if impl in CPU_QUADRATIC + ("slabs",) else float("inf")


def cpu_suite(quick: bool, full: bool) -> list[dict]:
    from benchmarks.bench_cpu_contrastive import run_one

    sizes = [1024, 2048, 4096, 8192] if quick else [2048, 4096, 8192, 16384]
    if full:
        sizes = sorted(set(sizes) | {16384, 32768})
    records = []
    for n in sizes:
        for impl in CPU_IMPLS:
            rec = {"impl": "fastcl-cpu" if impl == "fastcl" else impl, "n": n, "d": 256,
                   "dtype": "float32", "loss": LOSSES[suffix(impl)]}
            if n > _cpu_max_n(impl):
                continue
            r = run_one(impl, n, 256, reps=1 if n >= 8192 else 2, seed=0, timeout=1800)
            if "error" in r:
                rec["error"] = r["error"]
            else:
                rec.update(seconds=r["time_s"], extra_bytes=r["peak_extra_bytes"],
                           loss_value=r["loss"])
            records.append(rec)
            print(f"N={n:<6d} {rec['impl']:<11s} "
                  + (f"{rec['seconds']:.3f} s  {rec['extra_bytes'] / 2**20:.0f} MiB"
                     if "seconds" in rec else rec["error"]), flush=True)
    return records


#: PERFORMANCE.md: memory grows linearly in N, and N = 1,048,576 x 1024 runs on one 80 GB GPU
LINEAR_N = 1 << 20
#: the run at LINEAR_N is skipped when the time measured at 65536, scaled by (N / 65536)^2,
#: predicts more than this many seconds for one forward + backward
LINEAR_MAX_SECONDS = 60.0


def gpu_suite(quick: bool) -> list[dict]:
    from benchmarks.bench_clip import implementations, measure

    sizes = [4096, 8192, 16384] if quick else [4096, 8192, 16384, 32768, 65536]
    dev = torch.device("cuda")
    impls = implementations(dev, torch.bfloat16, None)
    records = []

    def run(name, n, **kw):
        r = measure(impls[name], n, 1024, torch.bfloat16, dev, **kw)
        r.update(impl=name, n=n, d=1024, dtype="bfloat16")
        records.append(r)
        print(f"N={n:<7d} {name:<14s} "
              + (f"{r['seconds'] * 1e3:.2f} ms" if "seconds" in r else r["error"]), flush=True)
        return r

    for n in sizes:
        for name in impls:
            run(name, n, reps=5)
    # the linear-memory target: fastcl's default GPU backend at N = 1,048,576, one timed run
    base = next((r for r in records if r["impl"] == "fastcl-triton" and r["n"] == 65536
                 and "seconds" in r), None)
    if base is not None:
        predicted = base["seconds"] * (LINEAR_N / 65536) ** 2
        if predicted <= LINEAR_MAX_SECONDS:
            run("fastcl-triton", LINEAR_N, reps=1, warmup=1)
        else:
            print(f"N={LINEAR_N}: skipped (predicted {predicted:.0f} s per step)", flush=True)
    return records


# --------------------------------------------------------------------------------------------
# the targets of PERFORMANCE.md, checked on the records of this run
# --------------------------------------------------------------------------------------------

def _ok(r: dict) -> bool:
    return "seconds" in r


def _best_fastcl(group: dict, sfx: str = "") -> dict:
    """The fastest fastcl record of ``group`` for the loss named by ``sfx`` (see LOSSES)."""
    fast = [r for i, r in group.items()
            if i.startswith("fastcl") and suffix(i) == sfx and _ok(r)]
    return min(fast, key=lambda r: r["seconds"]) if fast else {}


def cpu_targets(records: list[dict]) -> list[tuple[str, str, str]]:
    """``(target, measured, verdict)`` rows for the CPU targets (N = 32768, D = 256, fp32)."""
    groups = _groups(records)
    rows = []
    for n in sorted(groups):
        if n < 16384 and n != max(groups):
            continue
        for sfx, what in (("", "symmetric"), ("-one", "one direction")):
            group = groups[n]
            eager, fast = group.get("eager" + sfx, {}), _best_fastcl(group, sfx)
            if not (_ok(eager) and fast):
                continue
            scope = ("" if n in (16384, 32768)
                     else f" (at N = {n}; the targets are set at 16384 and 32768)")
            t = fast["seconds"] / eager["seconds"]
            rows.append((f"{what}: time <= 0.5x eager, N = {n}",
                         f"{t:.2f}x ({fast['seconds']:.2f} s vs {eager['seconds']:.2f} s)",
                         ("met" if t <= 0.5 else "not met") + scope))
            if eager.get("extra_bytes") and fast.get("extra_bytes") is not None:
                m = fast["extra_bytes"] / eager["extra_bytes"]
                rows.append((f"{what}: peak extra memory < 5% of eager, N = {n}",
                             f"{100 * m:.1f}% ({fast['extra_bytes'] / 2**20:.0f} MiB vs "
                             f"{eager['extra_bytes'] / 2**20:.0f} MiB)",
                             ("met" if m < 0.05 else "not met") + scope))
    return rows


def gpu_targets(records: list[dict]) -> list[tuple[str, str, str]]:
    """``(target, measured, verdict)`` rows for the GPU targets of PERFORMANCE.md."""
    groups = _groups(records)
    rows = []
    big = groups.get(65536, {})
    fast = _best_fastcl(big)
    if fast:
        ms = fast["seconds"] * 1e3
        rows.append(("N = 65536, D = 1024 bf16: <= 60 ms", f"{ms:.1f} ms ({fast['impl']}, "
                     f"{fast['tflops']:.0f} TFLOP/s)", "met" if ms <= 60 else
                     f"not met ({ms / 60:.2f}x the target)"))
        gb = fast["extra_bytes"] / 1e9
        rows.append(("N = 65536: <= 0.6 GB extra", f"{gb:.2f} GB",
                     "met" if gb <= 0.6 else "not met"))
        for base, factor in (("compile", 1.0), ("eager", 2.5)):
            b = big.get(base, {})
            if _ok(b):
                x = b["seconds"] / fast["seconds"]
                rows.append((f"N = 65536: >= {factor}x faster than {base}", f"{x:.2f}x",
                             "met" if x >= factor else "not met"))
    else:
        rows.append(("N = 65536, D = 1024 bf16: <= 60 ms", "not run at N = 65536", "unknown"))
    huge = groups.get(LINEAR_N, {}).get("fastcl-triton")
    what = f"N = {LINEAR_N:,}, D = 1024 bf16 runs on one 80 GB GPU (linear memory)"
    if huge is None:
        rows.append((what, "not run", "unknown"))
    elif _ok(huge):
        # inputs and their gradients (4 N D bf16) plus the peak beyond them
        total = 4 * LINEAR_N * 1024 * 2 + huge["extra_bytes"]
        small = big.get("fastcl-triton", {})
        growth = (f"; x{huge['extra_bytes'] / small['extra_bytes']:.1f} the extra memory of "
                  f"N = 65536 (linear: x{LINEAR_N // 65536})"
                  if _ok(small) and small.get("extra_bytes") else "")
        rows.append((what, f"{huge['seconds']:.1f} s, peak {total / 1e9:.1f} GB "
                     f"({huge['extra_bytes'] / 1e9:.2f} GB beyond the inputs and their "
                     f"gradients{growth})", "met" if total <= 80e9 else "not met"))
    else:
        rows.append((what, huge["error"], "not met"))
    for n, group in sorted(groups.items()):
        if n < 4096:
            continue
        fast = _best_fastcl(group)
        if not fast:
            continue
        for base, factor in (("eager", 1.0), ("infcl", 10.0)):
            b = group.get(base, {})
            if _ok(b):
                x = b["seconds"] / fast["seconds"]
                rows.append((f"N = {n}: >= {factor:g}x faster than {base}", f"{x:.2f}x",
                             "met" if x >= factor else "not met"))
    return rows


def targets_table(rows: list[tuple[str, str, str]]) -> str:
    if not rows:
        return "No target could be checked in this run."
    lines = ["| target (PERFORMANCE.md) | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in rows]
    return "\n".join(lines)


def _groups(records: list[dict]) -> dict:
    groups: dict = {}
    for r in records:
        groups.setdefault(r["n"], {})[r["impl"]] = r
    return groups


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def markdown(records: list[dict], env: dict) -> str:
    """One row per (N, implementation): time, peak extra memory, ratios to eager."""
    gpu = any(r.get("tflops") is not None for r in records)
    lines = [f"Measured {env['date']} on {env['device']}; torch {env['torch']}"
             + (f", triton {env['triton']}" if "triton" in env else "")
             + f", fastcl {env['fastcl']}. Symmetric CLIP loss"
             + ("" if gpu else " (InfoNCE in one direction: the `-one` rows, ratios to "
                "`eager-one`; NT-Xent over two views of N / 2 samples: the `-ntxent` rows, "
                "ratios to `eager-ntxent`)") + ", forward + backward, "
             f"D = {records[0]['d']}, {records[0]['dtype']}"
             + ("" if gpu else f", {env.get('threads', '?')} threads") + ".", "",
             "| N | implementation | time | peak extra memory | eager's time / this |"
             " this memory / eager's |" + (" TFLOP/s |" if gpu else ""),
             "|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for n, group in sorted(_groups(records).items()):
        order = sorted(group, key=lambda i: (list(LOSSES).index(suffix(i)),
                                             i.startswith("fastcl"), i != baseline(i), i))
        for impl in order:
            r, eager = group[impl], group.get(baseline(impl), {})
            if not _ok(r):
                lines.append(f"| {n} | {impl} | {r.get('error', '')} | | | |"
                             + (" |" if gpu else ""))
                continue
            mem = "" if r.get("extra_bytes") is None else _fmt_bytes(r["extra_bytes"])
            speed = f"{eager['seconds'] / r['seconds']:.2f}x" if _ok(eager) else ""
            mratio = (f"{100 * r['extra_bytes'] / eager['extra_bytes']:.1f}%"
                      if _ok(eager) and eager.get("extra_bytes") and r.get("extra_bytes")
                      is not None else "")
            name = f"**{impl}**" if impl.startswith("fastcl") else impl
            lines.append(f"| {n} | {name} | {_fmt_time(r['seconds'])} | {mem} | {speed} | "
                         f"{mratio} |" + (f" {r['tflops']:.0f} |" if gpu else ""))
    return "\n".join(lines)


def plots(records: list[dict], tag: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return []
    os.makedirs(IMG, exist_ok=True)
    out = []
    for key, label, scale in (("seconds", "time (s)", 1.0), ("extra_bytes", "extra memory (MiB)", 2**-20)):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for impl in sorted({r["impl"] for r in records}):
            pts = sorted((r["n"], r[key] * scale) for r in records
                         if r["impl"] == impl and r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (= M)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(IMG, f"{tag}_{'time' if key == 'seconds' else 'memory'}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        out.append(path)
    return out


def write_doc(tag: str, section: str) -> None:
    begin, end = f"<!-- {tag}: begin -->", f"<!-- {tag}: end -->"
    text = open(DOC).read() if os.path.exists(DOC) else (
        "# Benchmarks\n\nReproduce with `make bench` (CPU: `python -m benchmarks.report --quick`) "
        "or, on a GPU, `benchmarks/gpu_session.sh`. Each section is replaced by the next run on "
        "its device.\n")
    block = f"{begin}\n{section}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    with open(DOC, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes")
    p.add_argument("--full", action="store_true",
                   help="CPU: also N = 16384 and 32768, where the CPU targets are set (slow)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    records = gpu_suite(args.quick) if cuda else cpu_suite(args.quick, args.full)
    env = environment(torch.device(args.device))
    tag = ("gpu" if cuda else "cpu") + ("-full" if args.full and not cuda else "")
    os.makedirs(RESULTS, exist_ok=True)
    targets = gpu_targets(records) if cuda else cpu_targets(records)
    with open(os.path.join(RESULTS, f"{tag}.json"), "w") as f:
        json.dump({"environment": env, "records": records,
                   "targets": [dict(zip(("target", "measured", "verdict"), t)) for t in targets]},
                  f, indent=1)
    images = plots(records, tag)
    title = {"gpu": "GPU", "cpu": "CPU", "cpu-full": "CPU, up to the target sizes"}[tag]
    section = f"## {title}\n\n" + markdown(records, env)
    section += "\n\nTargets:\n\n" + targets_table(targets)
    for path in images:
        rel = os.path.relpath(path, os.path.dirname(DOC))
        section += f"\n\n![{os.path.basename(path)}]({rel})"
    write_doc(tag, section)
    print("\n" + section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
