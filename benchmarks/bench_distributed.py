"""Global negatives over several processes: ``gather="all_gather"`` against ``gather="ring"``.

Every rank runs a loss (``--loss``; fp32, unit-norm features) forward + backward on its shard of
a global batch, for world sizes ``W`` in ``--world`` (gloo CPU processes, or NCCL GPU processes
under ``torchrun``). Each strategy runs two schedules in the same processes, fastcl's and a
baseline:

- ``clip``: the symmetric CLIP loss (:func:`fastcl.clip_loss`, logit scale 1/0.07 as a leaf that
  requires grad) as fastcl computes it (both directions from one pass over the keys, the second
  from the column statistics merged across ranks) and as two one-direction losses
  (``info_nce(x, y) / 2 + info_nce(y, x) / 2``: one pass per direction, the schedule of the
  usual gathered losses);
- ``nt_xent``: NT-Xent over two views (:func:`fastcl.nt_xent`, temperature 0.1) as fastcl
  computes it (with all_gather, each rank half of the symmetric global square; the ring takes
  the whole rectangle) and the same loss as SupCon's ``L_in`` over the two views with the sample
  index as label (:func:`fastcl.supcon` with ``variant="in"``, equal to NT-Xent with one
  positive per anchor; its log-sum-exp of the positives takes every rank's rows against all
  columns, the rectangle).

Reported per strategy, schedule and world size, as the maximum over ranks:

- ``time``: median wall time of ``--reps`` forward + backward passes (after one warm-up),
  synchronized across ranks (a barrier before each pass, the slowest rank counts);
- ``tensor peak``: the high-water mark of the bytes of the tensors created during one pass and
  alive at the same time (:class:`LiveBytes`: a ``TorchDispatchMode`` that records the storage
  of every operator output, including the receive buffers of the collectives, and a
  ``weakref.finalize`` on that storage that subtracts it when it is freed). It counts what the
  strategy holds (gathered keys, ring blocks, gradient accumulators, statistics); the bounded
  scratch slabs inside the fused kernels are the same for both strategies and not counted;
- on CPU, ``rss peak``: the growth of the process's peak resident set during the pass (reset
  through ``/proc/self/clear_refs``); allocator caching makes it coarser; on GPUs,
  ``torch.cuda.max_memory_allocated`` beyond the memory allocated before the pass.

``--per-rank`` fixes the per-rank batch instead of the global one.

    python -m benchmarks.bench_distributed                     # W = 1, 2, 4 on CPU (gloo)
    python -m benchmarks.bench_distributed --world 1 2 4 8 --batch 16384 --dim 512
    python -m benchmarks.bench_distributed --launcher torchrun --backend nccl   # >= 2 GPUs

Writes a Markdown table and JSON to ``benchmarks/results/distributed_<device>.{md,json}``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import weakref

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks._common import RssPeak, environment, sync

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
STRATEGIES = ("all_gather", "ring")
#: loss -> (fastcl's schedule, the baseline's), and the sentence that says what they are
SCHEDULES = {
    "clip": (("one pass", "per direction"),
             "CLIP loss. One pass: fastcl's `clip_loss`; per direction: two one-direction "
             "`info_nce` losses (the baseline)."),
    "nt_xent": (("half square", "rectangle"),
                "NT-Xent over two views (2 x rows/rank anchors per rank). Half square: fastcl's "
                "`nt_xent` (with all_gather, half of the symmetric global square per rank; the "
                "ring computes the rectangle); rectangle: the same loss as "
                "`supcon(variant=\"in\")` over the two views (every rank's rows against all "
                "columns, the baseline)."),
}


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created under the mode that are still alive, and their peak.

    Every operator output whose storage is new is counted until the storage is freed (a
    ``weakref.finalize`` on it); views and in-place results share a counted storage.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._held: dict[int, int] = {}

    def _free(self, key: int, nbytes: int) -> None:
        if self._held.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._held:
                continue
            self._held[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


# ---------------------------------------------------------------------------------------------
# One rank


def run_rank(loss_name: str, n: int, d: int, reps: int, device) -> dict:
    """Time and memory of both strategies and schedules of ``loss_name`` on this rank's shard
    of ``n`` rows."""
    import fastcl

    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(device)
    y = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(device)
    x.requires_grad_(True)
    y.requires_grad_(True)
    scale = torch.tensor(1.0 / 0.07, device=device, requires_grad=True)

    def step_of(gather, schedule):
        if schedule == "one pass":
            loss = fastcl.clip_loss(x, y, scale, gather=gather)
        elif schedule == "per direction":
            loss = (fastcl.info_nce(x, y, logit_scale=scale, gather=gather)
                    + fastcl.info_nce(y, x, logit_scale=scale, gather=gather)) / 2
        elif schedule == "half square":
            loss = fastcl.nt_xent(x, y, temperature=0.1, gather=gather)
        else:
            loss = fastcl.supcon(torch.stack([x, y], 1), temperature=0.1, variant="in",
                                 gather=gather)
        loss.backward()
        x.grad = y.grad = scale.grad = None
        return loss

    out = {}
    for gather, schedule in itertools.product(STRATEGIES, SCHEDULES[loss_name][0]):
        step = functools.partial(step_of, gather, schedule)
        step()  # warm-up (kernel loading, communicator setup)
        times = []
        for _ in range(reps):
            dist.barrier()
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t0)
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        with RssPeak() as rss, LiveBytes() as mem:
            step()
            sync(device)
        if device.type == "cuda":
            process_peak = torch.cuda.max_memory_allocated(device) - base
        else:
            process_peak = rss.extra or 0
        out[f"{gather}, {schedule}"] = {"time_s": statistics.median(times),
                                        "tensor_peak_bytes": mem.peak,
                                        "process_peak_bytes": max(process_peak, 0)}
    return out


def _worker_main(args) -> None:
    """Entry point of one rank (spawned by this script or started by torchrun)."""
    backend = args.backend
    if args.launcher == "spawn":
        dist.init_process_group(backend, init_method=f"file://{args.init_file}",
                                rank=args.rank, world_size=args.world_size)
    else:
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, args.threads))
    n = args.batch if args.per_rank else args.batch // world
    try:
        res = run_rank(args.loss, n, args.dim, args.reps, device)
        gathered = [None] * world
        dist.all_gather_object(gathered, res)
        if rank == 0:
            summary = {s: {"time_s": max(r[s]["time_s"] for r in gathered),
                           "tensor_peak_bytes": max(r[s]["tensor_peak_bytes"] for r in gathered),
                           "process_peak_bytes": max(r[s]["process_peak_bytes"] for r in gathered)}
                       for s in res}
            with open(args.out, "w") as f:
                json.dump({"world": world, "n_per_rank": n, **summary,
                           "environment": environment(device)}, f)
        dist.barrier()  # no rank tears down its connections while another still uses them
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Driver


def _launch(args, world: int, out: str) -> None:
    common = ["--loss", args.loss, "--batch", str(args.batch), "--dim", str(args.dim),
              "--reps", str(args.reps), "--backend", args.backend, "--threads", str(args.threads),
              "--out", out]
    if args.per_rank:
        common.append("--per-rank")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world}", "-m", "benchmarks.bench_distributed", "--as-rank",
               "--launcher", "torchrun", *common]
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        return
    init = os.path.join(tempfile.mkdtemp(prefix="fastcl-bench-"), "init")
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.bench_distributed", "--as-rank",
                               "--launcher", "spawn", "--rank", str(r), "--world-size",
                               str(world), "--init-file", init, *common], cwd=ROOT, env=env)
             for r in range(world)]
    codes = [p.wait() for p in procs]
    shutil.rmtree(os.path.dirname(init), ignore_errors=True)
    if any(codes):
        raise SystemExit(f"a rank of world size {world} failed (exit codes {codes})")


def _mib(b: int) -> str:
    return f"{b / 2**20:.1f}"


def table(rows: list[dict], args) -> str:
    batch = "per-rank" if args.per_rank else "global"
    (ours, base), what = SCHEDULES[args.loss]
    lines = [f"Forward + backward, {batch} batch {args.batch}, D = {args.dim}, fp32, "
             f"{args.backend} ({args.device_name}); maximum over ranks. {what}",
             "",
             f"| W | rows/rank | strategy | time, {ours} (ms) | time, {base} (ms) | "
             f"{ours} / {base} | tensor peak, {ours} (MiB) | tensor peak, {base} (MiB) | "
             f"process peak, {ours} (MiB) |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for gather in STRATEGIES:
            one, two = r[f"{gather}, {ours}"], r[f"{gather}, {base}"]
            lines.append(f"| {r['world']} | {r['n_per_rank']} | {gather} | "
                         f"{1e3 * one['time_s']:.1f} | {1e3 * two['time_s']:.1f} | "
                         f"{one['time_s'] / two['time_s']:.2f}x | "
                         f"{_mib(one['tensor_peak_bytes'])} | {_mib(two['tensor_peak_bytes'])} | "
                         f"{_mib(one['process_peak_bytes'])} |")
    lines += ["", "Tensor peak: bytes of the tensors created during one pass and alive at the same "
              "time (LiveBytes, exact; the kernels' bounded scratch slabs excluded). Process peak: "
              "growth of the peak resident set on CPU (allocator caching and communication "
              "buffers included, coarse), of max_memory_allocated on GPU. The W ranks share the "
              "machine's cores: where W exceeds them, times measure the oversubscribed machine."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--loss", choices=tuple(SCHEDULES), default="clip")
    p.add_argument("--world", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batch", type=int, default=16384, help="global batch (or per rank)")
    p.add_argument("--per-rank", action="store_true", help="--batch is the per-rank batch")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    p.add_argument("--launcher", choices=("spawn", "torchrun"), default="spawn")
    p.add_argument("--threads", type=int, default=1, help="torch threads per CPU rank")
    p.add_argument("--out", default=None)
    # internal: one rank
    p.add_argument("--as-rank", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world-size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--init-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.as_rank:
        _worker_main(args)
        return
    if args.backend == "nccl":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < 2:
            raise SystemExit(f"--backend nccl needs at least 2 visible GPUs, found {gpus}; "
                             "run the CPU benchmark with --backend gloo")
        worlds = [w for w in args.world if w <= gpus]
        args.device_name = torch.cuda.get_device_name(0)
        tag = "gpu"
    else:
        worlds = args.world
        args.device_name = environment(torch.device("cpu"))["device"]
        tag = "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in worlds:
            out = os.path.join(tmp, f"w{w}.json")
            _launch(args, w, out)
            with open(out) as f:
                rows.append(json.load(f))
            print(json.dumps(rows[-1]), flush=True)
    md = table(rows, args)
    print(md)
    suffix = "" if args.loss == "clip" else f"_{args.loss}"
    base = args.out or os.path.join(RESULTS, f"distributed_{tag}{suffix}")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump({"loss": args.loss, "device": args.device_name, "backend": args.backend,
                   "batch": args.batch,
                   "per_rank": args.per_rank, "dim": args.dim, "dtype": "float32",
                   "torch": torch.__version__, "rows": rows}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(md)


if __name__ == "__main__":
    main()
