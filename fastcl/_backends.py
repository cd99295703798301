"""Where each kernel backend lives, whether it can be loaded, and why not.

Nothing here is imported eagerly: the compiled extension and Triton are loaded on first use, so
``import fastcl`` never fails because one of them is missing.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Callable, Optional

__all__ = ["kernel", "load_error", "BACKENDS"]

# Kernel backends of the fused ops. "torch" is the materializing oracle of fastcl.reference
# wrapped as an op implementation: it checks the op plumbing in tests and is never picked by
# "auto" (it holds the N x M logits).
BACKENDS = ("triton", "cuda", "cpu", "torch")


@functools.lru_cache(maxsize=None)
def _load(backend: str):
    """Return ``(module, None)`` or ``(None, reason)`` for a kernel backend."""
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the install
            return None, f"triton is not importable ({exc.__class__.__name__}: {exc})"
        try:
            return importlib.import_module("fastcl.kernels.contrastive"), None
        except Exception as exc:
            return None, f"fastcl.kernels failed to import ({exc.__class__.__name__}: {exc})"
    if backend in ("cpu", "cuda"):
        try:
            ext = importlib.import_module("fastcl._C")
        except Exception as exc:
            return None, (
                "the compiled extension fastcl._C is not built "
                f"({exc.__class__.__name__}: {exc}); reinstall with `pip install -e .` "
                "(FASTCL_BUILD_EXT=0 skips it)"
            )
        if backend == "cuda" and not getattr(ext, "WITH_CUDA", False):
            return None, "fastcl._C was built without CUDA (no nvcc or a CPU-only torch at build time)"
        return ext, None
    if backend == "torch":
        return importlib.import_module("fastcl.ops._reference_impl"), None
    return None, f"unknown backend {backend!r}; expected one of {BACKENDS}"


def load_error(backend: str) -> Optional[str]:
    """``None`` if ``backend`` loads, else a sentence saying why it does not."""
    return _load(backend)[1]


def _attr(backend: str, name: str) -> str:
    return name if backend in ("triton", "torch") else f"{name}_{backend}"


def implements(backend: str, family: str) -> bool:
    """Whether a loadable ``backend`` has the forward and backward kernels of ``family``."""
    module = _load(backend)[0]
    return module is not None and all(
        hasattr(module, _attr(backend, f"{family}_{part}")) for part in ("fwd", "bwd"))


def kernel(backend: str, name: str) -> Callable:
    """The implementation of op ``name`` (e.g. ``"contrastive_fwd"``) in ``backend``."""
    module, reason = _load(backend)
    if module is None:
        raise RuntimeError(f"fastcl backend {backend!r} is unavailable: {reason}")
    fn = getattr(module, _attr(backend, name), None)
    if fn is None:
        raise NotImplementedError(f"fastcl backend {backend!r} does not implement {name}")
    return fn


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
