"""Tests of fastcl.reference: gradients, identities between losses, independent formulas.

Every reference is checked against something written differently: F.cross_entropy on the
materialized logits, per-row Python loops, closed forms, or re-implementations of the authors'
code. Shapes are small on purpose (fp64 gradcheck).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from fastcl.reference import (
    alignment_ref,
    contrastive_masks_ref,
    contrastive_stats_ref,
    dcl_ref,
    hard_negative_nce_ref,
    info_nce_ref,
    multiview_ref,
    nt_xent_ref,
    siglip_ref,
    supcon_ref,
    topk_similarity_ref,
    uniformity_ref,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=F64, requires_grad=False):
    x = torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype)
    return x.requires_grad_(requires_grad)


def unit(*shape, seed=0, dtype=F64, requires_grad=False):
    x = F.normalize(torch.randn(*shape, generator=_gen(seed), dtype=torch.float64), dim=-1)
    return x.to(dtype).requires_grad_(requires_grad)


def scalar(value, requires_grad=True):
    return torch.tensor(float(value), dtype=F64, requires_grad=requires_grad)


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=False)


def assert_close(a, b, rtol=1e-10, atol=1e-10):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def assert_all_close(xs, ys, rtol=1e-10, atol=1e-10):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert_close(x, y, rtol=rtol, atol=atol)


def gc(fn, inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# ============================================================================================
# gradcheck (fp64) for every loss: features, scale and bias
# ============================================================================================


class TestGradcheck:
    def test_info_nce_targets_smoothing_negatives(self):
        q = randn(5, 3, seed=1, requires_grad=True)
        k = randn(6, 3, seed=2, requires_grad=True)
        neg = randn(4, 3, seed=3, requires_grad=True)
        a, b = scalar(1.7), scalar(0.3)
        t = torch.tensor([2, -1, 0, 9, 5])
        for red in ("mean", "none"):
            gc(lambda q, k, neg, a, b: info_nce_ref(
                q, k, scale=a, bias=b, targets=t, negatives=neg, label_smoothing=0.1,
                reduction=red), (q, k, neg, a, b))

    def test_info_nce_default_targets(self):
        q = randn(4, 5, seed=4, requires_grad=True)
        k = randn(7, 5, seed=5, requires_grad=True)
        a = scalar(2.3)
        gc(lambda q, k, a: info_nce_ref(q, k, scale=a, reduction="sum"), (q, k, a))

    def test_info_nce_symmetric(self):
        q = randn(5, 3, seed=6, requires_grad=True)
        k = randn(5, 3, seed=7, requires_grad=True)
        neg = randn(2, 3, seed=8, requires_grad=True)
        a, b = scalar(1.3), scalar(-0.4)
        gc(lambda q, k, neg, a, b: info_nce_ref(
            q, k, scale=a, bias=b, negatives=neg, symmetric=True, symmetric_weight=0.75,
            label_smoothing=0.2), (q, k, neg, a, b))

    def test_nt_xent(self):
        z1 = randn(4, 3, seed=9, requires_grad=True)
        z2 = randn(4, 3, seed=10, requires_grad=True)
        a = scalar(1.5)
        gc(lambda z1, z2, a: nt_xent_ref(z1, z2, scale=a), (z1, z2, a))
        gc(lambda z1, z2, a: nt_xent_ref(z1, z2, scale=a, reduction="none"), (z1, z2, a))

    @pytest.mark.parametrize("variant", ["out", "in"])
    def test_supcon(self, variant):
        f = randn(5, 2, 3, seed=11, requires_grad=True)
        labels = torch.tensor([0, 1, 0, 2, 1])
        a = scalar(1.8)
        gc(lambda f, a: supcon_ref(f, labels, scale=a, variant=variant), (f, a))
        gc(lambda f, a: supcon_ref(f, labels, scale=a, variant=variant, base_temperature=0.07,
                                   reduction="none"), (f, a))

    def test_supcon_single_view_with_singletons(self):
        f = randn(6, 4, seed=12, requires_grad=True)
        labels = torch.tensor([0, 1, 0, 2, 3, 0])
        a = scalar(0.9)
        for variant in ("out", "in"):
            gc(lambda f, a: supcon_ref(f, labels, scale=a, variant=variant), (f, a))

    @pytest.mark.parametrize("method,cmc_mode", [
        ("mv_infonce", "full"), ("mv_dhel", "full"), ("cmc", "full"), ("cmc", "core")])
    def test_multiview(self, method, cmc_mode):
        v = randn(3, 4, 3, seed=13, requires_grad=True)
        a = scalar(1.4)
        gc(lambda v, a: multiview_ref(v, scale=a, method=method, cmc_mode=cmc_mode), (v, a))

    @pytest.mark.parametrize("layout", ["two_view", "paired"])
    @pytest.mark.parametrize("beta,tau_plus", [(0.0, 0.0), (1.0, 0.0), (0.5, 0.1), (1.0, 0.6)])
    def test_hard_negative(self, layout, beta, tau_plus):
        z1 = randn(4, 3, seed=14, requires_grad=True)
        z2 = randn(4, 3, seed=15, requires_grad=True)
        a = scalar(1.2)
        gc(lambda z1, z2, a: hard_negative_nce_ref(
            z1, z2, scale=a, beta=beta, tau_plus=tau_plus, layout=layout), (z1, z2, a))

    def test_dcl(self):
        z1 = randn(4, 3, seed=16, requires_grad=True)
        z2 = randn(4, 3, seed=17, requires_grad=True)
        a = scalar(1.6)
        gc(lambda z1, z2, a: dcl_ref(z1, z2, scale=a), (z1, z2, a))

    def test_dclw_scale(self):
        # The DCLW weight is detached and depends on z only: gradcheck w.r.t. the scale.
        z1 = randn(4, 3, seed=18)
        z2 = randn(4, 3, seed=19)
        a = scalar(1.6)
        gc(lambda a: dcl_ref(z1, z2, scale=a, weighted=True, sigma=0.7), (a,))

    def test_siglip(self):
        x = randn(4, 3, seed=20, requires_grad=True)
        y = randn(4, 3, seed=21, requires_grad=True)
        a, b = scalar(2.0), scalar(-1.5)
        for red in ("mean", "none"):
            gc(lambda x, y, a, b: siglip_ref(x, y, scale=a, bias=b, reduction=red), (x, y, a, b))

    def test_alignment_uniformity(self):
        x = randn(5, 3, seed=22, requires_grad=True)
        y = randn(5, 3, seed=23, requires_grad=True)
        gc(lambda x, y: alignment_ref(x, y), (x, y))
        gc(lambda x, y: alignment_ref(x, y, alpha=3), (x, y))
        gc(lambda x: uniformity_ref(x), (x,))
        gc(lambda x: uniformity_ref(x, t=0.5), (x,))


# ============================================================================================
# InfoNCE identities
# ============================================================================================


class TestInfoNCE:
    @pytest.mark.parametrize("smoothing", [0.0, 0.15])
    @pytest.mark.parametrize("with_neg", [False, True])
    def test_equals_cross_entropy(self, smoothing, with_neg):
        q = randn(6, 4, seed=30, requires_grad=True)
        k = randn(8, 4, seed=31, requires_grad=True)
        neg = randn(3, 4, seed=32, requires_grad=True) if with_neg else None
        a, b = scalar(2.5), scalar(0.7)
        t = torch.tensor([3, -1, 0, 10 if with_neg else 7, 5, -1])
        cols = torch.cat([k, neg]) if with_neg else k
        for red in ("mean", "sum", "none"):
            ours = info_nce_ref(q, k, scale=a, bias=b, targets=t, negatives=neg,
                                label_smoothing=smoothing, reduction=red)
            logits = a * q @ cols.T + b
            ce = F.cross_entropy(logits, t, ignore_index=-1, label_smoothing=smoothing,
                                 reduction=red)
            assert ours.shape == ce.shape
            assert_close(ours, ce)
            inputs = [q, k, a] + ([neg] if with_neg else [])
            assert_all_close(grads(ours.sum(), inputs), grads(ce.sum(), inputs))

    def test_default_targets_and_bias_has_no_gradient(self):
        q = randn(4, 3, seed=33, requires_grad=True)
        k = randn(6, 3, seed=34, requires_grad=True)
        a, b = scalar(3.0), scalar(1.0)
        ours = info_nce_ref(q, k, scale=a, bias=b)
        ce = F.cross_entropy(a * q @ k.T, torch.arange(4))
        assert_close(ours, ce)
        (gb,) = grads(ours, [b])
        assert abs(gb.item()) < 1e-12

    def test_scale_float_equals_tensor(self):
        q, k = randn(4, 3, seed=35), randn(4, 3, seed=36)
        assert_close(info_nce_ref(q, k, scale=2.0), info_nce_ref(q, k, scale=torch.tensor(2.0)))
        assert_close(info_nce_ref(q, k, scale=2.0), info_nce_ref(q, k, scale=torch.tensor([2.0])))

    @pytest.mark.parametrize("w", [0.5, 0.75])
    @pytest.mark.parametrize("smoothing", [0.0, 0.1])
    def test_symmetric_is_weighted_mean_of_directions(self, w, smoothing):
        q = randn(5, 4, seed=37, requires_grad=True)
        k = randn(5, 4, seed=38, requires_grad=True)
        a = scalar(1.9)
        logits = a * q @ k.T
        t = torch.arange(5)
        row = F.cross_entropy(logits, t, label_smoothing=smoothing, reduction="none")
        col = F.cross_entropy(logits.T, t, label_smoothing=smoothing, reduction="none")
        ours = info_nce_ref(q, k, scale=a, symmetric=True, symmetric_weight=w,
                            label_smoothing=smoothing)
        expected = w * row.mean() + (1 - w) * col.mean()
        assert_close(ours, expected)
        assert_all_close(grads(ours, [q, k, a]), grads(expected, [q, k, a]))
        # the one-directional pieces
        assert_close(info_nce_ref(q, k, scale=a, label_smoothing=smoothing), row.mean())
        assert_close(info_nce_ref(k, q, scale=a, label_smoothing=smoothing), col.mean())
        none = info_nce_ref(q, k, scale=a, symmetric=True, symmetric_weight=w,
                            label_smoothing=smoothing, reduction="none")
        assert_close(none, w * row + (1 - w) * col)
        summed = info_nce_ref(q, k, scale=a, symmetric=True, symmetric_weight=w,
                              label_smoothing=smoothing, reduction="sum")
        assert_close(summed, (w * row + (1 - w) * col).sum())

    def test_symmetric_negatives_only_in_row_direction(self):
        q = randn(4, 3, seed=39, requires_grad=True)
        k = randn(4, 3, seed=40, requires_grad=True)
        neg = randn(5, 3, seed=41, requires_grad=True)
        a = scalar(1.1)
        t = torch.arange(4)
        row = F.cross_entropy(a * q @ torch.cat([k, neg]).T, t)
        col = F.cross_entropy(a * k @ q.T, t)
        ours = info_nce_ref(q, k, scale=a, negatives=neg, symmetric=True)
        assert_close(ours, 0.5 * row + 0.5 * col)
        assert_all_close(grads(ours, [q, k, neg, a]), grads(0.5 * row + 0.5 * col, [q, k, neg, a]))

    def test_all_targets_ignored(self):
        q = randn(3, 2, seed=42, requires_grad=True)
        k = randn(4, 2, seed=43, requires_grad=True)
        t = torch.full((3,), -1)
        loss = info_nce_ref(q, k, scale=2.0, targets=t)
        assert loss.item() == 0.0
        gq, gk = grads(loss, [q, k])
        assert torch.all(gq == 0) and torch.all(gk == 0)
        none = info_nce_ref(q, k, scale=2.0, targets=torch.tensor([1, -1, 0]), reduction="none")
        assert none[1].item() == 0.0 and torch.isfinite(none).all()

    def test_bad_arguments(self):
        q, k = randn(4, 3), randn(3, 3)
        with pytest.raises(ValueError):
            info_nce_ref(q, k, scale=1.0)  # N > M with default targets
        with pytest.raises(ValueError):
            info_nce_ref(q, q, scale=1.0, reduction="avg")
        with pytest.raises(ValueError):
            info_nce_ref(q, randn(4, 2), scale=1.0)
        with pytest.raises(ValueError):
            info_nce_ref(q, k, scale=1.0, targets=torch.tensor([0, 1, 2, 3]))  # out of range
        with pytest.raises(ValueError):
            info_nce_ref(q, k, scale=1.0, symmetric=True, targets=torch.tensor([0, 1, 2, 0]))
        with pytest.raises(ValueError):
            info_nce_ref(q, k, scale=1.0, targets=torch.tensor([0.0, 1.0, 2.0, 0.0]))
        with pytest.raises(ValueError):
            info_nce_ref(q, q, scale=torch.ones(2))
        with pytest.raises(ValueError):
            info_nce_ref(q[0], q, scale=1.0)


# ============================================================================================
# NT-Xent, SupCon
# ============================================================================================


def _nt_xent_loop(z1, z2, a):
    Z = torch.cat([z1, z2])
    n2 = Z.shape[0]
    losses = []
    for i in range(n2):
        p = (i + n2 // 2) % n2
        others = torch.stack([a * Z[i] @ Z[j] for j in range(n2) if j != i])
        losses.append(torch.logsumexp(others, 0) - a * Z[i] @ Z[p])
    return torch.stack(losses)


def _supcon_loop(features, labels, a, variant):
    """Direct per-anchor formula of SupCon (L_out / L_in) with Python loops."""
    N, V, _ = features.shape
    rows = [features[r % N, r // N] for r in range(N * V)]
    lab = [int(labels[r % N]) for r in range(N * V)]
    out = []
    for r in range(N * V):
        others = [j for j in range(N * V) if j != r]
        positives = [p for p in others if lab[p] == lab[r]]
        if not positives:
            out.append(features.new_zeros(()))
            continue
        lse = torch.logsumexp(torch.stack([a * rows[r] @ rows[j] for j in others]), 0)
        sp = torch.stack([a * rows[r] @ rows[p] for p in positives])
        if variant == "out":
            out.append(lse - sp.mean())
        else:
            out.append(lse - torch.logsumexp(sp, 0) + math.log(len(positives)))
    return torch.stack(out)


def _hobbitlong_supcon(features, labels, temperature, base_temperature):
    """Re-implementation of HobbitLong/SupContrast losses.py SupConLoss.forward
    (contrast_mode='all', labels given)."""
    batch_size = features.shape[0]
    labels = labels.contiguous().view(-1, 1)
    mask = torch.eq(labels, labels.T).to(features.dtype)
    contrast_count = features.shape[1]
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor_feature = contrast_feature
    anchor_count = contrast_count
    anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(
        torch.ones_like(mask), 1, torch.arange(batch_size * anchor_count).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, 1, mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, batch_size).mean()


class TestNTXentSupCon:
    def test_nt_xent_vs_loop(self):
        z1 = randn(5, 3, seed=50, requires_grad=True)
        z2 = randn(5, 3, seed=51, requires_grad=True)
        a = scalar(1.7)
        ours = nt_xent_ref(z1, z2, scale=a, reduction="none")
        loop = _nt_xent_loop(z1, z2, a)
        assert ours.shape == (10,)
        assert_close(ours, loop)
        assert_all_close(grads(ours.sum(), [z1, z2, a]), grads(loop.sum(), [z1, z2, a]))
        assert_close(nt_xent_ref(z1, z2, scale=a), loop.mean())
        assert_close(nt_xent_ref(z1, z2, scale=a, reduction="sum"), loop.sum())

    def test_nt_xent_equals_cross_entropy_with_masked_diagonal(self):
        z1, z2 = randn(6, 4, seed=52), randn(6, 4, seed=53)
        Z = torch.cat([z1, z2])
        logits = (Z @ Z.T / 0.3).masked_fill(torch.eye(12, dtype=torch.bool), float("-inf"))
        t = (torch.arange(12) + 6) % 12
        assert_close(nt_xent_ref(z1, z2, scale=1 / 0.3), F.cross_entropy(logits, t))

    def test_supcon_out_two_views_no_labels_is_nt_xent(self):
        z1 = randn(5, 4, seed=54, requires_grad=True)
        z2 = randn(5, 4, seed=55, requires_grad=True)
        a = scalar(2.2)
        sc = supcon_ref(torch.stack([z1, z2], dim=1), scale=a, reduction="none")
        nt = nt_xent_ref(z1, z2, scale=a, reduction="none")
        assert_close(sc, nt)
        sc_m = supcon_ref(torch.stack([z1, z2], dim=1), scale=a)
        nt_m = nt_xent_ref(z1, z2, scale=a)
        assert_close(sc_m, nt_m)
        assert_all_close(grads(sc_m, [z1, z2, a]), grads(nt_m, [z1, z2, a]))

    @pytest.mark.parametrize("variant", ["out", "in"])
    def test_supcon_vs_direct_formula(self, variant):
        f = randn(6, 3, 4, seed=56, requires_grad=True)
        labels = torch.tensor([0, 1, 0, 2, 1, 0])
        a = scalar(1.3)
        ours = supcon_ref(f, labels, scale=a, variant=variant, reduction="none")
        loop = _supcon_loop(f, labels, a, variant)
        assert ours.shape == (18,)
        assert_close(ours, loop)
        assert_all_close(grads(ours.sum(), [f, a]), grads(loop.sum(), [f, a]))

    def test_supcon_in_differs_from_out(self):
        f = randn(6, 2, 4, seed=57)
        labels = torch.tensor([0, 1, 0, 1, 0, 1])
        assert not torch.allclose(supcon_ref(f, labels, scale=2.0, variant="in"),
                                  supcon_ref(f, labels, scale=2.0, variant="out"))

    def test_supcon_view_major_ordering(self):
        f = randn(4, 2, 3, seed=58)
        labels = torch.tensor([0, 0, 1, 2])
        none = supcon_ref(f, labels, scale=1.0, reduction="none")
        # row r = view r // N of sample r % N: sample 3 (a singleton label) has one positive
        # (its other view); rows 3 and 7 are its two views.
        flat = torch.cat([f[:, 0], f[:, 1]])
        s = flat @ flat.T
        r = 3
        others = [j for j in range(8) if j != r]
        expected = torch.logsumexp(s[r, others], 0) - s[r, 7]
        assert_close(none[r], expected)

    def test_supcon_no_positive_anchors(self):
        f = randn(5, 4, seed=59, requires_grad=True)  # V = 1
        labels = torch.tensor([0, 1, 0, 2, 3])  # rows 1, 3, 4 have no positive
        a = scalar(3.0)
        for variant in ("out", "in"):
            none = supcon_ref(f, labels, scale=a, variant=variant, reduction="none")
            assert torch.all(none[[1, 3, 4]] == 0)
            mean = supcon_ref(f, labels, scale=a, variant=variant)
            assert_close(mean, none.sum() / 2)
            gf, ga = grads(mean, [f, a])
            assert torch.isfinite(gf).all() and torch.isfinite(ga).all()
            assert torch.all(gf[[1, 3, 4]] != 0)  # still used as negatives by rows 0 and 2
        # nobody has a positive: loss 0, zero gradient, no NaN
        for variant in ("out", "in"):
            loss = supcon_ref(f, scale=a, variant=variant)
            gf, ga = grads(loss, [f, a])
            assert loss.item() == 0.0 and torch.all(gf == 0) and ga.item() == 0.0
        # a single row (empty denominator)
        one = randn(1, 4, seed=60, requires_grad=True)
        loss = supcon_ref(one, scale=a)
        (g,) = grads(loss, [one])
        assert loss.item() == 0.0 and torch.isfinite(g).all()

    def test_supcon_base_temperature(self):
        f = randn(5, 2, 3, seed=61, requires_grad=True)
        labels = torch.tensor([0, 1, 0, 2, 1])
        a = scalar(1 / 0.2)
        plain = supcon_ref(f, labels, scale=a)
        scaled = supcon_ref(f, labels, scale=a, base_temperature=0.07)
        factor = (1 / a) / 0.07
        assert_close(scaled, plain * factor)
        assert_all_close(grads(scaled, [f, a]), grads(plain * factor, [f, a]))

    def test_supcon_matches_hobbitlong(self):
        f = F.normalize(randn(6, 2, 5, seed=62), dim=-1).requires_grad_(True)
        labels = torch.tensor([0, 1, 0, 2, 1, 3])
        ours = supcon_ref(f, labels, scale=1 / 0.1, base_temperature=0.07)
        theirs = _hobbitlong_supcon(f, labels, 0.1, 0.07)
        assert_close(ours, theirs)
        assert_all_close(grads(ours, [f]), grads(theirs, [f]))

    def test_supcon_bad_arguments(self):
        f = randn(4, 2, 3)
        with pytest.raises(ValueError):
            supcon_ref(f, scale=1.0, variant="both")
        with pytest.raises(ValueError):
            supcon_ref(f, torch.tensor([0, 1]), scale=1.0)
        with pytest.raises(ValueError):
            supcon_ref(randn(4), scale=1.0)
        with pytest.raises(ValueError):
            nt_xent_ref(randn(4, 3), randn(5, 3), scale=1.0)


# ============================================================================================
# Multi-view losses
# ============================================================================================


def _authors_mvinfonce(z, tau, k_views):
    """Re-implementation of pakoromilas/Multi-View-CL models/losses.py MVINFONCE.forward
    (non-distributed path); z is [k_views * n, d], view-major."""
    n, d = z.shape
    z = F.normalize(z, p=2, dim=1)
    n_real = int(n / k_views)
    views = [z[i * n_real:(i + 1) * n_real] for i in range(k_views)]
    neg_sim = torch.exp(torch.mm(z, z.t().contiguous()) / tau)
    mask = (torch.ones_like(neg_sim) - torch.eye(n)).bool()
    neg_sim = neg_sim.masked_select(mask).view(n, -1)
    neg_sims = torch.split(neg_sim, n_real)
    neg_sims = torch.cat(neg_sims, dim=1)
    neg_sim = neg_sims.sum(dim=-1)
    views = torch.stack(views)
    all_products = torch.einsum("ind,jnd->ijnd", views, views)
    mask = torch.triu(torch.ones(k_views, k_views), diagonal=1).bool()
    pos_prods = all_products[mask].reshape(-1, n_real, d)
    pos_sim = torch.exp(torch.sum(pos_prods, dim=-1) / tau)
    pos_sim = 2 * torch.sum(pos_sim, dim=0)
    return -(torch.log(pos_sim / neg_sim)).mean()


def _authors_mvdhel(z, tau, k_views):
    """Re-implementation of pakoromilas/Multi-View-CL models/losses.py MVDHEL.forward
    (non-distributed, pwe=False, average=False)."""
    z = F.normalize(z, p=2, dim=1)
    n, d = z.shape
    n_real = int(n / k_views)
    views = [z[i * n_real:(i + 1) * n_real] for i in range(k_views)]
    neg_sims = []
    for z_current in views:
        sim_matrix = torch.exp(torch.mm(z_current, z_current.t().contiguous()) / tau)
        mask = (torch.ones_like(sim_matrix) - torch.eye(n_real)).bool()
        sim_matrix = sim_matrix.masked_select(mask).view(n_real, -1)
        neg_sims.append(sim_matrix.sum(dim=-1))
    neg_sims = torch.stack(neg_sims)
    views = torch.stack(views)
    all_products = torch.einsum("ind,jnd->ijnd", views, views)
    mask = torch.triu(torch.ones(k_views, k_views), diagonal=1).bool()
    pos_prods = all_products[mask].reshape(-1, n_real, d)
    pos_prods = torch.exp(torch.sum(pos_prods, dim=-1) / tau)
    pos_sim = torch.sum(pos_prods, dim=0)
    return -(torch.log(pos_sim / torch.prod(neg_sims, dim=0))).mean()


def _mv_infonce_two_views_closed_form(z1, z2, a):
    """V = 2: c_i = log(d(i1) + d(i2)) - log 2 - s(i1, i2), d(r) = sum_{c != r} exp s_rc."""
    Z = torch.cat([z1, z2])
    N = z1.shape[0]
    s = a * Z @ Z.T
    terms = []
    for i in range(N):
        d1 = torch.logsumexp(torch.stack([s[i, c] for c in range(2 * N) if c != i]), 0)
        d2 = torch.logsumexp(torch.stack([s[N + i, c] for c in range(2 * N) if c != N + i]), 0)
        terms.append(torch.logaddexp(d1, d2) - math.log(2.0) - s[i, N + i])
    return torch.stack(terms)


class TestMultiView:
    @pytest.mark.parametrize("tau", [0.1, 0.5])
    @pytest.mark.parametrize("V", [2, 3, 4])
    def test_mv_infonce_matches_authors(self, tau, V):
        z = randn(V * 5, 6, seed=70 + V, requires_grad=True)
        theirs = _authors_mvinfonce(z, tau, V)
        ours = multiview_ref(F.normalize(z, dim=1).reshape(V, 5, 6), scale=1 / tau)
        assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
        assert_all_close(grads(ours, [z]), grads(theirs, [z]), rtol=1e-9, atol=1e-9)

    @pytest.mark.parametrize("tau", [0.1, 0.5])
    @pytest.mark.parametrize("V", [2, 3, 4])
    def test_mv_dhel_matches_authors(self, tau, V):
        z = randn(V * 5, 6, seed=80 + V, requires_grad=True)
        theirs = _authors_mvdhel(z, tau, V)
        ours = multiview_ref(F.normalize(z, dim=1).reshape(V, 5, 6), scale=1 / tau,
                             method="mv_dhel")
        assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
        assert_all_close(grads(ours, [z]), grads(theirs, [z]), rtol=1e-9, atol=1e-9)

    def test_mv_infonce_two_views_is_not_nt_xent_but_closed_form(self):
        z1 = randn(5, 4, seed=90, requires_grad=True)
        z2 = randn(5, 4, seed=91, requires_grad=True)
        a = scalar(1.5)
        mv = multiview_ref(torch.stack([z1, z2]), scale=a, reduction="none")
        closed = _mv_infonce_two_views_closed_form(z1, z2, a)
        assert mv.shape == (5,)
        assert_close(mv, closed)
        assert_all_close(grads(mv.sum(), [z1, z2, a]), grads(closed.sum(), [z1, z2, a]))
        nt = nt_xent_ref(z1, z2, scale=a)
        assert abs(mv.mean().item() - nt.item()) > 1e-3

    @pytest.mark.parametrize("mode", ["full", "core"])
    def test_cmc_is_sum_of_pairwise_infonce(self, mode):
        v = randn(4, 5, 3, seed=92, requires_grad=True)
        a = scalar(1.2)
        pairs = [(l, m) for l in range(4) for m in range(l + 1, 4)] if mode == "full" else \
            [(0, m) for m in range(1, 4)]
        t = torch.arange(5)
        per_sample = sum(
            F.cross_entropy(a * v[l] @ v[m].T, t, reduction="none")
            + F.cross_entropy(a * v[m] @ v[l].T, t, reduction="none")
            for l, m in pairs
        )
        ours_none = multiview_ref(v, scale=a, method="cmc", cmc_mode=mode, reduction="none")
        assert_close(ours_none, per_sample)
        ours = multiview_ref(v, scale=a, method="cmc", cmc_mode=mode)
        assert_close(ours, per_sample.mean())
        assert_all_close(grads(ours, [v, a]), grads(per_sample.mean(), [v, a]))
        assert_close(multiview_ref(v, scale=a, method="cmc", cmc_mode=mode, reduction="sum"),
                     per_sample.sum())

    def test_mv_dhel_direct_formula(self):
        v = randn(3, 4, 2, seed=93)
        a = 1.7
        V, N = 3, 4
        expected = []
        for i in range(N):
            unif = sum(
                torch.logsumexp(torch.stack([a * v[l, i] @ v[l, j] for j in range(N) if j != i]), 0)
                for l in range(V))
            align = torch.logsumexp(torch.stack(
                [a * v[l, i] @ v[m, i] for l in range(V) for m in range(l + 1, V)]), 0)
            expected.append(unif - align)
        assert_close(multiview_ref(v, scale=a, method="mv_dhel", reduction="none"),
                     torch.stack(expected))

    def test_bad_arguments(self):
        v = randn(3, 4, 2)
        with pytest.raises(ValueError):
            multiview_ref(v, scale=1.0, method="nope")
        with pytest.raises(ValueError):
            multiview_ref(v, scale=1.0, method="cmc", cmc_mode="star")
        with pytest.raises(ValueError):
            multiview_ref(v[:1], scale=1.0)
        with pytest.raises(ValueError):
            multiview_ref(v[0], scale=1.0)
        with pytest.raises(ValueError):
            multiview_ref(v[:, :1], scale=1.0, method="mv_dhel")


# ============================================================================================
# Hard-negative / debiased, DCL, SigLIP
# ============================================================================================


def _hcl_official(out_1, out_2, tau_plus, batch_size, beta, temperature):
    """Re-implementation of joshr17/HCL image/main.py criterion (estimator='hard')."""
    out = torch.cat([out_1, out_2], dim=0)
    neg = torch.exp(torch.mm(out, out.t().contiguous()) / temperature)
    negative_mask = torch.ones((batch_size, 2 * batch_size), dtype=bool)
    for i in range(batch_size):
        negative_mask[i, i] = 0
        negative_mask[i, i + batch_size] = 0
    mask = torch.cat((negative_mask, negative_mask), 0)
    neg = neg.masked_select(mask).view(2 * batch_size, -1)
    pos = torch.exp(torch.sum(out_1 * out_2, dim=-1) / temperature)
    pos = torch.cat([pos, pos], dim=0)
    N = batch_size * 2 - 2
    imp = (beta * neg.log()).exp()
    reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
    Ng = (-tau_plus * N * pos + reweight_neg) / (1 - tau_plus)
    Ng = torch.clamp(Ng, min=N * math.e ** (-1 / temperature))
    return -torch.log(pos / (pos + Ng))  # per row; the official code takes the mean


def _hcl_paired_direct(q, k, tau_plus, beta, temperature):
    """The LOSSES 6 formula, raw exp, for queries q with positive key k_i and N-1 negatives;
    ``temperature`` is a tensor, so the gradient w.r.t. the scale includes the floor's."""
    N = q.shape[0]
    out = []
    for i in range(N):
        sp = q[i] @ k[i] / temperature
        sn = torch.stack([q[i] @ k[j] / temperature for j in range(N) if j != i])
        imp = torch.exp(beta * sn)
        R = (imp * torch.exp(sn)).sum() / imp.mean()
        Nn = N - 1
        est = (R - tau_plus * Nn * torch.exp(sp)) / (1 - tau_plus)
        Ng = torch.maximum(est, Nn * torch.exp(-1 / temperature))  # the floor depends on the scale
        out.append(-torch.log(torch.exp(sp) / (torch.exp(sp) + Ng)))
    return torch.stack(out)


