"""Ahead-of-time compile for every GPU generation the launchers choose tiles for (sm_80, sm_86,
sm_89, sm_90, sm_100, sm_120: tests/aot_report.py's GPUS), without a GPU.

Every Triton kernel configuration the launchers choose (every dtype, option and shape of
tests/aot_report.py) must compile, fit the target's shared memory per block and, with tensor
cores (bf16, fp16, TF32), kernels calling tl.dot must not spill registers at the large shape nor
at the odd one (a vocabulary no multiple of 16 once cost the dW kernel its vectorised loads and
160 B of spills); fp32 dots on CUDA cores may spill, and kernels without tl.dot up to
ELEMENTWISE_SPILL_LIMIT bytes: a warning. fp32 dots follow torch's fp32 matmul precision: no TF32
MMA under "ieee", TF32 MMA under "tf32".

The default run compiles the large shape: each dtype with every option subset for one arch
(DEFAULT_ARCH), and the tensor-core dtypes' corners (no option, every option) for every arch,
so each generation's tiles are compiled; `--runslow` (CI) compiles the same variants at the odd
shape too, and at the decode shape for the ops with decode tiles. `--aot-matrix` adds every
other option subset on every other arch and the fused loss at the decode shape (about 5,000
variants; 44 minutes on 2 cores at low priority): run it when a kernel or a launcher's tile
choice changes. Compiles go to the session's pytest tmp dir, never to ~/.triton.
"""
import warnings
from pathlib import Path

import pytest

pytest.importorskip("triton")

import aot_report as aot  # noqa: E402  (tests/aot_report.py)

DEFAULT_ARCH = {"fp32": 80, "tf32": 90, "bf16": 90, "fp16": 86}  # each dtype's full option matrix once
CORNER_DTYPES = ("bf16", "fp16", "tf32")  # tensor-core dtypes whose corners compile for every arch by default
NO_SPILL_DTYPES = ("bf16", "fp16", "tf32")  # tensor-core dtypes: a spill at NO_SPILL_SHAPES fails
NO_SPILL_SHAPES = ("large", "odd")
# kernels without tl.dot (the row kernel, confidence combine, compaction) stream their rows from
# memory: a few bytes of local memory per thread (L1-resident) cost nothing measurable there, so
# up to this many bytes are a warning; the row kernel with every option at once spills 4-28 B
# on sm_80/86/89/100/120 at the odd vocabulary (128 registers at 8 warps)
ELEMENTWISE_SPILL_LIMIT = 64


def _corner(v: aot.Variant) -> bool:
    return v.dtype in CORNER_DTYPES and len(v.options) in (0, len(aot.OPTIONS[v.op]))


def _in_default_run(v: aot.Variant) -> bool:
    return v.shape == "large" and (v.arch == DEFAULT_ARCH[v.dtype] or _corner(v))


DECODE_OPS = ("exit_confidence", "compaction")  # the ops whose launchers pick other tiles for a decode step


def _marks(v: aot.Variant) -> tuple:
    """Default run: the large shape (above). --runslow: the same variants at the odd shape, and
    at the decode shape for the ops with decode tiles (the fused loss's launchers choose the
    same tiles for 8 rows). --aot-matrix: every other option subset on every other arch, and
    the fused loss at the decode shape."""
    if _in_default_run(v):
        return ()
    slow = (v.arch == DEFAULT_ARCH[v.dtype] or _corner(v)) and (v.shape != "decode" or v.op in DECODE_OPS)
    return (pytest.mark.slow,) if slow else (pytest.mark.aot_matrix,)


def _param(v: aot.Variant):
    return pytest.param(v, id=v.id, marks=_marks(v))


def _ptx_params(dtype: str, ops) -> list:
    """Per op and arch: the op's variants of `dtype` at the large shape on that arch; on the archs
    other than DEFAULT_ARCH[dtype], their corners with --runslow and the rest with --aot-matrix."""
    params = []
    for op in ops:
        for arch in aot.GPUS:
            large = aot.variants(ops=(op,), dtypes=(dtype,), shapes=("large",), archs=(arch,))
            if arch == DEFAULT_ARCH[dtype]:
                params.append(pytest.param(tuple(large), id=f"{op}-sm{arch}"))
                continue
            for part, mark in (("corners", pytest.mark.slow), ("others", pytest.mark.aot_matrix)):
                chosen = tuple(v for v in large if _corner(v) == (part == "corners"))
                if chosen:
                    params.append(pytest.param(chosen, id=f"{op}-sm{arch}-{part}", marks=mark))
    return params


