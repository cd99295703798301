"""fastcl.compat.sentence_transformers against sentence-transformers' own MNRL / CachedMNRL.

The loss from the embeddings (values and gradients, fp32 and fp64) at the defaults and at other
settings, the fallbacks, GradCache with dropout (RNG replay) against sentence-transformers' own
cached loss, and ``SentenceTransformerTrainer`` steps on tiny models built in-process (no hub).
"""

from __future__ import annotations

import os
import textwrap
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

st = pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from datasets import Dataset  # noqa: E402
from sentence_transformers import (  # noqa: E402
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.base.modules.input_module import InputModule  # noqa: E402
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402
from sentence_transformers.sentence_transformer.modules import StaticEmbedding  # noqa: E402
from sentence_transformers.util import dot_score, euclidean_sim  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from _processes import run_ranks  # noqa: E402
from fastcl.compat import sentence_transformers as compat  # noqa: E402
from fastcl.compat.sentence_transformers import CompatFallbackWarning  # noqa: E402

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-6)}

WORDS = ("the a cat dog sat ran on mat park blue red green sky sun big small car road fast slow "
         "tree river house bird").split()
ANCHORS = ["the cat sat", "a dog ran", "blue sky", "red car", "big sun", "small road"]
POSITIVES = ["a cat sat on the mat", "the dog ran fast", "the blue sky", "a red car",
             "the big sun", "a small road"]
NEGATIVES = ["a bird on a tree", "the river", "a green house", "the slow car", "a park",
             "the tree"]


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


def close_grads(a, b):
    """Parameter gradients: fp32 sums over many rows, so the absolute tolerance follows the
    gradient's scale."""
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * float(b.abs().max()) + 1e-7)


def _tokenizer(padding=False):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[PAD]", "[UNK]"] + WORDS)},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if padding:
        tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def static_model(seed=0):
    torch.manual_seed(seed)
    return SentenceTransformer(modules=[StaticEmbedding(_tokenizer(), embedding_dim=8)],
                               device="cpu")


class TinyEncoder(InputModule):
    """Padded token ids -> embedding -> dropout -> masked mean: a batch-sliceable input module
    (what the cached loss needs), with dropout to exercise GradCache's RNG replay."""

    def __init__(self, dim=8, dropout=0.3):
        super().__init__()
        self.tokenizer = _tokenizer(padding=True)
        self.embedding = torch.nn.Embedding(self.tokenizer.get_vocab_size(), dim)
        self.dropout = torch.nn.Dropout(dropout)
        self.dim = dim

    def preprocess(self, inputs, prompt=None, **kwargs):
        enc = self.tokenizer.encode_batch(list(inputs), add_special_tokens=False)
        return {"input_ids": torch.tensor([e.ids for e in enc], dtype=torch.long),
                "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.long)}

    def forward(self, features, **kwargs):
        mask = features["attention_mask"].unsqueeze(-1).float()
        tokens = self.dropout(self.embedding(features["input_ids"]))
        features["sentence_embedding"] = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1)
        return features

    def get_embedding_dimension(self):
        return self.dim

    def save(self, output_path, *args, **kwargs):
        pass


def encoder_model(seed=0):
    torch.manual_seed(seed)
    return SentenceTransformer(modules=[TinyEncoder()], device="cpu")


def columns(model, *cols):
    return [model.preprocess(list(c)) for c in cols]


# ============================================================================================
# the loss from the embeddings
# ============================================================================================

MNRL_CASES = [
    (torch.float32, {}, 0),                                           # defaults: 20, cos_sim
    (torch.float64, {}, 0),
    (torch.float32, {}, 2),                                           # two hard-negative columns
    (torch.float64, dict(scale=1.0, similarity_fct=dot_score), 2),
    (torch.float32, dict(scale=10.0, directions=("query_to_doc", "doc_to_query"),
                         partition_mode="per_direction"), 1),
    (torch.float64, dict(scale=5.0, directions=("doc_to_query", "query_to_doc"),
                         partition_mode="per_direction", similarity_fct=dot_score), 0),
    (torch.float32, dict(hardness_mode="in_batch_negatives", hardness_strength=0.0), 1),
    (torch.float32, dict(gather_across_devices=True), 1),             # one process: local loss
]


