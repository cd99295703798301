"""fastcl.reference against the losses of the libraries people use today.

Each peer is compared at its defaults and at a non-default setting, loss and gradients, in fp64
and fp32. Conventions are mapped explicitly:

- open_clip ``ClipLoss`` / ``SigLipLoss`` take the features as given (the model normalizes) and
  an already-exponentiated ``logit_scale``: ``scale = logit_scale``, ``bias = logit_bias``.
- pytorch_metric_learning and lightly normalize inside the loss (cosine similarity) and divide by
  a temperature: the reference gets ``F.normalize(z)`` and ``scale = 1 / temperature``; gradients
  are compared w.r.t. the raw embeddings, through the normalization.
- pml ``NTXentLoss`` is one term per positive pair, with the other positives out of the
  denominator; with exactly one positive per anchor (the two-view layout) it is NT-Xent.
- pml reducers average over the non-zero per-anchor losses, i.e. over anchors with a positive.

A peer that is not installed is skipped.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastcl.reference import dcl_ref, info_nce_ref, nt_xent_ref, siglip_ref, supcon_ref

DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def randn(*shape, seed, dtype, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(
        requires_grad)


def check(ours, theirs, inputs, dtype):
    """Loss values and gradients w.r.t. ``inputs`` agree within the dtype's tolerance."""
    tol = TOL[dtype]
    torch.testing.assert_close(ours.to(theirs.dtype), theirs, **tol)
    g_ours = torch.autograd.grad(ours, inputs)
    g_theirs = torch.autograd.grad(theirs, inputs)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a.to(b.dtype), b, **tol)


# ============================================================================================
# open_clip
# ============================================================================================


