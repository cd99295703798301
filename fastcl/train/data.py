"""Datasets of the training loop, with a data order that is a pure function of the run's state.

A dataset hands out the batch of ``(epoch, step)``: the sample order of an epoch is a permutation
drawn from ``(seed, epoch)`` and the augmentations of a step from ``(seed, epoch, step)``. The
data-order state of a run is therefore just ``(epoch, step_in_epoch)`` (stored in checkpoints),
and a resumed run sees exactly the batches the uninterrupted run would have seen.

On several processes, ``batch(epoch, step, batch_size, rank=r, world_size=W)`` is rank ``r``'s
shard of the global batch: its rows ``[r B/W, (r+1) B/W)`` (:func:`shard_rows`), so the shards
concatenated by rank are the global batch of a single-process run with the same seed, in the same
order. The random draws of a step (augmentation parameters, synthetic samples) are made for the
whole global batch from ``(seed, epoch, step)`` and each rank keeps the rows of its shard: a
sample's randomness depends on its position in the global batch, never on the number of
processes. Only the work proportional to the data (indexing, the augmentation itself, the
synthetic maps) is done for the shard alone.

Two kinds of data:

- ``kind = "views"``: one input per sample, ``views`` augmented views of it through one shared
  encoder (SimCLR / SupCon / multi-view); optional labels (k-NN accuracy, SupCon).
- ``kind = "pairs"``: two inputs per sample (image / text style), one encoder per slot; metrics
  are retrieval recall@k between the two towers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Batch",
    "derive_generator",
    "shard_rows",
    "read_batch",
    "ViewsData",
    "PairsData",
    "SyntheticPairs",
    "load_digits",
    "DigitsAugment",
    "digits_augment",
]


@dataclass
class Batch:
    """One training batch: ``inputs[slot]`` is ``[N, ...]``; ``labels`` ``[N]`` or ``None``."""

    inputs: list
    labels: Optional[Tensor] = None

    @property
    def size(self) -> int:
        return int(self.inputs[0].shape[0])

    def to(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> "Batch":
        """On ``device``; floating-point inputs also cast to ``dtype`` when given."""
        def move(x: Tensor) -> Tensor:
            if dtype is not None and x.is_floating_point():
                return x.to(device, dtype, non_blocking=True)
            return x.to(device, non_blocking=True)

        return Batch([move(x) for x in self.inputs],
                     None if self.labels is None else self.labels.to(device, non_blocking=True))

    def rows(self, sl: slice) -> "Batch":
        """The batch restricted to the rows ``sl`` of every slot (and of the labels)."""
        return Batch([x[sl] for x in self.inputs], None if self.labels is None else self.labels[sl])


def shard_rows(batch_size: int, rank: int = 0, world_size: int = 1) -> slice:
    """The rows of the global batch that rank ``rank`` of ``world_size`` reads: the ``rank``-th of
    ``world_size`` equal contiguous blocks. A batch that does not divide evenly is refused (every
    rank must hold as many anchors for the gathered loss)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world_size} processes: "
                         f"every rank reads an equal shard of the global batch; use a multiple of "
                         f"{world_size} (e.g. {max(world_size, batch_size // world_size * world_size)})")
    per = batch_size // world_size
    return slice(rank * per, (rank + 1) * per)


def _takes_shard(data) -> bool:
    import inspect

    try:
        params = inspect.signature(data.batch).parameters
    except (TypeError, ValueError):
        return False
    return "rank" in params and "world_size" in params


def read_batch(data, epoch: int, step: int, batch_size: int, rank: int = 0,
               world_size: int = 1) -> Batch:
    """Rank ``rank``'s shard of the global batch of ``(epoch, step)``.

    Datasets whose ``batch`` takes ``rank`` and ``world_size`` (the built-in ones) make only
    their shard; for any other dataset the global batch is made and sliced (same rows, more
    work per rank).
    """
    if world_size == 1:
        return data.batch(epoch, step, batch_size)
    sl = shard_rows(batch_size, rank, world_size)
    if _takes_shard(data):
        return data.batch(epoch, step, batch_size, rank=rank, world_size=world_size)
    return data.batch(epoch, step, batch_size).rows(sl)


