"""Batched early-exit generation with a per-layer KV cache (docs/design.md §3, token by token).

Each new token is routed as in ``fastexit.routing``: after ``exit_layer`` a row whose max
softmax probability is >= ``routing_threshold`` emits from the exit layer; the hard rows are
compacted and alone run the deeper blocks' query, attention output, MLP and the final head,
while the deeper caches of easy rows are filled from their carried exit-layer state (state
propagation). The arithmetic is the model's own: ``Block.forward_cached`` for dense steps,
``Block.kv`` + ``Block.forward_rows`` for the hard rows.
"""
from typing import NamedTuple, Optional

import torch

from .config import UniversalConfig
from .kernels import compact_indices, exit_confidence, gather_rows, scatter_rows
from .model import QueryGrid
from .routing import resolve_routing


def _check_prompt(model, idx, max_new_tokens, prompt_mask) -> None:
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 2:
        raise ValueError(f"idx must be an int64 (B, T) prompt tensor, got "
                         f"{getattr(idx, 'dtype', type(idx).__name__)} of shape {tuple(getattr(idx, 'shape', ()))}")
    if idx.numel() == 0:
        raise ValueError(f"idx: empty prompt of shape {tuple(idx.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    limit = model.cfg.max_seq_len
    if idx.shape[1] > limit:
        raise ValueError(f"idx: prompt of {idx.shape[1]} tokens is longer than max_seq_len={limit}")
    if idx.shape[1] + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens={max_new_tokens} with a prompt of {idx.shape[1]} tokens "
                         f"exceeds max_seq_len={limit}")
    if prompt_mask is None:
        return
    if not isinstance(prompt_mask, torch.Tensor) or prompt_mask.dtype != torch.bool \
            or prompt_mask.shape != idx.shape or prompt_mask.device != idx.device:
        raise ValueError(f"prompt_mask must be a bool tensor of idx's shape {tuple(idx.shape)} on {idx.device}, "
                         f"got {getattr(prompt_mask, 'dtype', type(prompt_mask).__name__)} of shape "
                         f"{tuple(getattr(prompt_mask, 'shape', ()))}")
    if not (prompt_mask[:, -1].all() and (prompt_mask[:, 1:] >= prompt_mask[:, :-1]).all()):
        raise ValueError("prompt_mask: prompts must be left-padded (each row False... then True..., "
                         "ending with a real token)")


def _check_sampling(model, temperature, top_k) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k <= model.cfg.vocab_size):
        raise ValueError(f"top_k must be None or an int in [1, {model.cfg.vocab_size}], got {top_k!r}")


class _Prompt(NamedTuple):
    """Positions (B, T0) of the prompt tokens, prompt lengths (B,), and for left-padded
    prompts the prefill mask (B, 1, T0, T0) and the keys to attend per cache slot
    (B, T0 + max_new_tokens); both masks are None when no row is padded."""
    positions: torch.Tensor
    lengths: torch.Tensor
    prefill_mask: Optional[torch.Tensor]
    key_ok: Optional[torch.Tensor]


def _prompt_layout(idx, prompt_mask, max_new_tokens) -> _Prompt:
    B, T0 = idx.shape
    if prompt_mask is None or bool(prompt_mask.all()):
        positions = torch.arange(T0, device=idx.device).expand(B, T0)
        return _Prompt(positions, torch.full((B,), T0, device=idx.device), None, None)
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    causal = torch.ones(T0, T0, dtype=torch.bool, device=idx.device).tril()
    # a pad attends to itself only: no query row is fully masked (that would give NaN states)
    prefill = causal & (prompt_mask[:, None, :] | torch.eye(T0, dtype=torch.bool, device=idx.device))
    key_ok = torch.cat([prompt_mask, prompt_mask.new_ones(B, max_new_tokens)], dim=1)
    return _Prompt(positions, prompt_mask.sum(1), prefill.unsqueeze(1), key_ok)


def _decode_shallow(model, tok: torch.Tensor, caches, slot: int, positions, mask) -> torch.Tensor:
    """Token ids tok (B,) at cache slot ``slot`` (positions (B, 1) int64) through the first
    len(caches) blocks -> (B, d)."""
    x = model.embed(tok[:, None], positions=positions)  # (B, 1, d)
    for block, cache in zip(model.blocks, caches):
        x = block.forward_cached(x, cache, slot, mask)
    return x.squeeze(1)


