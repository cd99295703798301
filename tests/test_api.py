"""Input validation, the dispatch table, the command line, and import hygiene."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastcl
from fastcl import dispatch


def _x(n=4, d=3, **kw):
    return torch.randn(n, d, **kw)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: fastcl.info_nce(_x(), _x(4, 5), temperature=0.1), ValueError, "feature dimension"),
        (lambda: fastcl.info_nce(_x(), _x()), ValueError, "neither"),
        (lambda: fastcl.info_nce(_x(), _x(), temperature=0.1, logit_scale=10.0), ValueError, "both"),
        (lambda: fastcl.info_nce(_x(), _x(), temperature=-1.0), ValueError, "temperature"),
        (lambda: fastcl.info_nce(_x(), _x(), temperature=0.1, reduction="avg"), ValueError, "reduction"),
        (lambda: fastcl.info_nce(_x(5), _x(4), temperature=0.1), ValueError, "at least"),
        (lambda: fastcl.info_nce(_x(4), _x(5), temperature=0.1, symmetric=True), ValueError, "as many"),
        (lambda: fastcl.info_nce(torch.ones(4, 3, dtype=torch.long), _x(), temperature=0.1),
         TypeError, "floating-point"),
        (lambda: fastcl.info_nce(_x()[0], _x(), temperature=0.1), ValueError, "2-D"),
        (lambda: fastcl.info_nce(_x(0), _x(), temperature=0.1), ValueError, "empty"),
        (lambda: fastcl.info_nce(_x(), _x(dtype=torch.float64), temperature=0.1), TypeError, "dtype"),
        (lambda: fastcl.info_nce(_x(), _x(), temperature=0.1, targets=torch.zeros(3, dtype=torch.long)),
         ValueError, "targets"),
        (lambda: fastcl.info_nce(_x(), _x(), temperature=0.1, targets=torch.zeros(4)), TypeError, "integers"),
        (lambda: fastcl.info_nce(_x(), _x(), temperature=0.1, label_smoothing=1.0), ValueError, "label_smoothing"),
        (lambda: fastcl.info_nce([[1.0]], _x(), temperature=0.1), TypeError, "torch.Tensor"),
        (lambda: fastcl.info_nce(_x(), _x(), logit_scale=torch.ones(2)), ValueError, "one-element"),
        (lambda: fastcl.info_nce(_x(), _x(), temperature=0.1, backend="gpu"), ValueError, "backend"),
        (lambda: fastcl.info_nce(_x(), torch.full((4, 3), float("nan")), temperature=0.1),
         ValueError, "NaN"),
        (lambda: fastcl.supcon(_x(4, 3), torch.zeros(5, dtype=torch.long)), ValueError, "labels"),
        (lambda: fastcl.supcon(torch.randn(2, 2, 2, 2)), ValueError, "2-D or 3-D"),
        (lambda: fastcl.supcon(torch.randn(4, 2, 3), variant="mid"), ValueError, "variant"),
        (lambda: fastcl.nt_xent(_x(4), _x(5)), ValueError, "same number of rows"),
        (lambda: fastcl.dcl(_x(1), _x(1)), ValueError, "at least 2"),
        (lambda: fastcl.multiview_loss(torch.randn(1, 4, 3), temperature=0.1), ValueError, "2 views"),
        (lambda: fastcl.multiview_loss(torch.randn(2, 4, 3), temperature=0.1, method="x"), ValueError, "method"),
        (lambda: fastcl.hard_negative_nce(_x(), _x(), temperature=0.5, tau_plus=1.0), ValueError, "tau_plus"),
        (lambda: fastcl.topk_similarity(_x(), _x(), 5), ValueError, "exceeds"),
        (lambda: fastcl.topk_similarity(_x(), _x(), 0), ValueError, "positive integer"),
        (lambda: fastcl.uniformity(_x(1)), ValueError, "at least 2"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_backend_on_wrong_device_says_why():
    with pytest.raises(fastcl.BackendUnavailableError, match="cuda backend needs CUDA tensors"):
        fastcl.info_nce(_x(), _x(), temperature=0.1, backend="cuda")


def test_env_override(monkeypatch):
    monkeypatch.setenv("FASTCL_BACKEND", "reference")
    assert dispatch.select("info_nce", torch.device("cpu"), torch.float32) == "reference"
    monkeypatch.setenv("FASTCL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTCL_BACKEND"):
        dispatch.select("info_nce", torch.device("cpu"), torch.float32)


def test_auto_never_picks_a_materializing_op_backend():
    cpu = torch.device("cpu")
    for op in ("info_nce", "siglip_loss", "topk_similarity"):
        chosen = dispatch.select(op, cpu, torch.float32)
        assert chosen == ("cpu" if dispatch.why_not("cpu", op, cpu, torch.float32) is None
                          else "reference"), op


def test_logit_scale_tensor_receives_gradient():
    scale = torch.tensor(14.0, requires_grad=True)
    loss = fastcl.clip_loss(_x(), _x(), scale)
    loss.backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)


def test_inputs_are_not_modified():
    q, k = _x(), _x()
    q0, k0 = q.clone(), k.clone()
    fastcl.info_nce(q, k, temperature=0.1, normalize=True).item()
    assert torch.equal(q, q0) and torch.equal(k, k0)


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout


def test_import_does_not_load_optional_dependencies():
    out = _run("import sys, fastcl; print(sorted(m for m in ('triton', 'fastcl._C', 'open_clip', "
               "'lightly', 'pytorch_metric_learning', 'sentence_transformers') if m in sys.modules))")
    assert out.strip() == "[]"


def test_info_command_lists_backends():
    out = subprocess.run([sys.executable, "-m", "fastcl", "info"], check=True, capture_output=True,
                         text=True).stdout
    for word in ("torch", "triton", "cpu", "cuda", "reference", "auto"):
        assert word in out


def test_every_public_function_is_documented():
    for name in fastcl.__all__:
        obj = getattr(fastcl, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__.strip()) > 40, name


PUBLIC_MODULES = ("fastcl", "fastcl.nn", "fastcl.functional", "fastcl.distributed",
                  "fastcl.reference", "fastcl.ops.contrastive", "fastcl.ops.siglip",
                  "fastcl.dispatch", "fastcl.train", "fastcl.compat.open_clip",
                  "fastcl.compat.lightly", "fastcl.compat.pytorch_metric_learning",
                  "fastcl.compat.sentence_transformers", "fastcl.compat.huggingface")


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_method_is_documented(module):
    """Every function and class a module exports, and every public method its classes define
    themselves, has a docstring."""
    import importlib
    import inspect

    try:
        mod = importlib.import_module(module)
    except ImportError as e:  # a compat module whose peer library is not installed
        pytest.skip(str(e))
    missing = []
    for name in mod.__all__:
        obj = getattr(mod, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if not (obj.__doc__ or "").strip():
            missing.append(name)
        if inspect.isclass(obj):
            missing += [f"{name}.{attr}" for attr, fn in vars(obj).items()
                        if not attr.startswith("_") and inspect.isfunction(fn)
                        and not (fn.__doc__ or "").strip()]
    assert not missing, f"{module}: undocumented {missing}"
