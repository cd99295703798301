"""The built-in demo of ``python -m fastcl.train`` (no arguments), a few minutes on a 2-core CPU.

1. **digits, SupCon**: scikit-learn's handwritten digits (shipped with scikit-learn), two
   augmented views per image through one MLP encoder with dropout, an 8-d embedding, trained
   with GradCache chunks; k-NN accuracy on the test split before and after training (chance is
   0.1; k-NN on the raw 64-d pixels is printed for scale: a small embedding is what makes the
   learned structure visible, since random 64-d features already classify digits well).
2. **two-tower CLIP at a giant batch**: a synthetic paired task, batch 32768, one tower per
   modality, learnable temperature, the encoders run in chunks and the fused fastcl loss on the
   full batch. Recall@1 on held-out pairs rises step by step, and the measured peak memory of
   the loss step is printed next to what eager PyTorch needs for the same batch (counted, and
   measured at smaller batches where it fits). When no fused kernel serves the loss on this
   machine (``fastcl.dispatch.select`` returns ``"reference"``), this part runs at batch 4096
   instead, with a note: the reference holds the ``N x N`` logits too.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fastcl
from fastcl import dispatch

from .config import TrainConfig
from .data import load_digits
from .loop import resolve_device, train
from .metrics import eager_clip_bytes, format_bytes, knn_accuracy, measure_eager_clip

__all__ = ["run_demo", "plan_pairs_batch", "eager_memory_report", "FUSED_BATCH", "REFERENCE_BATCH"]

FUSED_BATCH = 32768
REFERENCE_BATCH = 4096


def plan_pairs_batch(device: torch.device, dtype: torch.dtype,
                     requested: Optional[int] = None) -> tuple:
    """``(batch, backend, note)`` of the two-tower part: the giant batch when a fused kernel
    serves ``info_nce`` on ``device`` / ``dtype``, else a batch the reference can hold."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback warning: we print a note
        backend = dispatch.select("info_nce", device, dtype)
    if backend != "reference":
        return (requested or FUSED_BATCH), backend, None
    batch = requested or REFERENCE_BATCH
    note = (f"note: no fused fastcl kernel serves this loss on {device.type}/"
            f"{str(dtype).replace('torch.', '')} in this build (fastcl.dispatch.select -> "
            f"'reference', which holds the N x N logits); the two-tower part runs at batch "
            f"{batch} instead of {FUSED_BATCH}. `python -m fastcl info` says why.")
    return batch, backend, note


def eager_memory_report(n: int, d: int, device: torch.device, dtype: torch.dtype,
                        measure_at: tuple = (4096, 8192)) -> dict:
    """What eager PyTorch's symmetric CLIP loss needs at batch ``n``: the count of its ``N x N``
    matrices (:func:`fastcl.train.metrics.eager_clip_bytes`), and measurements at the sizes of
    ``measure_at`` (and at ``n`` itself on a GPU with room for it)."""
    report = {"n": n, "analytic": eager_clip_bytes(n, dtype), "measured": {}}
    sizes = sorted({min(m, n) for m in measure_at})
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if eager_clip_bytes(n, dtype) < 0.6 * free:
            sizes = sorted(set(sizes) | {n})
    elif report["analytic"] < 0.25 * _available_ram():
        sizes = sorted(set(sizes) | {n})
    for m in sizes:
        got = measure_eager_clip(m, d, device=device, dtype=dtype)
        if got is not None:
            report["measured"][m] = got
    return report


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _suffixed(path: Optional[str], suffix: str) -> Optional[str]:
    if not path:
        return None
    root, ext = os.path.splitext(path)
    return f"{root}-{suffix}{ext}"


