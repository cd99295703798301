"""fastcl.compat.open_clip against open_clip's own ClipLoss / SigLipLoss.

Loss values and gradients (features, logit scale, bias) at open_clip's defaults and at other
settings, the ``loss(**model_out, output_dict=True)`` convention of open_clip's training loop on a
tiny open_clip model, and ``world_size=2`` with two gloo processes.
"""

from __future__ import annotations

import math
import os
import textwrap

import pytest
import torch
import torch.nn.functional as F

oc_loss = pytest.importorskip("open_clip.loss")
open_clip = pytest.importorskip("open_clip")

from _processes import run_ranks  # noqa: E402
from fastcl.compat import open_clip as compat  # noqa: E402

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-6)}
DTYPES = [torch.float32, torch.float64]

pytestmark = pytest.mark.filterwarnings("ignore:.*reference.*:UserWarning")


def randn(*shape, seed, dtype=torch.float32, unit=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if unit:
        x = F.normalize(x, dim=-1)
    return x.to(dtype).requires_grad_(True)


def check(ours, theirs, inputs, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(ours.to(theirs.dtype), theirs, **tol)
    g_ours = torch.autograd.grad(ours, inputs)
    g_theirs = torch.autograd.grad(theirs, inputs)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a.to(b.dtype), b, **tol)


# ============================================================================================
# ClipLoss
# ============================================================================================


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_loss_defaults(dtype):
    img = randn(8, 6, seed=1, dtype=dtype, unit=True)
    txt = randn(8, 6, seed=2, dtype=dtype, unit=True)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=dtype, requires_grad=True)
    theirs = oc_loss.ClipLoss()(img, txt, log_scale.exp())
    ours = compat.ClipLoss()(img, txt, log_scale.exp())
    check(ours, theirs, [img, txt, log_scale], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_loss_bias_raw_features_options(dtype):
    # raw features, a bias, cached labels, local_loss (a no-op in one process), two calls
    kwargs = dict(local_loss=True, gather_with_grad=True, cache_labels=True)
    theirs_fn, ours_fn = oc_loss.ClipLoss(**kwargs), compat.ClipLoss(**kwargs)
    for seed in (3, 5):
        img = randn(7, 5, seed=seed, dtype=dtype)
        txt = randn(7, 5, seed=seed + 1, dtype=dtype)
        log_scale = torch.tensor(math.log(3.0), dtype=dtype, requires_grad=True)
        bias = torch.tensor(-0.7, dtype=dtype, requires_grad=True)
        theirs = theirs_fn(img, txt, log_scale.exp(), logit_bias=bias)
        ours = ours_fn(img, txt, log_scale.exp(), logit_bias=bias)
        check(ours, theirs, [img, txt, log_scale, bias], dtype)


def test_clip_loss_output_dict_and_nonscalar_scale():
    img = randn(5, 4, seed=7, unit=True)
    txt = randn(5, 4, seed=8, unit=True)
    scale = torch.full((1,), 12.0, requires_grad=True)  # open_clip's nonscalar_logit_scale
    theirs = oc_loss.ClipLoss()(img, txt, scale, output_dict=True)
    ours = compat.ClipLoss()(img, txt, scale, output_dict=True)
    assert set(ours) == {"contrastive_loss"}
    check(ours["contrastive_loss"], theirs["contrastive_loss"], [img, txt, scale], torch.float32)


def test_clip_loss_ground_truth_parity():
    ours, theirs = compat.ClipLoss(cache_labels=True), oc_loss.ClipLoss(cache_labels=True)
    assert torch.equal(ours.get_ground_truth("cpu", 6), theirs.get_ground_truth("cpu", 6))
    assert "world_size=1" in repr(ours)


# ============================================================================================
# SigLipLoss
# ============================================================================================


@pytest.mark.parametrize("dtype", DTYPES)
def test_siglip_defaults(dtype):
    x = randn(8, 6, seed=9, dtype=dtype, unit=True)
    y = randn(8, 6, seed=10, dtype=dtype, unit=True)
    log_scale = torch.tensor(math.log(10.0), dtype=dtype, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=dtype, requires_grad=True)
    theirs = oc_loss.SigLipLoss()(x, y, log_scale.exp(), bias)
    ours = compat.SigLipLoss()(x, y, log_scale.exp(), bias)
    check(ours, theirs, [x, y, log_scale, bias], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_siglip_other_scale_bias_raw_features(dtype):
    x = randn(9, 4, seed=11, dtype=dtype)
    y = randn(9, 4, seed=12, dtype=dtype)
    log_scale = torch.tensor(math.log(2.5), dtype=dtype, requires_grad=True)
    bias = torch.tensor(1.5, dtype=dtype, requires_grad=True)
    theirs = oc_loss.SigLipLoss(cache_labels=True, dist_impl="gather")(
        x, y, log_scale.exp(), bias, output_dict=True)["contrastive_loss"]
    ours = compat.SigLipLoss(cache_labels=True, dist_impl="gather")(
        x, y, log_scale.exp(), bias, output_dict=True)["contrastive_loss"]
    check(ours, theirs, [x, y, log_scale, bias], dtype)


def test_siglip_without_bias():
    x = randn(6, 4, seed=13)
    y = randn(6, 4, seed=14)
    scale = torch.tensor(4.0, requires_grad=True)
    theirs = oc_loss.SigLipLoss()(x, y, scale, None)
    ours = compat.SigLipLoss()(x, y, scale)
    check(ours, theirs, [x, y, scale], torch.float32)


def test_siglip_world_size_needs_its_process_group():
    """world_size > 1 without torch.distributed initialized is refused when the loss runs."""
    loss = compat.SigLipLoss(rank=0, world_size=2)
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialized"):
        loss(randn(3, 2, seed=1), randn(3, 2, seed=2), 10.0, -10.0)
    with pytest.raises(ValueError, match="dist_impl"):
        compat.SigLipLoss(dist_impl="ring")


# ============================================================================================
# open_clip's training-loop convention on a tiny open_clip model
# ============================================================================================


def _tiny_clip(**kwargs):
    return open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=dict(layers=1, width=32, head_width=16, image_size=16, patch_size=8),
        text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
        output_dict=True, **kwargs)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_training_step_convention(kind):
    torch.manual_seed(0)
    extra = dict(init_logit_bias=-10.0, init_logit_scale=math.log(10)) if kind == "siglip" else {}
    model = _tiny_clip(**extra)
    images = torch.randn(6, 3, 16, 16)
    texts = torch.randint(0, 64, (6, 8))
    ours_fn, theirs_fn = ((compat.SigLipLoss(), oc_loss.SigLipLoss()) if kind == "siglip"
                          else (compat.ClipLoss(), oc_loss.ClipLoss()))

    # one step's loss and gradients of every parameter equal open_clip's
    grads = []
    for fn in (ours_fn, theirs_fn):
        model.zero_grad()
        model_out = model(images, texts)
        assert ("logit_bias" in model_out) == (kind == "siglip")
        losses = fn(**model_out, output_dict=True)
        total_loss = sum(losses.values())
        total_loss.backward()
        grads.append((total_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}))
    (l_ours, g_ours), (l_theirs, g_theirs) = grads
    torch.testing.assert_close(l_ours, l_theirs, rtol=2e-5, atol=2e-6)
    assert g_ours.keys() == g_theirs.keys() and "logit_scale" in g_ours
    for name in g_ours:
        scale = float(g_theirs[name].abs().max())  # fp32 sums over many rows
        torch.testing.assert_close(g_ours[name], g_theirs[name], rtol=1e-4,
                                   atol=2e-5 * scale + 1e-7, msg=name)

    # and the loop trains: two optimizer steps, open_clip-style logit scale clamp
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        opt.zero_grad()
        total_loss = sum(ours_fn(**model(images, texts), output_dict=True).values())
        total_loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        assert torch.isfinite(total_loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ============================================================================================
# world_size = 2: two gloo processes, open_clip's feature gathering, losses and gradients
# ============================================================================================

_WORKER = textwrap.dedent(r'''
    import importlib.util, os, sys, types
    import torch, torch.distributed as dist

    # open_clip/loss.py alone (it needs only torch), registered as open_clip.loss so that the
    # adapter's lazy `from open_clip.loss import gather_features` finds it without importing the
    # whole open_clip package (slow) in both processes
    path = sys.argv[1]
    pkg = types.ModuleType("open_clip"); pkg.__path__ = [os.path.dirname(path)]
    sys.modules["open_clip"] = pkg
    spec = importlib.util.spec_from_file_location("open_clip.loss", path)
    oc_loss = importlib.util.module_from_spec(spec); sys.modules["open_clip.loss"] = oc_loss
    spec.loader.exec_module(oc_loss)
    from fastcl.compat.open_clip import ClipLoss, SigLipLoss
    from _processes import process_group

    with process_group() as (rank, world):
        g = torch.Generator().manual_seed(100 + rank)
        img0 = torch.randn(5, 4, generator=g, dtype=torch.float64)
        txt0 = torch.randn(5, 4, generator=g, dtype=torch.float64)
        for local_loss in (False, True):
            for gather_with_grad in (False, True):
                kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                          world_size=world)
                # the usual setting runs as fastcl's all_gather (one pass, both directions)
                assert ClipLoss(**kw)._fastcl_gather() == (local_loss and gather_with_grad)
                results = []
                for fn in (ClipLoss(**kw), oc_loss.ClipLoss(**kw)):
                    img = img0.clone().requires_grad_(True)
                    txt = txt0.clone().requires_grad_(True)
                    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
                    loss = fn(img, txt, scale)
                    loss.backward()
                    ds = scale.grad
                    if local_loss and gather_with_grad:
                        # gather="all_gather" splits the replicated scale's gradient between
                        # the ranks differently; its sum over ranks (what DDP's averaging
                        # uses) is the same
                        dist.all_reduce(ds)
                    results.append((loss.detach(), img.grad, txt.grad, ds))
                for a, b in zip(*results):
                    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        # SigLIP: this rank's images against every rank's texts, for each of open_clip's exchanges
        for dist_impl in ("bidir", "shift", "reduce", "gather"):
            kw = dict(rank=rank, world_size=world, dist_impl=dist_impl)
            results = []
            for fn in (SigLipLoss(**kw), oc_loss.SigLipLoss(**kw)):
                img = img0.clone().requires_grad_(True)
                txt = txt0.clone().requires_grad_(True)
                scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
                bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
                loss = fn(img, txt, scale, bias)
                loss.backward()
                results.append((loss.detach(), img.grad, txt.grad, scale.grad, bias.grad))
            for a, b in zip(*results):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: dist_impl + m)
''')


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_clip_loss_two_processes(tmp_path):
    run_ranks(_WORKER, tmp_path, args=[oc_loss.__file__],
              env_extra=dict(FASTCL_BACKEND=os.environ.get("FASTCL_BACKEND", "auto")))
