"""Weighted multi-head linear cross-entropy, fwd+bwd: every provider in one run.

Providers: ours (backend 'triton', the CUDA default: cuBLAS GEMMs around our Triton row kernel;
'triton_gemm', our own Triton GEMMs; 'torch'), the matmul-only floors: the three GEMMs of
fwd+bwd (logits, dH, dW) per weighted head and nothing else, through torch.mm (cuBLAS; MKL on
CPU) and, on CPU, through oneDNN (what ours_torch uses there), Liger-Kernel and Apple's
cut-cross-entropy (CCE) per head when installed (CUDA only; bench/fetch_wheels.sh fetches
Liger's wheel for the GPU image), F.linear_cross_entropy with LinearCrossEntropyOptions() per
weighted head (torch >= 2.13), naive (full logits per weighted head + F.cross_entropy) and
torch.compile of naive. test_loss_distill: ours with and without self-distillation (teacher
head, teacher tensor).

BENCH_SHAPES=tiny selects one tiny shape on any device, where the Triton providers run under
TRITON_INTERPRET=1 on CPU and peak memory is not measured: `bash bench/gpu_check.sh --dry-run`.
"""
import importlib.util
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import (bench_device, cpu_peak_extra_mb, cuda_peak_extra_mb, dtype_name, record, run_timed,
                            tiny_shapes)
from fastexit.kernels import HAS_TRITON
from fastexit.kernels.backend import interpreting
from fastexit.kernels.weighted_ce import weighted_linear_cross_entropy

GEMMS_FWD_BWD = 3  # logits, dH, dW: 2*N*d*V FLOPs each per weighted head


@dataclass(frozen=True)
class LossShape:
    n_tokens: int
    d_model: int
    vocab: int
    head_weights: tuple
    dtype: torch.dtype

    @property
    def label(self) -> str:
        ws = ",".join(f"{w:g}" for w in self.head_weights)
        return f"N={self.n_tokens} d={self.d_model} V={self.vocab} w=({ws}) {dtype_name(self.dtype)}"

    @property
    def flops(self) -> float:
        heads = sum(w > 0 for w in self.head_weights)
        return GEMMS_FWD_BWD * 2 * self.n_tokens * self.d_model * self.vocab * heads


CPU_SHAPES = [LossShape(4096, 256, 32000, (0.7, 0.0, 0.3), torch.float32)]
GPU_SHAPES = [LossShape(16384, 2048, 128256, (0.7, 0.0, 0.3), torch.bfloat16),
              LossShape(16384, 2048, 128256, (0.25, 0.25, 0.25, 0.25), torch.bfloat16),
              LossShape(8192, 4096, 128256, (0.7, 0.0, 0.3), torch.bfloat16)]  # Llama-3-8B's head
TINY_SHAPES = [LossShape(16, 16, 37, (0.7, 0.0, 0.3), torch.float32)]  # the dry run's: the interpreter is slow
TINY = tiny_shapes()
SHAPES = TINY_SHAPES if TINY else GPU_SHAPES if torch.cuda.is_available() else CPU_SHAPES


# ----------------------------------------------------------------------------- providers
def naive(hs, weight, targets, head_weights):
    return sum(w * F.cross_entropy(h @ weight.T, targets) for h, w in zip(hs, head_weights) if w > 0)


_compiled_naive = torch.compile(naive)


def compiled_naive(hs, weight, targets, head_weights):
    return _compiled_naive(hs, weight, targets, head_weights)


def linear_ce(hs, weight, targets, head_weights):
    options = torch.nn.LinearCrossEntropyOptions()
    return sum(w * F.linear_cross_entropy(h, weight, targets, options=options)
               for h, w in zip(hs, head_weights) if w > 0)


def ours_torch(hs, weight, targets, head_weights):
    return weighted_linear_cross_entropy(hs, weight, targets, head_weights, backend="torch")


def ours_triton(hs, weight, targets, head_weights):
    """The CUDA default: cuBLAS GEMMs around our Triton row kernel."""
    return weighted_linear_cross_entropy(hs, weight, targets, head_weights, backend="triton")


def ours_triton_gemm(hs, weight, targets, head_weights):
    """The all-Triton path: our own GEMM kernels too."""
    return weighted_linear_cross_entropy(hs, weight, targets, head_weights, backend="triton_gemm")


def liger(hs, weight, targets, head_weights):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    loss_fn = LigerFusedLinearCrossEntropyLoss()
    return sum(w * loss_fn(weight, h, targets) for h, w in zip(hs, head_weights) if w > 0)


def cce(hs, weight, targets, head_weights):
    """cut-cross-entropy's default: its Triton kernel with gradient filtering (filter_eps "high")."""
    from cut_cross_entropy import linear_cross_entropy
    return sum(w * linear_cross_entropy(h, weight, targets) for h, w in zip(hs, head_weights) if w > 0)


