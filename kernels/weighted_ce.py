"""Weighted multi-head linear cross-entropy: sum_k w_k * CE(h_k @ W.T, y), never holding [N, V].

Early-exit training puts one shared LM head W [V, d] behind several layers and minimises a
weighted sum of their cross-entropies. The forward pass computes the loss AND the gradients of
every weighted head and of W, one chunk of rows at a time (backward only rescales them):

1. one GEMM gives the fp32 logits of the chunk's rows of all weighted heads, stacked;
2. a row step turns them in place into row losses and dlogits;
3. two GEMMs give dH and add dlogits^T @ H into an fp32 dW.
Heads with weight 0 are never touched, and rows whose target is ignore_index enter no GEMM.

- PyTorch path: oneDNN's GEMMs on CPU (MKL's sgemm runs AVX2 code on AMD CPUs, 2-3x slower),
  cuBLAS's on CUDA (fp32 output for bf16/fp16 inputs); the row step is torch ops (max, exp,
  sum, scale) in place on the chunk. On CPU only the non-ignored rows are gathered into
  chunks; on CUDA that would need their count on the host (a sync), so every row runs there.
- Triton path (CUDA, or CPU under TRITON_INTERPRET=1): the non-ignored rows are moved first
  by a stable argsort on the device and their count stays on the device. Three Triton GEMM
  kernels (tl.dot, fp32 accumulators) and one row kernel read that count and skip every tile
  past it, so ignored rows cost no matmul work and the host never waits. The row kernel, one
  program per row, does an online logsumexp over V tiles, then writes dlogits tile by tile
  (straight to bf16/fp16 for low-precision inputs). dW is one program per [V, d] tile looping
  over rows: no atomics, deterministic. Storing the chunk's logits costs 3 GEMMs, where
  recomputing logit tiles inside one kernel would cost 5.
Both keep the true-class gradient p - 1 exact for confident rows: it is computed as minus the
exp-sum of the other classes over the total, never as a difference of numbers close to 1.
"""
import math
from typing import Sequence, Union

import torch

from . import gemm
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
def _new_dw(weight: torch.Tensor) -> torch.Tensor:
    """Zero fp32 dW [V, d]; stored as dW^T [d, V] where oneDNN accumulates x^T @ dlogits."""
    if gemm.use_onednn(weight):
        return weight.new_zeros(weight.shape[::-1], dtype=torch.float32).t()
    return weight.new_zeros(weight.shape, dtype=gemm.acc_dtype(weight))


