"""Confidence routing at inference (docs/design.md §3): easy tokens leave at an exit layer.

A token whose max softmax probability at ``exit_layer`` is >= ``routing_threshold`` is easy
and predicts from the exit layer; every other token is hard and predicts from the final layer.
``routing_threshold = 0`` turns routing off: every token is hard.

Several exits (``exit_layer`` a list of ascending layers, ``routing_threshold`` one number per
exit or one for all): a token leaves at the first exit whose confidence reaches that exit's
threshold (0 turns an exit off); a token that leaves nowhere runs to the final layer. The
confidence is the max softmax probability, with ``confidence="margin"`` the top-1 minus
top-2 probability, or with ``confidence="learned"`` sigmoid(head(h)) of the exit's learned
head on its exit-normed state (a model with ``confidence_heads`` at every exit).

- ``exact_routed_forward``: every layer runs on every token and each token's prediction is
  selected (the seed's measurement).
- ``compact_routed_forward``: real skipping, see its docstring.
Generation applies the same rule token by token (``fastexit.generate``).

Skipped tokens keep the state of the exit they left at (CALM's state propagation): every
deeper block computes keys and values for them from that carried state, so tokens still
running attend to every earlier position. The first block after the first exit is therefore
exact; deeper blocks see carried (not recomputed) keys for positions that left and differ
slightly from exact mode. The arithmetic is the model's own (``Block.kv`` /
``Block.forward_rows``); dropout is not applied (inference).

Mixture-of-Depths routed blocks (``fastexit.mod``) take part in both forwards: their
predictors decide per token which tokens run them, and ``RoutedOutput.mod_routes`` holds the
decisions. In compact mode a routed block after an exit takes keys/values from every token its
predictor chooses (from carried states for tokens that left), and only the running chosen
tokens run it.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch

from . import mod
from .config import CONFIDENCE_KINDS, UniversalConfig, check_exit_layers, check_exit_thresholds
from .kernels import ExitStats, compact_indices, exit_confidence, gather_rows, scatter_rows
from .layers import QueryGrid, pack_left, padding_layout
from .protocol import require_early_exit

Layers = Union[int, Sequence[int]]
Thresholds = Union[float, Sequence[float]]


class RoutedOutput(NamedTuple):
    """Per-token results of a routed forward, all (B, T).

    pred int64: the prediction used; nll fp32: its NLL (None without targets, 0 where the
    target is ignored); conf fp32: confidence at the deepest exit the token reached (the one
    it left at, else the last exit); easy bool: left at an exit; layers_run int64: the exit
    layer the token left at, n_layers for hard ones;
    layer_stats: {layer: ExitStats of (B*T,) rows} of every layer that was asked for, or None;
    mod_routes: {layer: mod.Route} of every routed block that ran (Mixture-of-Depths), or None.
    """
    pred: torch.Tensor
    nll: Optional[torch.Tensor]
    conf: torch.Tensor
    easy: torch.Tensor
    layers_run: torch.Tensor
    layer_stats: Optional[Dict[int, ExitStats]] = None
    mod_routes: Optional[Dict[int, mod.Route]] = None


class Routing(NamedTuple):
    """A checked routing rule: exit layers (ascending), one threshold per exit, the confidence."""
    exit_layers: List[int]
    routing_thresholds: List[float]
    confidence: str = "max_prob"

    @property
    def on(self) -> bool:
        return any(t > 0 for t in self.routing_thresholds)


def resolve_routing(model, routing_threshold: Optional[Thresholds], exit_layer: Optional[Layers],
                    config: Optional[UniversalConfig] = None, confidence: Optional[str] = None) -> Routing:
    """The routing rule to use, checked against the model.

    None means "the method's own": the value in ``config`` (its ``exits``, ``exit_thresholds``
    and ``confidence``) when one is given, else no routing (threshold 0, full depth), exit
    layer 1 and max_prob. A single ``routing_threshold`` overrides the threshold of every exit.
    ``evaluate`` passes its trainer's config, so ``routing_threshold=None`` means the same there
    and in ``generate``.
    """
    exits = exit_layer if exit_layer is not None else config.exits if config is not None else 1
    if routing_threshold is None and config is not None and exit_layer is not None:
        # exits of the caller's: the method's one threshold at each; its per-exit ones fit only its own exits
        asked = [exit_layer] if isinstance(exit_layer, int) else list(exit_layer)
        if config.routing_thresholds is not None and asked != config.exits:
            raise ValueError(f"exit_layer={exit_layer!r} is not the method's exits {config.exits}, whose "
                             f"routing_thresholds are one per exit: give routing_threshold too")
        routing_threshold = config.routing_thresholds or config.routing_threshold
    elif routing_threshold is None:
        routing_threshold = config.exit_thresholds if config is not None else 0.0
    if confidence is None:
        confidence = config.confidence if config is not None else "max_prob"
    return check_routing(model, exits, routing_threshold, confidence)


def check_routing(model, exit_layer: Layers, routing_threshold: Thresholds, confidence: str = "max_prob") -> Routing:
    """The rule as a ``Routing``; ValueError unless every threshold is in [0, 1], the exits are
    ascending distinct ints in [1, n_layers] (< n_layers when routing), and the model can
    score ``confidence``; TypeError unless ``model`` is an early-exit model. One exit and one
    threshold may be given as plain numbers."""
    require_early_exit(model)
    exits = [exit_layer] if isinstance(exit_layer, int) and not isinstance(exit_layer, bool) else exit_layer
    check_exit_layers("exit_layer", exits)
    single = isinstance(routing_threshold, (int, float)) and not isinstance(routing_threshold, bool)
    thresholds = [routing_threshold] * len(exits) if single else routing_threshold
    check_exit_thresholds("routing_threshold", thresholds, len(exits))
    rule = Routing(list(exits), [float(t) for t in thresholds], confidence)
    top = model.n_layers - 1 if rule.on else model.n_layers
    if exits[-1] > top:
        raise ValueError(f"exit_layer must be in [1, {top}] for a {model.n_layers}-layer model "
                         f"with routing_threshold={routing_threshold}, got {exit_layer!r}")
    if confidence not in CONFIDENCE_KINDS:
        raise ValueError(f"confidence must be one of {CONFIDENCE_KINDS}, got {confidence!r}")
    if confidence == "learned":
        check_confidence_heads(model, rule.exit_layers)
    return rule


def check_confidence_heads(model, layers: Sequence[int]) -> None:
    """ValueError naming ``confidence`` unless the model has a learned confidence head at every
    one of ``layers``."""
    heads = getattr(model, "confidence_heads", None)
    missing = [i for i in layers if heads is None or str(i) not in heads]
    if missing:
        raise ValueError(f"confidence='learned' needs a confidence head at every exit; {type(model).__name__} has "
                         f"none at layer(s) {missing} (train it with confidence='learned', which adds them, or "
                         f"use confidence 'max_prob' or 'margin')")


def _flat_targets(targets, idx):
    if targets is None:
        return None
    if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape:
        raise ValueError(f"targets must be an int64 tensor of idx's shape {tuple(idx.shape)}, "
                         f"got {getattr(targets, 'shape', type(targets).__name__)}")
    return targets.reshape(-1)


def easy_mask(conf: torch.Tensor, routing_threshold: float) -> torch.Tensor:
    """(N,) bool: tokens that leave at the exit; none when the exit is off (threshold 0)."""
    return conf >= routing_threshold if routing_threshold > 0 else torch.zeros_like(conf, dtype=torch.bool)


def exit_score(stats: Optional[ExitStats], confidence: str, model=None, layer: Optional[int] = None,
               h: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N,) fp32 confidence of one exit: from its ``exit_confidence`` stats (margin:
    want_margin=True), or for "learned" sigmoid(model.confidence_heads[layer](h)) of its
    exit-normed states h (..., d) with N rows (stats unused)."""
    if confidence == "learned":
        return torch.sigmoid(model.confidence_heads.logit(layer, h.reshape(-1, h.shape[-1])))
    return stats.margin if confidence == "margin" else stats.conf


