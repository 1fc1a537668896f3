"""Confidence routing at inference (docs/design.md §3): easy tokens leave at ``exit_layer``.

A token whose max softmax probability at ``exit_layer`` is >= ``routing_threshold`` is easy
and predicts from the exit layer; every other token is hard and predicts from the final layer.
``routing_threshold = 0`` turns routing off: every token is hard.

- ``exact_routed_forward``: every layer runs on every token and each token's prediction is
  selected (the seed's measurement).
- ``compact_routed_forward``: real skipping, see its docstring.
Generation applies the same rule token by token (``fastexit.generate``).

Skipped tokens keep their exit-layer state (CALM's state propagation): every deeper block
computes keys and values for them from that carried state, so hard tokens still attend to
every earlier position. The first block after the exit layer is therefore exact; deeper
blocks see carried (not recomputed) keys for easy positions and differ slightly from exact
mode. The arithmetic is the model's own (``Block.kv`` / ``Block.forward_rows``); dropout is
not applied (inference).
"""
from typing import Dict, NamedTuple, Optional

import torch

from .config import UniversalConfig
from .kernels import ExitStats, compact_indices, exit_confidence, gather_rows, scatter_rows
from .model import QueryGrid, padding_layout


class RoutedOutput(NamedTuple):
    """Per-token results of a routed forward, all (B, T).

    pred int64: the prediction used; nll fp32: its NLL (None without targets, 0 where the
    target is ignored); conf fp32: confidence at the exit layer; easy bool: left at the exit
    layer; layers_run int64: exit_layer for easy tokens, n_layers for hard ones;
    layer_stats: {layer: ExitStats of (B*T,) rows} of every layer that was asked for, or None.
    """
    pred: torch.Tensor
    nll: Optional[torch.Tensor]
    conf: torch.Tensor
    easy: torch.Tensor
    layers_run: torch.Tensor
    layer_stats: Optional[Dict[int, ExitStats]] = None


def resolve_routing(model, routing_threshold: Optional[float], exit_layer: Optional[int],
                    config: Optional[UniversalConfig] = None):
    """(routing_threshold, exit_layer) to route with, checked against the model.

    None means "the method's own": the value in ``config`` when one is given, else no routing
    (threshold 0, full depth) and exit layer 1. ``evaluate`` passes its trainer's config, so
    ``routing_threshold=None`` means the same there and in ``generate``.
    """
    if routing_threshold is None:
        routing_threshold = config.routing_threshold if config is not None else 0.0
    if exit_layer is None:
        exit_layer = config.exit_layer if config is not None else 1
    check_routing(model, exit_layer, routing_threshold)
    return float(routing_threshold), exit_layer


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


def easy_mask(conf: torch.Tensor, routing_threshold: float) -> torch.Tensor:
    """(N,) bool: tokens that leave at the exit layer; none when routing is off."""
    return conf >= routing_threshold if routing_threshold > 0 else torch.zeros_like(conf, dtype=torch.bool)


def _select(idx, exit_stats, final_stats, easy, exit_layer, n_layers, layer_stats=None) -> RoutedOutput:
    """Per token, the exit layer's result where easy, else the final layer's; all (B, T)."""
    pick = lambda a, b: torch.where(easy, a, b).view(idx.shape)  # noqa: E731
    nll = pick(exit_stats.nll, final_stats.nll) if exit_stats.nll is not None else None
    layers_run = torch.where(easy, exit_layer, n_layers).view(idx.shape)
    return RoutedOutput(pick(exit_stats.pred, final_stats.pred), nll, exit_stats.conf.view(idx.shape),
                        easy.view(idx.shape), layers_run, layer_stats)


@torch.no_grad()
def exact_routed_forward(model, idx: torch.Tensor, exit_layer: int, routing_threshold: float,
                         targets: Optional[torch.Tensor] = None, backend: str = "auto", *,
                         ignore_index: int = -100, all_layers: bool = False,
                         attention_mask: Optional[torch.Tensor] = None) -> RoutedOutput:
    """Routed predictions with every layer run on every token (the seed's measurement).

    idx: (B, T) int64; targets: optional (B, T) int64. ``all_layers``: also score the exit
    of every layer in the same pass (``layer_stats``), at one head pass per layer.
    attention_mask: optional (B, T), True/1 on real tokens (``padding_layout``); give pads
    ignore_index targets. Returns RoutedOutput of (B, T) tensors.
    """
    check_routing(model, exit_layer, routing_threshold)
    model.check_idx(idx)
    tgt, weight, L = _flat_targets(targets, idx), model.lm_head.weight, model.n_layers
    layers = list(range(1, L + 1)) if all_layers else sorted({exit_layer, L})
    stats = {i: exit_confidence(h.reshape(-1, h.shape[-1]), weight, tgt, ignore_index=ignore_index, backend=backend)
             for i, h in zip(layers, model.exit_hidden_states(idx, layers, attention_mask=attention_mask))}  # (B*T,) rows each
    easy = easy_mask(stats[exit_layer].conf, routing_threshold)
    return _select(idx, stats[exit_layer], stats[L], easy, exit_layer, L, stats if all_layers else None)