def matmul_floor(hs, weight, targets, head_weights):
    """Not a loss: the fwd+bwd GEMMs alone (torch.mm), for reading off how close the others get."""
    for h, w in zip(hs, head_weights):
        if w > 0:
            logits = h.detach() @ weight.detach().T  # (N, V)
            logits @ weight.detach()  # dH
            logits.T @ h.detach()  # dW


def matmul_floor_onednn(hs, weight, targets, head_weights):
    """The same GEMMs through oneDNN's fp32 linear, which ours_torch uses on CPU."""
    linear = torch.ops.mkldnn._linear_pointwise
    w, w_t = weight.detach(), weight.detach().T.contiguous()
    for h, hw in zip(hs, head_weights):
        if hw > 0:
            logits = linear(h.detach(), w, None, "none", [], "")  # (N, V)
            linear(logits, w_t, None, "none", [], "")  # dH
            linear(h.detach().T, logits.T, None, "none", [], "")  # dW^T


PROVIDERS = {"ours_triton": ours_triton, "matmul_floor": matmul_floor, "liger": liger, "linear_ce": linear_ce,
             "ours_triton_gemm": ours_triton_gemm, "ours_torch": ours_torch, "cce": cce, "naive": naive,
             "compiled_naive": compiled_naive, "matmul_floor_onednn": matmul_floor_onednn}  # the GPU check's order
TRITON_PROVIDERS = {"ours_triton": "triton", "ours_triton_gemm": "triton_gemm"}


PEER_PACKAGES = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}


def skip_reason(provider: str, device: torch.device):
    if provider in TRITON_PROVIDERS and not (HAS_TRITON and (device.type == "cuda" or interpreting())):
        return f"{provider} benchmarks need CUDA and triton (or TRITON_INTERPRET=1: tiny shapes only)"
    if provider in PEER_PACKAGES:
        package = PEER_PACKAGES[provider]
        if importlib.util.find_spec(package) is None:
            return f"{package} not installed"
        if device.type != "cuda":
            return f"{package} runs on CUDA only"
    if provider == "matmul_floor_onednn" and not (device.type == "cpu" and torch.backends.mkldnn.is_available()):
        return "the oneDNN floor is for CPUs with mkldnn"
    if provider == "linear_ce" and not hasattr(F, "linear_cross_entropy"):
        return f"F.linear_cross_entropy needs torch >= 2.13 (have {torch.__version__})"
    return None