def exit_layer_of_tokens(confs: Sequence[torch.Tensor], rule: Routing, n_layers: int) -> torch.Tensor:
    """(N,) int64: the first exit whose confidence (confs: one (N,) tensor per exit reached, in
    order) reaches its threshold, n_layers where none does."""
    at = torch.full_like(confs[0], n_layers, dtype=torch.int64)
    for layer, threshold, conf in reversed(list(zip(rule.exit_layers, rule.routing_thresholds, confs))):
        at = torch.where(easy_mask(conf, threshold), layer, at)
    return at


def _select(idx, rule, exit_stats, confs, final_stats, n_layers, layer_stats=None, mod_routes=None) -> RoutedOutput:
    """Per token, the result of the exit it left at, else the final layer's; all (B, T).
    exit_stats, confs: of each exit reached, in order (rows that left earlier hold any value)."""
    at = exit_layer_of_tokens(confs, rule, n_layers)
    pred, nll, conf = final_stats.pred, final_stats.nll, confs[-1]
    for layer, stats, c in zip(rule.exit_layers, exit_stats, confs):
        here = at == layer
        pred, conf = torch.where(here, stats.pred, pred), torch.where(here, c, conf)
        nll = torch.where(here, stats.nll, nll) if nll is not None else None
    view = lambda t: t.view(idx.shape)  # noqa: E731
    return RoutedOutput(view(pred), None if nll is None else view(nll), view(conf), view(at < n_layers), view(at),
                        layer_stats, mod_routes)


