"""One table that picks the backend of every call: (device, dtype, op) -> backend.

Backends:

- ``"triton"``: fused Triton kernels, on CUDA tensors (or on CPU tensors when Triton's
  interpreter is on, ``TRITON_INTERPRET=1``, which is how CI checks their math);
- ``"cuda"``: fused CUDA C++ kernels of the compiled extension ``fastcl._C``;
- ``"cpu"``: fused C++ kernels of ``fastcl._C`` on CPU tensors;
- ``"reference"``: the plain-PyTorch oracle of :mod:`fastcl.reference` (materializes the
  N x M logits: exact but quadratic in memory).

``backend="auto"`` takes the first backend of the table that can serve the call; the environment
variable ``FASTCL_BACKEND`` replaces ``"auto"`` by a fixed choice. An explicit backend that cannot
serve the call raises :class:`BackendUnavailableError` with the reason.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from . import _backends

__all__ = ["BACKENDS", "OPS", "BackendUnavailableError", "select", "why_not", "available"]

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")

# op -> kernel family implementing it (None: only the reference serves this op for now).
OPS = {
    "info_nce": "contrastive",
    "nt_xent": "contrastive",
    "supcon": "contrastive",
    "dcl": "contrastive",
    "multiview_loss": "contrastive",
    "hard_negative_nce": "contrastive",
    "siglip_loss": "siglip",
    "uniformity": "contrastive",
    "topk_similarity": "topk",
}

# Preference order of "auto" per device type.
AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}

# Input dtypes each kernel backend accepts.
DTYPES = {
    "triton": (torch.float16, torch.bfloat16, torch.float32),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
    "cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}

# Kernel backends implemented per family (the table grows as kernels land).
FAMILIES = {
    "contrastive": ("triton", "cuda", "cpu"),
    "siglip": ("triton", "cuda", "cpu"),
    "topk": ("triton", "cpu"),
}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot serve this call (missing build, device, dtype or op)."""


def why_not(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """``None`` if ``backend`` can run ``op`` on ``device``/``dtype``, else the reason."""
    if backend == "reference":
        return None
    if backend not in BACKENDS[1:]:
        return f"unknown backend {backend!r}; expected one of {BACKENDS}"
    family = OPS[op]
    if family is None or backend not in FAMILIES.get(family, ()):
        return f"{op} has no fused {backend} kernel yet (use backend='reference' or 'auto')"
    if dtype not in DTYPES[backend]:
        names = ", ".join(str(d).replace("torch.", "") for d in DTYPES[backend])
        return f"the {backend} backend takes {names} inputs, got {str(dtype).replace('torch.', '')}"
    if backend == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and _backends.triton_interpreted()):
            return (f"the triton backend runs on CUDA tensors (or CPU tensors with "
                    f"TRITON_INTERPRET=1), got tensors on {device}")
    elif backend == "cuda" and device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got tensors on {device}"
    elif backend == "cpu" and device.type != "cpu":
        return f"the cpu backend needs CPU tensors, got tensors on {device}"
    if torch.compiler.is_compiling():
        return _backends.installed_error(backend, family)
    reason = _backends.load_error(backend, family)
    if reason is None and not _backends.implements(backend, family):
        reason = f"this build of the {backend} backend has no {family} kernels"
    return reason


_warned: set = set()


def select(op: str, device: torch.device, dtype: torch.dtype, backend: str = "auto") -> str:
    """The backend that will run ``op`` for inputs on ``device`` of ``dtype``.

    Returns ``"reference"`` or the name of a kernel backend. Under ``torch.compile`` the choice
    is made at trace time from what is installed (nothing is imported while tracing) and baked
    into the graph.
    """
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("FASTCL_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"FASTCL_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reason = why_not(backend, op, device, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"fastcl.{op}: backend {backend!r} cannot serve this call: {reason}")
        return backend
    if OPS[op] is None:
        return "reference"
    reasons = []
    for candidate in AUTO_ORDER.get(device.type, ()):
        reason = why_not(candidate, op, device, dtype)
        if reason is None:
            return candidate
        reasons.append(f"{candidate}: {reason}")
    key = (op, device.type, dtype)
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        detail = "; ".join(reasons) if reasons else f"no fused kernel for {device.type} tensors"
        warnings.warn(
            f"fastcl.{op}: no fused backend for {device.type}/{str(dtype).replace('torch.', '')} "
            f"inputs ({detail}); using the reference implementation, whose memory grows as N x M.",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


def available() -> dict:
    """``{backend: None or reason}`` for each kernel backend on this machine (for ``fastcl info``)."""
    out = {}
    for backend in ("triton", "cuda", "cpu"):
        reason = _backends.load_error(backend)
        if reason is None:
            missing = [f for f in sorted(set(FAMILIES)) if backend in FAMILIES[f]
                       and not _backends.implements(backend, f)]
            if missing:
                reason = (reason + "; " if reason else "loaded, but ") + \
                    f"this build has no {', '.join(missing)} kernels"
        out[backend] = reason
    return out
