"""The training loop: chunked contrastive steps, schedule, metrics, logs and exact resumption.

:func:`train` (or :class:`Trainer` for a model and data of your own) runs ``epochs`` epochs of
``steps_per_epoch`` steps. Every step is a :func:`fastcl.train.contrastive_step` (GradCache when
``chunk_size`` is set), followed by gradient clipping, an AdamW step, a scheduler step and the
clamp of a learnable logit scale. After each epoch the metrics of the data are computed
(:func:`fastcl.train.metrics.evaluate`), and a checkpoint is written if a path is configured.

Reproducibility: the run is a function of its config. Model init and dropout draw from the seeded
global RNGs; the data order and augmentations are pure functions of ``(seed, epoch, step)``;
evaluation draws from neither. A checkpoint holds the RNG states and ``(epoch, step in epoch)``,
so training ``2N`` steps gives the same parameters, bit for bit on the same machine, as ``N``
steps, a resume, and ``N`` more.

Several processes (``torchrun --nproc_per_node=W -m fastcl.train ...``, see
:mod:`fastcl.train.distributed`): ``batch_size`` is the global batch, each rank encodes its
``batch_size / W`` rows in chunks and the loss gathers every rank's embeddings, so a step gives
the parameters of one process training on the same global batch (up to float rounding; the
test suite checks it in float64), as long as the encoder draws no randomness: each rank has its
own dropout stream (rank 0 keeps the single-process one), which a one-process run cannot
reproduce. Rank 0 alone prints, writes the log, the plot and the checkpoints, and evaluates
(the metrics are those of one process: the full evaluation set, the same parameters); every
rank loads the checkpoint on ``resume`` and gets its own RNG state back.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

import fastcl
from fastcl import dispatch

from . import distributed
from .checkpoint import CheckpointError, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .config import TRAJECTORY_FIELDS, ConfigError, TrainConfig
from .data import SyntheticPairs, digits_data, read_batch
from .gradcache import contrastive_step
from .metrics import PeakMemory, evaluate, format_bytes, param_dtype
from .models import build_model, has_batchnorm
from .objective import Objective, build_objective
from .optim import build_optimizer, build_scheduler

__all__ = ["Trainer", "TrainResult", "train", "seed_everything", "resolve_device", "build_data"]


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but torch sees no CUDA device")
    return device


def build_data(cfg: TrainConfig):
    """The dataset of a built-in task."""
    if cfg.task == "digits":
        return digits_data(views=cfg.views, seed=cfg.seed)
    return SyntheticPairs(latent_dim=cfg.pairs_latent_dim, dims=cfg.pairs_dims,
                          noise=cfg.pairs_noise, eval_size=cfg.eval_size, seed=cfg.seed)


def _in_dims(data) -> list:
    if data.kind == "pairs":
        return list(data.dims) if hasattr(data, "dims") else [data.xa_train.shape[1], data.xb_train.shape[1]]
    return [int(data.x_train[0].numel())]


def config_differences(stored: TrainConfig, current: TrainConfig) -> list:
    """``[(field, stored, current)]`` for the trajectory fields that differ."""
    a, b = stored.to_dict(), current.to_dict()
    return [(k, a[k], b[k]) for k in TRAJECTORY_FIELDS if a[k] != b[k]]


@dataclass
class TrainResult:
    """The outcome of a run: the trained modules, the logged records and where it stopped."""

    config: TrainConfig
    model: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: object
    history: list = field(default_factory=list)
    global_step: int = 0
    epoch: int = 0
    stopped_early: bool = False
    loss_backend: str = ""
    device: torch.device = torch.device("cpu")
    world_size: int = 1
    rank: int = 0

    def metrics(self, epoch: int = -1) -> dict:
        """The eval record of ``epoch`` (0: before training; -1: the last one)."""
        evals = [r for r in self.history if r.get("event") == "eval"]
        if not evals:
            return {}
        if epoch < 0:
            return evals[epoch]
        for r in evals:
            if r["epoch"] == epoch:
                return r
        return {}

    def steps(self) -> list:
        """The logged step records (``event == "step"``), in order."""
        return [r for r in self.history if r.get("event") == "step"]


class _Log:
    """The JSON-lines log (one object per line, flushed as written) and the in-memory history."""

    def __init__(self, path: Optional[str], history: list, append: bool,
                 on_record: Optional[Callable] = None):
        self.history = history
        self.on_record = on_record
        self.file = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "a" if append else "w")

    def __call__(self, record: dict, keep: bool = True) -> None:
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        if keep:
            self.history.append(record)
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.on_record is not None:
            self.on_record(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Trainer:
    """A configured run. ``Trainer(cfg).fit()`` is :func:`train`.

    ``model``, ``data`` and ``objective`` replace the built-in ones of ``cfg.task``: any model
    with ``forward(x, slot)`` (see :mod:`fastcl.train.models`), any data with the interface of
    :mod:`fastcl.train.data`, any :class:`fastcl.train.Objective`.
    ``echo``: a ``print``-like function for the per-epoch summary lines (``None``: silent).
    ``on_record``: called with every record written to the log (start, step, eval, checkpoint,
    stop, end).
    """

    def __init__(self, cfg: TrainConfig, *, model: Optional[nn.Module] = None, data=None,
                 objective: Optional[Objective] = None, echo: Optional[Callable] = None,
                 on_record: Optional[Callable] = None):
        self.cfg = cfg
        self._model, self._data, self._objective = model, data, objective
        self.echo = echo
        self.on_record = on_record
        self._main = True

    # ---------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Run the configured training (resuming from ``cfg.resume`` if set) and return
        its :class:`TrainResult`; with several processes every rank calls it."""
        cfg = self.cfg
        prev_threads = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device)
        world = distributed.setup(device)
        self._main = world.is_main
        try:
            return self._fit(cfg, device, world)
        finally:
            distributed.teardown(world)
            if cfg.threads:
                torch.set_num_threads(prev_threads)

    # ---------------------------------------------------------------------------------------
    def _fit(self, cfg: TrainConfig, device: torch.device, world) -> TrainResult:
        ckpt = None
        if cfg.resume:
            ckpt = load_checkpoint(cfg.resume)
            try:
                stored = TrainConfig.from_dict(ckpt["config"])
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"checkpoint {cfg.resume!r} holds an unusable config: {exc}") from None
            diffs = config_differences(stored, cfg)
            if diffs:
                lines = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in diffs)
                raise CheckpointError(f"cannot resume from {cfg.resume!r} with a different run "
                                      f"configuration ({lines}); drop those options to continue "
                                      f"the stored run")

        try:  # setup: a ValueError here is a configuration that cannot work
            seed_everything(cfg.seed)
            data = self._data if self._data is not None else build_data(cfg)
            model = self._model if self._model is not None else build_model(
                cfg.task, embed_dim=cfg.embed_dim, hidden=cfg.hidden, depth=cfg.depth,
                dropout=cfg.dropout, views=cfg.views, in_dims=_in_dims(data))
            objective = self._objective if self._objective is not None else build_objective(
                cfg.loss, options=cfg.loss_options, temperature=cfg.temperature,
                learnable_temperature=cfg.learnable_temperature, max_logit_scale=cfg.max_logit_scale,
                normalize=cfg.normalize, use_labels=cfg.use_labels, backend=cfg.backend)
            objective.check_slots(data.slots)
            if world.size > 1:
                distributed.check_batch(cfg.batch_size, world)
                objective.set_gather(cfg.gather)  # fastcl says which gather modes exist
            if objective.spec.uses_labels and cfg.use_labels and not getattr(data, "has_labels", False):
                objective.use_labels = False
            if cfg.chunk_size is not None and has_batchnorm(model):
                warnings.warn("the model has BatchNorm layers: chunked training normalizes them by "
                              "chunk statistics and updates their running averages twice per step; "
                              "use LayerNorm (or chunk_size=None)", RuntimeWarning, stacklevel=3)
            model.to(device)
            objective.to(device)
            net = distributed.wrap_model(model, world, device)
            if world.rank > 0:  # a dropout stream of its own (model init above is rank 0's)
                seed_everything(distributed.rank_seed(cfg.seed, world.rank))
            in_dtype = param_dtype(model)

            steps_per_epoch = data.steps_per_epoch(cfg.batch_size, cfg.steps_per_epoch)
            total_steps = steps_per_epoch * cfg.epochs
            optimizer = build_optimizer([model, objective], lr=cfg.lr, weight_decay=cfg.weight_decay,
                                        betas=cfg.betas)
            scheduler = build_scheduler(optimizer, warmup=min(cfg.warmup_steps, total_steps),
                                        total=total_steps, min_ratio=cfg.min_lr_ratio)
            use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
            autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_amp else None
            emb_dtype = torch.bfloat16 if use_amp else (in_dtype or torch.float32)
            loss_backend = dispatch.select(objective.op, device, emb_dtype, cfg.backend)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        meter = PeakMemory(device)

        history: list = []
        progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "epoch_loss_sum": 0.0,
                    "epoch_steps": 0}
        if ckpt is not None:
            stored_fp, now_fp = ckpt.get("data"), data.fingerprint()
            if stored_fp is not None and stored_fp != now_fp:
                raise CheckpointError(f"checkpoint {cfg.resume!r} was trained on other data "
                                      f"({stored_fp}), this run has {now_fp}")
            try:
                model.load_state_dict(ckpt["model"])
                objective.load_state_dict(ckpt["objective"])
                optimizer.load_state_dict(ckpt["optimizer"])
                scheduler.load_state_dict(ckpt["scheduler"])
            except (RuntimeError, KeyError, ValueError) as exc:
                raise CheckpointError(f"checkpoint {cfg.resume!r} does not fit this model / "
                                      f"optimizer: {str(exc).splitlines()[0]}") from None
            progress.update(ckpt["progress"])
            history = list(ckpt.get("history", []))
        log = _Log(cfg.log if world.is_main else None, history, append=ckpt is not None,
                   on_record=self.on_record if world.is_main else None)
        result = TrainResult(cfg, model, objective, optimizer, scheduler, history,
                             progress["global_step"], progress["epoch"], False, loss_backend, device,
                             world.size, world.rank)

        def evaluate_now() -> dict:
            # rank 0 evaluates, the others take its numbers (no collective inside)
            metrics = None
            if world.is_main:
                metrics = evaluate(model, data, device=device, knn_k=cfg.knn_k,
                                   samples=cfg.metric_samples, seed=cfg.seed, autocast=autocast)
            return distributed.broadcast_object(metrics, world)

        def write_checkpoint(path: str) -> None:
            # collective: every rank's RNG state goes to rank 0, which writes; the others learn
            # whether it succeeded
            rngs = distributed.all_gather_object(capture_rng(), world)
            error = None
            if world.is_main:
                try:
                    save_checkpoint(path, {
                        "config": cfg.to_dict(),
                        "model": model.state_dict(),
                        "objective": objective.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": rngs[0],
                        "rng_ranks": rngs if world.size > 1 else None,
                        "world_size": world.size,
                        "progress": dict(progress),
                        # data order: epoch e visits permutation(seed, e); step s of it draws its
                        # augmentations from (seed, e, s): (epoch, step_in_epoch) is the whole state
                        "data_order": {"epoch": progress["epoch"],
                                       "step_in_epoch": progress["step_in_epoch"],
                                       "seed": cfg.seed, "batch_size": cfg.batch_size},
                        "data": data.fingerprint(),
                        "history": history,
                        "versions": {"fastcl": str(fastcl.__version__), "torch": str(torch.__version__)},
                    })
                except BaseException as exc:
                    distributed.broadcast_object(f"{exc.__class__.__name__}: {exc}", world)
                    raise
            error = distributed.broadcast_object(error, world)
            if error is not None:
                raise RuntimeError(f"rank 0 could not write the checkpoint {path!r}: {error}")
            log({"event": "checkpoint", "step": progress["global_step"], "path": path}, keep=False)

        def restore_rank_rng() -> None:
            states = ckpt.get("rng_ranks")
            if world.size == 1 or (states and len(states) == world.size):
                restore_rng(states[world.rank] if world.size > 1 else ckpt["rng"])
            elif world.is_main:
                restore_rng(ckpt["rng"])
            else:  # stored by another number of processes: a fresh stream for this rank
                seed_everything(distributed.rank_seed(cfg.seed, world.rank) + progress["global_step"])

        t_start = time.perf_counter()
        try:
            log({"event": "start", "resumed_from": cfg.resume, "step": progress["global_step"],
                 "device": str(device), "loss_backend": loss_backend, "amp": use_amp,
                 "world_size": world.size, "gather": cfg.gather if world.size > 1 else None,
                 "steps_per_epoch": steps_per_epoch,
                 "total_steps": total_steps, "fastcl": fastcl.__version__,
                 "torch": str(torch.__version__), "config": cfg.to_dict()}, keep=False)
            if ckpt is None:
                record = {"event": "eval", "epoch": 0, "step": 0, **evaluate_now()}
                log(record)
                self._say(f"epoch 0/{cfg.epochs} (untrained)  " + _fmt_metrics(record))
            else:
                restore_rank_rng()  # last: nothing after it may draw from the RNGs
                self._say(f"resumed from {cfg.resume} at step {progress['global_step']} "
                          f"(epoch {progress['epoch'] + 1}, step {progress['step_in_epoch']})")
            steps_this_run = 0
            clip_params = [p for m in (model, objective) for p in m.parameters() if p.requires_grad]
            loss_params = [p for p in objective.parameters() if p.requires_grad]

            while progress["epoch"] < cfg.epochs:
                epoch = progress["epoch"]
                t_epoch = time.perf_counter()
                bar = _bar(cfg, world, steps_per_epoch, progress["step_in_epoch"], epoch)
                try:
                    while progress["step_in_epoch"] < steps_per_epoch:
                        if (cfg.stop_after is not None and steps_this_run >= cfg.stop_after):
                            break
                        step = progress["step_in_epoch"]
                        t0 = time.perf_counter()
                        meter.reset()
                        batch = read_batch(data, epoch, step, cfg.batch_size, world.rank,
                                           world.size).to(device, in_dtype)
                        optimizer.zero_grad(set_to_none=True)
                        res = contrastive_step(net, objective, batch.inputs, batch.labels,
                                               chunk_size=cfg.chunk_size, autocast=autocast,
                                               no_sync=getattr(net, "no_sync", None), memory=meter)
                        # the encoder's gradients are averaged by DDP; the loss's own parameters
                        # (outside DDP) the same way: the mean over ranks is the global gradient
                        distributed.average_gradients(loss_params, world)
                        grad_norm = None
                        if cfg.grad_clip:
                            grad_norm = float(torch.nn.utils.clip_grad_norm_(clip_params, cfg.grad_clip))
                        lr = optimizer.param_groups[0]["lr"]
                        optimizer.step()
                        scheduler.step()
                        objective.clamp_()
                        loss = float(distributed.mean_over_ranks(res.loss, world))  # the global loss
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        dt = time.perf_counter() - t0
                        peaks = [p for p in (res.phase_peaks.get("embed"), meter.peak()) if p is not None]
                        step_peak = max(peaks) if peaks else None
                        progress["step_in_epoch"] += 1
                        progress["global_step"] += 1
                        progress["epoch_loss_sum"] += loss
                        progress["epoch_steps"] += 1
                        steps_this_run += 1
                        if not math.isfinite(loss):
                            raise FloatingPointError(f"loss is {loss} at step {progress['global_step']}")
                        log({"event": "step", "epoch": epoch + 1, "step": progress["global_step"],
                             "loss": loss, "lr": lr, "logit_scale": objective.logit_scale(),
                             "grad_norm": grad_norm, "samples_per_s": cfg.batch_size / dt,
                             "step_time_s": dt, "peak_mem_mb": _mb(step_peak),
                             "loss_peak_mb": _mb(res.loss_peak_bytes)})
                        if bar is not None:
                            bar.set_postfix({"loss": f"{loss:.4f}",
                                             "samples/s": f"{cfg.batch_size / dt:,.0f}",
                                             "mem": format_bytes(step_peak)}, refresh=False)
                            bar.update(1)
                        if cfg.checkpoint and cfg.checkpoint_every and \
                                progress["global_step"] % cfg.checkpoint_every == 0:
                            write_checkpoint(cfg.checkpoint)
                finally:
                    if bar is not None:
                        bar.close()
                if progress["step_in_epoch"] < steps_per_epoch:  # stopped by stop_after
                    write_checkpoint(cfg.checkpoint)
                    log({"event": "stop", "step": progress["global_step"],
                         "reason": f"stop_after={cfg.stop_after}"}, keep=False)
                    self._say(f"stopped after {steps_this_run} steps at step "
                              f"{progress['global_step']}; checkpoint {cfg.checkpoint}")
                    result.stopped_early = True
                    break
                train_loss = progress["epoch_loss_sum"] / max(progress["epoch_steps"], 1)
                progress.update(epoch=epoch + 1, step_in_epoch=0, epoch_loss_sum=0.0, epoch_steps=0)
                record = {"event": "eval", "epoch": epoch + 1, "step": progress["global_step"],
                          "train_loss": train_loss, "logit_scale": objective.logit_scale(),
                          **evaluate_now(), "epoch_time_s": time.perf_counter() - t_epoch}
                log(record)
                self._say(f"epoch {epoch + 1}/{cfg.epochs}  " + _fmt_metrics(record))
                if cfg.checkpoint:
                    write_checkpoint(cfg.checkpoint)
            log({"event": "end", "step": progress["global_step"], "stopped_early": result.stopped_early,
                 "time_s": time.perf_counter() - t_start}, keep=False)
        finally:
            log.close()
        if cfg.plot and world.is_main:
            from .plot import plot_history

            plot_history(history, cfg.plot, title=f"{cfg.task}: {cfg.loss}, batch {cfg.batch_size}")
        result.global_step = progress["global_step"]
        result.epoch = progress["epoch"]
        return result

    def _say(self, line: str) -> None:
        if self.echo is not None and self._main:
            self.echo(line)


def _mb(n: Optional[int]) -> Optional[float]:
    return None if n is None else n / 2 ** 20


def _bar(cfg: TrainConfig, world, total: int, initial: int, epoch: int):
    if not cfg.progress or not world.is_main:
        return None
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs stay clean)
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                leave=False, dynamic_ncols=True, disable=None)


_SHOWN = ("train_loss", "knn_acc", "recall@1", "recall@5", "alignment", "uniformity", "logit_scale")


def _fmt_metrics(record: dict) -> str:
    parts = []
    for k in _SHOWN:
        v = record.get(k)
        if v is not None:
            parts.append(f"{k} {v:.4g}" if k in ("logit_scale",) else f"{k} {v:.4f}")
    if record.get("epoch_time_s") is not None:
        parts.append(f"({record['epoch_time_s']:.1f}s)")
    return "  ".join(parts)


def train(cfg: TrainConfig, **kwargs) -> TrainResult:
    """Run the training described by ``cfg`` (see :class:`Trainer` for the keyword arguments)."""
    return Trainer(cfg, **kwargs).fit()