@torch.no_grad()
def exact_routed_forward(model, idx: torch.Tensor, exit_layer: Layers, routing_threshold: Thresholds,
                         targets: Optional[torch.Tensor] = None, backend: str = "auto", *,
                         ignore_index: int = -100, all_layers: bool = False,
                         attention_mask: Optional[torch.Tensor] = None, confidence: str = "max_prob") -> RoutedOutput:
    """Routed predictions with every layer run on every token (the seed's measurement).

    idx: (B, T) int64; targets: optional (B, T) int64. exit_layer: an int or ascending exit
    layers; routing_threshold: one number, or one per exit (module docstring). ``all_layers``:
    also score the exit of every layer in the same pass (``layer_stats``), at one head pass per
    layer. attention_mask: optional (B, T), True/1 on real tokens (``padding_layout``); give
    pads ignore_index targets. Returns RoutedOutput of (B, T) tensors.
    """
    rule = check_routing(model, exit_layer, routing_threshold, confidence)
    model.check_idx(idx)
    tgt, weight, L, exits = _flat_targets(targets, idx), model.lm_head.weight, model.n_layers, rule.exit_layers
    layers = list(range(1, L + 1)) if all_layers else sorted({*exits, L})
    routes = {} if mod.routers_of(model) is not None else None
    kwargs = dict(routes=routes) if routes is not None else {}
    hidden = dict(zip(layers, model.exit_hidden_states(idx, layers, attention_mask=attention_mask, **kwargs)))
    stats = {i: exit_confidence(h.reshape(-1, h.shape[-1]), weight, tgt, ignore_index=ignore_index,
                                want_margin=confidence == "margin" and i in exits, backend=backend)
             for i, h in hidden.items()}  # (B*T,) rows each
    confs = [exit_score(stats[i], confidence, model, i, hidden[i]) for i in exits]
    return _select(idx, rule, [stats[i] for i in exits], confs, stats[L], L, stats if all_layers else None, routes)


# ----------------------------------------------------------------------------- compact mode
def _padded_layout(rows: torch.Tensor, shape, real: Optional[torch.Tensor] = None) -> QueryGrid:
    """The running tokens of each batch row packed left into a (B, S) query grid, S = the
    largest per-row count, with the causal mask (B, 1, S, T): key_pos <= query_pos.

    rows: (n,) flat ascending positions in a (B, T) batch; real: (B, T) bool non-pad tokens,
    or None: pads are hidden from every query but themselves.
    """
    B, T = shape
    slot, n_slots = pack_left(rows, B, T)
    q_pos = torch.zeros(B * n_slots, dtype=torch.int64, device=rows.device)  # padding: position 0
    q_pos[slot] = rows % T
    key_pos, q_pos = torch.arange(T, device=rows.device), q_pos.view(B, n_slots, 1)
    mask = key_pos <= q_pos  # (B, S, T)
    if real is not None:
        mask &= real[:, None, :] | (key_pos == q_pos)
    return QueryGrid(slot, n_slots, mask.unsqueeze(1))


