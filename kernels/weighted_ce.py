"""Weighted multi-head linear cross-entropy: sum_k w_k * CE(h_k @ W.T, y), never holding [N, V].

Early-exit training puts one shared LM head W [V, d] behind several layers and minimises a
weighted sum of their cross-entropies. The forward pass computes the loss AND the gradients of
every weighted head and of W, one chunk of rows at a time (backward only rescales them):

1. one GEMM gives the fp32 logits of the chunk's rows of all weighted heads, stacked;
2. a row step turns them in place into row losses and dlogits;
3. two GEMMs give dH and add dlogits^T @ H into an fp32 dW.
Heads with weight 0 are never touched. The GEMMs are oneDNN's on CPU (MKL's sgemm runs AVX2
code on AMD CPUs, 2-3x slower) and cuBLAS's on CUDA (fp32 output for bf16/fp16 inputs).

- PyTorch path: the row step is torch ops (max, exp, sum, scale), in place on the chunk.
- Triton path (CUDA, or CPU under TRITON_INTERPRET=1): the row step is one kernel, one program
  per row: an online logsumexp over V tiles, then dlogits written tile by tile (straight to
  bf16/fp16 for low-precision inputs). Leaving the GEMMs to cuBLAS keeps them at full matmul
  rate and deterministic; recomputing logit tiles inside Triton would cost 5 GEMMs, not 3.
Both keep the true-class gradient p - 1 exact for confident rows: it is computed as minus the
exp-sum of the other classes over the total, never as a difference of numbers close to 1.
"""
import math
from typing import Sequence, Union

import torch

from .backend import HAS_TRITON, interpreting, resolve_backend
from .checks import check_target_range

if HAS_TRITON:
    import triton
    import triton.language as tl

REDUCTIONS = ("mean", "sum", "none")
CHUNK_BYTES = 32 * 2**20  # fp32 logits of one CPU row chunk (all heads): about L3-sized
CUDA_CHUNK_BYTES = 2**30  # on GPUs: big enough for GEMMs at full rate, small next to [N, V]
CUDA_BLOCK_V, INTERPRET_BLOCK_V = 4096, 32  # classes per tile of the row kernel
ROW_WARPS = 8
SERIES_MAX_Q = 1e-3  # below this 1 - p_target, -log(p_target) comes from its series

Hiddens = Union[torch.Tensor, Sequence[torch.Tensor]]


# ----------------------------------------------------------------------------- validation
def _as_head_list(hiddens: Hiddens) -> list:
    if isinstance(hiddens, torch.Tensor):
        if hiddens.dim() != 3:
            raise ValueError(f"hiddens must be [K, N, d] or a list of [N, d], got shape {tuple(hiddens.shape)}")
        return list(hiddens.unbind(0))
    if not isinstance(hiddens, (list, tuple)) or not hiddens:
        raise TypeError("hiddens must be a non-empty list of [N, d] tensors or one [K, N, d] tensor, "
                        f"got {type(hiddens).__name__}")
    for k, h in enumerate(hiddens):
        if not isinstance(h, torch.Tensor) or h.dim() != 2:
            raise ValueError(f"hiddens[{k}] must be a 2-D [N, d] tensor")
    return list(hiddens)


def _check_tensors(hs: list, weight: torch.Tensor, targets: torch.Tensor) -> None:
    n, d = hs[0].shape
    if not hs[0].is_floating_point():
        raise TypeError(f"hiddens must be floating point, got {hs[0].dtype}")
    for k, h in enumerate(hs):
        if h.shape != hs[0].shape:
            raise ValueError(f"hiddens[{k}] has shape {tuple(h.shape)}, expected {(n, d)}")
        if h.dtype != hs[0].dtype:
            raise TypeError(f"hiddens[{k}] has dtype {h.dtype}, expected {hs[0].dtype}")
        if h.device != hs[0].device:
            raise ValueError(f"hiddens[{k}] is on {h.device}, expected {hs[0].device}")
    if n == 0:
        raise ValueError("hiddens: empty batch (N == 0)")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"weight must be [V, d] with d={d}, got {getattr(weight, 'shape', type(weight))}")
    if weight.dtype != hs[0].dtype:
        raise TypeError(f"weight has dtype {weight.dtype}, expected hiddens' {hs[0].dtype}")
    if weight.device != hs[0].device:
        raise ValueError(f"weight is on {weight.device}, hiddens on {hs[0].device}")
    if not isinstance(targets, torch.Tensor) or targets.shape != (n,):
        raise ValueError(f"targets must be [N] with N={n}, got {getattr(targets, 'shape', type(targets))}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32), got {targets.dtype}")
    if targets.device != hs[0].device:
        raise ValueError(f"targets is on {targets.device}, hiddens on {hs[0].device}")


