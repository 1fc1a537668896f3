"""Exit confidence: per row of hidden @ weight.T, the max softmax probability, argmax,
logsumexp and (with targets) the NLL, never holding the [N, V] logits of all rows at once.

Routing asks one question per token at the exit layer, "how sure is the head?", and
evaluation asks for the NLL of the prediction used. Both need one streaming pass over the
vocabulary per row:

- PyTorch path: row chunks of fp32 logits (CHUNK_BYTES; kernels/gemm.py's GEMM), max/argmax,
  then an in-place exp.
- Triton path (CUDA, or CPU under TRITON_INTERPRET=1): one program per block of rows walks the
  vocabulary in tiles with an online max / argmax / sum-exp and picks the target logit on the
  way.

Inference only: no autograd graph is built.
"""
from typing import NamedTuple, Optional

import torch

from . import gemm
from .backend import HAS_TRITON, resolve_backend
from .checks import check_matrix, check_same, check_target_range, check_targets

if HAS_TRITON:
    import triton
    import triton.language as tl

CHUNK_BYTES = 16 * 2**20  # fp32 logits of one row chunk in the PyTorch path
BLOCK_M, BLOCK_V, BLOCK_D = 16, 64, 64  # Triton tiles: rows, classes, model dim (tl.dot needs >= 16)


class ExitStats(NamedTuple):
    """Per-row statistics of one exit: conf, lse, nll fp32 (N,); pred int64 (N,).
    ``nll`` is None without targets and 0 where the target is ignore_index."""
    conf: torch.Tensor
    pred: torch.Tensor
    lse: torch.Tensor
    nll: Optional[torch.Tensor]


# ----------------------------------------------------------------------------- validation
def _check_inputs(hidden, weight, targets, ignore_index: int) -> None:
    check_matrix("hidden", hidden)
    check_matrix("weight", weight, n_cols=hidden.shape[1])
    check_same("weight", weight, hidden, "hidden")
    if targets is not None:
        check_targets(targets, hidden.shape[0], hidden, "hidden")
        check_target_range(targets, weight.shape[0], ignore_index)


