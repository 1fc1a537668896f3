"""EarlyExitTransformer: a pre-norm causal decoder whose every layer can predict the next token.

Each layer i has its own exit norm; all exits share one LM head (optionally tied to the token
embedding), so the exit logits of layer i are ``lm_head(exit_norms[i-1](h_i))``.
"""
import math
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .kernels import gemm, replace_rows, select_rows

__all__ = ["Attention", "Block", "ConfidenceHeads", "EarlyExitTransformer", "KVCache", "ModelConfig", "QueryGrid",
           "add_confidence_heads", "confidence_head_flops"]


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
    outputs are dropped.
    """
    slot: torch.Tensor
    n_slots: int
    mask: Optional[torch.Tensor]


class KVCache:
    """Keys and values of one layer for decoding, each (B, H, T_max, hd)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

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

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:  # (B, T, d)
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), mask))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))

    def kv(self, x: torch.Tensor):
        """Keys and values (B, H, t, hd) this block computes from the residual states x (B, t, d)."""
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


def confidence_head_flops(d_model: int, exits_reached: float = 1.0) -> float:
    """Forward FLOPs of learned confidence per token: 2 * d_model per exit the token reaches
    (the exit it leaves at and every exit before it; the sigmoid and bias are not counted).
    ``compute_cost`` (mean layers run / n_layers) leaves them out; add them to a FLOP count."""
    return 2 * d_model * exits_reached


def add_confidence_heads(model: nn.Module, layers: Sequence[int]) -> None:
    """Give ``model`` (``EarlyExitTransformer`` or ``HFEarlyExit``) a confidence head at each
    of ``layers`` (1-indexed) that lacks one, as ``model.confidence_heads``."""
    layers = list(layers)
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= model.n_layers for i in layers):
        raise ValueError(f"layers must be a non-empty list of ints in 1..{model.n_layers}, got {layers!r}")
    if not hasattr(model, "confidence_heads"):
        model.confidence_heads = ConfidenceHeads()
    model.confidence_heads.add(layers, model.lm_head.weight)


def check_token_ids(idx, max_seq_len: int) -> None:
    """idx must be a non-empty int64 (B, T) tensor with T <= max_seq_len."""
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.dim() != 2:
        got = f"{idx.dtype} tensor of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"idx must be an int64 tensor (B, T), got {got}")
    if idx.numel() == 0:
        raise ValueError(f"idx must be non-empty, got shape {tuple(idx.shape)}")
    if idx.shape[1] > max_seq_len:
        raise ValueError(f"idx has {idx.shape[1]} positions, more than max_seq_len={max_seq_len}")


