"""Every Triton kernel compiled ahead of time for sm_80 and sm_90, without a GPU.

The other Triton tests run the kernels under Triton's interpreter on machines without a GPU,
which checks their math but not that they compile for hardware: the interpreter accepts code
that the compiler rejects (shape and type rules of ``tl.dot``, layouts, ``static_assert`` on
real block sizes) and knows nothing of shared memory or registers. Here each kernel goes
through ``triton.compile`` down to a cubin for ``GPUTarget("cuda", 80 | 90, 32)``.

What is compiled is taken from the launch code itself. A worker process imports
``fastcl.kernels`` in compiled mode (``TRITON_INTERPRET`` unset: those modules pick some device
helpers differently under the interpreter), replaces every autotuned launcher in the modules'
``_TUNED`` tables by a recorder and calls the public launch wrappers (``contrastive_fwd``,
``siglip_bwd``, ``topk_fwd``, ...) on small CPU tensors. Each recorded launch gives the kernel,
its arguments and constexpr flags, and the autotuner's configurations (after its pruning
hook); the signature follows the kernel's parameter list and Triton's launch specialization
(``*dtype`` pointers, 16-divisible integers, integers equal to 1 as constants). A scenario of
this file is one call of a launch wrapper (a mode, a dtype, a feature width); a task compiles
the first configuration of every launch of a scenario (the one launched with
``FASTCL_AUTOTUNE=0``) or its largest one (``_default_plan`` says which), for one
architecture.

A test fails when a kernel does not compile, when a cubin is missing, or when a first
configuration needs more shared memory than a block has. Another configuration over the
limit is reported as a warning (the autotuner skips a configuration that runs out of
resources), and so are register spills (``cuobjdump``'s stack frame; the current kernels spill
in several configurations, slower but correct).

All compilations run in ``FASTCL_COMPILE_JOBS`` worker processes (default: the CPU count, at
most 2) with a private Triton cache, once per session; each test reads its results.
``FASTCL_COMPILE_ALL=1`` compiles every configuration of every scenario on both
architectures instead (tens of minutes; it also checks that every launch keeps a
configuration that fits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import pytest

pytest.importorskip("triton")

#: compute capability -> largest shared memory of one block (bytes, opt-in maximum)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


# --------------------------------------------------------------------------------------------
# scenarios: one call of a launch wrapper each
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    """One call of a launch wrapper of ``fastcl.kernels``.

    ``op``: the wrapper; ``dtype`` / ``D``: the features; ``tf32``: ``ALLOW_TF32`` during the
    call; ``kw``: the wrapper's mode arguments (see ``_call`` in the worker).
    """
    name: str
    op: str
    dtype: str
    D: int
    tf32: bool = False
    kw: tuple = ()

    @property
    def kwargs(self) -> dict:
        return dict(self.kw)


def _sc(op, dtype, D, tf32=False, **kw):
    tag = dtype + ("tf32" if tf32 else "")
    mode = "-".join(k if v is True else f"{k}={v}" for k, v in kw.items() if v is not False)
    name = f"{op}-{tag}-D{D}" + (f"-{mode}" if mode else "")
    return Scenario(name, op, dtype, D, tf32, tuple(kw.items()))


# The tilings of the launch code (kernels.contrastive._tiling): fp32 on CUDA cores ("fma") with
# the whole feature dimension resident (D <= 32) or looped over in chunks; the tensor-core
# family ("mma": bf16, fp16, fp32 with TF32) resident (D <= 128) or chunked (wider D, where the
# backward also splits its output over BLOCK_DV slices). fp16 adds the rescaling of G; fp32
# with TF32 has the largest tiles (4-byte elements on the tensor-core tile sizes).
FMA_SINGLE, FMA_CHUNKED = ("fp32", 32, False), ("fp32", 768, False)
TF32_SINGLE, TF32_CHUNKED = ("fp32", 128, True), ("fp32", 768, True)
BF16_SINGLE, BF16_CHUNKED = ("bf16", 128, False), ("bf16", 768, False)
FP16_SINGLE, FP16_CHUNKED = ("fp16", 64, False), ("fp16", 768, False)
TILINGS = [FMA_SINGLE, FMA_CHUNKED, TF32_SINGLE, TF32_CHUNKED, BF16_SINGLE, BF16_CHUNKED,
           FP16_SINGLE, FP16_CHUNKED]
# The contrastive and SigLIP backward at D = 768 go by slabs (kernels.contrastive.SLAB_MIN_D:
# the kernels with STORE_G write tiles of G); between the resident width and SLAB_MIN_D they are
# the one-launch kernels over BLOCK_DV slices of the output, compiled on these tilings.
FMA_MID, TF32_MID = ("fp32", 96, False), ("fp32", 256, True)
BF16_MID, FP16_MID = ("bf16", 256, False), ("fp16", 256, False)
MID_TILINGS = [FMA_MID, TF32_MID, BF16_MID, FP16_MID]

# Heaviest modes: every switch that adds work to a tile at once.
_HEAVY = {
    "contrastive_fwd": dict(labels=True, exclude_diag=True, decoupled=True, pos_lse=True,
                            col_stats=True, lse2=True),
    "contrastive_bwd": dict(labels=True, exclude_diag=True, decoupled=True, pos_lse=True,
                            col_stats=True, grads="lse,pos,mean,col_lse,col_mean,lse2"),
    "siglip_fwd": dict(diag_pos=True),
    "siglip_bwd": dict(diag_pos=True),
    "siglip_fused": dict(diag_pos=True, mean=True),
    "topk": dict(k=10, exclude_self=True),
}


def _heavy(op, tiling):
    dtype, D, tf32 = tiling
    return _sc(op, dtype, D, tf32, **_HEAVY[op])


# The other modes the losses launch, on one tiling each (the switches only change the
# element-wise code of a tile, not its tiling).
_MODES = [
    _sc("contrastive_fwd", "bf16", 768, targets=True, col_stats=True),          # CLIP / InfoNCE
    _sc("contrastive_fwd", "fp32", 32, targets=True, exclude_diag=True, decoupled=True),
    _sc("contrastive_fwd", "fp16", 64, labels=True, exclude_diag=True),         # SupCon
    _sc("contrastive_fwd", "bf16", 128),                                        # no positives
    # self-similarity by slabs (the half square, its merge and finalize passes)
    _sc("contrastive_fwd", "bf16", 768, labels=True, exclude_diag=True, pos_lse=True,
        self_sim=True),                                                         # SupCon
    _sc("contrastive_fwd", "fp32", 768, targets=True, exclude_diag=True, self_sim=True),
    _sc("contrastive_fwd", "bf16", 1024, targets=True, exclude_diag=True, self_sim=True),
    _sc("contrastive_fwd", "fp32", 768, tf32=True, targets=True, exclude_diag=True,
        decoupled=True, self_sim=True),                                         # DCL
    _sc("contrastive_fwd", "bf16", 768, labels=True, exclude_diag=True, pos_lse=True,
        self_sim=True, lse2=True),                          # every field of the half square
    _sc("contrastive_fwd", "bf16", 128, targets=True, exclude_diag=True, decoupled=True,
        lse2=True),                                                             # HCL, two views
    _sc("contrastive_bwd", "bf16", 768, targets=True, col_stats=True, grads="lse,pos,col_lse"),
    _sc("contrastive_bwd", "fp32", 32, targets=True, exclude_diag=True, decoupled=True,
        grads="lse,pos"),
    _sc("contrastive_bwd", "fp16", 64, labels=True, exclude_diag=True, grads="lse,pos,mean"),
    _sc("contrastive_bwd", "bf16", 128, labels=True, grads="mean"),
    _sc("contrastive_bwd", "fp32", 768, tf32=True, labels=True, exclude_diag=True, pos_lse=True,
        grads="pos"),
    # self-similarity (NT-Xent, SupCon): one launch with both orientations of G per tile
    _sc("contrastive_bwd", "bf16", 128, labels=True, exclude_diag=True, pos_lse=True,
        self_sim=True, grads="lse,pos"),
    _sc("contrastive_bwd", "fp32", 768, tf32=True, targets=True, exclude_diag=True,
        decoupled=True, self_sim=True, grads="lse,pos"),
    _sc("contrastive_bwd", "fp32", 32, targets=True, exclude_diag=True, self_sim=True,
        grads="lse,pos"),
    _sc("contrastive_bwd", "fp16", 64, labels=True, exclude_diag=True, self_sim=True,
        grads="lse,pos,mean"),
    _sc("contrastive_bwd", "bf16", 768, targets=True, exclude_diag=True, decoupled=True,
        self_sim=True, grads="lse,pos,lse2"),                                   # HCL
    _sc("contrastive_bwd", "fp16", 64, targets=True, exclude_diag=True, decoupled=True,
        self_sim=True, grads="lse,pos,lse2"),
    _sc("siglip_fwd", "bf16", 768, diag_pos=False),
    _sc("siglip_bwd", "fp16", 64, diag_pos=False),
    _sc("siglip_fused", "bf16", 128, diag_pos=False, mean=False),
]

# Every heavy scenario on every tiling, and the modes (the full sweep uses them all).
SCENARIOS = ([_heavy(op, t) for op in _HEAVY for t in TILINGS]
             + [_heavy(op, t) for op in ("contrastive_bwd", "siglip_fused")
                for t in MID_TILINGS] + _MODES
             + [_sc("topk", "bf16", 128, k=1024, exclude_self=False)])
assert len({s.name for s in SCENARIOS}) == len(SCENARIOS)


@dataclass(frozen=True)
class Task:
    """Compile the ``select``ed configurations of every launch of ``scenario`` for ``arch``."""
    scenario: Scenario
    select: str      # "first" | "largest" | "all"
    arch: int

    @property
    def id(self) -> str:
        return f"sm{self.arch}-{self.scenario.name}-{self.select}"


def _default_plan():
    """``[(scenario, select, archs)]`` of the default run (about three minutes on two cores).

    - the first configuration (the launch of ``FASTCL_AUTOTUNE=0``) of every launch of the
      heavy modes of the contrastive kernels on six tilings, of the fused SigLIP passes
      (row-parallel with the loss, column-parallel) and the SigLIP forward on four and two;
    - the largest configuration (``_footprint``) of every launch of these heavy modes on the
      tilings with the biggest tiles of each family (fp32 resident and chunked, on CUDA cores
      and with TF32);
    - the one-launch backward between the resident width and ``SLAB_MIN_D`` (the wide
      tilings above take the backward by slabs): contrastive, first configuration on the four
      ``MID_TILINGS`` and largest on the fp32 ones; fused SigLIP, first on two, largest with
      TF32;
    - the other modes (first configuration);
    - top-k, whose merge network keeps ptxas busy for tens of seconds (above a minute for an
      fp32 tile on sm_80): the first configuration of both families and of the widest merge
      (``k = 1024``) for sm_90, of the tensor-core family for sm_80.

    Every other configuration, tiling and top-k case is in the full sweep
    (``FASTCL_COMPILE_ALL=1``).
    """
    both = sorted(SHARED_LIMIT)
    six = [FMA_SINGLE, FMA_CHUNKED, TF32_SINGLE, TF32_CHUNKED, BF16_CHUNKED, FP16_SINGLE]
    plan = [(_heavy(op, t), "first", both)
            for op in ("contrastive_fwd", "contrastive_bwd") for t in six]
    plan += [(_heavy("siglip_fused", t), "first", both)
             for t in (FMA_SINGLE, TF32_SINGLE, BF16_CHUNKED, FP16_SINGLE)]
    plan += [(_heavy("siglip_fwd", t), "first", both) for t in (FMA_CHUNKED, TF32_SINGLE)]
    big = {"contrastive_fwd": [FMA_SINGLE, TF32_SINGLE],
           "contrastive_bwd": [FMA_SINGLE, FMA_CHUNKED, TF32_SINGLE, TF32_CHUNKED],
           "siglip_fused": [FMA_SINGLE, FMA_CHUNKED, TF32_SINGLE, TF32_CHUNKED],
           "siglip_fwd": [FMA_CHUNKED, TF32_SINGLE]}
    plan += [(_heavy(op, t), "largest", both) for op, ts in big.items() for t in ts]
    plan += [(_heavy("contrastive_bwd", t), "first", both) for t in MID_TILINGS]
    plan += [(_heavy("contrastive_bwd", t), "largest", both) for t in (FMA_MID, TF32_MID)]
    plan += [(_heavy("siglip_fused", t), "first", both) for t in (FMA_MID, BF16_MID)]
    plan += [(_heavy("siglip_fused", TF32_MID), "largest", both)]
    plan += [(sc, "first", both) for sc in _MODES]
    plan += [(_heavy("topk", FMA_CHUNKED), "first", [90]),
             (_sc("topk", "bf16", 128, k=1024, exclude_self=False), "first", [90]),
             (_heavy("topk", BF16_SINGLE), "first", [80])]
    return plan


def _tasks():
    if os.environ.get("FASTCL_COMPILE_ALL", "0") == "1":
        plan = [(sc, "all", sorted(SHARED_LIMIT)) for sc in SCENARIOS]
    else:
        plan = _default_plan()
    return [Task(sc, select, arch) for sc, select, archs in plan for arch in archs]


TASKS = _tasks()


# --------------------------------------------------------------------------------------------
# worker (a separate process: kernels imported in compiled mode)
# --------------------------------------------------------------------------------------------

_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _call(mods, sc: Scenario):
    """Run the launch wrapper of ``sc`` on small CPU tensors (the launches are recorded)."""
    import torch

    C, S, T = mods
    kw = sc.kwargs
    dtype = getattr(torch, _TORCH_DTYPES[sc.dtype])
    N = 256
    g = torch.Generator().manual_seed(0)
    q = torch.randn(N, sc.D, generator=g).to(dtype)
    k = torch.randn(N, sc.D, generator=g).to(dtype)
    scale = torch.tensor(10.0)
    bias = torch.tensor(-1.0)
    C.ALLOW_TF32 = sc.tf32
    C.AUTOTUNE = True
    if sc.op in ("contrastive_fwd", "contrastive_bwd"):
        targets = torch.arange(N) if kw.get("targets") else None
        labels = torch.randint(0, 8, (N,), generator=g) if kw.get("labels") else None
        flags = (bool(kw.get("exclude_diag")), bool(kw.get("decoupled")),
                 bool(kw.get("pos_lse")), bool(kw.get("col_stats")))
        if sc.op == "contrastive_fwd":
            C.contrastive_fwd(q, None if kw.get("self_sim") else k, scale, bias, targets,
                              labels, labels, *flags, 0.5 if kw.get("lse2") else 0.0)
            return
        grads = kw["grads"].split(",")
        vec = torch.ones(N)

        def grad(name):
            return vec if name in grads else None

        C.contrastive_bwd(grad("lse"), grad("pos"), grad("mean"), grad("col_lse"),
                          grad("col_mean"), q, None if kw.get("self_sim") else k, scale, bias,
                          targets, labels, labels, vec, vec, vec, vec, *flags, grad("lse2"),
                          vec, 0.5)
    elif sc.op == "siglip_fwd":
        S.siglip_fwd(q, k, scale, bias, kw["diag_pos"])
    elif sc.op == "siglip_bwd":
        S.siglip_bwd(torch.ones(N), q, k, scale, bias, kw["diag_pos"])
    elif sc.op == "siglip_fused":
        S.siglip_fused(q, k, scale, bias, kw["diag_pos"], kw["mean"])
    elif sc.op == "topk":
        key = torch.randn(max(N, 2 * kw["k"]), sc.D, generator=g).to(dtype)
        T.topk_fwd(q, key, kw["k"], kw["exclude_self"])
    else:
        raise ValueError(f"unknown op {sc.op}")


@dataclass
class _Launch:
    table: str                 # "module._TUNED[key]"
    tuner: object              # the triton Autotuner
    args: tuple
    flags: dict


class _Recorder:
    """Stands in for an autotuned launcher: ``rec[grid](*args, **flags)`` records the launch."""

    def __init__(self, table, tuner, sink):
        self.table, self.tuner, self.sink = table, tuner, sink

    def __getitem__(self, grid):
        def launch(*args, **flags):
            self.sink.append(_Launch(self.table, self.tuner, args, flags))
        return launch


def _configs(launch: _Launch):
    tuner = launch.tuner
    named = dict(zip(tuner.fn.arg_names, launch.args), **launch.flags)
    configs = list(tuner.configs)
    prune = getattr(tuner, "early_config_prune", None)
    if prune is not None:
        configs = list(prune(configs, named))
    return configs


def _footprint(cfg, flags):
    """Estimated shared memory of a configuration (elements): the software-pipelined operand
    tiles of the logits (``num_stages`` copies; only the ``B`` tile when the whole of ``D`` is
    resident and ``A`` is loaded once), plus, in the passes with a second product
    ``G @ V``, the ``G`` tile and (chunked ``D``) the ``V`` slice. Ties: fewer warps (more
    registers per thread) first."""
    kw = dict(flags, **cfg.kwargs)
    m, n, d, stages = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_D"], cfg.num_stages
    single = bool(kw.get("SINGLE_D"))
    elems = stages * n * d + m * d if single else stages * (m + n) * d
    if "BLOCK_DV" in kw and kw.get("HAS_GRAD", True):
        elems += m * n + (0 if single else n * kw["BLOCK_DV"])
    return elems, -cfg.num_warps


def _select(configs, select, flags):
    if select == "first":
        return configs[:1]
    if select == "largest":
        return [max(configs, key=lambda c: _footprint(c, flags))]
    return configs


_TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
                 "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8",
                 "bool": "u1"}


def _signature(fn, values):
    """``(signature, constexprs, attrs)`` as Triton's launcher specializes these arguments."""
    import torch

    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.name not in values:
            raise KeyError(f"{fn.__name__}: no value for argument {p.name}")
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            consts[(i,)] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _TRITON_TYPES[str(v.dtype).replace("torch.", "")]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[p.name] = "fp32"               # a Python float is passed as fp32
        elif isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{fn.__name__}: unexpected value {v!r} for {p.name}")
        elif v == 1:
            sig[p.name] = "constexpr"          # the launcher turns 1 into a constant
            consts[(i,)] = 1
        else:
            sig[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _resources(cubin: bytes):
    """``(registers, stack bytes)`` of the kernel from ``cuobjdump -res-usage`` (None if absent)."""
    import re
    import shutil

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    if not os.path.exists(tool):
        tool = shutil.which("cuobjdump")
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", out.stdout)
    if m is None:
        return None, None
    return int(m.group(1)), int(m.group(2))


def _describe(launch: _Launch, sig, cfg):
    types = ",".join(sorted({t for t in sig.values() if t.startswith("*")}))
    flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                     for k, v in sorted(launch.flags.items()))
    return f"{launch.table} [{types}] ({flags}) config {cfg}"


