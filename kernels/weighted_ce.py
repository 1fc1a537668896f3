"""Weighted multi-head linear cross-entropy: sum_k w_k * CE(h_k @ W.T, y), never holding [N, V].

Early-exit training puts one shared LM head W [V, d] behind several layers and minimises a
weighted sum of their cross-entropies. The forward pass computes the loss AND the gradients of
every weighted head and of W, one chunk of rows at a time (backward only rescales them):

1. one GEMM gives the fp32 logits of the chunk's rows of all weighted heads, stacked;
2. a row step turns them in place into row losses and dlogits;
3. two GEMMs give dH and add dlogits^T @ H into dW.
Heads with weight 0 are never touched (for weights given as numbers or a CPU tensor; a CUDA
tensor of weights is never read on the host, so there every head runs), and rows whose target
is ignore_index enter no GEMM.

Gradients stay out of 16-bit storage until grad_output is applied: dH (A, N, d) and dW [V, d]
are fp32 from the GEMMs to backward, which multiplies them by grad_output in fp32 and rounds
once to the input dtype. fp16 cannot hold either intermediate: a GradScaler's grad_output of
2**16 is inf there, and a dlogit is ~ w_k / N * p (2e-10 at N = 16k, V = 128k), below fp16's
smallest subnormal (6e-8) until the scale lifts it. Saving them in fp32 costs 2 bytes per
element over the input dtype: 2 * A * N * d + 2 * V * d bytes held from forward to backward.

- PyTorch path: oneDNN's GEMMs on CPU (MKL's sgemm runs AVX2 code on AMD CPUs, 2-3x slower),
  cuBLAS's on CUDA (fp32 output for bf16/fp16 inputs); the row step is torch ops (max, exp,
  sum, scale) in place on the chunk. On CPU only the non-ignored rows are gathered into
  chunks; on CUDA that would need their count on the host (a sync), so every row runs there.
  CPU multiplies 16-bit inputs in fp32; on CUDA fp16 keeps its dlogits in fp32 and runs the
  dH/dW GEMMs in fp32 on an fp32 copy of W (4 * V * d bytes), bf16 keeps bf16 dlogits.
- Triton path (CUDA, or CPU under TRITON_INTERPRET=1): the non-ignored rows are moved first
  by a stable argsort on the device and their count stays on the device. Three Triton GEMM
  kernels (tl.dot, fp32 accumulators) and one row kernel read that count and skip every tile
  past it, so ignored rows cost no matmul work and the host never waits. The row kernel, one
  program per row, does an online logsumexp over V tiles, then writes fp32 dlogits over the
  logits tile by tile. For 16-bit inputs the dH and dW kernels multiply each dlogits tile by
  the chunk's power of two that brings its largest |dlogit| near 2**14 before rounding it to
  the input dtype for tl.dot, and divide it out of the fp32 sum: 16-bit tensor-core rate, and
  no flush to 0. The chunk's rows are padded to a multiple of ROW_ALIGN columns, so every row
  starts aligned whatever V is (V = 5003 or 50257 otherwise costs the dH kernel its
  vectorised loads: 254 registers on sm_90); the padding is never read as a logit, and holds
  zeros as dlogits. dW is one program per [V, d] tile looping over rows: no atomics,
  deterministic. Storing the chunk's logits costs 3 GEMMs, where recomputing logit tiles
  inside one kernel would cost 5.
Both keep the true-class gradient p - 1 exact for confident rows: it is computed as minus the
exp-sum of the other classes over the total, never as a difference of numbers close to 1.

Self-distillation (distill_weight > 0) rides in the same pass. The teacher's logits of a chunk
are the teacher head's rows of the chunk's logits (no GEMM more) or, for a teacher given as
hiddens, one more logits GEMM per chunk; every student reads them there, and none of them
enters the dH/dW GEMMs (the teacher is detached). PyTorch path: the teacher's softmax at T
is taken into a (c, V) buffer first, then head by head a student's softmax at T goes to one
(c, V) scratch and lambda * T * scale * (p_k - p_t) is added to its dlogits; the chunk budget
counts the two buffers. Triton path: the row kernel (HAS_DISTILL) takes online, in its one
pass over the student's row, the student's exp-sum at T and the teacher row's max, exp-sum
and p_t-weighted z_t - z_k, so KL costs no pass more; the gradient pass reads the teacher's
row again. A teacher head's own rows run in a second launch, once every student has read
its logits (they turn into its dlogits in place).

return_argmax=True also gives each head's row argmax (the first index on ties, as torch.argmax
and exit_confidence), taken from the chunk's logits before they turn into dlogits: the PyTorch
path adds one argmax over them, the Triton row kernel (HAS_ARGMAX) tracks it beside its online
max. A learned confidence's labels need it, and would otherwise cost a head pass per layer.
"""
import math
import numbers
import operator
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch.autograd.function import once_differentiable

from . import gemm
from .backend import HAS_TRITON, autocast_inputs, dot_precision, interpreting, resolve_backend
from .checks import check_matrix, check_same, check_shape, check_target_range, check_targets

if HAS_TRITON:
    import triton
    import triton.language as tl

REDUCTIONS = ("mean", "sum", "none")
CHUNK_BYTES = 32 * 2**20  # fp32 logits of one CPU row chunk (all heads): about L3-sized
CUDA_CHUNK_BYTES = 2**30  # on GPUs: big enough for GEMMs at full rate, small next to [N, V]
CUDA_BLOCK_V, INTERPRET_BLOCK_V = 4096, 32  # classes per tile of the row kernel
ROW_WARPS = 8
ROW_ALIGN = 32  # Triton logits rows padded to this many fp32 columns: 128 B, a multiple of the
                # 16 that Triton specialises strides and bounds on, so loads along V vectorise
DLOGITS_16BIT_MAX = 2.0 ** 14  # 16-bit operands: a chunk's dlogits scaled by a power of two to at
                               # most this before rounding: fp16's max is 65504, a factor 2 spare
SERIES_MAX_Q = 1e-3  # below this 1 - p_target, -log(p_target) comes from its series

Hiddens = Union[torch.Tensor, Sequence[torch.Tensor]]
Teacher = Union[None, int, torch.Tensor]  # in the passes: no distillation, the position of the teacher
                                          # among the heads that run, or the teacher's hiddens [N, d]


@dataclass(frozen=True)
class CEOptions:
    """The loss options every pass and row step reads (by name)."""
    label_smoothing: float
    z_loss: float
    ignore_index: int
    distill_weight: float = 0.0  # read only when a pass is given a teacher
    distill_temperature: float = 1.0


class HeadWeights(NamedTuple):
    """The heads that run (ascending indices k) and their weights w_k: Python floats, or a
    (A,) tensor on the hiddens' CUDA device that the host never reads (then every head runs)."""
    active: List[int]
    values: Union[List[float], torch.Tensor]


# ----------------------------------------------------------------------------- validation
def _as_head_list(hiddens: Hiddens) -> list:
    """K tensors [N, d] from a list of them or one [K, N, d] tensor (checked by _check_tensors)."""
    if isinstance(hiddens, torch.Tensor):
        if hiddens.dim() != 3:
            raise ValueError(f"hiddens must be [K, N, d] or a list of [N, d], got shape {tuple(hiddens.shape)}")
        return list(hiddens.unbind(0))
    if not isinstance(hiddens, (list, tuple)) or not hiddens:
        raise TypeError("hiddens must be a non-empty list of [N, d] tensors or one [K, N, d] tensor, "
                        f"got {type(hiddens).__name__}")
    return list(hiddens)


def _check_tensors(hs: list, weight: torch.Tensor, targets: torch.Tensor) -> None:
    check_matrix("hiddens[0]", hs[0])
    for k, h in enumerate(hs[1:], start=1):
        check_same(f"hiddens[{k}]", h, hs[0], "hiddens[0]")
        check_shape(f"hiddens[{k}]", h, hs[0].shape)
    check_matrix("weight", weight, n_cols=hs[0].shape[1])
    check_same("weight", weight, hs[0], "hiddens")
    check_targets(targets, hs[0].shape[0], hs[0], "hiddens")


