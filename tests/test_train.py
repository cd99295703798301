"""fastcl.train: chunked (GradCache) gradients, exact resumption, checkpoint safety, the CLI,
and training on several processes (2 gloo CPU processes against one process).

The gradient-equality tests, and the 1-vs-2-process ones, run the loss on backend="reference"
in float64: they check the chunking, the RNG replay, the sharding and the gathering, not a kernel
(every kernel is tested against the reference elsewhere), so they hold whatever state the fused
kernels are in.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import socket
import subprocess
import sys
import time
import warnings

import pytest
import torch

import fastcl
from fastcl.train import (
    LOSSES,
    CheckpointError,
    SharedEncoder,
    TrainConfig,
    TwoTower,
    build_objective,
    contrastive_step,
    load_checkpoint,
    mlp,
    save_checkpoint,
    train,
)
from fastcl.train.cli import main
from fastcl.train.metrics import PeakMemory, eager_clip_bytes, recall_at_k
from fastcl.train.optim import WarmupCosine

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _model(kind: str, dropout: float, slots: int = 2, d_in=(12, 9), d_out: int = 6) -> torch.nn.Module:
    torch.manual_seed(123)
    if kind == "pairs":
        m = TwoTower(mlp(d_in[0], d_out, hidden=16, depth=2, dropout=dropout),
                     mlp(d_in[1], d_out, hidden=16, depth=2, dropout=dropout))
    else:
        m = SharedEncoder(mlp(d_in[0], d_out, hidden=16, depth=2, dropout=dropout), slots)
    return m.to(F64)


def _inputs(kind: str, n: int, slots: int = 2, d_in=(12, 9)) -> list:
    g = torch.Generator().manual_seed(7)
    if kind == "pairs":
        return [torch.randn(n, d_in[0], generator=g, dtype=F64),
                torch.randn(n, d_in[1], generator=g, dtype=F64)]
    return [torch.randn(n, d_in[0], generator=g, dtype=F64) for _ in range(slots)]


def _grads(*modules) -> list:
    return [p.grad.clone() for m in modules for p in m.parameters()]


def _zero(*modules) -> None:
    for m in modules:
        for p in m.parameters():
            p.grad = None


# (loss, kind, slots, options, learnable temperature)
CASES = [
    ("clip", "pairs", 2, {}, True),
    ("info_nce", "pairs", 2, {"symmetric": True, "label_smoothing": 0.1}, False),
    ("supcon", "views", 2, {}, True),
    ("supcon", "views", 3, {"variant": "in"}, False),
    ("nt_xent", "views", 2, {}, True),
    ("multiview", "views", 3, {"method": "mv_infonce"}, False),
    ("dcl", "views", 2, {"weighted": True}, False),
    ("hard_negative_nce", "views", 2, {"beta": 0.5, "tau_plus": 0.1}, False),
    ("siglip", "pairs", 2, {}, False),
    ("align_uniform", "views", 2, {"unif_weight": 0.5}, False),
]


def _objective(name, options, learnable):
    return build_objective(name, options=options, learnable_temperature=learnable,
                           backend="reference").to(F64)


# --------------------------------------------------------------------------------------------
# GradCache: chunked gradients equal unchunked ones
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kind,slots,options,learnable", CASES,
                         ids=[f"{c[0]}-{c[2]}v" + ("-" + "-".join(c[3]) if c[3] else "") for c in CASES])
def test_chunked_equals_unchunked_without_dropout(name, kind, slots, options, learnable):
    n, chunk = 23, 5  # uneven chunks on purpose
    labels = torch.arange(n) % 4
    model = _model(kind, 0.0, slots)
    objective = _objective(name, options, learnable)
    inputs = _inputs(kind, n, slots)

    plain = contrastive_step(model, objective, inputs, labels, chunk_size=None)
    g_plain = _grads(model, objective)
    _zero(model, objective)
    chunked = contrastive_step(model, objective, inputs, labels, chunk_size=chunk)
    g_chunk = _grads(model, objective)

    assert chunked.chunks == math.ceil(n / chunk)
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-12, atol=1e-12)
    assert len(g_plain) == len(g_chunk) > 0
    for a, b in zip(g_chunk, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if learnable:
        assert objective.loss.log_logit_scale.grad is not None


def _full_graph_step(model, objective, inputs, labels, chunk):
    """Unchunked training: one graph over the whole batch, one backward. The encoder meets the
    rows in the same chunk order as the chunked step, so dropout draws the same masks."""
    embs = [torch.cat([model(c, s) for c in x.split(chunk)]) for s, x in enumerate(inputs)]
    loss = objective(embs, labels)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("name,kind,slots", [("clip", "pairs", 2), ("supcon", "views", 2),
                                             ("multiview", "views", 3)])
def test_chunked_equals_unchunked_with_dropout_through_rng_replay(name, kind, slots):
    n, chunk = 32, 6
    labels = torch.arange(n) % 5
    model = _model(kind, 0.3, slots)
    objective = _objective(name, {}, learnable=(name == "clip"))
    inputs = _inputs(kind, n, slots)

    torch.manual_seed(2024)
    ref_loss = _full_graph_step(model, objective, inputs, labels, chunk)
    rng_after_ref = torch.get_rng_state()
    g_ref = _grads(model, objective)

    _zero(model, objective)
    torch.manual_seed(2024)
    res = contrastive_step(model, objective, inputs, labels, chunk_size=chunk)
    g_chunk = _grads(model, objective)
    torch.testing.assert_close(res.loss, ref_loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_chunk, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the RNG advances as if every chunk had been encoded once: later draws are unchanged
    assert torch.equal(torch.get_rng_state(), rng_after_ref)

    # without the replay the re-forward draws new dropout masks: the gradients are wrong
    _zero(model, objective)
    torch.manual_seed(2024)
    contrastive_step(model, objective, inputs, labels, chunk_size=chunk, replay_rng=False)
    worst = max((a - b).abs().max().item() for a, b in zip(_grads(model, objective), g_ref))
    assert worst > 1e-4


def test_single_chunk_with_dropout_is_plain_training():
    """chunk_size >= N takes the plain path: same dropout masks as a plain forward."""
    model = _model("pairs", 0.3)
    objective = _objective("clip", {}, True)
    inputs = _inputs("pairs", 16)
    torch.manual_seed(5)
    a = contrastive_step(model, objective, inputs, chunk_size=16).loss
    torch.manual_seed(5)
    b = objective([model(inputs[0], 0), model(inputs[1], 1)])
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


@pytest.mark.gpu
def test_chunked_equals_unchunked_cuda_bf16_autocast():
    dev = torch.device("cuda")
    n, chunk = 512, 128
    torch.manual_seed(0)
    model = TwoTower(mlp(32, 16, hidden=64, dropout=0.2), mlp(24, 16, hidden=64, dropout=0.2)).to(dev)
    objective = build_objective("clip", learnable_temperature=True).to(dev)
    inputs = [torch.randn(n, 32, device=dev), torch.randn(n, 24, device=dev)]
    amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    torch.manual_seed(1)
    with amp():
        embs = [torch.cat([model(c, s) for c in x.split(chunk)]) for s, x in enumerate(inputs)]
    objective(embs).backward()
    g_ref = _grads(model, objective)
    _zero(model, objective)
    torch.manual_seed(1)
    contrastive_step(model, objective, inputs, chunk_size=chunk, autocast=amp)
    for a, b in zip(_grads(model, objective), g_ref):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


# --------------------------------------------------------------------------------------------
# losses by name, options, temperature
# --------------------------------------------------------------------------------------------

def test_every_loss_is_reachable_by_name():
    assert {c[0] for c in CASES} == set(LOSSES)


def test_bad_loss_options_are_refused():
    with pytest.raises(ValueError, match="unknown option.*bogus.*accepted"):
        build_objective("supcon", options={"bogus": 1})
    with pytest.raises(ValueError, match="unknown loss"):
        build_objective("triplet")
    with pytest.raises(ValueError, match="trainer's own options"):
        build_objective("clip", options={"temperature": 0.1})
    with pytest.raises(ValueError, match="fixed temperature"):
        build_objective("hard_negative_nce", learnable_temperature=True)
    with pytest.raises(ValueError, match="2 embedding slots"):
        build_objective("clip").check_slots(3)


def test_learnable_temperature_is_clamped_at_100():
    objective = build_objective("clip", temperature=0.07, learnable_temperature=True)
    assert objective.logit_scale() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        objective.loss.log_logit_scale.fill_(7.0)
    objective.clamp_()
    assert objective.loss.log_logit_scale.item() == pytest.approx(math.log(100.0))
    assert objective.logit_scale() == pytest.approx(100.0)


def test_warmup_cosine_schedule():
    s = WarmupCosine(warmup=4, total=14, min_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(14) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)


def test_recall_at_k():
    keys = torch.eye(5)
    queries = torch.eye(5)[[0, 1, 2, 4, 3]]
    r = recall_at_k(queries, keys, ks=(1, 5))
    assert r[1] == pytest.approx(0.6) and r[5] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# exact resumption
# --------------------------------------------------------------------------------------------

def _small_config(task: str, **kw) -> TrainConfig:
    base = dict(task=task, loss="clip" if task == "pairs" else "supcon", embed_dim=8, hidden=32,
                dropout=0.2, batch_size=64, chunk_size=24, epochs=2, steps_per_epoch=3, lr=5e-3,
                warmup_steps=2, min_lr_ratio=0.1, learnable_temperature=True, eval_size=128,
                metric_samples=64, progress=False, seed=3, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _assert_same_state(a, b):
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    for pa, pb in zip(a.objective.parameters(), b.objective.parameters()):
        assert torch.equal(pa, pb)
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name, va in sa["state"][k].items():
            assert torch.equal(torch.as_tensor(va), torch.as_tensor(sb["state"][k][name])), (k, name)
    assert a.scheduler.state_dict()["last_epoch"] == b.scheduler.state_dict()["last_epoch"]


@pytest.mark.parametrize("task,stop", [("pairs", 4), ("digits", 3)],
                         ids=["pairs-mid-epoch", "digits-epoch-boundary"])
def test_resume_gives_identical_parameters_and_optimizer_state(tmp_path, task, stop):
    cfg = _small_config(task)
    full = train(cfg)
    assert full.global_step == 6

    ckpt = str(tmp_path / "run.ckpt")
    first = train(cfg.replace(checkpoint=ckpt, stop_after=stop))
    assert first.stopped_early and first.global_step == stop
    second = train(cfg.replace(checkpoint=ckpt, resume=ckpt))
    assert not second.stopped_early and second.global_step == 6
    _assert_same_state(second, full)
    keys = [k for k in full.metrics() if k not in ("epoch_time_s",)]
    assert {k: full.metrics()[k] for k in keys} == {k: second.metrics()[k] for k in keys}


def test_resume_refuses_a_different_configuration(tmp_path):
    cfg = _small_config("pairs", epochs=1)
    ckpt = str(tmp_path / "run.ckpt")
    train(cfg.replace(checkpoint=ckpt, stop_after=1))
    with pytest.raises(CheckpointError, match=r"different run configuration.*lr"):
        train(cfg.replace(lr=1e-3, checkpoint=ckpt, resume=ckpt))


def test_cli_resume_continues_the_stored_run(tmp_path, capsys):
    args = ["--task", "pairs", "--batch-size", "64", "--chunk-size", "16", "--steps-per-epoch",
            "2", "--epochs", "2", "--hidden", "32", "--eval-size", "128", "--metric-samples",
            "64", "--no-progress", "--seed", "1", "--threads", "1"]
    full, part = str(tmp_path / "full.ckpt"), str(tmp_path / "part.ckpt")
    assert main(args + ["--checkpoint", full]) == 0
    assert main(args + ["--checkpoint", part, "--stop-after", "3"]) == 0
    assert "--resume" in capsys.readouterr().out
    assert main(["--resume", part]) == 0  # the stored config, nothing else
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert a["progress"]["global_step"] == b["progress"]["global_step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert main(["--resume", part, "--lr", "0.5", "--no-progress"]) == 2
    assert "lr" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# checkpoints: refusal of bad files, atomic writes
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "good.ckpt")
    train(_small_config("pairs", epochs=1, steps_per_epoch=1, checkpoint=path))
    return path


def _bad_files(tmp_path, good: str) -> dict:
    raw = open(good, "rb").read()
    files = {
        "truncated": raw[: len(raw) // 2],
        "truncated-header": raw[:20],
        "empty": b"",
        "garbage": bytes(range(256)) * 64,
        "bitflip": raw[:-100] + bytes([raw[-100] ^ 0x01]) + raw[-99:],
        "trailing": raw + b"\0\0\0",
    }
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}}, buf)
    files["foreign-torch-save"] = buf.getvalue()
    out = {}
    for name, data in files.items():
        p = tmp_path / f"{name}.ckpt"
        p.write_bytes(data)
        out[name] = str(p)
    return out


@pytest.mark.parametrize("kind,match", [
    ("truncated", "truncated: the header announces"),
    ("truncated-header", "truncated: 20 bytes"),
    ("empty", "empty"),
    ("garbage", "not a fastcl.train checkpoint"),
    ("bitflip", "checksum"),
    ("trailing", "unexpected bytes"),
    ("foreign-torch-save", "plain torch.save"),
])
def test_bad_checkpoint_is_refused_with_a_clear_message(tmp_path, good_checkpoint, kind, match,
                                                        capsys):
    path = _bad_files(tmp_path, good_checkpoint)[kind]
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)
    assert main(["--resume", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastcl.train: error: checkpoint") and "Traceback" not in err


def test_missing_checkpoint_and_other_format_version(tmp_path, good_checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.ckpt"))
    raw = bytearray(open(good_checkpoint, "rb").read())
    raw[8] = 99  # the version field follows the 8 magic bytes
    p = tmp_path / "v99.ckpt"
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(str(p))
    state = load_checkpoint(good_checkpoint)
    assert state["format"] == "fastcl.train/1" and state["progress"]["global_step"] == 1


def _listing(d) -> list:
    return sorted(os.listdir(d))


@pytest.mark.parametrize("fail_at", ["replace", "fsync", "serialize"])
def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "state.ckpt"
    save_checkpoint(str(path), {"x": torch.arange(10)})
    before = path.read_bytes()
    assert _listing(tmp_path) == ["state.ckpt"]

    def boom(*a, **k):
        raise OSError("disk full")

    payload = {"x": torch.arange(10_000)}
    if fail_at == "replace":
        monkeypatch.setattr(os, "replace", boom)
    elif fail_at == "fsync":
        monkeypatch.setattr(os, "fsync", boom)
    else:
        payload["bad"] = lambda: None  # not picklable: fails before any file is touched
    with pytest.raises(Exception):
        save_checkpoint(str(path), payload)
    monkeypatch.undo()
    assert _listing(tmp_path) == ["state.ckpt"]          # no temporary file left behind
    assert path.read_bytes() == before                    # the previous checkpoint is intact
    save_checkpoint(str(tmp_path / "new.ckpt"), {"x": torch.arange(3)})
    assert _listing(tmp_path) == ["new.ckpt", "state.ckpt"]


# --------------------------------------------------------------------------------------------
# end to end through the command line
# --------------------------------------------------------------------------------------------

def test_cli_end_to_end_writes_a_log_with_decreasing_loss(tmp_path, capsys):
    log, png, ckpt = tmp_path / "run.jsonl", tmp_path / "run.png", tmp_path / "run.ckpt"
    rc = main(["--task", "pairs", "--loss", "clip", "--learnable-temperature", "--batch-size",
               "256", "--chunk-size", "64", "--steps-per-epoch", "4", "--epochs", "3", "--lr",
               "1e-2", "--warmup-steps", "1", "--hidden", "64", "--eval-size", "256",
               "--metric-samples", "128", "--log", str(log), "--plot", str(png),
               "--checkpoint", str(ckpt), "--no-progress", "--threads", "1"])
    assert rc == 0
    assert "done: 12 steps" in capsys.readouterr().out
    records = [json.loads(line) for line in log.read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events[0] == "start" and events[-1] == "end"
    steps = [r for r in records if r["event"] == "step"]
    evals = [r for r in records if r["event"] == "eval"]
    assert len(steps) == 12 and [e["epoch"] for e in evals] == [0, 1, 2, 3]
    losses = [r["loss"] for r in steps]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    train_losses = [e["train_loss"] for e in evals[1:]]
    assert train_losses == sorted(train_losses, reverse=True)
    assert evals[-1]["recall@1"] > evals[0]["recall@1"] + 0.1
    for key in ("recall@5", "alignment", "uniformity"):
        assert key in evals[-1]
    for key in ("lr", "logit_scale", "samples_per_s", "peak_mem_mb", "loss_peak_mb", "grad_norm"):
        assert key in steps[0]
    assert png.stat().st_size > 10_000
    assert load_checkpoint(str(ckpt))["progress"]["global_step"] == 12


def test_cli_digits_reports_knn_and_refuses_bad_options(tmp_path, capsys):
    log = tmp_path / "digits.jsonl"
    rc = main(["--task", "digits", "--loss", "supcon", "--embed-dim", "8", "--batch-size", "128",
               "--chunk-size", "32", "--epochs", "1", "--steps-per-epoch", "4", "--log", str(log),
               "--no-progress", "--metric-samples", "64", "--loss-opt", "variant=out",
               "--threads", "1"])
    assert rc == 0
    evals = [json.loads(x) for x in log.read_text().splitlines() if '"eval"' in x]
    assert 0.1 < evals[0]["knn_acc"] <= 1.0 and "knn_acc" in evals[-1]
    assert main(["--task", "digits", "--loss", "clip", "--views", "3", "--no-progress"]) == 2
    assert "2 embedding slots" in capsys.readouterr().err
    assert main(["--task", "pairs", "--loss-opt", "bogus=1", "--no-progress"]) == 2
    assert "unknown option" in capsys.readouterr().err
    assert main(["--task", "pairs", "--dropout", "1.5"]) == 2
    assert "dropout" in capsys.readouterr().err


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "fastcl.train", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--chunk-size" in out.stdout and "--resume" in out.stdout


# --------------------------------------------------------------------------------------------
# the demo's plan, memory measurement, the multi-process hook
# --------------------------------------------------------------------------------------------

def test_demo_uses_the_giant_batch_only_with_a_fused_kernel(monkeypatch):
    from fastcl.train import demo

    cpu = torch.device("cpu")
    monkeypatch.setattr(fastcl.dispatch, "select", lambda *a, **k: "cpu")
    batch, backend, note = demo.plan_pairs_batch(cpu, torch.float32)
    assert (batch, backend, note) == (demo.FUSED_BATCH, "cpu", None) and batch >= 32768
    monkeypatch.setattr(fastcl.dispatch, "select", lambda *a, **k: "reference")
    batch, backend, note = demo.plan_pairs_batch(cpu, torch.float32)
    assert batch == demo.REFERENCE_BATCH and backend == "reference" and "instead of 32768" in note


def test_eager_memory_count_and_peak_measurement():
    assert eager_clip_bytes(32768) == 5 * 32768 ** 2 * 4
    assert eager_clip_bytes(1000, torch.bfloat16) == 5 * 1000 ** 2 * 2
    meter = PeakMemory(torch.device("cpu"))
    if not meter.resettable:
        pytest.skip("the peak RSS cannot be reset on this platform")
    with meter.measure() as m:
        x = torch.ones(16 * 2 ** 20)  # 64 MiB
        del x
    assert m["extra"] >= 60 * 2 ** 20


def test_loss_phase_memory_stays_far_below_the_n_by_n_matrix():
    """With a fused kernel, the loss phase of a chunked step holds O(N D), not N x N."""
    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        backend = fastcl.dispatch.select("info_nce", cpu, torch.float32)
    if backend == "reference":
        pytest.skip("no fused CPU kernel in this build: the reference holds N x N")
    meter = PeakMemory(cpu)
    if not meter.resettable:
        pytest.skip("the peak RSS cannot be reset on this platform")
    n = 8192
    torch.manual_seed(0)
    model = TwoTower(mlp(16, 32, hidden=64), mlp(16, 32, hidden=64))
    objective = build_objective("clip", learnable_temperature=True)
    inputs = [torch.randn(n, 16), torch.randn(n, 16)]
    res = contrastive_step(model, objective, inputs, chunk_size=1024, memory=meter)
    assert res.loss_peak_bytes is not None
    assert res.loss_peak_bytes < 0.25 * eager_clip_bytes(n)  # eager: 5 N^2 x 4 B = 1.25 GiB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# several processes: 2 gloo CPU processes against one process on the same global batch
# --------------------------------------------------------------------------------------------

# (name, task, config changes) of the 1-vs-2-process runs; no dropout: each rank draws its own
# dropout masks, which one process cannot reproduce (the data draws are shard-invariant)
DIST_CASES = [
    ("clip-pairs", "pairs", dict(loss="clip")),
    ("clip-pairs-ring", "pairs", dict(loss="clip", gather="ring")),
    ("siglip-pairs", "pairs", dict(loss="siglip", learnable_temperature=False)),
    ("align-uniform-pairs", "pairs", dict(loss="align_uniform", learnable_temperature=False)),
    ("supcon-digits", "digits", dict(loss="supcon")),
    ("multiview-digits-3v", "digits", dict(loss="multiview", views=3, learnable_temperature=False,
                                           loss_options={"method": "mv_infonce"})),
]


def _dist_config(task: str, **kw) -> TrainConfig:
    base = dict(epochs=1, steps_per_epoch=2, batch_size=48, chunk_size=10, dropout=0.0,
                hidden=16, eval_size=64)
    base.update(kw)
    return _small_config(task, **base)


def _f64_run(cfg: TrainConfig, echo=None) -> dict:
    """Train ``cfg`` with a float64 model and the float64 reference loss (fp64 throughout: the
    comparison then shows the sharding and the gathering, not fp32 rounding)."""
    from fastcl.train.loop import _in_dims, build_data, seed_everything
    from fastcl.train.models import build_model

    seed_everything(cfg.seed)
    data = build_data(cfg)
    model = build_model(cfg.task, embed_dim=cfg.embed_dim, hidden=cfg.hidden, depth=cfg.depth,
                        dropout=cfg.dropout, views=cfg.views, in_dims=_in_dims(data)).to(F64)
    objective = build_objective(cfg.loss, options=cfg.loss_options, temperature=cfg.temperature,
                                learnable_temperature=cfg.learnable_temperature,
                                backend="reference").to(F64)
    res = train(cfg, model=model, data=data, objective=objective, echo=echo)
    return {"model": {k: v.clone() for k, v in res.model.state_dict().items()},
            "objective": [p.detach().clone() for p in res.objective.parameters()],
            "losses": [r["loss"] for r in res.steps()],
            "metrics": {k: v for k, v in res.metrics().items() if k != "epoch_time_s"},
            "world_size": res.world_size}


def _dist_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: every multi-process scenario, results saved to ``out`` for the parent."""
    import torch.distributed as dist

    from fastcl.train import ConfigError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # the trainer uses this group and leaves it alone; a stuck collective fails instead of hanging
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for name, task, kw in DIST_CASES:
            said: list = []
            results[name] = _f64_run(_dist_config(task, **kw), echo=said.append)
            results[name]["said"] = said
        # exact resumption on 2 processes, with dropout (per-rank RNG states in the checkpoint)
        cfg = _dist_config("pairs", dropout=0.2, steps_per_epoch=2, epochs=2)
        full_ckpt, part_ckpt = os.path.join(out, "full.ckpt"), os.path.join(out, "part.ckpt")
        full = train(cfg.replace(checkpoint=full_ckpt, log=os.path.join(out, "full.jsonl")))
        train(cfg.replace(checkpoint=part_ckpt, stop_after=3))
        resumed = train(cfg.replace(checkpoint=part_ckpt, resume=part_ckpt))
        results["resume"] = {
            "full": full.model.state_dict(), "resumed": resumed.model.state_dict(),
            "full_objective": [p.detach() for p in full.objective.parameters()],
            "resumed_objective": [p.detach() for p in resumed.objective.parameters()],
            "full_metrics": {k: v for k, v in full.metrics().items() if k != "epoch_time_s"},
            "resumed_metrics": {k: v for k, v in resumed.metrics().items() if k != "epoch_time_s"},
            "steps": (full.global_step, resumed.global_step)}
        for key, change in (("indivisible", dict(batch_size=47)), ("bad_gather", dict(gather="bogus"))):
            try:
                train(cfg.replace(**change))
                results[key] = None
            except ConfigError as exc:
                results[key] = str(exc)
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = str(tmp_path_factory.mktemp("dist"))
    ctx = mp.spawn(_dist_worker, args=(2, _free_port(), out), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process run did not finish in 300 s")
    return out, [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name,task,kw", DIST_CASES, ids=[c[0] for c in DIST_CASES])
def test_two_processes_train_the_parameters_of_one_process(two_process_results, name, task, kw):
    """2 gloo processes, each reading half of every global batch (augmented digits included)
    and gathering the other's embeddings for the loss, end 2 steps with the parameters, learnable
    temperature included, of one process on the same global batch. float64 throughout: the
    tolerance covers rounding only (sums in another order: the all-reduce of the gradients,
    the gathered loss on the op backend against the reference's loss)."""
    _, ranks = two_process_results
    single = _f64_run(_dist_config(task, **kw))
    assert single["world_size"] == 1
    for rank, res in enumerate(ranks):
        got = res[name]
        assert got["world_size"] == 2
        for k, v in single["model"].items():
            torch.testing.assert_close(got["model"][k], v, rtol=1e-10, atol=1e-12, msg=f"{k}, rank {rank}")
        for a, b in zip(got["objective"], single["objective"]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert got["losses"] == pytest.approx(single["losses"], rel=1e-9)  # the global loss
        assert got["metrics"].keys() == single["metrics"].keys()
        for k, v in single["metrics"].items():
            assert got["metrics"][k] == pytest.approx(v, abs=1e-4), k
    if kw.get("learnable_temperature", True):
        assert len(single["objective"]) == 1  # the temperature was learned, and matched
    assert ranks[0][name]["said"] and not ranks[1][name]["said"]  # rank 0 alone prints


def test_two_processes_checkpoint_and_resume_continue_identically(two_process_results):
    """With dropout on, a 2-process run stopped after 3 of 4 steps and resumed on 2 processes
    ends with the parameters of the uninterrupted run, bit for bit: rank 0 wrote one checkpoint
    holding every rank's RNG state, and every rank loaded it."""
    out, ranks = two_process_results
    for res in ranks:
        r = res["resume"]
        assert r["steps"] == (4, 4)
        for k, v in r["full"].items():
            assert torch.equal(r["resumed"][k], v), k
        for a, b in zip(r["resumed_objective"], r["full_objective"]):
            assert torch.equal(a, b)
        assert r["resumed_metrics"] == r["full_metrics"]
    for k, v in ranks[0]["resume"]["full"].items():  # DDP kept the ranks in step
        assert torch.equal(ranks[1]["resume"]["full"][k], v), k
    state = load_checkpoint(os.path.join(out, "part.ckpt"))
    assert state["world_size"] == 2 and state["progress"]["global_step"] == 4
    rngs = state["rng_ranks"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
    assert torch.equal(state["rng"]["torch"], rngs[0]["torch"])
    assert sorted(f for f in os.listdir(out) if not f.startswith("rank")) == \
        ["full.ckpt", "full.jsonl", "part.ckpt"]  # rank 0 alone wrote, atomically (no temp file)
    records = [json.loads(x) for x in open(os.path.join(out, "full.jsonl"))]
    assert records[0]["world_size"] == 2 and records[0]["gather"] == "all_gather"
    assert len([r for r in records if r["event"] == "step"]) == 4


def test_two_processes_refuse_what_cannot_be_sharded(two_process_results):
    """An indivisible global batch and a gather mode fastcl does not know: refused on every
    rank before any training."""
    _, ranks = two_process_results
    for res in ranks:
        assert "batch_size 47 is not divisible by the 2 processes" in (res["indivisible"] or "")
        assert "gather" in (res["bad_gather"] or "") and "bogus" in res["bad_gather"]


def test_cli_on_two_processes(tmp_path):
    """``python -m fastcl.train`` as torchrun starts it (env:// variables): rank 0 prints the
    epochs and the summary, rank 1 nothing; the log holds rank 0's records."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    log = tmp_path / "run.jsonl"
    cmd = [sys.executable, "-m", "fastcl.train", "--task", "pairs", "--batch-size", "64",
           "--chunk-size", "16", "--epochs", "2", "--steps-per-epoch", "2", "--hidden", "32",
           "--eval-size", "128", "--metric-samples", "64", "--device", "cpu", "--threads", "1",
           "--no-progress", "--gather", "all_gather", "--log", str(log)]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert "epoch 2/2" in outs[0][0] and "done: 4 steps" in outs[0][0]
    assert outs[1][0] == ""
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["event"] for r in records].count("step") == 4 and records[0]["world_size"] == 2


def test_shards_concatenate_to_the_single_process_batch():
    """Each built-in dataset's shards, concatenated by rank, are its global batch (augmentations
    included), for 1, 2 and 4 processes; a dataset without shard support is sliced."""
    from fastcl.train.data import PairsData, SyntheticPairs, digits_data, read_batch

    g = torch.Generator().manual_seed(0)
    pairs = PairsData(torch.randn(50, 3, generator=g), torch.randn(50, 2, generator=g),
                      torch.randn(8, 3), torch.randn(8, 2))
    datasets = [SyntheticPairs(eval_size=16, seed=4), digits_data(views=3, seed=2), pairs]

    class Plain:  # batch(epoch, step, batch_size) only
        def batch(self, epoch, step, batch_size):
            return pairs.batch(epoch, step, batch_size)

    for data in datasets + [Plain()]:
        full = data.batch(1, 5, 24)
        for world in (2, 4):
            shards = [read_batch(data, 1, 5, 24, r, world) for r in range(world)]
            assert all(s.size == 24 // world for s in shards)
            for slot, x in enumerate(full.inputs):
                torch.testing.assert_close(torch.cat([s.inputs[slot] for s in shards]), x,
                                           rtol=1e-6, atol=1e-6)
            if full.labels is not None:
                assert torch.equal(torch.cat([s.labels for s in shards]), full.labels)
    with pytest.raises(ValueError, match="batch_size 25 is not divisible by the 2 processes"):
        read_batch(datasets[0], 0, 0, 25, 1, 2)


def test_the_demo_refuses_several_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "(rank 1)" in err and "the demo runs on one process" in err
