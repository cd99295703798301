"""Run a worker script as the ranks of a gloo process group (environment variable init)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

import torch.distributed as dist

TESTS = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    """A TCP port of this host that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script_text: str, tmp_path, args=(), world: int = 2, timeout: float = 240,
              env_extra=None) -> None:
    """Run ``script_text`` as ``world`` processes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT`` set, this folder on ``PYTHONPATH``) and assert that each exits with 0 after
    printing ``ok <rank>`` (see :func:`process_group`)."""
    script = tmp_path / "worker.py"
    script.write_text(script_text)
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(world), PYTHONPATH=path, **(env_extra or {}))
    env.pop("TRITON_INTERPRET", None)
    procs = [subprocess.Popen([sys.executable, str(script), *args], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out
        assert f"ok {r}" in out


@contextlib.contextmanager
def process_group():
    """In a worker of :func:`run_ranks`: ``(rank, world)`` of the gloo group initialized from
    the environment; on a clean exit, a barrier, the group torn down and ``ok <rank>`` printed."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        yield rank, dist.get_world_size()
        dist.barrier()  # no rank tears down its connections while another still uses them
    finally:
        dist.destroy_process_group()
    print("ok", rank)
