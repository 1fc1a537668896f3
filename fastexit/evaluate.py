"""Routed evaluation (docs/design.md §3): the metrics of a routing rule over validation batches,
the FLOPs it needs, and how long it takes.

``evaluate`` resolves the rule (``routing.resolve_routing``), runs the exact or the compact
routed forward over every batch under an optional autocast, and sums each metric in fp64 on
the device (``_EvalSums``): one host sync at the end, sums reduced across torchrun ranks.
``UniversalTrainer.evaluate`` is this function with its trainer's method, device, backend and
autocast. FLOP accounting (``flop_cost``) lives here alone: ``_TokenFlops`` per token,
``confidence_head_flops`` for a learned confidence head.
"""
import contextlib
import functools
import math
import time
from typing import ContextManager, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import distributed, mod, routing
from .config import EVAL_MODES, UniversalConfig

__all__ = ["confidence_head_flops", "evaluate"]

Batch = Tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def evaluate(model: nn.Module, val_batches: Sequence[Batch], mode: str = "exact", *,
             config: Optional[UniversalConfig] = None, device: Union[str, torch.device] = "cpu",
             backend: str = "auto", autocast: Optional[ContextManager] = None,
             routing_threshold: Optional[routing.Thresholds] = None, per_layer: Optional[bool] = None,
             compare_exact: bool = False, ignore_index: int = -100, confidence: Optional[str] = None,
             exit_layers: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """Routed metrics over ``val_batches`` ((x, y) int64 (B, T) pairs), docs/design.md §3.

    Returns ``ppl``, ``acc``, ``nll``, ``shallow_ratio`` (the share of tokens leaving at any
    exit), ``exit_ratio_L{i}`` for every exit i (the share leaving there), ``compute_cost``
    (mean layers run / n_layers), ``flop_cost`` (forward matmul FLOPs of the rule / those of
    full depth), ``tokens_per_s`` and ``seconds`` (of the timed pass), ``n_tokens``; with
    ``per_layer`` also ``ppl_L{i}`` / ``acc_L{i}`` of every layer's exit. A model with
    Mixture-of-Depths routed blocks (``fastexit.mod``) adds, for each routed layer i,
    ``mod_ratio_L{i}`` (the share of tokens its predictor sent through it) and
    ``mod_agreement_L{i}`` (the share whose predictor decision equals the top-k decision
    training would have made on the same states); its compute_cost counts the blocks a token
    ran (a routed block only where it was chosen) and flop_cost their FLOPs, routers and
    predictors included.
    - ``mode='exact'``: one pass through every layer; per_layer (default on) scores every
      layer's exit in that same pass (one head pass per layer, timed with it).
    - ``mode='compact'``: only the compact routed forward runs (the fast path). per_layer
      (default off) costs an extra, untimed exact pass; ``compare_exact=True`` times an exact
      routed pass batch by batch, interleaved, and adds ``ppl_exact``, ``ppl_diff_vs_exact``
      and ``speedup_vs_exact``.
    ``config``: the method whose rule None means (its exits, per-exit thresholds and
    confidence); without one, None is no routing (``routing.resolve_routing``).
    ``routing_threshold``: one number overrides the threshold of every exit (a list: one per
    exit); ``confidence`` (learned: the model needs confidence heads) and ``exit_layers``
    override the config's. ``device``: where the batches go (the model's); ``backend``: the
    kernels' ('auto' | 'triton' | 'torch'); ``autocast``: a context the forwards run under
    (``UniversalTrainer.autocast()``), None for none.
    Under DDP / FSDP2 every rank calls it with the same ``val_batches``: each evaluates its
    share of them (under FSDP2 on a gathered copy of the weights) and the sums are reduced
    across ranks, so every rank returns the metrics of all batches. The model is put in eval
    mode and back.
    """
    _check_args(mode, val_batches, compare_exact)
    device = torch.device(device)
    model, val_batches = distributed.evaluation_model(model), distributed.this_ranks_share(val_batches)
    rule = routing.resolve_routing(model, routing_threshold, exit_layers, config, confidence)
    per_layer = mode == "exact" if per_layer is None else per_layer
    rule_kwargs = dict(exit_layer=rule.exit_layers, routing_threshold=rule.routing_thresholds,
                       confidence=rule.confidence, backend=backend)
    exact = functools.partial(routing.exact_routed_forward, **rule_kwargs)
    compact = functools.partial(routing.compact_routed_forward, **rule_kwargs)
    was_training = model.training
    model.eval()
    with autocast if autocast is not None else contextlib.nullcontext():
        if mode == "exact":
            stats, = _routed_stats(model, val_batches, [functools.partial(exact, all_layers=per_layer)], rule,
                                   ignore_index, device)
        else:
            stats = _compact_stats(model, val_batches, compact, exact, compare_exact, rule, ignore_index, device)
            if per_layer:
                layers, = _routed_stats(model, val_batches, [functools.partial(exact, all_layers=True)], rule,
                                        ignore_index, device)
                stats.update({k: v for k, v in layers.items() if k.startswith(("ppl_L", "acc_L"))})
    model.train(was_training)
    return stats


def _check_args(mode, val_batches, compare_exact) -> None:
    if mode not in EVAL_MODES:
        raise ValueError(f"mode must be one of {EVAL_MODES}, got {mode!r}")
    if not val_batches:
        raise ValueError("val_batches is empty")
    if compare_exact and mode != "compact":
        raise ValueError("compare_exact=True compares compact mode with exact mode: it needs mode='compact'")


def _compact_stats(model, val_batches, compact, exact, compare_exact, rule, ignore_index,
                   device) -> Dict[str, float]:
    if not compare_exact:
        return _routed_stats(model, val_batches, [compact], rule, ignore_index, device)[0]
    for routed_forward in (exact, compact) if val_batches else ():  # untimed: first calls pay for allocator growth
        routed_forward(model, val_batches[0][0].to(device))
    ex, stats = _routed_stats(model, val_batches, [exact, compact], rule, ignore_index, device)
    stats.update(ppl_exact=ex["ppl"], ppl_diff_vs_exact=stats["ppl"] - ex["ppl"],
                 speedup_vs_exact=ex["seconds"] / stats["seconds"])
    return stats


def _routed_stats(model, val_batches, forwards, rule, ignore_index, device) -> List[Dict[str, float]]:
    """Metrics of each routed forward over the same batches (``rule``: the routing.Routing
    it routes with). With several forwards, each batch runs all of them back to back, in
    alternating order, so that load drift on a shared machine hits their timings alike. One
    host sync at the end."""
    acc = [_EvalSums(device, model, rule) for _ in forwards]
    for i, (x, y) in enumerate(val_batches):
        x, y = x.to(device), y.to(device)
        for j in (range(len(forwards)) if i % 2 == 0 else reversed(range(len(forwards)))):
            t0 = _clock(device)
            out = forwards[j](model, x, targets=y, ignore_index=ignore_index)
            acc[j].seconds += _clock(device) - t0
            acc[j].add(out, y, ignore_index)
    return [a.summary() for a in acc]


class _EvalSums:
    """fp64 sums of one routed forward's metrics over batches, kept on the device."""

    def __init__(self, device, model: nn.Module, rule: routing.Routing):
        self.n_layers, self.exits, self.seconds = model.n_layers, list(rule.exit_layers), 0.0
        self.flops = _TokenFlops.of(model, rule.confidence)
        self.scored_exits = [e for e, t in zip(rule.exit_layers, rule.routing_thresholds) if t > 0]  # exits that are on
        routers = mod.routers_of(model)
        self.mod_layers = routers.layers if routers is not None else []
        # nll, correct, easy, blocks run, n, routed FLOPs, full-depth FLOPs, then the tokens leaving at each exit,
        # then per routed layer the tokens it ran, those whose decision agreed with top-k, and those it decided
        self.routed = torch.zeros(7 + len(self.exits) + 3 * len(self.mod_layers), dtype=torch.float64, device=device)
        self.layers = torch.zeros(self.n_layers, 2, dtype=torch.float64, device=device)  # (L, [nll, correct])
        self.has_layers = False

    def add(self, out: routing.RoutedOutput, y: torch.Tensor, ignore_index: int) -> None:
        valid, flat_y = y != ignore_index, y.reshape(-1)
        routes = out.mod_routes or {}
        decided = [routes.get(i) for i in self.mod_layers]  # a routed layer no token reached has no route
        mod_sums = [(r.chosen, r.chosen == r.top_k, torch.ones_like(valid)) if r is not None else
                    (torch.zeros_like(valid),) * 3 for r in decided]
        self.routed += _masked_sums(valid, out.nll, out.pred == y, out.easy, mod.blocks_run(out.layers_run, routes),
                                    valid, *self.flops.routed_and_full(out.layers_run, self.scored_exits, self.n_layers,
                                                                       routes),
                                    *(out.easy & (out.layers_run == i) for i in self.exits),
                                    *(t for sums in mod_sums for t in sums))
        for i, s in (out.layer_stats or {}).items():  # (B*T,) rows per layer
            self.has_layers = True
            self.layers[i - 1] += _masked_sums(valid.reshape(-1), s.nll, s.pred == flat_y)

    def summary(self) -> Dict[str, float]:
        """The metrics; under DDP / FSDP2 of every rank's batches (sums over ranks, the slowest
        rank's seconds)."""
        sums = torch.cat([self.routed, self.layers.reshape(-1), self.routed.new_tensor([self.has_layers])])
        values = distributed.sum_over_ranks(sums).tolist()  # the sync
        n_routed, n_exit_sums = self.routed.numel(), 7 + len(self.exits)
        (nll, correct, easy, layers_run, n, flops, full_flops), left = values[:7], values[7:n_exit_sums]
        mod_sums = values[n_exit_sums:n_routed]
        has_layers = values[-1] > 0
        layers = [values[n_routed + 2 * i:n_routed + 2 + 2 * i] for i in range(self.n_layers)]  # (L, [nll, correct])
        seconds = distributed.max_over_ranks(self.seconds, self.routed.device)
        if n == 0:
            raise ValueError("val_batches has no scored tokens (all targets are ignore_index)")
        out = dict(ppl=math.exp(nll / n), nll=nll / n, acc=correct / n, shallow_ratio=easy / n,
                   compute_cost=layers_run / (n * self.n_layers), flop_cost=flops / full_flops,
                   tokens_per_s=n / seconds,
                   seconds=seconds, n_tokens=int(n))
        out.update({f"exit_ratio_L{i}": count / n for i, count in zip(self.exits, left)})
        for i, (ran, agreed, decided) in zip(self.mod_layers, zip(*[iter(mod_sums)] * 3)):
            out.update({f"mod_ratio_L{i}": ran / decided if decided else math.nan,
                        f"mod_agreement_L{i}": agreed / decided if decided else math.nan})
        for i, (layer_nll, layer_correct) in enumerate(layers if has_layers else [], start=1):
            out.update({f"ppl_L{i}": math.exp(layer_nll / n), f"acc_L{i}": layer_correct / n})
        return out


# ----------------------------------------------------------------------------- FLOP accounting
def confidence_head_flops(d_model: int, exits_reached: float = 1.0) -> float:
    """Forward FLOPs of learned confidence per token: 2 * d_model per exit the token reaches
    (the exit it leaves at and every exit before it; the sigmoid and bias are not counted).
    ``compute_cost`` (mean layers run / n_layers) leaves them out; ``flop_cost`` counts them."""
    return 2 * d_model * exits_reached


class _TokenFlops(NamedTuple):
    """Forward matmul FLOPs per token of a model's parts, for ``flop_cost``: a block's weight
    GEMMs (2 x its matrices' parameters), attention per key attended (4 d: scores and values),
    the shared head (2 d V) and a learned confidence head (``confidence_head_flops``), or 0 for
    max_prob and margin, which score with a head pass at every exit reached; a learned score
    needs the head pass only where the token leaves. ``router``: a Mixture-of-Depths router's
    score and predictor (2 x their matrices' parameters), paid by every token reaching a
    routed block, which costs a block only for the tokens it runs, each attending to the
    earlier tokens it ran."""
    block: float
    attention_per_key: float
    head: float
    confidence_head: float
    router: float = 0.0

    @classmethod
    def of(cls, model: nn.Module, confidence: str) -> "_TokenFlops":
        vocab, d = model.lm_head.weight.shape
        block = 2 * sum(p.numel() for p in model.blocks[0].parameters() if p.dim() == 2)
        routers = mod.routers_of(model)
        router = 0.0 if routers is None else 2.0 * sum(p.numel() for p in next(iter(routers.values())).parameters()
                                                        if p.dim() == 2)
        return cls(float(block), 4.0 * d, 2.0 * d * vocab, confidence_head_flops(d) if confidence == "learned" else 0.0,
                   router)

    def routed_and_full(self, layers_run: torch.Tensor, exits: Sequence[int], n_layers: int,
                        routes: Optional[Dict[int, "mod.Route"]] = None):
        """(B, T) FLOPs of each token as routed (the blocks up to its exit layer, the scores at
        each of ``exits``, the exits that are on, that it reaches, and its head passes) and at
        full depth (every block, the final head); the token at position t attends to t + 1 keys.
        ``routes``: the decisions of the routed blocks that ran (``RoutedOutput.mod_routes``)."""
        keys = torch.arange(1, layers_run.shape[-1] + 1, device=layers_run.device, dtype=torch.float64)
        per_block = self.block + self.attention_per_key * keys  # (T,)
        reached = sum(((layers_run >= e) & (e < n_layers)).double() for e in exits)  # up to the one it left at
        if self.confidence_head:  # a learned score at each exit reached, one head pass where the token stops
            heads = reached * self.confidence_head + self.head
        else:  # a head pass to score each exit reached, and the final head for tokens that run to the end
            heads = reached * self.head + (layers_run == n_layers).double() * self.head
        blocks = layers_run.double() * per_block
        for layer, route in (routes or {}).items():  # a routed block: the router, and the block where chosen
            ran = self.block + self.attention_per_key * route.chosen.double().cumsum(-1)  # keys: the chosen so far
            routed = self.router + torch.where(route.chosen, ran, 0.0)
            blocks = blocks + torch.where(layers_run >= layer, routed - per_block, 0.0)
        return blocks + heads, (n_layers * per_block + self.head).expand(layers_run.shape)


def _masked_sums(valid: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
    """fp64 sum of each (B, T) value over the scored tokens, left on the device (a masked sum:
    boolean indexing would ask the host for the count)."""
    return torch.stack([torch.where(valid, v.double(), 0.0).sum() for v in values])


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
