"""Exit confidence: per row of hidden @ weight.T, the max softmax probability, argmax,
logsumexp, (with targets) the NLL and (on request) the margin, top-1 minus top-2 softmax
probability, never holding the [N, V] logits of all rows at once.

Routing asks one question per token at the exit layer, "how sure is the head?", and
evaluation asks for the NLL of the prediction used. Both need one streaming pass over the
vocabulary per row:

- PyTorch path: row chunks of fp32 logits (CHUNK_BYTES; kernels/gemm.py's GEMM), max/argmax
  (and top-2 for the margin), then an in-place exp.
- Triton path (CUDA, or CPU under TRITON_INTERPRET=1), flash-decoding style: the grid is
  (row blocks, vocabulary splits). Each program walks its slice of W in tiles with an online
  max / first argmax / sum-exp (and second-largest logit for the margin) and picks the target
  logit on the way, writing [n_splits, N] partials; a second small kernel merges them in
  vocabulary order, with no host sync. A decode step (1-64 rows) would otherwise have one or
  a few programs each read all of W; split, programs on every SM share one read of it. Large
  N takes 128-row blocks, so tl.dot runs as Hopper's wgmma; tiles are chosen per GPU
  generation (_tiles). Every tl.dot takes backend.dot_precision (fp32 is not silently TF32).
  The split kernel computes its logit tiles itself (no logits ever reach memory), so there is
  no vendor-GEMM variant: backend='triton_gemm' runs the same kernels as 'triton'.

The margin (CALM's softmax-response difference) is opt-in (want_margin, the HAS_MARGIN
constexpr): it costs two more reductions per logits tile, an [n_splits, N] partial and a
top-2 pass per PyTorch chunk; without it none of that work is done.

Inference only: no autograd graph is built. Registered with torch.library
(fastexit::exit_confidence, with a fake implementation), so torch.compile(fullgraph=True)
keeps it as one op; the target range check, which reads values, runs inside it.
"""
import functools
from typing import NamedTuple, Optional, Tuple

import torch

from . import gemm
from .backend import (HAS_TRITON, autocast_inputs, cuda_capability, device_guard, dot_precision, interpreting,
                      is_hopper, resolve_backend)
from .checks import check_matrix, check_same, check_target_range, check_targets

if HAS_TRITON:
    import triton
    import triton.language as tl

CHUNK_BYTES = 16 * 2**20  # fp32 logits of one row chunk in the PyTorch path


class Tiles(NamedTuple):
    """Split-kernel tiles (rows, classes, model dim; tl.dot needs >= 16) and launch options."""
    block_m: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


DECODE_ROWS = 64  # up to this many rows (a decode step) take the decode tiles
CUDA_DECODE_TILES = Tiles(16, 128, 64, num_warps=4, num_stages=4)  # bandwidth-bound: deep W pipeline
CUDA_TILES = Tiles(128, 128, 64, num_warps=8, num_stages=3)  # two warpgroups of m64 wgmma on Hopper
NON_HOPPER_BLOCK_V = 64  # everywhere but sm_90 the 128x128 tile and the online max/argmax spill
# (mma.sync on sm_80/86/89/120: 255 registers; sm_100: the tile loaded back from tensor memory;
# ahead-of-time compile, tests/test_aot_compile.py); half the classes fit, and their 16-bit
# stages (48 KB) fit the ~99 KB per block of sm_86/89/120
BLACKWELL_DC_MAJOR = 10  # sm_100 (B200): a 128-row tile, loaded back from tensor memory with the online
BLACKWELL_DC_BLOCK_M = 64  # max/argmax, spills 16 B at a vocabulary no multiple of 16; 64 rows: no spill
FP32_BLOCK_D = 32  # fp32 operands: half the model-dim tile, the same shared memory per stage
INTERPRET_DECODE_TILES = Tiles(16, 16, 16, num_warps=1, num_stages=1)  # the interpreter is slow:
INTERPRET_TILES = Tiles(32, 16, 16, num_warps=1, num_stages=1)  # small tiles, many splits on test shapes
PROGRAMS_PER_SM = 2  # split the vocabulary until the grid holds this many programs per SM
INTERPRET_SM_COUNT = 8  # the interpreter's stand-in for the SM count
COMBINE_BLOCK_S, COMBINE_BLOCK_M, COMBINE_WARPS = 64, 32, 4  # combine tile: splits x rows


class SplitPlan(NamedTuple):
    """Grid of the split kernel: n_row_blocks x n_splits; every split but the last holds
    split_v classes (a multiple of tiles.block_v)."""
    tiles: Tiles
    n_row_blocks: int
    split_v: int
    n_splits: int


