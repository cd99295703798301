"""The README's examples run as written: its API block on small random inputs, its training
command line through the CLI's parser."""

from __future__ import annotations

import os
import re
import shlex
from types import SimpleNamespace

import torch

from fastcl.train.cli import build_parser, config_from_args

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks(lang: str) -> list[str]:
    text = open(README).read()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def test_api_block_runs():
    (code, *_rest) = _blocks("python")
    g = torch.Generator().manual_seed(0)

    def x(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(True)

    n, d = 12, 8
    env = dict(
        q=x(n, d), k=x(n, d), queue=torch.randn(20, d, generator=g),
        image_features=x(n, d), text_features=x(n, d),
        model=SimpleNamespace(logit_scale=torch.nn.Parameter(torch.tensor(2.0))),
        z1=x(n, d), z2=x(n, d), features=x(n, 2, d), labels=torch.arange(n) % 4,
        views=x(3, n, d), img=x(n, d), txt=x(n, d),
        logit_scale=torch.tensor(10.0, requires_grad=True),
        logit_bias=torch.tensor(-10.0, requires_grad=True),
        queries=torch.randn(5, d, generator=g), corpus=torch.randn(40, d, generator=g),
    )
    seen = env["_seen"] = []
    # every "loss = ..." line also keeps its loss
    code, count = re.subn(r"^(loss = [^#\n]*?)(\s*#.*)?$", r"\1; _seen.append(loss)\2", code,
                          flags=re.M)
    exec(compile(code, README, "exec"), env)  # noqa: S102 (the README's own example)
    assert count >= 8 and len(seen) == count
    for loss in seen:
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
    assert env["values"].shape == (5, 16) and env["indices"].shape == (5, 16)
    assert env["model"].logit_scale.grad is not None


def test_training_command_line_parses():
    commands = [c for c in _blocks("bash") if "fastcl.train" in c]
    assert commands
    for cmd in commands:
        argv = shlex.split(cmd.replace("\\\n", " "))
        argv = argv[argv.index("fastcl.train") + 1:]
        config_from_args(build_parser().parse_args(argv))
