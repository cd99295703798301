"""Checkpoints: written atomically, checked before they are trusted.

File layout (all integers little-endian)::

    magic    8 bytes   b"FCLTRAIN"
    version  u32       FORMAT_VERSION
    length   u64       payload length in bytes
    sha256   32 bytes  of the payload
    payload  length    torch.save of a dict (loaded with weights_only=True)

The payload dict holds ``format`` (``"fastcl.train/1"``), the config, the model, loss,
optimizer and scheduler state dicts, the RNG states (python, numpy, torch CPU, CUDA; those of
every rank in ``rng_ranks`` for a multi-process run, ``rng`` being rank 0's), the progress
(epoch, step in epoch, global step: the data-order state, see :mod:`fastcl.train.data`) and the
logged history. A multi-process run writes it from rank 0 alone.

:func:`save_checkpoint` writes to a temporary file in the destination's directory, fsyncs it and
renames it over the destination (``os.replace``, atomic on POSIX and Windows), then fsyncs the
directory: a crash leaves either the old checkpoint or the new one, never a partial file.
:func:`load_checkpoint` refuses anything that is not a complete, intact fastcl.train checkpoint
with a :class:`CheckpointError` saying what is wrong (foreign file, truncated, corrupt, other
format version) instead of an unpickling traceback.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import tempfile
import warnings
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "FORMAT",
    "FORMAT_VERSION",
    "MAGIC",
    "save_checkpoint",
    "load_checkpoint",
    "capture_rng",
    "restore_rng",
]

MAGIC = b"FCLTRAIN"
FORMAT_VERSION = 1
FORMAT = f"fastcl.train/{FORMAT_VERSION}"
_HEADER = struct.Struct("<8sIQ32s")
REQUIRED_KEYS = ("format", "config", "model", "objective", "optimizer", "scheduler", "rng",
                 "progress")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: foreign, truncated, corrupt, or from another format."""


# --------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------

def capture_rng() -> dict:
    """The RNG states of python, numpy, torch (CPU) and every CUDA device (if CUDA is in use)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"the checkpoint holds the RNG states of {len(cuda)} CUDA device(s), "
                          f"this process sees {torch.cuda.device_count() if torch.cuda.is_available() else 0}; "
                          f"CUDA RNG states not restored (dropout masks will differ)",
                          RuntimeWarning, stacklevel=2)


def _python_rng_tuple(state: Any) -> Any:
    # weights_only loading returns lists where tuples were saved; random.setstate wants tuples
    if isinstance(state, list):
        return tuple(_python_rng_tuple(s) for s in state)
    return state


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------

def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str, payload: dict) -> None:
    """Write ``payload`` (a dict of tensors, numbers, strings, lists and dicts) to ``path``
    atomically; ``payload["format"]`` is set to :data:`FORMAT`."""
    payload = dict(payload, format=FORMAT)
    buf = io.BytesIO()
    torch.save(payload, buf)  # serialize fully before touching the file system
    data = buf.getbuffer()
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(data), hashlib.sha256(data).digest())
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def load_checkpoint(path: str, map_location: Any = "cpu") -> dict:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: the file is missing, not a fastcl.train checkpoint, truncated,
            corrupt (checksum mismatch), of another format version, or lacks required entries.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path!r} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {exc}") from None
    where = f"checkpoint {path!r}"
    if len(raw) == 0:
        raise CheckpointError(f"{where} is empty (0 bytes): an interrupted write or copy?")
    if raw[:len(MAGIC)] != MAGIC[:len(raw)]:
        hint = ""
        if raw[:2] == b"PK" or raw[:1] == b"\x80":
            hint = " (it looks like a plain torch.save / pickle file, not a fastcl.train checkpoint)"
        raise CheckpointError(f"{where} is not a fastcl.train checkpoint: it does not start with "
                              f"the magic bytes {MAGIC!r}{hint}")
    if len(raw) < _HEADER.size:
        raise CheckpointError(f"{where} is truncated: {len(raw)} bytes, shorter than the "
                              f"{_HEADER.size}-byte header (interrupted write or copy?)")
    magic, version, length, digest = _HEADER.unpack_from(raw)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{where} has format version {version}; this version of "
                              f"fastcl.train reads version {FORMAT_VERSION}")
    payload = memoryview(raw)[_HEADER.size:]
    if len(payload) < length:
        raise CheckpointError(f"{where} is truncated: the header announces {length} bytes of "
                              f"payload, the file holds {len(payload)} (interrupted write or copy?)")
    if len(payload) > length:
        raise CheckpointError(f"{where} is corrupt: {len(payload) - length} unexpected bytes "
                              f"after the {length}-byte payload")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{where} is corrupt: the SHA-256 checksum of its payload does "
                              f"not match the one in its header")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # intact bytes that do not load: a foreign payload
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "Unpickler error" in ln), lines[0] if lines else "")
        raise CheckpointError(f"{where} passed its checksum but its payload does not load "
                              f"({exc.__class__.__name__}: {detail})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{where} holds format {got!r}, expected {FORMAT!r}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{where} lacks the entries {', '.join(missing)}")
    for rng in [state["rng"]] + list(state.get("rng_ranks") or []):
        rng["python"] = _python_rng_tuple(rng["python"])
    return state
