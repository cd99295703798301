"""Memory probes of the kernel tests.

:class:`LargestAllocation` records the largest tensor an operator creates while it is active
(the tests assert that nothing of ``N x M`` size appears). :func:`peak_rss_growth` measures the
peak resident-memory growth of a snippet in a fresh Python process (Linux): the snippet gets ``reset_peak()`` (clears the kernel's high-water mark and records the current
RSS) and ``peak_growth()`` (bytes of the high-water mark above that record), and prints the
growth on its last line. A system where ``/proc/self/clear_refs`` cannot be written, or a probe
that outlives its timeout on a loaded machine, skips the calling test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

class LargestAllocation(TorchDispatchMode):
    """``largest``: ``(elements, op)`` of the largest tensor output while active;
    ``largest_bytes``: ``(bytes, op)`` of the largest in bytes."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None)
        self.largest_bytes = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                if t.numel() > self.largest[0]:
                    self.largest = (t.numel(), str(func))
                if t.numel() * t.element_size() > self.largest_bytes[0]:
                    self.largest_bytes = (t.numel() * t.element_size(), str(func))
        return out


PRELUDE = textwrap.dedent("""
    import sys

    import torch

    def _rss(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    _BASE = [0]

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _BASE[0] = _rss("VmRSS")

    def peak_growth():
        return _rss("VmHWM") - _BASE[0]
""")


def peak_rss_growth(snippet: str, *argv, env: dict | None = None, timeout: float = 900) -> int:
    """Run ``snippet`` (after :data:`PRELUDE`) with ``argv``; return the growth it printed."""
    script = PRELUDE + textwrap.dedent(snippet)
    try:
        out = subprocess.run([sys.executable, "-c", script, *map(str, argv)],
                             env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:  # pragma: no cover - a heavily loaded machine
        pytest.skip("memory probe timed out")
    if out.returncode != 0 and "clear_refs" in out.stderr:
        pytest.skip("cannot reset the peak RSS on this system (/proc/self/clear_refs)")
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])
