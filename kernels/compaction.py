"""Compaction: move the hard tokens of a batch into a dense batch and their results back.

- ``compact_indices(mask)``: int64 positions where ``mask`` is True, ascending. An N-D mask
  is read in flat (row-major) order, so ``x.reshape(-1, d)[compact_indices(mask)]`` are the
  selected rows of ``x[mask]``.
- ``gather_rows(x, idx)`` = ``x[idx]``; ``scatter_rows(out, idx, values)``: ``out[idx] = values``
  in place. Order-preserving and deterministic (``idx`` from compact_indices is unique).
- ``select_rows`` / ``replace_rows``: the same two moves as autograd ops (out of place), for
  training paths that run a block on some rows only (layer dropout).

The Triton path of ``compact_indices`` counts each block of the mask, takes an exclusive
prefix sum of the block counts, then writes every selected position at its block offset plus
its rank inside the block (``tl.cumsum``). Returning an exact-size tensor needs the total on
the host: one device-to-host sync per call, inherent to running a smaller dense batch next.
"""
import torch

from .backend import HAS_TRITON, device_guard, resolve_backend
from .checks import check_device, check_dtype, check_index, check_same, check_shape, check_tensor

if HAS_TRITON:
    import triton
    import triton.language as tl

BLOCK_MASK = 1024  # mask elements per program of the prefix-sum kernels
BLOCK_COLS = 256   # row elements per program of the gather/scatter kernels


# ----------------------------------------------------------------------------- Triton path
if HAS_TRITON:
    @triton.jit
    def _mask_block(M_ptr, n, BLOCK: tl.constexpr):
        """This program's block of the mask: (program id, int64 offsets, mask values as int64)."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        return pid, offs, tl.load(M_ptr + offs, mask=offs < n, other=0).to(tl.int64)

    @triton.jit
    def _block_count_kernel(
        M_ptr,
        Counts_ptr,
        n,
        BLOCK: tl.constexpr,
    ):
        pid, offs, m = _mask_block(M_ptr, n, BLOCK)
        tl.store(Counts_ptr + pid, tl.sum(m, axis=0))

    @triton.jit
    def _block_positions_kernel(
        M_ptr,
        Offsets_ptr,
        Out_ptr,
        n,
        BLOCK: tl.constexpr,
    ):
        pid, offs, m = _mask_block(M_ptr, n, BLOCK)
        rank = tl.cumsum(m, axis=0) - m  # exclusive prefix sum inside the block
        base = tl.load(Offsets_ptr + pid)
        tl.store(Out_ptr + base + rank, offs, mask=m != 0)

    @triton.jit
    def _copy_rows_kernel(
        Src_ptr,
        Src_row_stride,
        Dst_ptr,
        Dst_row_stride,
        Idx_ptr,
        n_cols,
        GATHER: tl.constexpr,
        BLOCK_COLS: tl.constexpr,
    ):
        # GATHER: dst[r] = src[idx[r]]; else dst[idx[r]] = src[r]
        r = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        ok = cols < n_cols
        i = tl.load(Idx_ptr + r)
        src_row = i if GATHER else r
        dst_row = r if GATHER else i
        vals = tl.load(Src_ptr + src_row * Src_row_stride + cols, mask=ok)
        tl.store(Dst_ptr + dst_row * Dst_row_stride + cols, vals, mask=ok)


def _triton_compact_indices(flat: torch.Tensor) -> torch.Tensor:
    n = flat.numel()
    m = flat.view(torch.uint8)
    n_blocks = triton.cdiv(n, BLOCK_MASK)
    counts = torch.empty(n_blocks, dtype=torch.int64, device=flat.device)
    with device_guard(flat):
        _block_count_kernel[(n_blocks,)](m, counts, n, BLOCK=BLOCK_MASK)
    ends = counts.cumsum(0)  # (n_blocks,)
    out = torch.empty(int(ends[-1]), dtype=torch.int64, device=flat.device)  # the one host sync
    with device_guard(flat):
        _block_positions_kernel[(n_blocks,)](m, ends - counts, out, n, BLOCK=BLOCK_MASK)
    return out


def _triton_copy_rows(src: torch.Tensor, dst: torch.Tensor, idx: torch.Tensor, gather: bool) -> None:
    src2, dst2 = src.view(src.shape[0], -1), dst.view(dst.shape[0], -1)  # (rows, C)
    grid = (idx.numel(), triton.cdiv(src2.shape[1], BLOCK_COLS))
    with device_guard(dst):
        _copy_rows_kernel[grid](src2, src2.stride(0), dst2, dst2.stride(0), idx, src2.shape[1],
                                GATHER=gather, BLOCK_COLS=BLOCK_COLS)


# ----------------------------------------------------------------------------- validation
def _check_rows(name: str, x) -> None:
    """x: a tensor (N, ...) of at least one dimension, indexed by its rows."""
    check_tensor(name, x)
    if x.dim() == 0:
        raise ValueError(f"{name} must have a row dimension (N, ...), got a 0-d tensor")


# ----------------------------------------------------------------------------- public
def compact_indices(mask: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Positions (k,) int64, ascending, where the bool ``mask`` is True; an N-D mask is read
    in flat row-major order. One host sync (the count), as any exact-size result needs."""
    check_dtype("mask", mask, torch.bool)
    flat = mask.reshape(-1)
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=mask.device)
    if resolve_backend(backend, mask) != "torch":  # 'triton_gemm' too: no GEMM to choose here
        return _triton_compact_indices(flat.contiguous())
    return flat.nonzero().squeeze(1)


