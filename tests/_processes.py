"""Run a worker script as the ranks of a gloo process group (environment variable init)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    """A TCP port of this host that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script_text: str, tmp_path, args=(), world: int = 2, timeout: float = 240,
              env_extra=None) -> None:
    """Run ``script_text`` as ``world`` processes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT`` set) and assert that each exits with 0 after printing ``ok <rank>``."""
    script = tmp_path / "worker.py"
    script.write_text(script_text)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(world), **(env_extra or {}))
    env.pop("TRITON_INTERPRET", None)
    procs = [subprocess.Popen([sys.executable, str(script), *args], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out
        assert f"ok {r}" in out
