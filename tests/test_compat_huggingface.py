"""fastcl.compat.huggingface against the loss of transformers' own CLIPModel / SiglipModel.

Tiny randomly initialized models built from small configs (no download): the loss and the
gradients of every parameter equal those of ``model(**inputs, return_loss=True)``, the model's
full forward is never called, and a ``Trainer`` runs two steps with ``ClipTrainer``.
"""

from __future__ import annotations

import math
import os
import textwrap

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from _processes import run_ranks  # noqa: E402
from fastcl.compat import huggingface as compat  # noqa: E402

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-6)}

pytestmark = pytest.mark.filterwarnings("ignore:.*reference.*:UserWarning")

_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
             num_attention_heads=2, max_position_embeddings=16)
_VISION = dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=37,
               num_hidden_layers=1, num_attention_heads=2)


def tiny_model(kind, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    if kind == "clip":
        config = transformers.CLIPConfig(text_config=dict(_TEXT, projection_dim=16),
                                         vision_config=dict(_VISION, projection_dim=16),
                                         projection_dim=16)
        model = transformers.CLIPModel(config)
    else:
        config = transformers.SiglipConfig(text_config=_TEXT, vision_config=_VISION)
        model = transformers.SiglipModel(config)
    return model.to(dtype)


def batch(n=6, dtype=torch.float32, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 64, (n, 10), generator=g)
    attention_mask = torch.ones_like(input_ids)
    if pad:
        attention_mask[::2, 7:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "pixel_values": torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64).to(dtype)}


def forbid_forward(model, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model's full forward was called")
    monkeypatch.setattr(model, "forward", fail)


def compare(model, inputs, dtype, monkeypatch):
    model.zero_grad()
    theirs = model(**inputs, return_loss=True).loss
    theirs.backward()
    g_theirs = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with monkeypatch.context() as m:
        forbid_forward(model, m)
        ours = compat.clip_loss_func(model, dict(inputs, return_loss=True))
    ours.backward()
    g_ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    tol = TOL[dtype]
    torch.testing.assert_close(ours.to(theirs.dtype), theirs.detach(), **tol)
    assert g_ours.keys() == g_theirs.keys() and "logit_scale" in g_ours
    for name in g_ours:  # parameter gradients sum over many rows: tolerance follows their scale
        scale = float(g_theirs[name].abs().max())
        torch.testing.assert_close(g_ours[name], g_theirs[name], rtol=tol["rtol"] * 5,
                                   atol=tol["rtol"] * scale + tol["atol"], msg=name)
    return g_ours


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_and_gradients_at_init(kind, dtype, monkeypatch):
    model = tiny_model(kind, dtype)
    grads = compare(model, batch(dtype=dtype, pad=(kind == "clip")), dtype, monkeypatch)
    assert ("logit_bias" in grads) == (kind == "siglip")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_loss_and_gradients_other_scale_and_bias(kind, monkeypatch):
    model = tiny_model(kind, seed=1)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(3.0))
        if kind == "siglip":
            model.logit_bias.fill_(-2.5)
    compare(model, batch(n=5, seed=3, pad=(kind == "clip")), torch.float32, monkeypatch)


def test_return_outputs_and_wrappers():
    model = tiny_model("clip")
    inputs = batch(n=4)
    loss, outputs = compat.clip_loss_func(model, inputs, return_outputs=True)
    assert set(outputs) == {"loss", "image_embeds", "text_embeds"}
    torch.testing.assert_close(outputs["image_embeds"].norm(dim=-1), torch.ones(4))
    # nn.DataParallel is unwrapped
    torch.testing.assert_close(compat.clip_loss_func(torch.nn.DataParallel(model), inputs), loss)
    with pytest.raises(TypeError, match="get_image_features"):
        compat.clip_loss_func(torch.nn.Linear(2, 2), inputs)