def _check_head_weights(head_weights, n_heads: int) -> list:
    if isinstance(head_weights, torch.Tensor):
        head_weights = head_weights.detach().reshape(-1).tolist()
    ws = [float(w) for w in head_weights]
    if len(ws) != n_heads:
        raise ValueError(f"head_weights has {len(ws)} entries for {n_heads} heads")
    for k, w in enumerate(ws):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"head_weights[{k}] = {w} must be finite and >= 0")
    return ws


def _check_options(reduction: str, label_smoothing: float, z_loss: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"z_loss must be finite and >= 0, got {z_loss}")


# ----------------------------------------------------------------------------- shared chunk loop
def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs


def _mm_dtype(t: torch.Tensor) -> torch.dtype:
    # CPU has no low-precision GEMM with an fp32 result: upcast there; keep tensor cores on CUDA
    return _acc_dtype(t) if t.device.type == "cpu" else t.dtype


def _onednn(t: torch.Tensor) -> bool:
    # MKL's sgemm runs AVX2 code on AMD CPUs; oneDNN's linear does the same fp32 math 2-3x faster
    return (t.device.type == "cpu" and t.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _linear(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T with an fp32 (or fp64) result; fp16/bf16 use CUDA's fp32-output GEMM."""
    if _onednn(a):
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    if a.dtype == _acc_dtype(a):
        return torch.mm(a, b.t())
    return torch.mm(a, b.t(), out_dtype=torch.float32)


def _new_dw(weight: torch.Tensor) -> torch.Tensor:
    """Zero fp32 dW [V, d]; stored as dW^T [d, V] where oneDNN accumulates x^T @ dlogits."""
    if _onednn(weight):
        return weight.new_zeros(weight.shape[::-1], dtype=torch.float32).t()
    return weight.new_zeros(weight.shape, dtype=_acc_dtype(weight))


def _accumulate_dw(dw: torch.Tensor, dlogits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if _onednn(x):
        return dw.add_(_linear(x.t(), dlogits.t()).t())  # dW^T (d, V) += x^T @ dlogits
    if dlogits.dtype == dw.dtype:
        return dw.addmm_(dlogits.t(), x)  # (V, d) += (V, R) @ (R, d)
    return torch.addmm(dw, dlogits.t(), x, out_dtype=torch.float32)


def _chunk_rows(n_rows: int, n_heads: int, n_classes: int, device: torch.device) -> int:
    budget = CHUNK_BYTES if device.type == "cpu" else CUDA_CHUNK_BYTES
    return max(1, min(n_rows, budget // (4 * n_heads * n_classes)))


def _chunked_pass(hs, weight, targets, row_scales, opt, rows_fn):
    """Loss rows (A, N) of the weighted heads and, if row_scales (A, N) is given, grads.

    hs: A tensors [N, d]; weight: [V, d]; targets: [N]. Per chunk of rows: one GEMM for the
    logits of all heads, rows_fn for loss and dlogits, GEMMs for dH and an fp32 dW.
    Returns (loss (A, N) fp32, dhs (A, N, d) in input dtype or None, dW [V, d] or None).
    """
    (n, _), n_heads, device, want_grad = hs[0].shape, len(hs), weight.device, row_scales is not None
    step, w_mm = _chunk_rows(n, n_heads, weight.shape[0], device), weight.to(_mm_dtype(weight))
    w_mm_t = w_mm.t().contiguous() if _onednn(w_mm) else w_mm.t()  # (d, V): dH = dlogits @ W as a linear
    loss = torch.empty(n_heads, n, dtype=_acc_dtype(weight), device=device)  # (A, N)
    dhs = torch.empty(n_heads, *hs[0].shape, dtype=hs[0].dtype, device=device) if want_grad else None
    dw = _new_dw(w_mm) if want_grad else None  # (V, d) fp32
    for s in range(0, n, step):
        e = min(n, s + step)
        x = torch.cat([h[s:e] for h in hs]).to(w_mm.dtype)  # (A*c, d): one GEMM for all heads
        scale = row_scales[:, s:e].reshape(-1) if want_grad else None
        rows, dlogits = rows_fn(_linear(x, w_mm), targets[s:e].repeat(n_heads), scale, opt, x.dtype)
        loss[:, s:e] = rows.view(n_heads, e - s)
        if want_grad:
            dhs[:, s:e] = _linear(dlogits, w_mm_t).view(n_heads, e - s, -1)  # (A, c, d)
            dw = _accumulate_dw(dw, dlogits, x)
    return loss, dhs, (dw.to(weight.dtype).contiguous() if want_grad else None)


# ----------------------------------------------------------------------------- PyTorch path
def _torch_rows(logits, tgt, scale, opt, grad_dtype):
    """Row loss (R,) of fp32 logits (R, V) and dlogits (R, V) in grad_dtype, in place when fp32.

    `scale` (R,) is d(total)/d(row loss); None skips the gradient work.
    """
    smoothing, z_loss, ignore_index = opt
    valid = tgt != ignore_index
    t = torch.where(valid, tgt, 0).unsqueeze(1)  # (R, 1)
    x_t = logits.gather(1, t).squeeze(1)  # (R,)
    x_mean = logits.mean(1) if smoothing else 0.0
    row_max = logits.amax(1, keepdim=True)  # (R, 1)
    probs = logits.sub_(row_max).exp_()  # (R, V) exp(x - max): the softmax once scaled
    e_t = probs.gather(1, t).squeeze(1)
    other = probs.scatter_(1, t, 0.0).sum(1)  # exp-sum of the other classes: 1 - p_t without cancellation
    sum_exp, q = other + e_t, other / (other + e_t)  # q = 1 - p_t
    lse = row_max.squeeze(1) + sum_exp.log()
    nll = torch.where(q < 0.5, -torch.log1p(-q), lse - x_t)  # log1p keeps confident rows exact
    loss = torch.where(valid, (1 - smoothing) * nll + smoothing * (lse - x_mean) + z_loss * lse * lse, 0.0)
    if scale is None:
        return loss, None
    scale, z_factor = torch.where(valid, scale, 0.0), 1 + 2 * z_loss * lse
    probs.mul_((scale * z_factor / sum_exp).unsqueeze(1))  # (R, V): scaled softmax, 0 at the target
    if smoothing:
        probs.sub_((smoothing / probs.shape[1] * scale).unsqueeze(1))
    # target: z_factor * p_t - (1 - s) - s/V, written with q so that p_t - 1 does not cancel
    d_t = scale * (2 * z_loss * lse - z_factor * q + smoothing - smoothing / probs.shape[1])
    return loss, probs.scatter_(1, t, d_t.unsqueeze(1)).to(grad_dtype)


def _torch_pass(hs, weight, targets, row_scales, opt):
    return _chunked_pass(hs, weight, targets, row_scales, opt, _torch_rows)


# ----------------------------------------------------------------------------- Triton path
if HAS_TRITON:
    @triton.jit
    def _ce_rows_kernel(
        Logits_ptr,
        logits_row_stride,
        Dlogits_ptr,
        dlogits_row_stride,
        Targets_ptr,
        Scales_ptr,
        Loss_ptr,
        n_classes,
        ignore_index,
        label_smoothing,
        z_loss,
        HAS_SMOOTHING: tl.constexpr,
        HAS_Z_LOSS: tl.constexpr,
        HAS_GRAD: tl.constexpr,
        SERIES_MAX_Q: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """One row: online logsumexp over V tiles, then (HAS_GRAD) dlogits written tile by tile."""
        row = tl.program_id(0).to(tl.int64)
        logits_row = Logits_ptr + row * logits_row_stride
        dlogits_row = Dlogits_ptr + row * dlogits_row_stride
        target = tl.load(Targets_ptr + row)
        cols = tl.arange(0, BLOCK_V)
        # an out-of-range target (possible only on CUDA, where the check is an async assert)
        # counts as ignored here, so no load ever leaves the row
        if (target != ignore_index) & (target >= 0) & (target < n_classes):
            row_max = float("-inf")
            other = 0.0  # sum of exp(x - row_max) over the non-target classes
            x_target = 0.0
            x_sum = 0.0
            for v0 in range(0, n_classes, BLOCK_V):
                offs = v0 + cols
                x = tl.load(logits_row + offs, mask=offs < n_classes, other=float("-inf")).to(tl.float32)
                is_target = offs == target
                x_target += tl.sum(tl.where(is_target, x, 0.0))
                if HAS_SMOOTHING:
                    x_sum += tl.sum(tl.where(offs < n_classes, x, 0.0))
                new_max = tl.maximum(row_max, tl.max(x))
                other = other * tl.exp(row_max - new_max) + tl.sum(tl.where(is_target, 0.0, tl.exp(x - new_max)))
                row_max = new_max
            sum_exp = other + tl.exp(x_target - row_max)
            q = other / sum_exp  # 1 - p_target, exact for confident rows
            lse = row_max + tl.log(sum_exp)
            # -log(1 - q): a 3-term series where lse - x_target would cancel
            loss = tl.where(q < SERIES_MAX_Q, q * (1.0 + q * (0.5 + q / 3.0)), lse - x_target)
            if HAS_SMOOTHING:
                loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - x_sum / n_classes)
            z_factor = 1.0
            if HAS_Z_LOSS:
                loss += z_loss * lse * lse
                z_factor += 2.0 * z_loss * lse
            tl.store(Loss_ptr + row, loss)
            if HAS_GRAD:
                scale = tl.load(Scales_ptr + row).to(tl.float32)
                uniform = label_smoothing / n_classes
                d_target = scale * (z_factor - 1.0 - z_factor * q + label_smoothing - uniform)
                for v0 in range(0, n_classes, BLOCK_V):
                    offs = v0 + cols
                    x = tl.load(logits_row + offs, mask=offs < n_classes, other=float("-inf")).to(tl.float32)
                    d = scale * (z_factor * tl.exp(x - lse) - uniform)
                    d = tl.where(offs == target, d_target, d)
                    tl.store(dlogits_row + offs, d.to(Dlogits_ptr.dtype.element_ty), mask=offs < n_classes)
        else:
            tl.store(Loss_ptr + row, 0.0)
            if HAS_GRAD:
                for v0 in range(0, n_classes, BLOCK_V):
                    offs = v0 + cols
                    zeros = tl.zeros([BLOCK_V], dtype=Dlogits_ptr.dtype.element_ty)
                    tl.store(dlogits_row + offs, zeros, mask=offs < n_classes)


def _block_v(n_classes: int) -> int:
    cap = INTERPRET_BLOCK_V if interpreting() else CUDA_BLOCK_V
    return min(cap, triton.next_power_of_2(n_classes))


def _triton_rows(logits, tgt, scale, opt, grad_dtype):
    """Row loss (R,) of fp32 logits (R, V) and dlogits (R, V) in grad_dtype (in place when fp32)."""
    smoothing, z_loss, ignore_index = opt
    logits, tgt = logits.contiguous(), tgt.contiguous()
    n_rows, n_classes = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    want_grad = scale is not None
    dlogits = logits if grad_dtype == logits.dtype or not want_grad else torch.empty_like(logits, dtype=grad_dtype)
    _ce_rows_kernel[(n_rows,)](
        logits, logits.stride(0), dlogits, dlogits.stride(0), tgt,
        scale.contiguous() if want_grad else loss, loss, n_classes, ignore_index, smoothing, z_loss,
        HAS_SMOOTHING=smoothing > 0, HAS_Z_LOSS=z_loss > 0, HAS_GRAD=want_grad,
        SERIES_MAX_Q=SERIES_MAX_Q, BLOCK_V=_block_v(n_classes), num_warps=ROW_WARPS)
    return loss.to(logits.dtype), (dlogits if want_grad else None)


def _triton_pass(hs, weight, targets, row_scales, opt):
    return _chunked_pass(hs, weight, targets, row_scales, opt, _triton_rows)


# ----------------------------------------------------------------------------- autograd
class _WeightedCE(torch.autograd.Function):
    """Forward computes loss and grads chunk by chunk; backward scales them by grad_output.

    reduction='none' has a per-token grad_output, so it saves the inputs and reruns the pass.
    No host sync: head weights stay Python floats and reach the device only through kernels.
    """

    @staticmethod
    def forward(ctx, run_pass, weight, targets, head_weights, reduction, opt, *hs):
        ctx.active = [k for k, w in enumerate(head_weights) if w > 0]
        ctx.weights = [head_weights[k] for k in ctx.active]
        ctx.run_pass, ctx.opt, ctx.reduction, ctx.n_heads = run_pass, opt, reduction, len(hs)
        act_hs, n = [hs[k] for k in ctx.active], targets.shape[0]
        coef = _row_loss_coefficients(ctx.weights, targets, reduction, opt[2], _acc_dtype(weight))  # (A,)
        want_grad = reduction != "none" and any(ctx.needs_input_grad)
        scales = coef[:, None].expand(-1, n) if want_grad else None  # (A, N)
        rows, dhs, dw = _run_pass(run_pass, act_hs, weight, targets, scales, opt)
        if reduction != "none":
            ctx.save_for_backward(weight, hs[0], dhs, dw)
            return (rows.sum(1) * coef).sum()
        ctx.save_for_backward(weight, hs[0], targets, *act_hs)
        out = rows.new_zeros(len(hs), n)  # (K, N)
        for a, k in enumerate(ctx.active):
            out[k] = coef[a] * rows[a]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            weight, h0, targets, *act_hs = ctx.saved_tensors
            scales = [w * grad_out[k] for w, k in zip(ctx.weights, ctx.active)]  # A x (N,)
            _, dhs, dw = _run_pass(ctx.run_pass, act_hs, weight, targets, _stack(scales), ctx.opt)
        else:
            weight, h0, dhs, dw = ctx.saved_tensors
            if dhs is not None:
                dhs, dw = dhs * grad_out.to(dhs.dtype), dw * grad_out.to(dw.dtype)
        # zero-weight heads get a stride-0 zero gradient: correct for autograd.grad, and free
        dh = [_zeros_like(h0) for _ in range(ctx.n_heads)]
        for a, k in enumerate(ctx.active):
            dh[k] = dhs[a]
        return (None, _zeros_like(weight) if dw is None else dw, None, None, None, None, *dh)


def _run_pass(run_pass, act_hs, weight, targets, scales, opt):
    if not act_hs:  # every head weight is 0
        return weight.new_zeros(0, targets.shape[0], dtype=_acc_dtype(weight)), None, None
    return run_pass(act_hs, weight, targets, scales, opt)


def _stack(rows: list):
    return torch.stack(rows) if rows else None


def _zeros_like(t: torch.Tensor) -> torch.Tensor:
    return t.new_zeros(()).expand(t.shape)


def _row_loss_coefficients(weights: list, targets: torch.Tensor, reduction: str, ignore_index: int, dtype):
    """d(total loss)/d(row loss) per weighted head (A,): w_k, over n_valid for 'mean'."""
    unit = torch.ones((), dtype=dtype, device=targets.device)
    if reduction == "mean":
        unit = unit / (targets != ignore_index).sum().clamp(min=1)  # all ignored -> loss 0, grads 0
    return torch.stack([w * unit for w in weights]) if weights else unit.new_zeros(0)


# ----------------------------------------------------------------------------- public
def weighted_linear_cross_entropy(hiddens: Hiddens, weight: torch.Tensor, targets: torch.Tensor,
                                  head_weights, *, ignore_index: int = -100, reduction: str = "mean",
                                  label_smoothing: float = 0.0, z_loss: float = 0.0,
                                  backend: str = "auto") -> torch.Tensor:
    """sum_k w_k * cross_entropy(h_k @ weight.T, targets), without holding [N, V] logits.

    hiddens: K tensors [N, d] or one [K, N, d] (fp32/bf16/fp16); weight: [V, d], same dtype;
    targets: [N] int64 in [0, V) or ignore_index; head_weights: K finite floats >= 0 (a
    sequence or 1-D tensor; constants: no gradient flows to them).

    Per row i of head k: ce = lse - (1 - s) * x_t - s/V * sum_j x_j (label smoothing s,
    exactly F.cross_entropy's), plus z_loss * lse**2 (PaLM-style z-loss, reduced like ce).
    - 'mean': sum_k w_k * sum_i row_loss / n_valid, n_valid = non-ignored rows (as
      F.cross_entropy); all rows ignored -> 0 with zero gradients.
    - 'sum': sum_k w_k * sum_i row_loss.
    - 'none': [K, N] of w_k * row_loss (0 on ignored rows), so .sum() equals 'sum'.
    Returns fp32 (fp64 for fp64 inputs). Heads with w_k == 0 cost nothing; their gradient is a stride-0
    zero tensor. Gradients to hiddens and weight come back in the input dtype; logits, lse
    and dW accumulate in fp32. backend: 'auto' | 'triton' | 'torch' (see kernels/backend.py).

    Target range: checked on the host for CPU tensors (ValueError naming `targets`). On CUDA
    it is an asynchronous device assert instead (no host sync on the hot path, so it surfaces
    as a CUDA error at the next sync); meanwhile the Triton kernel treats such a row as ignored
    and torch's gather asserts, so a bad target never reads out of bounds.
    """
    hs = _as_head_list(hiddens)
    _check_tensors(hs, weight, targets)
    ws = _check_head_weights(head_weights, len(hs))
    _check_options(reduction, label_smoothing, z_loss)
    chosen = resolve_backend(backend, weight, targets, *hs)
    check_target_range(targets, weight.shape[0], ignore_index)
    run_pass = _triton_pass if chosen == "triton" else _torch_pass
    opt = (float(label_smoothing), float(z_loss), int(ignore_index))
    return _WeightedCE.apply(run_pass, weight, targets.long(), ws, reduction, opt, *hs)

