"""Command line of fastcl.train (``python -m fastcl.train``; console script ``fastcl-train``).

With no argument (or ``--demo``) it runs the built-in demo (:mod:`fastcl.train.demo`); with
options it runs one training (:func:`fastcl.train.train`). Examples::

    python -m fastcl.train                                  # the demo, a few minutes on CPU
    python -m fastcl.train --task digits --loss supcon --batch-size 512 --chunk-size 128 \\
        --embed-dim 8 --epochs 20 --log run.jsonl --plot run.png --checkpoint run.ckpt
    python -m fastcl.train --task pairs --loss clip --learnable-temperature \\
        --batch-size 32768 --chunk-size 4096 --steps-per-epoch 5
    python -m fastcl.train --loss multiview --loss-opt method=cmc --task digits --views 3
    python -m fastcl.train --resume run.ckpt                # continue exactly where it stopped
    torchrun --nproc_per_node=2 -m fastcl.train --task pairs --batch-size 8192 \
        --chunk-size 1024 --steps-per-epoch 10        # 2 processes, 4096 rows each, one loss

On resume the stored configuration is used; options given on the command line may change the
run's bookkeeping (log, plot, checkpoint path, progress bar, stop-after, gather) but not its
trajectory (model, loss, data, schedule, seed): a different value there is refused.

Under ``torchrun`` the batch size is the global batch (each process reads an equal share of
it) and only rank 0 prints, logs and writes checkpoints; the demo runs on one process.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Optional

from .config import AMP_MODES, TASKS, TrainConfig

__all__ = ["main", "build_parser", "config_from_args"]


def _loss_opt(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.strip(), parsed


def _optional_int(text: str) -> Optional[int]:
    return None if text.lower() in ("none", "0", "off") else int(text)


def _optional_float(text: str) -> Optional[float]:
    return None if text.lower() in ("none", "off") else float(text)


def build_parser() -> argparse.ArgumentParser:
    from .objective import LOSSES

    p = argparse.ArgumentParser(
        prog="python -m fastcl.train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true",
                   help="run the built-in demo (the default without arguments)")
    g = p.add_argument_group("task and model")
    g.add_argument("--task", choices=TASKS, help="digits (multi-view, labels) or pairs (synthetic two-tower)")
    g.add_argument("--views", type=int, help="views per sample (digits)")
    g.add_argument("--embed-dim", type=int)
    g.add_argument("--hidden", type=int)
    g.add_argument("--depth", type=int, help="hidden layers of the MLP encoders")
    g.add_argument("--dropout", type=float)
    g.add_argument("--eval-size", type=int, help="held-out pairs of the synthetic task")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=list(LOSSES))
    g.add_argument("--loss-opt", type=_loss_opt, action="append", metavar="KEY=VALUE",
                   help="an option of the loss, repeatable (variant=in, method=cmc, symmetric=True, ...)")
    g.add_argument("--temperature", type=float)
    g.add_argument("--learnable-temperature", action="store_true", default=None)
    g.add_argument("--max-logit-scale", type=float)
    g.add_argument("--no-normalize", dest="normalize", action="store_false", default=None,
                   help="use the embeddings as they are (default: cosine similarity)")
    g.add_argument("--no-labels", dest="use_labels", action="store_false", default=None,
                   help="SupCon without the labels (self-supervised)")
    g.add_argument("--backend", choices=["auto", "triton", "cuda", "cpu", "reference"])
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--chunk-size", type=_optional_int, help="GradCache chunk rows (none: unchunked)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--steps-per-epoch", type=_optional_int)
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--min-lr-ratio", type=float)
    g.add_argument("--grad-clip", type=_optional_float, help="max gradient norm (none: off)")
    g.add_argument("--amp", choices=AMP_MODES, help="auto: bf16 autocast on CUDA, off on CPU")
    g.add_argument("--seed", type=int)
    g.add_argument("--knn-k", type=int)
    g.add_argument("--metric-samples", type=int, help="rows of the uniformity subsample")
    g = p.add_argument_group("run")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--log", "--log-file", dest="log",
                   help="JSON-lines log path (under torchrun write --log-file: torchrun takes "
                        "--log for an abbreviation of its own options)")
    g.add_argument("--plot", help="PNG of the training curves")
    g.add_argument("--checkpoint", help="checkpoint path (written at each epoch end)")
    g.add_argument("--checkpoint-every", type=int, help="also every N steps")
    g.add_argument("--resume", help="continue the run stored in this checkpoint")
    g.add_argument("--stop-after", type=int,
                   help="stop after N steps of this invocation, writing the checkpoint")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    g.add_argument("--gather", help="several processes: the gather mode of the loss, passed to "
                                    "fastcl: all_gather (default) or ring; unused on one process")
    g = p.add_argument_group("demo")
    g.add_argument("--pairs-batch", type=int, help="batch of the demo's two-tower part")
    g.add_argument("--pairs-steps", type=int, help="steps of the demo's two-tower part (4)")
    g.add_argument("--digits-epochs", type=int, help="epochs of the demo's digits part (20)")
    return p


_NOT_CONFIG = ("demo", "loss_opt", "pairs_batch", "pairs_steps", "digits_epochs")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: the defaults (or, with ``--resume``, the stored config) updated by the
    options given on the command line."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in _NOT_CONFIG}
    if args.loss_opt:
        given["loss_options"] = dict(args.loss_opt)
    from .config import ConfigError

    if args.resume:
        from .checkpoint import load_checkpoint

        stored = load_checkpoint(args.resume)["config"]
        stored.update(resume=args.resume, stop_after=None)
        base = TrainConfig.from_dict(stored)
        try:
            return base.replace(**given)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    try:
        return TrainConfig(**given)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def main(argv: Optional[list] = None) -> int:
    """Entry point of ``python -m fastcl.train`` and of the ``fastcl-train`` console script.

    Returns the exit status: 0, or 2 for a refused configuration or checkpoint (the reason is
    printed on stderr).
    """
    import fastcl

    from .checkpoint import CheckpointError
    from .config import ConfigError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    demo_given = [k for k in _DEMO_ONLY if getattr(args, k) is not None]
    prefix = "fastcl.train: error: "
    try:
        from .distributed import world_size_from_env

        world = world_size_from_env()
        if world > 1:
            prefix = f"fastcl.train: error (rank {os.environ.get('RANK', '?')}): "
        if args.demo or not argv or demo_given:
            if world > 1:
                raise ConfigError(f"the demo runs on one process (WORLD_SIZE is {world}); give "
                                  f"the options of a run (--task, --batch-size, ...) to train on "
                                  f"several processes")
            extra = sorted(k for k, v in vars(args).items()
                           if v is not None and k not in _DEMO_OK + _DEMO_ONLY + ("demo",))
            if extra:
                raise ConfigError("the demo takes only --seed, --device, --log, --plot, "
                                  "--no-progress, --pairs-batch, --pairs-steps and "
                                  "--digits-epochs; got " + ", ".join("--" + k.replace("_", "-")
                                                                    for k in extra))
            from .demo import run_demo

            run_demo(seed=args.seed or 0, device=args.device or "auto",
                     pairs_batch=args.pairs_batch, pairs_steps=args.pairs_steps or 4,
                     digits_epochs=args.digits_epochs or 20, progress=args.progress is not False,
                     log=args.log, plot=args.plot)
            return 0
        cfg = config_from_args(args)
        from .loop import train

        result = train(cfg, echo=print)
    except (ConfigError, CheckpointError, fastcl.BackendUnavailableError) as exc:
        print(f"{prefix}{exc}", file=sys.stderr)
        return 2
    if result.rank != 0:
        return 0
    if result.stopped_early:
        print(f"stopped at step {result.global_step}; continue with --resume {cfg.checkpoint}")
    else:
        last = result.metrics()
        shown = {k: round(v, 4) for k, v in last.items()
                 if isinstance(v, float) and k != "epoch_time_s"}
        print(f"done: {result.global_step} steps, {shown}")
    return 0


_DEMO_OK = ("seed", "device", "log", "plot", "progress")
_DEMO_ONLY = ("pairs_batch", "pairs_steps", "digits_epochs")
