"""Ahead-of-time compile of every Triton kernel configuration the launchers choose, for GPUs
that are not here (sm_80, sm_86, sm_89, sm_90, sm_100, sm_120: every generation whose tiles the
launchers choose apart), and what each compiled kernel needs: shared memory, registers,
spills, TF32 MMA instructions.

How, per target arch, in a child process with TRITON_INTERPRET=0 (so the launchers pick their
CUDA tiles; the interpreter's kernels could not be compiled anyway):
1. each op's public function runs on `meta` tensors with every kernel launch recorded instead
   of run (JITFunction.run), the kernels' backend choice answering "triton" (or "triton_gemm"
   for the op weighted_ce_gemm), torch.cuda describing the target GPU, host reads of meta
   tensors answered (checks pass, a count), and the ops' registered torch.library ops called
   as plain functions (a registered op on meta tensors would run its fake implementation);
2. each recorded launch is compiled by ``kernel.warmup(*args, grid=grid, **kwargs)``, triton's
   own binding and specialisation, for the target (a compile-only driver: no GPU);
3. shared memory comes from the compile metadata; registers and spills from the log of the
   ``ptxas -v`` that triton runs (printed with TRITON_DUMP_PTXAS_LOG, every kernel compiled
   with TRITON_ALWAYS_COMPILE so a disk-cache hit cannot hide it); TF32 MMA from the PTX.

    python tests/aot_report.py                        # markdown table, large shape, every arch
    python tests/aot_report.py --shape odd --arch 90 86

tests/test_aot_compile.py asserts on the same reports. Compiled files go to a temporary
directory here, to the session's pytest tmp dir there: never to ~/.triton.
"""
import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
import types
from itertools import combinations
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode


REPO = Path(__file__).resolve().parents[1]


class Shape(NamedTuple):
    n_rows: int
    d_model: int
    n_classes: int


SHAPES = {
    "large": Shape(16384, 2048, 128256),  # a training micro-batch, Llama-3's vocabulary
    "odd": Shape(4099, 2048, 5003),  # rows and classes no multiple of any tile
    "decode": Shape(8, 2048, 128256),  # a decode step: exit_confidence takes its decode tiles
}


class Gpu(NamedTuple):
    """What the launchers may ask torch.cuda about the target, and its shared-memory limit."""
    name: str
    sm_count: int
    shared_per_block: int  # bytes: the opt-in maximum per block (what triton checks at load)


GPUS = {  # the opt-in shared memory per block of each generation (CUDA programming guide, compute capabilities)
    80: Gpu("NVIDIA A100-SXM4-80GB", 108, 166_912),
    86: Gpu("NVIDIA A10", 72, 101_376),
    89: Gpu("NVIDIA L4", 58, 101_376),
    90: Gpu("NVIDIA H100 80GB HBM3", 132, 232_448),
    100: Gpu("NVIDIA B200", 148, 232_448),
    120: Gpu("NVIDIA GeForce RTX 5090", 170, 101_376),
}

# dtype name -> (torch dtype, torch's fp32 matmul precision while the launchers run)
DTYPES = {"fp32": ("float32", "ieee"), "tf32": ("float32", "tf32"), "bf16": ("bfloat16", "ieee"),
          "fp16": ("float16", "ieee")}

# the options each op exposes; every subset of them is a variant. weighted_ce is the default
# backend ('triton': vendor GEMMs, our row kernel), weighted_ce_gemm backend='triton_gemm'.
OPTIONS = {
    "weighted_ce": ("grad", "smoothing", "zloss", "distill", "argmax"),
    "weighted_ce_gemm": ("grad", "smoothing", "zloss", "distill", "argmax"),
    "exit_confidence": ("targets", "margin"),
    "compaction": (),
}
MODULES = {"weighted_ce_gemm": "weighted_ce"}  # the module that defines an op's kernels, where not its name
BACKENDS = {"weighted_ce": "triton", "weighted_ce_gemm": "triton_gemm"}
HEADS = 2  # exits sharing the head in weighted_ce
LABEL_SMOOTHING, Z_LOSS, DISTILL_WEIGHT = 0.1, 1e-4, 0.5  # nonzero values switch the options on
# mma.sync (sm_80-89, 120), wgmma (sm_90) and tcgen05 (sm_100: "tcgen05.mma.cta_group::1.kind::tf32"), predicated or not
TF32_MMA = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:wgmma\.mma_async|mma|tcgen05\.mma)\.[\w.:]*\btf32\b", re.MULTILINE)


class Variant(NamedTuple):
    op: str
    dtype: str  # a key of DTYPES
    options: tuple  # a subset of OPTIONS[op]
    shape: str  # a key of SHAPES
    arch: int  # a key of GPUS

    @property
    def id(self) -> str:
        return f"{self.op}-{self.dtype}-{'+'.join(self.options) or 'plain'}-{self.shape}-sm{self.arch}"


