"""fastcl.compat.lightly against lightly's own NTXentLoss (with and without memory bank),
DCLLoss and DCLWLoss: loss values and gradients w.r.t. the raw embeddings, the memory bank's
contents step by step, the errors, and two Lightning training steps with the adapter.
"""

from __future__ import annotations

import textwrap
from functools import partial

import pytest
import torch

lightly_loss = pytest.importorskip("lightly.loss")

from _processes import run_ranks  # noqa: E402
from fastcl.compat import lightly as compat  # noqa: E402

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-6)}

# lightly's DCLWLoss builds its weights with torch.tensor(tensor), which warns
pytestmark = pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning")


def randn(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)


def check(ours, theirs, inputs, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(ours.to(theirs.dtype), theirs, **tol)
    g_ours = torch.autograd.grad(ours, inputs)
    g_theirs = torch.autograd.grad(theirs, inputs)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a.to(b.dtype), b, **tol)


# fp64 cases use temperatures fp32 represents exactly: fastcl turns a Python float temperature
# into an fp32 scalar (~1e-8 relative error on fp64 losses otherwise); the defaults 0.1 and
# 0.07-like values are compared in fp32.
NTXENT_CASES = [(torch.float32, {}), (torch.float64, {}),             # default 0.5
                (torch.float32, dict(temperature=0.1)), (torch.float64, dict(temperature=0.25))]
DCL_CASES = [(torch.float32, {}), (torch.float32, dict(temperature=0.5)),  # default 0.1
             (torch.float64, dict(temperature=0.5))]


@pytest.mark.parametrize("dtype,kw", NTXENT_CASES)
def test_ntxent(dtype, kw):
    z1 = randn(6, 5, seed=1, dtype=dtype)
    z2 = randn(6, 5, seed=2, dtype=dtype)
    check(compat.NTXentLoss(**kw)(z1, z2), lightly_loss.NTXentLoss(**kw)(z1, z2), [z1, z2], dtype)


def test_ntxent_gather_distributed_single_process():
    z1 = randn(5, 3, seed=3)
    z2 = randn(5, 3, seed=4)
    check(compat.NTXentLoss(gather_distributed=True)(z1, z2),
          lightly_loss.NTXentLoss(gather_distributed=True)(z1, z2), [z1, z2], torch.float32)


@pytest.mark.parametrize("temperature", [0.5, 0.07])
def test_ntxent_memory_bank_steps(temperature):
    # same seed -> same initial bank; then 3 training steps (the third wraps the queue around)
    # and an evaluation step (no update), comparing loss, gradients and the bank every time
    K, D, N = 10, 5, 4
    torch.manual_seed(123)
    theirs_fn = lightly_loss.NTXentLoss(temperature=temperature, memory_bank_size=(K, D))
    torch.manual_seed(123)
    ours_fn = compat.NTXentLoss(temperature=temperature, memory_bank_size=(K, D))
    torch.testing.assert_close(ours_fn.memory_bank.bank, theirs_fn.memory_bank.bank,
                               rtol=0, atol=0)
    for step in range(4):
        z1 = randn(N, D, seed=10 + step)
        z2 = randn(N, D, seed=20 + step)
        if step == 3:
            z1 = z1.detach()
            ours = ours_fn(z1, z2)
            theirs = theirs_fn(z1, z2)
            check(ours, theirs, [z2], torch.float32)
        else:
            check(ours_fn(z1, z2), theirs_fn(z1, z2), [z1, z2], torch.float32)
        torch.testing.assert_close(ours_fn.memory_bank.bank, theirs_fn.memory_bank.bank,
                                   rtol=0, atol=0)
        assert int(ours_fn.memory_bank.bank_ptr) == int(theirs_fn.memory_bank.bank_ptr)


def test_ntxent_memory_bank_size_errors():
    for bad in (4096, -1, (2, 3, 4), (-2, 3)):
        with pytest.raises(ValueError) as theirs:
            lightly_loss.NTXentLoss(memory_bank_size=bad)
        with pytest.raises(ValueError) as ours:
            compat.NTXentLoss(memory_bank_size=bad)
        assert str(ours.value) == str(theirs.value)


def test_temperature_errors():
    with pytest.raises(ValueError, match="Illegal temperature"):
        compat.NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="positive temperature"):
        compat.DCLLoss(temperature=-0.5)


