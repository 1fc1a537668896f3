"""Confidence routing at inference (DESIGN §3): easy tokens leave at ``exit_layer``.

A token whose max softmax probability at ``exit_layer`` is >= ``routing_threshold`` is easy
and predicts from the exit layer; every other token is hard and predicts from the final layer.
``routing_threshold = 0`` turns routing off: every token is hard.

- ``exact_routed_forward``: every layer runs on every token and each token's prediction is
  selected (the seed's measurement).
- ``compact_routed_forward``: real skipping, see its docstring.
- ``generate``: the same rule token by token with a per-layer KV cache, rows of a batch
  exiting independently.

Skipped tokens keep their exit-layer state (CALM's state propagation): every deeper block
computes keys and values for them from that carried state, so hard tokens still attend to
every earlier position. The first block after the exit layer is therefore exact; deeper
blocks see carried (not recomputed) keys for easy positions and differ slightly from exact
mode. Routing runs the model's own block submodules; dropout is not applied (inference).
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .kernels import ExitStats, compact_indices, exit_confidence, gather_rows, scatter_rows


class RoutedOutput(NamedTuple):
    """Per-token results of a routed forward, all (B, T).

    pred int64: the prediction used; nll fp32: its NLL (None without targets, 0 where the
    target is ignored); conf fp32: confidence at the exit layer; easy bool: left at the exit
    layer; layers_run int64: exit_layer for easy tokens, n_layers for hard ones.
    """
    pred: torch.Tensor
    nll: Optional[torch.Tensor]
    conf: torch.Tensor
    easy: torch.Tensor
    layers_run: torch.Tensor


def check_routing(model, exit_layer: int, routing_threshold: float) -> None:
    """ValueError unless threshold is in [0, 1] and 1 <= exit_layer <= n_layers (< when routing)."""
    if isinstance(routing_threshold, bool) or not isinstance(routing_threshold, (int, float)) \
            or not 0 <= routing_threshold <= 1:
        raise ValueError(f"routing_threshold must be a number in [0, 1], got {routing_threshold!r}")
    top = model.n_layers - 1 if routing_threshold > 0 else model.n_layers
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer <= top:
        raise ValueError(f"exit_layer must be an int in [1, {top}] for a {model.n_layers}-layer model "
                         f"with routing_threshold={routing_threshold}, got {exit_layer!r}")


def _flat_targets(targets, idx):
    if targets is None:
        return None
    if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape:
        raise ValueError(f"targets must be an int64 tensor of idx's shape {tuple(idx.shape)}, "
                         f"got {getattr(targets, 'shape', type(targets).__name__)}")
    return targets.reshape(-1)


def _easy_mask(conf: torch.Tensor, routing_threshold: float) -> torch.Tensor:
    """(N,) bool: tokens that leave at the exit layer; none when routing is off."""
    return conf >= routing_threshold if routing_threshold > 0 else torch.zeros_like(conf, dtype=torch.bool)


def _select(idx, exit_stats, final_stats, easy, exit_layer, n_layers) -> RoutedOutput:
    """Per token, the exit layer's result where easy, else the final layer's; all (B, T)."""
    pick = lambda a, b: torch.where(easy, a, b).view(idx.shape)  # noqa: E731
    nll = pick(exit_stats.nll, final_stats.nll) if exit_stats.nll is not None else None
    layers_run = torch.where(easy, exit_layer, n_layers).view(idx.shape)
    return RoutedOutput(pick(exit_stats.pred, final_stats.pred), nll, exit_stats.conf.view(idx.shape),
                        easy.view(idx.shape), layers_run)


@torch.no_grad()
def exact_routed_forward(model, idx: torch.Tensor, exit_layer: int, routing_threshold: float,
                         targets: Optional[torch.Tensor] = None, backend: str = "auto", *,
                         ignore_index: int = -100) -> RoutedOutput:
    """Routed predictions with every layer run on every token (the seed's measurement).

    idx: (B, T) int64; targets: optional (B, T) int64. Returns RoutedOutput of (B, T) tensors.
    """
    check_routing(model, exit_layer, routing_threshold)
    model.check_idx(idx)
    tgt, weight = _flat_targets(targets, idx), model.lm_head.weight
    h_exit, h_final = model.exit_hidden_states(idx, [exit_layer, model.n_layers])  # (B, T, d) each
    d = h_exit.shape[-1]
    stats = [exit_confidence(h.reshape(-1, d), weight, tgt, ignore_index=ignore_index, backend=backend)
             for h in (h_exit, h_final)]
    easy = _easy_mask(stats[0].conf, routing_threshold)
    return _select(idx, stats[0], stats[1], easy, exit_layer, model.n_layers)


# ----------------------------------------------------------------------------- compact mode
def _kv(block, a: torch.Tensor, batch: int):
    """Keys and values (B, H, t, hd) of the normed states a (B*t, d)."""
    attn = block.attn
    kv = attn.kv_proj(a).view(batch, -1, 2 * attn.d_model)
    return [attn.split_heads(t) for t in kv.split(attn.d_model, dim=-1)]


def _hard_rows_block(block, a, xh, hard_idx, slot, n_slots, k, v, mask, backend):
    """One block for the hard rows only; returns their new residual state (n, d).

    a: (R, d) attn-normed states of all rows; xh: (n, d) hard rows' states; hard_idx: (n,)
    their rows in a; slot: (n,) their places in the padded query layout (B, n_slots);
    k, v: (B, H, Tk, hd); mask: (B, 1, n_slots, Tk) bool or None. Padded queries are zeros
    and their outputs are dropped.
    """
    attn, d = block.attn, a.shape[1]
    q = a.new_zeros(k.shape[0] * n_slots, d)
    scatter_rows(q, slot, attn.q_proj(gather_rows(a, hard_idx, backend=backend)), backend=backend)
    y = F.scaled_dot_product_attention(attn.split_heads(q.view(k.shape[0], n_slots, d)), k, v, attn_mask=mask)
    y = gather_rows(attn.merge_heads(y).reshape(-1, d), slot, backend=backend)  # (n, d)
    xh = xh + attn.out_proj(y)
    return xh + block.mlp(block.mlp_norm(xh))


def _padded_layout(hard: torch.Tensor, hard_idx: torch.Tensor):
    """Hard tokens of each batch row packed left into (B, S), S = the largest per-row count.

    hard: (B, T) bool; hard_idx: (n,) flat ascending positions. Returns slot (n,) into the
    flattened (B, S) layout, S, and the attention mask (B, 1, S, T): key_pos <= query_pos.
    """
    B, T = hard.shape
    counts = hard.sum(1)  # (B,)
    n_slots = int(counts.max())
    rows = hard_idx // T
    rank = torch.arange(hard_idx.numel(), device=hard.device) - (counts.cumsum(0) - counts)[rows]
    slot = rows * n_slots + rank
    q_pos = torch.zeros(B * n_slots, dtype=torch.int64, device=hard.device)  # padding: position 0
    q_pos[slot] = hard_idx % T
    mask = torch.arange(T, device=hard.device) <= q_pos.view(B, n_slots, 1)  # (B, S, T)
    return slot, n_slots, mask.unsqueeze(1)


def _merge(exit_stats: ExitStats, hard_stats: ExitStats, hard_idx, backend) -> ExitStats:
    """Full-size stats: the hard rows from hard_stats, the rest from exit_stats."""
    return ExitStats(*(None if e is None else scatter_rows(e.clone(), hard_idx, h, backend=backend)
                       for e, h in zip(exit_stats, hard_stats)))


@torch.no_grad()
def compact_routed_forward(model, idx: torch.Tensor, exit_layer: int, routing_threshold: float,
                           targets: Optional[torch.Tensor] = None, backend: str = "auto", *,
                           ignore_index: int = -100) -> RoutedOutput:
    """Routed predictions with real skipping (DESIGN §3, compact mode).

    idx: (B, T) int64; targets: optional (B, T) int64. Blocks 1..exit_layer run on every
    token. Hard tokens are compacted (n of B*T) and alone run the deeper blocks' query
    projection, attention output and MLP, and the final exit norm + head; each deeper block
    computes keys/values for every position from the current states, where easy tokens keep
    their exit-layer state. Hard queries attend in a per-row padded layout (B, S) with the
    mask key_pos <= query_pos. Host syncs: one for the hard count, one for S.
    Returns RoutedOutput of (B, T) tensors.
    """
    check_routing(model, exit_layer, routing_threshold)
    model.check_idx(idx)
    tgt, weight, (B, T) = _flat_targets(targets, idx), model.lm_head.weight, idx.shape
    x = model.embed(idx)
    for block in model.blocks[:exit_layer]:
        x = block(x)  # (B, T, d)
    d, deeper, final_norm = x.shape[-1], model.blocks[exit_layer:], model.exit_norms[-1]
    stats = exit_confidence(model.exit_norms[exit_layer - 1](x).view(-1, d), weight, tgt,
                            ignore_index=ignore_index, backend=backend)
    easy = _easy_mask(stats.conf, routing_threshold)
    hard_idx = compact_indices(~easy, backend=backend)  # (n,)
    if hard_idx.numel() == B * T:  # nobody leaves: a plain dense forward
        for block in deeper:
            x = block(x)
        final = exit_confidence(final_norm(x).view(-1, d), weight, tgt, ignore_index=ignore_index, backend=backend)
    elif hard_idx.numel():
        xh = _deeper_hard_rows(deeper, x.reshape(-1, d).contiguous(), ~easy.view(B, T), hard_idx, backend)
        hard_tgt = gather_rows(tgt, hard_idx, backend=backend) if tgt is not None else None
        hard = exit_confidence(final_norm(xh), weight, hard_tgt, ignore_index=ignore_index, backend=backend)
        final = _merge(stats, hard, hard_idx, backend)
    else:
        final = stats
    return _select(idx, stats, final, easy, exit_layer, model.n_layers)


def _deeper_hard_rows(blocks, x, hard, hard_idx, backend) -> torch.Tensor:
    """Run ``blocks`` for the hard tokens; returns their final states (n, d).

    x: (B*T, d) exit-layer states of all tokens, updated in place with the hard rows before
    every block after the first (easy rows stay carried); hard: (B, T) bool; hard_idx: (n,).
    """
    B = hard.shape[0]
    xh = gather_rows(x, hard_idx, backend=backend)  # (n, d)
    slot, n_slots, mask = _padded_layout(hard, hard_idx)
    for i, block in enumerate(blocks):
        if i:
            scatter_rows(x, hard_idx, xh, backend=backend)
        a = block.attn_norm(x)  # (B*T, d)
        k, v = _kv(block, a, B)
        xh = _hard_rows_block(block, a, xh, hard_idx, slot, n_slots, k, v, mask, backend)
    return xh


# ----------------------------------------------------------------------------- generation
def _check_generate(model, idx, max_new_tokens, routing_threshold, exit_layer, temperature, top_k,
                    prompt_mask) -> None:
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
    check_routing(model, exit_layer, routing_threshold)
    if prompt_mask is not None:
        if not isinstance(prompt_mask, torch.Tensor) or prompt_mask.dtype != torch.bool \
                or prompt_mask.shape != idx.shape or prompt_mask.device != idx.device:
            raise ValueError(f"prompt_mask must be a bool tensor of idx's shape {tuple(idx.shape)} on {idx.device}, "
                             f"got {getattr(prompt_mask, 'dtype', type(prompt_mask).__name__)} of shape "
                             f"{tuple(getattr(prompt_mask, 'shape', ()))}")
        if not (prompt_mask[:, -1].all() and (prompt_mask[:, 1:] >= prompt_mask[:, :-1]).all()):
            raise ValueError("prompt_mask: prompts must be left-padded (each row False... then True..., "
                             "ending with a real token)")
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k <= model.cfg.vocab_size):
        raise ValueError(f"top_k must be None or an int in [1, {model.cfg.vocab_size}], got {top_k!r}")


def _cached_block(block, x, cache, start: int, mask=None) -> torch.Tensor:
    """Dense block on x (B, t, d) at cache slots start..start+t-1, writing their keys/values
    into cache = (k, v), each (B, H, T_max, hd). Either a prefill (start 0) or one token.
    mask: (B, 1, t, start+t) bool for padded prompts; None = plain causal attention."""
    attn, (B, t, d) = block.attn, x.shape
    a = block.attn_norm(x)
    end = start + t
    cache[0][:, :, start:end], cache[1][:, :, start:end] = _kv(block, a.view(-1, d), B)
    y = F.scaled_dot_product_attention(attn.split_heads(attn.q_proj(a)), cache[0][:, :, :end],
                                       cache[1][:, :, :end], attn_mask=mask, is_causal=mask is None and t > 1)
    x = x + attn.out_proj(attn.merge_heads(y))
    return x + block.mlp(block.mlp_norm(x))


def _decode_shallow(model, tok: torch.Tensor, caches, slot: int, positions, mask) -> torch.Tensor:
    """Token ids tok (B,) at cache slot ``slot`` (positions (B, 1) int64) through the first
    len(caches) blocks -> (B, d)."""
    x = model.embed(tok[:, None], positions=positions)  # (B, 1, d)
    for block, cache in zip(model.blocks, caches):
        x = _cached_block(block, x, cache, slot, mask)
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
            x = _cached_block(block, x, cache, pos, mask)
        return x.squeeze(1)
    hard_mask = mask.index_select(0, hard_rows) if mask is not None else None  # (n, 1, 1, pos+1)
    x = x.clone()  # refreshed in place with the hard rows' states below
    xh = gather_rows(x, hard_rows, backend=backend)  # (n, d)
    slots = torch.arange(hard_rows.numel(), device=x.device)  # hard row r is query slot r of its own cache copy
    for i, (block, cache) in enumerate(zip(blocks, caches)):
        if i and hard_rows.numel():
            scatter_rows(x, hard_rows, xh, backend=backend)
        a = block.attn_norm(x)  # (B, d)
        cache[0][:, :, pos:pos + 1], cache[1][:, :, pos:pos + 1] = _kv(block, a, B)
        if hard_rows.numel():
            k, v = (c[:, :, :pos + 1].index_select(0, hard_rows) for c in cache)  # (n, H, pos+1, hd)
            xh = _hard_rows_block(block, a, xh, hard_rows, slots, 1, k, v, hard_mask, backend)
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


def _prompt_layout(idx, prompt_mask, max_new_tokens):
    """Positions (B, T0) of the prompt tokens, prompt lengths (B,), and the attention masks of
    left-padded prompts: prefill (B, 1, T0, T0) and keys to attend per cache slot
    (B, T0 + max_new_tokens); both masks are None when no row is padded."""
    B, T0 = idx.shape
    if prompt_mask is None or bool(prompt_mask.all()):
        positions = torch.arange(T0, device=idx.device).expand(B, T0)
        return positions, torch.full((B,), T0, device=idx.device), None, None
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    causal = torch.ones(T0, T0, dtype=torch.bool, device=idx.device).tril()
    # a pad attends to itself only: no query row is fully masked (that would give NaN states)
    prefill = causal & (prompt_mask[:, None, :] | torch.eye(T0, dtype=torch.bool, device=idx.device))
    key_ok = torch.cat([prompt_mask, prompt_mask.new_ones(B, max_new_tokens)], dim=1)
    return positions, prompt_mask.sum(1), prefill.unsqueeze(1), key_ok


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, routing_threshold: Optional[float] = None,
             exit_layer: int = 1, temperature: float = 0.0, top_k: Optional[int] = None,
             generator: Optional[torch.Generator] = None, *, prompt_mask: Optional[torch.Tensor] = None,
             return_conf: bool = False, backend: str = "auto"):
    """Early-exit decoding with a per-layer KV cache; rows of the batch exit independently.

    idx: (B, T0) int64 prompt. The prompt's prefill runs every layer for every position.
    Each new token is routed as in DESIGN §3: after ``exit_layer`` a row whose max softmax
    probability is >= ``routing_threshold`` emits from the exit layer; the hard rows are
    compacted and alone run the deeper blocks' query, attention output, MLP and final head,
    while the deeper caches of easy rows are filled from their carried exit-layer state
    (state propagation). routing_threshold=0: full-depth decoding. temperature=0: greedy;
    otherwise sample softmax(logits / temperature), optionally from the top_k logits
    (routing always uses the temperature-1 confidence). routing_threshold=None is the same
    as 0 (full depth).

    Prompts of different lengths: left-pad them in idx and pass prompt_mask (B, T0) bool,
    True on real tokens. Each row then counts positions from its first real token, and no
    query ever attends to a pad, so a row generates what it would alone.

    Returns (tokens (B, T0 + max_new_tokens) int64, exit_layers (B, max_new_tokens) int64),
    plus conf (B, max_new_tokens) fp32, the exit-layer confidence of each step, when
    ``return_conf``.
    """
    routing_threshold = 0.0 if routing_threshold is None else routing_threshold
    _check_generate(model, idx, max_new_tokens, routing_threshold, exit_layer, temperature, top_k, prompt_mask)
    (B, T0), L, cfg = idx.shape, model.n_layers, model.cfg
    prompt_pos, lengths, prefill_mask, key_ok = _prompt_layout(idx, prompt_mask, max_new_tokens)
    routing, want_conf = routing_threshold > 0, routing_threshold > 0 or return_conf
    cache_shape = (B, cfg.n_heads, T0 + max_new_tokens, cfg.d_model // cfg.n_heads)
    param = model.lm_head.weight
    caches = [(param.new_empty(cache_shape), param.new_empty(cache_shape)) for _ in range(L)]
    tokens = torch.cat([idx, idx.new_empty(B, max_new_tokens)], dim=1)
    exit_layers = idx.new_empty(B, max_new_tokens)
    confs = torch.empty(B, max_new_tokens, device=idx.device)
    all_rows = torch.arange(B, device=idx.device)
    x = model.embed(idx, positions=prompt_pos)
    for i, (block, cache) in enumerate(zip(model.blocks, caches), start=1):  # prefill: full depth
        x = _cached_block(block, x, cache, 0, prefill_mask)
        if i == exit_layer:
            x_exit = x[:, -1]  # (B, d)
    for s in range(max_new_tokens):
        pos = T0 + s  # the token emitted now sits at pos and is predicted from position pos - 1
        mask = key_ok[:, None, None, :pos] if key_ok is not None else None  # keys of slots 0..pos-1
        if s:
            x_exit = _decode_shallow(model, tokens[:, pos - 1], caches[:exit_layer], pos - 1,
                                     (lengths + s - 1)[:, None], mask)  # (B, d)
        h_exit = model.exit_norms[exit_layer - 1](x_exit)
        stats = exit_confidence(h_exit, param, backend=backend) if want_conf else None
        easy = stats.conf >= routing_threshold if routing else None
        hard_rows = compact_indices(~easy, backend=backend) if routing else all_rows  # (n,)
        if s:
            x_final = _decode_deeper(model.blocks[exit_layer:], caches[exit_layer:], x_exit, hard_rows, pos - 1,
                                     mask, backend)
        else:  # the prefill already ran every layer
            x_final = gather_rows(x[:, -1], hard_rows, backend=backend)
        h_final = model.exit_norms[-1](x_final)  # (n, d)
        tokens[:, pos] = _next_tokens(model, h_exit, stats, h_final, hard_rows, temperature, top_k, generator, backend)
        exit_layers[:, s] = torch.where(easy, exit_layer, L) if routing else L
        if stats is not None:
            confs[:, s] = stats.conf
    return (tokens, exit_layers, confs) if return_conf else (tokens, exit_layers)
