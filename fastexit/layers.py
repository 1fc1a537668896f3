"""The parts every early-exit model is built from: blocks, their caches and attention layouts.

``Block`` is the native pre-norm block; a transformers decoder layer gets the same interface
from ``fastexit.hf``'s adapters. The block interface routing and generation call:

- ``block(x, mask, positions=None)``: the block on (B, T, d) residual states (mask:
  ``padding_layout``'s, or None for plain causal attention); positions (B, T) int64: each
  token's own slot where it is not its column (a routed block's gathered tokens), for blocks
  whose attention is positional (rotary); the native block adds positions at the embedding;
- ``kv(x, positions=None)``: keys/values (B, H, t, hd) the block computes from residual states x;
- ``forward_rows(xh, k, v, grid)``: the block on n rows only (their q/out projections and
  MLP), their queries placed in a padded ``QueryGrid`` over the keys of every position;
- ``forward_cached(x, cache, start, mask)``: a prefill, one decode step, or a verify pass over
  drafted tokens on a ``KVCache``;
- ``new_cache(batch, max_len, zeroed)``: an empty ``KVCache`` for this block.
"""
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .kernels import gemm

__all__ = ["Attention", "Block", "ConfidenceHeads", "KVCache", "Linear", "MLP", "QueryGrid", "check_token_ids",
           "pack_left", "padding_layout"]


class Linear(nn.Linear):
    """nn.Linear without bias whose fp32 CPU GEMMs (forward and backward) run through oneDNN
    (kernels/gemm.py: 2-3x MKL's sgemm on AMD CPUs); on CUDA it is plain F.linear."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm.linear(x, self.weight)


class QueryGrid(NamedTuple):
    """Where n query rows sit in a padded (B, S) grid of attention queries.

    slot: (n,) int64 flat positions in the (B * S) grid; n_slots: S; mask: (B, 1, S, Tk) bool
    keys each query may attend to, or None for all. Padded slots hold zero queries whose
    outputs are dropped. positions: (n,) int64 slot of each query for positional (rotary)
    attention, or None: the last key its mask lets it see (keys at their own columns).
    """
    slot: torch.Tensor
    n_slots: int
    mask: Optional[torch.Tensor]
    positions: Optional[torch.Tensor] = None


def pack_left(rows: torch.Tensor, B: int, T: int):
    """Flat ascending positions rows (n,) of a (B, T) batch packed left per batch row, in
    order, into a (B, S) grid, S = the largest per-row count (one host sync): (slot (n,)
    int64 in the flat (B*S) grid, S)."""
    b = rows // T
    counts = torch.zeros(B, dtype=torch.int64, device=rows.device).index_add_(0, b, torch.ones_like(rows))
    # (B,): bincount would read its max on the host (a sync on CUDA), on top of S's below
    n_slots = int(counts.max())
    rank = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[b]
    return b * n_slots + rank, n_slots


class KVCache:
    """Keys and values of one layer for decoding, each (B, H, T_max, hd). ``written``: None, or
    for a routed block's cache (B, T_max) bool, the slots that hold keys (the tokens the block
    processed; the others are never attended to)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        self.written: Optional[torch.Tensor] = None

    def write(self, start, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, H, t, hd) at slots start..start+t-1; start: an int, or (B,) int64 slots
        of each row (rows at different lengths, as in speculative decoding)."""
        if isinstance(start, int):
            end = start + k.shape[2]
            self.k[:, :, start:end], self.v[:, :, start:end] = k, v
            return
        slots = start[:, None] + torch.arange(k.shape[2], device=k.device)  # (B, t)
        index = slots[:, None, :, None].expand_as(k)
        self.k.scatter_(2, index, k), self.v.scatter_(2, index, v)

    def put(self, rows: torch.Tensor, slots, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (..., H, hd) at (rows, slots), int64 index tensors of k's leading shape
        (slots: or an int, one slot for rows (n,) and k, v (n, H, hd)), as given: keys already
        at their own positions (``Block.kv(x, positions)``)."""
        if isinstance(slots, int):
            self.k[:, :, slots].index_copy_(0, rows, k), self.v[:, :, slots].index_copy_(0, rows, v)
            return
        self.k[rows, :, slots], self.v[rows, :, slots] = k, v

    def upto(self, end: int, rows: Optional[torch.Tensor] = None):
        """Keys and values of slots 0..end-1: (B, H, end, hd), or (n, ...) of the given rows."""
        k, v = self.k[:, :, :end], self.v[:, :, :end]
        return (k, v) if rows is None else (k.index_select(0, rows), v.index_select(0, rows))