def _variants_of(item) -> list:
    """The variants a test of this file reads: its `variant` or `variants` parameter."""
    params = item.callspec.params if item.path == Path(__file__) and hasattr(item, "callspec") else {}
    return [params["variant"]] if "variant" in params else list(params.get("variants", ()))


@pytest.fixture(scope="session")
def reports(request, tmp_path_factory):
    """{variant id: report} for the variants of every selected test here that runs, compiled at once."""
    todo = {v for item in request.session.items if not item.get_closest_marker("skip") for v in _variants_of(item)}
    return aot.compile_variants(sorted(todo), tmp_path_factory.mktemp("triton_cache"))


def _label(kernel: dict, v: aot.Variant) -> str:
    return f"{kernel['kernel']} [{aot.config(kernel)}] {v.dtype} {v.shape} sm_{v.arch}"


@pytest.mark.parametrize("variant", [_param(v) for v in aot.variants()])
def test_compiles_within_limits(variant, reports):
    report = reports[variant.id]
    assert report["error"] is None, f"the launcher failed on meta tensors: {report['error']}"
    assert report["kernels"], "no kernel launched"
    limit, problems = aot.GPUS[variant.arch].shared_per_block, []
    for k in report["kernels"]:
        if k["error"]:
            problems.append(f"{_label(k, variant)}: does not compile: {k['error']}")
            continue
        if k["shared"] > limit:
            problems.append(f"{_label(k, variant)}: shared memory {k['shared']:,} B > {limit:,} B per block")
        if k["spill_stores"] or k["spill_loads"]:
            spill = (f"{_label(k, variant)}: {k['registers']} registers, spills {k['spill_stores']} B stores "
                     f"/ {k['spill_loads']} B loads")
            tensor_cores = k["calls_dot"] and variant.dtype in NO_SPILL_DTYPES
            over_limit = max(k["spill_stores"], k["spill_loads"]) > ELEMENTWISE_SPILL_LIMIT
            if (tensor_cores and variant.shape in NO_SPILL_SHAPES) or (not k["calls_dot"] and over_limit):
                problems.append(spill)
            else:
                warnings.warn(spill)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("variants", _ptx_params("fp32", aot.OPTIONS))
def test_ieee_fp32_has_no_tf32_mma(variants, reports):
    tf32 = sorted({_label(k, v) for v in variants for k in reports[v.id]["kernels"] if k.get("tf32_mma")})
    assert not tf32, "TF32 MMA in the PTX of fp32 kernels while torch's fp32 matmul precision is 'ieee':\n" + \
        "\n".join(tf32)


@pytest.mark.parametrize("variants", _ptx_params("tf32", ("weighted_ce_gemm", "exit_confidence")))
def test_tf32_dots_use_tf32_mma(variants, reports):
    dots = [(k, v) for v in variants for k in reports[v.id]["kernels"] if k.get("calls_dot")]
    assert dots, "no kernel calling tl.dot was compiled"
    missing = sorted({_label(k, v) for k, v in dots if not k["error"] and not k["tf32_mma"]})
    assert not missing, "no TF32 MMA in the PTX while torch's fp32 matmul precision is 'tf32':\n" + "\n".join(missing)


@pytest.mark.parametrize("variants", [pytest.param(tuple(filter(_in_default_run, aot.variants())), id="default")])
def test_every_kernel_is_compiled(variants, reports):
    """Every kernel that the ops' modules define is compiled by the default matrix (a new kernel
    or launcher option that no variant reaches fails here: extend aot_report.OPTIONS or SHAPES)."""
    defined = {name for v in variants for name in reports[v.id]["defined"]}
    compiled = {k["kernel"] for v in variants for k in reports[v.id]["kernels"]}
    assert defined - compiled == set(), f"never compiled: {sorted(defined - compiled)}"