class TestHardNegative:
    @pytest.mark.parametrize("beta,tau_plus,temperature", [
        (1.0, 0.1, 0.5), (0.5, 0.0, 0.2), (0.0, 0.1, 0.5), (1.0, 0.7, 0.5), (2.0, 0.3, 0.25)])
    def test_matches_official_two_view(self, beta, tau_plus, temperature):
        z1 = unit(6, 5, seed=100, requires_grad=True)
        z2 = unit(6, 5, seed=101, requires_grad=True)
        theirs = _hcl_official(z1, z2, tau_plus, 6, beta, temperature)
        ours = hard_negative_nce_ref(z1, z2, scale=1 / temperature, beta=beta, tau_plus=tau_plus,
                                     reduction="none")
        assert ours.shape == (12,)
        assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
        assert_all_close(grads(ours.mean(), [z1, z2]), grads(theirs.mean(), [z1, z2]),
                         rtol=1e-9, atol=1e-9)
        assert_close(hard_negative_nce_ref(z1, z2, scale=1 / temperature, beta=beta,
                                           tau_plus=tau_plus), theirs.mean(), rtol=1e-9, atol=1e-9)

    def test_clamp_is_exercised(self):
        # tau_plus = 0.7 pushes the estimate below the floor for some rows, not for others
        z1, z2 = unit(6, 5, seed=100), unit(6, 5, seed=101)
        out = torch.cat([z1, z2])
        s = out @ out.T / 0.5
        pos = torch.exp((z1 * z2).sum(-1) / 0.5).repeat(2)
        R = torch.exp(s).sum(1) - torch.exp(torch.diagonal(s)) - pos
        est = (R - 0.7 * 10 * pos) / 0.3
        floor = 10 * math.exp(-2.0)
        assert (est < floor).any() and (est > floor).any()

    @pytest.mark.parametrize("beta,tau_plus", [(1.0, 0.1), (0.0, 0.0), (0.5, 0.8)])
    def test_paired_layout(self, beta, tau_plus):
        q = randn(5, 4, seed=102, requires_grad=True)
        k = randn(5, 4, seed=103, requires_grad=True)
        a = scalar(1 / 0.4)
        ours = hard_negative_nce_ref(q, k, scale=a, beta=beta, tau_plus=tau_plus, layout="paired",
                                     reduction="none")
        direct = _hcl_paired_direct(q, k, tau_plus, beta, 1 / a)
        assert ours.shape == (5,)
        assert_close(ours, direct)
        assert_all_close(grads(ours.sum(), [q, k, a]), grads(direct.sum(), [q, k, a]))

    def test_beta0_tau0_is_nt_xent_and_info_nce(self):
        z1 = unit(7, 4, seed=104, requires_grad=True)
        z2 = unit(7, 4, seed=105, requires_grad=True)
        a = scalar(1 / 0.3)
        h = hard_negative_nce_ref(z1, z2, scale=a, beta=0.0, tau_plus=0.0)
        nt = nt_xent_ref(z1, z2, scale=a)
        assert_close(h, nt)
        assert_all_close(grads(h, [z1, z2, a]), grads(nt, [z1, z2, a]))
        hp = hard_negative_nce_ref(z1, z2, scale=a, beta=0.0, tau_plus=0.0, layout="paired")
        assert_close(hp, info_nce_ref(z1, z2, scale=a))

    def test_large_scale_is_finite(self):
        z1, z2 = unit(8, 4, seed=106, dtype=torch.float32), unit(8, 4, seed=107,
                                                                dtype=torch.float32)
        for tau_plus in (0.0, 0.1):
            loss = hard_negative_nce_ref(z1, z2, scale=100.0, beta=1.0, tau_plus=tau_plus)
            assert torch.isfinite(loss)

    def test_bad_arguments(self):
        z = randn(4, 3)
        with pytest.raises(ValueError):
            hard_negative_nce_ref(z, z, scale=1.0, beta=1.0, tau_plus=1.0)
        with pytest.raises(ValueError):
            hard_negative_nce_ref(z, z, scale=1.0, beta=1.0, tau_plus=0.1, layout="x")
        with pytest.raises(ValueError):
            hard_negative_nce_ref(z[:1], z[:1], scale=1.0, beta=1.0, tau_plus=0.1,
                                  layout="paired")