def _decode_deeper(blocks, caches, x, hard_rows, pos: int, mask, backend) -> torch.Tensor:
    """Deeper blocks for one decode position: x (B, d) exit-layer states of all rows; returns
    the final states (n, d) of the hard rows. Every row's keys/values at ``pos`` are written
    from its current state (carried for easy rows); only hard rows run q/out/MLP, and their
    attention reads only their own rows of the cache (decode attention is memory-bound: the
    gathered copy costs less than reading every row's keys and values). mask: (B, 1, 1, pos+1)
    bool keys to attend for padded prompts, else None."""
    B = x.shape[0]
    if hard_rows.numel() == B:
        x = x.unsqueeze(1)  # (B, 1, d)
        for block, cache in zip(blocks, caches):
            x = block.forward_cached(x, cache, pos, mask)
        return x.squeeze(1)
    hard_mask = mask.index_select(0, hard_rows) if mask is not None else None  # (n, 1, 1, pos+1)
    grid = QueryGrid(torch.arange(hard_rows.numel(), device=x.device), 1, hard_mask)  # one query per cache row
    x = x.clone()  # refreshed in place with the hard rows' states below
    xh = gather_rows(x, hard_rows, backend=backend)  # (n, d)
    for i, (block, cache) in enumerate(zip(blocks, caches)):
        if i and hard_rows.numel():
            scatter_rows(x, hard_rows, xh, backend=backend)
        cache.write(pos, *block.kv(x.unsqueeze(1)))
        if hard_rows.numel():
            xh = block.forward_rows(xh, *cache.upto(pos + 1, hard_rows), grid)  # (n, H, pos+1, hd) keys
    return xh


def _next_tokens(model, h_exit, exit_stats, h_final, hard_rows, temperature, top_k, generator, backend):
    """Tokens (B,) from the exit layer for easy rows and the final layer for hard rows.

    h_exit: (B, d) exit-normed states; exit_stats: their ExitStats (None when routing is off
    and no confidence is wanted); h_final: (n, d) final-normed states of hard_rows (n,).
    """
    weight = model.lm_head.weight
    if temperature == 0:
        final_pred = exit_confidence(h_final, weight, backend=backend).pred if hard_rows.numel() else None
        if exit_stats is None:
            return final_pred
        return scatter_rows(exit_stats.pred.clone(), hard_rows, final_pred, backend=backend) \
            if final_pred is not None else exit_stats.pred
    h = scatter_rows(h_exit.clone(), hard_rows, h_final, backend=backend)  # (B, d)
    logits = model.lm_head(h).float() / temperature  # (B, V)
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