def padding_layout(attention_mask: torch.Tensor, idx: torch.Tensor):
    """Positions (B, T) int64 and the causal mask (B, 1, T, T) bool of a padded batch.

    attention_mask: (B, T) bool or 0/1 ints, True on real tokens (left or right padding).
    Positions count from each row's first real token (as transformers' generate counts them);
    no query sees a pad, but a pad sees itself, so that no query row is fully masked (its
    state would be NaN; pads are never scored).
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != idx.shape \
            or attention_mask.dtype.is_floating_point or attention_mask.device != idx.device:
        raise ValueError(f"attention_mask must be a bool or 0/1 int tensor of idx's shape {tuple(idx.shape)} on "
                         f"{idx.device}, got {getattr(attention_mask, 'dtype', type(attention_mask).__name__)} "
                         f"of shape {tuple(getattr(attention_mask, 'shape', ()))}")
    real = attention_mask.bool()
    positions = (real.cumsum(1) - 1).clamp(min=0)
    T = idx.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    mask = causal & (real[:, None, :] | torch.eye(T, dtype=torch.bool, device=idx.device))
    return positions, mask.unsqueeze(1)



class Attention(nn.Module):
    """Causal multi-head self-attention (SDPA). Q and KV are separate projections so that
    routing can compute queries for hard tokens only and keys/values for every position."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.d_model = cfg.n_heads, cfg.d_model
        self.q_proj = Linear(cfg.d_model, cfg.d_model)
        self.kv_proj = Linear(cfg.d_model, 2 * cfg.d_model)
        self.out_proj = Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        return x.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, H, T, hd); B may be 0

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = y.shape
        return y.transpose(1, 2).reshape(B, T, self.d_model)  # (B, T, d)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:  # (B, T, d)
        """Causal self-attention; mask (B, 1, T, T) bool (``padding_layout``) replaces the
        causal rule for a padded batch."""
        p = self.dropout if self.training else 0.0
        return self.attend(x, *self.kv(x), mask=mask, is_causal=mask is None, dropout_p=p)

    def kv(self, a: torch.Tensor):
        """Keys and values (B, H, t, hd) of the normed states a (B, t, d)."""
        return [self.split_heads(t) for t in self.kv_proj(a).split(self.d_model, dim=-1)]

    def attend(self, a: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
               is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
        """Output (B, t, d) of queries from the normed states a (B, t, d) over k, v (B, H, Tk, hd)."""
        q = self.split_heads(self.q_proj(a))
        if q.shape[0] == 0:  # a block on zero rows (layer dropout): Flash SDPA rejects an empty batch;
            y = q + (k.sum() + v.sum())  # every weight stays in the graph (a zero gradient) all the same
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
        return self.out_proj(self.merge_heads(y))

    def attend_rows(self, a: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: QueryGrid) -> torch.Tensor:
        """Output (n, d) of the queries of n rows (normed states a (n, d)) placed in ``grid``
        over k, v (B, H, Tk, hd): only these rows pay for the q and out projections."""
        B, d = k.shape[0], self.d_model
        q = a.new_zeros(B * grid.n_slots, d).index_copy_(0, grid.slot, self.q_proj(a))  # (B*S, d)
        y = F.scaled_dot_product_attention(self.split_heads(q.view(B, grid.n_slots, d)), k, v, attn_mask=grid.mask)
        return self.out_proj(self.merge_heads(y).reshape(-1, d).index_select(0, grid.slot))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc_in = Linear(cfg.d_model, cfg.d_ff)
        self.fc_out = Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:  # (B, T, d)
        """positions: unused (learned positions are added at the embedding)."""
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), mask))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))

    def kv(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None):
        """Keys and values (B, H, t, hd) this block computes from the residual states x (B, t, d)
        (positions unused, as in ``forward``)."""
        return self.attn.kv(self.attn_norm(x))

    def forward_rows(self, xh: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: QueryGrid) -> torch.Tensor:
        """The block on n rows only: states xh (n, d) -> (n, d), their queries placed in
        ``grid`` over keys/values k, v (B, H, Tk, hd) of every position (no dropout)."""
        xh = xh + self.attn.attend_rows(self.attn_norm(xh), k, v, grid)
        return xh + self.mlp(self.mlp_norm(xh))

    def forward_cached(self, x: torch.Tensor, cache: KVCache, start,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The block on x (B, t, d) at cache slots start..start+t-1 (a prefill from 0, one
        decode step, or a verify pass over drafted tokens), writing their keys/values into
        ``cache`` first. start: an int, or (B,) int64 per-row slots, which need a mask.
        mask: (B, 1, t, max(start)+t) bool keys each query sees (padded prompts, per-row
        slots); None = plain causal attention. No dropout."""
        if mask is None and not isinstance(start, int):
            raise ValueError("forward_cached: per-row start slots need a mask (rows see different keys)")
        a, t = self.attn_norm(x), x.shape[1]
        cache.write(start, *self.attn.kv(a))
        end = start + t if isinstance(start, int) else mask.shape[-1]  # the mask knows: no host sync
        k, v = cache.upto(end)
        if mask is None and t > 1 and start > 0:  # SDPA's is_causal aligns top-left: query j would miss start keys
            mask = torch.ones(t, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
        x = x + self.attn.attend(a, k, v, mask, is_causal=mask is None and t > 1)
        return x + self.mlp(self.mlp_norm(x))

    def new_cache(self, batch: int, max_len: int, zeroed: bool = False) -> KVCache:
        """An empty cache (batch, H, max_len, hd) on the block's device and dtype; ``zeroed``
        where masked slots may be read before they are written (a masked NaN key still poisons
        attention)."""
        attn, param = self.attn, self.attn.q_proj.weight
        shape = (batch, attn.n_heads, max_len, attn.d_model // attn.n_heads)
        new = param.new_zeros if zeroed else param.new_empty
        return KVCache(new(shape), new(shape))


class ConfidenceHeads(nn.ModuleDict):
    """Learned exit confidence (docs/design.md §6): one linear map per exit layer, keyed by
    str(layer), of the exit-normed state to one logit; the confidence is its sigmoid.
    Zero-initialised (confidence 0.5 everywhere until trained), so adding heads draws no random
    numbers and leaves the rest of a seeded run unchanged."""

    def add(self, layers: Sequence[int], like: torch.Tensor) -> None:
        """A head (d -> 1, with bias) for each of ``layers`` that has none, on like's device and dtype."""
        for layer in layers:
            if str(layer) not in self:
                head = nn.utils.skip_init(nn.Linear, like.shape[1], 1, device=like.device, dtype=like.dtype)
                with torch.no_grad():
                    head.weight.zero_()
                    head.bias.zero_()
                self[str(layer)] = head

    def logit(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Confidence logits (...) fp32 of exit-normed states h (..., d) at ``layer``."""
        return self[str(layer)](h).squeeze(-1).float()


def check_token_ids(idx, max_seq_len: int) -> None:
    """idx must be a non-empty int64 (B, T) tensor with T <= max_seq_len."""
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.dim() != 2:
        got = f"{idx.dtype} tensor of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"idx must be an int64 tensor (B, T), got {got}")
    if idx.numel() == 0:
        raise ValueError(f"idx must be non-empty, got shape {tuple(idx.shape)}")
    if idx.shape[1] > max_seq_len:
        raise ValueError(f"idx has {idx.shape[1]} positions, more than max_seq_len={max_seq_len}")
