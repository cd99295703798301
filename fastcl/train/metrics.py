"""Metrics of the training loop and memory measurement.

- retrieval recall@k between two towers and k-NN accuracy of labelled embeddings, both on
  :func:`fastcl.topk_similarity` (queries in chunks, so at most ``chunk x M`` similarities live);
- alignment and uniformity (Wang & Isola 2020) with :func:`fastcl.alignment` and
  :func:`fastcl.uniformity`, the latter on a fixed subsample (it is ``N^2`` in the reference);
- :class:`PeakMemory`: peak memory of a code region, ``torch.cuda.max_memory_allocated`` on GPU
  and the peak resident set size on CPU (``VmHWM``, reset through ``/proc/self/clear_refs``);
- the memory an eager-PyTorch CLIP loss needs, counted and measured.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastcl

from .data import derive_generator

__all__ = [
    "PeakMemory",
    "embed",
    "param_dtype",
    "recall_at_k",
    "knn_accuracy",
    "alignment_uniformity",
    "evaluate",
    "eager_clip_bytes",
    "measure_eager_clip",
    "format_bytes",
]


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------

def _read_status(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


_LIBC = None


def _malloc_trim() -> None:
    """Return free heap memory to the OS (glibc); without it, memory freed earlier but kept
    by the allocator is reused without raising the resident set size, hiding real usage."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


