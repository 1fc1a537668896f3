"""The GEMM under both ops' PyTorch paths, and the model's projections. Names say the dtype
they return:

- ``linear_fp32(a, b)``: a @ b.T with an fp32 result (fp64 for fp64 inputs), whatever the
  operand dtype; not differentiable. The ops' chunk loops use it.
- ``linear(x, weight)``: a differentiable ``F.linear(x, weight)`` (no bias) that returns x's
  dtype; fp32 on CPU runs its forward and backward GEMMs through ``linear_fp32``.

MKL's sgemm, which torch.mm uses for fp32 on CPU, runs its AVX2 code on AMD CPUs; oneDNN's
linear does the same fp32 math 2-3x faster there (measured on AMD EPYC; not measured on
Intel, where MKL is already fast), so CPU fp32 goes through
``torch.ops.mkldnn._linear_pointwise``. That op is private: it is used only when it exists,
and torch.mm is the fallback. On CUDA, bf16/fp16 inputs keep tensor cores and get an fp32
result from ``torch.mm(..., out_dtype=torch.float32)`` (torch >= 2.8, hence setup.py's floor).

The fused loss's chunk loops write and accumulate fp32 results in place:

- ``mm_into(out, a, b)``: out (M, N) fp32 = a @ b, written into ``out`` (a strided view of a
  reused buffer: cuBLAS takes its row stride as the leading dimension);
- ``accumulate_dw(dw, dlogits, x)``: dW (V, d) fp32 += dlogits.T @ x in place, or stored by
  the first chunk (``dw=None``).

Both need the ``out_dtype`` forms of mm/addmm for 16-bit operands; ``out_dtype_forms`` probes
once per device type and dtype which ones the installed torch runs, with the right values (CPU
builds have neither; the issue that asked for this path reports CUDA's addmm form failing on
bf16 in torch 2.8-2.9). Where a form is missing, ``mm_into`` multiplies fp32 copies of 16-bit
operands (exact products; on CPU what happens anyway), and ``accumulate_dw`` adds slices of
DW_SLICE_ROWS classes through ``mm_into`` (a temporary small next to dW, never a second dW).
"""
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

DW_SLICE_ROWS = 8192  # classes per temporary in accumulate_dw's fallback: 64 MB at d = 2048


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs: the dtype results accumulate in."""
    return torch.promote_types(t.dtype, torch.float32)


def mm_dtype(t: torch.Tensor) -> torch.dtype:
    """The operand dtype to multiply in: CPU has no low-precision GEMM with an fp32 result."""
    return acc_dtype(t) if t.device.type == "cpu" else t.dtype


def use_onednn(t: torch.Tensor) -> bool:
    return (t.device.type == "cpu" and t.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def linear_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (N, K).T -> (M, N) in acc_dtype; CPU low-precision operands are upcast."""
    if a.dtype != mm_dtype(a):
        a, b = a.to(mm_dtype(a)), b.to(mm_dtype(a))
    if use_onednn(a) and a.numel() and b.numel():  # oneDNN has no empty GEMM (a block on 0 rows)
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    if a.dtype == acc_dtype(a):
        return torch.mm(a, b.t())
    return torch.mm(a, b.t(), out_dtype=torch.float32)


class _Linear(torch.autograd.Function):
    """x (..., K) @ weight (N, K).T; the backward's two GEMMs go through linear_fp32() as well."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _linear_nd(x, weight)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (M, N)
        dx = linear_fp32(g, weight.t().contiguous()).view(x.shape) if ctx.needs_input_grad[0] else None  # (M, K)
        dw = linear_fp32(g.t(), x.reshape(-1, x.shape[-1]).t()) if ctx.needs_input_grad[1] else None  # (N, K)
        return dx, dw


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias): x (..., K), weight (N, K) -> (..., N) in x's dtype.

    fp32 on CPU runs oneDNN's GEMM forward and backward; every other case is F.linear itself."""
    if not (use_onednn(x) and weight.dtype == x.dtype):
        return F.linear(x, weight)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _Linear.apply(x, weight)
    return _linear_nd(x, weight)


def _linear_nd(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return linear_fp32(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])  # (..., N)


