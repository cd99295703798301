"""Run the benchmark suite of this machine and write JSON, a Markdown table and plots.

    python -m benchmarks.report            # CPU suite on a CPU machine, GPU suite on a GPU
    python -m benchmarks.report --quick    # smaller sizes (what `make bench` runs)

CPU suite: the symmetric CLIP loss, forward + backward, fp32, D = 256, eager PyTorch against
fastcl's fused C++ kernels (each implementation in its own subprocess so that its peak RSS is its
own; see :mod:`benchmarks.bench_cpu_contrastive`). GPU suite: the same loss in bf16 at D = 1024
against eager PyTorch, torch.compile and Inf-CL when installed (:mod:`benchmarks.bench_clip`),
with the targets of PERFORMANCE.md checked.

Outputs: ``benchmarks/results/<device>.json``, ``docs/benchmarks.md`` (the section of this
device replaced) and ``docs/img/<device>_{time,memory}.png`` (log-log, one line per
implementation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import datetime, timezone

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
IMG = os.path.join(ROOT, "docs", "img")
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _stamp(device: str) -> dict:
    import fastcl

    env = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "fastcl": fastcl.__version__,
           "python": platform.python_version()}
    if device == "cuda":
        env["device"] = torch.cuda.get_device_name(0)
        try:
            import triton

            env["triton"] = triton.__version__
        except Exception:
            pass
    else:
        env["device"] = f"CPU, {os.cpu_count()} cores ({platform.machine()})"
        env["threads"] = torch.get_num_threads()
    return env


def cpu_suite(quick: bool) -> list[dict]:
    from benchmarks.bench_cpu_contrastive import run_one

    sizes = [1024, 2048, 4096, 8192] if quick else [2048, 4096, 8192, 16384]
    records = []
    for n in sizes:
        for impl in ("eager", "fused"):
            r = run_one(impl, n, 256, reps=1 if n >= 8192 else 2, seed=0, timeout=1200)
            rec = {"impl": "fastcl-cpu" if impl == "fused" else impl, "n": n, "d": 256,
                   "dtype": "float32"}
            if "error" in r:
                rec["error"] = r["error"]
            else:
                rec.update(seconds=r["time_s"], extra_bytes=r["peak_extra_bytes"])
            records.append(rec)
            print(f"N={n:<6d} {rec['impl']:<11s} "
                  + (f"{rec['seconds']:.3f} s  {rec['extra_bytes'] / 2**20:.0f} MiB"
                     if "seconds" in rec else rec["error"]), flush=True)
    return records


def gpu_suite(quick: bool) -> list[dict]:
    from benchmarks.bench_clip import implementations, measure

    sizes = [4096, 8192, 16384] if quick else [4096, 8192, 16384, 32768, 65536]
    impls = implementations(torch.device("cuda"), torch.bfloat16, None)
    records = []
    for n in sizes:
        for name, fn in impls.items():
            r = measure(fn, n, 1024, torch.bfloat16, torch.device("cuda"), reps=5)
            r.update(impl=name, n=n, d=1024, dtype="bfloat16")
            records.append(r)
            print(f"N={n:<6d} {name:<14s} "
                  + (f"{r['seconds'] * 1e3:.2f} ms" if "seconds" in r else r["error"]), flush=True)
    return records


def markdown(records: list[dict], env: dict) -> str:
    groups: dict = {}
    for r in records:
        groups.setdefault(r["n"], {})[r["impl"]] = r
    impls = sorted({r["impl"] for r in records}, key=lambda s: (s.startswith("fastcl"), s))
    lines = [f"Measured {env['date']} on {env['device']}; torch {env['torch']}"
             + (f", triton {env['triton']}" if "triton" in env else "")
             + f", fastcl {env['fastcl']}. Symmetric CLIP loss, forward + backward, "
             f"D = {records[0]['d']}, {records[0]['dtype']}.", "",
             "| N | " + " | ".join(f"{i} time" for i in impls) + " | "
             + " | ".join(f"{i} extra memory" for i in impls) + " | fastcl vs eager |",
             "|---" * (2 * len(impls) + 2) + "|"]
    for n, group in sorted(groups.items()):
        times, mems = [], []
        for i in impls:
            r = group.get(i, {})
            times.append(f"{r['seconds'] * 1e3:.1f} ms" if "seconds" in r else r.get("error", ""))
            mems.append(f"{r['extra_bytes'] / 2**20:.0f} MiB"
                        if r.get("extra_bytes") is not None else "")
        ratio = ""
        eager = group.get("eager", {})
        fast = [group[i] for i in impls if i.startswith("fastcl") and "seconds" in group.get(i, {})]
        if "seconds" in eager and fast:
            best = min(fast, key=lambda r: r["seconds"])
            ratio = f"{eager['seconds'] / best['seconds']:.2f}x faster"
            if eager.get("extra_bytes") and best.get("extra_bytes") is not None:
                ratio += f", {100 * best['extra_bytes'] / eager['extra_bytes']:.1f}% of its memory"
        lines.append(f"| {n} | " + " | ".join(times) + " | " + " | ".join(mems) + f" | {ratio} |")
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
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    records = gpu_suite(args.quick) if args.device == "cuda" else cpu_suite(args.quick)
    env = _stamp(args.device)
    tag = "gpu" if args.device == "cuda" else "cpu"
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{tag}.json"), "w") as f:
        json.dump({"environment": env, "records": records}, f, indent=1)
    images = plots(records, tag)
    section = f"## {'GPU' if tag == 'gpu' else 'CPU'}\n\n" + markdown(records, env)
    for path in images:
        rel = os.path.relpath(path, os.path.dirname(DOC))
        section += f"\n\n![{os.path.basename(path)}]({rel})"
    write_doc(tag, section)
    print("\n" + section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