class TestOpenClip:
    @pytest.fixture(autouse=True)
    def _peer(self):
        self.loss = pytest.importorskip("open_clip.loss")

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_clip_loss_defaults(self, dtype):
        # open_clip's init: logit_scale = log(1 / 0.07), used as logit_scale.exp(); unit features
        img = F.normalize(randn(8, 6, seed=1, dtype=dtype), dim=-1).detach().requires_grad_(True)
        txt = F.normalize(randn(8, 6, seed=2, dtype=dtype), dim=-1).detach().requires_grad_(True)
        log_scale = torch.tensor(math.log(1 / 0.07), dtype=dtype, requires_grad=True)
        theirs = self.loss.ClipLoss()(img, txt, log_scale.exp())
        ours = info_nce_ref(img, txt, scale=log_scale.exp(), symmetric=True)
        check(ours, theirs, [img, txt, log_scale], dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_clip_loss_bias_raw_features(self, dtype):
        img = randn(7, 5, seed=3, dtype=dtype)
        txt = randn(7, 5, seed=4, dtype=dtype)
        log_scale = torch.tensor(math.log(3.0), dtype=dtype, requires_grad=True)
        bias = torch.tensor(-0.7, dtype=dtype, requires_grad=True)
        theirs = self.loss.ClipLoss()(img, txt, log_scale.exp(), logit_bias=bias)
        ours = info_nce_ref(img, txt, scale=log_scale.exp(), bias=bias, symmetric=True)
        check(ours, theirs, [img, txt, log_scale, bias], dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_siglip_defaults(self, dtype):
        # SigLIP's init: logit_scale = log(10), logit_bias = -10; unit features
        x = F.normalize(randn(8, 6, seed=5, dtype=dtype), dim=-1).detach().requires_grad_(True)
        y = F.normalize(randn(8, 6, seed=6, dtype=dtype), dim=-1).detach().requires_grad_(True)
        log_scale = torch.tensor(math.log(10.0), dtype=dtype, requires_grad=True)
        bias = torch.tensor(-10.0, dtype=dtype, requires_grad=True)
        theirs = self.loss.SigLipLoss()(x, y, log_scale.exp(), bias)
        ours = siglip_ref(x, y, scale=log_scale.exp(), bias=bias)
        check(ours, theirs, [x, y, log_scale, bias], dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_siglip_other_scale_bias_raw_features(self, dtype):
        x = randn(9, 4, seed=7, dtype=dtype)
        y = randn(9, 4, seed=8, dtype=dtype)
        log_scale = torch.tensor(math.log(2.5), dtype=dtype, requires_grad=True)
        bias = torch.tensor(1.5, dtype=dtype, requires_grad=True)
        theirs = self.loss.SigLipLoss()(x, y, log_scale.exp(), bias)
        ours = siglip_ref(x, y, scale=log_scale.exp(), bias=bias)
        check(ours, theirs, [x, y, log_scale, bias], dtype)


# ============================================================================================
# pytorch_metric_learning
# ============================================================================================


class TestPML:
    @pytest.fixture(autouse=True)
    def _peer(self):
        self.losses = pytest.importorskip("pytorch_metric_learning.losses")

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("temperature", [None, 0.5])  # None: pml's default (0.07)
    def test_ntxent_pairs_layout(self, dtype, temperature):
        kwargs = {} if temperature is None else dict(temperature=temperature)
        loss_fn = self.losses.NTXentLoss(**kwargs)
        z1 = randn(6, 5, seed=10, dtype=dtype)
        z2 = randn(6, 5, seed=11, dtype=dtype)
        labels = torch.arange(6).repeat(2)
        theirs = loss_fn(torch.cat([z1, z2]), labels)
        ours = nt_xent_ref(F.normalize(z1, dim=1), F.normalize(z2, dim=1),
                           scale=1 / loss_fn.temperature)
        check(ours, theirs, [z1, z2], dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_self_supervised_wrapper_symmetric(self, dtype):
        loss_fn = self.losses.SelfSupervisedLoss(self.losses.NTXentLoss())
        z1 = randn(5, 4, seed=12, dtype=dtype)
        z2 = randn(5, 4, seed=13, dtype=dtype)
        theirs = loss_fn(z1, z2)
        ours = nt_xent_ref(F.normalize(z1, dim=1), F.normalize(z2, dim=1), scale=1 / 0.07)
        check(ours, theirs, [z1, z2], dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_self_supervised_wrapper_one_direction(self, dtype):
        # symmetric=False: anchors are the embeddings, candidates the ref_emb: InfoNCE q -> k
        loss_fn = self.losses.SelfSupervisedLoss(self.losses.NTXentLoss(temperature=0.2),
                                                 symmetric=False)
        z1 = randn(7, 4, seed=14, dtype=dtype)
        z2 = randn(7, 4, seed=15, dtype=dtype)
        theirs = loss_fn(z1, z2)
        ours = info_nce_ref(F.normalize(z1, dim=1), F.normalize(z2, dim=1), scale=1 / 0.2)
        check(ours, theirs, [z1, z2], dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_supcon_defaults_with_singletons(self, dtype):
        # one view, labels with singleton classes (anchors without positives)
        loss_fn = self.losses.SupConLoss()
        emb = randn(9, 5, seed=16, dtype=dtype)
        labels = torch.tensor([0, 1, 0, 2, 1, 3, 0, 4, 2])
        theirs = loss_fn(emb, labels)
        ours = supcon_ref(F.normalize(emb, dim=1), labels, scale=1 / 0.1)
        check(ours, theirs, [emb], dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_supcon_two_views_other_temperature(self, dtype):
        loss_fn = self.losses.SupConLoss(temperature=0.3)
        feats = randn(6, 2, 4, seed=17, dtype=dtype)
        labels = torch.tensor([0, 1, 0, 2, 1, 3])
        # pml takes the flattened rows; view-major as in the reference
        theirs = loss_fn(torch.cat(torch.unbind(feats, dim=1)), labels.repeat(2))
        ours = supcon_ref(F.normalize(feats, dim=-1), labels, scale=1 / 0.3)
        check(ours, theirs, [feats], dtype)


# ============================================================================================
# lightly
# ============================================================================================


class TestLightly:
    @pytest.fixture(autouse=True)
    def _peer(self):
        self.loss = pytest.importorskip("lightly.loss")

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("temperature", [None, 0.1])  # None: lightly's default (0.5)
    def test_ntxent(self, dtype, temperature):
        loss_fn = self.loss.NTXentLoss() if temperature is None else \
            self.loss.NTXentLoss(temperature=temperature)
        z1 = randn(6, 5, seed=20, dtype=dtype)
        z2 = randn(6, 5, seed=21, dtype=dtype)
        theirs = loss_fn(z1, z2)
        ours = nt_xent_ref(F.normalize(z1, dim=1), F.normalize(z2, dim=1),
                           scale=1 / loss_fn.temperature)
        check(ours, theirs, [z1, z2], dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_ntxent_memory_bank(self, dtype):
        # MoCo mode: row i sees its own positive and the bank only (not the other keys), so it
        # is a one-row InfoNCE with the bank as extra negatives
        K, D = 10, 5
        loss_fn = self.loss.NTXentLoss(temperature=0.2, memory_bank_size=(K, D))
        bank = F.normalize(randn(K, D, seed=22, dtype=dtype, requires_grad=False), dim=1)
        loss_fn.memory_bank.bank = bank.clone()
        z1 = randn(4, D, seed=23, dtype=dtype)
        z2 = randn(4, D, seed=24, dtype=dtype)
        theirs = loss_fn(z1, z2)
        q, k = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        ours = torch.stack([
            info_nce_ref(q[i:i + 1], k[i:i + 1], negatives=bank, scale=1 / 0.2)
            for i in range(4)
        ]).mean()
        check(ours, theirs, [z1, z2], dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("temperature", [None, 0.5])  # None: lightly's default (0.1)
    def test_dcl(self, dtype, temperature):
        loss_fn = self.loss.DCLLoss() if temperature is None else \
            self.loss.DCLLoss(temperature=temperature)
        z1 = randn(6, 5, seed=25, dtype=dtype)
        z2 = randn(6, 5, seed=26, dtype=dtype)
        theirs = loss_fn(z1, z2)
        ours = dcl_ref(F.normalize(z1, dim=1), F.normalize(z2, dim=1),
                       scale=1 / loss_fn.temperature)
        check(ours, theirs, [z1, z2], dtype)

    @pytest.mark.filterwarnings("ignore::UserWarning")
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("temperature,sigma", [(None, None), (0.3, 0.8)])  # defaults 0.1, 0.5
    def test_dclw(self, dtype, temperature, sigma):
        if temperature is None:
            loss_fn, temperature, sigma = self.loss.DCLWLoss(), 0.1, 0.5
        else:
            loss_fn = self.loss.DCLWLoss(temperature=temperature, sigma=sigma)
        z1 = randn(6, 5, seed=27, dtype=dtype)
        z2 = randn(6, 5, seed=28, dtype=dtype)
        theirs = loss_fn(z1, z2)
        ours = dcl_ref(F.normalize(z1, dim=1), F.normalize(z2, dim=1), scale=1 / temperature,
                       weighted=True, sigma=sigma)
        check(ours, theirs, [z1, z2], dtype)