def _dcl_direct(z1, z2, a, w=None):
    """l(z1, z2)_i = -w_i s(z1_i, z2_i) + LSE_{j != i} [s(z1_i, z1_j), s(z1_i, z2_j)], both
    directions concatenated."""
    N = z1.shape[0]
    w = torch.ones(N, dtype=z1.dtype) if w is None else w

    def one(x, y):
        out = []
        for i in range(N):
            negs = [a * x[i] @ x[j] for j in range(N) if j != i] + \
                   [a * x[i] @ y[j] for j in range(N) if j != i]
            out.append(-w[i] * a * x[i] @ y[i] + torch.logsumexp(torch.stack(negs), 0))
        return torch.stack(out)

    return torch.cat([one(z1, z2), one(z2, z1)])


class TestDCL:
    def test_dcl_direct(self):
        z1 = randn(5, 3, seed=110, requires_grad=True)
        z2 = randn(5, 3, seed=111, requires_grad=True)
        a = scalar(1.4)
        ours = dcl_ref(z1, z2, scale=a, reduction="none")
        direct = _dcl_direct(z1, z2, a)
        assert ours.shape == (10,)
        assert_close(ours, direct)
        assert_all_close(grads(ours.mean(), [z1, z2, a]), grads(direct.mean(), [z1, z2, a]))
        assert_close(dcl_ref(z1, z2, scale=a), direct.mean())

    def test_dclw_direct_with_detached_cosine_weights(self):
        z1 = randn(5, 3, seed=112, requires_grad=True)
        z2 = randn(5, 3, seed=113, requires_grad=True)
        a = scalar(1.4)
        sigma = 0.5
        with torch.no_grad():
            cos = F.cosine_similarity(z1, z2, dim=1)
            w = 2 - 5 * torch.softmax(cos / sigma, dim=0)
        ours = dcl_ref(z1, z2, scale=a, weighted=True, sigma=sigma)
        direct = _dcl_direct(z1, z2, a, w).mean()
        assert_close(ours, direct)
        assert_all_close(grads(ours, [z1, z2, a]), grads(direct, [z1, z2, a]))
        assert not torch.allclose(ours, dcl_ref(z1, z2, scale=a))

    def test_dclw_weight_uses_unit_vectors(self):
        # scaling the inputs by c and the logit scale by 1/c^2 leaves the logits unchanged; the
        # weight, computed on the unit sphere as lightly does, must not change either
        z1, z2 = randn(5, 3, seed=116), randn(5, 3, seed=117)
        base = dcl_ref(z1, z2, scale=1.0, weighted=True, reduction="none")
        scaled = dcl_ref(3 * z1, 3 * z2, scale=1 / 9, weighted=True, reduction="none")
        assert_close(base, scaled)

    def test_dcl_is_nt_xent_without_positive_in_denominator(self):
        # with the positive added back into the denominator DCL becomes NT-Xent
        z1, z2 = randn(4, 3, seed=114), randn(4, 3, seed=115)
        Z = torch.cat([z1, z2])
        s = 0.8 * Z @ Z.T
        p = (torch.arange(8) + 4) % 8
        sp = s[torch.arange(8), p]
        d = dcl_ref(z1, z2, scale=0.8, reduction="none")
        nt = nt_xent_ref(z1, z2, scale=0.8, reduction="none")
        assert_close(torch.logaddexp(d + sp, sp) - sp, nt)

    def test_bad_arguments(self):
        with pytest.raises(ValueError):
            dcl_ref(randn(1, 3), randn(1, 3), scale=1.0)
        with pytest.raises(ValueError):
            dcl_ref(randn(3, 3), randn(3, 3), scale=1.0, weighted=True, sigma=0.0)


