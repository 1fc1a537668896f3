"""Weighted multi-head linear cross-entropy: sum_k w_k * CE(h_k @ W.T, y), never holding [N, V].

Early-exit training puts one shared LM head W [V, d] behind several layers and minimises a
weighted sum of their cross-entropies. The forward pass computes the loss AND the gradients of
every weighted head and of W, one chunk of rows at a time (backward only rescales them):

1. one GEMM gives the fp32 logits of the chunk's rows of all weighted heads, stacked;
2. a row step turns them in place into row losses and dlogits;
3. one GEMM gives dH of every head, one more adds dlogits^T @ H into dW (all heads at once).
Heads with weight 0 are never touched (for weights given as numbers or a CPU tensor; a CUDA
tensor of weights is never read on the host, so there every head runs), and rows whose target
is ignore_index contribute exact zeros: whatever their hiddens hold (even NaN) never reaches
the result or a gradient.

Gradients stay out of 16-bit storage until grad_output is applied: dH (A, N, d) and dW [V, d]
are fp32 from the GEMMs to backward, which multiplies them by grad_output (and 1/n_valid for
'mean') in fp32 and rounds once to the input dtype. fp16 cannot hold either intermediate: a
GradScaler's grad_output of 2**16 is inf there, and a dlogit is ~ w_k / N * p (2e-10 at N = 16k,
V = 128k), below fp16's smallest subnormal (6e-8) until a scale lifts it. Saving them in fp32
costs 2 bytes per element over the input dtype: 2 * A * N * d + 2 * V * d bytes held from
forward to backward.

Three paths (backend names of kernels/backend.py):

- 'triton' (what 'auto' runs on CUDA; on CPU under TRITON_INTERPRET=1): vendor GEMMs (cuBLAS
  through torch.mm on CUDA, torch's own on CPU) around our Triton row kernel. Per chunk, the
  logits GEMM writes fp32 into one reused buffer whose rows are padded to ROW_ALIGN columns
  (aligned leading dimensions for cuBLAS whatever V is); the row kernel, one program per row,
  takes an online logsumexp (with argmax and the distillation statistics when asked) and then
  writes the row's dlogits in the GEMM operand dtype over its own logits, in place: 16 bits for
  bf16/fp16 (a barrier before each tile's store, since a 16-bit row overlaps the first half of
  its fp32 row), so the dH and dW GEMMs run at 16-bit tensor-core rate on half the bytes. dW is
  one GEMM of the stacked rows per chunk, accumulated in place in fp32 (gemm.accumulate_dw).
  Every row runs on CUDA (skipping ignored rows would need their count on the host): their
  hiddens are zeroed in the chunk's copy, and the row kernel writes zero dlogits for them.
  fp16 dlogits are stored times a power of two S fixed on the host from the head weights (the
  largest |dlogit| is at most max_k w_k * (2 + distill_weight * T) before 1/n_valid), so that
  ~w_k * p neither flushes to 0 nor overflows, and 1/S is applied to the fp32 GEMM results;
  where the host cannot bound the row scales (reduction='none' backward, CUDA head weights)
  fp16 keeps fp32 dlogits and fp32 dH/dW GEMMs instead.
- 'triton_gemm': the all-Triton path. The non-ignored rows are moved first by a stable argsort
  on the device and their count stays on the device. Three Triton GEMM kernels (tl.dot, fp32
  accumulators) and the same row kernel read that count and skip every tile past it, so
  ignored rows cost no matmul work and the host never waits. The row kernel writes fp32
  dlogits over the logits; for 16-bit inputs the dH and dW kernels multiply each dlogits tile
  by the chunk's power of two that brings its largest |dlogit| near 2**14 before rounding it to
  the input dtype for tl.dot, and divide it out of the fp32 sum. dW is one program per [V, d]
  tile looping over rows: no atomics, deterministic. Storing the chunk's logits costs 3 GEMMs,
  where recomputing logit tiles inside one kernel would cost 5.
- 'torch': oneDNN's GEMMs on CPU (MKL's sgemm runs AVX2 code on AMD CPUs, 2-3x slower),
  cuBLAS's on CUDA (fp32 output for bf16/fp16 inputs); the row step is torch ops (max, exp,
  sum, scale) in place on the chunk. On CPU only the non-ignored rows are gathered into
  chunks (reading their count there is no sync); on CUDA every row runs, zeroed as above. CPU
  multiplies 16-bit inputs in fp32; on CUDA fp16 keeps its dlogits in fp32 and runs the dH/dW
  GEMMs in fp32 on an fp32 copy of W (4 * V * d bytes), bf16 keeps bf16 dlogits.
All keep the true-class gradient p - 1 exact for confident rows: it is computed as minus the
exp-sum of the other classes over the total, never as a difference of numbers close to 1.

Self-distillation (distill_weight > 0) rides in the same pass. The teacher's logits of a chunk
are the teacher head's rows of the chunk's logits (no GEMM more) or, for a teacher given as
hiddens, one more logits GEMM per chunk; every student reads them there, and none of them
enters the dH/dW GEMMs (the teacher is detached). PyTorch path: the teacher's softmax at T
is taken into a (c, V) buffer first, then head by head a student's softmax at T goes to one
(c, V) scratch and lambda * T * scale * (p_k - p_t) is added to its dlogits; the chunk budget
counts the two buffers. Triton row kernel (HAS_DISTILL): it takes online, in its one pass over
the student's row, the student's exp-sum at T and the teacher row's max, exp-sum and
p_t-weighted z_t - z_k, so KL costs no pass more; the gradient pass reads the teacher's row
again. A teacher head's own rows run in a second launch, once every student has read its
logits (they turn into its dlogits in place).

return_argmax=True also gives each head's row argmax (the first index on ties, as torch.argmax
and exit_confidence), taken from the chunk's logits before they turn into dlogits: the PyTorch
path adds one argmax over them, the Triton row kernel (HAS_ARGMAX) tracks it beside its online
max. A learned confidence's labels need it, and would otherwise cost a head pass per layer.

The op is registered with torch.library (fastexit::weighted_linear_cross_entropy, a fake
implementation and a registered backward), so torch.compile(fullgraph=True) of a step that
calls it keeps it as one opaque node: every host-side decision in the public function depends
on shapes, dtypes and the Python arguments only, and the value checks (targets in range, head
weights given as a tensor) run inside the op.
"""
import math
import numbers
import operator
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import gemm
from .backend import (HAS_TRITON, autocast_inputs, cuda_capability, device_guard, dot_precision, has_small_shared_memory,
                      interpreting, resolve_backend)
