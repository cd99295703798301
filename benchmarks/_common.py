"""What every benchmark script shares: the environment stamp, timing, peak memory, baselines.

- :func:`environment`: device, versions and date, stamped on every result;
- :func:`timed`: warm-up, then the median of ``reps`` calls (CUDA events on a GPU, wall time on
  a CPU) and the peak memory beyond what was allocated before (GPU: the caching allocator's
  counters; CPU: ``None``, measured per process by :mod:`benchmarks.bench_cpu_contrastive`);
- :func:`eager_clip`, :func:`infcl_clip`, :func:`open_clip_clip`, :func:`pml_clip`: the symmetric
  CLIP loss as the baselines compute it, each ``None`` where its package is not installed
  (:func:`pml_info_nce`: pytorch-metric-learning's loss in one direction); :func:`eager_siglip`
  the sigmoid loss with materialized logits.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from typing import Callable, Optional
from unittest import mock

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def environment(device: torch.device) -> dict:
    """Date, versions and the device's name (GPU model, or CPU cores and threads)."""
    import fastcl

    env = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "python": platform.python_version(),
           "fastcl": fastcl.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        pass
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
    else:
        env["device"] = f"CPU, {os.cpu_count()} cores ({platform.machine()})"
        env["threads"] = torch.get_num_threads()
    return env


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class RssPeak:
    """Peak resident memory of this process beyond its level at entry (Linux).

    Entry resets the kernel's high-water mark through ``/proc/self/clear_refs``; ``extra`` is
    then ``VmHWM - VmRSS(entry)`` in bytes (``None`` where ``/proc`` is unavailable). Allocator
    caching makes it an upper bound of what the code held, never an underestimate.
    """

    def __enter__(self):
        self.reset = self.extra = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        try:
            self.before = _status("VmRSS")
        except (OSError, KeyError):
            self.before = None
        return self

    def __exit__(self, *exc):
        if self.before is not None:
            self.extra = max(0, _status("VmHWM") - self.before)
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def keys_given():
    """Within: fastcl's losses over one feature set pass their keys to the statistics op as a
    second feature set (``k = z``, not ``None``) and skip the fused self-similarity sweep, so
    that their backward is the two-feature-set one: the B side of an A/B comparison of the
    symmetric backward, in the same process. (The functional layer makes both choices in the
    forward; the backward then follows what the forward saved.)"""
    from fastcl import functional
    from fastcl.ops import contrastive as contrastive_ops

    saved = contrastive_ops.SELF_FUSED_BACKENDS, functional.contrastive_stats

    def two_sets(q, k, *args, **kw):
        return saved[1](q, q if k is None else k, *args, **kw)

    contrastive_ops.SELF_FUSED_BACKENDS = ()
    functional.contrastive_stats = two_sets
    try:
        yield
    finally:
        contrastive_ops.SELF_FUSED_BACKENDS, functional.contrastive_stats = saved


def lse2_second_pass(backend: str):
    """A context within which the statistics op of ``backend`` computes the second
    log-sum-exp (``lse2``, the hard-negative loss's LSE at ``beta / (1 + beta)``) by a second
    run of its kernels at that multiplier, forward and backward (``backend`` left out of
    ``fastcl.ops.contrastive.LSE2_BACKENDS``, restored on exit): the cost of two statistics
    passes, the B side of the A/B comparison of the one-pass ``lse2``, in the same process. It
    must cover the backward, which reads the list again."""
    from fastcl.ops import contrastive as contrastive_ops

    kept = tuple(b for b in contrastive_ops.LSE2_BACKENDS if b != backend)
    return mock.patch.object(contrastive_ops, "LSE2_BACKENDS", kept)


def without_slabs():
    """A context within which the Triton kernels never take the schedule by slabs
    (``SLAB_MIN_D`` of :mod:`fastcl.kernels.contrastive` out of reach, through the environment,
    restored on exit): the column statistics of the forward in a second launch, and the
    backward in one launch per orientation, the logits recomputed once per output slice; the B
    side of the A/B comparison of the two schedules at wide features, in the same process. It
    must cover the backward, where its schedule is chosen."""
    return mock.patch.dict(os.environ, {"FASTCL_TRITON_SLAB_MIN_D": str(1 << 30)})


