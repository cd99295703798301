"""fastcl.nn: every module against the functional call it wraps, extra_repr, the learnable
temperature (a parameter that gets a gradient, clamped at max_logit_scale), two Lightning
training steps with ``fastcl.nn.NTXentLoss``, and Lightning's DDP on two processes with the
losses' ``gather`` against one process on the global batch.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import fastcl
from fastcl import nn as fnn

pytestmark = pytest.mark.filterwarnings("ignore:.*reference.*:UserWarning")


def randn(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)


def same(module_out, functional_out, inputs):
    torch.testing.assert_close(module_out, functional_out, rtol=1e-6, atol=1e-7)
    for a, b in zip(torch.autograd.grad(module_out.sum(), inputs),
                    torch.autograd.grad(functional_out.sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ============================================================================================
# modules == functional calls (temperatures that fp32 represents exactly)
# ============================================================================================


@pytest.mark.parametrize("kw", [{}, dict(symmetric=True, symmetric_weight=0.75),
                                dict(label_smoothing=0.1, normalize=True, reduction="none")])
def test_info_nce(kw):
    q, k = randn(6, 4, seed=1), randn(6, 4, seed=2)
    module = fnn.InfoNCELoss(temperature=0.25, **kw)
    same(module(q, k), fastcl.info_nce(q, k, temperature=0.25, **kw), [q, k])


def test_info_nce_targets_and_negatives():
    q, k, neg = randn(5, 4, seed=3), randn(7, 4, seed=4), randn(3, 4, seed=5)
    targets = torch.tensor([6, 0, -1, 2, 3])
    module = fnn.InfoNCELoss(temperature=0.5, reduction="sum")
    same(module(q, k, targets=targets, negatives=neg),
         fastcl.info_nce(q, k, temperature=0.5, targets=targets, negatives=neg, reduction="sum"),
         [q, k, neg])


def test_clip_loss_module_and_forward_scale():
    img, txt = randn(6, 4, seed=6), randn(6, 4, seed=7)
    module = fnn.ClipLoss(temperature=0.125, label_smoothing=0.05)
    same(module(img, txt), fastcl.clip_loss(img, txt, 8.0, label_smoothing=0.05), [img, txt])
    # a logit scale passed to forward (the model's) takes precedence
    scale = torch.tensor(3.0, requires_grad=True)
    same(module(img, txt, scale), fastcl.clip_loss(img, txt, scale, label_smoothing=0.05),
         [img, txt, scale])


@pytest.mark.parametrize("kw", [{}, dict(temperature=0.25, normalize=False, reduction="none")])
def test_nt_xent(kw):
    z1, z2 = randn(5, 4, seed=8), randn(5, 4, seed=9)
    fkw = dict(temperature=0.5, normalize=True)
    fkw.update(kw)
    same(fnn.NTXentLoss(**kw)(z1, z2), fastcl.nt_xent(z1, z2, **fkw), [z1, z2])


@pytest.mark.parametrize("kw", [{}, dict(temperature=0.5, variant="in", base_temperature=0.25,
                                         normalize=True, reduction="sum")])
def test_supcon(kw):
    feats = randn(6, 2, 4, seed=10)
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    fkw = dict(temperature=0.1)
    fkw.update(kw)
    same(fnn.SupConLoss(**kw)(feats, labels), fastcl.supcon(feats, labels, **fkw), [feats])


@pytest.mark.parametrize("method,cmc_mode", [("mv_infonce", "full"), ("mv_dhel", "full"),
                                             ("cmc", "core")])
def test_multiview(method, cmc_mode):
    views = randn(3, 5, 4, seed=11)
    module = fnn.MultiViewLoss(temperature=0.5, method=method, cmc_mode=cmc_mode, normalize=True)
    same(module(views), fastcl.multiview_loss(views, temperature=0.5, method=method,
                                              cmc_mode=cmc_mode, normalize=True), [views])


def test_hard_negative_nce():
    z1, z2 = randn(5, 4, seed=12), randn(5, 4, seed=13)
    same(fnn.HardNegativeNCELoss()(z1, z2),
         fastcl.hard_negative_nce(z1, z2, temperature=0.5, beta=1.0, tau_plus=0.1,
                                  normalize=True), [z1, z2])
    kw = dict(beta=0.5, tau_plus=0.0, layout="paired", normalize=False, reduction="none")
    same(fnn.HardNegativeNCELoss(temperature=0.25, **kw)(z1, z2),
         fastcl.hard_negative_nce(z1, z2, temperature=0.25, **kw), [z1, z2])


@pytest.mark.parametrize("kw", [{}, dict(temperature=0.25, weighted=True, sigma=0.75)])
def test_dcl(kw):
    z1, z2 = randn(5, 4, seed=14), randn(5, 4, seed=15)
    fkw = dict(temperature=0.1, normalize=True)
    fkw.update(kw)
    same(fnn.DCLLoss(**kw)(z1, z2), fastcl.dcl(z1, z2, **fkw), [z1, z2])


@pytest.mark.parametrize("kw", [{}, dict(align_weight=0.5, unif_weight=2.0, alpha=1.5, t=3,
                                normalize=False)])
def test_align_uniform(kw):
    x, y = randn(6, 4, seed=30), randn(6, 4, seed=31)
    module = fnn.AlignUniformLoss(**kw)
    w_a, w_u = kw.get("align_weight", 1.0), kw.get("unif_weight", 1.0)
    alpha, t = kw.get("alpha", 2), kw.get("t", 2)

    def functional(x, y):
        if kw.get("normalize", True):
            x, y = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
        return (w_a * fastcl.alignment(x, y, alpha)
                + w_u * (fastcl.uniformity(x, t) + fastcl.uniformity(y, t)) / 2)

    same(module(x, y), functional(x, y), [x, y])
    # and the definitions themselves, materialized
    xs, ys = (x, y) if not kw.get("normalize", True) else (
        torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1))

    def unif(z):
        d2 = torch.cdist(z.double(), z.double()).pow(2)
        off = ~torch.eye(z.shape[0], dtype=torch.bool)
        return torch.log(torch.exp(-t * d2[off]).mean())

    want = (w_a * (xs - ys).double().norm(dim=1).pow(alpha).mean()
            + w_u * (unif(xs) + unif(ys)) / 2)
    torch.testing.assert_close(module(x, y).double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unif_weight"):
        fnn.AlignUniformLoss(unif_weight=-1.0)


def test_siglip():
    x, y = randn(5, 4, seed=16), randn(5, 4, seed=17)
    module = fnn.SigLipLoss()
    same(module(x, y), fastcl.siglip_loss(x, y, 10.0, -10.0), [x, y])
    loss = module(x, y)
    loss.backward()
    assert module.log_logit_scale.grad is not None and module.logit_bias.grad is not None
    # values passed to forward (a model's own) take precedence
    scale, bias = torch.tensor(4.0, requires_grad=True), torch.tensor(1.5, requires_grad=True)
    same(module(x, y, scale, bias), fastcl.siglip_loss(x, y, scale, bias), [x, y, scale, bias])


# ============================================================================================
# extra_repr
# ============================================================================================


def test_extra_repr():
    assert repr(fnn.AlignUniformLoss(unif_weight=0.5, gather="ring")) == (
        "AlignUniformLoss(align_weight=1, unif_weight=0.5, alpha=2, t=2, normalize=True, "
        "backend='auto', gather='ring')")
    assert "temperature=0.07, symmetric=False" in repr(fnn.InfoNCELoss())
    assert "symmetric=True" in repr(fnn.ClipLoss())
    assert repr(fnn.NTXentLoss()) == (
        "NTXentLoss(temperature=0.5, normalize=True, reduction='mean', backend='auto')")
    assert "variant='in'" in repr(fnn.SupConLoss(variant="in"))
    assert "method='cmc', cmc_mode='core'" in repr(fnn.MultiViewLoss(method="cmc",
                                                                      cmc_mode="core"))
    assert "beta=1, tau_plus=0.1, layout='two_view'" in repr(fnn.HardNegativeNCELoss())
    assert "weighted=True, sigma=0.5" in repr(fnn.DCLLoss(weighted=True))
    assert "normalize=False" in repr(fnn.SigLipLoss())
    assert "temperature=learnable (init 0.07, max_logit_scale=100)" in repr(
        fnn.InfoNCELoss(learnable_temperature=True))


# ============================================================================================
# learnable temperature
# ============================================================================================

LEARNABLE = [
    (fnn.InfoNCELoss, lambda m, s: m(s[0], s[1])),
    (fnn.ClipLoss, lambda m, s: m(s[0], s[1])),
    (fnn.NTXentLoss, lambda m, s: m(s[0], s[1])),
    (fnn.SupConLoss, lambda m, s: m(torch.stack([s[0], s[1]], dim=1))),
    (fnn.MultiViewLoss, lambda m, s: m(torch.stack([s[0], s[1]]))),
    (fnn.DCLLoss, lambda m, s: m(s[0], s[1])),
]


@pytest.mark.parametrize("cls,call", LEARNABLE)
def test_learnable_temperature_gets_a_gradient(cls, call):
    z = (randn(6, 4, seed=18), randn(6, 4, seed=19))
    fixed = cls(temperature=0.25)
    assert fixed.log_logit_scale is None and len(list(fixed.parameters())) == 0
    module = cls(temperature=0.25, learnable_temperature=True)
    assert [n for n, _ in module.named_parameters()] == ["log_logit_scale"]
    assert "log_logit_scale" in module.state_dict()
    torch.testing.assert_close(module.logit_scale(), torch.tensor(4.0))
    loss = call(module, z)
    torch.testing.assert_close(loss, call(fixed, z))  # same value as the fixed temperature
    loss.backward()
    g = module.log_logit_scale.grad
    assert g is not None and torch.isfinite(g) and g.abs() > 0


@pytest.mark.parametrize("cls,call", LEARNABLE)
def test_learnable_temperature_clamped_at_100(cls, call):
    z = (randn(6, 4, seed=20), randn(6, 4, seed=21))
    module = cls(temperature=0.001, learnable_temperature=True)  # exp(log 1000) > 100
    assert module.logit_scale().item() == pytest.approx(100.0)
    fixed = cls(temperature=0.01)  # logit scale exactly 100
    loss = call(module, z)
    torch.testing.assert_close(loss, call(fixed, z), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert module.log_logit_scale.grad.item() == 0.0  # clamped: no gradient through the scale
    # an optimizer step that brings it below the clamp lets the gradient through again
    with torch.no_grad():
        module.log_logit_scale.fill_(math.log(50.0))
    module.log_logit_scale.grad = None
    call(module, z).backward()
    assert module.log_logit_scale.grad.abs() > 0
    custom = cls(temperature=0.001, learnable_temperature=True, max_logit_scale=30.0)
    assert custom.logit_scale().item() == pytest.approx(30.0)


def test_invalid_temperature():
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="temperature must be positive"):
            fnn.NTXentLoss(temperature=bad)


# ============================================================================================
# Lightning
# ============================================================================================


@pytest.mark.filterwarnings("ignore:.*LeafSpec")
@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_lightning_two_steps_with_nt_xent(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")

    class SimCLR(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                               torch.nn.Linear(16, 4))
            self.criterion = fnn.NTXentLoss(temperature=0.5, learnable_temperature=True)

        def training_step(self, batch, batch_idx):
            x0, x1 = batch
            loss = self.criterion(self.encoder(x0), self.encoder(x1))
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    data = torch.utils.data.TensorDataset(x + 0.1 * torch.randn(16, 8, generator=g),
                                          x + 0.1 * torch.randn(16, 8, generator=g))
    model = SimCLR()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    # every parameter moved, the learnable temperature included
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


_LIGHTNING_DDP = r'''
import sys
import torch
import pytorch_lightning as pl
import fastcl.nn

N_PER_RANK, D_IN, D = 4, 6, 5


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, D_IN, generator=g)
        self.y = self.x + 0.3 * torch.randn(n, D_IN, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Model(pl.LightningModule):
    """NT-Xent (the half square across ranks) plus CLIP with a learnable temperature (column
    statistics merged across ranks, a replicated parameter)."""

    def __init__(self, gather):
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Linear(D_IN, D)
        self.ntxent = fastcl.nn.NTXentLoss(temperature=0.5, gather=gather)
        self.clip = fastcl.nn.ClipLoss(0.2, learnable_temperature=True, normalize=True,
                                       gather=gather)

    def training_step(self, batch, _):
        x, y = batch
        u, v = self.net(x), self.net(y)
        return self.ntxent(u, v) + self.clip(u, v)

    def train_dataloader(self):  # the run's global batch, this rank's interleaved share
        world = self.trainer.world_size
        data = Pairs(2 * 2 * N_PER_RANK)
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=world,
                                                      rank=self.global_rank, shuffle=False)
        return torch.utils.data.DataLoader(data, batch_size=2 * N_PER_RANK // world,
                                           sampler=sampler)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def on_train_end(self):
        if self.global_rank == 0:
            torch.save({k: v.detach().clone() for k, v in self.state_dict().items()},
                       sys.argv[3])


if __name__ == "__main__":
    world, gather = int(sys.argv[1]), sys.argv[2]
    trainer = pl.Trainer(accelerator="cpu", devices=world,
                         strategy="ddp_spawn" if world > 1 else "auto", max_steps=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(Model(None if gather == "none" else gather))
'''


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_lightning_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    """Two steps of Lightning's DDP on two gloo processes with the losses' gather: the
    parameters (the learnable temperature included) end where one process training on the
    global batch puts them; with the negatives of each process only they do not."""
    pytest.importorskip("pytorch_lightning")
    script = tmp_path / "ddp_fit.py"
    script.write_text(_LIGHTNING_DDP)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    env.pop("TRITON_INTERPRET", None)

    def fit(world, gather):
        out = tmp_path / f"{world}-{gather}.pt"
        run = subprocess.run([sys.executable, str(script), str(world), gather, str(out)],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        return torch.load(out)

    want = fit(1, "none")
    for gather in ("all_gather", "ring"):
        got = fit(2, gather)
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{gather} {name}: {m}")
    local = fit(2, "none")
    assert not torch.allclose(local["net.weight"], want["net.weight"], rtol=1e-5, atol=1e-6)