def gather_rows(x: torch.Tensor, idx: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Rows ``x[idx]``: x (N, ...), idx (k,) int64 in [0, N) -> (k, ...)."""
    _check_rows("x", x)
    check_tensor("idx", idx)
    check_device("idx", idx, x, "x")  # before check_index reads idx
    check_index(idx, x.shape[0], "x")
    if resolve_backend(backend, x, idx) == "torch":
        return x.index_select(0, idx)
    x = x.contiguous()
    out = x.new_empty((idx.numel(),) + x.shape[1:])
    if out.numel():
        _triton_copy_rows(x, out, idx.contiguous(), gather=True)
    return out


def scatter_rows(out: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """In place ``out[idx] = values`` and return ``out``: out (N, ...), idx (k,) int64 unique
    in [0, N), values (k, ...) of out's dtype. Rows not in idx keep their values."""
    _check_rows("out", out)
    check_tensor("idx", idx)
    check_device("idx", idx, out, "out")  # before check_index reads idx
    check_same("values", values, out, "out")
    check_shape("values", values, (idx.numel(),) + out.shape[1:])
    check_index(idx, out.shape[0], "out")
    if resolve_backend(backend, out, idx, values) == "torch":
        return out.index_copy_(0, idx, values)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous for backend='triton' (it is written in place)")
    if values.numel():
        _triton_copy_rows(values.contiguous(), out, idx.contiguous(), gather=False)
    return out


# ----------------------------------------------------------------------------- autograd
class _SelectRows(torch.autograd.Function):
    """x[idx] with the gradient scattered back: training's compaction (idx unique)."""

    @staticmethod
    def forward(ctx, x, idx, backend):
        ctx.save_for_backward(idx)
        ctx.n_rows, ctx.backend = x.shape[0], backend
        return gather_rows(x, idx, backend=backend)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        dx = grad.new_zeros((ctx.n_rows,) + grad.shape[1:])
        return scatter_rows(dx, idx, grad.contiguous(), backend=ctx.backend), None, None


class _ReplaceRows(torch.autograd.Function):
    """A copy of x whose rows idx are values; the gradient splits along the same rows."""

    @staticmethod
    def forward(ctx, x, idx, values, backend):
        ctx.save_for_backward(idx)
        ctx.backend = backend
        return scatter_rows(x.contiguous().clone(), idx, values.contiguous(), backend=backend)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        grad = grad.contiguous()
        d_values = gather_rows(grad, idx, backend=ctx.backend)
        dx = scatter_rows(grad.clone(), idx, torch.zeros_like(d_values), backend=ctx.backend)
        return dx, None, d_values, None


def select_rows(x: torch.Tensor, idx: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Differentiable ``gather_rows``: x (N, ...), idx (k,) unique int64 -> (k, ...); the
    gradient of the other rows is 0."""
    _check_rows("x", x)
    return _SelectRows.apply(x, idx, backend)


def replace_rows(x: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Differentiable out-of-place ``scatter_rows``: a copy of x (N, ...) with rows idx (k,)
    unique set to values (k, ...); x's gradient is 0 on those rows, values' is theirs."""
    _check_rows("x", x)
    return _ReplaceRows.apply(x, idx, values, backend)