# ----------------------------------------------------------------------------- steps
def make_inputs(shape: LossShape, device, ignored: float = 0.0):
    """Heads, W and targets; a random `ignored` fraction of the targets is -100 (ignore_index)."""
    gen = torch.Generator(device).manual_seed(0)
    n, d, v = shape.n_tokens, shape.d_model, shape.vocab
    hs = [torch.randn(n, d, generator=gen, device=device, dtype=shape.dtype).requires_grad_()
          for _ in shape.head_weights]
    weight = (torch.randn(v, d, generator=gen, device=device) / math.sqrt(d)).to(shape.dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    targets[torch.randperm(n, generator=gen, device=device)[:int(n * ignored)]] = -100
    return hs, weight, targets


def make_step(provider: str, shape_index: int, device_type: str, ignored: float = 0.0):
    """One fwd+bwd step: the loss and its grads to W and every weighted head."""
    shape, fn = SHAPES[shape_index], PROVIDERS[provider]
    hs, weight, targets = make_inputs(shape, torch.device(device_type), ignored)
    wrt = [weight] + [h for h, w in zip(hs, shape.head_weights) if w > 0]
    if provider.startswith("matmul_floor"):
        return lambda: fn(hs, weight, targets, shape.head_weights)
    return lambda: torch.autograd.grad(fn(hs, weight, targets, shape.head_weights), wrt)


@pytest.mark.parametrize("shape_index", range(len(SHAPES)), ids=[s.label for s in SHAPES])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_loss_fwd_bwd(benchmark, provider, shape_index):
    device, shape = bench_device(), SHAPES[shape_index]
    if (reason := skip_reason(provider, device)) is not None:
        pytest.skip(reason)
    benchmark.group = f"loss fwd+bwd {device.type} {shape.label}"
    step = make_step(provider, shape_index, device.type)
    try:
        step()  # compiles, and tells a provider that cannot run this shape from a slow one
    except Exception as err:  # noqa: BLE001 -- a peer's or torch.compile's failure becomes the skip reason
        if provider != "compiled_naive" and provider not in PEER_PACKAGES:
            raise
        pytest.skip(f"{provider} failed on this machine: {type(err).__name__}: {str(err)[:200]}")
    seconds = run_timed(benchmark, step, device)
    record(benchmark, provider=provider, shape=shape.label, seconds=seconds, tokens=shape.n_tokens,
           peak_mem_mb=peak_mb(step, device, "make_step", provider, shape_index, "cpu"), flops=shape.flops)


def peak_mb(step, device, make: str, *args):
    """Peak memory of one step (CUDA), of make(*args)() in a fresh process (CPU), None for tiny shapes."""
    if device.type == "cuda":
        return cuda_peak_extra_mb(step, device)
    return None if TINY else cpu_peak_extra_mb("bench.test_bench_loss", make, *args)


IGNORED_FRACTIONS = (0.0, 0.5)


@pytest.mark.parametrize("ignored", IGNORED_FRACTIONS)
@pytest.mark.parametrize("provider", ["ours_torch", "ours_triton", "ours_triton_gemm"])
def test_loss_ignored_rows(benchmark, provider, ignored):
    """Ignored rows enter no GEMM on CPU and with 'triton_gemm': half the rows ignored should take
    about half the time there ('torch' and 'triton' on CUDA run every row: no host sync)."""
    device, shape = bench_device(), SHAPES[0]
    if (reason := skip_reason(provider, device)) is not None:
        pytest.skip(reason)
    benchmark.group = f"loss ignored rows {device.type} {shape.label}"
    step = make_step(provider, 0, device.type, ignored)
    step()
    seconds = run_timed(benchmark, step, device)
    record(benchmark, provider=f"{provider} {ignored:.0%} ignored", shape=shape.label, seconds=seconds,
           tokens=shape.n_tokens, peak_mem_mb=cuda_peak_extra_mb(step, device) if device.type == "cuda" else None,
           flops=shape.flops * (1 - ignored), ignored_fraction=ignored)


DISTILL_TEACHERS = ("none", "head", "tensor")
DISTILL_WEIGHT, DISTILL_TEMPERATURE = 0.5, 2.0


def make_distill_step(provider: str, shape_index: int, device_type: str, teacher: str):
    """One fwd+bwd step of ours, distilling into every weighted head from `teacher`: 'none'
    (the plain loss), 'head' (the last weighted head: its logits reused), or 'tensor' (a
    separate [N, d] hidden state without grad: one more logits GEMM)."""
    shape, device = SHAPES[shape_index], torch.device(device_type)
    hs, weight, targets = make_inputs(shape, device)
    kw = dict(distill_weight=DISTILL_WEIGHT, distill_temperature=DISTILL_TEMPERATURE)
    if teacher == "head":
        kw["teacher"] = max(k for k, w in enumerate(shape.head_weights) if w > 0)
    elif teacher == "tensor":
        gen = torch.Generator(device).manual_seed(1)
        kw["teacher"] = torch.randn(shape.n_tokens, shape.d_model, generator=gen, device=device, dtype=shape.dtype)
    else:
        kw = {}
    backend = TRITON_PROVIDERS.get(provider, "torch")
    wrt = [weight] + [h for h, w in zip(hs, shape.head_weights) if w > 0]
    return lambda: torch.autograd.grad(
        weighted_linear_cross_entropy(hs, weight, targets, shape.head_weights, backend=backend, **kw), wrt)


@pytest.mark.parametrize("teacher", DISTILL_TEACHERS)
@pytest.mark.parametrize("provider", ["ours_torch", "ours_triton", "ours_triton_gemm"])
def test_loss_distill(benchmark, provider, teacher):
    """Self-distillation in the same pass: a teacher head should cost only the row step's extra
    reads and exps, a teacher tensor one logits GEMM more (counted in the FLOPs)."""
    device, shape = bench_device(), SHAPES[0]
    if (reason := skip_reason(provider, device)) is not None:
        pytest.skip(reason)
    benchmark.group = f"loss distill {device.type} {shape.label}"
    step = make_distill_step(provider, 0, device.type, teacher)
    step()
    seconds = run_timed(benchmark, step, device)
    peak = peak_mb(step, device, "make_distill_step", provider, 0, "cpu", teacher)
    extra_gemm = 2 * shape.n_tokens * shape.d_model * shape.vocab if teacher == "tensor" else 0
    record(benchmark, provider=f"{provider} teacher={teacher}", shape=shape.label, seconds=seconds,
           tokens=shape.n_tokens, peak_mem_mb=peak, flops=shape.flops + extra_gemm, teacher=teacher)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the matmul-rate reference is for GPUs")
def test_matmul_rate(benchmark):
    """bf16 (N, d) @ (d, V) at the GPU loss shape: the ceiling to read TFLOP/s against."""
    device, shape = bench_device(), GPU_SHAPES[0]
    a = torch.randn(shape.n_tokens, shape.d_model, device=device, dtype=torch.bfloat16)
    b = torch.randn(shape.d_model, shape.vocab, device=device, dtype=torch.bfloat16)
    benchmark.group = f"matmul {device.type} bf16"
    seconds = run_timed(benchmark, lambda: a @ b, device, rounds=20)
    record(benchmark, provider="torch.mm", shape=f"{shape.n_tokens}x{shape.d_model}x{shape.vocab}", seconds=seconds,
           tokens=shape.n_tokens, peak_mem_mb=cuda_peak_extra_mb(lambda: a @ b, device),
           flops=2 * shape.n_tokens * shape.d_model * shape.vocab)