def variants(ops=tuple(OPTIONS), dtypes=tuple(DTYPES), shapes=tuple(SHAPES), archs=tuple(GPUS)) -> list:
    """Every combination: op x option subset x dtype x shape x arch."""
    return [Variant(op, dtype, opts, shape, arch) for op in ops
            for opts in (c for r in range(len(OPTIONS[op]) + 1) for c in combinations(OPTIONS[op], r))
            for dtype in dtypes for shape in shapes for arch in archs]


def config(kernel: dict) -> str:
    """A compiled kernel's constexprs and launch options, e.g. 'BLOCK_M=128 HAS_GRAD=1 8w 3s'."""
    values = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in kernel["constexprs"].items())
    return f"{values} {kernel['num_warps']}w {kernel['num_stages']}s".strip()


# ----------------------------------------------------------------------------- parent side
def compile_variants(todo, cache_dir) -> dict:
    """{variant id: report} for these variants: one child process per arch, side by side.

    A report is {"variant", "error" (the launcher failed) or None, "defined" (names of the
    kernels v.op's module defines), "kernels": [one dict per distinct compiled kernel: kernel,
    constexprs, num_warps, num_stages, shared, registers, spill_stores, spill_loads, tf32_mma,
    calls_dot, error (the compile failed) or None]}.
    """
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(cache_dir))
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        children = []
        for arch in sorted({v.arch for v in todo}):
            paths = [Path(tmp, f"sm{arch}.{ext}") for ext in ("in.json", "out.json", "log")]
            paths[0].write_text(json.dumps([v._asdict() for v in todo if v.arch == arch]))
            with open(paths[2], "w") as log:
                cmd = [sys.executable, __file__, "--child", str(arch), str(paths[0]), str(paths[1])]
                children.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), paths))
        for child, _ in children:
            child.wait()  # every child, before one failure raises
        for child, (_, out, log) in children:
            if child.returncode != 0:
                raise RuntimeError(f"AOT compile child failed (exit {child.returncode}):\n{log.read_text()[-4000:]}")
            reports.update((r["variant"], r) for r in json.loads(out.read_text()))
    return reports


# ----------------------------------------------------------------------------- child side
def _run_op(v: Variant) -> None:
    """Call v.op's public function(s) on meta tensors of v's dtype, options and shape."""
    import fastexit.kernels as K
    dtype, opts, (n, d, n_classes) = getattr(torch, DTYPES[v.dtype][0]), set(v.options), SHAPES[v.shape]

    def meta(*size, dtype=dtype, grad=False):
        return torch.empty(size, dtype=dtype, device="meta", requires_grad=grad)

    targets = meta(n, dtype=torch.int64)
    if v.op in BACKENDS:  # with "grad", the forward pass computes the gradients (backward only scales them)
        grad = "grad" in opts
        K.weighted_linear_cross_entropy(
            [meta(n, d, grad=grad) for _ in range(HEADS)], meta(n_classes, d, grad=grad), targets, [1.0] * HEADS,
            label_smoothing=LABEL_SMOOTHING if "smoothing" in opts else 0.0,
            z_loss=Z_LOSS if "zloss" in opts else 0.0, teacher=HEADS - 1,
            distill_weight=DISTILL_WEIGHT if "distill" in opts else 0.0, return_argmax="argmax" in opts,
            backend=BACKENDS[v.op])
    elif v.op == "exit_confidence":
        K.exit_confidence(meta(n, d), meta(n_classes, d), targets if "targets" in opts else None,
                          want_margin="margin" in opts)
    elif v.op == "compaction":
        x = meta(n, d)
        idx = K.compact_indices(meta(n, dtype=torch.bool))
        K.scatter_rows(x, idx, K.gather_rows(x, idx))
    else:
        raise ValueError(f"unknown op {v.op!r}")


class _HostReads(TorchDispatchMode):
    """Answers the launchers' host reads of meta tensors (bool(), int(), .item()): True for
    their input checks, `count` for a count (compact_indices' number of selected rows)."""

    def __init__(self, count: int):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            if args[0].dtype == torch.bool:
                return True
            if not args[0].dtype.is_floating_point:
                return self.count
            raise NotImplementedError(f"a launcher read a {args[0].dtype} value from the device")
        return func(*args, **(kwargs or {}))


class _Autocast(torch.amp.autocast):
    """torch.autocast that takes the meta device type for CUDA's, which meta tensors stand for."""

    def __init__(self, device_type: str, *args, **kwargs):
        super().__init__("cuda" if device_type == "meta" else device_type, *args, **kwargs)