class EarlyExitTransformer(nn.Module):
    """Causal LM with an exit (norm + shared head) after every block.

    ``forward(idx)`` returns the final layer's logits (B, T, V), so the model drops into code
    that expects a plain LM; ``exit_hidden_states`` gives the exit-normed states the fused
    loss and the routing paths consume.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.exit_norms = nn.ModuleList(nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps) for _ in range(cfg.n_layers))
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by depth so the residual stream stays O(1).
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "fc_out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count, shared tensors counted once; without position embeddings by default
        (and without the token embedding too when the head is untied, as it does no compute)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.pos_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.tok_emb.weight.numel()
        return n

    def check_idx(self, idx: torch.Tensor) -> None:
        check_token_ids(idx, self.cfg.max_seq_len)

    def add_confidence_heads(self, layers: Sequence[int]) -> None:
        """``confidence_heads`` at each of ``layers`` that lacks one (``ConfidenceHeads``); a
        model without them has neither the attribute nor its state-dict keys."""
        add_confidence_heads(self, layers)

    def embed(self, idx: torch.Tensor, start_pos: int = 0,
              positions: Optional[torch.Tensor] = None) -> torch.Tensor:  # (B, T) -> (B, T, d)
        """Token + learned position embeddings; positions (B, T) int64 overrides start_pos."""
        pos = positions if positions is not None else torch.arange(start_pos, start_pos + idx.shape[1],
                                                                   device=idx.device)
        return self.emb_dropout(self.tok_emb(idx) + self.pos_emb(pos))

    def exit_hidden_states(self, idx: torch.Tensor, layers: Sequence[int],
                           drops: Optional[Sequence[Sequence[bool]]] = None, *,
                           attention_mask: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Exit-normed hidden states (B, T, d) after each of ``layers`` (1-indexed), in the
        order given; no block deeper than ``max(layers)`` runs.

        ``drops[l][b]`` (layer dropout, ``LayerDropout.draw``): sequence b skips block l + 1,
        its residual stream passing through unchanged. The block then runs on the other rows
        only, compacted into a smaller batch, so dropped rows cost it no work.
        ``attention_mask`` (B, T), True/1 on real tokens (``padding_layout``): pads are never
        attended to and positions count from each row's first real token.
        """
        self.check_idx(idx)
        layers = list(layers)
        if not layers or any(not isinstance(i, int) or not 1 <= i <= self.n_layers for i in layers):
            raise ValueError(f"layers must be a non-empty list of ints in 1..{self.n_layers}, got {layers!r}")
        self._check_drops(drops, idx.shape[0])
        positions, mask = padding_layout(attention_mask, idx) if attention_mask is not None else (None, None)
        x, states = self.embed(idx, positions=positions), {}
        for i, block in enumerate(self.blocks[:max(layers)], start=1):
            x = block(x, mask) if drops is None else self._run_kept_rows(block, x, drops[i - 1], mask)
            if i in layers:
                states[i] = self.exit_norms[i - 1](x)
        return [states[i] for i in layers]

    @staticmethod
    def _run_kept_rows(block: nn.Module, x: torch.Tensor, dropped: Sequence[bool],
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        kept = [b for b, drop in enumerate(dropped) if not drop]
        if len(kept) == x.shape[0]:
            return block(x, mask)
        # No kept row still runs the block on zero rows: under FSDP2 every rank must take part
        # in the block's all-gather, whatever its own draws (and the gradient is a true zero).
        rows = torch.tensor(kept, dtype=torch.long).to(x.device, non_blocking=True)  # (k,)
        return replace_rows(x, rows, block(select_rows(x, rows), None if mask is None else mask[rows]))

    def _check_drops(self, drops, batch: int) -> None:
        if drops is None:
            return
        if len(drops) != self.n_layers or any(len(row) != batch for row in drops):
            raise ValueError(f"drops must be {self.n_layers} rows (one per block) of {batch} bools "
                             f"(one per sequence), got {len(drops)} rows")

    def exit_logits(self, idx: torch.Tensor, layers: Sequence[int]) -> List[torch.Tensor]:
        """Full logits (B, T, V) of each requested exit. Holds [B*T, V] per layer: use it for
        small batches and tests; training and evaluation go through the fused kernels."""
        return [self.lm_head(h) for h in self.exit_hidden_states(idx, layers)]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        return self.exit_logits(idx, [self.n_layers])[0]

    def new_kv_caches(self, batch: int, max_len: int, layers: Sequence[int], zeroed: bool = False) -> List[KVCache]:
        """KV caches (B, H, max_len, hd) for the given blocks (1-indexed); ``zeroed`` where masked
        slots may be read before they are written (a masked NaN key still poisons attention)."""
        cfg, param = self.cfg, self.lm_head.weight
        shape, new = (batch, cfg.n_heads, max_len, cfg.head_dim), param.new_zeros if zeroed else param.new_empty
        return [KVCache(new(shape), new(shape)) for _ in layers]

    def generate(self, idx: torch.Tensor, max_new_tokens: int, routing_threshold: Optional[float] = None,
                 exit_layer: Optional[int] = None, **kwargs):
        """Early-exit decoding with a KV cache, rows exiting independently, or lossless
        self-speculative decoding with ``speculative=k``; returns (tokens (B, T0 +
        max_new_tokens), exit_layers (B, max_new_tokens)). Options and semantics:
        ``fastexit.generate.generate``."""
        from .generate import generate  # generation builds on the model, not the other way round
        return generate(self, idx, max_new_tokens, routing_threshold, exit_layer, **kwargs)
