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
"""
import torch
import torch.nn.functional as F


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