_MASK = (1 << 63) - 1


def derive_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a deterministic mix of integer ``keys`` (seed, epoch, step, ...)."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (int(k) & _MASK)) * 0x100000001B3 & _MASK
        h ^= h >> 29
    return torch.Generator().manual_seed(h & _MASK)


_STREAM_ORDER, _STREAM_AUG, _STREAM_EVAL, _STREAM_SYNTH = 1, 2, 3, 4


class ViewsData:
    """Multi-view data: ``views`` augmented views of each training sample.

    Args:
        x_train, x_test: ``[N, ...]`` inputs (the test split is for the metrics).
        y_train, y_test: ``[N]`` integer labels or ``None``.
        augment: ``augment(x, generator) -> x'``, a random view of a batch. An augmentation
            that also has ``draw(n, generator) -> params`` (a tuple of tensors with ``n`` rows)
            and ``apply(x, params) -> x'``, with ``augment(x, g) == apply(x, draw(len(x), g))``,
            lets each rank of a multi-process run augment only its shard (see
            :class:`DigitsAugment`); a plain function is applied to the global batch and sliced.
        views: views per sample.
        seed: seeds the epoch order and the augmentations.
    """

    kind = "views"

    def __init__(self, x_train: Tensor, y_train: Optional[Tensor], x_test: Tensor,
                 y_test: Optional[Tensor], augment: Callable[[Tensor, torch.Generator], Tensor],
                 *, views: int = 2, seed: int = 0, name: str = "views"):
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        if (y_train is None) != (y_test is None):
            raise ValueError("pass labels for both splits or for neither")
        self.x_train, self.y_train, self.x_test, self.y_test = x_train, y_train, x_test, y_test
        self.augment = augment
        self.views = views
        self.seed = seed
        self.name = name
        self.slots = views

    @property
    def has_labels(self) -> bool:
        return self.y_train is not None

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    def steps_per_epoch(self, batch_size: int, requested: Optional[int] = None) -> int:
        """``requested`` if given, else the number of full batches of ``batch_size`` in
        one pass over the training split (``ValueError`` if even one does not fit)."""
        if batch_size > self.num_train:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.num_train} training "
                             f"samples of {self.name}")
        full = self.num_train // batch_size
        return full if requested is None else int(requested)

    def order(self, epoch: int) -> Tensor:
        """The permutation of the training samples for ``epoch`` (seeded)."""
        return torch.randperm(self.num_train, generator=derive_generator(self.seed, _STREAM_ORDER, epoch))

    def batch(self, epoch: int, step: int, batch_size: int, *, rank: int = 0,
              world_size: int = 1) -> Batch:
        """The batch of step ``step`` of epoch ``epoch`` (steps past one pass wrap around), or
        rank ``rank``'s shard of it (:func:`shard_rows`)."""
        per_pass = self.num_train // batch_size
        lap, pos = divmod(step, per_pass)
        idx = self.order(epoch * 1_000_003 + lap)[pos * batch_size:(pos + 1) * batch_size]
        gen = derive_generator(self.seed, _STREAM_AUG, epoch, step)
        sl = shard_rows(batch_size, rank, world_size)
        if world_size == 1:
            x = self.x_train[idx]
            inputs = [self.augment(x, gen) for _ in range(self.views)]
        elif hasattr(self.augment, "draw") and hasattr(self.augment, "apply"):
            x = self.x_train[idx[sl]]  # draws for the global batch, work for the shard only
            inputs = [self.augment.apply(x, tuple(p[sl] for p in self.augment.draw(batch_size, gen)))
                      for _ in range(self.views)]
        else:
            x = self.x_train[idx]
            inputs = [self.augment(x, gen)[sl] for _ in range(self.views)]
        idx = idx[sl]
        return Batch(inputs, None if self.y_train is None else self.y_train[idx])

    def eval_views(self, n: Optional[int] = None) -> list:
        """Two augmented views of (a fixed subset of) the test split, the same at every call."""
        x = self.x_test if n is None else self.x_test[:n]
        gen = derive_generator(self.seed, _STREAM_EVAL)
        return [self.augment(x, gen), self.augment(x, gen)]

    def fingerprint(self) -> dict:
        """What identifies the data, for checking that a resume uses the same."""
        return {"name": self.name, "kind": self.kind, "num_train": self.num_train,
                "views": self.views, "seed": self.seed}


