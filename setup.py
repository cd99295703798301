"""Build fastcl and its compiled extension ``fastcl._C``.

- torch built with CUDA and ``nvcc`` found (``CUDA_HOME`` or the PATH): a ``CUDAExtension`` with
  the CPU and CUDA sources, compiled for sm_80 and sm_90 (``TORCH_CUDA_ARCH_LIST`` overrides),
  also on a machine without a GPU;
- otherwise a ``CppExtension`` with the CPU sources only;
- ``FASTCL_BUILD_EXT=0``: no extension, pure Python (the reference and Triton backends only).

The Triton kernels in ``kernels/`` are installed as the subpackage ``fastcl.kernels``.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = find_packages(include=["fastcl", "fastcl.*"]) + ["fastcl.kernels"]


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def _extensions():
    if os.environ.get("FASTCL_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3", "-Wall", "-Wno-unused-function"]
    if os.environ.get("FASTCL_WERROR", "0") == "1":
        cxx_flags.append("-Werror")
    cpu_sources = _sources("csrc/bindings.cpp") + _sources("csrc/cpu/**/*.cpp")
    cuda_sources = _sources("csrc/cuda/**/*.cu") + _sources("csrc/cuda/**/*.cpp")
    use_cuda = (
        torch.version.cuda is not None
        and _find_nvcc() is not None
        and os.environ.get("FASTCL_BUILD_CUDA", "1") != "0"
    )
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        if os.environ.get("FASTCL_WERROR", "0") == "1":
            nvcc_flags += ["-Werror", "all-warnings"]
        ext = CUDAExtension(
            "fastcl._C",
            cpu_sources + cuda_sources,
            define_macros=[("FASTCL_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags + ["-fopenmp"], "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "fastcl._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx_flags + ["-fopenmp"]},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir={"fastcl.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
