"""A small end-to-end demo on CPU: train encoders with fastcl losses and watch them learn.

``python -m fastcl.demo`` (what ``make demo`` runs):

1. two-tower: two small MLPs learn to match paired views of synthetic data with the symmetric
   CLIP loss (learnable logit scale); the loss falls and retrieval recall@1 rises;
2. SupCon on scikit-learn's handwritten digits (if scikit-learn is installed): an encoder
   trained on two augmented views of each image with their labels; k-NN accuracy on the test
   split, before and after.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastcl


def _mlp(d_in: int, d_out: int, hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


@torch.no_grad()
def recall_at_1(a: torch.Tensor, b: torch.Tensor) -> float:
    sims = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    return (sims.argmax(1) == torch.arange(a.shape[0])).float().mean().item()


def two_tower(steps: int, batch: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    d_latent, d_x, d_y = 16, 32, 24
    mix_x, mix_y = torch.randn(d_latent, d_x, generator=g), torch.randn(d_latent, d_y, generator=g)

    def sample(n):
        z = torch.randn(n, d_latent, generator=g)
        x = torch.tanh(z @ mix_x) + 0.1 * torch.randn(n, d_x, generator=g)
        y = torch.tanh(z @ mix_y) + 0.1 * torch.randn(n, d_y, generator=g)
        return x, y

    torch.manual_seed(seed)
    enc_x, enc_y = _mlp(d_x, 32), _mlp(d_y, 32)
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    opt = torch.optim.AdamW([*enc_x.parameters(), *enc_y.parameters(), log_scale], lr=3e-3)
    x_val, y_val = sample(1000)
    print(f"two-tower: symmetric CLIP loss, batch {batch}, {steps} steps")
    print(f"  recall@1 (1000 pairs) before training: {recall_at_1(enc_x(x_val), enc_y(y_val)):.3f}")
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = sample(batch)
        fx, fy = F.normalize(enc_x(x), dim=1), F.normalize(enc_y(y), dim=1)
        loss = fastcl.clip_loss(fx, fy, log_scale.exp().clamp(max=100))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % max(1, steps // 5) == 0:
            r1 = recall_at_1(enc_x(x_val), enc_y(y_val))
            print(f"  step {step:4d}  loss {loss.item():.4f}  recall@1 {r1:.3f}  "
                  f"scale {log_scale.exp().item():6.2f}  ({time.perf_counter() - t0:.1f}s)")


@torch.no_grad()
def knn_accuracy(enc, x_tr, y_tr, x_te, y_te, k: int = 5) -> float:
    ftr, fte = F.normalize(enc(x_tr), dim=1), F.normalize(enc(x_te), dim=1)
    _, idx = fastcl.topk_similarity(fte, ftr, k)
    votes = F.one_hot(y_tr[idx], 10).sum(1)
    return (votes.argmax(1) == y_te).float().mean().item()


def digits(steps: int, seed: int) -> None:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        print("digits: scikit-learn is not installed; skipping (pip install scikit-learn)")
        return
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    x_tr, y_tr, x_te, y_te = x[:1400], y[:1400], x[1400:], y[1400:]

    def augment(batch):
        img = batch.view(-1, 1, 8, 8)
        shift = torch.randint(-1, 2, (2,))
        img = torch.roll(img, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
        img = img * (torch.rand(img.shape[0], 1, 1, 1) * 0.4 + 0.8)
        return (img + 0.05 * torch.randn_like(img)).clamp(0, 1).view(-1, 64)

    torch.manual_seed(seed)
    enc = _mlp(64, 4, hidden=128)
    opt = torch.optim.AdamW(enc.parameters(), lr=5e-3)
    print(f"digits: SupCon (2 views, cosine, T=0.1, 4-d embedding) on {len(x_tr)} images, "
          f"{steps} steps")
    print(f"  k-NN accuracy (test) untrained encoder: {knn_accuracy(enc, x_tr, y_tr, x_te, y_te):.3f}"
          "  (chance 0.100)")
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x_tr), (512,))
        b = x_tr[idx]
        views = torch.stack([enc(augment(b)), enc(augment(b))], dim=1)
        loss = fastcl.supcon(views, y_tr[idx], temperature=0.1, normalize=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % max(1, steps // 4) == 0:
            acc = knn_accuracy(enc, x_tr, y_tr, x_te, y_te)
            print(f"  step {step:4d}  loss {loss.item():.4f}  k-NN accuracy {acc:.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcl.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    two_tower(args.steps, args.batch, args.seed)
    digits(args.steps, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