class PeakMemory:
    """Peak memory of a region of code on ``device``.

    CUDA: ``reset()`` resets the allocator's peak; ``current()`` / ``peak()`` are
    ``memory_allocated`` / ``max_memory_allocated`` (tensors only). CPU: the process's resident
    set size: ``reset()`` returns the allocator's free pages to the OS (glibc ``malloc_trim``) and
    writes ``5`` to ``/proc/self/clear_refs`` (Linux), which resets the peak RSS (``VmHWM``) to
    the current RSS. Where that is unavailable, ``peak()`` is the peak RSS
    since the process started and :attr:`resettable` is False.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.resettable = True
        if self.device.type == "cpu":
            self.resettable = self._clear_refs() and _read_status("VmHWM") is not None

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        """Start a new peak: CUDA's peak statistics, or the process's high-water mark."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            _malloc_trim()  # freed heap pages go back to the OS, so reusing them counts again
            self._clear_refs()

    def current(self) -> Optional[int]:
        """Bytes in use now (CUDA allocations, or resident memory); None if unknown."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _read_status("VmRSS")

    def peak(self) -> Optional[int]:
        """The highest bytes in use since the last :meth:`reset`; None if unknown."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        hwm = _read_status("VmHWM")
        if hwm is not None:
            return hwm
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024

    @property
    def label(self) -> str:
        return "max_memory_allocated" if self.device.type == "cuda" else "peak RSS"

    @contextlib.contextmanager
    def measure(self):
        """``with meter.measure() as m: ...``; then ``m["peak"]`` and ``m["extra"]`` (bytes above
        the level at entry; ``None`` where the peak cannot be reset)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.reset()
        out = {"base": self.current(), "peak": None, "extra": None}
        try:
            yield out
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            out["peak"] = self.peak()
            if self.resettable and out["base"] is not None and out["peak"] is not None:
                out["extra"] = max(0, out["peak"] - out["base"])


def format_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}" if unit == "GiB" else f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------------------------
# embeddings and metrics
# --------------------------------------------------------------------------------------------

def param_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the first floating-point parameter of ``model`` (``None`` if it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


@torch.no_grad()
def embed(model: nn.Module, x: Tensor, slot: int, *, device: torch.device, batch: int = 4096,
          autocast: Optional[Callable] = None) -> Tensor:
    """L2-normalized fp32 embeddings of ``x`` through slot ``slot`` of ``model`` in eval mode
    (floating-point inputs are cast to the dtype of the model's parameters)."""
    was_training = model.training
    model.eval()
    amp = autocast or contextlib.nullcontext
    dtype = param_dtype(model) if x.is_floating_point() else None
    try:
        parts = []
        for chunk in x.split(batch):
            with amp():
                parts.append(model(chunk.to(device, dtype), slot).float())
        return F.normalize(torch.cat(parts), dim=1)
    finally:
        model.train(was_training)


@torch.no_grad()
def _topk(queries: Tensor, keys: Tensor, k: int, chunk: int = 4096) -> Tensor:
    return torch.cat([fastcl.topk_similarity(q, keys, k)[1] for q in queries.split(chunk)])


@torch.no_grad()
def recall_at_k(queries: Tensor, keys: Tensor, ks=(1, 5)) -> dict:
    """``{k: recall@k}``: the fraction of queries ``i`` whose key ``i`` is among their ``k`` most
    similar keys (inner product; normalize first for cosine)."""
    kmax = min(max(ks), keys.shape[0])
    idx = _topk(queries, keys, kmax)
    hit = idx == torch.arange(queries.shape[0], device=idx.device)[:, None]
    return {k: hit[:, :min(k, kmax)].any(1).float().mean().item() for k in ks}


@torch.no_grad()
def knn_accuracy(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor,
                 k: int = 5) -> float:
    """Accuracy of a ``k``-nearest-neighbour vote (inner product; ties go to the class with the
    larger summed similarity) of ``test`` against the labelled ``train`` bank."""
    k = min(k, train.shape[0])
    num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    correct = 0
    for q, y in zip(test.split(4096), test_labels.split(4096)):
        sims, idx = fastcl.topk_similarity(q, train, k)
        neigh = train_labels[idx]
        votes = F.one_hot(neigh, num_classes).float()
        score = votes.sum(1) + 1e-3 * (votes * sims.float().unsqueeze(-1)).sum(1)
        correct += (score.argmax(1) == y).sum().item()
    return correct / test.shape[0]


@torch.no_grad()
def alignment_uniformity(a: Tensor, b: Tensor, samples: int = 2048, seed: int = 0) -> dict:
    """Alignment of the pairs ``(a_i, b_i)`` and uniformity of ``a`` and of ``b`` (mean of the
    two) on a fixed subsample of ``samples`` rows."""
    align = fastcl.alignment(a, b).item()
    n = a.shape[0]
    if n > samples:
        idx = torch.randperm(n, generator=derive_generator(seed, 5))[:samples].to(a.device)
        a, b = a[idx], b[idx]
    unif = 0.5 * (fastcl.uniformity(a).item() + fastcl.uniformity(b).item())
    return {"alignment": align, "uniformity": unif}


def evaluate(model: nn.Module, data, *, device: torch.device, knn_k: int = 5,
             samples: int = 2048, seed: int = 0, autocast: Optional[Callable] = None) -> dict:
    """The epoch metrics of ``data`` (see :mod:`fastcl.train.data` for the two kinds)."""
    emb = lambda x, slot: embed(model, x, slot, device=device, autocast=autocast)  # noqa: E731
    out: dict = {}
    if data.kind == "pairs":
        xa, xb = data.eval_pairs()
        a, b = emb(xa, 0), emb(xb, 1)
        r_ab, r_ba = recall_at_k(a, b), recall_at_k(b, a)
        out.update({"recall@1": r_ab[1], "recall@5": r_ab[5],
                    "recall@1_ba": r_ba[1], "recall@5_ba": r_ba[5]})
        out.update(alignment_uniformity(a, b, samples, seed))
        return out
    if getattr(data, "has_labels", False):
        bank = emb(data.x_train, 0)
        test = emb(data.x_test, 0)
        out["knn_acc"] = knn_accuracy(bank, data.y_train.to(device), test,
                                      data.y_test.to(device), knn_k)
    v1, v2 = data.eval_views(samples)
    out.update(alignment_uniformity(emb(v1, 0), emb(v2, 1), samples, seed))
    return out


# --------------------------------------------------------------------------------------------
# what eager PyTorch needs for the same loss
# --------------------------------------------------------------------------------------------

def eager_clip_bytes(n: int, dtype: torch.dtype = torch.float32) -> int:
    """Lower bound of the memory an eager-PyTorch symmetric CLIP loss holds at its peak, beyond
    its inputs: four ``N x N`` matrices in the logits' dtype (the logits ``a * X Y^T`` and the
    unscaled product kept for the gradient of ``a``, the two log-softmax outputs kept for the
    backward), and in the backward the ``N x N`` gradient of the logits."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 5 * n * n * itemsize


def eager_clip_loss(a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
    """The symmetric CLIP loss as eager PyTorch (and open_clip) computes it: N x N logits."""
    logits = scale * (a @ b.T)
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def measure_eager_clip(n: int, d: int, *, device: torch.device, dtype: torch.dtype = torch.float32,
                       seed: int = 0) -> Optional[int]:
    """Measured peak extra memory of the eager CLIP loss forward + backward at batch ``n``
    (``None`` where the peak cannot be measured)."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device, dtype).requires_grad_()
    b = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device, dtype).requires_grad_()
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    meter = PeakMemory(device)
    with meter.measure() as m:
        eager_clip_loss(a, b, scale).backward()
    return m["extra"]