class TestSigLIP:
    def test_direct_formula(self):
        x = randn(5, 3, seed=120, requires_grad=True)
        y = randn(5, 3, seed=121, requires_grad=True)
        a, b = scalar(10.0), scalar(-10.0)
        rows = []
        for i in range(5):
            terms = []
            for j in range(5):
                z = 1.0 if i == j else -1.0
                terms.append(torch.log1p(torch.exp(-z * (a * x[i] @ y[j] + b))))
            rows.append(torch.stack(terms).sum())
        rows = torch.stack(rows)
        none = siglip_ref(x, y, scale=a, bias=b, reduction="none")
        assert none.shape == (5,)
        assert_close(none, rows)
        mean = siglip_ref(x, y, scale=a, bias=b)
        assert_close(mean, rows.sum() / 5)
        assert_all_close(grads(mean, [x, y, a, b]), grads(rows.sum() / 5, [x, y, a, b]))
        assert_close(siglip_ref(x, y, scale=a, bias=b, reduction="sum"), rows.sum())

    def test_bias_none_is_zero(self):
        x, y = randn(4, 3, seed=122), randn(4, 3, seed=123)
        assert_close(siglip_ref(x, y, scale=2.0, bias=None), siglip_ref(x, y, scale=2.0, bias=0.0))

    def test_bad_arguments(self):
        with pytest.raises(ValueError):
            siglip_ref(randn(4, 3), randn(5, 3), scale=1.0, bias=0.0)


