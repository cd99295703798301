"""Command line: ``python -m fastcl info`` prints versions, devices and available backends."""

from __future__ import annotations

import argparse
import platform
import sys
import warnings


def info() -> str:
    import torch

    import fastcl
    from fastcl import dispatch

    lines = [
        f"fastcl      {fastcl.__version__}",
        f"python      {platform.python_version()} ({sys.executable})",
        f"torch       {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
    ]
    try:
        import triton

        lines.append(f"triton      {triton.__version__}")
    except Exception as exc:  # pragma: no cover - depends on the install
        lines.append(f"triton      not importable ({exc.__class__.__name__})")
    if torch.cuda.is_available():
        devices = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"devices     cpu, cuda: {devices}")
    else:
        lines.append("devices     cpu (no CUDA device visible)")
    lines.append("backends")
    for name, reason in dispatch.available().items():
        lines.append(f"  {name:<10}{'available' if reason is None else 'unavailable: ' + reason}")
    lines.append(f"  {'reference':<10}available (plain PyTorch oracle, N x M memory)")
    for dev in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chosen = dispatch.select("info_nce", torch.device(dev), torch.float32)
        lines.append(f"auto        info_nce on {dev} float32 -> {chosen}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastcl", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="versions, devices and available backends")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