class _Decoder:
    """The state of one generate call: caches, output buffers and the routing rule."""

    def __init__(self, model, idx, max_new_tokens, routing_threshold, exit_layer, prompt: _Prompt, want_conf,
                 sampling, backend):
        (B, T0), self.model, self.prompt, self.backend = idx.shape, model, prompt, backend
        self.threshold, self.exit_layer, self.sampling = routing_threshold, exit_layer, sampling
        self.want_conf = routing_threshold > 0 or want_conf
        self.caches = model.new_kv_caches(B, T0 + max_new_tokens, range(1, model.n_layers + 1))
        self.tokens = torch.cat([idx, idx.new_empty(B, max_new_tokens)], dim=1)
        self.exit_layers = idx.new_empty(B, max_new_tokens)
        self.confs = torch.empty(B, max_new_tokens, device=idx.device)
        self.all_rows = torch.arange(B, device=idx.device)

    def prefill(self, idx) -> tuple:
        """Every layer for every prompt position; returns the last position's exit-layer and
        final states (B, d) each."""
        x = self.model.embed(idx, positions=self.prompt.positions)
        for i, (block, cache) in enumerate(zip(self.model.blocks, self.caches), start=1):
            x = block.forward_cached(x, cache, 0, self.prompt.prefill_mask)
            if i == self.exit_layer:
                x_exit = x[:, -1]
        return x_exit, x[:, -1]

    def step(self, s: int, pos: int, x_exit, x_last=None) -> None:
        """Emit the token at ``pos`` (step s) from x_exit (B, d); x_last: the prefill's final
        states (every layer already ran), else the deeper blocks run here."""
        model, L, key_ok = self.model, self.model.n_layers, self.prompt.key_ok
        mask = key_ok[:, None, None, :pos] if key_ok is not None else None  # keys of slots 0..pos-1
        h_exit = model.exit_norms[self.exit_layer - 1](x_exit)
        stats = exit_confidence(h_exit, model.lm_head.weight, backend=self.backend) if self.want_conf else None
        easy = stats.conf >= self.threshold if self.threshold > 0 else None
        hard_rows = compact_indices(~easy, backend=self.backend) if easy is not None else self.all_rows  # (n,)
        if x_last is None:
            x_final = _decode_deeper(model.blocks[self.exit_layer:], self.caches[self.exit_layer:], x_exit,
                                     hard_rows, pos - 1, mask, self.backend)
        else:
            x_final = gather_rows(x_last, hard_rows, backend=self.backend)
        h_final = model.exit_norms[-1](x_final)  # (n, d)
        self.tokens[:, pos] = _next_tokens(model, h_exit, stats, h_final, hard_rows, *self.sampling, self.backend)
        self.exit_layers[:, s] = torch.where(easy, self.exit_layer, L) if easy is not None else L
        if stats is not None:
            self.confs[:, s] = stats.conf

    def shallow(self, s: int, pos: int):
        """Exit-layer states (B, d) of the token emitted at pos - 1."""
        mask = self.prompt.key_ok[:, None, None, :pos] if self.prompt.key_ok is not None else None
        positions = (self.prompt.lengths + s - 1)[:, None]
        return _decode_shallow(self.model, self.tokens[:, pos - 1], self.caches[:self.exit_layer], pos - 1,
                               positions, mask)


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, routing_threshold: Optional[float] = None,
             exit_layer: Optional[int] = None, temperature: float = 0.0, top_k: Optional[int] = None,
             generator: Optional[torch.Generator] = None, *, prompt_mask: Optional[torch.Tensor] = None,
             config: Optional[UniversalConfig] = None, return_conf: bool = False, backend: str = "auto"):
    """Early-exit decoding with a per-layer KV cache; rows of the batch exit independently.

    idx: (B, T0) int64 prompt; the prefill runs every layer for every position. Routing
    (module docstring): ``routing_threshold`` / ``exit_layer`` None mean the method's own,
    taken from ``config`` (a UniversalConfig) when given, else no routing (full depth) and
    exit layer 1 (``fastexit.routing.resolve_routing``; evaluate reads None the same way).
    temperature=0: greedy; otherwise sample softmax(logits / temperature), optionally from the
    top_k logits (routing always uses the temperature-1 confidence).

    Prompts of different lengths: left-pad them in idx and pass prompt_mask (B, T0) bool,
    True on real tokens. Each row then counts positions from its first real token, and no
    query ever attends to a pad, so a row generates what it would alone.

    Returns (tokens (B, T0 + max_new_tokens) int64, exit_layers (B, max_new_tokens) int64),
    plus conf (B, max_new_tokens) fp32, the exit-layer confidence of each step, when
    ``return_conf``.
    """
    _check_prompt(model, idx, max_new_tokens, prompt_mask)
    routing_threshold, exit_layer = resolve_routing(model, routing_threshold, exit_layer, config)
    _check_sampling(model, temperature, top_k)
    T0 = idx.shape[1]
    dec = _Decoder(model, idx, max_new_tokens, routing_threshold, exit_layer,
                   _prompt_layout(idx, prompt_mask, max_new_tokens), return_conf, (temperature, top_k, generator),
                   backend)
    x_exit, x_last = dec.prefill(idx)
    dec.step(0, T0, x_exit, x_last)
    for s in range(1, max_new_tokens):  # the token emitted at pos is predicted from position pos - 1
        dec.step(s, T0 + s, dec.shallow(s, T0 + s))
    return (dec.tokens, dec.exit_layers, dec.confs) if return_conf else (dec.tokens, dec.exit_layers)