class PairsData:
    """Paired two-tower data held in tensors: sample ``i`` is ``(xa[i], xb[i])``."""

    kind = "pairs"
    slots = 2
    has_labels = False

    def __init__(self, xa_train: Tensor, xb_train: Tensor, xa_eval: Tensor, xb_eval: Tensor,
                 *, seed: int = 0, name: str = "pairs"):
        if xa_train.shape[0] != xb_train.shape[0] or xa_eval.shape[0] != xb_eval.shape[0]:
            raise ValueError("the two towers need the same number of samples")
        self.xa_train, self.xb_train, self.xa_eval, self.xb_eval = xa_train, xb_train, xa_eval, xb_eval
        self.seed = seed
        self.name = name

    @property
    def num_train(self) -> int:
        return int(self.xa_train.shape[0])

    def steps_per_epoch(self, batch_size: int, requested: Optional[int] = None) -> int:
        """``requested`` if given, else the number of full batches of ``batch_size`` in
        one pass over the training pairs (``ValueError`` if even one does not fit)."""
        if batch_size > self.num_train:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.num_train} training pairs")
        return self.num_train // batch_size if requested is None else int(requested)

    def batch(self, epoch: int, step: int, batch_size: int, *, rank: int = 0,
              world_size: int = 1) -> Batch:
        """The pairs of step ``step`` of epoch ``epoch``, or rank ``rank``'s shard of them."""
        per_pass = self.num_train // batch_size
        lap, pos = divmod(step, per_pass)
        order = torch.randperm(self.num_train,
                               generator=derive_generator(self.seed, _STREAM_ORDER, epoch * 1_000_003 + lap))
        idx = order[pos * batch_size:(pos + 1) * batch_size][shard_rows(batch_size, rank, world_size)]
        return Batch([self.xa_train[idx], self.xb_train[idx]])

    def eval_pairs(self) -> tuple:
        """The held-out pairs ``(a, b)`` of the retrieval evaluation."""
        return self.xa_eval, self.xb_eval

    def fingerprint(self) -> dict:
        """What identifies the data, for checking that a resume uses the same."""
        return {"name": self.name, "kind": self.kind, "num_train": self.num_train, "seed": self.seed}


class SyntheticPairs:
    """A synthetic two-tower task of unbounded size, generated batch by batch.

    A latent ``z ~ N(0, I_d)`` is seen through two fixed random nonlinear maps with noise:
    ``a = tanh(z A) + s e_a``, ``b = tanh(z B) + s e_b``. The towers must learn to match ``a``
    with its own ``b`` among all others: recall@1 on held-out pairs measures it.
    """

    kind = "pairs"
    slots = 2
    has_labels = False

    def __init__(self, *, latent_dim: int = 16, dims: tuple = (32, 24), noise: float = 0.1,
                 eval_size: int = 4096, seed: int = 0):
        self.latent_dim, self.dims, self.noise, self.seed = latent_dim, tuple(dims), noise, seed
        self.eval_size = eval_size
        g = derive_generator(seed, _STREAM_SYNTH)
        gain = 2.0 / math.sqrt(latent_dim)
        self.mix_a = torch.randn(latent_dim, dims[0], generator=g) * gain
        self.mix_b = torch.randn(latent_dim, dims[1], generator=g) * gain
        self.name = "synthetic-pairs"

    def sample(self, n: int, gen: torch.Generator, rows: slice = slice(None)) -> tuple:
        """``n`` pairs drawn from ``gen``, of which the ``rows`` are computed and returned."""
        z = torch.randn(n, self.latent_dim, generator=gen)
        noise_a = torch.randn(n, self.dims[0], generator=gen)
        noise_b = torch.randn(n, self.dims[1], generator=gen)
        z = z[rows]
        a = torch.tanh(z @ self.mix_a) + self.noise * noise_a[rows]
        b = torch.tanh(z @ self.mix_b) + self.noise * noise_b[rows]
        return a, b

    def steps_per_epoch(self, batch_size: int, requested: Optional[int] = None) -> int:
        """``requested`` if given, else 10 (the data has no end)."""
        return 10 if requested is None else int(requested)

    def batch(self, epoch: int, step: int, batch_size: int, *, rank: int = 0,
              world_size: int = 1) -> Batch:
        """The pairs of ``(epoch, step)``, or rank ``rank``'s shard of them."""
        a, b = self.sample(batch_size, derive_generator(self.seed, _STREAM_AUG, epoch, step),
                           shard_rows(batch_size, rank, world_size))
        return Batch([a, b])

    def eval_pairs(self) -> tuple:
        """The held-out pairs ``(a, b)`` of the retrieval evaluation, the same at every
        call."""
        return self.sample(self.eval_size, derive_generator(self.seed, _STREAM_EVAL))

    def fingerprint(self) -> dict:
        """What identifies the data, for checking that a resume uses the same."""
        return {"name": self.name, "kind": self.kind, "latent_dim": self.latent_dim,
                "dims": list(self.dims), "noise": self.noise, "seed": self.seed}