# ============================================================================================
# Alignment, uniformity, top-k
# ============================================================================================


class TestAlignUniformTopk:
    @pytest.mark.parametrize("alpha", [2, 1, 3])
    def test_alignment(self, alpha):
        x = randn(6, 4, seed=130, requires_grad=True)
        y = randn(6, 4, seed=131, requires_grad=True)
        direct = torch.stack([torch.linalg.vector_norm(x[i] - y[i]) ** alpha
                              for i in range(6)]).mean()
        ours = alignment_ref(x, y, alpha=alpha)
        assert ours.shape == ()
        assert_close(ours, direct)
        assert_all_close(grads(ours, [x, y]), grads(direct, [x, y]))

    @pytest.mark.parametrize("t", [2, 0.5])
    def test_uniformity(self, t):
        x = randn(6, 4, seed=132, requires_grad=True)  # not unit norm on purpose
        terms = [torch.exp(-t * ((x[i] - x[j]) ** 2).sum()) for i in range(6) for j in range(6)
                 if i != j]
        direct = torch.log(torch.stack(terms).mean())
        ours = uniformity_ref(x, t=t)
        assert_close(ours, direct)
        assert_all_close(grads(ours, [x]), grads(direct, [x]))
        wang_isola = torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()
        assert_close(ours, wang_isola)

    def test_uniformity_duplicate_points_finite_gradient(self):
        x = randn(4, 3, seed=133)
        x = torch.cat([x, x[:1]]).requires_grad_(True)
        (g,) = grads(uniformity_ref(x), [x])
        assert torch.isfinite(g).all()

    @pytest.mark.parametrize("exclude_self", [False, True])
    def test_topk(self, exclude_self):
        q = randn(7, 5, seed=134)
        k = randn(9, 5, seed=135)
        values, indices = topk_similarity_ref(q, k, 4, exclude_self=exclude_self)
        assert values.shape == (7, 4) and indices.shape == (7, 4)
        assert indices.dtype == torch.int64
        for i in range(7):
            cand = [(float(q[i] @ k[j]), j) for j in range(9) if not (exclude_self and i == j)]
            cand.sort(reverse=True)
            assert [j for _, j in cand[:4]] == indices[i].tolist()
            torch.testing.assert_close(values[i], torch.tensor([v for v, _ in cand[:4]], dtype=F64))
        ref_v, ref_i = torch.topk(q @ k.T, 4, dim=1)
        if not exclude_self:
            assert torch.equal(indices, ref_i)
            assert_close(values, ref_v)
        else:
            assert all(i not in indices[i].tolist() for i in range(7))

    def test_topk_bad_arguments(self):
        q, k = randn(3, 2), randn(4, 2)
        with pytest.raises(ValueError):
            topk_similarity_ref(q, k, 5)
        with pytest.raises(ValueError):
            topk_similarity_ref(q, k, 4, exclude_self=True)
        with pytest.raises(ValueError):
            topk_similarity_ref(q, k, 0)
        with pytest.raises(ValueError):
            uniformity_ref(randn(1, 3))
        with pytest.raises(ValueError):
            alignment_ref(randn(3, 2), randn(4, 2))