def _check_head_weights(head_weights, n_heads: int, device: torch.device) -> HeadWeights:
    """Numbers and CPU tensors are read on the host (no sync) and zero-weight heads dropped.
    A tensor on the hiddens' CUDA device is checked by an async device assert instead."""
    if isinstance(head_weights, torch.Tensor) and head_weights.device.type != "cpu":
        return _device_head_weights(head_weights, n_heads, device)
    if isinstance(head_weights, torch.Tensor):
        head_weights = head_weights.detach().reshape(-1).tolist()
    ws = [float(w) for w in head_weights]
    if len(ws) != n_heads:
        raise ValueError(f"head_weights has {len(ws)} entries for {n_heads} heads")
    for k, w in enumerate(ws):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"head_weights[{k}] = {w} must be finite and >= 0")
    active = [k for k, w in enumerate(ws) if w > 0]
    return HeadWeights(active, [ws[k] for k in active])


def _device_head_weights(head_weights: torch.Tensor, n_heads: int, device: torch.device) -> HeadWeights:
    """Reading the weights would be a host sync on the hot path, so every head runs (a zero
    weight then costs its GEMMs, and its hiddens must be finite: 0 * NaN is NaN) and a bad
    weight surfaces as a CUDA error at the next sync instead of a ValueError."""
    ws = head_weights.detach().reshape(-1)
    if ws.numel() != n_heads:
        raise ValueError(f"head_weights has {ws.numel()} entries for {n_heads} heads")
    if ws.device != device:
        raise ValueError(f"head_weights is on {ws.device}, hiddens on {device}: pass a CPU tensor or numbers")
    torch._assert_async((torch.isfinite(ws) & (ws >= 0)).all(), "head_weights must be finite and >= 0")
    return HeadWeights(list(range(n_heads)), ws)


def _check_options(reduction: str, label_smoothing: float, z_loss: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"z_loss must be finite and >= 0, got {z_loss}")


def _check_number(name: str, value) -> float:
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _check_distill(distill_weight, distill_temperature, teacher, hs: list) -> None:
    weight, temperature = _check_number("distill_weight", distill_weight), \
        _check_number("distill_temperature", distill_temperature)
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"distill_weight must be finite and >= 0, got {distill_weight}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"distill_temperature must be finite and > 0, got {distill_temperature}")
    if teacher is None:
        if weight > 0:
            raise ValueError("distill_weight > 0 needs a teacher: a head index into hiddens or an [N, d] tensor")
    elif isinstance(teacher, torch.Tensor):
        check_matrix("teacher", teacher, n_cols=hs[0].shape[1])
        check_same("teacher", teacher, hs[0], "hiddens")
        check_shape("teacher", teacher, hs[0].shape)
    elif not -len(hs) <= _head_index(teacher) < len(hs):
        raise ValueError(f"teacher = {teacher} is no head index: hiddens has {len(hs)} heads")


def _head_index(teacher) -> int:
    if isinstance(teacher, bool):  # an int to Python, never meant as a head
        raise TypeError("teacher must be a head index (int) or an [N, d] tensor, got bool")
    try:
        return operator.index(teacher)
    except TypeError:
        raise TypeError(f"teacher must be a head index (int) or an [N, d] tensor, got {type(teacher).__name__}") \
            from None


def _resolve_teacher(teacher, distill_weight: float, hs: list, heads: HeadWeights):
    """(position of the teacher among the heads that run or None, the teacher's hiddens [N, d]
    or None); (None, None): no distillation (weight 0, or the teacher head is the only one that
    runs). A head of weight 0 as teacher does not run: its hiddens take the extra GEMM."""
    if distill_weight == 0:
        return None, None
    if isinstance(teacher, torch.Tensor):
        return None, teacher.detach()
    k = _head_index(teacher) % len(hs)
    if k not in heads.active:
        return None, hs[k].detach()
    return (heads.active.index(k), None) if len(heads.active) > 1 else (None, None)


# ----------------------------------------------------------------------------- shared chunk loop
def _new_dw(weight: torch.Tensor) -> torch.Tensor:
    """Zero fp32 dW [V, d]; stored as dW^T [d, V] where oneDNN accumulates x^T @ dlogits."""
    if gemm.use_onednn(weight):
        return weight.new_zeros(weight.shape[::-1], dtype=torch.float32).t()
    return weight.new_zeros(weight.shape, dtype=gemm.acc_dtype(weight))