def _accumulate_dw(dw: torch.Tensor, dlogits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if gemm.use_onednn(x):
        return dw.add_(gemm.linear(x.t(), dlogits.t()).t())  # dW^T (d, V) += x^T @ dlogits
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


def _chunked_pass(hs, weight, targets, row_scales, opt, rows_fn):
    """Loss rows (A, N) of the weighted heads and, if row_scales (A, N) is given, grads.

    hs: A tensors [N, d]; weight: [V, d]; targets: [N]. Per chunk of kept rows: one GEMM for
    the logits of all heads, rows_fn for loss and dlogits, GEMMs for dH and an fp32 dW.
    Returns (loss (A, N) fp32, dhs (A, N, d) in input dtype or None, dW [V, d] or None).
    """
    (n, _), n_heads, device, want_grad = hs[0].shape, len(hs), weight.device, row_scales is not None
    keep = _kept_rows(targets, opt[2])
    n_kept = n if keep is None else keep.numel()
    step, w_mm = _chunk_rows(n_kept, n_heads, weight.shape[0], device), weight.to(gemm.mm_dtype(weight))
    w_mm_t = w_mm.t().contiguous() if gemm.use_onednn(w_mm) else w_mm.t()  # (d, V): dH = dlogits @ W as a linear
    new = torch.empty if keep is None else torch.zeros  # ignored rows: loss 0, dH 0
    loss = new(n_heads, n, dtype=gemm.acc_dtype(weight), device=device)  # (A, N)
    dhs = new(n_heads, *hs[0].shape, dtype=hs[0].dtype, device=device) if want_grad else None
    dw = _new_dw(w_mm) if want_grad else None  # (V, d) fp32
    for s in range(0, n_kept, step):
        e = min(n_kept, s + step)
        rows_of = (lambda t, dim=0: t.narrow(dim, s, e - s)) if keep is None else \
            (lambda t, dim=0: t.index_select(dim, keep[s:e]))
        x = torch.cat([rows_of(h) for h in hs]).to(w_mm.dtype)  # (A*c, d): one GEMM for all heads
        scale = rows_of(row_scales, 1).reshape(-1) if want_grad else None
        rows, dlogits = rows_fn(gemm.linear(x, w_mm), rows_of(targets).repeat(n_heads), scale, opt, x.dtype)
        _put_rows(loss, keep, s, rows.view(n_heads, e - s))
        if want_grad:
            _put_rows(dhs, keep, s, gemm.linear(dlogits, w_mm_t).view(n_heads, e - s, -1))  # (A, c, d)
            dw = _accumulate_dw(dw, dlogits, x)
    return loss, dhs, (dw.to(weight.dtype).contiguous() if want_grad else None)


def _put_rows(out: torch.Tensor, keep, start: int, values: torch.Tensor) -> None:
    """out[:, rows start..] = values (A, c, ...): a slice, or the kept positions keep[start:]."""
    if keep is None:
        out.narrow(1, start, values.shape[1]).copy_(values)
    else:
        out.index_copy_(1, keep[start:start + values.shape[1]], values.to(out.dtype))


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
# The Triton path reorders rows so that the non-ignored ones come first (a stable argsort on
# the device) and keeps their count on the device: every kernel loads it and skips the tiles
# past it, so ignored rows cost no matmul work and the host never waits for the count.
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
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Out[a, m, v] = X[a, m] . W[v] in fp32 for the live rows; tiles past them do nothing."""
        pid_m, pid_n, head = _row_tile(n_rows, BLOCK_M)
        live = _live_rows(N_live_ptr, chunk_start, n_rows)
        if pid_m * BLOCK_M < live:
            rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            ks = tl.arange(0, BLOCK_K)
            x_ptrs = X_ptr + head * X_head_stride + rows[:, None].to(tl.int64) * X_row_stride + ks[None, :]
            w_ptrs = W_ptr + cols[:, None].to(tl.int64) * W_row_stride + ks[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, d, BLOCK_K):
                x = tl.load(x_ptrs + k0, mask=(rows[:, None] < live) & (k0 + ks[None, :] < d), other=0.0)
                w = tl.load(w_ptrs + k0, mask=(cols[:, None] < n_classes) & (k0 + ks[None, :] < d), other=0.0)
                acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
            out_ptrs = Out_ptr + head * Out_head_stride + rows[:, None].to(tl.int64) * Out_row_stride + cols[None, :]
            tl.store(out_ptrs, acc, mask=(rows[:, None] < live) & (cols[None, :] < n_classes))

    @triton.jit(do_not_specialize=["chunk_start", "n_rows"])
    def _ce_rows_kernel(
        Logits_ptr,
        logits_row_stride,
        Dlogits_ptr,
        dlogits_row_stride,
        Targets_ptr,
        Scales_ptr,
        Loss_ptr,
        N_live_ptr,
        chunk_start,
        n_rows,
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
        is_live = row % n_rows < _live_rows(N_live_ptr, chunk_start, n_rows)  # else ignored, never read
        cols = tl.arange(0, BLOCK_V)
        # an out-of-range target (possible only on CUDA, where the check is an async assert)
        # counts as ignored here, so no load ever leaves the row
        if is_live & (target != ignore_index) & (target >= 0) & (target < n_classes):
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
                if is_live:  # a live row with a bad target: the dH and dW kernels read its zeros
                    for v0 in range(0, n_classes, BLOCK_V):
                        offs = v0 + cols
                        zeros = tl.zeros([BLOCK_V], dtype=Dlogits_ptr.dtype.element_ty)
                        tl.store(dlogits_row + offs, zeros, mask=offs < n_classes)

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
        N_live_ptr,
        chunk_start,
        n_rows,
        n_classes,
        d,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """DH[a, m] = sum_v dlogits[a, m, v] * W[v]; tiles past the live rows write zeros."""
        pid_m, pid_n, head = _row_tile(n_rows, BLOCK_M)
        live = _live_rows(N_live_ptr, chunk_start, n_rows)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        d_ptrs = D_ptr + head * D_head_stride + rows[:, None].to(tl.int64) * D_row_stride + ks[None, :]
        w_ptrs = W_ptr + ks[:, None].to(tl.int64) * W_row_stride + cols[None, :]
        v_end = tl.where(pid_m * BLOCK_M < live, n_classes, 0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for v0 in range(0, v_end, BLOCK_K):
            g = tl.load(d_ptrs + v0, mask=(rows[:, None] < live) & (v0 + ks[None, :] < n_classes), other=0.0)
            w = tl.load(w_ptrs, mask=(v0 + ks[:, None] < n_classes) & (cols[None, :] < d), other=0.0)
            acc = tl.dot(g, w, acc, input_precision=PRECISION)
            w_ptrs += BLOCK_K * W_row_stride  # a pointer step: v0 * W_row_stride could pass int32
        dh_ptrs = DH_ptr + head * DH_head_stride + rows[:, None].to(tl.int64) * DH_row_stride + cols[None, :]
        tl.store(dh_ptrs, acc.to(DH_ptr.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < d))

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
        N_live_ptr,
        chunk_start,
        n_rows,
        n_heads,
        n_classes,
        d,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """DW[v] += sum_{a, live m} dlogits[a, m, v] * X[a, m] in fp32; one program per tile, no atomics."""
        live = _live_rows(N_live_ptr, chunk_start, n_rows)
        if live > 0:
            vs = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # d tiles vary fastest: programs
            cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # running together share dlogits
            ks = tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            # pointers advance by strides (64-bit pointer arithmetic), never head * stride in int32
            d_head = D_ptr + ks[:, None].to(tl.int64) * D_row_stride + vs[None, :]
            x_head = X_ptr + ks[:, None].to(tl.int64) * X_row_stride + cols[None, :]
            for _ in range(0, n_heads):
                d_ptrs, x_ptrs = d_head, x_head
                for m0 in range(0, live, BLOCK_K):
                    in_rows = m0 + ks[:, None] < live
                    g = tl.load(d_ptrs, mask=in_rows & (vs[None, :] < n_classes), other=0.0)
                    x = tl.load(x_ptrs, mask=in_rows & (cols[None, :] < d), other=0.0)
                    acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION)
                    d_ptrs += BLOCK_K * D_row_stride
                    x_ptrs += BLOCK_K * X_row_stride
                d_head += D_head_stride
                x_head += X_head_stride
            dw_ptrs = DW_ptr + vs[:, None].to(tl.int64) * DW_row_stride + cols[None, :]
            in_tile = (vs[:, None] < n_classes) & (cols[None, :] < d)
            tl.store(dw_ptrs, acc + tl.load(dw_ptrs, mask=in_tile, other=0.0), mask=in_tile)


def _block_v(n_classes: int) -> int:
    cap = INTERPRET_BLOCK_V if interpreting() else CUDA_BLOCK_V
    return min(cap, triton.next_power_of_2(n_classes))


def _gemm_config(dtype: torch.dtype) -> dict:
    """Tile sizes and launch options of the three GEMM kernels (fp32 operands use smaller K tiles)."""
    if interpreting():
        return dict(PRECISION="ieee", BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    # fp32 operands follow torch's own switch between IEEE and TF32 GEMMs (reading allow_tf32
    # raises once the newer fp32_precision setting has been used)
    matmul = torch.backends.cuda.matmul
    tf32 = matmul.fp32_precision == "tf32" if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
    precision = "tf32" if dtype == torch.float32 and tf32 else "ieee"
    block_k = 32 if dtype == torch.float32 else 64
    return dict(PRECISION=precision, BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, num_warps=8, num_stages=3)


def _triton_pass(hs, weight, targets, row_scales, opt):
    """The Triton counterpart of _chunked_pass: same contract, no host sync, ignored rows skipped."""
    ignore_index = opt[2]
    (n, d), n_heads, device, want_grad = hs[0].shape, len(hs), weight.device, row_scales is not None
    n_classes, mm_dtype = weight.shape[0], gemm.mm_dtype(weight)  # the interpreter's dot needs fp32
    live = targets != ignore_index
    order = torch.argsort((~live).to(torch.int8), stable=True)  # live rows first, in order
    n_live = live.sum().to(torch.int32).reshape(1)  # stays on the device
    w_mm = weight.to(mm_dtype).contiguous()
    step, cfg = _chunk_rows(n, n_heads, n_classes, device), _gemm_config(mm_dtype)
    if step < n:  # whole row tiles per chunk: no partial tile in every chunk's three GEMMs
        step = max(cfg["BLOCK_M"], step // cfg["BLOCK_M"] * cfg["BLOCK_M"])
    loss = torch.empty(n_heads, n, dtype=torch.float32, device=device)  # (A, N)
    dhs = torch.empty(n_heads, n, d, dtype=hs[0].dtype, device=device) if want_grad else None
    dw = torch.zeros(n_classes, d, dtype=torch.float32, device=device) if want_grad else None
    for s in range(0, n, step):
        c, idx = min(step, n - s), order[s:s + step]
        x = torch.stack([h.index_select(0, idx) for h in hs]).to(mm_dtype)  # (A, c, d)
        logits = torch.empty(n_heads, c, n_classes, dtype=torch.float32, device=device)  # (A, c, V)
        where = (n_live, s, c)
        grid = (triton.cdiv(c, cfg["BLOCK_M"]) * triton.cdiv(n_classes, cfg["BLOCK_N"]), n_heads)
        _logits_kernel[grid](x, x.stride(0), x.stride(1), w_mm, w_mm.stride(0), logits, logits.stride(0),
                             logits.stride(1), *where, n_classes, d, **cfg)
        scale = row_scales.index_select(1, idx).reshape(-1) if want_grad else None
        rows, dlogits = _triton_rows(logits.view(-1, n_classes), targets.index_select(0, idx).repeat(n_heads),
                                     scale, opt, mm_dtype, where)
        loss.index_copy_(1, idx, rows.view(n_heads, c))
        if want_grad:
            dlogits = dlogits.view(n_heads, c, n_classes)
            dh = torch.empty(n_heads, c, d, dtype=hs[0].dtype, device=device)
            grid = (triton.cdiv(c, cfg["BLOCK_M"]) * triton.cdiv(d, cfg["BLOCK_N"]), n_heads)
            _dh_kernel[grid](dlogits, dlogits.stride(0), dlogits.stride(1), w_mm, w_mm.stride(0), dh,
                             dh.stride(0), dh.stride(1), *where, n_classes, d, **cfg)
            dhs.index_copy_(1, idx, dh)
            grid = (triton.cdiv(d, cfg["BLOCK_N"]), triton.cdiv(n_classes, cfg["BLOCK_M"]))
            _dw_kernel[grid](dlogits, dlogits.stride(0), dlogits.stride(1), x, x.stride(0), x.stride(1), dw,
                             dw.stride(0), *where, n_heads, n_classes, d, **cfg)
    return loss, dhs, (dw.to(weight.dtype) if want_grad else None)


def _triton_rows(logits, tgt, scale, opt, grad_dtype, where):
    """Row loss (R,) of fp32 logits (R, V) and dlogits (R, V) in grad_dtype (in place when fp32)."""
    smoothing, z_loss, ignore_index = opt
    n_rows, n_classes = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    want_grad = scale is not None
    dlogits = logits if grad_dtype == logits.dtype or not want_grad else torch.empty_like(logits, dtype=grad_dtype)
    _ce_rows_kernel[(n_rows,)](
        logits, logits.stride(0), dlogits, dlogits.stride(0), tgt,
        scale.contiguous() if want_grad else loss, loss, *where, n_classes, ignore_index, smoothing, z_loss,
        HAS_SMOOTHING=smoothing > 0, HAS_Z_LOSS=z_loss > 0, HAS_GRAD=want_grad,
        SERIES_MAX_Q=SERIES_MAX_Q, BLOCK_V=_block_v(n_classes), num_warps=ROW_WARPS)
    return loss, (dlogits if want_grad else None)


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
        coef = _row_loss_coefficients(ctx.weights, targets, reduction, opt[2], gemm.acc_dtype(weight))  # (A,)
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
        return weight.new_zeros(0, targets.shape[0], dtype=gemm.acc_dtype(weight)), None, None
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
    and dW accumulate in fp32. backend: 'auto' | 'triton' | 'torch' (see kernels/backend.py);
    fp64 inputs take the PyTorch path ('auto' picks it; 'triton' raises a TypeError).
    Rows with target == ignore_index enter no GEMM, so whatever their hiddens hold (even NaN)
    never reaches the result or the gradients (their dH is 0).

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
    if chosen == "triton" and weight.dtype == torch.float64:
        if backend == "triton":
            raise TypeError("backend='triton' takes fp32/bf16/fp16 hiddens and weight, got float64: "
                            "use backend='torch'")
        chosen = "torch"
    check_target_range(targets, weight.shape[0], ignore_index)
    run_pass = _triton_pass if chosen == "triton" else _torch_pass
    opt = (float(label_smoothing), float(z_loss), int(ignore_index))
    return _WeightedCE.apply(run_pass, weight, targets.long(), ws, reduction, opt, *hs)