@pytest.mark.parametrize("dtype,kw,n_neg", MNRL_CASES)
def test_mnrl_from_embeddings(dtype, kw, n_neg):
    model = static_model()
    embs = [randn(6, 5, seed=s, dtype=dtype) for s in range(2 + n_neg)]
    ours_fn = compat.MultipleNegativesRankingLoss(model, **kw)
    theirs_fn = st_losses.MultipleNegativesRankingLoss(model, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatFallbackWarning)
        ours = ours_fn.compute_loss_from_embeddings(embs, None)
    check(ours, theirs_fn.compute_loss_from_embeddings(embs, None), embs, dtype)
    assert ours_fn.get_config_dict() == theirs_fn.get_config_dict()
    assert isinstance(ours_fn, st_losses.MultipleNegativesRankingLoss)


FALLBACK_CASES = [
    (dict(similarity_fct=euclidean_sim), "euclidean_sim"),
    (dict(directions=("query_to_doc", "query_to_query")), "query_to_query"),
    (dict(directions=("query_to_doc", "doc_to_query")), "partition_mode='joint'"),
    (dict(directions=("query_to_doc", "doc_to_doc"), partition_mode="joint"), "doc_to_doc"),
    (dict(hardness_mode="hard_negatives", hardness_strength=5.0), "hardness_mode"),
]


@pytest.mark.parametrize("kw,match", FALLBACK_CASES)
def test_mnrl_fallback_warns_once_and_equals_st(kw, match):
    model = static_model()
    embs = [randn(6, 5, seed=s) for s in range(3)]
    ours_fn = compat.MultipleNegativesRankingLoss(model, **kw)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        first = ours_fn.compute_loss_from_embeddings(embs, None)
        second = ours_fn.compute_loss_from_embeddings(embs, None)
    fallback = [w for w in rec if issubclass(w.category, CompatFallbackWarning)]
    assert len(fallback) == 1 and match in str(fallback[0].message)
    theirs = st_losses.MultipleNegativesRankingLoss(model, **kw).compute_loss_from_embeddings(
        embs, None)
    torch.testing.assert_close(first, theirs)
    torch.testing.assert_close(second, theirs)


def test_mnrl_needs_two_columns():
    with pytest.raises(ValueError, match="at least 2"):
        compat.MultipleNegativesRankingLoss(static_model()).compute_loss_from_embeddings(
            [randn(3, 2, seed=0)], None)


def test_mnrl_forward_model_gradients():
    # through the model: forward(sentence_features, labels), gradients of the parameters
    model = static_model()
    grads = []
    for cls in (compat.MultipleNegativesRankingLoss, st_losses.MultipleNegativesRankingLoss):
        model.zero_grad()
        loss = cls(model)(columns(model, ANCHORS, POSITIVES, NEGATIVES), None)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], **TOL[torch.float32])
    for a, b in zip(grads[0][1], grads[1][1]):
        close_grads(a, b)


# ============================================================================================
# GradCache
# ============================================================================================


@pytest.mark.parametrize("kw", [{}, dict(scale=10.0, similarity_fct=dot_score),
                                dict(directions=("query_to_doc", "doc_to_query"),
                                     partition_mode="per_direction")])
def test_cached_mnrl_equals_st_cached_with_dropout(kw):
    model = encoder_model()
    model.train()
    results = []
    for cls in (compat.CachedMultipleNegativesRankingLoss,
                st_losses.CachedMultipleNegativesRankingLoss):
        model.zero_grad()
        torch.manual_seed(7)  # the same dropout masks in both runs
        loss_fn = cls(model, mini_batch_size=2, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompatFallbackWarning)
            loss = loss_fn(columns(model, ANCHORS, POSITIVES, NEGATIVES), None)
            loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l_ours, g_ours), (l_theirs, g_theirs) = results
    torch.testing.assert_close(l_ours, l_theirs, **TOL[torch.float32])
    for a, b in zip(g_ours, g_theirs):
        close_grads(a, b)