def slab_accumulate():
    """A context within which the Triton backward by slabs accumulates the gradient of the
    columns from the slabs of rows (``SLAB_ACCUMULATE`` of :mod:`fastcl.kernels.contrastive`,
    through the environment, restored on exit): one logit recompute per backward instead of
    two, for an fp32 ``C x D`` accumulator; the A side of that A/B comparison, in the same
    process. It must cover the backward, where its schedule is chosen."""
    return mock.patch.dict(os.environ, {"FASTCL_TRITON_SLAB_ACCUMULATE": "1"})


def self_forward(mode: str, backend: str = "triton"):
    """A context within which the forward of self-similarity (``k=None``) computes the full
    square of logits (``mode="square"``) or, on Triton, the blocks on and below the diagonal
    whatever the size (``"half"``), instead of the backend's own choice: the sides of the A/B
    comparison of the half-square forward, in the same process. Triton:
    ``FASTCL_TRITON_SELF_FWD`` 0 or 2, through the environment; CUDA C++ (``"square"`` only):
    the backend left out of ``SELF_FWD_BACKENDS``, so that the statistics op hands its forward
    ``k = q``. Restored on exit."""
    if backend == "cuda":
        if mode != "square":
            raise ValueError("the CUDA C++ forward of self-similarity has no forced half square")
        from fastcl.ops import contrastive as contrastive_ops

        kept = tuple(b for b in contrastive_ops.SELF_FWD_BACKENDS if b != "cuda")
        return mock.patch.object(contrastive_ops, "SELF_FWD_BACKENDS", kept)
    value = {"square": "0", "half": "2"}[mode]
    return mock.patch.dict(os.environ, {"FASTCL_TRITON_SELF_FWD": value})


def timed(step: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> dict:
    """``{"seconds": median, "times": [...], "extra_bytes": peak beyond the start or None,
    "out": the last result}``, or ``{"error": ...}`` when ``step`` raises (out of memory, a
    baseline that cannot run the shape): a failing implementation is reported, not fatal."""
    cuda = device.type == "cuda"
    try:
        for _ in range(warmup):          # compilation, autotuning, thread pools
            step()
        sync(device)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        times = []
        out = None
        for _ in range(reps):
            out = None
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                out = step()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                out = step()
                times.append(time.perf_counter() - t0)
        extra = torch.cuda.max_memory_allocated(device) - base if cuda else None
        return {"seconds": statistics.median(times), "times": times, "extra_bytes": extra,
                "out": out}
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as exc:
        return {"error": f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:120]}"}
    finally:
        if cuda:
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# the symmetric CLIP loss as the baselines compute it: f(x, y, scale) -> loss
# --------------------------------------------------------------------------------------------

def eager_clip(x, y, scale):
    """Materialized logits and ``F.cross_entropy`` in both directions (open_clip's arithmetic)."""
    logits = scale * x @ y.T
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.T.float(), labels)) / 2


def eager_info_nce(x, y, scale):
    """InfoNCE in one direction with materialized logits: row i of ``x`` against every row of
    ``y``, its positive the same row (fp16 / bf16 logits in fp32)."""
    logits = scale * x @ y.T
    return F.cross_entropy(logits.float(), torch.arange(x.shape[0], device=x.device))


def eager_nt_xent(z1, z2, scale):
    """NT-Xent (SimCLR) with materialized logits: ``F.cross_entropy`` over the concatenated
    views, the diagonal masked, each anchor's positive its other view (fp16 / bf16 logits in
    fp32)."""
    n = z1.shape[0]
    z = torch.cat([z1, z2])
    s = scale * z @ z.T
    s = (s.float() if s.dtype in (torch.float16, torch.bfloat16) else s).fill_diagonal_(-torch.inf)
    idx = torch.arange(n, device=z.device)
    return F.cross_entropy(s, torch.cat([idx + n, idx]))


def infcl_clip() -> Optional[Callable]:
    """Inf-CL's Triton loss in both directions, or ``None`` without ``inf-cl`` (GPU only)."""
    try:
        from inf_cl import cal_inf_loss
    except Exception:
        return None

    def loss(x, y, scale):
        return (cal_inf_loss(x, y, scale=scale) + cal_inf_loss(y, x, scale=scale)) / 2

    return loss


