"""The configuration of a training run: one flat dataclass, stored in every checkpoint.

The fields split in two groups. *Trajectory* fields decide which parameters a run produces
(task, model, loss, batch, schedule, seed, ...): a resumed run must use the values stored in its
checkpoint, and :func:`fastcl.train.train` refuses a resume whose trajectory fields differ.
The others (logging, plotting, checkpoint paths, the progress bar, ``stop_after``) may change
from one invocation to the next.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["TrainConfig", "ConfigError", "TRAJECTORY_FIELDS", "TASKS", "AMP_MODES"]


class ConfigError(ValueError):
    """A run configuration that cannot work (a value out of range, an unknown loss option,
    a loss that does not fit the data, ...)."""

TASKS = ("digits", "pairs")
AMP_MODES = ("auto", "bf16", "off")


@dataclass
class TrainConfig:
    """Everything a run of :func:`fastcl.train.train` needs.

    Task and model:
        task: ``"digits"`` (scikit-learn's handwritten digits, ``views`` augmented views per
            image through one shared encoder, labels for SupCon and k-NN) or ``"pairs"`` (a
            synthetic paired two-tower task: two modalities generated from a shared latent).
        views: views per sample for ``"digits"`` (the two-tower task always has 2 slots).
        embed_dim, hidden, depth, dropout: the MLP encoders (``depth`` hidden layers).
        pairs_latent_dim, pairs_dims, pairs_noise, eval_size: the synthetic paired task.
    Loss:
        loss: a name of :data:`fastcl.train.LOSSES` (``clip``, ``info_nce``, ``nt_xent``,
            ``supcon``, ``dcl``, ``multiview``, ``siglip``, ``hard_negative_nce``, ``align_uniform``).
        loss_options: keyword options of that loss (``{"variant": "in"}``, ``{"method": "cmc"}``).
        temperature: initial temperature (the logit scale is ``1 / temperature``); ``None``
            takes the loss's own default.
        learnable_temperature: learn ``log(logit_scale)``, clamped at ``max_logit_scale``.
        normalize: L2-normalize the embeddings inside the loss (cosine similarity).
        use_labels: give the dataset's labels to SupCon (``False``: self-supervised SupCon).
        backend: fastcl backend of the loss (``"auto"``, ``"cpu"``, ``"triton"``, ...).
    Optimization:
        batch_size: samples per step (each contributes ``views`` embeddings per slot).
        chunk_size: GradCache chunk of the encoder passes (``None``: the whole batch in one
            graph, plain training).
        epochs, steps_per_epoch: length of the run (``steps_per_epoch`` ``None`` means one pass
            over the training set; the synthetic task needs it or uses 10).
        lr, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW with linear warmup then a
            cosine decay to ``min_lr_ratio * lr``.
        grad_clip: max global gradient norm (``0`` or ``None``: no clipping).
        amp: ``"auto"`` (bf16 autocast on CUDA, off on CPU), ``"bf16"`` or ``"off"``.
        seed: seeds python, numpy and torch; data order and augmentations derive from it.
    Evaluation:
        knn_k: neighbours of the k-NN classifier; metric_samples: rows of the uniformity
            subsample (uniformity is quadratic).
    Several processes (``torchrun``; not part of the trajectory, see
    :mod:`fastcl.train.distributed`):
        gather: how each rank's loss reaches the other ranks' embeddings, passed as the
            ``gather`` of the fastcl loss (``"all_gather"`` or ``"ring"``;
            :mod:`fastcl.distributed` lists the values it accepts). Unused on one process. ``batch_size`` is the global batch:
            each of the ``W`` processes reads ``batch_size / W`` samples of it (``W`` must
            divide it), and ``chunk_size`` counts rows per process.
    Run control (not part of the trajectory):
        device, threads, log, plot, checkpoint, checkpoint_every, resume, stop_after, progress.
    """

    # task and model
    task: str = "pairs"
    views: int = 2
    embed_dim: int = 32
    hidden: int = 256
    depth: int = 1
    dropout: float = 0.1
    pairs_latent_dim: int = 16
    pairs_dims: tuple = (32, 24)
    pairs_noise: float = 0.1
    eval_size: int = 4096
    # loss
    loss: str = "clip"
    loss_options: dict = field(default_factory=dict)
    temperature: Optional[float] = None
    learnable_temperature: bool = False
    max_logit_scale: float = 100.0
    normalize: bool = True
    use_labels: bool = True
    backend: str = "auto"
    # optimization
    batch_size: int = 1024
    chunk_size: Optional[int] = None
    epochs: int = 3
    steps_per_epoch: Optional[int] = None
    lr: float = 3e-3
    weight_decay: float = 1e-4
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: Optional[float] = 1.0
    amp: str = "auto"
    seed: int = 0
    # evaluation
    knn_k: int = 5
    metric_samples: int = 2048
    # several processes
    gather: str = "all_gather"
    # run control
    device: str = "auto"
    threads: Optional[int] = None
    log: Optional[str] = None
    plot: Optional[str] = None
    checkpoint: Optional[str] = None
    checkpoint_every: int = 0
    resume: Optional[str] = None
    stop_after: Optional[int] = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.pairs_dims = tuple(int(d) for d in self.pairs_dims)
        self.betas = tuple(float(b) for b in self.betas)
        self.loss_options = dict(self.loss_options or {})
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field with a value out of range."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}")
        need(self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for name in ("views", "embed_dim", "hidden", "batch_size", "epochs", "knn_k",
                     "pairs_latent_dim", "eval_size"):
            need(int(getattr(self, name)) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.depth >= 0, f"depth must be >= 0, got {self.depth}")
        need(self.metric_samples >= 2, f"metric_samples must be >= 2, got {self.metric_samples}")
        need(len(self.pairs_dims) == 2 and min(self.pairs_dims) >= 1,
             f"pairs_dims must be two positive sizes, got {self.pairs_dims}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.chunk_size is None or self.chunk_size >= 1,
             f"chunk_size must be None or >= 1, got {self.chunk_size}")
        need(self.steps_per_epoch is None or self.steps_per_epoch >= 1,
             f"steps_per_epoch must be None or >= 1, got {self.steps_per_epoch}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.grad_clip is None or self.grad_clip >= 0,
             f"grad_clip must be None or >= 0, got {self.grad_clip}")
        need(self.temperature is None or self.temperature > 0,
             f"temperature must be positive, got {self.temperature}")
        need(self.max_logit_scale > 1.0, f"max_logit_scale must be > 1, got {self.max_logit_scale}")
        need(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        need(self.stop_after is None or self.stop_after >= 1,
             f"stop_after must be None or >= 1, got {self.stop_after}")
        need(self.threads is None or self.threads >= 1, f"threads must be None or >= 1, got {self.threads}")
        need(isinstance(self.gather, str) and bool(self.gather),
             f"gather must name a gather mode of fastcl.distributed (e.g. 'all_gather'), "
             f"got {self.gather!r}")
        need((self.checkpoint is not None) or self.stop_after is None,
             "stop_after needs a checkpoint path to write the state it stops at (checkpoint=...)")

    def to_dict(self) -> dict:
        """A JSON-friendly dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown TrainConfig fields: {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with the given fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


# Fields that decide the parameters a run produces: a resume must keep them.
TRAJECTORY_FIELDS = (
    "task", "views", "embed_dim", "hidden", "depth", "dropout", "pairs_latent_dim", "pairs_dims",
    "pairs_noise", "eval_size", "loss", "loss_options", "temperature", "learnable_temperature",
    "max_logit_scale", "normalize", "use_labels", "backend", "batch_size", "chunk_size",
    "epochs", "steps_per_epoch", "lr", "weight_decay", "betas", "warmup_steps", "min_lr_ratio",
    "grad_clip", "amp", "seed", "knn_k", "metric_samples",
)
