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
def _load(backend: str, family: str = "contrastive"):
    """Return ``(module, None)`` or ``(None, reason)``: where ``backend`` keeps ``family``'s kernels.

    Triton keeps each family in its own module ``fastcl.kernels.<family>``; the compiled
    extension holds every family (functions suffixed ``_cpu`` / ``_cuda``).
    """
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the install
            return None, f"triton is not importable ({exc.__class__.__name__}: {exc})"
        try:
            return importlib.import_module(f"fastcl.kernels.{family}"), None
        except ModuleNotFoundError as exc:
            if exc.name == f"fastcl.kernels.{family}":
                return None, f"fastcl.kernels has no {family} kernels"
            return None, f"fastcl.kernels failed to import ({exc.__class__.__name__}: {exc})"
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


def _scan_installed() -> dict:
    """What is installed, found without importing it (safe to consult while tracing)."""
    from importlib.util import find_spec

    def spec(name):
        try:
            return find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    ext = spec("fastcl._C")
    triton = spec("triton")
    families = {}
    for family in ("contrastive", "siglip", "topk"):
        families[("triton", family)] = triton and spec(f"fastcl.kernels.{family}")
        families[("cpu", family)] = ext
        families[("cuda", family)] = ext
        families[("torch", family)] = True
    return families


_INSTALLED = _scan_installed()


def installed_error(backend: str, family: str) -> Optional[str]:
    """Like :func:`load_error` from what is installed, without importing (for traced code)."""
    if _INSTALLED.get((backend, family), False):
        return None
    return f"the {backend} backend has no installed {family} kernels"


def load_error(backend: str, family: str = "contrastive") -> Optional[str]:
    """``None`` if ``backend`` loads, else a sentence saying why it does not."""
    return _load(backend, family)[1]


def _attr(backend: str, name: str) -> str:
    return name if backend in ("triton", "torch") else f"{name}_{backend}"


def implements(backend: str, family: str) -> bool:
    """Whether a loadable ``backend`` has the kernels of ``family`` (its ``<family>_fwd``)."""
    return has_kernel(backend, f"{family}_fwd")


def has_kernel(backend: str, name: str) -> bool:
    """Whether a loadable ``backend`` implements op ``name`` itself."""
    module = _load(backend, name.rsplit("_", 1)[0])[0]
    return module is not None and hasattr(module, _attr(backend, name))


def kernel(backend: str, name: str) -> Callable:
    """The implementation of op ``name`` (``"<family>_<part>"``, e.g. ``"contrastive_fwd"``)."""
    module, reason = _load(backend, name.rsplit("_", 1)[0])
    if module is None:
        raise RuntimeError(f"fastcl backend {backend!r} is unavailable: {reason}")
    fn = getattr(module, _attr(backend, name), None)
    if fn is None:
        raise NotImplementedError(f"fastcl backend {backend!r} does not implement {name}")
    return fn


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
