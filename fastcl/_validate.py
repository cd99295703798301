"""Argument checks of the public functions: clear errors naming the argument and what was expected.

Checks look only at metadata (shapes, dtypes, devices), so they cost no host synchronization,
with one exception: the NaN / inf check of the inputs reads the data. It runs on CPU tensors
always (a linear pass, small next to the loss) and on CUDA tensors only with
``FASTCL_CHECK_FINITE=1`` (it synchronizes). Under ``torch.compile`` the data checks are skipped.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

Number = Union[int, float]
REDUCTIONS = ("mean", "sum", "none")


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def features(name: str, x, ndims: Sequence[int] = (2,)) -> Tensor:
    """A floating-point tensor of one of the ranks ``ndims``, not empty, finite."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got {_dt(x.dtype)}")
    if x.dim() not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if x.numel() == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    finite(name, x)
    return x


def finite(name: str, x: Tensor) -> None:
    """Raise if ``x`` holds NaN or inf (CPU: always; CUDA: with FASTCL_CHECK_FINITE=1)."""
    if _compiling():
        return
    check = x.device.type == "cpu" or os.environ.get("FASTCL_CHECK_FINITE", "0") == "1"
    if check and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


def same_dim(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{name_a} and {name_b} must have the same feature dimension D, got "
                         f"{name_a} of shape {tuple(a.shape)} and {name_b} of shape {tuple(b.shape)}")


def same_rows(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} must have the same number of rows, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def paired(name_a: str, a, name_b: str, b) -> None:
    """Two ``[N, D]`` feature matrices whose rows pair up: same N, D, device and dtype."""
    features(name_a, a)
    features(name_b, b)
    same_dim(name_a, a, name_b, b)
    same_rows(name_a, a, name_b, b)
    same_device_dtype(**{name_a: a, name_b: b})


def same_device_dtype(**tensors: Optional[Tensor]) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{n} is on {t.device} but {n0} is on {t0.device}; "
                             "all inputs must be on the same device")
        if t.dtype != t0.dtype:
            raise TypeError(f"{n} has dtype {_dt(t.dtype)} but {n0} has dtype {_dt(t0.dtype)}; "
                            "cast them to one dtype")


def reduction(value: str) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value


def choice(name: str, value, options: Sequence) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")


def labels(name: str, y, n: int, device: torch.device) -> Tensor:
    """An integer vector of length ``n`` on ``device``."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {_dt(y.dtype)}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"{name} is on {y.device} but the features are on {device}")
    return y.long()


def positive_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def scalar(name: str, value, device: torch.device, *, positive: bool = False) -> Tensor:
    """A number or a 0-dim / 1-element tensor, as a 0-dim tensor keeping its grad.

    Numbers become fp64 tensors (exact); tensors keep fp64 or become fp32.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape "
                             f"{tuple(value.shape)}")
        if not value.is_floating_point():
            value = value.float()
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but the features are on {device}")
        dt = torch.float64 if value.dtype == torch.float64 else torch.float32
        return value.reshape(()).to(device=device, dtype=dt)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if positive:
        positive_number(name, value)
    elif value != value or abs(value) == float("inf"):
        raise ValueError(f"{name} must be finite, got {value}")
    # fp64 keeps a Python number exact; the loss casts it to its statistics dtype. On CUDA
    # torch.full launches a fill kernel instead of a synchronizing host-to-device copy.
    return torch.full((), float(value), dtype=torch.float64, device=device)


def logit_scale(temperature, logit_scale_, device: torch.device, default=None) -> Tensor:
    """The logit scale ``a`` from exactly one of ``temperature`` (a = 1/T) and ``logit_scale``."""
    if temperature is None and logit_scale_ is None:
        if default is None:
            raise ValueError("pass exactly one of temperature and logit_scale, got neither")
        temperature = default
    if temperature is not None and logit_scale_ is not None:
        raise ValueError("pass exactly one of temperature and logit_scale, got both")
    if logit_scale_ is not None:
        return scalar("logit_scale", logit_scale_, device, positive=True)
    if not isinstance(temperature, Tensor):
        positive_number("temperature", temperature)
        return scalar("temperature", 1.0 / temperature, device)
    return 1.0 / scalar("temperature", temperature, device, positive=True)