@torch.no_grad()
def compact_routed_forward(model, idx: torch.Tensor, exit_layer: Layers, routing_threshold: Thresholds,
                           targets: Optional[torch.Tensor] = None, backend: str = "auto", *,
                           ignore_index: int = -100, attention_mask: Optional[torch.Tensor] = None,
                           confidence: str = "max_prob") -> RoutedOutput:
    """Routed predictions with real skipping (docs/design.md §3, compact mode).

    idx: (B, T) int64; targets: optional (B, T) int64; exit_layer, routing_threshold,
    attention_mask: as in ``exact_routed_forward``. Blocks up to the first exit run on every
    token. At each exit the tokens still running are scored; those that stay are compacted
    (n of B*T) and alone run the next blocks' query projection, attention output and MLP, the
    next exit's norm and score, and at the end the final norm and head; each of those blocks
    computes keys/values for every position from the current states, where tokens that left
    keep the state of their exit. With max_prob and margin an exit's score is its LM-head pass
    over the running tokens; with a learned confidence it is the confidence head, and the LM
    head runs only on the tokens leaving there (their prediction). An exit that is off
    (threshold 0) is not scored unless it is the last (hard tokens report its confidence).
    Running queries attend in a per-row padded layout (B, S) with the mask key_pos <= query_pos.
    Host syncs per scored exit: one for the running count, one for S where tokens left.
    Returns RoutedOutput of (B, T) tensors.
    """
    rule = check_routing(model, exit_layer, routing_threshold, confidence)
    model.check_idx(idx)
    tgt, L, exits = _flat_targets(targets, idx), model.n_layers, rule.exit_layers
    positions, mask = padding_layout(attention_mask, idx) if attention_mask is not None else (None, None)
    real = attention_mask.bool() if attention_mask is not None else None
    routes = {} if mod.routers_of(model) is not None else None
    x = model.embed(idx, positions=positions)
    for i in range(1, exits[0] + 1):
        x = mod.run_block(model, i, x, mask, real, routes)  # (B, T, d)
    (N, d), dev = (idx.numel(), x.shape[-1]), idx.device
    # (N,) per token, rewritten while it runs: pred, nll, conf and layers_run (easy is set at the end)
    nll = None if tgt is None else torch.empty(N, device=dev)
    out = RoutedOutput(torch.empty(N, dtype=torch.int64, device=dev), nll, torch.empty(N, device=dev), None,
                       torch.full((N,), L, device=dev), mod_routes=routes)
    # xh: states of the running tokens at the flat rows (n,), (B, T, d) while every token runs (grid
    # None), then (n, d) with their query grid; x: (B*T, d) states of every token once some have left
    xh, rows, grid = x, torch.arange(N, device=dev), None
    for layer, threshold, end in zip(exits, rule.routing_thresholds, exits[1:] + [L]):
        if threshold > 0 or layer == exits[-1]:  # nobody leaves an off exit; only the last one's conf is read
            stay = _score_exit(model, layer, threshold, xh, rows, tgt, out, rule, ignore_index, backend)
            if stay.numel() == 0:  # every token has left
                return _finish(out, idx.shape, L)
            if stay.numel() < rows.numel():
                flat = xh.reshape(-1, d)  # (B*T or n, d)
                x = flat if grid is None else x
                rows, xh = gather_rows(rows, stay, backend=backend), gather_rows(flat, stay, backend=backend)
                grid = _padded_layout(rows, idx.shape, real)
        if grid is None:  # nobody has left yet: dense blocks
            for i in range(layer + 1, end + 1):
                xh = mod.run_block(model, i, xh, mask, real, routes)
        else:
            xh = _run_rows(model, range(layer + 1, end + 1), x, xh, rows, grid, real, routes, backend)
    h = model.exit_norms[L - 1](xh).reshape(-1, d)
    _keep(out, rows, _head(model, h, rows, tgt, ignore_index, backend), backend)
    return _finish(out, idx.shape, L)


