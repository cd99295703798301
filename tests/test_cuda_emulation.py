"""The CUDA emulation of tests/cuda_emulation, which runs the CUDA backend's own drivers and
kernels on the CPU (``tests/gpu_tests_on_cpu.py``): the launch rewrite, and that the emulated
execution model computes shuffles and barriers right and reports the faults it must report."""

from __future__ import annotations

import pytest
import torch

import _cuda_emulation

INVALID_CONFIGURATION = 9
LAUNCH_FAILURE = 719


@pytest.fixture(scope="module")
def emu():
    """The emulation; its sanitized build in a process that preloads the sanitizer (as
    ``make test`` runs this file), so that one build serves this file and the CUDA suites."""
    return _cuda_emulation.load(sanitize=_cuda_emulation.sanitizer_preloaded())


def test_rewrite_launches_keeps_template_arguments_and_indentation():
    src = ("  if (a) {\n    k<float, __half><<<grid, dim3(32, 8), 0, stream>>>(args, 2);\n"
           "  }\n  other<<<1, n, 0, s>>>(p);\n")
    out = _cuda_emulation.rewrite_launches(src)
    assert out == ("  if (a) {\n"
                   "    ::emu::launch(k<float, __half>, grid, dim3(32, 8), 0, stream)(args, 2);\n"
                   "  }\n  ::emu::launch(other, 1, n, 0, s)(p);\n")


def test_sources_have_no_launch_left_after_the_rewrite(tmp_path):
    units = _cuda_emulation._copy_sources(tmp_path)
    kernels = [u for u in units if u.name.endswith(".cu.cpp")]
    assert len(kernels) >= 3  # the contrastive and sigmoid kernels, the self-test
    for unit in kernels:
        text = unit.read_text()
        assert "<<<" not in text and "::emu::launch(" in text, unit.name


@pytest.mark.parametrize("tx,ty", [(32, 1), (64, 2), (1024, 1), (32, 32)])
def test_shuffles_and_barriers_compute_a_block_sum(emu, tx, ty):
    blocks = 3
    out = torch.full((blocks,), -1, dtype=torch.int64)
    code, msg = emu.selftest_block_sum(out, tx, ty)
    assert code == 0, msg
    n = tx * ty
    want = torch.tensor([1000 * b * n + n * (n - 1) // 2 for b in range(blocks)])
    assert torch.equal(out, want)


@pytest.mark.parametrize("tx,ty", [(2048, 1), (32, 33), (0, 1)])
def test_a_block_the_hardware_refuses_fails_the_launch(emu, tx, ty):
    out = torch.zeros(1, dtype=torch.int64)
    code, msg = emu.selftest_block_sum(out, tx, ty)
    assert code == INVALID_CONFIGURATION and "block" in msg


def test_a_shuffle_reached_by_half_a_warp_fails_the_launch(emu):
    code, msg = emu.selftest_divergent_shuffle(torch.zeros(32, dtype=torch.int32))
    assert code == LAUNCH_FAILURE
    assert "16 of the 32 lanes" in msg


def test_a_missing_barrier_changes_the_result(emu):
    threads = 256
    want = torch.arange(1, threads + 1, dtype=torch.int32) % threads
    out = torch.zeros(threads, dtype=torch.int32)
    for stamp in (1000, 2000):
        assert emu.selftest_neighbour(out, stamp, True)[0] == 0
        assert torch.equal(out, want + stamp)
    # without the barrier, the threads that run before their neighbour read the last launch's
    # value: the emulation's order of threads makes such a race visible
    assert emu.selftest_neighbour(out, 3000, False)[0] == 0
    assert (out != want + 3000).any()
    assert (out == want + 2000).any()


_SANITIZED = """
import sys, torch
sys.path.insert(0, {tests!r})
import _cuda_emulation
emu = _cuda_emulation.load(sanitize=True)
{body}
print("ran")
"""

_SHIFTED_COPY = """
out = torch.zeros(32, dtype=torch.int32)
code, msg = emu.selftest_shifted_copy(torch.arange({n}, dtype=torch.int32), out)
assert code == 0, msg
assert torch.equal(out, torch.arange(1, 33, dtype=torch.int32)), out
"""

_VECTOR_LOAD = """
x = torch.arange(4 * 32 + 4, dtype=torch.float32)
out = torch.zeros(32)
code, msg = emu.selftest_vector_load(x, out, {offset})
assert code == 0, msg
assert torch.equal(out, x[{offset}::4][:32]), out
"""


def _run_sanitized(body: str):
    import os
    import subprocess
    import sys

    env = dict(os.environ, LD_PRELOAD=_cuda_emulation.asan_preload(),
               ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1")
    code = _SANITIZED.format(tests=str(_cuda_emulation.ROOT / "tests"), body=body)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=1200)


@pytest.mark.skipif(not _cuda_emulation.asan_preload(), reason="no AddressSanitizer here")
@pytest.mark.parametrize("body,fault,kernel", [
    (_SHIFTED_COPY.format(n=33), None, None),
    (_SHIFTED_COPY.format(n=32), "heap-buffer-overflow", "shifted_copy_kernel"),
    (_VECTOR_LOAD.format(offset=4), None, None),
    (_VECTOR_LOAD.format(offset=1), "misaligned address", "vector_load_kernel"),
], ids=["in-bounds", "read-past-the-end", "aligned-vector", "misaligned-vector"])
def test_the_sanitized_build_reports_faults(body, fault, kernel):
    """The sanitized build (make test runs the CUDA suites with it) stops a kernel that reads one
    element past its input, or loads a 16-byte vector from an address that is not a multiple of
    16 (a fault on a GPU), with a report naming the kernel; the same kernels in bounds and
    aligned run."""
    proc = _run_sanitized(body)
    if fault is None:
        assert proc.returncode == 0 and "ran" in proc.stdout, proc.stderr[-3000:]
    else:
        assert proc.returncode != 0
        assert fault in proc.stderr and kernel in proc.stderr, proc.stderr[-3000:]