class OutDtypeForms(NamedTuple):
    """Which out_dtype=torch.float32 GEMMs the installed torch runs for 16-bit operands."""
    mm: bool  # torch.mm(a, b, out_dtype=, out=)
    addmm: bool  # torch.addmm(c, a, b, out_dtype=, out=c): in place


@functools.lru_cache(maxsize=None)
def out_dtype_forms(device_type: str, dtype: torch.dtype) -> OutDtypeForms:
    """Probed once per device type and operand dtype on tiny tensors of small integers (exact
    in any dtype): each form must run and give the exact values, addmm's into its own input;
    meta tensors (the ahead-of-time compile check) only have to run. The probe reads its
    results on the host once per process: no cost on the hot path."""
    device = torch.device(device_type)
    a = torch.arange(6, dtype=torch.float32, device=device).view(2, 3).to(dtype)
    b = a.t().contiguous()
    exact = None if device_type == "meta" else a.float() @ b.float()
    out, acc = torch.empty(2, 2, device=device), torch.ones(2, 2, device=device)
    return OutDtypeForms(
        mm=_probe(lambda: torch.mm(a, b, out_dtype=torch.float32, out=out), out, exact),
        addmm=_probe(lambda: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc), acc,
                     None if exact is None else exact + 1))


def _probe(gemm_call, out: torch.Tensor, exact) -> bool:
    """gemm_call() runs, returns `out` itself and leaves `exact` there (None: not checked)."""
    try:
        result = gemm_call()
    except (RuntimeError, TypeError, NotImplementedError):  # the form is missing for this device or dtype
        return False
    return result.data_ptr() == out.data_ptr() and (exact is None or bool(torch.equal(out, exact)))


def _fp32_operands(*ts):
    return tuple(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in ts)


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out (M, N) in acc_dtype = a (M, K) @ b (K, N), written into out (row stride >= N, unit
    column stride). 16-bit operands: the out_dtype GEMM where the installed torch has it, else
    fp32 copies of them."""
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    if out_dtype_forms(out.device.type, a.dtype).mm:
        return torch.mm(a, b, out_dtype=out.dtype, out=out)
    return torch.mm(*_fp32_operands(a, b), out=out)


def accumulate_dw(dw, dlogits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW (V, d) acc_dtype += dlogits (R, V).T @ x (R, d) in place, and the result; dw None (the
    first chunk): dW = dlogits.T @ x, stored. Later chunks never allocate a dW-sized tensor,
    except on CPU with oneDNN, whose GEMM cannot write into an existing tensor: there the
    chunk's product and the add are one fused oneDNN call into a new dW^T (d, V) that replaces
    the old one (MKL's in-place sgemm, which AMD CPUs run as AVX2 code, measured ~1.3x slower
    than that, the copy included), and dW is the transpose of a (d, V) tensor."""
    if use_onednn(x):
        if dw is None:
            return linear_fp32(x.t(), dlogits.t()).t()  # dW^T (d, V) = x^T @ dlogits
        if "binary" in torch.ops.mkldnn._linear_pointwise.overloads():
            return torch.ops.mkldnn._linear_pointwise.binary(x.t(), dw.t(), dlogits.t(), None, "add").t()
        return dw.add_(linear_fp32(x.t(), dlogits.t()).t())
    acc = acc_dtype(x)
    if dw is None:
        return mm_into(torch.empty(dlogits.shape[1], x.shape[1], dtype=acc, device=x.device), dlogits.t(), x)
    if x.dtype == acc:
        return dw.addmm_(dlogits.t(), x)  # (V, d) += (V, R) @ (R, d)
    if out_dtype_forms(x.device.type, x.dtype).addmm:
        return torch.addmm(dw, dlogits.t(), x, out_dtype=acc, out=dw)
    slice_out = torch.empty(min(DW_SLICE_ROWS, dw.shape[0]), dw.shape[1], dtype=acc, device=dw.device)
    for v0 in range(0, dw.shape[0], DW_SLICE_ROWS):  # bounded temporaries: never a second dW
        part = dlogits[:, v0:v0 + DW_SLICE_ROWS].t()  # (s, R)
        dw[v0:v0 + part.shape[0]].add_(mm_into(slice_out[:part.shape[0]], part, x))
    return dw