from .checks import (check_head_weights, check_in_range, check_matrix, check_same, check_shape, check_target_range,
                     check_targets)

if HAS_TRITON:
    import triton
    import triton.language as tl

REDUCTIONS = ("mean", "sum", "none")
CHUNK_BYTES = 32 * 2**20  # fp32 logits of one CPU row chunk (all heads): about L3-sized
CUDA_CHUNK_BYTES = 2**31  # on GPUs: ~4k stacked rows at V = 128k, so that each chunk's in-place dW
                          # update (read + write of the fp32 dW) stays a small share of its GEMM
CUDA_BLOCK_V, INTERPRET_BLOCK_V = 4096, 32  # classes per tile of the row kernel
ROW_WARPS = 8
ROW_ALIGN = 32  # Triton logits rows padded to this many fp32 columns: 128 B, a multiple of the
                # 16 that Triton specialises strides and bounds on, so loads along V vectorise
DLOGITS_16BIT_MAX = 2.0 ** 14  # 16-bit operands: dlogits scaled by a power of two to at most this
                               # before rounding: fp16's max is 65504, a factor 4 spare
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
    (A,) tensor on the hiddens' device that the host never reads (then every head runs)."""
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
    A tensor on the hiddens' device (and, inside torch.compile, a CPU tensor too: reading it
    there would make the graph depend on its values) is passed on unread."""
    check_head_weights(head_weights, n_heads)
    if isinstance(head_weights, torch.Tensor) and (head_weights.device.type != "cpu" or torch.compiler.is_compiling()):
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
    weight then costs its GEMMs, and its hiddens must be finite: 0 * NaN is NaN), and the op
    checks the values (on CUDA an async device assert that surfaces as a CUDA error at the next
    sync instead of a ValueError)."""
    ws = head_weights.detach().reshape(-1)
    if ws.numel() != n_heads:
        raise ValueError(f"head_weights has {ws.numel()} entries for {n_heads} heads")
    if ws.device != device:
        raise ValueError(f"head_weights is on {ws.device}, hiddens on {device}: pass a CPU tensor or numbers")
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
def _chunk_rows(n_rows: int, n_buffers: int, n_classes: int, device: torch.device) -> int:
    """Rows per head in a chunk: n_buffers fp32 (rows, n_classes) buffers fit the chunk budget."""
    budget = CHUNK_BYTES if device.type == "cpu" else CUDA_CHUNK_BYTES
    return max(1, min(n_rows, budget // (4 * n_buffers * n_classes)))


def _kept_rows(targets: torch.Tensor, ignore_index: int):
    """Positions of the non-ignored rows (CPU), or None to run every row.

    On CPU reading the count is free, so ignored rows cost no GEMM work. On CUDA it would be a
    host sync: the 'torch' and 'triton' paths run every row there ('triton_gemm' skips them on
    the device).
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


class _Chunk(NamedTuple):
    """One chunk of rows, every running head's c rows stacked (A*c rows, head-major)."""
    start: int  # the chunk's first row among the kept rows (all rows when keep is None)
    n_rows: int  # c
    rows_of: Callable  # rows_of(t, dim=0): t's chunk rows along dim (a slice, or the kept positions)
    x: torch.Tensor  # (A*c, d) hiddens in the GEMM dtype; ignored rows zeroed when every row runs
    tgt: torch.Tensor  # (A*c,) targets
    scale: Optional[torch.Tensor]  # (A*c,) d(total)/d(row loss), or None: no gradients
    ignored: Optional[torch.Tensor]  # (c,) bool where every row runs (keep None), else None


def _chunks(hs, targets, row_scales, opt: CEOptions, mm_dtype: torch.dtype, keep, step: int):
    """The chunks of `step` rows per head over the kept rows (all rows when keep is None)."""
    n_kept = targets.shape[0] if keep is None else keep.numel()
    for s in range(0, n_kept, step):
        e = min(n_kept, s + step)
        rows_of = (lambda t, dim=0, s=s, e=e: t.narrow(dim, s, e - s)) if keep is None else \
            (lambda t, dim=0, s=s, e=e: t.index_select(dim, keep[s:e]))
        x = torch.cat([rows_of(h) for h in hs]).to(mm_dtype)  # (A*c, d): one GEMM for all heads
        tgt_c = rows_of(targets)
        ignored = (tgt_c == opt.ignore_index) if keep is None else None
        if ignored is not None:  # every row runs: zero the ignored ones, or 0 * NaN would reach dW and dH
            x.masked_fill_(ignored.repeat(len(hs)).unsqueeze(1), 0.0)
        scale = rows_of(row_scales, 1).reshape(-1) if row_scales is not None else None
        yield _Chunk(s, e - s, rows_of, x, tgt_c.repeat(len(hs)), scale, ignored)


def _put_rows(out: torch.Tensor, keep, start: int, values: torch.Tensor) -> None:
    """out[:, rows start..] = values (A, c, ...): a slice, or the kept positions keep[start:]."""
    if keep is None:
        out.narrow(1, start, values.shape[1]).copy_(values)
    else:
        out.index_copy_(1, keep[start:start + values.shape[1]], values.to(out.dtype))


def _pass_outputs(n_heads: int, n: int, d: int, keep, want_grad: bool, acc_dtype, device):
    """Loss rows (A, N) and dhs (A, N, d) or None; zeros where ignored rows are never written."""
    new = torch.empty if keep is None else torch.zeros
    loss = new(n_heads, n, dtype=acc_dtype, device=device)
    return loss, (new(n_heads, n, d, dtype=acc_dtype, device=device) if want_grad else None)


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


def _torch_pass(hs, weight, targets, row_scales, opt: CEOptions, teacher: Teacher = None,
                argmax: Optional[torch.Tensor] = None, scale_bound: Optional[float] = None):
    """Loss rows (A, N) of the heads that run and, if row_scales (A, N) is given, grads; if
    argmax (A, N) int64 is given, the row argmax of the non-ignored rows' logits goes there.

    hs: A tensors [N, d]; weight: [V, d]; targets: [N] int64. Per chunk: one GEMM for the
    logits of all heads, _torch_rows for loss and dlogits (with a teacher, _torch_distill_rows,
    and a teacher tensor costs one more logits GEMM), one GEMM for dH of all heads, one that
    adds into dW. Returns (loss (A, N), dhs (A, N, d) or None, dW [V, d] or None), all in fp32
    (fp64 for fp64 inputs): the caller applies grad_output before rounding them to the input
    dtype. scale_bound is the 'triton' path's (unused here).
    """
    (n, d), n_heads, device, want_grad = hs[0].shape, len(hs), weight.device, row_scales is not None
    keep = _kept_rows(targets, opt.ignore_index)
    n_kept, acc_dtype = (n if keep is None else keep.numel()), gemm.acc_dtype(weight)
    n_buffers = n_heads if teacher is None else n_heads + 2  # distillation: teacher softmax, one scratch
    step, w_mm = _chunk_rows(n_kept, n_buffers, weight.shape[0], device), weight.to(gemm.mm_dtype(weight))
    w_grad = w_mm.to(_grad_mm_dtype(w_mm.dtype))  # w_mm itself, or an fp32 copy for fp16 on CUDA
    w_grad_t = w_grad.t().contiguous() if gemm.use_onednn(w_grad) else w_grad.t()  # (d, V): dH as a linear
    loss, dhs = _pass_outputs(n_heads, n, d, keep, want_grad, acc_dtype, device)
    dw = None  # (V, d): the first chunk stores it
    for chunk in _chunks(hs, targets, row_scales, opt, w_mm.dtype, keep, step):
        c = chunk.n_rows
        logits = gemm.linear_fp32(chunk.x, w_mm)  # (A*c, V)
        if argmax is not None:  # before the row step turns the logits into dlogits
            arg = logits.argmax(1)  # (A*c,) the first index on ties
            if keep is None:
                arg.masked_fill_(chunk.tgt == opt.ignore_index, opt.ignore_index)
            _put_rows(argmax, keep, chunk.start, arg.view(n_heads, c))
        if teacher is None:
            rows, dlogits = _torch_rows(logits, chunk.tgt, chunk.scale, opt, w_grad.dtype)
        else:
            z_t = _teacher_logits(teacher, logits, c, chunk.rows_of, w_mm, chunk.ignored)
            head = teacher if isinstance(teacher, int) else None
            rows, dlogits = _torch_distill_rows(logits, z_t, head, chunk.tgt, chunk.scale, opt, w_grad.dtype)
        _put_rows(loss, keep, chunk.start, rows.view(n_heads, c))
        if want_grad:
            _put_rows(dhs, keep, chunk.start, gemm.linear_fp32(dlogits, w_grad_t).view(n_heads, c, -1))  # (A, c, d)
            dw = gemm.accumulate_dw(dw, dlogits, chunk.x.to(w_grad.dtype))
    return loss, dhs, _dw_or_zeros(dw, weight, want_grad)


def _dw_or_zeros(dw, weight: torch.Tensor, want_grad: bool):
    """dW [V, d] fp32 as the passes return it: zeros when no chunk ran (every row ignored)."""
    if not want_grad:
        return None
    return weight.new_zeros(weight.shape, dtype=gemm.acc_dtype(weight)) if dw is None else dw


# ----------------------------------------------------------------------------- Triton kernels
# The row kernel serves both Triton paths. 'triton_gemm' reorders rows so that the non-ignored
# ones come first (a stable argsort on the device) and keeps their count on the device
# (HAS_LIVE_COUNT): every kernel loads it and skips the tiles past it, so ignored rows cost no
# matmul work and the host never waits for the count. 'triton' runs every row of a chunk.
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

    @triton.jit(do_not_specialize=["chunk_start", "n_rows", "teacher_head", "dlogits_scale"])
    def _ce_rows_kernel(
        Logits_ptr,
        logits_row_stride,
        Dlogits_ptr,
        dlogits_row_stride,
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
        dlogits_scale,
        HAS_LIVE_COUNT: tl.constexpr,
        HAS_SMOOTHING: tl.constexpr,
        HAS_Z_LOSS: tl.constexpr,
        HAS_DISTILL: tl.constexpr,
        HAS_GRAD: tl.constexpr,
        TRACK_MAX: tl.constexpr,
        HAS_ARGMAX: tl.constexpr,
        NARROW_IN_PLACE: tl.constexpr,
        SERIES_MAX_Q: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """One row: online logsumexp over its n_classes fp32 logits, then (HAS_GRAD) dlogits
        times dlogits_scale, in Dlogits' dtype, written tile by tile over the row's own
        storage, zeros over the padding up to n_padded (the 'triton_gemm' GEMMs read whole
        aligned rows), and (TRACK_MAX) the row's max |dlogit| into Dmax. HAS_ARGMAX: the row's
        argmax (first on ties) into Argmax, ignore_index for an ignored row.

        NARROW_IN_PLACE: Dlogits is a 16-bit view of the same rows, so a tile's store covers the
        first half of fp32 columns up to the tile's end, some of which other warps of this
        program may not have loaded yet (in the first tile): a barrier between the tile's loads
        and its stores keeps every store behind every load of the columns it overwrites.
        HAS_LIVE_COUNT: rows at or past the device count N_live (minus chunk_start) are ignored
        rows of 'triton_gemm''s live-first order, never read; without it every row runs and
        only its target says whether it is ignored (its dlogits are then zeros).

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
        dlogits_row = Dlogits_ptr + row * dlogits_row_stride
        target = tl.load(Targets_ptr + row)
        is_live = row >= 0  # every row, unless a live count says otherwise
        if HAS_LIVE_COUNT:
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
                    if NARROW_IN_PLACE:
                        tl.debug_barrier()
                    tl.store(dlogits_row + offs, (d * dlogits_scale).to(Dlogits_ptr.dtype.element_ty),
                             mask=offs < n_padded)
                if TRACK_MAX:
                    tl.atomic_max(Dmax_ptr, d_max)
        else:
            tl.store(Loss_ptr + row, 0.0)
            if HAS_ARGMAX:
                tl.store(Argmax_ptr + row, ignore_index)
            if HAS_GRAD:
                if is_live:  # an ignored row that runs, or a bad target: the dH and dW GEMMs read its zeros
                    for v0 in range(0, n_padded, BLOCK_V):
                        offs = v0 + cols
                        tl.store(dlogits_row + offs, tl.zeros([BLOCK_V], dtype=Dlogits_ptr.dtype.element_ty),
                                 mask=offs < n_padded)

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
SMALL_SHARED_FP32_ROWS = 64  # fp32-operand tiles on sm_86/89/120: 128 rows spill there (TF32 dW: 120 B)


def _gemm_config(dtype: torch.dtype, device: torch.device):
    """(GemmTiles, launch options) of the three GEMM kernels for operands of this dtype on this
    device: at most 96 KB of shared memory (sm_90/100; 64 KB on the mma.sync parts, inside
    sm_86/89/120's ~99 KB), and no spills where tensor cores run (ahead-of-time compile)."""
    if interpreting():
        return INTERPRET_GEMM_TILES, dict(PRECISION=dot_precision(dtype))
    tiles = CUDA_GEMM_TILES
    if dtype == torch.float32:
        tiles = tiles._replace(inner=32)
        if has_small_shared_memory(cuda_capability(device)):
            tiles = tiles._replace(out_rows=SMALL_SHARED_FP32_ROWS)
    return tiles, dict(PRECISION=dot_precision(dtype), num_warps=8, num_stages=3)


def _padded(n_classes: int) -> int:
    return triton.cdiv(n_classes, ROW_ALIGN) * ROW_ALIGN


def _logits_buffer(n_heads: int, n_rows: int, n_classes: int, device: torch.device) -> torch.Tensor:
    """Uninitialised fp32 (A, c, V) view of rows padded to a multiple of ROW_ALIGN columns: a
    chunk's logits, then its dlogits in place. Unpadded, a row stride of V = 50257 or 5003
    makes every row start unaligned: Triton's loads lose their vectors, cuBLAS its aligned
    leading dimension."""
    return torch.empty(n_heads, n_rows, _padded(n_classes), dtype=torch.float32, device=device)[..., :n_classes]


def _launch_logits(x, w_mm, logits, where, tiles: GemmTiles, opts: dict) -> None:
    """logits (A, c, V) fp32 = x (A, c, d) @ w_mm (V, d).T on the live rows; where = (n_live, start, c)."""
    n_heads, c, d = x.shape
    n_classes = w_mm.shape[0]
    grid = (triton.cdiv(c, tiles.out_rows) * triton.cdiv(n_classes, tiles.out_cols), n_heads)
    with device_guard(x):
        _logits_kernel[grid](x, x.stride(0), x.stride(1), w_mm, w_mm.stride(0), logits, logits.stride(0),
                             logits.stride(1), *where, n_classes, d,
                             BLOCK_M=tiles.out_rows, BLOCK_V=tiles.out_cols, BLOCK_D=tiles.inner, **opts)


def _launch_dh(dlogits, w_mm, dh, d_max, where, tiles: GemmTiles, opts: dict) -> None:
    """dh (A, c, d) fp32 = dlogits (A, c, V) @ w_mm (V, d); rows past the live ones get zeros.
    dlogits: fp32 rows of stride(1) columns, zeros past V; d_max (1,): their max |value|."""
    n_heads, c, d = dh.shape
    grid = (triton.cdiv(c, tiles.out_rows) * triton.cdiv(d, tiles.out_cols), n_heads)
    with device_guard(dh):
        _dh_kernel[grid](dlogits, dlogits.stride(0), dlogits.stride(1), w_mm, w_mm.stride(0), dh,
                         dh.stride(0), dh.stride(1), d_max, *where, w_mm.shape[0], dlogits.stride(1), d,
                         BLOCK_M=tiles.out_rows, BLOCK_D=tiles.out_cols, BLOCK_V=tiles.inner, **opts)


def _launch_dw(dlogits, x, dw, d_max, where, tiles: GemmTiles, opts: dict) -> None:
    """dw (V, d) fp32 += sum_a dlogits[a].T (V, c) @ x[a] (c, d) over the live rows (dlogits
    and d_max as in _launch_dh)."""
    n_heads, _, d = x.shape
    n_classes = dw.shape[0]
    grid = (triton.cdiv(d, tiles.out_cols), triton.cdiv(n_classes, tiles.out_rows))
    with device_guard(dw):
        _dw_kernel[grid](dlogits, dlogits.stride(0), dlogits.stride(1), x, x.stride(0), x.stride(1), dw,
                         dw.stride(0), d_max, *where, n_heads, n_classes, dlogits.stride(1), d,
                         BLOCK_V=tiles.out_rows, BLOCK_D=tiles.out_cols, BLOCK_M=tiles.inner, **opts)


def _launch_rows(logits, dlogits, tgt, scale, loss, opt: CEOptions, rows: "_RowLaunch", argmax=None,
                 teacher_logits=None, teacher_head: int = 0, n_programs: Optional[int] = None) -> None:
    """_ce_rows_kernel over n_programs rows (all by default) of logits (R, V) into loss (R,),
    dlogits (R, V) (given scale) and argmax (R,) (when given); distillation from
    teacher_logits (c, V) when given, skipping head teacher_head's rows."""
    n_rows, n_classes = logits.shape
    want_grad, distill, want_argmax = scale is not None, teacher_logits is not None, argmax is not None
    teacher = teacher_logits if distill else logits  # read only with HAS_DISTILL
    dlogits = logits if dlogits is None else dlogits  # written only with HAS_GRAD
    with device_guard(logits):
        _ce_rows_kernel[(n_rows if n_programs is None else n_programs,)](
            logits, logits.stride(0), dlogits, dlogits.stride(0), teacher, teacher.stride(0), tgt,
            scale if want_grad else loss, loss, argmax if want_argmax else loss, rows.d_max, *rows.where,
            n_classes, logits.stride(0), teacher_head, opt.ignore_index, opt.label_smoothing, opt.z_loss,
            opt.distill_weight, opt.distill_temperature, rows.dlogits_scale,
            HAS_LIVE_COUNT=rows.live_count, HAS_SMOOTHING=opt.label_smoothing > 0, HAS_Z_LOSS=opt.z_loss > 0,
            HAS_DISTILL=distill, HAS_GRAD=want_grad, TRACK_MAX=want_grad and rows.track_max,
            HAS_ARGMAX=want_argmax, NARROW_IN_PLACE=want_grad and dlogits.element_size() < logits.element_size(),
            SERIES_MAX_Q=SERIES_MAX_Q, BLOCK_V=_block_v(logits.stride(0)), num_warps=ROW_WARPS)


class _RowLaunch(NamedTuple):
    """What the row kernel needs of a chunk beyond its rows: where = (n_live, chunk_start, c)
    with live_count ('triton_gemm'; 'triton' passes a dummy n_live and live_count=False), the
    (1,) d_max buffer that track_max fills, and the factor dlogits are stored times."""
    where: tuple
    d_max: torch.Tensor
    live_count: bool = True
    track_max: bool = False
    dlogits_scale: float = 1.0


def _triton_rows(logits, dlogits, tgt, scale, opt: CEOptions, rows: _RowLaunch, teacher_logits=None,
                 teacher_head: Optional[int] = None, argmax: Optional[torch.Tensor] = None):
    """Row loss (R,) of fp32 logits (R, V) whose rows are padded to stride(0) columns. Given
    `scale` (R,), the rows' dlogits (times rows.dlogits_scale, zeros over the padding) are
    written to dlogits (R, V): a view of the same rows, fp32 or 16-bit (None: logits itself)
    and, with rows.track_max, their max |value| is maxed into rows.d_max. Given argmax (R,)
    int64, the rows' argmax goes there.

    teacher_logits (c, V), c = rows.where[2], rows padded alike: the rows of every head
    (R = A * c) but teacher_head (whose rows teacher_logits then are) add distillation from
    the teacher's row of the same chunk row; the teacher head's rows run in a second launch,
    after every student has read them."""
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    scale = None if scale is None else scale.contiguous()
    if teacher_logits is None:
        _launch_rows(logits, dlogits, tgt, scale, loss, opt, rows, argmax)
        return loss
    c = rows.where[2]
    n_heads = logits.shape[0] // c
    skipped = n_heads if teacher_head is None else teacher_head  # n_heads: no head's rows are skipped
    _launch_rows(logits, dlogits, tgt, scale, loss, opt, rows, argmax, teacher_logits, skipped,
                 n_programs=logits.shape[0] - (0 if teacher_head is None else c))
    if teacher_head is not None:
        part = slice(teacher_head * c, (teacher_head + 1) * c)
        _launch_rows(logits[part], None if dlogits is None else dlogits[part], tgt[part],
                     None if scale is None else scale[part], loss[part], opt, rows,
                     None if argmax is None else argmax[part])
    return loss


# ----------------------------------------------------------------------------- 'triton': vendor GEMMs
def _dlogits_format(mm_dtype: torch.dtype, scale_bound: Optional[float], opt: CEOptions):
    """(dtype the dlogits are stored in and the dH/dW GEMMs multiply, factor S they are stored
    times). bf16 has fp32's range; fp16 needs S so that a dlogit ~ w_k * p (1/n_valid comes
    after the GEMMs) neither flushes to 0 nor overflows: the largest S = 2**j with
    S * scale_bound * (2 + lambda * T) <= DLOGITS_16BIT_MAX, |dlogit| / row scale being at most
    z_factor + smoothing + lambda * T (z_factor = 1 + 2 * z_loss * lse: the factor 4 spare up
    to fp16's max covers 2 * z_loss * |lse| <= 1). Without a bound (row scales the host never
    saw) fp16 keeps fp32 dlogits, and fp32 dH/dW GEMMs."""
    if mm_dtype != torch.float16:
        return mm_dtype, 1.0
    if scale_bound is None:
        return torch.float32, 1.0
    largest = scale_bound * (2.0 + opt.distill_weight * opt.distill_temperature)
    return torch.float16, 2.0 ** math.floor(math.log2(DLOGITS_16BIT_MAX / largest))


def _triton_pass(hs, weight, targets, row_scales, opt: CEOptions, teacher: Teacher = None,
                 argmax: Optional[torch.Tensor] = None, scale_bound: Optional[float] = None):
    """_torch_pass's contract (fp32 results, no host sync on CUDA) with the row step in the
    Triton row kernel and the GEMMs in torch (cuBLAS on CUDA). scale_bound: the largest row
    scale when the host knows it (fp16 dlogits: _dlogits_format). One fp32 (A*c, V) logits
    buffer (with c more rows for a teacher tensor's logits) and one (A*c, d) dH buffer serve
    every chunk."""
    (n, d), n_heads, device, want_grad = hs[0].shape, len(hs), weight.device, row_scales is not None
    n_classes, w_mm = weight.shape[0], weight.to(gemm.mm_dtype(weight))
    keep = _kept_rows(targets, opt.ignore_index)
    separate = isinstance(teacher, torch.Tensor)
    step = _chunk_rows(n if keep is None else keep.numel(), n_heads + separate, _padded(n_classes), device)
    grad_dtype, dlogits_scale = _dlogits_format(w_mm.dtype, scale_bound, opt)
    w_grad = w_mm.to(grad_dtype)  # w_mm, or an fp32 copy for fp16 without a bound
    buffer = _logits_buffer(1, (n_heads + separate) * step, n_classes, device)[0]  # (rows, V), padded
    dh_buffer = torch.empty(n_heads * step, d, dtype=torch.float32, device=device) if want_grad else None
    loss, dhs = _pass_outputs(n_heads, n, d, keep, want_grad, torch.float32, device)
    dw = None
    for chunk in _chunks(hs, targets, row_scales, opt, w_mm.dtype, keep, step):
        c, n_stacked = chunk.n_rows, n_heads * chunk.n_rows
        logits = gemm.mm_into(buffer[:n_stacked], chunk.x, w_mm.t())  # (A*c, V) fp32
        t_logits = logits[teacher * c:(teacher + 1) * c] if isinstance(teacher, int) else None  # (c, V)
        if separate:  # rows past the heads' in the same buffer: never written by the row kernel
            x_t = chunk.rows_of(teacher).to(w_mm.dtype)
            if chunk.ignored is not None:
                x_t = x_t.masked_fill(chunk.ignored.unsqueeze(1), 0.0)
            t_logits = gemm.mm_into(buffer[n_stacked:n_stacked + c], x_t, w_mm.t())
        dlogits = _dlogits_view(buffer, n_stacked, n_classes, grad_dtype) if want_grad else None  # (A*c, V)
        arg = None if argmax is None else torch.empty(n_stacked, dtype=torch.int64, device=device)
        # every row runs and no max is tracked: n_live and d_max are dummy pointers, never read
        launch = _RowLaunch((chunk.tgt, 0, c), loss, live_count=False, dlogits_scale=dlogits_scale)
        rows = _triton_rows(logits, dlogits, chunk.tgt, chunk.scale, opt, launch,
                            teacher_logits=t_logits, teacher_head=teacher if isinstance(teacher, int) else None,
                            argmax=arg)
        _put_rows(loss, keep, chunk.start, rows.view(n_heads, c))
        if argmax is not None:
            _put_rows(argmax, keep, chunk.start, arg.view(n_heads, c))
        if want_grad:
            dh = gemm.mm_into(dh_buffer[:n_stacked], dlogits, w_grad)  # (A*c, d) = (A*c, V) @ (V, d)
            if dlogits_scale != 1.0:
                dh.mul_(1.0 / dlogits_scale)  # a power of two: exact
            _put_rows(dhs, keep, chunk.start, dh.view(n_heads, c, d))
            dw = gemm.accumulate_dw(dw, dlogits, chunk.x.to(grad_dtype))
    if dw is not None and dlogits_scale != 1.0:
        dw.mul_(1.0 / dlogits_scale)
    return loss, dhs, _dw_or_zeros(dw, weight, want_grad)


def _dlogits_view(buffer: torch.Tensor, n_rows: int, n_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """(n_rows, V) of `dtype` over the first n_rows fp32 rows of buffer (rows, V) (padded rows):
    the same rows, so a 16-bit row lies over the first half of its fp32 row."""
    rows = torch.as_strided(buffer, (n_rows, buffer.stride(0)), buffer.stride())  # (n_rows, padded) fp32
    return rows.view(dtype)[:, :n_classes]


# ----------------------------------------------------------------------------- 'triton_gemm'
def _triton_gemm_pass(hs, weight, targets, row_scales, opt: CEOptions, teacher: Teacher = None,
                      argmax: Optional[torch.Tensor] = None, scale_bound: Optional[float] = None):
    """The all-Triton counterpart of _torch_pass: same contract (fp32 results), no host sync,
    ignored rows skipped. A teacher head's logits are read where they are; a teacher tensor's
    take one more logits GEMM per chunk, into a buffer of their own. scale_bound is unused
    (the dH/dW kernels scale each chunk's dlogits by a power of two from their device max)."""
    (n, d), n_heads, device, want_grad = hs[0].shape, len(hs), weight.device, row_scales is not None
    n_classes, mm_dtype = weight.shape[0], gemm.mm_dtype(weight)  # the interpreter's dot needs fp32
    live = targets != opt.ignore_index
    order = torch.argsort((~live).to(torch.int8), stable=True)  # live rows first, in order
    n_live = live.sum().to(torch.int32).reshape(1)  # stays on the device
    w_mm = weight.to(mm_dtype).contiguous()
    separate = isinstance(teacher, torch.Tensor)
    (tiles, opts), step = _gemm_config(mm_dtype, device), _chunk_rows(n, n_heads + separate, n_classes, device)
    if step < n:  # whole row tiles per chunk: no partial tile in every chunk's three GEMMs
        step = max(tiles.out_rows, step // tiles.out_rows * tiles.out_rows)
    grad_tiles = _gemm_config(torch.float32, device)[0]  # dH/dW read fp32 dlogits: fp32's tiles (sm_90: 250 -> 192 regs)
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
        rows = _triton_rows(logits.view(-1, n_classes), None, targets.index_select(0, idx).repeat(n_heads), scale,
                            opt, _RowLaunch(where, d_max, track_max=grad_opts["SCALE_DLOGITS"]),
                            teacher_logits=t_logits, teacher_head=teacher if isinstance(teacher, int) else None,
                            argmax=arg)
        loss.index_copy_(1, idx, rows.view(n_heads, c))
        if argmax is not None:
            argmax.index_copy_(1, idx, arg.view(n_heads, c))
        if want_grad:
            dh = torch.empty(n_heads, c, d, dtype=torch.float32, device=device)
            _launch_dh(logits, w_mm, dh, d_max, where, grad_tiles, grad_opts)
            dhs.index_copy_(1, idx, dh)
            _launch_dw(logits, x, dw, d_max, where, grad_tiles, grad_opts)
    return loss, dhs, dw


# ----------------------------------------------------------------------------- forward / backward
PASSES = {"torch": _torch_pass, "triton": _triton_pass, "triton_gemm": _triton_gemm_pass}


class _Plan(NamedTuple):
    """What the public function decided, for forward and backward (no tensor of the autograd graph)."""
    backend: str  # a key of PASSES
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
    """(loss, argmax, (dhs, dW, unit)). hs: K tensors [N, d]; weight: [V, d]; targets: [N];
    teacher_h: the teacher's hiddens [N, d] when the teacher is no running head (else None).
    argmax: with plan.return_argmax, the row argmax (A, N) int64 of the heads that run, else None.

    'mean'/'sum': the pass also computes the gradients of sum_k w_k * sum_i row_loss, in fp32
    (dhs (A, N, d) and dW [V, d], both None without want_grad); the loss is that sum times
    unit (1/n_valid for 'mean', 1 for 'sum'), and backward multiplies the gradients by
    grad_output * unit. Leaving 1/n_valid (a device value) out of the pass bounds its row
    scales by max_k w_k on the host. 'none' returns (K, N), saves nothing (backward reruns the
    pass with the per-token grad_output in its row scales).
    """
    act_hs, teacher, acc = [hs[k] for k in plan.heads.active], _teacher(plan, teacher_h), gemm.acc_dtype(weight)
    weights = _weight_tensor(plan.heads.values, targets.device, acc)  # (A,)
    unit = _unit(targets, plan.reduction, plan.opt.ignore_index, acc)  # ()
    argmax = None
    if plan.return_argmax:  # (A, N); ignored rows keep ignore_index
        argmax = targets.new_full((len(act_hs), targets.shape[0]), plan.opt.ignore_index)
    if plan.reduction == "none":
        rows, _, _ = _run_pass(plan, act_hs, weight, targets, None, teacher, argmax)  # (A, N)
        return _to_all_heads(weights[:, None] * rows, plan.heads.active, plan.n_heads), argmax, (None, None, unit)
    scales = weights[:, None].expand(-1, targets.shape[0]) if want_grad else None  # (A, N)
    bound = max(plan.heads.values) if isinstance(plan.heads.values, list) and plan.heads.values else None
    rows, dhs, dw = _run_pass(plan, act_hs, weight, targets, scales, teacher, argmax, bound)
    return (rows.sum(1) * weights).sum() * unit, argmax, (dhs, dw, unit)


def _rows_backward(plan: _Plan, act_hs, weight, targets, teacher_h, grad_out):
    """reduction='none': (dhs (A, N, d), dW [V, d]) fp32 of sum(grad_out * loss rows), from a
    rerun of the pass with the row scales w_k * grad_out[k] (no bound the host knows)."""
    weights = _weight_tensor(plan.heads.values, targets.device, gemm.acc_dtype(weight))
    scales = _stack([weights[a] * grad_out[k] for a, k in enumerate(plan.heads.active)])  # (A, N)
    _, dhs, dw = _run_pass(plan, act_hs, weight, targets, scales, _teacher(plan, teacher_h))
    return dhs, dw


def _input_grads(plan: _Plan, weight, h0, dhs, dw, scale):
    """(dW [V, d], [dh_k] for all K heads) in the input dtype: the pass's fp32 gradients times
    scale (grad_out * unit, or None where already applied) in fp32, rounded once. Heads that did
    not run get a stride-0 zero gradient: correct for autograd.grad, and free."""
    dh = [_zeros_like(h0) for _ in range(plan.n_heads)]
    if dhs.numel():
        for a, k in enumerate(plan.heads.active):
            dh[k] = _to_input_dtype(dhs[a], scale, h0)
    return (_to_input_dtype(dw, scale, weight) if dw.numel() else _zeros_like(weight)), dh


def _to_input_dtype(grad: torch.Tensor, grad_out, like: torch.Tensor) -> torch.Tensor:
    """grad (fp32) * grad_out in fp32, rounded once to like's dtype: cast first, a GradScaler's
    2**16 is inf in fp16; grad cast first loses its entries below fp16's subnormals."""
    out = torch.empty(grad.shape, dtype=like.dtype, device=like.device)
    return out.copy_(grad) if grad_out is None else torch.mul(grad, grad_out, out=out)


def _run_pass(plan: _Plan, act_hs, weight, targets, scales, teacher: Teacher, argmax=None, scale_bound=None):
    if not act_hs:  # every head weight is 0
        return weight.new_zeros(0, targets.shape[0], dtype=gemm.acc_dtype(weight)), None, None
    return PASSES[plan.backend](act_hs, weight, targets, scales, plan.opt, teacher, argmax, scale_bound)


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


def _weight_tensor(weights, device: torch.device, dtype) -> torch.Tensor:
    """(A,) head weights on the device: a device tensor as given, or numbers multiplied onto a
    device scalar (no host-to-device copy, which would be a sync)."""
    if isinstance(weights, torch.Tensor):
        return weights.to(dtype)
    one = torch.ones((), dtype=dtype, device=device)
    return torch.stack([w * one for w in weights]) if weights else one.new_zeros(0)


def _unit(targets: torch.Tensor, reduction: str, ignore_index: int, dtype) -> torch.Tensor:
    """1/n_valid for 'mean' (all ignored -> loss 0, grads 0), else 1: a device scalar, never read."""
    unit = torch.ones((), dtype=dtype, device=targets.device)
    return unit / (targets != ignore_index).sum().clamp(min=1) if reduction == "mean" else unit


# ----------------------------------------------------------------------------- the registered op
# torch.compile sees the fused loss as one op (fastexit::weighted_linear_cross_entropy) with a
# fake implementation for shapes and a registered backward; its arguments are the plan spelled
# in types torch.library takes. Outputs: (loss, argmax (A, N) or (0,), dhs (A, N, d) or (0,),
# dW [V, d] or (0,), unit ()); the last three exist for backward, which scales them (or, for
# reduction='none', calls fastexit::weighted_linear_cross_entropy_backward to rerun the pass).
def _plan(weights: List[float], head_weights: Optional[torch.Tensor], active: List[int], n_heads: int,
          teacher_head: int, options: List[float], ignore_index: int, reduction: str, backend: str,
          return_argmax: bool = False) -> _Plan:
    label_smoothing, z_loss, distill_weight, distill_temperature = options
    opt = CEOptions(label_smoothing, z_loss, ignore_index, distill_weight, distill_temperature)
    heads = HeadWeights(list(active), head_weights if head_weights is not None else list(weights))
    return _Plan(backend, opt, reduction, heads, n_heads, None if teacher_head < 0 else teacher_head, return_argmax)


def _check_values(targets: torch.Tensor, n_classes: int, ignore_index: int, head_weights) -> None:
    """The checks that read values: inside the op, where they never make a compiled graph
    depend on them (CPU: ValueError; CUDA: an async device assert)."""
    check_target_range(targets, n_classes, ignore_index)
    if head_weights is not None:
        check_in_range("head_weights", head_weights, torch.isfinite(head_weights) & (head_weights >= 0),
                       "[0, inf) (finite and >= 0)")


@torch.library.custom_op("fastexit::weighted_linear_cross_entropy", mutates_args=())
def _loss_op(hs: List[torch.Tensor], weight: torch.Tensor, targets: torch.Tensor, teacher_h: Optional[torch.Tensor],
             head_weights: Optional[torch.Tensor], weights: List[float], active: List[int], teacher_head: int,
             options: List[float], ignore_index: int, reduction: str, backend: str, return_argmax: bool,
             want_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused loss on checked inputs (weighted_linear_cross_entropy checks and plans):
    head_weights a tensor, or weights numbers of the `active` heads; teacher_head -1 for none;
    options (label_smoothing, z_loss, distill_weight, distill_temperature)."""
    plan = _plan(weights, head_weights, active, len(hs), teacher_head, options, ignore_index, reduction, backend,
                 return_argmax)
    _check_values(targets, weight.shape[0], ignore_index, head_weights)
    with torch.autocast(weight.device.type, enabled=False):  # it would recast the passes' own GEMMs
        out, argmax, (dhs, dw, unit) = _forward(plan, hs, weight, targets, teacher_h, want_grad)
    return (out, targets.new_empty(0) if argmax is None else argmax, _or_empty(dhs, weight),
            _or_empty(dw, weight).contiguous(), unit)  # oneDNN's dW is a transpose: one layout for compile


@_loss_op.register_fake
def _loss_op_fake(hs, weight, targets, teacher_h, head_weights, weights, active, teacher_head, options,
                  ignore_index, reduction, backend, return_argmax, want_grad):
    (n, d), acc, n_active = hs[0].shape, gemm.acc_dtype(weight), len(active)
    grads = want_grad and reduction != "none" and n_active > 0
    return (weight.new_empty((len(hs), n) if reduction == "none" else (), dtype=acc),
            targets.new_empty((n_active, n) if return_argmax else (0,)),
            weight.new_empty((n_active, n, d) if grads else (0,), dtype=acc),
            weight.new_empty(tuple(weight.shape) if grads else (0,), dtype=acc),
            weight.new_empty((), dtype=acc))


@torch.library.custom_op("fastexit::weighted_linear_cross_entropy_backward", mutates_args=())
def _loss_backward_op(hs: List[torch.Tensor], weight: torch.Tensor, targets: torch.Tensor,
                      teacher_h: Optional[torch.Tensor], head_weights: Optional[torch.Tensor],
                      grad_out: torch.Tensor, weights: List[float], active: List[int], teacher_head: int,
                      options: List[float], ignore_index: int, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """reduction='none' backward: (dhs (A, N, d), dW [V, d]) fp32 of sum(grad_out * loss), (0,)
    each when no head runs. hs: all K heads; the other arguments as _loss_op's."""
    plan = _plan(weights, head_weights, active, len(hs), teacher_head, options, ignore_index, "none", backend)
    with torch.autocast(weight.device.type, enabled=False):
        dhs, dw = _rows_backward(plan, [hs[k] for k in active], weight, targets, teacher_h, grad_out)
    return _or_empty(dhs, weight), _or_empty(dw, weight).contiguous()


def _or_empty(grad: Optional[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """A gradient output of the ops: grad, or a new (0,) tensor for none (outputs never alias)."""
    return weight.new_empty(0, dtype=gemm.acc_dtype(weight)) if grad is None else grad


@_loss_backward_op.register_fake
def _loss_backward_op_fake(hs, weight, targets, teacher_h, head_weights, grad_out, weights, active, teacher_head,
                           options, ignore_index, backend):
    (n, d), acc, n_active = hs[0].shape, gemm.acc_dtype(weight), len(active)
    return (weight.new_empty((n_active, n, d) if n_active else (0,), dtype=acc),
            weight.new_empty(tuple(weight.shape) if n_active else (0,), dtype=acc))


def _loss_op_setup_context(ctx, inputs, output):
    (hs, weight, targets, teacher_h, head_weights, weights, active, teacher_head, options, ignore_index, reduction,
     backend, _, _) = inputs
    ctx.args = (list(weights), list(active), teacher_head, list(options), ignore_index, backend)
    # no gradient for the other inputs: None each, but [] for an empty list (torch.library
    # matches the structure of the inputs, and an empty list is no leaf)
    ctx.no_grads = tuple([] if isinstance(a, list) and not a else None for a in inputs[2:])
    ctx.plan = _plan(weights, None, active, len(hs), teacher_head, options, ignore_index, reduction, backend)
    if reduction == "none":
        ctx.save_for_backward(weight, targets, teacher_h, head_weights, *hs)
    else:
        _, _, dhs, dw, unit = output
        ctx.save_for_backward(weight, hs[0], dhs, dw, unit)


def _loss_op_backward(ctx, grad_out, *_):  # _: argmax, dhs, dW and unit get no gradient
    plan = ctx.plan
    if plan.reduction == "none":
        weight, targets, teacher_h, head_weights, *hs = ctx.saved_tensors
        dhs, dw = _loss_backward_op(hs, weight, targets, teacher_h, head_weights, grad_out, *ctx.args)
        dw, dh = _input_grads(plan, weight, hs[0], dhs, dw, None)  # grad_out is in the pass's row scales
    else:
        weight, h0, dhs, dw, unit = ctx.saved_tensors
        dw, dh = _input_grads(plan, weight, h0, dhs, dw, grad_out * unit)
    return (dh, dw, *ctx.no_grads)


_loss_op.register_autograd(_loss_op_backward, setup_context=_loss_op_setup_context)


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
    'triton' | 'triton_gemm' | 'torch' (module docstring, kernels/backend.py); fp64 inputs take
    the PyTorch path ('auto' picks it; the Triton names raise a TypeError).
    Rows with target == ignore_index contribute exact zeros: whatever their hiddens hold (even
    NaN) never reaches the result or the gradients (their dH is 0).

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

    torch.compile(fullgraph=True) keeps the loss as one op (module docstring); head weights
    are then numbers or a tensor (a tensor is never read on the host there, so every head
    runs), and bad values are found inside the op.

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
    chosen = _pick_backend(backend, weight, targets, hs)
    teacher_head, teacher_h = _resolve_teacher(teacher, float(distill_weight), hs, heads)
    on_device = isinstance(heads.values, torch.Tensor)
    want_grad = reduction != "none" and torch.is_grad_enabled() and any(t.requires_grad for t in (weight, *hs))
    options = [float(label_smoothing), float(z_loss), float(distill_weight), float(distill_temperature)]
    out, argmax, *_ = _loss_op(hs, weight, targets.long(), teacher_h, heads.values if on_device else None,
                               [] if on_device else heads.values, heads.active,
                               -1 if teacher_head is None else teacher_head, options, int(ignore_index), reduction,
                               chosen, bool(return_argmax), want_grad)
    if not return_argmax:
        return out
    per_head = dict(zip(heads.active, argmax.unbind(0)))  # head k -> its row of argmax (A, N)
    return out, [per_head.get(k) for k in range(len(hs))]


def _pick_backend(backend: str, weight: torch.Tensor, targets: torch.Tensor, hs: list) -> str:
    """A key of PASSES; fp64 has no Triton path ('auto' falls back, 'triton'/'triton_gemm' raise)."""
    chosen = resolve_backend(backend, weight, targets, *hs)
    if chosen != "torch" and weight.dtype == torch.float64:
        if backend != "auto":
            raise TypeError(f"backend={backend!r} takes fp32/bf16/fp16 hiddens and weight, got float64: "
                            "use backend='torch'")
        chosen = "torch"
    return chosen
