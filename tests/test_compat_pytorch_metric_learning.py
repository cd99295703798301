"""fastcl.compat.pytorch_metric_learning against pytorch-metric-learning's own losses.

Every fused layout is compared with pml (loss and gradients w.r.t. the raw embeddings, through
pml's normalization) and checked to run on the fused function it maps to; every unfused call is
checked to warn once and return exactly pml's result. A pml ``MetricLossOnly`` trainer runs two
iterations with the adapters.
"""

from __future__ import annotations

import contextlib
import textwrap
import warnings

import pytest
import torch

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning import distances, miners, reducers, regularizers  # noqa: E402

import fastcl.functional  # noqa: E402
from _processes import run_ranks  # noqa: E402
from fastcl.compat import pytorch_metric_learning as compat  # noqa: E402
from fastcl.compat.pytorch_metric_learning import CompatFallbackWarning  # noqa: E402

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-6)}
DTYPES = [torch.float32, torch.float64]
# fp64 comparisons use temperatures that fp32 represents exactly (0.5, 0.25, ...): fastcl turns a
# Python float temperature into an fp32 scalar, which puts ~1e-8 relative error on fp64 losses
# (see test_fp64_temperature_precision). pml's defaults (0.07, 0.1) are compared in fp32.


def randn(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)


def check(ours, theirs, inputs, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(ours.to(theirs.dtype), theirs, **tol)
    g_ours = torch.autograd.grad(ours, inputs, allow_unused=True)
    g_theirs = torch.autograd.grad(theirs, inputs, allow_unused=True)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a.to(b.dtype), b, **tol)