def _score_exit(model, layer, threshold, xh, rows, targets, out, rule, ignore_index, backend) -> torch.Tensor:
    """Score the running tokens at the flat rows (n,), states xh (..., d), at exit ``layer`` and
    write their conf and layers_run into out's (N,) tensors, and pred and nll where the LM head
    ran: on every running token for max_prob and margin (their score), only on those leaving
    for a learned confidence. Returns the positions (n',) of the staying tokens among the running."""
    h = model.exit_norms[layer - 1](xh).reshape(-1, xh.shape[-1])  # (n, d)
    learned = rule.confidence == "learned"
    stats = None if learned else _head(model, h, rows, targets, ignore_index, backend, rule.confidence == "margin")
    conf = exit_score(stats, rule.confidence, model, layer, h)
    leave = easy_mask(conf, threshold)
    stay = compact_indices(~leave, backend=backend)  # (n',): the exit's one host sync
    scatter_rows(out.conf, rows, conf, backend=backend)
    scatter_rows(out.layers_run, rows, torch.where(leave, layer, model.n_layers), backend=backend)
    if not learned:
        _keep(out, rows, stats, backend)
    elif stay.numel() < rows.numel():
        go = torch.nonzero_static(leave, size=rows.numel() - stay.numel()).squeeze(1)  # no sync: the size is known
        left = gather_rows(rows, go, backend=backend)
        _keep(out, left, _head(model, gather_rows(h, go, backend=backend), left, targets, ignore_index, backend),
              backend)
    return stay


def _head(model, h, rows, targets, ignore_index, backend, want_margin=False) -> ExitStats:
    """exit_confidence of the exit-normed states h (n, d) of the flat rows (n,); targets: (B*T,) or None."""
    tgt = None if targets is None else gather_rows(targets, rows, backend=backend)
    return exit_confidence(h, model.lm_head.weight, tgt, ignore_index=ignore_index, want_margin=want_margin,
                           backend=backend)


def _keep(out: RoutedOutput, rows, stats: ExitStats, backend) -> None:
    """Write the pred and nll of stats (n,) at the flat rows (n,) of out's (N,) tensors."""
    scatter_rows(out.pred, rows, stats.pred, backend=backend)
    if out.nll is not None:
        scatter_rows(out.nll, rows, stats.nll, backend=backend)


def _finish(out: RoutedOutput, shape, n_layers) -> RoutedOutput:
    """out's (N,) tensors as (B, T), with easy = left at an exit."""
    view = lambda t: t.view(shape)  # noqa: E731
    return RoutedOutput(view(out.pred), None if out.nll is None else view(out.nll), view(out.conf),
                        view(out.layers_run < n_layers), view(out.layers_run), mod_routes=out.mod_routes)


def _run_rows(model, layers, x, xh, rows, grid, real, routes, backend) -> torch.Tensor:
    """Run the blocks of ``layers`` for the running tokens only; returns their states (n, d).

    x: (B*T, d) states of every token, updated in place with the running rows after every
    block (tokens that left keep theirs: the next blocks compute their keys/values from it);
    xh: (n, d) states of the running tokens at the flat rows (n,); grid: their query layout.
    A routed block (``mod.rows_forward``) takes keys from the tokens its predictor chooses and
    runs only the running ones among them; real: (B, T) bool non-pad tokens or None.
    """
    B = grid.mask.shape[0]
    for layer in layers:
        block, router = model.blocks[layer - 1], mod.router_at(model, layer)
        if router is not None:
            xh = mod.rows_forward(block, router, x, xh, rows, (B, x.shape[0] // B), real, backend, routes, layer)
            continue
        k, v = block.kv(x.view(B, -1, x.shape[-1]))  # (B, H, T, hd)
        xh = block.forward_rows(xh, k, v, grid)
        scatter_rows(x, rows, xh, backend=backend)
    return xh