# --------------------------------------------------------------------------------------------
# scikit-learn's handwritten digits
# --------------------------------------------------------------------------------------------

def load_digits(seed: int = 0, test_fraction: float = 0.2) -> tuple:
    """``(x_train, y_train, x_test, y_test)``: the 1797 8x8 digits of scikit-learn in ``[0, 1]``.

    The data ships with scikit-learn (no download); the split is a seeded permutation.
    """
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("the digits task needs scikit-learn: pip install scikit-learn "
                           "(or pip install 'fastcl[train]')") from exc
    d = _load()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=derive_generator(seed, 0))
    x, y = x[perm], y[perm]
    n_test = int(round(len(x) * test_fraction))
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


class DigitsAugment:
    """A random view of ``[N, 64]`` digit images: rotation (+-12 deg), scale (+-10%),
    translation (+-0.8 px), contrast (x0.8-1.2) and pixel noise, sampled per image.

    ``augment(x, gen)`` draws the parameters of ``len(x)`` images from ``gen`` and applies them;
    :meth:`draw` and :meth:`apply` are the two halves, so that a rank of a multi-process run can
    draw the parameters of the whole global batch (cheap) and transform only its own rows.
    """

    def draw(self, n: int, gen: torch.Generator) -> tuple:
        """The per-image parameters ``(angle, scale, shift, contrast, noise)``, ``n`` rows each."""
        angle = (torch.rand(n, generator=gen) - 0.5) * (2 * math.radians(12))
        scale = 1.0 + (torch.rand(n, generator=gen) - 0.5) * 0.2
        shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.4
        contrast = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen)
        noise = 0.05 * torch.randn(n, 1, 8, 8, generator=gen)
        return angle, scale, shift, contrast, noise

    def apply(self, x: Tensor, params: tuple) -> Tensor:
        """The views of ``x`` under ``params`` (as :meth:`draw` returns them, one row per image)."""
        angle, scale, shift, contrast, noise = params
        n = x.shape[0]
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                             torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        img = x.reshape(n, 1, 8, 8)
        grid = F.affine_grid(theta, [n, 1, 8, 8], align_corners=False)
        img = F.grid_sample(img, grid, align_corners=False, padding_mode="zeros")
        return (img * contrast + noise).clamp(0.0, 1.0).reshape(n, 64)

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        return self.apply(x, self.draw(x.shape[0], gen))


digits_augment = DigitsAugment()
"""``digits_augment(x, gen)``: a random view of ``[N, 64]`` digit images (see :class:`DigitsAugment`)."""


def digits_data(views: int = 2, seed: int = 0) -> ViewsData:
    x_tr, y_tr, x_te, y_te = load_digits(seed)
    return ViewsData(x_tr, y_tr, x_te, y_te, digits_augment, views=views, seed=seed, name="digits")