# world_size = 2: two gloo processes, lightly's losses with gather_distributed=True
_WORKER = textwrap.dedent(r'''
    import torch
    import lightly.loss as lightly_loss
    from _processes import process_group
    from fastcl.compat import lightly as compat

    with process_group() as (rank, world):
        assert compat._gather(True) == "all_gather" and compat._gather(False) is None
        g = torch.Generator().manual_seed(200 + rank)
        x0 = torch.randn(5, 4, generator=g, dtype=torch.float64)
        y0 = torch.randn(5, 4, generator=g, dtype=torch.float64)
        weight = lambda a, b: 1.0 + (a * b).sum(-1)  # a weight_fn fastcl has no fused form of
        cases = [("NTXentLoss", dict(temperature=0.25)), ("DCLLoss", dict(temperature=0.5)),
                 ("DCLWLoss", dict(temperature=0.5, sigma=0.75)),
                 ("DCLLoss", dict(temperature=0.5, weight_fn=weight)),
                 ("NTXentLoss", dict(temperature=0.25, memory_bank_size=(12, 4)))]
        for name, kw in cases:
            results = []
            for module in (compat, lightly_loss):
                torch.manual_seed(7)  # the memory bank's initial contents
                fn = getattr(module, name)(gather_distributed=True, **kw)
                if "memory_bank_size" in kw:
                    fn = fn.double()
                per_step = []
                for step in range(3):  # the bank is updated with every rank's batch
                    x = (x0 + step).requires_grad_(True)
                    y = (y0 - step).requires_grad_(True)
                    loss = fn(x, y)
                    loss.backward()
                    per_step.append((loss.detach(), x.grad, y.grad))
                results.append(per_step)
            for ours, theirs in zip(*results):
                for a, b in zip(ours, theirs):
                    torch.testing.assert_close(a.to(b.dtype), b, rtol=1e-7, atol=1e-9,
                                               msg=lambda m: f"{name} {kw}: {m}")
''')


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_gather_distributed_two_processes(tmp_path):
    """With two processes, gather_distributed=True gives lightly's loss and gradients on each
    rank (its features gathered with gradient; the memory bank filled with every rank's
    batch)."""
    run_ranks(_WORKER, tmp_path)


@pytest.mark.parametrize("dtype,kw", DCL_CASES)
def test_dcl(dtype, kw):
    z1 = randn(6, 5, seed=7, dtype=dtype)
    z2 = randn(6, 5, seed=8, dtype=dtype)
    check(compat.DCLLoss(**kw)(z1, z2), lightly_loss.DCLLoss(**kw)(z1, z2), [z1, z2], dtype)


@pytest.mark.parametrize("dtype,kw", [(torch.float32, {}),  # defaults 0.1, 0.5
                                      (torch.float32, dict(temperature=0.3, sigma=0.8)),
                                      (torch.float64, dict(temperature=0.25, sigma=0.8))])
def test_dclw(dtype, kw):
    z1 = randn(6, 5, seed=9, dtype=dtype)
    z2 = randn(6, 5, seed=10, dtype=dtype)
    ours_fn = compat.DCLWLoss(**kw)
    assert ours_fn.sigma == kw.get("sigma", 0.5)
    check(ours_fn(z1, z2), lightly_loss.DCLWLoss(**kw)(z1, z2), [z1, z2], dtype)


@pytest.mark.parametrize("weight_fn", [
    lambda a, b: torch.sum((a - b) ** 2, dim=1),          # lightly's docstring example, has grad
    lambda a, b: 1.0 + torch.arange(a.shape[0], dtype=a.dtype) / 10,
    partial(lightly_loss.dcl_loss.negative_mises_fisher_weights, sigma=0.7),
])
def test_dcl_custom_weight_fn(weight_fn):
    z1 = randn(7, 4, seed=11)
    z2 = randn(7, 4, seed=12)
    check(compat.DCLLoss(temperature=0.2, weight_fn=weight_fn)(z1, z2),
          lightly_loss.DCLLoss(temperature=0.2, weight_fn=weight_fn)(z1, z2), [z1, z2],
          torch.float32)


@pytest.mark.filterwarnings("ignore:.*LeafSpec")
@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_lightning_training_steps_with_adapter(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")

    class SimCLR(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
            self.head = torch.nn.Linear(16, 4)
            self.criterion = compat.NTXentLoss(memory_bank_size=(16, 4))

        def training_step(self, batch, batch_idx):
            x0, x1 = batch
            loss = self.criterion(self.head(self.backbone(x0)), self.head(self.backbone(x1)))
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    data = torch.utils.data.TensorDataset(x + 0.1 * torch.randn(16, 8, generator=g),
                                          x + 0.1 * torch.randn(16, 8, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    model = SimCLR()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, loader)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert int(model.criterion.memory_bank.bank_ptr) == 0  # 2 x 8 rows filled the 16-row bank


def test_importing_the_adapters_loads_no_peer_library():
    import subprocess
    import sys

    code = ("import sys, fastcl, fastcl.compat, fastcl.compat.lightly, fastcl.compat.open_clip, "
            "fastcl.compat.huggingface; print(sorted(m for m in ('open_clip', 'lightly', "
            "'pytorch_metric_learning', 'sentence_transformers', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert out.strip() == "[]"