# ----------------------------------------------------------------------------- PyTorch path
def _torch_exit_confidence(hidden, weight, targets, ignore_index):
    n, n_classes = hidden.shape[0], weight.shape[0]
    weight = weight.to(gemm.mm_dtype(weight))  # once, not per chunk (CPU low precision: fp32)
    step = max(1, min(n, CHUNK_BYTES // (4 * n_classes)))
    conf, lse = (torch.empty(n, device=hidden.device) for _ in range(2))
    pred = torch.empty(n, dtype=torch.int64, device=hidden.device)
    nll = torch.empty(n, device=hidden.device) if targets is not None else None
    for s in range(0, n, step):
        e = min(n, s + step)
        logits = gemm.linear_fp32(hidden[s:e], weight).float()  # (c, V) fp32
        row_max, pred[s:e] = logits.max(1)
        if targets is not None:
            valid = targets[s:e] != ignore_index
            x_t = logits.gather(1, torch.where(valid, targets[s:e], 0).long().unsqueeze(1)).squeeze(1)
        sum_exp = logits.sub_(row_max.unsqueeze(1)).exp_().sum(1)  # logits now hold exp(x - max)
        lse[s:e] = row_max + sum_exp.log()
        conf[s:e] = sum_exp.reciprocal()  # exp(max - lse)
        if targets is not None:
            nll[s:e] = torch.where(valid, lse[s:e] - x_t, 0.0)
    return ExitStats(conf, pred, lse, nll)


# ----------------------------------------------------------------------------- Triton path
if HAS_TRITON:
    @triton.jit
    def _exit_confidence_kernel(
        H_ptr,
        H_row_stride,
        W_ptr,
        W_row_stride,
        T_ptr,
        Conf_ptr,
        Pred_ptr,
        Lse_ptr,
        Nll_ptr,
        n_rows,
        n_classes,
        d_model,
        ignore_index,
        HAS_TARGETS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        run_sum = tl.zeros((BLOCK_M,), tl.float32)
        best = tl.zeros((BLOCK_M,), tl.int64)
        tgt_logit = tl.zeros((BLOCK_M,), tl.float32)
        if HAS_TARGETS:
            tgt = tl.load(T_ptr + rows64, mask=row_ok, other=ignore_index).to(tl.int64)
        for v0 in range(0, n_classes, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < n_classes
            cols64 = cols.to(tl.int64)
            acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
            for d0 in range(0, d_model, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_ok = ds < d_model
                h = tl.load(H_ptr + rows64[:, None] * H_row_stride + ds[None, :],
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                w = tl.load(W_ptr + cols64[:, None] * W_row_stride + ds[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                acc = tl.dot(h, tl.trans(w), acc)
            acc = tl.where(col_ok[None, :], acc, float("-inf"))
            tile_max = tl.max(acc, axis=1)
            tile_arg = tl.argmax(acc, axis=1).to(tl.int64) + v0
            best = tl.where(tile_max > run_max, tile_arg, best)  # strict: the first maximum wins
            new_max = tl.maximum(run_max, tile_max)
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(acc - new_max[:, None]), axis=1)
            run_max = new_max
            if HAS_TARGETS:
                tgt_logit += tl.sum(tl.where(cols64[None, :] == tgt[:, None], acc, 0.0), axis=1)
        lse = run_max + tl.log(run_sum)
        tl.store(Conf_ptr + rows64, 1.0 / run_sum, mask=row_ok)
        tl.store(Pred_ptr + rows64, best, mask=row_ok)
        tl.store(Lse_ptr + rows64, lse, mask=row_ok)
        if HAS_TARGETS:
            tl.store(Nll_ptr + rows64, tl.where(tgt == ignore_index, 0.0, lse - tgt_logit), mask=row_ok)


def _triton_exit_confidence(hidden, weight, targets, ignore_index):
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, d = hidden.shape
    conf, lse = (torch.empty(n, device=hidden.device) for _ in range(2))
    pred = torch.empty(n, dtype=torch.int64, device=hidden.device)
    nll = torch.empty(n, device=hidden.device) if targets is not None else None
    tgt = targets.contiguous() if targets is not None else pred  # dummy pointer when HAS_TARGETS=False
    _exit_confidence_kernel[(triton.cdiv(n, BLOCK_M),)](
        hidden, hidden.stride(0), weight, weight.stride(0), tgt,
        conf, pred, lse, nll if nll is not None else conf,
        n, weight.shape[0], d, ignore_index,
        HAS_TARGETS=targets is not None, BLOCK_M=BLOCK_M, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D,
    )
    return ExitStats(conf, pred, lse, nll)


# ----------------------------------------------------------------------------- public
@torch.no_grad()
def exit_confidence(hidden: torch.Tensor, weight: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                    ignore_index: int = -100, backend: str = "auto") -> ExitStats:
    """Confidence, prediction, logsumexp and NLL of every row of ``hidden @ weight.T``.

    hidden: [N, d] float; weight: [V, d] same dtype; targets: optional [N] int64 in [0, V) or
    ignore_index. Returns ExitStats with conf = max softmax probability = exp(max - lse),
    pred = argmax (first on ties), lse = logsumexp, nll = lse - logit[target] (0 where
    ignored); statistics are computed in fp32. Never holds the logits of all N rows at once.
    Bad input (kernels/checks.py): TypeError for a wrong dtype, ValueError for a wrong shape,
    an empty batch, a device mismatch or a target out of range (on CUDA an async device assert).
    """
    _check_inputs(hidden, weight, targets, ignore_index)
    if resolve_backend(backend, hidden, weight) == "triton":
        return _triton_exit_confidence(hidden, weight, targets, ignore_index)
    return _torch_exit_confidence(hidden, weight, targets, ignore_index)