def open_clip_clip() -> Optional[Callable]:
    """open_clip's ``ClipLoss`` (one process), or ``None`` without ``open_clip``."""
    try:
        from open_clip.loss import ClipLoss
    except Exception:
        return None
    module = ClipLoss()

    def loss(x, y, scale):
        return module(x, y, scale)

    return loss


# pytorch-metric-learning's NTXentLoss lists every (anchor, negative) pair and compares each anchor
# with each pair's anchor: an N x N(M - 1) mask and its float copies, ~26 bytes per element for
# forward + backward of both directions in fp32 (measured). Above this budget per direction the
# baseline refuses with MemoryError instead of exhausting the machine (N ~ 400 with fp32).
PML_NTXENT_MAX_BYTES = 1 << 30
PML_LOSSES = ("ntxent", "supcon")


def pml_info_nce(kind: str = "ntxent") -> Optional[Callable]:
    """InfoNCE query -> key with a pytorch-metric-learning loss, or ``None`` without the package.

    ``kind`` is ``"ntxent"`` (``NTXentLoss``) or ``"supcon"`` (``SupConLoss``, which builds
    N x M masks instead of a list of pairs). Both are used in their cross-batch form: the queries
    as ``embeddings`` with labels ``arange(N)``, the keys as ``ref_emb`` with their own labels
    ``arange(M)``, so that row ``i``'s only positive is key ``i`` and every other key is a
    negative. Two distinct label tensors are required: given the same object, the library drops
    the diagonal from the positives. The result equals :func:`fastcl.info_nce` with
    ``logit_scale=scale`` in value and in gradients (q, k and the scale) because:

    - the similarity is ``DotProductSimilarity(normalize_embeddings=False)``: the library's
      default ``CosineSimilarity`` gives the same value on unit-norm inputs but differentiates
      through the normalization, projecting each row's gradient off that row;
    - the temperature is ``1 / scale`` (a tensor when ``scale`` is one, so the scale gets its
      gradient through it);
    - the reducer is ``MeanReducer``: NTXentLoss reduces per positive pair and SupConLoss
      averages the log-probabilities of each row's positives, both one per row here, so the
      mean over pairs is the mean over rows (SupConLoss's default ``AvgNonZeroReducer`` would
      only differ for a row whose loss is exactly 0);
    - both add ``finfo.tiny`` inside a logarithm or a count, which rounds away in fp32 and fp64.
    """
    if kind not in PML_LOSSES:
        raise ValueError(f"kind must be one of {PML_LOSSES}, got {kind!r}")
    try:
        from pytorch_metric_learning.distances import DotProductSimilarity
        from pytorch_metric_learning.losses import NTXentLoss, SupConLoss
        from pytorch_metric_learning.reducers import MeanReducer
    except Exception:
        return None
    cls = NTXentLoss if kind == "ntxent" else SupConLoss

    def loss(x, y, scale):
        n, m = x.shape[0], y.shape[0]
        need = 4 * x.element_size() * n * m * (m - 1)
        if kind == "ntxent" and need > PML_NTXENT_MAX_BYTES:
            raise MemoryError(f"NTXentLoss would hold ~{need / 2**30:.0f} GiB of pair masks at "
                              f"N = {n} (limit {PML_NTXENT_MAX_BYTES / 2**30:.0f} GiB)")
        module = cls(temperature=1 / scale, reducer=MeanReducer(),
                     distance=DotProductSimilarity(normalize_embeddings=False))
        return module(x, torch.arange(n, device=x.device), ref_emb=y,
                      ref_labels=torch.arange(m, device=y.device))

    return loss


def pml_clip(kind: str = "ntxent") -> Optional[Callable]:
    """The symmetric CLIP loss as the mean of :func:`pml_info_nce` in both directions, or
    ``None`` without pytorch-metric-learning."""
    one = pml_info_nce(kind)
    if one is None:
        return None

    def loss(x, y, scale):
        return (one(x, y, scale) + one(y, x, scale)) / 2

    return loss


def eager_siglip(x, y, scale, bias=-10.0):
    """The sigmoid loss with materialized logits (open_clip's SigLipLoss arithmetic, one process)."""
    logits = (scale * x @ y.T + bias).float()
    z = 2 * torch.eye(x.shape[0], device=x.device) - 1
    return -F.logsigmoid(z * logits).sum() / x.shape[0]