# ============================================================================================
# Output dtype and shape for every loss and reduction
# ============================================================================================


def _loss_calls(dtype):
    N, D = 4, 3
    x = randn(N, D, seed=140, dtype=dtype)
    y = randn(N, D, seed=141, dtype=dtype)
    f = randn(N, 2, D, seed=142, dtype=dtype)
    v = randn(3, N, D, seed=143, dtype=dtype)
    return {
        "info_nce": (lambda r: info_nce_ref(x, y, scale=2.0, reduction=r), N),
        "info_nce_sym": (lambda r: info_nce_ref(x, y, scale=2.0, symmetric=True, reduction=r), N),
        "nt_xent": (lambda r: nt_xent_ref(x, y, scale=2.0, reduction=r), 2 * N),
        "supcon": (lambda r: supcon_ref(f, scale=2.0, reduction=r), 2 * N),
        "mv_infonce": (lambda r: multiview_ref(v, scale=2.0, reduction=r), N),
        "mv_dhel": (lambda r: multiview_ref(v, scale=2.0, method="mv_dhel", reduction=r), N),
        "cmc": (lambda r: multiview_ref(v, scale=2.0, method="cmc", reduction=r), N),
        "hcl": (lambda r: hard_negative_nce_ref(x, y, scale=2.0, beta=1.0, tau_plus=0.1,
                                                reduction=r), 2 * N),
        "hcl_paired": (lambda r: hard_negative_nce_ref(x, y, scale=2.0, beta=1.0, tau_plus=0.1,
                                                       layout="paired", reduction=r), N),
        "dcl": (lambda r: dcl_ref(x, y, scale=2.0, reduction=r), 2 * N),
        "dclw": (lambda r: dcl_ref(x, y, scale=2.0, weighted=True, reduction=r), 2 * N),
        "siglip": (lambda r: siglip_ref(x, y, scale=2.0, bias=-1.0, reduction=r), N),
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_dtype_and_shape(dtype):
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name, (call, n_anchor) in _loss_calls(dtype).items():
        for reduction in ("mean", "sum", "none"):
            out = call(reduction)
            assert out.dtype == expected_dtype, (name, reduction, out.dtype)
            want = (n_anchor,) if reduction == "none" else ()
            assert out.shape == want, (name, reduction, tuple(out.shape))
            assert torch.isfinite(out).all(), (name, reduction)
        mean, total, none = call("mean"), call("sum"), call("none")
        torch.testing.assert_close(total, none.sum(), rtol=1e-6, atol=1e-6)
        if name != "siglip":
            torch.testing.assert_close(mean, none.mean(), rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError):
            call("avg")
    x = randn(4, 3, seed=144, dtype=dtype)
    assert alignment_ref(x, x.flip(0)).dtype == expected_dtype
    assert alignment_ref(x, x.flip(0)).shape == ()
    assert uniformity_ref(x).dtype == expected_dtype
    values, indices = topk_similarity_ref(x, x, 2)
    assert values.dtype == expected_dtype and indices.dtype == torch.int64


def test_low_precision_matches_fp32_of_same_values():
    x = randn(6, 5, seed=145, dtype=torch.bfloat16)
    y = randn(6, 5, seed=146, dtype=torch.bfloat16)
    assert_close(info_nce_ref(x, y, scale=50.0), info_nce_ref(x.float(), y.float(), scale=50.0),
                 rtol=0, atol=0)


# ============================================================================================
# contrastive_stats_ref against per-row loops and the G formula of its docstring
# ============================================================================================


def _lse(values):
    if not values:
        return float("-inf")
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _stats_loop(s, targets, row_labels, col_labels, exclude_diag, decoupled, pos_lse, col_stats,
                lse2_mult=0.0):
    """Per-row / per-column Python loops of the statistics defined in contrastive.py."""
    R, C = len(s), len(s[0])
    lse, pos, npos, mean, lse2 = [], [], [], [], []
    for r in range(R):
        allowed = [c for c in range(C) if not (exclude_diag and r == c)]
        if row_labels is not None:
            P = [c for c in allowed if row_labels[r] == col_labels[c]]
        elif targets is not None:
            P = [c for c in allowed if c == targets[r]]
        else:
            P = []
        den = [c for c in allowed if c not in P] if decoupled else allowed
        lse.append(_lse([s[r][c] for c in den]))
        if lse2_mult > 0:
            lse2.append(_lse([lse2_mult * s[r][c] for c in den]))
        if not P:
            pos.append(0.0)
        elif pos_lse:
            pos.append(_lse([s[r][c] for c in P]))
        else:
            pos.append(sum(s[r][c] for c in P) / len(P))
        npos.append(float(len(P)))
        mean.append(sum(s[r][c] for c in den) / len(den) if den else 0.0)
    col_lse, col_mean = [], []
    if col_stats:
        for c in range(C):
            rows = [r for r in range(R) if not (exclude_diag and r == c)]
            col_lse.append(_lse([s[r][c] for r in rows]))
            col_mean.append(sum(s[r][c] for r in rows) / len(rows) if rows else 0.0)
    return lse, pos, npos, mean, col_lse, col_mean, lse2


_STATS_CONFIGS = {
    "targets_with_minus_one": dict(targets=[2, -1, 0, 4, 1, -1, 3], exclude_diag=False),
    "targets_exclude_diag": dict(targets=[0, 3, 2, -1, 6, 1, 5], exclude_diag=True),
    "targets_decoupled": dict(targets=[1, 0, 4, 2, -1, 3, 6], decoupled=True, exclude_diag=True),
    "labels_exclude_diag": dict(labels=([0, 1, 0, 2, 1, 3, 0], [0, 1, 2, 0, 1, 0, 4, 2]),
                                exclude_diag=True),
    "labels_decoupled_pos_lse": dict(labels=([0, 1, 0, 2, 1, 3, 0], [0, 1, 2, 0, 1, 0, 4, 2]),
                                     decoupled=True, pos_lse=True),
    "labels_col_stats": dict(labels=([1, 1, 0, 2, 5, 3, 0], [0, 1, 2, 0, 1, 0, 4, 2]),
                             exclude_diag=True, col_stats=True, pos_lse=True),
    "targets_col_stats": dict(targets=[0, 1, 2, 3, 4, 5, 6], col_stats=True),
    "no_positives": dict(col_stats=True, exclude_diag=True),
}


def _stats_args(cfg):
    targets = torch.tensor(cfg["targets"]) if "targets" in cfg else None
    if "labels" in cfg:
        row_labels, col_labels = (torch.tensor(x) for x in cfg["labels"])
    else:
        row_labels = col_labels = None
    flags = dict(exclude_diag=cfg.get("exclude_diag", False), decoupled=cfg.get("decoupled", False),
                 pos_lse=cfg.get("pos_lse", False), col_stats=cfg.get("col_stats", False))
    return targets, row_labels, col_labels, flags


@pytest.mark.parametrize("lse2_mult", [0.0, 0.35])
@pytest.mark.parametrize("name", list(_STATS_CONFIGS))
def test_contrastive_stats_vs_loops(name, lse2_mult):
    targets, row_labels, col_labels, flags = _stats_args(_STATS_CONFIGS[name])
    q, k = randn(7, 3, seed=150), randn(8, 3, seed=151)
    scale, bias = torch.tensor(1.7, dtype=F64), torch.tensor(0.3, dtype=F64)
    out = contrastive_stats_ref(q, k, scale, bias, targets, row_labels, col_labels,
                                lse2_mult=lse2_mult, **flags)
    s = (scale * q @ k.T + bias).tolist()
    expected = _stats_loop(
        s, None if targets is None else targets.tolist(),
        None if row_labels is None else row_labels.tolist(),
        None if col_labels is None else col_labels.tolist(), **flags, lse2_mult=lse2_mult)
    assert len(out) == len(expected) == 7
    for got, want, label in zip(out, expected, ("lse", "pos", "npos", "mean", "col_lse",
                                                "col_mean", "lse2")):
        assert got.dtype == F64, label
        torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-12,
                                   msg=label)