@contextlib.contextmanager
def _meta_as_cuda(v: Variant):
    """Meta tensors stand for CUDA tensors on v's GPU: the kernels' backend choice says Triton
    (the name asked for, 'triton' for 'auto'), torch.cuda describes that GPU, host reads are
    answered (_HostReads), autocast takes CUDA's, and the ops' registered torch.library ops run
    their Python implementations (on meta tensors the dispatcher would call the fake ones)."""
    from torch._library.custom_ops import CustomOpDef

    from fastexit.kernels import backend
    gpu, choose = GPUS[v.arch], backend.resolve_backend
    props = types.SimpleNamespace(name=gpu.name, major=v.arch // 10, minor=v.arch % 10,
                                  multi_processor_count=gpu.sm_count, shared_memory_per_block_optin=gpu.shared_per_block)
    with contextlib.ExitStack() as stack:
        for module in [m for name, m in sys.modules.items() if name.startswith("fastexit.kernels")]:
            if getattr(module, "resolve_backend", None) is choose:
                stack.enter_context(mock.patch.object(
                    module, "resolve_backend", lambda name, *tensors: "triton" if name == "auto" else name))
            for name, op in list(vars(module).items()):
                if isinstance(op, CustomOpDef):  # run below autograd, as the dispatcher runs it
                    stack.enter_context(mock.patch.object(module, name, torch.no_grad()(op._init_fn)))
        stack.enter_context(mock.patch.object(torch.cuda, "get_device_properties", lambda device=None: props))
        stack.enter_context(mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: divmod(v.arch, 10)))
        stack.enter_context(mock.patch.object(torch, "autocast", _Autocast))
        stack.enter_context(_HostReads(count=SHAPES[v.shape].n_rows // 2))
        yield


@contextlib.contextmanager
def _fp32_matmul_precision(precision: str):
    matmul = torch.backends.cuda.matmul
    before, matmul.fp32_precision = matmul.fp32_precision, precision
    try:
        yield
    finally:
        matmul.fp32_precision = before


def _record_launches(v: Variant) -> list:
    """(kernel, grid, args, kwargs) of every kernel launch of v's op; none runs."""
    from triton.runtime.jit import JITFunction
    launches = []

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append((kernel, grid, args, kwargs))

    with mock.patch.object(JITFunction, "run", record), _meta_as_cuda(v), _fp32_matmul_precision(DTYPES[v.dtype][1]):
        _run_op(v)
    return launches


def _describe(error: Exception) -> str:
    """The error and where it was raised: the innermost frame in this repository, if any."""
    ours = [f for f in traceback.extract_tb(error.__traceback__) if f.filename.startswith(str(REPO))]
    where = f" (at {Path(ours[-1].filename).relative_to(REPO)}:{ours[-1].lineno})" if ours else ""
    return f"{type(error).__name__}: {error}"[:2000] + where


class _CompileOnlyDriver:
    """The little of a driver that JITFunction.warmup asks for: target, device id, stream."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # one kernel cache per arch

    def get_current_stream(self, device=None):
        return 0


def _launch_key(kernel, args, kwargs) -> tuple:
    """Launches with equal keys compile the same kernel (finer than triton's key: no harm)."""
    def arg(a):
        return (str(a.dtype), a.data_ptr() % 16) if isinstance(a, torch.Tensor) else repr(a)
    return (kernel, tuple(map(arg, args)), tuple(sorted((k, repr(x)) for k, x in kwargs.items())))


def _measure(kernel, compiled, ptxas_log: str) -> dict:
    """What one compiled kernel needs. ptxas_log: what triton printed while compiling it."""
    md, ptx = compiled.metadata, compiled.asm["ptx"]
    registers = re.search(r"Used (\d+) registers", ptxas_log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    if not (registers and spills):
        raise RuntimeError(f"no ptxas -v log for {kernel.__name__}: {ptxas_log[-500:]!r}")
    constexprs = {kernel.arg_names[i]: value for (i,), value in sorted(compiled.src.constants.items())}
    return dict(kernel=kernel.__name__, constexprs=constexprs, num_warps=md.num_warps, num_stages=md.num_stages,
                shared=md.shared, registers=int(registers.group(1)), spill_stores=int(spills.group(1)),
                spill_loads=int(spills.group(2)), tf32_mma=bool(TF32_MMA.search(ptx)), calls_dot="tl.dot(" in kernel.src,
                error=None)


def _failed(kernel, kwargs, error: Exception) -> dict:
    constexprs = {k: x for k, x in kwargs.items() if k in kernel.arg_names}
    return dict(kernel=kernel.__name__, constexprs=constexprs, num_warps=kwargs.get("num_warps", 4),
                num_stages=kwargs.get("num_stages", 3), error=_describe(error))


def _launched_kernels(module) -> list:
    """Names of the module's @triton.jit functions that no other one calls (the rest are helpers)."""
    from triton.runtime.jit import JITFunction
    jitted = {name: f.src for name, f in vars(module).items() if isinstance(f, JITFunction)}
    return [name for name in jitted if not any(f"{name}(" in src for other, src in jitted.items() if other != name)]


def _compile_variant(v: Variant, measured: dict) -> dict:
    """The variant's report; `measured` {compiled hash: kernel dict} is shared across variants."""
    module = importlib.import_module(f"fastexit.kernels.{MODULES.get(v.op, v.op)}")
    report = dict(variant=v.id, error=None, kernels=[], defined=_launched_kernels(module))
    try:
        launches = _record_launches(v)
    except Exception as e:  # the launcher itself failed: report it, go on with the next variant
        return dict(report, error=_describe(e))
    seen = set()
    for kernel, grid, args, kwargs in launches:
        key = _launch_key(kernel, args, kwargs)
        if key in seen:
            continue
        seen.add(key)
        try:
            with contextlib.redirect_stdout(io.StringIO()) as log:  # triton prints ptxas -v's log
                compiled = kernel.warmup(*args, grid=grid, **kwargs)
            if compiled.hash not in measured:
                measured[compiled.hash] = _measure(kernel, compiled, log.getvalue())
        except Exception as e:  # a compile error is a result
            report["kernels"].append(_failed(kernel, kwargs, e))
            continue
        if measured[compiled.hash] not in report["kernels"]:
            report["kernels"].append(measured[compiled.hash])
    return report


def _child(arch: int, todo_path: str, out_path: str) -> None:
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    assert os.environ.get("TRITON_INTERPRET") == "0", "the launchers must pick their CUDA configurations"
    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    # triton runs ptxas -v and drops its log unless asked to print it, and a disk-cache hit
    # runs no ptxas: compile every kernel once per child (its in-memory cache still dedups)
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    measured = {}
    todo = [Variant(**{**v, "options": tuple(v["options"])}) for v in json.loads(Path(todo_path).read_text())]
    Path(out_path).write_text(json.dumps([_compile_variant(v, measured) for v in todo], default=str))


# ----------------------------------------------------------------------------- table
def table(reports: dict, todo) -> str:
    """Markdown: one row per op, kernel, configuration; per arch shared memory, registers, spills.
    Rows that differ only in the dtype they serve (mask kernels, fp32/tf32 row kernels) merge."""
    archs = sorted({v.arch for v in todo}, reverse=True)
    rows = {}  # (op, kernel, config) -> {dtype: {arch: cell}}
    for v in todo:
        for k in reports[v.id]["kernels"]:
            cell = ("compile error", "", "") if k["error"] else (
                f"{k['shared']:,}", str(k["registers"]),
                f"{k['spill_stores']}/{k['spill_loads']}" if k["spill_stores"] or k["spill_loads"] else "0")
            rows.setdefault((v.op, k["kernel"], config(k)), {}).setdefault(v.dtype, {})[v.arch] = cell
    first_seen = {key[:2]: i for i, key in reversed(list(enumerate(rows)))}  # rows of one kernel together
    rows = dict(sorted(rows.items(), key=lambda item: (first_seen[item[0][:2]], item[0][2])))
    head = ["op", "kernel", "dtype", "config"] + [f"sm_{a} {c}" for a in archs for c in ("shared B", "regs", "spills B")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (op, kernel, cfg), by_dtype in rows.items():
        merged = {}  # cells -> dtypes
        for dtype, cells in by_dtype.items():
            merged.setdefault(tuple(cells.get(a, ("", "", "")) for a in archs), []).append(dtype)
        for cells, dtypes in merged.items():
            lines.append("| " + " | ".join([op, kernel, ", ".join(dtypes), cfg] + [c for cs in cells for c in cs]) + " |")
    errors = [f"- {v.id}: {reports[v.id]['error']}" for v in todo if reports[v.id]["error"]]
    return "\n".join(lines + ([""] + errors if errors else []))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="AOT compile table of the Triton kernels (markdown)")
    parser.add_argument("--shape", choices=SHAPES, default="large")
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(GPUS), default=sorted(GPUS, reverse=True))
    parser.add_argument("--op", nargs="+", choices=sorted(OPTIONS), default=list(OPTIONS))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # arch, variants in, reports out
    args = parser.parse_args(argv)
    if args.child:
        return _child(int(args.child[0]), *args.child[1:])
    todo = variants(ops=tuple(args.op), shapes=(args.shape,), archs=tuple(args.arch))
    with tempfile.TemporaryDirectory() as tmp:
        reports = compile_variants(todo, tmp)
    s = SHAPES[args.shape]
    print(f"AOT compile, N={s.n_rows} d={s.d_model} V={s.n_classes}; shared-memory limit per block: "
          + ", ".join(f"sm_{a} {GPUS[a].shared_per_block:,} B" for a in args.arch)
          + "; spills: store/load bytes\n")
    print(table(reports, todo))


if __name__ == "__main__":
    main()