# ----------------------------------------------------------------------------- compact mode
def _padded_layout(hard: torch.Tensor, hard_idx: torch.Tensor, real: Optional[torch.Tensor] = None) -> QueryGrid:
    """Hard tokens of each batch row packed left into a (B, S) query grid, S = the largest
    per-row count, with the causal mask (B, 1, S, T): key_pos <= query_pos.

    hard: (B, T) bool; hard_idx: (n,) flat ascending positions; real: (B, T) bool non-pad
    tokens, or None: pads are hidden from every query but themselves.
    """
    B, T = hard.shape
    counts = hard.sum(1)  # (B,)
    n_slots = int(counts.max())
    rows = hard_idx // T
    rank = torch.arange(hard_idx.numel(), device=hard.device) - (counts.cumsum(0) - counts)[rows]
    slot = rows * n_slots + rank
    q_pos = torch.zeros(B * n_slots, dtype=torch.int64, device=hard.device)  # padding: position 0
    q_pos[slot] = hard_idx % T
    key_pos, q_pos = torch.arange(T, device=hard.device), q_pos.view(B, n_slots, 1)
    mask = key_pos <= q_pos  # (B, S, T)
    if real is not None:
        mask &= real[:, None, :] | (key_pos == q_pos)
    return QueryGrid(slot, n_slots, mask.unsqueeze(1))


def _merge(exit_stats: ExitStats, hard_stats: ExitStats, hard_idx, backend) -> ExitStats:
    """Full-size stats: the hard rows from hard_stats, the rest from exit_stats."""
    return ExitStats(*(None if e is None else scatter_rows(e.clone(), hard_idx, h, backend=backend)
                       for e, h in zip(exit_stats, hard_stats)))


@torch.no_grad()
def compact_routed_forward(model, idx: torch.Tensor, exit_layer: int, routing_threshold: float,
                           targets: Optional[torch.Tensor] = None, backend: str = "auto", *,
                           ignore_index: int = -100, attention_mask: Optional[torch.Tensor] = None) -> RoutedOutput:
    """Routed predictions with real skipping (docs/design.md §3, compact mode).

    idx: (B, T) int64; targets: optional (B, T) int64; attention_mask: as in
    ``exact_routed_forward``. Blocks 1..exit_layer run on every
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
    positions, mask = padding_layout(attention_mask, idx) if attention_mask is not None else (None, None)
    x = model.embed(idx, positions=positions)
    for block in model.blocks[:exit_layer]:
        x = block(x, mask)  # (B, T, d)
    d, deeper, final_norm = x.shape[-1], model.blocks[exit_layer:], model.exit_norms[-1]
    stats = exit_confidence(model.exit_norms[exit_layer - 1](x).view(-1, d), weight, tgt,
                            ignore_index=ignore_index, backend=backend)
    easy = easy_mask(stats.conf, routing_threshold)
    hard_idx = compact_indices(~easy, backend=backend)  # (n,)
    if hard_idx.numel() == B * T:  # nobody leaves: a plain dense forward
        for block in deeper:
            x = block(x, mask)
        final = exit_confidence(final_norm(x).view(-1, d), weight, tgt, ignore_index=ignore_index, backend=backend)
    elif hard_idx.numel():
        real = attention_mask.bool() if attention_mask is not None else None
        xh = _deeper_hard_rows(deeper, x.reshape(-1, d).contiguous(), ~easy.view(B, T), hard_idx, backend, real)
        hard_tgt = gather_rows(tgt, hard_idx, backend=backend) if tgt is not None else None
        hard = exit_confidence(final_norm(xh), weight, hard_tgt, ignore_index=ignore_index, backend=backend)
        final = _merge(stats, hard, hard_idx, backend)
    else:
        final = stats
    return _select(idx, stats, final, easy, exit_layer, model.n_layers)


def _deeper_hard_rows(blocks, x, hard, hard_idx, backend, real=None) -> torch.Tensor:
    """Run ``blocks`` for the hard tokens; returns their final states (n, d).

    x: (B*T, d) exit-layer states of all tokens, updated in place with the hard rows before
    every block after the first (easy rows stay carried); hard: (B, T) bool; hard_idx: (n,);
    real: (B, T) bool non-pad tokens or None.
    """
    B, T = hard.shape
    xh = gather_rows(x, hard_idx, backend=backend)  # (n, d)
    grid = _padded_layout(hard, hard_idx, real)
    for i, block in enumerate(blocks):
        if i:
            scatter_rows(x, hard_idx, xh, backend=backend)
        k, v = block.kv(x.view(B, T, -1))  # (B, H, T, hd): carried states for easy tokens
        xh = block.forward_rows(xh, k, v, grid)
    return xh