@pytest.fixture
def spy(monkeypatch):
    """Records which fused fastcl functions the adapters call."""
    calls = []
    for name in ("nt_xent", "supcon", "info_nce"):
        original = getattr(fastcl.functional, name)

        def wrapper(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(fastcl.functional, name, wrapper)
    return calls


@contextlib.contextmanager
def no_fallback():
    """Fails on a CompatFallbackWarning: the call must run on a fused function."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatFallbackWarning)
        yield


# ============================================================================================
# NTXentLoss: fused layouts
# ============================================================================================


@pytest.mark.parametrize("dtype,temperature", [(torch.float32, None),  # pml's default 0.07
                                               (torch.float32, 0.5), (torch.float64, 0.5)])
def test_ntxent_two_view_layout_is_nt_xent(dtype, temperature, spy):
    kw = {} if temperature is None else dict(temperature=temperature)
    z = randn(12, 5, seed=1, dtype=dtype)
    labels = torch.arange(6).repeat(2)
    with no_fallback():
        ours = compat.NTXentLoss(**kw)(z, labels)
    theirs = pml_losses.NTXentLoss(**kw)(z, labels)
    check(ours, theirs, [z], dtype)
    assert spy == ["nt_xent"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_ntxent_at_most_two_per_label_any_order_is_supcon(dtype, spy):
    # shuffled pairs, singletons (no term), non-contiguous label values
    z = randn(9, 4, seed=2, dtype=dtype)
    labels = torch.tensor([7, 3, 9, 7, 1, 3, 20, 9, 5])
    with no_fallback():
        ours = compat.NTXentLoss(temperature=0.25)(z, labels)
    theirs = pml_losses.NTXentLoss(temperature=0.25)(z, labels)
    check(ours, theirs, [z], dtype)
    assert spy == ["supcon"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_ntxent_ref_emb_one_match_is_info_nce(dtype, spy):
    emb = randn(6, 4, seed=3, dtype=dtype)
    ref = randn(8, 4, seed=4, dtype=dtype)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    ref_labels = torch.tensor([5, 9, 0, 2, 8, 1, 7, 3])  # anchor 4 has no match
    with no_fallback():
        ours = compat.NTXentLoss(temperature=0.25)(emb, labels, ref_emb=ref,
                                                   ref_labels=ref_labels)
    theirs = pml_losses.NTXentLoss(temperature=0.25)(emb, labels, ref_emb=ref,
                                                     ref_labels=ref_labels)
    check(ours, theirs, [emb, ref], dtype)
    assert spy == ["info_nce"]


@pytest.mark.parametrize("reducer", [reducers.MeanReducer, reducers.AvgNonZeroReducer,
                                     reducers.SumReducer])
@pytest.mark.parametrize("distance", [distances.CosineSimilarity, distances.DotProductSimilarity])
def test_ntxent_distances_and_reducers(reducer, distance):
    leaf = randn(10, 3, seed=5)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 5])
    kw = dict(temperature=0.6, distance=distance(), reducer=reducer())
    with no_fallback():
        ours = compat.NTXentLoss(**kw)(leaf, labels)
    theirs = pml_losses.NTXentLoss(**kw)(leaf, labels)
    check(ours, theirs, [leaf], torch.float32)


# ============================================================================================
# SupConLoss: fused layouts
# ============================================================================================


def test_supcon_defaults_with_singletons(spy):
    dtype = torch.float32
    emb = randn(9, 5, seed=6, dtype=dtype)
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 0, 4, 2])
    with no_fallback():
        ours = compat.SupConLoss()(emb, labels)
    theirs = pml_losses.SupConLoss()(emb, labels)
    check(ours, theirs, [emb], dtype)
    assert spy == ["supcon"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_supcon_two_views_other_temperature(dtype):
    feats = randn(6, 2, 4, seed=7, dtype=dtype)
    flat = torch.cat(torch.unbind(feats, dim=1))
    labels = torch.tensor([0, 1, 0, 2, 1, 3]).repeat(2)
    with no_fallback():
        ours = compat.SupConLoss(temperature=0.25)(flat, labels)
    theirs = pml_losses.SupConLoss(temperature=0.25)(flat, labels)
    check(ours, theirs, [feats], dtype)


@pytest.mark.parametrize("reducer", [reducers.MeanReducer, reducers.AvgNonZeroReducer,
                                     reducers.SumReducer])
def test_supcon_reducers_dot_product(reducer):
    emb = randn(8, 3, seed=8)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    kw = dict(temperature=0.5, distance=distances.DotProductSimilarity(), reducer=reducer())
    with no_fallback():
        ours = compat.SupConLoss(**kw)(emb, labels)
    theirs = pml_losses.SupConLoss(**kw)(emb, labels)
    check(ours, theirs, [emb], torch.float32)


# ============================================================================================
# SelfSupervisedLoss
# ============================================================================================


@pytest.mark.parametrize("dtype,kw", [(torch.float32, {}), (torch.float64, dict(temperature=0.5))])
@pytest.mark.parametrize("inner", ["fastcl", "pml"])
def test_self_supervised_symmetric(dtype, kw, inner, spy):
    z1 = randn(5, 4, seed=9, dtype=dtype)
    z2 = randn(5, 4, seed=10, dtype=dtype)
    wrapped = compat.NTXentLoss(**kw) if inner == "fastcl" else pml_losses.NTXentLoss(**kw)
    with no_fallback():
        ours = compat.SelfSupervisedLoss(wrapped)(z1, z2)
    theirs = pml_losses.SelfSupervisedLoss(pml_losses.NTXentLoss(**kw))(z1, z2)
    check(ours, theirs, [z1, z2], dtype)
    assert spy == ["nt_xent"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_self_supervised_one_direction(dtype, spy):
    z1 = randn(7, 4, seed=11, dtype=dtype)
    z2 = randn(7, 4, seed=12, dtype=dtype)
    with no_fallback():
        ours = compat.SelfSupervisedLoss(compat.NTXentLoss(temperature=0.25),
                                         symmetric=False)(z1, z2)
    theirs = pml_losses.SelfSupervisedLoss(pml_losses.NTXentLoss(temperature=0.25),
                                           symmetric=False)(z1, z2)
    check(ours, theirs, [z1, z2], dtype)
    assert spy == ["info_nce"]


def test_self_supervised_supcon_symmetric():
    z1 = randn(6, 4, seed=13)
    z2 = randn(6, 4, seed=14)
    with no_fallback():
        ours = compat.SelfSupervisedLoss(compat.SupConLoss(temperature=0.4))(z1, z2)
    theirs = pml_losses.SelfSupervisedLoss(pml_losses.SupConLoss(temperature=0.4))(z1, z2)
    check(ours, theirs, [z1, z2], torch.float32)


def test_self_supervised_other_wrapped_loss_runs_as_is():
    z1 = randn(6, 4, seed=15)
    z2 = randn(6, 4, seed=16)
    with pytest.warns(CompatFallbackWarning, match="TripletMarginLoss"):
        ours = compat.SelfSupervisedLoss(pml_losses.TripletMarginLoss())(z1, z2)
    theirs = pml_losses.SelfSupervisedLoss(pml_losses.TripletMarginLoss())(z1, z2)
    torch.testing.assert_close(ours, theirs)


# ============================================================================================
# fallbacks: pml's own result, one warning per loss object and reason
# ============================================================================================


def _fallback_cases():
    z = randn(8, 4, seed=20)
    three = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    two = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    ref = randn(5, 4, seed=21)
    ref_kw = dict(ref_emb=ref, ref_labels=torch.tensor([0, 0, 1, 2, 3]))
    pairs = miners.MultiSimilarityMiner()
    return [
        ("ntxent", {}, (z, three), {}, "more than two"),
        ("ntxent", {}, (z, two), dict(indices_tuple=pairs(z, two)), "indices_tuple"),
        ("ntxent", dict(distance=distances.LpDistance()), (z, two), {}, "LpDistance"),
        ("ntxent", dict(distance=distances.CosineSimilarity(power=2)), (z, two), {}, "power=2"),
        ("ntxent", dict(reducer=reducers.ThresholdReducer(low=0.5)), (z, two), {},
         "ThresholdReducer"),
        ("ntxent", dict(embedding_regularizer=regularizers.LpRegularizer()), (z, two), {},
         "embedding_regularizer"),
        ("ntxent", {}, (z, two), dict(ref_emb=randn(8, 4, seed=23)), "without ref_labels"),
        ("ntxent", {}, (z[:5], two[:5]), ref_kw, "several ref_emb rows"),
        ("ntxent", {}, (z, torch.zeros(8, dtype=torch.long)), {}, "single label"),
        ("ntxent", {}, (z, torch.arange(8)), {}, "without a positive pair"),
        ("supcon", {}, (z[:5], two[:5]), ref_kw, "ref_emb"),
        ("supcon", dict(reducer=reducers.ThresholdReducer(high=3.0)), (z, two), {},
         "ThresholdReducer"),
        ("supcon", {}, (z, torch.zeros(8, dtype=torch.long)), {}, "single label"),
    ]


@pytest.mark.parametrize("case", range(13))
def test_fallback_warns_once_and_equals_pml(case):
    kind, ctor, args, kwargs, match = _fallback_cases()[case]
    ours_cls = compat.NTXentLoss if kind == "ntxent" else compat.SupConLoss
    theirs_cls = pml_losses.NTXentLoss if kind == "ntxent" else pml_losses.SupConLoss
    ours_fn, theirs_fn = ours_cls(**ctor), theirs_cls(**ctor)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        first = ours_fn(*args, **kwargs)
        second = ours_fn(*args, **kwargs)
    fallback = [w for w in rec if issubclass(w.category, CompatFallbackWarning)]
    assert len(fallback) == 1, [str(w.message) for w in rec]
    assert match in str(fallback[0].message)
    theirs = theirs_fn(*args, **kwargs)
    torch.testing.assert_close(first, theirs)
    torch.testing.assert_close(second, theirs)


def test_layout_with_three_positives_differs_from_supcon():
    # why the fallback exists: pml's NTXent with several positives per anchor is not SupCon
    z = randn(8, 4, seed=22)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    pml_value = pml_losses.NTXentLoss(temperature=0.5)(z, labels)
    supcon_value = fastcl.functional.supcon(z, labels, temperature=0.5, normalize=True)
    assert not torch.allclose(pml_value, supcon_value, rtol=1e-3)


# ============================================================================================
# pml's own trainer
# ============================================================================================


class _PairsDataset(torch.utils.data.Dataset):
    def __init__(self, n=32, d=8, classes=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(classes).repeat_interleave(n // classes)
        self.x = torch.randn(n, d, generator=g) + self.labels[:, None].float()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.x[i], self.labels[i]


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
@pytest.mark.parametrize("loss_cls", [compat.NTXentLoss, compat.SupConLoss])
def test_metric_loss_only_trainer(loss_cls, spy):
    from pytorch_metric_learning import samplers, trainers

    torch.manual_seed(0)
    data = _PairsDataset()
    trunk = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
    embedder = torch.nn.Linear(16, 4)
    models = {"trunk": trunk, "embedder": embedder}
    optimizers = {f"{k}_optimizer": torch.optim.SGD(m.parameters(), lr=0.1)
                  for k, m in models.items()}
    before = [p.detach().clone() for p in embedder.parameters()]
    # 4 classes x 2 samples per batch: one positive per anchor, so NT-Xent is fused too
    sampler = samplers.MPerClassSampler(data.labels, m=2, batch_size=8, length_before_new_iter=16)
    trainer = trainers.MetricLossOnly(
        models=models, optimizers=optimizers, batch_size=8,
        loss_funcs={"metric_loss": loss_cls()}, dataset=data, sampler=sampler,
        iterations_per_epoch=2, dataloader_num_workers=0)
    with no_fallback():
        trainer.train(num_epochs=1)
    assert len(spy) == 2 and set(spy) == {"supcon"}
    assert all(not torch.equal(a, p) for a, p in zip(before, embedder.parameters()))


def test_fp64_temperature_precision():
    # a Python float temperature stays exact: fp64 losses match to fp64 precision
    z = randn(12, 5, seed=1, dtype=torch.float64)
    labels = torch.arange(6).repeat(2)
    ours = compat.NTXentLoss()(z, labels)
    theirs = pml_losses.NTXentLoss()(z, labels)
    torch.testing.assert_close(ours, theirs, **TOL[torch.float64])


# ============================================================================================
# DistributedLossWrapper on two processes
# ============================================================================================

_DIST_WORKER = textwrap.dedent(r'''
    import warnings
    import torch
    from pytorch_metric_learning import distances, losses as pml_losses, reducers
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper as PmlWrapper
    from _processes import process_group
    import fastcl.functional
    from fastcl.compat import pytorch_metric_learning as compat

    calls = []
    original = fastcl.functional.supcon
    def spy(features, *args, **kwargs):
        calls.append((tuple(features.shape), kwargs.get("gather")))
        return original(features, *args, **kwargs)
    fastcl.functional.supcon = spy

    with process_group() as (rank, world):
        n, d = 6, 5
        def labels_for(layout, seed):
            g = torch.Generator().manual_seed(seed)
            if layout == "two_view":  # [z1; z2] per rank, ids unique across ranks
                ids = torch.arange(n // 2) + rank * (n // 2)
                return torch.cat([ids, ids])
            if layout == "pairs_across_ranks":  # each label once here, once on the other rank
                return torch.randperm(n, generator=torch.Generator().manual_seed(seed)) * 10
            labels = torch.randint(0, 3, (world * n,), generator=g)[rank * n:(rank + 1) * n]
            if layout == "singletons":  # anchors without a positive: a zero loss each
                labels[1] = 100 + rank
            return labels
        cases = [
            ("NTXentLoss", dict(temperature=0.5), "two_view", {}),
            ("NTXentLoss", dict(temperature=0.25), "pairs_across_ranks", {}),
            ("NTXentLoss", dict(temperature=0.5, reducer=reducers.SumReducer()), "two_view", {}),
            ("NTXentLoss", dict(temperature=0.5, reducer=reducers.AvgNonZeroReducer(),
                                distance=distances.DotProductSimilarity()), "two_view", {}),
            ("SupConLoss", dict(temperature=0.5), "classes", {}),
            ("SupConLoss", dict(temperature=0.25, reducer=reducers.SumReducer()), "classes", {}),
            ("SupConLoss", dict(temperature=0.5, reducer=reducers.AvgNonZeroReducer(),
                                distance=distances.DotProductSimilarity()), "singletons", {}),
            ("SupConLoss", dict(temperature=0.5), "singletons", {}),
            ("SupConLoss", dict(temperature=0.5), "classes", dict(efficient=True)),  # pml's
            ("NTXentLoss", dict(temperature=0.5), "classes", {}),  # 3+ per label: pml's
        ]
        for i, (name, kw, layout, wrap) in enumerate(cases):
            g = torch.Generator().manual_seed(100 * i + rank)
            x0 = torch.randn(n, d, generator=g, dtype=torch.float64)
            labels = labels_for(layout, 50 + i)
            results = []
            for module, wrapper in ((compat, compat.DistributedLossWrapper),
                                    (pml_losses, PmlWrapper), (compat, PmlWrapper)):
                fn = wrapper(getattr(module, name)(**kw), **wrap)
                x = x0.clone().requires_grad_(True)
                del calls[:]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    loss = fn(x, labels)
                loss.backward()
                results.append((loss.detach(), x.grad))
                if module is compat and wrapper is compat.DistributedLossWrapper:
                    fused = layout not in ("classes", "singletons") or name == "SupConLoss"
                    fused = fused and not wrap
                    assert (calls == [((n, d), "all_gather")]) == fused, (name, layout, calls)
            for other in results[1:]:
                for a, b in zip(results[0], other):
                    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11,
                                               msg=lambda m: f"{name} {kw} {layout}: {m}")
''')


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_distributed_loss_wrapper_two_processes(tmp_path):
    """pml's DistributedLossWrapper around NTXentLoss / SupConLoss on two processes: fastcl's
    wrapper (each rank's anchors against the gathered batch, fused) gives pml's loss and
    gradients on each rank, and hands pml the calls it does not fuse."""
    run_ranks(_DIST_WORKER, tmp_path)
