"""fastcl.train: the reference training loop for giant contrastive batches on limited memory.

GradCache-style chunking of the encoder (:func:`contrastive_step`) around any fused fastcl loss
on the full batch of embeddings (:func:`build_objective`), AdamW with warmup + cosine, mixed
precision on GPU, metrics after each epoch (recall@k, k-NN accuracy, alignment, uniformity),
JSON-lines logs, plots, and atomic, verified checkpoints that resume a run exactly. Under
``torchrun`` the global batch is sharded over the processes and the loss gathers every rank's
embeddings (:mod:`fastcl.train.distributed`).

``python -m fastcl.train`` runs the built-in demo; ``python -m fastcl.train --help`` lists the
options of a single run. From Python::

    from fastcl.train import TrainConfig, train
    result = train(TrainConfig(task="digits", loss="supcon", batch_size=256, chunk_size=64))
    result.metrics()          # the last epoch's metrics
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .data import Batch, PairsData, SyntheticPairs, ViewsData
from .gradcache import RNGState, StepResult, contrastive_step
from .loop import Trainer, TrainResult, train
from .metrics import PeakMemory, evaluate, knn_accuracy, recall_at_k
from .models import SharedEncoder, TwoTower, mlp
from .objective import LOSSES, Objective, build_objective

__all__ = [
    "TrainConfig",
    "ConfigError",
    "train",
    "Trainer",
    "TrainResult",
    "contrastive_step",
    "StepResult",
    "RNGState",
    "build_objective",
    "Objective",
    "LOSSES",
    "TwoTower",
    "SharedEncoder",
    "mlp",
    "Batch",
    "ViewsData",
    "PairsData",
    "SyntheticPairs",
    "evaluate",
    "recall_at_k",
    "knn_accuracy",
    "PeakMemory",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
]