def test_cached_mnrl_matches_uncached_without_dropout():
    model = encoder_model()
    model.eval()  # no dropout: GradCache gives the plain loss and gradients
    results = []
    for fn in (compat.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4),
               compat.MultipleNegativesRankingLoss(model)):
        model.zero_grad()
        loss = fn(columns(model, ANCHORS, POSITIVES), None)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], **TOL[torch.float32])
    for a, b in zip(results[0][1], results[1][1]):
        close_grads(a, b)


def test_cached_mnrl_fallback():
    model = encoder_model()
    model.eval()
    feats = columns(model, ANCHORS, POSITIVES)
    ours_fn = compat.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4,
                                                        similarity_fct=euclidean_sim)
    with pytest.warns(CompatFallbackWarning, match="euclidean_sim"):
        ours = ours_fn(feats, None)
    theirs = st_losses.CachedMultipleNegativesRankingLoss(
        model, mini_batch_size=4, similarity_fct=euclidean_sim)(columns(model, ANCHORS, POSITIVES),
                                                                None)
    torch.testing.assert_close(ours, theirs)


# ============================================================================================
# SentenceTransformerTrainer
# ============================================================================================


def _train(model, loss, data, tmp_path):
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=3, report_to="none",
        use_cpu=True, save_strategy="no", logging_steps=1, learning_rate=0.1,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args,
                                         train_dataset=Dataset.from_dict(data), loss=loss)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert trainer.state.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_trainer_mnrl_static_embedding(tmp_path):
    model = static_model()
    loss = compat.MultipleNegativesRankingLoss(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatFallbackWarning)
        _train(model, loss, {"anchor": ANCHORS, "positive": POSITIVES, "negative": NEGATIVES},
               tmp_path)


def test_trainer_cached_mnrl(tmp_path):
    model = encoder_model()
    loss = compat.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatFallbackWarning)
        _train(model, loss, {"anchor": ANCHORS, "positive": POSITIVES}, tmp_path)


# ============================================================================================
# gather_across_devices=True on two gloo processes
# ============================================================================================

_WORKER = textwrap.dedent(r'''
    import torch
    from _processes import process_group
    from test_compat_sentence_transformers import (dot_score, encoder_model, st_losses,
                                                   static_model)
    from fastcl.compat import sentence_transformers as compat

    import warnings
    warnings.simplefilter("error", compat.CompatFallbackWarning)  # the fused path, no fallback
    with process_group() as (rank, world):
        models = {"plain": static_model(), "cached": encoder_model()}  # the cached one splits
        g = torch.Generator().manual_seed(300 + rank)
        n, d = 4, 6
        cases = [({}, 0), ({}, 2), (dict(scale=1.0, similarity_fct=dot_score), 1),
                 (dict(scale=10.0, directions=("query_to_doc", "doc_to_query"),
                       partition_mode="per_direction"), 1)]
        for kw, n_neg in cases:
            cols = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2 + n_neg)]
            for ours_cls, theirs_cls in ((compat.MultipleNegativesRankingLoss,
                                          st_losses.MultipleNegativesRankingLoss),
                                         (compat.CachedMultipleNegativesRankingLoss,
                                          st_losses.CachedMultipleNegativesRankingLoss)):
                results = []
                for cls in (ours_cls, theirs_cls):
                    emb = [c.clone().requires_grad_(True) for c in cols]
                    cached = hasattr(cls, "calculate_loss")
                    loss_fn = cls(models["cached" if cached else "plain"],
                                  gather_across_devices=True, **kw)
                    if cached:  # the cached form: lists of mini-batches
                        loss = loss_fn.calculate_loss([[e[:2], e[2:]] for e in emb])
                    else:
                        loss = loss_fn.compute_loss_from_embeddings(emb, None)
                    results.append((loss.detach(), *torch.autograd.grad(loss, emb)))
                for a, b in zip(*results):
                    torch.testing.assert_close(
                        a.to(b.dtype), b, rtol=1e-9, atol=1e-10,
                        msg=lambda m: f"{ours_cls.__name__} {kw} {n_neg}: {m}")
''')


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_gather_across_devices_two_processes(tmp_path):
    """Each process's anchors against every process's positives and hard negatives: the loss
    and the gradients of sentence-transformers' gathered loss, on each rank, both classes."""
    run_ranks(_WORKER, tmp_path)