class ExitStats(NamedTuple):
    """Per-row statistics of one exit: conf, lse, nll, margin fp32 (N,); pred int64 (N,).
    ``nll`` is None without targets and 0 where the target is ignore_index; ``margin`` is None
    unless asked for (want_margin), 0 where the top logit occurs twice."""
    conf: torch.Tensor
    pred: torch.Tensor
    lse: torch.Tensor
    nll: Optional[torch.Tensor]
    margin: Optional[torch.Tensor] = None


# ----------------------------------------------------------------------------- validation
def _check_inputs(hidden, weight, targets) -> None:
    """Shapes, dtypes and devices; the targets' range is checked inside the op (it reads them)."""
    check_matrix("hidden", hidden)
    check_matrix("weight", weight, n_cols=hidden.shape[1])
    check_same("weight", weight, hidden, "hidden")
    if targets is not None:
        check_targets(targets, hidden.shape[0], hidden, "hidden")


# ----------------------------------------------------------------------------- PyTorch path
def _second_largest(logits: torch.Tensor) -> torch.Tensor:
    """(c, V) -> (c,): the second of the sorted row, = the max where it occurs twice; -inf for V = 1."""
    if logits.shape[1] == 1:
        return torch.full_like(logits[:, 0], float("-inf"))
    return logits.topk(2, 1).values[:, 1]