class _PairData(torch.utils.data.Dataset):
    def __init__(self, n=8):
        self.items = batch(n=n, seed=5)

    def __len__(self):
        return self.items["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.items.items()}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_trainer_steps(kind, tmp_path, monkeypatch):
    model = tiny_model(kind)
    forbid_forward(model, monkeypatch)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
        dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False)
    trainer = compat.ClipTrainer(model=model, args=args, train_dataset=_PairData())
    assert isinstance(trainer, transformers.Trainer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert not torch.equal(before["logit_scale"], model.logit_scale.detach())
    assert sum(not torch.equal(before[n], p) for n, p in model.named_parameters()) > 5


def test_mixin_in_a_custom_trainer(tmp_path, monkeypatch):
    class MyTrainer(compat.ClipTrainerMixin, transformers.Trainer):
        pass

    model = tiny_model("clip")
    forbid_forward(model, monkeypatch)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to="none",
        use_cpu=True, save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False)
    trainer = MyTrainer(model=model, args=args, train_dataset=_PairData(),
                        eval_dataset=_PairData(n=4))
    trainer.train()
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])


# ============================================================================================
# DistributedDataParallel on two gloo processes
# ============================================================================================

_WORKER = textwrap.dedent(r'''
    import torch, torch.distributed as dist
    from _processes import process_group
    from test_compat_huggingface import batch, tiny_model
    from fastcl.compat import huggingface as compat

    with process_group() as (rank, world):
        for kind in ("clip", "siglip"):
            inputs = batch(n=4, dtype=torch.float64, seed=10 + rank, pad=(kind == "clip"))
            # the model's own loss on this rank's batch, gradients averaged over the ranks
            ref = tiny_model(kind, torch.float64)
            ref(**inputs, return_loss=True).loss.backward()
            want = {}
            for name, p in ref.named_parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    want[name] = p.grad / world
            model = tiny_model(kind, torch.float64)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            calls = []
            model.register_forward_hook(lambda *a: calls.append(1))
            loss = compat.clip_loss_func(ddp, inputs)
            loss.backward()
            assert calls == [1], calls  # the towers ran once, through DDP's forward
            assert "forward" not in model.__dict__  # the module's own forward is back
            got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            assert got.keys() == want.keys(), (sorted(got), sorted(want))
            for name in got:  # DDP averaged every gradient, the logit scale's included
                torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-11,
                                           msg=lambda m: f"{kind} {name}: {m}")
            # global negatives: the mean of the ranks' losses and DDP's gradients are those of the
            # model's own loss on the global batch
            parts = [batch(n=4, dtype=torch.float64, seed=10 + r, pad=(kind == "clip"))
                     for r in range(world)]
            whole = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            ref = tiny_model(kind, torch.float64)
            ref_loss = ref(**whole, return_loss=True).loss
            ref_loss.backward()
            for gather in ("all_gather", "ring"):
                model = tiny_model(kind, torch.float64)
                ddp = torch.nn.parallel.DistributedDataParallel(model)
                loss = compat.clip_loss_func(ddp, inputs, gather=gather)
                loss.backward()
                mean = loss.detach().clone()
                dist.all_reduce(mean)
                torch.testing.assert_close(mean / world, ref_loss.detach(), rtol=1e-9, atol=1e-11)
                for name, p in model.named_parameters():
                    if p.grad is not None:
                        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[name].grad,
                                                   rtol=1e-8, atol=1e-11,
                                                   msg=lambda m: f"{kind} {gather} {name}: {m}")
''')


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_ddp_two_processes(tmp_path):
    """A DDP-wrapped CLIP / SigLIP model: the towers run through DDP's forward, and after the
    backward every parameter has the gradient of the model's own loss averaged over the ranks;
    with gather="all_gather" / "ring", the mean of the ranks' losses and the averaged
    gradients are those of the model's own loss on the global batch."""
    run_ranks(_WORKER, tmp_path)


def test_trainer_gather_only_with_several_processes():
    """ClipTrainerMixin.fastcl_gather applies where torch.distributed runs several processes."""
    class Mixed(compat.ClipTrainerMixin):
        fastcl_gather = "ring"

    assert compat.ClipTrainerMixin.fastcl_gather is None
    assert Mixed()._fastcl_gather() is None  # no process group here