def _digits(seed: int, epochs: int, device: str, progress: bool, log: Optional[str],
            plot: Optional[str], say: Callable) -> dict:
    cfg = TrainConfig(task="digits", loss="supcon", temperature=0.1, views=2, embed_dim=8,
                      hidden=256, depth=1, dropout=0.1, batch_size=256, chunk_size=64,
                      epochs=epochs, lr=3e-3, weight_decay=1e-4, warmup_steps=10,
                      grad_clip=1.0, seed=seed, device=device, threads=1, progress=progress,
                      log=log, plot=plot)
    x_tr, y_tr, x_te, y_te = load_digits(seed)
    steps = (len(x_tr) // cfg.batch_size) * epochs
    say(f"[1/2] SupCon on scikit-learn's handwritten digits: {len(x_tr)} train / {len(x_te)} test "
        f"images, 2 augmented views each,\n      MLP encoder with dropout -> {cfg.embed_dim}-d "
        f"embedding, batch {cfg.batch_size} in GradCache chunks of {cfg.chunk_size}, "
        f"{epochs} epochs ({steps} steps), one thread (small ops)")
    shown = {0, epochs} | set(range(0, epochs + 1, max(1, epochs // 4)))

    def on_record(r: dict) -> None:
        if r.get("event") == "eval" and r["epoch"] in shown:
            extra = f"  train loss {r['train_loss']:.3f}" if "train_loss" in r else ""
            say(f"  epoch {r['epoch']:3d}/{epochs}  k-NN accuracy {r['knn_acc']:.3f}  alignment "
                f"{r['alignment']:.3f}  uniformity {r['uniformity']:.3f}{extra}")

    t0 = time.perf_counter()
    result = train(cfg, on_record=on_record)
    elapsed = time.perf_counter() - t0
    before, after = result.metrics(0)["knn_acc"], result.metrics()["knn_acc"]
    raw = knn_accuracy(F.normalize(x_tr, dim=1), y_tr, F.normalize(x_te, dim=1), y_te, cfg.knn_k)
    say(f"  k-NN accuracy (k={cfg.knn_k}, test split): untrained encoder {before:.3f} -> trained "
        f"{after:.3f}   (chance 0.100; raw 64-d pixels {raw:.3f})   {elapsed:.1f} s")
    return {"knn_before": before, "knn_after": after, "knn_raw_pixels": raw, "time_s": elapsed}


def _pairs(seed: int, batch: Optional[int], steps: int, device_name: str, progress: bool,
           log: Optional[str], plot: Optional[str], say: Callable) -> dict:
    device = resolve_device(device_name)
    use_amp = device.type == "cuda"
    dtype = torch.bfloat16 if use_amp else torch.float32
    batch, backend, note = plan_pairs_batch(device, dtype, batch)
    chunk = max(1, min(4096, batch // 8))
    cfg = TrainConfig(task="pairs", loss="clip", temperature=0.1, learnable_temperature=True,
                      embed_dim=32, hidden=256, depth=1, dropout=0.1, eval_size=4096,
                      batch_size=batch, chunk_size=min(chunk, batch), epochs=steps,
                      steps_per_epoch=1, lr=1e-2, weight_decay=0.0, warmup_steps=1,
                      min_lr_ratio=0.1, grad_clip=1.0, seed=seed, device=device_name,
                      progress=progress, log=log, plot=plot)
    say(f"[2/2] two-tower CLIP loss (learnable temperature) on a synthetic paired task, batch "
        f"{batch}, {steps} steps,\n      towers in GradCache chunks of {cfg.chunk_size}, "
        f"{'reference' if backend == 'reference' else 'fused'} loss on the whole batch "
        f"(backend {backend!r}, {device.type}, "
        f"{str(dtype).replace('torch.', '')} embeddings)")
    if note:
        say("  " + note)

    def on_record(r: dict) -> None:
        if r.get("event") == "eval":
            if r["epoch"] == 0:
                say(f"  untrained     recall@1 {r['recall@1']:.3f}  recall@5 {r['recall@5']:.3f}  "
                    f"(held-out pairs: {cfg.eval_size}, chance {1 / cfg.eval_size:.4f})")
            else:
                say(f"  step {r['epoch']}/{steps}      recall@1 {r['recall@1']:.3f}  recall@5 "
                    f"{r['recall@5']:.3f}  loss {r['train_loss']:.3f}  logit scale "
                    f"{r['logit_scale']:.2f}  ({r['epoch_time_s']:.1f} s)")

    t0 = time.perf_counter()
    result = train(cfg, on_record=on_record)
    elapsed = time.perf_counter() - t0
    steps_rec = result.steps()
    loss_peak = max((r["loss_peak_mb"] or 0) for r in steps_rec) * 2 ** 20
    step_peak = max((r["peak_mem_mb"] or 0) for r in steps_rec) * 2 ** 20
    sps = sorted(r["samples_per_s"] for r in steps_rec)[len(steps_rec) // 2]
    eager = eager_memory_report(batch, cfg.embed_dim, device, dtype)
    label = "max_memory_allocated" if device.type == "cuda" else "peak RSS"
    say(f"  recall@1: {result.metrics(0)['recall@1']:.3f} -> {result.metrics()['recall@1']:.3f}, "
        f"recall@5: {result.metrics(0)['recall@5']:.3f} -> {result.metrics()['recall@5']:.3f}   "
        f"(median {sps:,.0f} samples/s, {elapsed:.1f} s)")
    say(f"  memory of the loss step (forward + backward, N = {batch}, D = {cfg.embed_dim}):")
    say(f"    fastcl '{backend}', measured ({label} above the step's start): {format_bytes(loss_peak)}")
    def coeff(m: int, b: int) -> str:
        return f"{b / (m * m * dtype.itemsize):.2f} N^2 x {dtype.itemsize} B"

    counted = f"5 N^2 x {dtype.itemsize} B = {format_bytes(eager['analytic'])}"
    if batch in eager["measured"]:
        eager_n = eager["measured"][batch]
        detail = f"measured {format_bytes(eager_n)} ({coeff(batch, eager_n)}; counted {counted})"
    else:
        eager_n = eager["analytic"]
        smaller = ", ".join(f"{format_bytes(b)} at N = {m} ({coeff(m, b)})"
                            for m, b in eager["measured"].items())
        detail = f"counted {counted}" + (f"; measured {smaller}" if smaller else "")
    say(f"    eager PyTorch (N x N logits, log-softmaxes, their gradient): {detail}")
    if backend == "reference":
        say("    (the reference holds N x N logits as eager does: the fused kernels are what make "
            "the giant batch fit)")
    elif loss_peak > 0:
        say(f"    -> eager PyTorch needs {eager_n / loss_peak:,.0f}x the memory of this loss step")
    say(f"  whole training step: {label} {format_bytes(step_peak)} for the process (encoders in "
        f"chunks of {cfg.chunk_size} rows)")
    return {"batch": batch, "backend": backend, "recall1_before": result.metrics(0)["recall@1"],
            "recall1_after": result.metrics()["recall@1"], "loss_peak_bytes": loss_peak,
            "step_peak_bytes": step_peak, "eager_bytes": eager_n, "eager": eager,
            "time_s": elapsed, "note": note}


def run_demo(*, seed: int = 0, device: str = "auto", pairs_batch: Optional[int] = None,
             pairs_steps: int = 4, digits_epochs: int = 20, progress: bool = True,
             log: Optional[str] = None, plot: Optional[str] = None,
             say: Callable = print) -> dict:
    """Run both parts; returns their summaries. ``log`` / ``plot`` paths get ``-digits`` and
    ``-pairs`` inserted before the extension."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    say(f"fastcl.train demo: giant contrastive batches on limited memory  (fastcl "
        f"{fastcl.__version__}, torch {torch.__version__}, device {dev}, "
        f"{torch.get_num_threads()} threads)\n")
    out = {"digits": _digits(seed, digits_epochs, device, progress, _suffixed(log, "digits"),
                             _suffixed(plot, "digits"), say)}
    say("")
    out["pairs"] = _pairs(seed, pairs_batch, pairs_steps, device, progress,
                          _suffixed(log, "pairs"), _suffixed(plot, "pairs"), say)
    out["time_s"] = time.perf_counter() - t0
    minutes, seconds = divmod(out["time_s"], 60)
    say(f"\ndemo done in {int(minutes)} min {seconds:.0f} s")
    if plot:
        say(f"plots: {_suffixed(plot, 'digits')}, {_suffixed(plot, 'pairs')}")
    if log:
        say(f"logs: {_suffixed(log, 'digits')}, {_suffixed(log, 'pairs')}")
    return out