def _torch_exit_confidence(hidden, weight, targets, ignore_index, want_margin):
    n, n_classes = hidden.shape[0], weight.shape[0]
    weight = weight.to(gemm.mm_dtype(weight))  # once, not per chunk (CPU low precision: fp32)
    step = max(1, min(n, CHUNK_BYTES // (4 * n_classes)))
    conf, lse = (torch.empty(n, device=hidden.device) for _ in range(2))
    pred = torch.empty(n, dtype=torch.int64, device=hidden.device)
    nll = torch.empty(n, device=hidden.device) if targets is not None else None
    margin = torch.empty(n, device=hidden.device) if want_margin else None
    for s in range(0, n, step):
        e = min(n, s + step)
        logits = gemm.linear_fp32(hidden[s:e], weight).float()  # (c, V) fp32
        row_max, pred[s:e] = logits.max(1)
        if want_margin:
            second = _second_largest(logits)  # before the in-place exp below
        if targets is not None:
            valid = targets[s:e] != ignore_index
            x_t = logits.gather(1, torch.where(valid, targets[s:e], 0).long().unsqueeze(1)).squeeze(1)
        sum_exp = logits.sub_(row_max.unsqueeze(1)).exp_().sum(1)  # logits now hold exp(x - max)
        lse[s:e] = row_max + sum_exp.log()
        conf[s:e] = sum_exp.reciprocal()  # exp(max - lse)
        if want_margin:  # p1 - p2 = (1 - exp(x2 - x1)) / sum_exp: exactly 0 on a tie at the top
            margin[s:e] = conf[s:e] * (1.0 - (second - row_max).exp())
        if targets is not None:
            nll[s:e] = torch.where(valid, lse[s:e] - x_t, 0.0)
    return ExitStats(conf, pred, lse, nll, margin)


# ----------------------------------------------------------------------------- Triton path
if HAS_TRITON:
    @triton.jit
    def _merged_second(a_max, a_second, b_max, b_second):
        """Second largest of the union of two multisets with top two (a_max >= a_second) and
        (b_max >= b_second): the smaller top or the larger second, so equal tops give the top."""
        return tl.maximum(tl.minimum(a_max, b_max), tl.maximum(a_second, b_second))

    @triton.jit
    def _split_partials_kernel(
        H_ptr,
        H_row_stride,
        W_ptr,
        W_row_stride,
        T_ptr,
        Max_ptr,
        Arg_ptr,
        Sum_ptr,
        Second_ptr,
        Tgt_ptr,
        n_rows,
        n_classes,
        d_model,
        split_v,
        HAS_TARGETS: tl.constexpr,
        HAS_MARGIN: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Partials of one row block over one vocabulary split [split * split_v, + split_v):
        row max, its first index, sum of exp(x - max), the second-largest logit (HAS_MARGIN; the
        max again where it occurs twice) and the target logit (0 where the target lies outside
        the split). Outputs are [n_splits, n_rows]."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        split = tl.program_id(1)
        v_start = split * split_v
        v_end = tl.minimum(v_start + split_v, n_classes)
        ds = tl.arange(0, BLOCK_D)
        h_ptrs = H_ptr + rows64[:, None] * H_row_stride + ds[None, :]
        run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        run_sum = tl.zeros((BLOCK_M,), tl.float32)
        best = tl.zeros((BLOCK_M,), tl.int64)
        run_second = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        tgt_logit = tl.zeros((BLOCK_M,), tl.float32)
        if HAS_TARGETS:
            tgt = tl.load(T_ptr + rows64, mask=row_ok, other=-1).to(tl.int64)
        for v0 in range(v_start, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < v_end
            cols64 = cols.to(tl.int64)
            w_ptrs = W_ptr + cols64[:, None] * W_row_stride + ds[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
            for d0 in range(0, d_model, BLOCK_D):
                d_ok = d0 + ds < d_model
                h = tl.load(h_ptrs + d0, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                w = tl.load(w_ptrs + d0, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
            acc = tl.where(col_ok[None, :], acc, float("-inf"))
            tile_max = tl.max(acc, axis=1)
            # tie_break_left: the first index on GPUs too (the fast tie-break leaves it unspecified)
            tile_arg = tl.argmax(acc, axis=1, tie_break_left=True).to(tl.int64) + v0
            best = tl.where(tile_max > run_max, tile_arg, best)  # strict: the first maximum wins
            if HAS_MARGIN:  # the largest logit below the max, or the max itself where it occurs twice
                below = tl.max(tl.where(acc < tile_max[:, None], acc, float("-inf")), axis=1)
                n_top = tl.sum((acc == tile_max[:, None]).to(tl.int32), axis=1)
                tile_second = tl.where(n_top > 1, tile_max, below)
                run_second = _merged_second(run_max, run_second, tile_max, tile_second)
            new_max = tl.maximum(run_max, tile_max)
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(acc - new_max[:, None]), axis=1)
            run_max = new_max
            if HAS_TARGETS:  # tile-local columns vs tgt - v0: comparing cols64 per element held ~64 more
                # registers on sm_90 (255 at the odd shape, tests/aot_report.py), the margin's then spilled
                tgt_logit += tl.sum(tl.where(tl.arange(0, BLOCK_V)[None, :] == (tgt - v0)[:, None], acc, 0.0), axis=1)
        out = split.to(tl.int64) * n_rows + rows64
        tl.store(Max_ptr + out, run_max, mask=row_ok)
        tl.store(Arg_ptr + out, best, mask=row_ok)
        tl.store(Sum_ptr + out, run_sum, mask=row_ok)
        if HAS_MARGIN:
            tl.store(Second_ptr + out, run_second, mask=row_ok)
        if HAS_TARGETS:
            tl.store(Tgt_ptr + out, tgt_logit, mask=row_ok)

    @triton.jit
    def _combine_splits_kernel(
        Max_ptr,
        Arg_ptr,
        Sum_ptr,
        Second_ptr,
        Tgt_ptr,
        T_ptr,
        Conf_ptr,
        Pred_ptr,
        Lse_ptr,
        Margin_ptr,
        Nll_ptr,
        n_rows,
        n_splits,
        ignore_index,
        HAS_TARGETS: tl.constexpr,
        HAS_MARGIN: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """Merge the [n_splits, n_rows] partials, BLOCK_S splits at a time in vocabulary order:
        global max, the argmax of the first split reaching it, sum_s sum_s * exp(max_s - max),
        the second-largest logit (HAS_MARGIN: the largest of the other splits' maxima and every
        split's second) and the target logit (only its split's partial is nonzero)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        rows64 = tl.minimum(rows, n_rows - 1).to(tl.int64)  # padded rows read the last row, never stored
        splits = tl.arange(0, BLOCK_S)
        run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        run_sum = tl.zeros((BLOCK_M,), tl.float32)
        best = tl.zeros((BLOCK_M,), tl.int64)
        run_second = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        tgt_logit = tl.zeros((BLOCK_M,), tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            s_ok = (s0 + splits < n_splits)[:, None]
            offs = (s0 + splits).to(tl.int64)[:, None] * n_rows + rows64[None, :]  # (BLOCK_S, BLOCK_M)
            m = tl.load(Max_ptr + offs, mask=s_ok, other=float("-inf"))
            chunk_max = tl.max(m, axis=0)
            first = tl.argmax(m, axis=0, tie_break_left=True)  # ties: the smallest split
            arg = tl.load(Arg_ptr + offs, mask=s_ok & (splits[:, None] == first[None, :]), other=0)
            best = tl.where(chunk_max > run_max, tl.sum(arg, axis=0), best)  # strict: earlier chunks win
            if HAS_MARGIN:  # a split reaching the max after the first one makes the second the max: a tie
                others = tl.max(tl.where(splits[:, None] == first[None, :], float("-inf"), m), axis=0)
                second = tl.load(Second_ptr + offs, mask=s_ok, other=float("-inf"))
                run_second = _merged_second(run_max, run_second, chunk_max, tl.maximum(others, tl.max(second, axis=0)))
            new_max = tl.maximum(run_max, chunk_max)
            s_sum = tl.load(Sum_ptr + offs, mask=s_ok, other=0.0)
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(s_sum * tl.exp(m - new_max[None, :]), axis=0)
            run_max = new_max
            if HAS_TARGETS:
                tgt_logit += tl.sum(tl.load(Tgt_ptr + offs, mask=s_ok, other=0.0), axis=0)
        lse = run_max + tl.log(run_sum)
        conf = 1.0 / run_sum  # exp(max - lse)
        tl.store(Conf_ptr + rows64, conf, mask=row_ok)
        tl.store(Pred_ptr + rows64, best, mask=row_ok)
        tl.store(Lse_ptr + rows64, lse, mask=row_ok)
        if HAS_MARGIN:  # p1 - p2 = (1 - exp(x2 - x1)) / sum_exp: exactly 0 on a tie at the top
            tl.store(Margin_ptr + rows64, conf * (1.0 - tl.exp(run_second - run_max)), mask=row_ok)
        if HAS_TARGETS:
            tgt = tl.load(T_ptr + rows64)
            tl.store(Nll_ptr + rows64, tl.where(tgt == ignore_index, 0.0, lse - tgt_logit), mask=row_ok)


def _tiles(n: int, dtype: torch.dtype, device: torch.device) -> Tiles:
    """Tiles of the split kernel for n rows of ``dtype`` operands on ``device``: per GPU
    generation, Hopper (sm_90) takes 128x128 tiles, sm_100 64x64, every other one 128x64
    (backend.is_hopper: sm_100 and sm_120 are no Hopper)."""
    if interpreting():
        return INTERPRET_DECODE_TILES if n <= DECODE_ROWS else INTERPRET_TILES
    if n <= DECODE_ROWS:
        tiles = CUDA_DECODE_TILES
    elif is_hopper(cuda_capability(device)):
        tiles = CUDA_TILES
    else:
        tiles = CUDA_TILES._replace(block_v=NON_HOPPER_BLOCK_V)
        if cuda_capability(device)[0] == BLACKWELL_DC_MAJOR:
            tiles = tiles._replace(block_m=BLACKWELL_DC_BLOCK_M)
    return tiles._replace(block_d=FP32_BLOCK_D) if dtype == torch.float32 else tiles


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    return INTERPRET_SM_COUNT if interpreting() else _cuda_sm_count(device.index)  # a tensor's device has an index


def _split_plan(n: int, n_classes: int, dtype: torch.dtype, device: torch.device) -> SplitPlan:
    """Row blocks x vocabulary splits: enough splits that the grid holds PROGRAMS_PER_SM
    programs per SM (a decode step's one or few row blocks fill the GPU), never an empty split.
    Splits add no reads of W (each reads its own slice), only [n_splits, N] partials."""
    tiles = _tiles(n, dtype, device)
    n_row_blocks = triton.cdiv(n, tiles.block_m)
    v_tiles = triton.cdiv(n_classes, tiles.block_v)
    wanted = min(v_tiles, triton.cdiv(PROGRAMS_PER_SM * _sm_count(device), n_row_blocks))
    split_v = triton.cdiv(v_tiles, wanted) * tiles.block_v
    return SplitPlan(tiles, n_row_blocks, split_v, triton.cdiv(n_classes, split_v))


def _triton_exit_confidence(hidden, weight, targets, ignore_index, want_margin):
    mm_dtype = gemm.mm_dtype(weight)  # on CUDA the input dtype; the interpreter's dot needs fp32
    hidden, weight = hidden.to(mm_dtype).contiguous(), weight.to(mm_dtype).contiguous()
    (n, d), n_classes, device = hidden.shape, weight.shape[0], hidden.device
    plan = _split_plan(n, n_classes, mm_dtype, device)
    has_targets = targets is not None
    part_max, part_sum = (torch.empty(plan.n_splits, n, device=device) for _ in range(2))  # (S, N)
    part_arg = torch.empty(plan.n_splits, n, dtype=torch.int64, device=device)
    part_tgt = torch.empty(plan.n_splits, n, device=device) if has_targets else part_sum  # dummy without targets
    part_second = torch.empty(plan.n_splits, n, device=device) if want_margin else part_sum  # dummy without margin
    conf, lse = (torch.empty(n, device=device) for _ in range(2))
    pred = torch.empty(n, dtype=torch.int64, device=device)
    nll = torch.empty(n, device=device) if has_targets else None
    margin = torch.empty(n, device=device) if want_margin else None
    tgt = targets.contiguous() if has_targets else pred  # dummy pointer when HAS_TARGETS=False
    t = plan.tiles
    with device_guard(hidden):
        _split_partials_kernel[(plan.n_row_blocks, plan.n_splits)](
            hidden, hidden.stride(0), weight, weight.stride(0), tgt,
            part_max, part_arg, part_sum, part_second, part_tgt,
            n, n_classes, d, plan.split_v,
            HAS_TARGETS=has_targets, HAS_MARGIN=want_margin, PRECISION=dot_precision(hidden.dtype),
            BLOCK_M=t.block_m, BLOCK_V=t.block_v, BLOCK_D=t.block_d,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )
        _combine_splits_kernel[(triton.cdiv(n, COMBINE_BLOCK_M),)](
            part_max, part_arg, part_sum, part_second, part_tgt, tgt,
            conf, pred, lse, margin if want_margin else conf, nll if has_targets else conf,
            n, plan.n_splits, ignore_index,
            HAS_TARGETS=has_targets, HAS_MARGIN=want_margin,
            BLOCK_S=COMBINE_BLOCK_S, BLOCK_M=COMBINE_BLOCK_M, num_warps=COMBINE_WARPS,
        )
    return ExitStats(conf, pred, lse, nll, margin)


# ----------------------------------------------------------------------------- the registered op
@torch.library.custom_op("fastexit::exit_confidence", mutates_args=())
def _exit_confidence_op(hidden: torch.Tensor, weight: torch.Tensor, targets: Optional[torch.Tensor],
                        ignore_index: int, want_margin: bool, backend: str
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(conf, pred, lse, nll or (0,), margin or (0,)) of checked inputs; backend 'triton' or 'torch'."""
    if targets is not None:
        check_target_range(targets, weight.shape[0], ignore_index)  # reads values: inside the op
    run = _triton_exit_confidence if backend == "triton" else _torch_exit_confidence
    with torch.autocast(hidden.device.type, enabled=False):
        stats = run(hidden, weight, targets, ignore_index, want_margin)
    empty = hidden.new_empty(0, dtype=torch.float32)
    return (stats.conf, stats.pred, stats.lse, empty if stats.nll is None else stats.nll,
            empty.clone() if stats.margin is None else stats.margin)  # outputs never alias


@_exit_confidence_op.register_fake
def _exit_confidence_op_fake(hidden, weight, targets, ignore_index, want_margin, backend):
    n = hidden.shape[0]
    rows = hidden.new_empty(n, dtype=torch.float32)
    return (rows, hidden.new_empty(n, dtype=torch.int64), torch.empty_like(rows),
            torch.empty_like(rows) if targets is not None else rows.new_empty(0),
            torch.empty_like(rows) if want_margin else rows.new_empty(0))


# ----------------------------------------------------------------------------- public
@torch.no_grad()
def exit_confidence(hidden: torch.Tensor, weight: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                    ignore_index: int = -100, want_margin: bool = False, backend: str = "auto") -> ExitStats:
    """Confidence, prediction, logsumexp, NLL and margin of every row of ``hidden @ weight.T``.

    hidden: [N, d] float; weight: [V, d] same dtype; targets: optional [N] int64 in [0, V) or
    ignore_index. Returns ExitStats with conf = max softmax probability = exp(max - lse),
    pred = argmax (first on ties), lse = logsumexp, nll = lse - logit[target] (0 where
    ignored), and with ``want_margin`` margin = top-1 minus top-2 softmax probability (0 where
    the top logit occurs twice, conf for V = 1), else None; statistics are computed in fp32.
    Never holds the logits of all N rows at once. Under ``torch.autocast`` hidden and weight
    are first cast to its dtype, as ``F.linear`` would be. backend: 'auto' | 'triton' |
    'triton_gemm' (the same kernels as 'triton' here) | 'torch'.
    Bad input (kernels/checks.py): TypeError for a wrong dtype, ValueError for a wrong shape,
    an empty batch, a device mismatch or a target out of range (on CUDA an async device assert).
    """
    hidden, weight = autocast_inputs(hidden, weight)
    _check_inputs(hidden, weight, targets)
    chosen = "torch" if resolve_backend(backend, hidden, weight) == "torch" else "triton"
    conf, pred, lse, nll, margin = _exit_confidence_op(hidden, weight, targets, int(ignore_index), bool(want_margin),
                                                      chosen)
    return ExitStats(conf, pred, lse, nll if targets is not None else None, margin if want_margin else None)
