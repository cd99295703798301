"""Encoders of the training loop.

The loop drives any ``nn.Module`` whose ``forward(x, slot)`` embeds the input of slot ``slot``
(``[n, ...] -> [n, D]``): slot 0 and 1 are the two towers of a two-tower model, or the views of a
multi-view model whose slots all share one encoder. The signature keeps one ``forward`` per call,
so a ``DistributedDataParallel`` wrapper sees every encoder pass.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

__all__ = ["mlp", "TwoTower", "SharedEncoder"]


def mlp(d_in: int, d_out: int, hidden: int = 256, depth: int = 1, dropout: float = 0.0) -> nn.Sequential:
    """``depth`` blocks of Linear -> LayerNorm -> GELU -> Dropout, then a Linear projection.

    LayerNorm, not BatchNorm: chunked training (GradCache) needs per-sample layers, since a
    BatchNorm would see chunk statistics and update its running averages twice per step.
    """
    layers: list = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.GELU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class TwoTower(nn.Module):
    """Two encoders (image / text style): ``forward(x, 0)`` is tower a, ``forward(x, 1)`` tower b."""

    def __init__(self, tower_a: nn.Module, tower_b: nn.Module):
        super().__init__()
        self.towers = nn.ModuleList([tower_a, tower_b])

    @property
    def num_slots(self) -> int:
        return 2

    def forward(self, x: Tensor, slot: int) -> Tensor:
        """The embeddings of ``x`` by the tower of ``slot``."""
        return self.towers[slot](x)


class SharedEncoder(nn.Module):
    """One encoder for every view (SimCLR / SupCon / multi-view): ``forward(x, slot)`` ignores ``slot``."""

    def __init__(self, encoder: nn.Module, num_slots: int = 2):
        super().__init__()
        self.encoder = encoder
        self._num_slots = num_slots

    @property
    def num_slots(self) -> int:
        return self._num_slots

    def forward(self, x: Tensor, slot: int = 0) -> Tensor:
        """The embeddings of ``x`` (one encoder for every slot)."""
        return self.encoder(x)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def build_model(task: str, *, embed_dim: int, hidden: int, depth: int, dropout: float,
                views: int = 2, in_dims: Sequence[int] = (64,)) -> nn.Module:
    """The MLP model of a built-in task (``in_dims``: input size per slot)."""
    if task == "pairs":
        return TwoTower(mlp(in_dims[0], embed_dim, hidden, depth, dropout),
                        mlp(in_dims[1], embed_dim, hidden, depth, dropout))
    return SharedEncoder(mlp(in_dims[0], embed_dim, hidden, depth, dropout), views)