def _accumulate_dw(dw: torch.Tensor, dlogits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if gemm.use_onednn(x):
        return dw.add_(gemm.linear_fp32(x.t(), dlogits.t()).t())  # dW^T (d, V) += x^T @ dlogits
    if dlogits.dtype == dw.dtype:
        return dw.addmm_(dlogits.t(), x)  # (V, d) += (V, R) @ (R, d)
    return torch.addmm(dw, dlogits.t(), x, out_dtype=torch.float32)


def _chunk_rows(n_rows: int, n_heads: int, n_classes: int, device: torch.device) -> int:
    budget = CHUNK_BYTES if device.type == "cpu" else CUDA_CHUNK_BYTES
    return max(1, min(n_rows, budget // (4 * n_heads * n_classes)))


def _kept_rows(targets: torch.Tensor, ignore_index: int):
    """Positions of the non-ignored rows (CPU), or None to run every row.

    On CPU reading the count is free, so ignored rows cost no GEMM work. On CUDA it would be a
    host sync: the PyTorch path runs every row there (the Triton path skips them on the device).
    """
    if targets.device.type != "cpu":
        return None
    keep = (targets != ignore_index).nonzero().squeeze(1)
    return None if keep.numel() == targets.numel() else keep


def _grad_mm_dtype(mm_dtype: torch.dtype) -> torch.dtype:
    """dtype of the PyTorch path's dlogits and of its dH/dW GEMM operands. fp16 cannot hold
    dlogits (w_k / N * p falls below its smallest subnormal, 6e-8, before any loss scale can
    lift it), so they stay fp32 and those two GEMMs run in fp32 (CUDA only: CPU multiplies
    every 16-bit input in fp32 anyway); bf16 has fp32's exponent range and keeps its own."""
    return torch.float32 if mm_dtype == torch.float16 else mm_dtype


def _chunked_pass(hs, weight, targets, row_scales, opt: CEOptions, rows_fn, teacher: Teacher = None,
                  argmax: Optional[torch.Tensor] = None):
    """Loss rows (A, N) of the heads that run and, if row_scales (A, N) is given, grads; if
    argmax (A, N) int64 is given, the row argmax of the non-ignored rows' logits goes there.

    hs: A tensors [N, d]; weight: [V, d]; targets: [N] int64. Per chunk of kept rows: one GEMM for
    the logits of all heads, rows_fn for loss and dlogits, GEMMs for dH and dW. With a teacher,
    _torch_distill_rows replaces rows_fn (and a teacher tensor costs one more logits GEMM).
    Returns (loss (A, N), dhs (A, N, d) or None, dW [V, d] or None), all in fp32 (fp64 for
    fp64 inputs): the caller applies grad_output before rounding them to the input dtype.
    """
    (n, _), n_heads, device, want_grad = hs[0].shape, len(hs), weight.device, row_scales is not None
    keep = _kept_rows(targets, opt.ignore_index)
    n_kept, acc_dtype = (n if keep is None else keep.numel()), gemm.acc_dtype(weight)
    n_buffers = n_heads if teacher is None else n_heads + 2  # distillation: teacher softmax, one scratch
    step, w_mm = _chunk_rows(n_kept, n_buffers, weight.shape[0], device), weight.to(gemm.mm_dtype(weight))
    w_grad = w_mm.to(_grad_mm_dtype(w_mm.dtype))  # w_mm itself, or an fp32 copy for fp16 on CUDA
    w_grad_t = w_grad.t().contiguous() if gemm.use_onednn(w_grad) else w_grad.t()  # (d, V): dH as a linear
    new = torch.empty if keep is None else torch.zeros  # ignored rows: loss 0, dH 0
    loss = new(n_heads, n, dtype=acc_dtype, device=device)  # (A, N)
    dhs = new(n_heads, *hs[0].shape, dtype=acc_dtype, device=device) if want_grad else None
    dw = _new_dw(w_grad) if want_grad else None  # (V, d)
    for s in range(0, n_kept, step):
        e = min(n_kept, s + step)
        rows_of = (lambda t, dim=0: t.narrow(dim, s, e - s)) if keep is None else \
            (lambda t, dim=0: t.index_select(dim, keep[s:e]))
        x = torch.cat([rows_of(h) for h in hs]).to(w_mm.dtype)  # (A*c, d): one GEMM for all heads
        tgt = rows_of(targets).repeat(n_heads)
        if keep is None:  # every row runs (CUDA): zero the ignored ones, or 0 * NaN would reach dW and dH
            x.masked_fill_((tgt == opt.ignore_index).unsqueeze(1), 0.0)
        scale = rows_of(row_scales, 1).reshape(-1) if want_grad else None
        logits = gemm.linear_fp32(x, w_mm)  # (A*c, V)
        if argmax is not None:  # before the row step turns the logits into dlogits
            arg = logits.argmax(1)  # (A*c,) the first index on ties
            if keep is None:
                arg.masked_fill_(tgt == opt.ignore_index, opt.ignore_index)
            _put_rows(argmax, keep, s, arg.view(n_heads, e - s))
        if teacher is None:
            rows, dlogits = rows_fn(logits, tgt, scale, opt, w_grad.dtype)
        else:
            ignored = (tgt[:e - s] == opt.ignore_index) if keep is None else None
            z_t = _teacher_logits(teacher, logits, e - s, rows_of, w_mm, ignored)
            head = teacher if isinstance(teacher, int) else None
            rows, dlogits = _torch_distill_rows(logits, z_t, head, tgt, scale, opt, w_grad.dtype)
        _put_rows(loss, keep, s, rows.view(n_heads, e - s))
        if want_grad:
            _put_rows(dhs, keep, s, gemm.linear_fp32(dlogits, w_grad_t).view(n_heads, e - s, -1))  # (A, c, d)
            dw = _accumulate_dw(dw, dlogits, x.to(w_grad.dtype))
    return loss, dhs, dw


def _put_rows(out: torch.Tensor, keep, start: int, values: torch.Tensor) -> None:
    """out[:, rows start..] = values (A, c, ...): a slice, or the kept positions keep[start:]."""
    if keep is None:
        out.narrow(1, start, values.shape[1]).copy_(values)
    else:
        out.index_copy_(1, keep[start:start + values.shape[1]], values.to(out.dtype))


# ----------------------------------------------------------------------------- PyTorch path
def _torch_rows(logits, tgt, scale, opt: CEOptions, grad_dtype):
    """Row loss (R,) of fp32 logits (R, V) and dlogits (R, V) in grad_dtype, in place when fp32.

    `scale` (R,) is d(total)/d(row loss); None skips the gradient work.
    """
    smoothing, z_loss = opt.label_smoothing, opt.z_loss
    valid = tgt != opt.ignore_index
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


def _teacher_logits(teacher, logits, n_rows: int, rows_of, w_mm, ignored):
    """The chunk's teacher logits (c, V): the teacher head's rows of logits (A*c, V), a view (no
    GEMM), or one GEMM on the teacher tensor's rows (zeroed where `ignored`, as the heads' are)."""
    if isinstance(teacher, int):
        return logits.narrow(0, teacher * n_rows, n_rows)
    x_t = rows_of(teacher).to(w_mm.dtype)  # may be a view of the caller's tensor: never written
    if ignored is not None:
        x_t = x_t.masked_fill(ignored.unsqueeze(1), 0.0)
    return gemm.linear_fp32(x_t, w_mm)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a[i, j] * b[i, j] (R,) of (R, V) rows, without an (R, V) product."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _torch_distill_rows(logits, teacher_logits, teacher_head: Optional[int], tgt, scale, opt: CEOptions,
                        grad_dtype):
    """_torch_rows plus distillation. logits (A*c, V) of A heads; teacher_logits (c, V): a view
    of head teacher_head's rows of logits, or (teacher_head None) the teacher tensor's own, then
    reused as the scratch. Every other head adds lambda*T^2*KL(p_t || p_k) to its valid rows'
    loss and lambda*T*(p_k - p_t) times its scale to their dlogits. The teacher's softmax is taken
    first, so every head's logits can then turn into dlogits in place."""
    n_rows, inv_t = teacher_logits.shape[0], 1.0 / opt.distill_temperature
    t_max = teacher_logits.amax(1, keepdim=True)  # (c, 1)
    p_t = torch.add(t_max * -inv_t, teacher_logits, alpha=inv_t).exp_()  # (c, V) exp((z_t - max) / T)
    t_sum = p_t.sum(1, keepdim=True)
    p_t.div_(t_sum)  # softmax(z_t / T)
    t_dot = _row_dot(p_t, teacher_logits)  # (c,) <p_t, z_t>
    scratch = teacher_logits if teacher_head is None else torch.empty_like(p_t)  # a student's softmax
    loss = torch.empty(logits.shape[0], dtype=logits.dtype, device=logits.device)
    grad_factor = opt.distill_weight * opt.distill_temperature  # lambda * T; the loss's is lambda * T^2
    kl_factor = grad_factor * opt.distill_temperature
    for head, start in enumerate(range(0, logits.shape[0], n_rows)):
        z, tgt_a = logits.narrow(0, start, n_rows), tgt.narrow(0, start, n_rows)  # one head's rows
        scale_a = None if scale is None else scale.narrow(0, start, n_rows)
        if head == teacher_head:  # no student of itself: its cross-entropy only
            loss[start:start + n_rows], _ = _torch_rows(z, tgt_a, scale_a, opt, z.dtype)
            continue
        s_max = z.amax(1, keepdim=True)
        e_k = torch.add(s_max * -inv_t, z, alpha=inv_t, out=scratch).exp_()  # (c, V) exp((z - max) / T)
        s_sum = e_k.sum(1, keepdim=True)
        # KL = <p_t, z_t - z_k> / T - lse_t + lse_k, lse = max / T + log(exp-sum)
        kl = (t_dot - _row_dot(p_t, z) + (s_max - t_max).squeeze(1)) * inv_t + (s_sum / t_sum).log().squeeze(1)
        valid = tgt_a != opt.ignore_index
        ce, dlogits = _torch_rows(z, tgt_a, scale_a, opt, z.dtype)  # z turns into its dlogits
        loss[start:start + n_rows] = ce + torch.where(valid, kl_factor * kl, 0.0)
        if scale is not None:  # dlogits += lambda * T * scale * (p_k - p_t)
            factor = torch.where(valid, grad_factor * scale_a, 0.0).unsqueeze(1)  # (c, 1)
            dlogits.addcmul_(e_k, factor / s_sum).addcmul_(p_t, factor, value=-1.0)
    return loss, (None if scale is None else logits.to(grad_dtype))


def _torch_pass(hs, weight, targets, row_scales, opt: CEOptions, teacher: Teacher = None, argmax=None):
    return _chunked_pass(hs, weight, targets, row_scales, opt, _torch_rows, teacher, argmax)


# ----------------------------------------------------------------------------- Triton path
# The Triton path reorders rows so that the non-ignored ones come first (a stable argsort on
# the device) and keeps their count on the device: every kernel loads it and skips the tiles
# past it, so ignored rows cost no matmul work and the host never waits for the count.
# Tiles are named by what they tile, as in every op: BLOCK_M rows, BLOCK_V classes, BLOCK_D the
# model dim; each GEMM kernel reduces along a different one (logits: D, dH: V, dW: M).
if HAS_TRITON:
    @triton.jit
    def _live_rows(N_live_ptr, chunk_start, n_rows):
        """Rows of this chunk (per head) that hold a non-ignored target: a prefix of the chunk."""
        return tl.minimum(tl.maximum(tl.load(N_live_ptr) - chunk_start, 0), n_rows)

    @triton.jit
    def _row_tile(n_rows, BLOCK_M: tl.constexpr):
        """(row tile, column tile, head) of a program; row tiles vary fastest, so the programs
        running together share one tile of the right-hand matrix."""
        n_m = tl.cdiv(n_rows, BLOCK_M)
        return tl.program_id(0) % n_m, tl.program_id(0) // n_m, tl.program_id(1).to(tl.int64)

    @triton.jit(do_not_specialize=["chunk_start", "n_rows"])
    def _logits_kernel(
        X_ptr,
        X_head_stride,
        X_row_stride,
        W_ptr,
        W_row_stride,
        Out_ptr,
        Out_head_stride,
        Out_row_stride,
        N_live_ptr,
        chunk_start,
        n_rows,
        n_classes,
        d,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Out[a, m, v] = X[a, m] . W[v] in fp32 for the live rows; tiles past them do nothing."""
        pid_m, pid_n, head = _row_tile(n_rows, BLOCK_M)
        live = _live_rows(N_live_ptr, chunk_start, n_rows)
        if pid_m * BLOCK_M < live:
            rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            vs = pid_n * BLOCK_V + tl.arange(0, BLOCK_V)
            ds = tl.arange(0, BLOCK_D)
            x_ptrs = X_ptr + head * X_head_stride + rows[:, None].to(tl.int64) * X_row_stride + ds[None, :]
            w_ptrs = W_ptr + vs[:, None].to(tl.int64) * W_row_stride + ds[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
            for d0 in range(0, d, BLOCK_D):
                x = tl.load(x_ptrs + d0, mask=(rows[:, None] < live) & (d0 + ds[None, :] < d), other=0.0)
                w = tl.load(w_ptrs + d0, mask=(vs[:, None] < n_classes) & (d0 + ds[None, :] < d), other=0.0)
                acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
            out_ptrs = Out_ptr + head * Out_head_stride + rows[:, None].to(tl.int64) * Out_row_stride + vs[None, :]
            tl.store(out_ptrs, acc, mask=(rows[:, None] < live) & (vs[None, :] < n_classes))

    @triton.jit
    def _dlogits_range_scale(Dmax_ptr, DLOGITS_16BIT_MAX: tl.constexpr):
        """The power of two F that puts the chunk's largest |dlogit| in (MAX/2, MAX], MAX =
        DLOGITS_16BIT_MAX: dlogits * F fit fp16 with 2**27 of range left in its normals, where
        unscaled dlogits ~ w_k / N * p would flush to 0. 1 for a chunk without gradients; at
        most 2**126 (finite in fp32) for absurdly small head weights."""
        d_max = tl.load(Dmax_ptr)
        exponent = tl.minimum(tl.floor(tl.log2(DLOGITS_16BIT_MAX / d_max)), 126.0)
        return tl.where(d_max > 0, tl.exp2(exponent), 1.0)

    @triton.jit
    def _load_logits(logits_row, offs, n_classes, n_padded):
        """A row's logits at offs, -inf past n_classes. The load runs to the aligned n_padded so
        it vectorises (a bound of V = 5003 would split it into single floats); the padding it
        reads is never a logit."""
        x = tl.load(logits_row + offs, mask=offs < n_padded, other=float("-inf"))
        return tl.where(offs < n_classes, x, float("-inf"))

    @triton.jit(do_not_specialize=["chunk_start", "n_rows", "teacher_head"])
    def _ce_rows_kernel(
        Logits_ptr,
        logits_row_stride,
        Teacher_ptr,
        teacher_row_stride,
        Targets_ptr,
        Scales_ptr,
        Loss_ptr,
        Argmax_ptr,
        Dmax_ptr,
        N_live_ptr,
        chunk_start,
        n_rows,
        n_classes,
        n_padded,
        teacher_head,
        ignore_index,
        label_smoothing,
        z_loss,
        distill_weight,
        distill_temperature,
        HAS_SMOOTHING: tl.constexpr,
        HAS_Z_LOSS: tl.constexpr,
        HAS_DISTILL: tl.constexpr,
        HAS_GRAD: tl.constexpr,
        TRACK_MAX: tl.constexpr,
        HAS_ARGMAX: tl.constexpr,
        SERIES_MAX_Q: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """One row: online logsumexp over its n_classes logits, then (HAS_GRAD) fp32 dlogits
        written over them tile by tile, zeros over the padding up to n_padded (the dH and dW
        GEMMs read whole aligned rows), and (TRACK_MAX) the row's max |dlogit| into Dmax.
        HAS_ARGMAX: the row's argmax (first on ties) into Argmax, ignore_index for an ignored row.

        HAS_DISTILL: the row is a student of the teacher's row of the same chunk row (Teacher,
        rows padded like Logits): the same pass also takes online the student's exp-sum at
        temperature T and the teacher's, and <p_t, z_t - z_k>, for T^2 * KL(p_t || p_k); the
        gradient pass adds T * (p_k - p_t) from a second read of the teacher's row. Programs
        skip head teacher_head's rows (a launch after this one runs them: their logits are
        the teacher's until then)."""
        row = tl.program_id(0).to(tl.int64)
        if HAS_DISTILL:
            row += tl.where(row >= teacher_head * n_rows, n_rows, 0)
            teacher_row = Teacher_ptr + (row % n_rows) * teacher_row_stride
            inv_t = 1.0 / distill_temperature
        logits_row = Logits_ptr + row * logits_row_stride
        target = tl.load(Targets_ptr + row)
        is_live = row % n_rows < _live_rows(N_live_ptr, chunk_start, n_rows)  # else ignored, never read
        cols = tl.arange(0, BLOCK_V)
        # an out-of-range target (possible only on CUDA, where the check is an async assert)
        # counts as ignored here, so no load ever leaves the row
        if is_live & (target != ignore_index) & (target >= 0) & (target < n_classes):
            row_max = float("-inf")
            other = 0.0  # sum of exp(x - row_max) over the non-target classes
            x_target = 0.0
            x_sum = 0.0
            sum_exp_t = 0.0  # HAS_DISTILL: sum of exp((x - row_max) / T), the student's at temperature T
            t_max = float("-inf")  # and the teacher's row: its max, exp-sum at T, and
            t_sum = 0.0
            t_dot = 0.0  # sum of exp((x_t - t_max) / T) * (x_t - x): t_sum * <p_t, z_t - z_k>
            best = 0  # HAS_ARGMAX: the argmax so far
            for v0 in range(0, n_classes, BLOCK_V):
                offs = v0 + cols
                x = _load_logits(logits_row, offs, n_classes, n_padded)
                is_target = offs == target
                x_target += tl.sum(tl.where(is_target, x, 0.0))
                if HAS_SMOOTHING:
                    x_sum += tl.sum(tl.where(offs < n_classes, x, 0.0))
                tile_max = tl.max(x)
                if HAS_ARGMAX:  # the tile's first class at its max; strict >: an earlier tile wins a tie
                    best = tl.where(tile_max > row_max, tl.min(tl.where(x == tile_max, offs, n_padded)), best)
                new_max = tl.maximum(row_max, tile_max)
                other = other * tl.exp(row_max - new_max) + tl.sum(tl.where(is_target, 0.0, tl.exp(x - new_max)))
                if HAS_DISTILL:
                    sum_exp_t *= tl.exp((row_max - new_max) * inv_t)
                    sum_exp_t += tl.sum(tl.exp((x - new_max) * inv_t))
                    x_t = _load_logits(teacher_row, offs, n_classes, n_padded)
                    new_t_max = tl.maximum(t_max, tl.max(x_t))
                    rescale = tl.exp((t_max - new_t_max) * inv_t)
                    e_t = tl.exp((x_t - new_t_max) * inv_t)
                    t_sum = t_sum * rescale + tl.sum(e_t)
                    in_row = offs < n_classes  # past it x_t and x are -inf: no difference taken there
                    t_dot = t_dot * rescale + tl.sum(e_t * (tl.where(in_row, x_t, 0.0) - tl.where(in_row, x, 0.0)))
                    t_max = new_t_max
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
            if HAS_DISTILL:  # KL = <p_t, z_t - z_k> / T - lse_t + lse_k, lse = max / T + log(exp-sum)
                log_sum_t = tl.log(sum_exp_t)
                log_t_sum = tl.log(t_sum)
                kl = (t_dot / t_sum + row_max - t_max) * inv_t + log_sum_t - log_t_sum
                loss += distill_weight * distill_temperature * distill_temperature * kl
            tl.store(Loss_ptr + row, loss)
            if HAS_ARGMAX:
                tl.store(Argmax_ptr + row, best)
            if HAS_GRAD:
                scale = tl.load(Scales_ptr + row).to(tl.float32)
                uniform = label_smoothing / n_classes
                d_target = scale * (z_factor - 1.0 - z_factor * q + label_smoothing - uniform)
                d_max = 0.0
                for v0 in range(0, n_padded, BLOCK_V):
                    offs = v0 + cols
                    x = _load_logits(logits_row, offs, n_classes, n_padded)
                    d = scale * (z_factor * tl.exp(x - lse) - uniform)
                    d = tl.where(offs == target, d_target, tl.where(offs < n_classes, d, 0.0))
                    if HAS_DISTILL:
                        x_t = _load_logits(teacher_row, offs, n_classes, n_padded)
                        p_k = tl.exp((x - row_max) * inv_t - log_sum_t)
                        p_t = tl.exp((x_t - t_max) * inv_t - log_t_sum)
                        d_distill = scale * distill_weight * distill_temperature * (p_k - p_t)
                        d += tl.where(offs < n_classes, d_distill, 0.0)
                    if TRACK_MAX:
                        d_max = tl.maximum(d_max, tl.max(tl.abs(d)))
                    tl.store(logits_row + offs, d, mask=offs < n_padded)
                if TRACK_MAX:
                    tl.atomic_max(Dmax_ptr, d_max)
        else:
            tl.store(Loss_ptr + row, 0.0)
            if HAS_ARGMAX:
                tl.store(Argmax_ptr + row, ignore_index)
            if HAS_GRAD:
                if is_live:  # a live row with a bad target: the dH and dW kernels read its zeros
                    for v0 in range(0, n_padded, BLOCK_V):
                        offs = v0 + cols
                        tl.store(logits_row + offs, tl.zeros([BLOCK_V], dtype=tl.float32), mask=offs < n_padded)

    @triton.jit(do_not_specialize=["chunk_start", "n_rows"])
    def _dh_kernel(
        D_ptr,
        D_head_stride,
        D_row_stride,
        W_ptr,
        W_row_stride,
        DH_ptr,
        DH_head_stride,
        DH_row_stride,
        Dmax_ptr,
        N_live_ptr,
        chunk_start,
        n_rows,
        n_classes,
        n_padded,
        d,
        PRECISION: tl.constexpr,
        SCALE_DLOGITS: tl.constexpr,
        DLOGITS_16BIT_MAX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """DH[a, m] = sum_v dlogits[a, m, v] * W[v] in fp32; tiles past the live rows write zeros.

        dlogits are fp32 rows of n_padded columns (zeros past n_classes), so their loads stay
        aligned whatever n_classes is. They meet W in W's dtype; for 16-bit W (SCALE_DLOGITS)
        they are multiplied by the chunk's power of two first (_dlogits_range_scale), which
        the fp32 sum divides out. bf16 has the range without it, but compiles better with it:
        without the multiply, sm_90 loads the dW kernel's dlogits tile 4 bytes at a time."""
        pid_m, pid_n, head = _row_tile(n_rows, BLOCK_M)
        live = _live_rows(N_live_ptr, chunk_start, n_rows)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ds = pid_n * BLOCK_D + tl.arange(0, BLOCK_D)
        vs = tl.arange(0, BLOCK_V)
        d_ptrs = D_ptr + head * D_head_stride + rows[:, None].to(tl.int64) * D_row_stride + vs[None, :]
        w_ptrs = W_ptr + vs[:, None].to(tl.int64) * W_row_stride + ds[None, :]
        v_end = tl.where(pid_m * BLOCK_M < live, n_padded, 0)
        range_scale = 1.0
        if SCALE_DLOGITS:
            range_scale = _dlogits_range_scale(Dmax_ptr, DLOGITS_16BIT_MAX)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for v0 in range(0, v_end, BLOCK_V):
            g = tl.load(d_ptrs + v0, mask=(rows[:, None] < live) & (v0 + vs[None, :] < n_padded), other=0.0)
            w = tl.load(w_ptrs, mask=(v0 + vs[:, None] < n_classes) & (ds[None, :] < d), other=0.0)
            if SCALE_DLOGITS:
                g = g * range_scale
            acc = tl.dot(g.to(w.dtype), w, acc, input_precision=PRECISION)
            w_ptrs += BLOCK_V * W_row_stride  # a pointer step: v0 * W_row_stride could pass int32
        dh_ptrs = DH_ptr + head * DH_head_stride + rows[:, None].to(tl.int64) * DH_row_stride + ds[None, :]
        tl.store(dh_ptrs, acc / range_scale, mask=(rows[:, None] < n_rows) & (ds[None, :] < d))

    @triton.jit(do_not_specialize=["chunk_start", "n_rows"])
    def _dw_kernel(
        D_ptr,
        D_head_stride,
        D_row_stride,
        X_ptr,
        X_head_stride,
        X_row_stride,
        DW_ptr,
        DW_row_stride,
        Dmax_ptr,
        N_live_ptr,
        chunk_start,
        n_rows,
        n_heads,
        n_classes,
        n_padded,
        d,
        PRECISION: tl.constexpr,
        SCALE_DLOGITS: tl.constexpr,
        DLOGITS_16BIT_MAX: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """DW[v] += sum_{a, live m} dlogits[a, m, v] * X[a, m] in fp32; one program per tile, no
        atomics. dlogits as in _dh_kernel: fp32, n_padded aligned columns, scaled for 16 bits."""
        live = _live_rows(N_live_ptr, chunk_start, n_rows)
        if live > 0:
            vs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)  # d tiles vary fastest: programs
            ds = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # running together share dlogits
            ms = tl.arange(0, BLOCK_M)
            range_scale = 1.0
            if SCALE_DLOGITS:
                range_scale = _dlogits_range_scale(Dmax_ptr, DLOGITS_16BIT_MAX)
            acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
            # pointers advance by strides (64-bit pointer arithmetic), never head * stride in int32
            d_head = D_ptr + ms[:, None].to(tl.int64) * D_row_stride + vs[None, :]
            x_head = X_ptr + ms[:, None].to(tl.int64) * X_row_stride + ds[None, :]
            for _ in range(0, n_heads):
                d_ptrs, x_ptrs = d_head, x_head
                for m0 in range(0, live, BLOCK_M):
                    in_rows = m0 + ms[:, None] < live
                    g = tl.load(d_ptrs, mask=in_rows & (vs[None, :] < n_padded), other=0.0)
                    x = tl.load(x_ptrs, mask=in_rows & (ds[None, :] < d), other=0.0)
                    if SCALE_DLOGITS:
                        g = g * range_scale
                    acc = tl.dot(tl.trans(g.to(x.dtype)), x, acc, input_precision=PRECISION)
                    d_ptrs += BLOCK_M * D_row_stride
                    x_ptrs += BLOCK_M * X_row_stride
                d_head += D_head_stride
                x_head += X_head_stride
            dw_ptrs = DW_ptr + vs[:, None].to(tl.int64) * DW_row_stride + ds[None, :]
            in_tile = (vs[:, None] < n_classes) & (ds[None, :] < d)
            tl.store(dw_ptrs, acc / range_scale + tl.load(dw_ptrs, mask=in_tile, other=0.0), mask=in_tile)


def _block_v(n_classes: int) -> int:
    cap = INTERPRET_BLOCK_V if interpreting() else CUDA_BLOCK_V
    return min(cap, triton.next_power_of_2(n_classes))


class GemmTiles(NamedTuple):
    """Tile sizes of the three GEMM kernels: out_rows x out_cols tiles of the product and
    `inner` along the reduced dim. Each launcher maps them onto its kernel's BLOCK_M (rows),
    BLOCK_V (classes) and BLOCK_D (model dim)."""
    out_rows: int
    out_cols: int
    inner: int


INTERPRET_GEMM_TILES = GemmTiles(16, 16, 16)  # tl.dot's minimum: the interpreter is slow
CUDA_GEMM_TILES = GemmTiles(128, 128, 64)  # fp32 operands (fp32 dlogits too) use inner=32


def _gemm_config(dtype: torch.dtype):
    """(GemmTiles, launch options) of the three GEMM kernels for operands of this dtype."""
    if interpreting():
        return INTERPRET_GEMM_TILES, dict(PRECISION=dot_precision(dtype))
    tiles = CUDA_GEMM_TILES._replace(inner=32) if dtype == torch.float32 else CUDA_GEMM_TILES
    return tiles, dict(PRECISION=dot_precision(dtype), num_warps=8, num_stages=3)


def _logits_buffer(n_heads: int, n_rows: int, n_classes: int, device: torch.device) -> torch.Tensor:
    """Uninitialised fp32 (A, c, V) view of rows padded to a multiple of ROW_ALIGN columns: a
    chunk's logits, then its dlogits in place. Unpadded, a row stride of V = 50257 or 5003
    makes every row start unaligned, and the dH/dW GEMMs lose their vectorised loads."""
    padded = triton.cdiv(n_classes, ROW_ALIGN) * ROW_ALIGN
    return torch.empty(n_heads, n_rows, padded, dtype=torch.float32, device=device)[..., :n_classes]


def _launch_logits(x, w_mm, logits, where, tiles: GemmTiles, opts: dict) -> None:
    """logits (A, c, V) fp32 = x (A, c, d) @ w_mm (V, d).T on the live rows; where = (n_live, start, c)."""
    n_heads, c, d = x.shape
    n_classes = w_mm.shape[0]
    grid = (triton.cdiv(c, tiles.out_rows) * triton.cdiv(n_classes, tiles.out_cols), n_heads)
    _logits_kernel[grid](x, x.stride(0), x.stride(1), w_mm, w_mm.stride(0), logits, logits.stride(0),
                         logits.stride(1), *where, n_classes, d,
                         BLOCK_M=tiles.out_rows, BLOCK_V=tiles.out_cols, BLOCK_D=tiles.inner, **opts)


def _launch_dh(dlogits, w_mm, dh, d_max, where, tiles: GemmTiles, opts: dict) -> None:
    """dh (A, c, d) fp32 = dlogits (A, c, V) @ w_mm (V, d); rows past the live ones get zeros.
    dlogits: fp32 rows of stride(1) columns, zeros past V; d_max (1,): their max |value|."""
    n_heads, c, d = dh.shape
    grid = (triton.cdiv(c, tiles.out_rows) * triton.cdiv(d, tiles.out_cols), n_heads)
    _dh_kernel[grid](dlogits, dlogits.stride(0), dlogits.stride(1), w_mm, w_mm.stride(0), dh,
                     dh.stride(0), dh.stride(1), d_max, *where, w_mm.shape[0], dlogits.stride(1), d,
                     BLOCK_M=tiles.out_rows, BLOCK_D=tiles.out_cols, BLOCK_V=tiles.inner, **opts)


def _launch_dw(dlogits, x, dw, d_max, where, tiles: GemmTiles, opts: dict) -> None:
    """dw (V, d) fp32 += sum_a dlogits[a].T (V, c) @ x[a] (c, d) over the live rows (dlogits
    and d_max as in _launch_dh)."""
    n_heads, _, d = x.shape
    n_classes = dw.shape[0]
    grid = (triton.cdiv(d, tiles.out_cols), triton.cdiv(n_classes, tiles.out_rows))
    _dw_kernel[grid](dlogits, dlogits.stride(0), dlogits.stride(1), x, x.stride(0), x.stride(1), dw,
                     dw.stride(0), d_max, *where, n_heads, n_classes, dlogits.stride(1), d,
                     BLOCK_V=tiles.out_rows, BLOCK_D=tiles.out_cols, BLOCK_M=tiles.inner, **opts)


def _triton_pass(hs, weight, targets, row_scales, opt: CEOptions, teacher: Teacher = None,
                 argmax: Optional[torch.Tensor] = None):
    """The Triton counterpart of _chunked_pass: same contract (fp32 results), no host sync,
    ignored rows skipped. A teacher head's logits are read where they are; a teacher tensor's
    take one more logits GEMM per chunk, into a buffer of their own."""
    (n, d), n_heads, device, want_grad = hs[0].shape, len(hs), weight.device, row_scales is not None
    n_classes, mm_dtype = weight.shape[0], gemm.mm_dtype(weight)  # the interpreter's dot needs fp32
    live = targets != opt.ignore_index
    order = torch.argsort((~live).to(torch.int8), stable=True)  # live rows first, in order
    n_live = live.sum().to(torch.int32).reshape(1)  # stays on the device
    w_mm = weight.to(mm_dtype).contiguous()
    separate = isinstance(teacher, torch.Tensor)
    (tiles, opts), step = _gemm_config(mm_dtype), _chunk_rows(n, n_heads + separate, n_classes, device)
    if step < n:  # whole row tiles per chunk: no partial tile in every chunk's three GEMMs
        step = max(tiles.out_rows, step // tiles.out_rows * tiles.out_rows)
    grad_tiles = _gemm_config(torch.float32)[0]  # dH/dW read fp32 dlogits: fp32's tiles (sm_90: 250 -> 192 regs)
    grad_opts = dict(opts, SCALE_DLOGITS=mm_dtype.itemsize == 2, DLOGITS_16BIT_MAX=DLOGITS_16BIT_MAX)
    loss = torch.empty(n_heads, n, dtype=torch.float32, device=device)  # (A, N)
    dhs = torch.empty(n_heads, n, d, dtype=torch.float32, device=device) if want_grad else None
    dw = torch.zeros(n_classes, d, dtype=torch.float32, device=device) if want_grad else None
    d_maxes = torch.zeros(triton.cdiv(n, step), dtype=torch.float32, device=device)  # per chunk: max |dlogit|
    for s in range(0, n, step):
        c, idx, d_max = min(step, n - s), order[s:s + step], d_maxes.narrow(0, s // step, 1)
        where = (n_live, s, c)  # the kernels' view of this chunk: rows s..s+c of the live-first order
        x = torch.stack([h.index_select(0, idx) for h in hs]).to(mm_dtype)  # (A, c, d)
        logits = _logits_buffer(n_heads, c, n_classes, device)  # (A, c, V), then dlogits in place
        _launch_logits(x, w_mm, logits, where, tiles, opts)
        t_logits = logits[teacher] if isinstance(teacher, int) else None  # (c, V)
        if separate:
            t_logits = _logits_buffer(1, c, n_classes, device)
            _launch_logits(teacher.index_select(0, idx).to(mm_dtype)[None], w_mm, t_logits, where, tiles, opts)
            t_logits = t_logits[0]
        scale = row_scales.index_select(1, idx).reshape(-1) if want_grad else None
        arg = None if argmax is None else torch.empty(n_heads * c, dtype=torch.int64, device=device)
        rows = _triton_rows(logits.view(-1, n_classes), targets.index_select(0, idx).repeat(n_heads), scale,
                            opt, where, d_max, track_max=grad_opts["SCALE_DLOGITS"], teacher_logits=t_logits,
                            teacher_head=teacher if isinstance(teacher, int) else None, argmax=arg)
        loss.index_copy_(1, idx, rows.view(n_heads, c))
        if argmax is not None:
            argmax.index_copy_(1, idx, arg.view(n_heads, c))
        if want_grad:
            dh = torch.empty(n_heads, c, d, dtype=torch.float32, device=device)
            _launch_dh(logits, w_mm, dh, d_max, where, grad_tiles, grad_opts)
            dhs.index_copy_(1, idx, dh)
            _launch_dw(logits, x, dw, d_max, where, grad_tiles, grad_opts)
    return loss, dhs, dw


def _triton_rows(logits, tgt, scale, opt: CEOptions, where, d_max, track_max: bool, teacher_logits=None,
                 teacher_head: Optional[int] = None, argmax: Optional[torch.Tensor] = None):
    """Row loss (R,) of fp32 logits (R, V) whose rows are padded to stride(0) columns. Given
    `scale` (R,), the rows are overwritten with fp32 dlogits (zeros over the padding) and, with
    track_max, their max |value| is maxed into d_max (1,). Given argmax (R,) int64, the rows'
    argmax goes there.

    teacher_logits (c, V), c = where[2], rows padded alike: the rows of every head (R = A * c)
    but teacher_head (whose rows teacher_logits then are) add distillation from the teacher's
    row of the same chunk row; the teacher head's rows run in a second launch, after every
    student has read them."""
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    scale = None if scale is None else scale.contiguous()
    if teacher_logits is None:
        _launch_rows(logits, tgt, scale, loss, opt, where, d_max, track_max, argmax)
        return loss
    c = where[2]
    n_heads = logits.shape[0] // c
    skipped = n_heads if teacher_head is None else teacher_head  # n_heads: no head's rows are skipped
    _launch_rows(logits, tgt, scale, loss, opt, where, d_max, track_max, argmax, teacher_logits, skipped,
                 n_programs=logits.shape[0] - (0 if teacher_head is None else c))
    if teacher_head is not None:
        part = slice(teacher_head * c, (teacher_head + 1) * c)
        scale_part = None if scale is None else scale[part]
        argmax_part = None if argmax is None else argmax[part]
        _launch_rows(logits[part], tgt[part], scale_part, loss[part], opt, where, d_max, track_max, argmax_part)
    return loss


def _launch_rows(logits, tgt, scale, loss, opt: CEOptions, where, d_max, track_max: bool, argmax=None,
                 teacher_logits=None, teacher_head: int = 0, n_programs: Optional[int] = None) -> None:
    """_ce_rows_kernel over n_programs rows (all by default) of logits (R, V) into loss (R,)
    and, when given, argmax (R,); distillation from teacher_logits (c, V) when given, skipping
    head teacher_head's rows."""
    n_rows, n_classes = logits.shape
    want_grad, distill, want_argmax = scale is not None, teacher_logits is not None, argmax is not None
    teacher = teacher_logits if distill else logits  # read only with HAS_DISTILL
    _ce_rows_kernel[(n_rows if n_programs is None else n_programs,)](
        logits, logits.stride(0), teacher, teacher.stride(0), tgt, scale if want_grad else loss, loss,
        argmax if want_argmax else loss, d_max, *where, n_classes, logits.stride(0), teacher_head,
        opt.ignore_index, opt.label_smoothing, opt.z_loss, opt.distill_weight, opt.distill_temperature,
        HAS_SMOOTHING=opt.label_smoothing > 0, HAS_Z_LOSS=opt.z_loss > 0, HAS_DISTILL=distill, HAS_GRAD=want_grad,
        TRACK_MAX=want_grad and track_max, HAS_ARGMAX=want_argmax, SERIES_MAX_Q=SERIES_MAX_Q,
        BLOCK_V=_block_v(logits.stride(0)), num_warps=ROW_WARPS)


# ----------------------------------------------------------------------------- forward / backward
class _Plan(NamedTuple):
    """What the public function decided, for forward and backward (no tensor of the autograd graph)."""
    run_pass: Callable  # _torch_pass or _triton_pass
    opt: CEOptions
    reduction: str
    heads: HeadWeights  # the heads that run and their weights
    n_heads: int  # K, running or not
    teacher_head: Optional[int]  # the teacher's position among the heads that run, if it is one
    return_argmax: bool = False  # forward also returns the heads' row argmax (A, N)


def _teacher(plan: _Plan, teacher_h) -> Teacher:
    """What the passes take: the teacher head's position, the teacher's hiddens, or None."""
    return teacher_h if plan.teacher_head is None else plan.teacher_head


def _forward(plan: _Plan, hs, weight, targets, teacher_h, want_grad: bool):
    """(loss, argmax, tensors backward needs). hs: K tensors [N, d]; weight: [V, d]; targets:
    [N]; teacher_h: the teacher's hiddens [N, d] when the teacher is no running head (else None).
    argmax: with plan.return_argmax, the row argmax (A, N) int64 of the heads that run, else None.

    'mean'/'sum': the pass also computes the gradients of the loss, saved as (dhs (A, N, d),
    dW [V, d]) in fp32, both None without want_grad. 'none' returns (K, N); its grad_output is
    per-token, so it saves (coef (A,), *hs that run) and backward reruns the pass.
    """
    act_hs, teacher = [hs[k] for k in plan.heads.active], _teacher(plan, teacher_h)
    coef = _row_loss_coefficients(plan.heads.values, targets, plan.reduction, plan.opt.ignore_index,
                                  gemm.acc_dtype(weight))  # (A,)
    argmax = None
    if plan.return_argmax:  # (A, N); ignored rows keep ignore_index
        argmax = targets.new_full((len(act_hs), targets.shape[0]), plan.opt.ignore_index)
    if plan.reduction == "none":
        rows, _, _ = _run_pass(plan.run_pass, act_hs, weight, targets, None, plan.opt, teacher, argmax)  # (A, N)
        return _to_all_heads(coef[:, None] * rows, plan.heads.active, plan.n_heads), argmax, (coef, *act_hs)
    scales = coef[:, None].expand(-1, targets.shape[0]) if want_grad else None  # (A, N)
    rows, dhs, dw = _run_pass(plan.run_pass, act_hs, weight, targets, scales, plan.opt, teacher, argmax)
    return (rows.sum(1) * coef).sum(), argmax, (dhs, dw)


def _backward(plan: _Plan, weight, h0, targets, teacher_h, saved, grad_out):
    """(dW [V, d], [dh_k] for all K heads) in the input dtype from _forward's saved tensors and
    grad_out (a scalar, or (K, N) for 'none'). The pass's fp32 gradients meet grad_out in fp32
    and are rounded once. Heads that did not run get a stride-0 zero gradient: correct for
    autograd.grad, and free."""
    if plan.reduction == "none":
        coef, *act_hs = saved
        scales = _stack([coef[a] * grad_out[k] for a, k in enumerate(plan.heads.active)])  # (A, N)
        _, dhs, dw = _run_pass(plan.run_pass, act_hs, weight, targets, scales, plan.opt, _teacher(plan, teacher_h))
        grad_out = None  # already in the row scales
    else:
        dhs, dw = saved
    dh = [_zeros_like(h0) for _ in range(plan.n_heads)]
    for a, k in enumerate(plan.heads.active):
        dh[k] = _to_input_dtype(dhs[a], grad_out, h0)
    return (_zeros_like(weight) if dw is None else _to_input_dtype(dw, grad_out, weight)), dh


def _to_input_dtype(grad: torch.Tensor, grad_out, like: torch.Tensor) -> torch.Tensor:
    """grad (fp32) * grad_out in fp32, rounded once to like's dtype: cast first, a GradScaler's
    2**16 is inf in fp16; grad cast first loses its entries below fp16's subnormals."""
    out = torch.empty(grad.shape, dtype=like.dtype, device=like.device)
    return out.copy_(grad) if grad_out is None else torch.mul(grad, grad_out, out=out)


class _WeightedCE(torch.autograd.Function):
    """ctx bookkeeping only: _forward computes the loss (and, unless reduction='none', its
    gradients chunk by chunk), _backward scales them by grad_output or reruns the pass. Both
    run outside autocast: it would recast the passes' own fp32 GEMMs to 16 bits. teacher_h
    (detached, or None) gets no gradient; the argmax output (plan.return_argmax) is not
    differentiable."""

    @staticmethod
    def forward(ctx, plan: _Plan, weight, targets, teacher_h, *hs):
        want_grad = plan.reduction != "none" and any(ctx.needs_input_grad)
        with torch.autocast(weight.device.type, enabled=False):
            out, argmax, saved = _forward(plan, hs, weight, targets, teacher_h, want_grad)
        ctx.plan = plan
        ctx.save_for_backward(weight, hs[0], targets, teacher_h, *saved)
        if argmax is None:
            return out
        ctx.mark_non_differentiable(argmax)
        return out, argmax

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *_):  # _: the argmax's (no gradient), when it is returned
        weight, h0, targets, teacher_h, *saved = ctx.saved_tensors
        with torch.autocast(weight.device.type, enabled=False):
            dw, dh = _backward(ctx.plan, weight, h0, targets, teacher_h, saved, grad_out)
        return (None, dw, None, None, *dh)


def _run_pass(run_pass, act_hs, weight, targets, scales, opt: CEOptions, teacher: Teacher, argmax=None):
    if not act_hs:  # every head weight is 0
        return weight.new_zeros(0, targets.shape[0], dtype=gemm.acc_dtype(weight)), None, None
    return run_pass(act_hs, weight, targets, scales, opt, teacher, argmax)


def _to_all_heads(rows, active: list, n_heads: int) -> torch.Tensor:
    """(K, N) with rows (A, N) at the heads that ran and zeros elsewhere."""
    out = rows.new_zeros(n_heads, rows.shape[1])
    for a, k in enumerate(active):  # one select per head: no index tensor to copy to the device
        out[k] = rows[a]
    return out


def _stack(rows: list):
    return torch.stack(rows) if rows else None


def _zeros_like(t: torch.Tensor) -> torch.Tensor:
    return t.new_zeros(()).expand(t.shape)


def _row_loss_coefficients(weights, targets: torch.Tensor, reduction: str, ignore_index: int, dtype):
    """d(total loss)/d(row loss) per head that runs (A,): w_k, over n_valid for 'mean'.

    weights: Python floats, or a (A,) device tensor (multiplied on the device, never read).
    """
    unit = torch.ones((), dtype=dtype, device=targets.device)
    if reduction == "mean":
        unit = unit / (targets != ignore_index).sum().clamp(min=1)  # all ignored -> loss 0, grads 0
    if isinstance(weights, torch.Tensor):
        return weights.to(dtype) * unit
    return torch.stack([w * unit for w in weights]) if weights else unit.new_zeros(0)


# ----------------------------------------------------------------------------- public
def weighted_linear_cross_entropy(hiddens: Hiddens, weight: torch.Tensor, targets: torch.Tensor,
                                  head_weights, *, ignore_index: int = -100, reduction: str = "mean",
                                  label_smoothing: float = 0.0, z_loss: float = 0.0,
                                  distill_weight: float = 0.0, distill_temperature: float = 1.0,
                                  teacher: Union[None, int, torch.Tensor] = None,
                                  backend: str = "auto", return_argmax: bool = False
                                  ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[Optional[torch.Tensor]]]]:
    """sum_k w_k * cross_entropy(h_k @ weight.T, targets) (+ self-distillation into each head, below),
    without holding [N, V] logits.

    hiddens: K tensors [N, d] or one [K, N, d] (fp32/bf16/fp16); weight: [V, d], same dtype;
    targets: [N] int64 in [0, V) or ignore_index; head_weights: K finite floats >= 0 (a
    sequence, or a 1-D tensor on the CPU or on the hiddens' device; constants: no gradient
    flows to them).

    Per row i of head k: ce = lse - (1 - s) * x_t - s/V * sum_j x_j (label smoothing s,
    exactly F.cross_entropy's), plus z_loss * lse**2 (PaLM-style z-loss, reduced like ce).
    - 'mean': sum_k w_k * sum_i row_loss / n_valid, n_valid = non-ignored rows (as
      F.cross_entropy); all rows ignored -> 0 with zero gradients.
    - 'sum': sum_k w_k * sum_i row_loss.
    - 'none': [K, N] of w_k * row_loss (0 on ignored rows), so .sum() equals 'sum'.
    Returns fp32 (fp64 for fp64 inputs). Heads with w_k == 0 cost nothing (unless the weights
    are a CUDA tensor, below); their gradient is a stride-0 zero tensor. Gradients to hiddens
    and weight come back in the input dtype; logits, lse, dH and dW stay fp32 until grad_output
    (a GradScaler's 2**16 included) is applied, then are rounded once. backend: 'auto' |
    'triton' | 'torch' (see kernels/backend.py); fp64 inputs take the PyTorch path ('auto'
    picks it; 'triton' raises a TypeError).
    Rows with target == ignore_index enter no GEMM, so whatever their hiddens hold (even NaN)
    never reaches the result or the gradients (their dH is 0).

    Self-distillation: distill_weight lambda (finite >= 0; 0, the default, is the plain loss,
    bit for bit and at no cost), distill_temperature T (finite > 0), teacher: a head index k
    into hiddens (negative counts from the end) or an [N, d] tensor of the hiddens' dtype and
    device (a teacher that is not one of the heads). With lambda > 0 every head k != teacher of
    w_k > 0 adds, to each non-ignored row's loss above,
        lambda * T**2 * KL(softmax(z_t / T) || softmax(z_k / T)),   z = h @ weight.T,
    so it is weighted by w_k and reduced like the cross-entropy ('none': in head k's row). The
    teacher's logits z_t are detached: no gradient reaches the teacher's hiddens or, through
    z_t, weight. A teacher head keeps its own w_t * cross-entropy (and its gradient); a teacher
    tensor stays out of the graph, as teacher.detach() would (its .grad stays None). Student
    gradient: d/dz_k = lambda * T * (softmax(z_k / T) - softmax(z_t / T)) per row, times w_k (and
    1/n_valid for 'mean'). Cost: a teacher head's logits are reused; a teacher tensor (or a
    teacher head of weight 0) costs one more logits GEMM (N * d * V).

    return_argmax=True returns (loss, argmax): argmax is a list of K entries, for each head that
    runs the argmax over V of its logits per row, int64 [N] (the first index on ties, as
    torch.argmax; ignore_index on rows whose target is ignore_index, which enter no GEMM), and
    None for a head that does not run (w_k == 0 given as numbers or a CPU tensor, a teacher
    head among them). It comes from the logits the loss computes, at the cost of one argmax
    over them (PyTorch) or none (Triton): no GEMM more. Not differentiable; the loss and its
    gradients are those of return_argmax=False, bit for bit.

    Under ``torch.autocast`` the hiddens, weight and a teacher tensor are first cast to its
    dtype, as ``F.linear`` would be (fp32 parameters get fp32 gradients through the cast); the
    softmax statistics stay fp32 either way.

    Bad input (kernels/checks.py): TypeError for a wrong dtype, ValueError for a wrong shape,
    an empty batch, a device mismatch or a value out of range, each naming the argument.
    Targets and head weights given as numbers or CPU tensors are checked on the host. A CUDA
    tensor is never read on the host (that would be a sync on the hot path): its check is an
    asynchronous device assert that surfaces as a CUDA error at the next sync. Meanwhile the
    Triton kernel treats a bad target's row as ignored and torch's gather asserts, so a bad
    target never reads out of bounds. CUDA head weights also make every head run, since the
    host cannot know which are 0: a zero weight there costs its GEMMs and gets a computed zero
    gradient, so its hiddens must be finite (0 * NaN is NaN).
    """
    hs = _as_head_list(hiddens)
    weight, teacher, *hs = autocast_inputs(weight, teacher, *hs)
    _check_tensors(hs, weight, targets)
    heads = _check_head_weights(head_weights, len(hs), hs[0].device)
    _check_options(reduction, label_smoothing, z_loss)
    _check_distill(distill_weight, distill_temperature, teacher, hs)
    run_pass = _pick_pass(backend, weight, targets, hs)
    check_target_range(targets, weight.shape[0], ignore_index)  # last: it reads the targets
    teacher_head, teacher_h = _resolve_teacher(teacher, float(distill_weight), hs, heads)
    opt = CEOptions(float(label_smoothing), float(z_loss), int(ignore_index), float(distill_weight),
                    float(distill_temperature))
    plan = _Plan(run_pass, opt, reduction, heads, len(hs), teacher_head, bool(return_argmax))
    out = _WeightedCE.apply(plan, weight, targets.long(), teacher_h, *hs)
    if not return_argmax:
        return out
    loss, argmax = out
    per_head = dict(zip(heads.active, argmax))  # head k -> its row of argmax (A, N)
    return loss, [per_head.get(k) for k in range(len(hs))]


def _pick_pass(backend: str, weight: torch.Tensor, targets: torch.Tensor, hs: list) -> Callable:
    """_triton_pass or _torch_pass; fp64 has no Triton path ('auto' falls back, 'triton' raises)."""
    chosen = resolve_backend(backend, weight, targets, *hs)
    if chosen == "triton" and weight.dtype == torch.float64:
        if backend == "triton":
            raise TypeError("backend='triton' takes fp32/bf16/fp16 hiddens and weight, got float64: "
                            "use backend='torch'")
        chosen = "torch"
    return _triton_pass if chosen == "triton" else _torch_pass
