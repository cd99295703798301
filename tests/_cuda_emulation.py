"""Builds the CUDA backend of ``fastcl._C`` for the CUDA emulation of ``tests/cuda_emulation``.

The sources of ``csrc/cuda`` are copied to ``build/cuda-emulation/src`` with two rewrites, then
compiled by the host compiler against the emulation's CUDA headers (``include/``):

- every launch ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
  ``::emu::launch(kernel, grid, block, smem, stream)(args)``;
- the drivers' device type ``c10::DeviceType::CUDA`` becomes ``c10::DeviceType::CPU``, so that
  their argument checks take the CPU tensors on which the emulated kernels run.

Nothing else changes: the drivers, their GEMMs (ATen's, on the CPU) and the kernels are the code
of the GPU build. :func:`load` returns the module, whose functions are those of ``fastcl._C``
(``contrastive_fwd_cuda`` ...), on CPU tensors.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
BUILD = ROOT / "build" / "cuda-emulation"

_LAUNCH = re.compile(r"<<<(?P<config>[^;]*?)>>>\(")


def rewrite_launches(text: str) -> str:
    """``kernel<<<config>>>(`` -> ``::emu::launch(kernel, config)(``; the kernel's name (with its
    template arguments) is what precedes ``<<<`` back to the start of the statement."""
    out, pos = [], 0
    for m in _LAUNCH.finditer(text):
        start = _statement_start(text, m.start())
        head = text[start:m.start()]
        name = head.strip()
        out.append(text[pos:start] + head[: len(head) - len(head.lstrip())])
        out.append(f"::emu::launch({name}, {m.group('config').strip()})(")
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def _statement_start(text: str, end: int) -> int:
    i = end
    while i > 0 and text[i - 1] not in ";{}\n":
        i -= 1
    return i


def _copy_sources(dst: Path) -> list[Path]:
    """The rewritten copies of csrc/cuda (and the headers of csrc it includes) and of the emulation's self-test
    kernels; returns the translation units."""
    (dst / "cuda").mkdir(parents=True, exist_ok=True)
    for header in ("checks.h", "signatures.h"):
        shutil.copy2(ROOT / "csrc" / header, dst / header)
    sources = sorted((ROOT / "csrc" / "cuda").iterdir()) + [EMULATION / "selftest.cu"]
    units = []
    for src in sources:
        text = src.read_text()
        if src.suffix == ".cu":
            text = rewrite_launches(text)
            if "<<<" in text:
                raise RuntimeError(f"{src}: a launch the rewrite did not recognize")
        text = text.replace("c10::DeviceType::CUDA", "c10::DeviceType::CPU")
        name = src.name + ".cpp" if src.suffix == ".cu" else src.name
        out = dst / "cuda" / name
        if not out.exists() or out.read_text() != text:  # keep the build's timestamps
            out.write_text(text)
        if out.suffix == ".cpp":
            units.append(out)
    return units


def asan_preload() -> str:
    """The LD_PRELOAD under which a process can import the AddressSanitizer build (the
    sanitizer's runtime, then the C++ runtime whose exceptions it intercepts); "" if the
    compiler has no AddressSanitizer."""
    import subprocess

    libs = []
    for name in ("libasan.so", "libstdc++.so.6"):
        path = subprocess.run(["c++", "-print-file-name=" + name], capture_output=True,
                              text=True).stdout.strip()
        if not os.path.isabs(path):
            return ""
        libs.append(path)
    return " ".join(libs)


_LOADED: dict = {}


def sanitizer_preloaded() -> bool:
    """Whether this process runs under the AddressSanitizer preload (:func:`asan_preload`)."""
    return "libasan" in os.environ.get("LD_PRELOAD", "")


def load(verbose: bool = False, sanitize: bool = False):
    """Compiles (once; ninja rebuilds what changed) and imports the emulated CUDA backend; a
    second call in the process returns the module of the first.

    ``sanitize``: the build with AddressSanitizer (every access of the drivers and kernels
    checked against the bounds of its allocation) and the alignment check of the undefined
    behaviour sanitizer (a vector load or store at an address its type does not allow, which
    faults on a GPU, stops the process), which the process must have preloaded
    (:func:`asan_preload`, with ``ASAN_OPTIONS=detect_leaks=0``).
    """
    from torch.utils.cpp_extension import load as load_extension

    if sanitize in _LOADED:
        return _LOADED[sanitize]
    if sanitize and not sanitizer_preloaded():
        raise RuntimeError("the AddressSanitizer build needs LD_PRELOAD="
                           f"\"{asan_preload()}\" ASAN_OPTIONS=detect_leaks=0")
    src = BUILD / "src"
    units = _copy_sources(src)
    name = "fastcl_cuda_emulated" + ("_asan" if sanitize else "")
    build = BUILD / ("obj-asan" if sanitize else "obj")
    build.mkdir(parents=True, exist_ok=True)
    sanitizers = ["-fsanitize=address,alignment", "-fno-sanitize-recover=alignment"]
    flags = ["-O1", "-g", "-fno-omit-frame-pointer"] + sanitizers if sanitize else ["-O2"]
    module = load_extension(
        name=name,
        sources=[str(p) for p in units] + [str(EMULATION / "emu.cpp"),
                                           str(EMULATION / "module.cpp")],
        extra_include_paths=[str(EMULATION / "include"), str(EMULATION), str(src)],
        extra_cflags=flags + ["-Wall"],
        extra_ldflags=sanitizers if sanitize else [],
        build_directory=str(build),
        with_cuda=False,
        verbose=verbose,
    )
    _LOADED[sanitize] = module
    return module