def _compile(fn, sig, consts, attrs, options, arch):
    """Compile to a cubin; ``{ok, cubin, shared, regs, stack, seconds}`` or ``{ok, error}``."""
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.time()
    try:
        src = triton.compiler.ASTSource(fn, sig, consts, attrs)
        kern = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        cubin = kern.asm.get("cubin", b"")
        regs, stack = _resources(cubin)
        entry = dict(ok=True, cubin=len(cubin), shared=kern.metadata.shared, regs=regs,
                     stack=stack)
    except Exception as exc:
        chain, e = [], exc
        while e is not None and len(chain) < 5:
            chain.append(f"{type(e).__name__}: {e}")
            e = e.__cause__ or e.__context__
        entry = dict(ok=False, error="\n-- caused by --\n".join(chain)[-6000:])
    entry["seconds"] = round(time.time() - t0, 2)
    return entry


def _claimed(plan, claims: str):
    """The tasks of the groups of ``plan`` that this worker claims, one group at a time (the
    first worker to create a group's claim file takes it)."""
    os.makedirs(claims, exist_ok=True)
    for n, group in enumerate(plan):
        try:
            os.close(os.open(os.path.join(claims, str(n)), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        yield from group


def _worker(plan_path: str, out_path: str) -> None:
    """Record and compile the task groups of the plan (a JSON list of lists of tasks, one list
    per scenario, largest first) that no other worker has claimed; one JSON line per task."""
    os.environ.pop("TRITON_INTERPRET", None)
    import contextlib
    import importlib
    import pkgutil

    import torch
    import triton

    import fastcl.kernels as pkg
    from fastcl.kernels import contrastive as C
    from fastcl.kernels import siglip as S
    from fastcl.kernels import topk as T

    if C._INTERPRET:
        raise RuntimeError("fastcl.kernels was imported in interpreted mode")
    # the launch wrappers enter the tensors' CUDA device; the tensors here are on the CPU
    torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
    launches = []
    tables = {}
    kernels = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        kernels |= {name for name, obj in vars(mod).items()
                    if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel")
                    and obj.fn.__module__ == mod.__name__}
        for key, tuner in list(getattr(mod, "_TUNED", {}).items()):
            table = f"{info.name}._TUNED[{key!r}]"
            tables[table] = tuner.fn.__name__
            mod._TUNED[key] = _Recorder(table, tuner, launches)

    with open(plan_path) as f:
        plan = json.load(f)
    by_name = {sc.name: sc for sc in SCENARIOS}
    done = {}
    out = open(out_path, "a")

    def emit(rec):
        out.write(json.dumps(rec) + "\n")
        out.flush()

    emit({"launchers": tables, "kernels": sorted(kernels)})
    for item in _claimed(plan, plan_path + ".claims"):
        sc = by_name[item["scenario"]]
        launches.clear()
        try:
            _call((C, S, T), sc)
        except Exception as exc:  # reported by the test of this task
            emit({"task": item["id"], "error": f"launch wrapper failed: {exc!r}"})
            continue
        entries = []
        for n, launch in enumerate(launches if item["compile"] else []):
            configs = _configs(launch)
            for cfg in _select(configs, item["select"], launch.flags):
                values = dict(zip(launch.tuner.fn.arg_names, launch.args), **launch.flags,
                              **cfg.kwargs)
                sig, consts, attrs = _signature(launch.tuner.fn, values)
                options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                           "num_ctas": cfg.num_ctas}
                if getattr(cfg, "maxnreg", None) is not None:
                    options["maxnreg"] = cfg.maxnreg
                desc = _describe(launch, sig, cfg)
                key = repr((launch.tuner.fn.__name__, sorted(sig.items()),
                            sorted(consts.items()), sorted(attrs.items()),
                            sorted(options.items()), item["arch"]))
                if key not in done:
                    done[key] = _compile(launch.tuner.fn, sig, consts, attrs, options,
                                         item["arch"])
                entries.append(dict(done[key], what=desc, table=launch.table, launch=n,
                                    first=cfg is configs[0]))
        emit({"task": item["id"], "tables": sorted({x.table for x in launches}),
              "entries": entries})
    out.close()


# --------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------

def _cost(task: Task) -> float:
    """Rough compile seconds of a task (the costliest groups start first)."""
    sc = task.scenario
    if sc.op == "topk":
        c = 60.0 if task.arch == 80 else 20.0      # ptxas on the merge network
        if sc.dtype == "fp32" and not sc.tf32 and task.arch == 80:
            c = 90.0
    else:
        c = 2.0 * (1 + ("bwd" in sc.op or "fused" in sc.op or sc.kwargs.get("col_stats", 0)))
    return c * (6 if task.select == "all" else 1)


@pytest.fixture(scope="session")
def compiled(request, tmp_path_factory):
    """Results of the tasks: ``{task id: record}``, plus ``"launchers"`` (table -> kernel).

    The launches of every task are recorded (cheap); only the tasks of the selected tests are
    compiled.
    """
    # the compile tests of this module only (other modules may have a parameter named "task")
    params = (getattr(item, "callspec", None) for item in request.session.items)
    selected = {p.params["task"].id for p in params
                if p is not None and isinstance(p.params.get("task"), Task)}
    root = tmp_path_factory.mktemp("triton_compile")
    jobs = int(os.environ.get("FASTCL_COMPILE_JOBS", min(2, os.cpu_count() or 1)))
    # one group per scenario (its launches are recorded once per task, and a compilation
    # shared by two of its tasks is done once), the costliest first; the workers take the
    # groups one at a time
    groups = {}
    for t in TASKS:
        groups.setdefault(t.scenario.name, []).append(t)
    order = sorted(groups.values(), key=lambda ts: -sum(map(_cost, ts)))
    plan = root / "plan.json"
    plan.write_text(json.dumps([[{"id": t.id, "scenario": t.scenario.name, "select": t.select,
                                  "arch": t.arch, "compile": t.id in selected} for t in g]
                                for g in order]))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(root / "cache")
    procs = []
    for i in range(max(1, jobs)):
        out = root / f"out{i}.jsonl"
        log = open(root / f"log{i}.txt", "w")
        p = subprocess.Popen([sys.executable, __file__, "--worker", str(plan), str(out)],
                             env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append((p, out, log))
    results, failures = {}, []
    every = os.environ.get("FASTCL_COMPILE_ALL", "0") == "1"
    timeout = float(os.environ.get("FASTCL_COMPILE_TIMEOUT", 6 * 3600 if every else 1800))
    t0 = time.time()
    for p, out, log in procs:
        try:
            rc = p.wait(timeout=max(1.0, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            failures.append(f"worker {p.args[-1]} exited with {rc}:\n"
                            + open(log.name).read()[-3000:])
        if out.exists():
            for line in out.read_text().splitlines():
                rec = json.loads(line)
                if "launchers" in rec:
                    results["launchers"] = rec["launchers"]
                    results["kernels"] = rec["kernels"]
                else:
                    results[rec["task"]] = rec
    results["worker_failures"] = failures
    return results


@pytest.mark.parametrize("task", TASKS, ids=[t.id for t in TASKS])
def test_compiles(task, compiled):
    """Every selected configuration of every launch compiles to a cubin; the first one (the
    launch of ``FASTCL_AUTOTUNE=0``) fits the shared memory of a block.

    Another configuration over the limit only costs the autotuner a compilation (Triton skips
    a configuration that runs out of resources), and register spills only cost speed: both are
    reported as warnings. In the full sweep, every launch keeps at least one configuration
    that fits.
    """
    rec = compiled.get(task.id)
    if rec is None:
        pytest.fail("no result (worker failed):\n" + "\n".join(compiled["worker_failures"]))
    assert "error" not in rec, rec.get("error")
    entries = rec["entries"]
    assert entries, f"{task.scenario.name} recorded no launch"
    failed = [e for e in entries if not e["ok"]]
    assert not failed, "\n\n".join(f"{e['what']}:\n{e['error']}" for e in failed)
    limit = SHARED_LIMIT[task.arch]
    for e in entries:
        assert e["cubin"] > 0, f"{e['what']}: empty cubin"
    over = [e for e in entries if e["shared"] > limit]
    for e in over:
        assert not e["first"], (f"{e['what']}: {e['shared']} bytes of shared memory, more than "
                                f"the {limit} of a block on sm_{task.arch}")
    if task.select == "all":
        for n in sorted({e["launch"] for e in entries}):
            launch = [e for e in entries if e["launch"] == n]
            assert any(e["shared"] <= limit for e in launch), (
                f"no configuration of {launch[0]['what'].split(' config ')[0]} fits the shared "
                f"memory of sm_{task.arch}")
    notes = [f"{e['what']}: {e['shared']} bytes of shared memory (limit {limit}); the "
             "autotuner will skip it" for e in over]
    notes += [f"{e['what']}: {e['stack']} bytes of stack frame (register spills), "
              f"{e['regs']} registers" for e in entries if e["stack"]]
    if notes:
        warnings.warn(f"sm_{task.arch}: " + "\n".join(notes), stacklevel=1)


def test_every_launcher_is_covered(compiled):
    """Every ``*_kernel`` of the kernel modules has an autotuned launcher (a ``_TUNED`` table,
    what the worker records), every launcher is launched by some task, and every kernel by
    some task for each architecture."""
    tables = compiled.get("launchers")
    assert tables, "the workers reported no launcher table:\n" + "\n".join(
        compiled["worker_failures"])
    untuned = sorted(set(compiled["kernels"]) - set(tables.values()))
    assert not untuned, f"kernels without a _TUNED launcher (not compiled here): {untuned}"
    launched = {arch: set() for arch in SHARED_LIMIT}
    for t in TASKS:
        launched[t.arch] |= set(compiled.get(t.id, {}).get("tables", []))
    missing = sorted(set(tables) - set().union(*launched.values()))
    assert not missing, f"no task launches {missing}"
    for arch, seen in launched.items():
        kernels = {tables[x] for x in seen}
        assert kernels == set(tables.values()), (
            f"no task compiles {sorted(set(tables.values()) - kernels)} for sm_{arch}")


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], sys.argv[3])