def test_contrastive_stats_fp32_for_low_precision():
    q, k = randn(4, 3, seed=152, dtype=torch.float16), randn(5, 3, seed=153, dtype=torch.float16)
    out = contrastive_stats_ref(q, k, torch.tensor(2.0), torch.tensor(0.0), torch.arange(4),
                                col_stats=True)
    assert all(o.dtype == torch.float32 for o in out)


@pytest.mark.parametrize("name", [n for n in _STATS_CONFIGS if n != "no_positives"])
def test_contrastive_stats_gradient_is_G_formula(name):
    targets, row_labels, col_labels, flags = _stats_args(_STATS_CONFIGS[name])
    q = randn(7, 3, seed=154, requires_grad=True)
    k = randn(8, 3, seed=155, requires_grad=True)
    scale, bias = scalar(1.3), scalar(-0.2)
    mu = 0.6
    lse, pos, npos, mean, col_lse, col_mean, lse2 = contrastive_stats_ref(
        q, k, scale, bias, targets, row_labels, col_labels, lse2_mult=mu, **flags)
    assert torch.isfinite(lse).all()
    g = [randn(7, seed=156 + i) for i in range(3)] + [randn(8, seed=160 + i) for i in range(2)]
    g_lse2 = randn(7, seed=163)
    L = (g[0] * lse).sum() + (g[1] * pos).sum() + (g[2] * mean).sum() + (g_lse2 * lse2).sum()
    if flags["col_stats"]:
        L = L + (g[3] * col_lse).sum() + (g[4] * col_mean).sum()
    dq, dk, dscale, dbias = grads(L, [q, k, scale, bias])

    with torch.no_grad():
        allowed, posm, den = contrastive_masks_ref(7, 8, targets, row_labels, col_labels,
                                                   flags["exclude_diag"], flags["decoupled"],
                                                   q.device)
        dot = q @ k.T
        s = scale * dot + bias
        allowed, posm, den = allowed.double(), posm.double(), den.double()
        G = g[0][:, None] * den * torch.exp(s - lse[:, None])
        if flags["pos_lse"]:
            G += g[1][:, None] * posm * torch.exp(s - pos[:, None])
        else:
            G += g[1][:, None] * posm / npos.clamp_min(1)[:, None]
        G += g[2][:, None] * den / den.sum(1, keepdim=True)
        G += g_lse2[:, None] * den * mu * torch.exp(mu * s - lse2[:, None])
        if flags["col_stats"]:
            G += g[3][None, :] * allowed * torch.exp(s - col_lse[None, :])
            G += g[4][None, :] * allowed / allowed.sum(0, keepdim=True)
        assert_close(dq, scale * G @ k)
        assert_close(dk, scale * G.T @ q)
        assert_close(dscale, (G * dot).sum())
        assert_close(dbias, G.sum())
