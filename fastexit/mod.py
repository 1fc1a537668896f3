"""Mixture-of-Depths (Raposo et al., 2024): routed blocks that process a share of the tokens
and really skip the rest, in training, evaluation and cached generation (docs/design.md §10).

A routed block (a layer of ``ModelConfig.mod_layers``, or of ``model.add_routers``) has a
``Router`` in ``model.mod_routers``:

- a linear score r = w·x of each token's residual state x entering the block;
- **training**: the top ⌈c·n⌉ of each sequence's n real tokens (c = capacity) run the
  block, gathered into a dense (B, K) batch, K = ⌈c·T⌉, in their original order and with
  their own positions (rotary blocks rotate them there); each one's update is scaled by the
  router weight 2·sigmoid(r), so the score gets a gradient; the rest pass on the residual
  stream. 2·sigmoid is 1 at r = 0: a zero router (the initial one) at capacity 1 is the
  dense block. One batched top-k, no loop over sequences.
- **inference** cannot use top-k, which looks at the whole sequence. Each router has a
  causal predictor (a small MLP on the detached block input, trained by binary cross-entropy
  against the top-k decision); a token runs the block where its logit is > 0. Evaluation
  and generation decide token by token from it, so no token's route or output depends on a
  later one. Its BCE is added to the training loss inside the backward pass (``_AddLoss``):
  any loop that backpropagates the LM loss trains it, and the loss value it reports is the
  LM loss alone. The input is detached, so the predictor never changes the LM's gradients.
- **attention** of a routed block is among the tokens it processes (MoD's own semantics): a
  skipped token writes no keys/values there, in training, evaluation and generation alike.
  Processed tokens attend causally to the earlier processed tokens of their sequence.

Every routed computation runs on the gathered tokens only (their keys/values, queries,
projections and MLP): a routed block costs about c of its dense FLOPs (attention c²).
"""
import math
from typing import Dict, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import compact_indices, gather_rows, replace_rows, scatter_rows, select_rows
from .layers import KVCache, QueryGrid, pack_left

__all__ = ["Route", "Router", "Routers", "blocks_run", "decode_step", "prefill", "routed_forward",
           "router_at", "routers_of", "rows_forward", "run_block", "set_predictor_shares", "top_k",
           "track_writes"]

PREDICTOR_WIDTH_RATIO = 8  # the predictor's hidden width is d_model // 8 (at least MIN_PREDICTOR_WIDTH)
MIN_PREDICTOR_WIDTH = 8


class Route(NamedTuple):
    """One routed block's decisions over a batch, (B, T) bool each: ``chosen``, the tokens
    that ran it (top-k in training, the predictor in inference), and ``top_k``, the top-k
    decision on the same router scores (their agreement is ``mod_agreement_L{i}``)."""
    chosen: torch.Tensor
    top_k: torch.Tensor


class Router(nn.Module):
    """The router of one routed block: ``score`` (d -> 1, zero-initialised) and the causal
    ``predictor`` (rms-normed d -> d // 8 -> 1 MLP), at ``capacity`` in (0, 1]."""

    def __init__(self, d_model: int, capacity: float, like: torch.Tensor):
        super().__init__()
        self.capacity = float(capacity)
        kw = dict(device=like.device, dtype=like.dtype)
        self.score = nn.Linear(d_model, 1, bias=False, **kw)
        nn.init.zeros_(self.score.weight)
        width = max(MIN_PREDICTOR_WIDTH, d_model // PREDICTOR_WIDTH_RATIO)
        self.predictor = nn.Sequential(nn.Linear(d_model, width, **kw), nn.GELU(approximate="tanh"),
                                       nn.Linear(width, 1, **kw))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits r (...) fp32 (fp64 for fp64 states) of residual states x (..., d)."""
        return _at_least_fp32(self.score(x).squeeze(-1))

    @staticmethod
    def weight(r: torch.Tensor) -> torch.Tensor:
        """The factor 2·sigmoid(r) a processed token's update is scaled by (1 at r = 0)."""
        return 2 * torch.sigmoid(r)

    def gate(self, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor,
             valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The new states of tokens that ran the block: lerp(x, y, 2·sigmoid(r)), x (..., d)
        before it, y after it, r (...) their scores; x itself where ``valid`` (...) is False."""
        w = self.weight(r) if valid is None else torch.where(valid, self.weight(r), 0.0)
        return torch.lerp(x, y, w.to(x.dtype)[..., None])

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predictor logits (...) fp32 of the detached states x (..., d): > 0 runs the block."""
        x = x.detach()
        return _at_least_fp32(self.predictor(F.rms_norm(x, x.shape[-1:])).squeeze(-1))

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}"


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


class Routers(nn.ModuleDict):
    """The routers of a model, keyed by str(layer) (1-indexed), as ``model.mod_routers``."""

    def add(self, layers: Sequence[int], capacity: float, like: torch.Tensor) -> None:
        """A ``Router`` at each of ``layers`` that has none, on like's device and dtype."""
        for layer in layers:
            if str(layer) not in self:
                self[str(layer)] = Router(like.shape[-1], capacity, like)

    @property
    def layers(self):
        return sorted(int(k) for k in self)

    def capacities(self) -> Dict[str, float]:
        """{str(layer): capacity} of every router (JSON-safe; ``add`` one layer each to rebuild)."""
        return {str(layer): self[str(layer)].capacity for layer in self.layers}


def routers_of(model) -> Optional[Routers]:
    """The model's routers (``model.mod_routers``), or None for a model without routed blocks."""
    routers = getattr(model, "mod_routers", None)
    return routers if routers is not None and len(routers) else None


def router_at(model, layer: int) -> Optional[Router]:
    routers = routers_of(model)
    return None if routers is None or str(layer) not in routers else routers[str(layer)]


# ----------------------------------------------------------------------------- choosing tokens
def top_k(r: torch.Tensor, capacity: float, real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, T) bool: the ⌈capacity·n⌉ highest scores r (B, T) of each row's n real tokens
    (real: (B, T) bool, None = all). Ties go to either token."""
    B, T = r.shape
    K = math.ceil(capacity * T)
    if real is None:
        return torch.zeros_like(r, dtype=torch.bool).scatter_(1, r.topk(K, dim=1).indices, True)
    k = torch.ceil(real.sum(1).double() * capacity).long()  # (B,): the same arithmetic as K's for a full row
    idx = r.masked_fill(~real, -math.inf).topk(K, dim=1).indices  # pads rank last
    keep = torch.arange(K, device=r.device) < k[:, None]
    return torch.zeros_like(r, dtype=torch.bool).scatter_(1, idx, keep)


class _Packed(NamedTuple):
    """The chosen tokens of each row packed left into (B, S) slots, in their original order:
    cols (B, S) int64 their columns (slots past a row's count hold its unchosen columns, so
    every row's columns stay distinct); valid (B, S) bool; flat (B*S,) int64 rows b*T + col."""
    cols: torch.Tensor
    valid: torch.Tensor
    flat: torch.Tensor


def _pack(chosen: torch.Tensor, n_slots: Optional[int] = None) -> _Packed:
    """Pack chosen (B, T) bool; n_slots: S when known (top-k), else the largest row count
    (one host sync)."""
    B, T = chosen.shape
    counts = chosen.sum(1)  # (B,)
    S = n_slots if n_slots is not None else (int(counts.max()) if B else 0)
    cols = (~chosen).to(torch.int8).argsort(dim=1, stable=True)[:, :S]  # chosen columns first, ascending
    valid = torch.arange(S, device=chosen.device) < counts[:, None]
    flat = (cols + T * torch.arange(B, device=chosen.device)[:, None]).reshape(-1)
    return _Packed(cols, valid, flat)


def _decide(router: Router, x: torch.Tensor, real: Optional[torch.Tensor]) -> torch.Tensor:
    """(...) bool: the predictor's causal decision for states x (..., d), never on pads."""
    chosen = router.predict(x) > 0
    return chosen if real is None else chosen & real


# ----------------------------------------------------------------------------- every token (training, dense passes)
def set_predictor_shares(model, idx: torch.Tensor) -> None:
    """Shift each routed block's predictor bias so that, on the tokens idx (B, T) and the
    states they reach (every block run on every token), it picks the share of them that its
    router's capacity says: the untuned baseline of router-tuning (an untrained predictor picks
    an arbitrary share). Puts ``model`` in eval mode."""
    model.eval()
    with torch.no_grad():
        x = model.embed(idx)
        for layer in range(1, model.n_layers + 1):
            router = router_at(model, layer)
            if router is not None:
                router.predictor[-1].bias -= router.predict(x).quantile(1 - router.capacity)
            x = run_block(model, layer, x)


def run_block(model, layer: int, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
              real: Optional[torch.Tensor] = None, routes: Optional[Dict[int, Route]] = None) -> torch.Tensor:
    """Block ``layer`` (1-indexed) of ``model`` on every token x (B, T, d): the block itself
    (mask: ``padding_layout``'s or None), or for a routed block its Mixture-of-Depths forward
    (``routed_forward``; real (B, T) bool: the non-pad tokens, None = all). ``routes``: where
    a routed block records its decisions, {layer: Route}."""
    block, router = model.blocks[layer - 1], router_at(model, layer)
    if router is None:
        return block(x, mask)
    return routed_forward(block, router, x, real, routes, layer)


def routed_forward(block: nn.Module, router: Router, x: torch.Tensor, real: Optional[torch.Tensor] = None,
                   routes: Optional[Dict[int, Route]] = None, layer: Optional[int] = None) -> torch.Tensor:
    """A routed block on x (B, T, d) -> (B, T, d): the tokens chosen (top-k when the router is
    in training mode, else the predictor) run ``block`` gathered into (B, S) slots in their
    order and at their own positions; the others pass unchanged. The block always runs (on
    zero slots when nothing is chosen), so that under FSDP2 every rank joins its all-gather."""
    B, T, d = x.shape
    r = router.scores(x)  # (B, T)
    if router.training:
        chosen = top_k(r, router.capacity, real)
        packed = _pack(chosen, math.ceil(router.capacity * T) if B else 0)  # no sync: K is known
    else:
        chosen = _decide(router, x, real)
        packed = _pack(chosen)
    if routes is not None:
        routes[layer] = Route(chosen, chosen if router.training else top_k(r, router.capacity, real))
    if packed.cols.shape[1] == 0:  # nothing chosen (inference): the block still runs, on zero rows
        return x + 0 * block(x[:0], None).sum()
    flat_x = x.reshape(B * T, d)
    x_sel = select_rows(flat_x, packed.flat).view(B, -1, d)  # (B, S, d)
    # Chosen tokens fill each row's first slots in order: plain causal attention over the slots
    # is causal attention among them by position, and no chosen token sees a slot past them.
    y = block(x_sel, None, packed.cols)
    new = router.gate(x_sel, y, r.gather(1, packed.cols), packed.valid)  # (B, S, d)
    out = replace_rows(flat_x, packed.flat, new.reshape(-1, d)).view(B, T, d)
    if router.training and torch.is_grad_enabled():
        out = _AddLoss.apply(out, _predictor_loss(router, x, chosen, real))
    return out


def _predictor_loss(router: Router, x: torch.Tensor, chosen: torch.Tensor, real: Optional[torch.Tensor]):
    """Mean binary cross-entropy of the predictor's logits against the top-k decision, over
    the real tokens (input detached: it trains the predictor alone)."""
    logit = router.predict(x)
    bce = F.binary_cross_entropy_with_logits(logit, chosen.to(logit.dtype), reduction="none")
    if real is None:
        return bce.mean()
    return torch.where(real, bce, 0.0).sum() / real.sum().clamp(min=1)


class _AddLoss(torch.autograd.Function):
    """Returns x unchanged; its backward also gives ``loss`` a gradient of 1, as if it had
    been added to whatever the caller backpropagates (DeepSeek-MoE's AddAuxiliaryLoss). The
    caller's loss value and gradients are untouched where ``loss`` does not depend on them."""

    @staticmethod
    def forward(ctx, x, loss):
        ctx.loss_dtype = loss.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), dtype=ctx.loss_dtype, device=grad.device)


# ----------------------------------------------------------------------------- some tokens (compact routing)
def rows_forward(block: nn.Module, router: Router, x: torch.Tensor, xh: torch.Tensor, rows: torch.Tensor, shape,
                 real: Optional[torch.Tensor] = None, backend: str = "auto",
                 routes: Optional[Dict[int, Route]] = None, layer: Optional[int] = None) -> torch.Tensor:
    """A routed block in compact routing (inference): x (B*T, d) the current states of every
    token (carried for those that left at an exit), updated in place; xh (n, d) the states of
    the running tokens at the flat rows (n,). Every token the predictor chooses (running or
    not) gives the block keys/values from its current state, as dense blocks take them from
    carried states; the running chosen ones alone pay for queries, projections and MLP.
    Returns the running tokens' new states (n, d)."""
    B, T = shape
    r = router.scores(x).view(B, T)
    chosen = _decide(router, x, None if real is None else real.reshape(-1)).view(B, T)
    if routes is not None:
        routes[layer] = Route(chosen, top_k(r, router.capacity, real))
    q_idx = compact_indices(chosen.view(-1).index_select(0, rows), backend=backend)  # (n_q,) among the running
    if q_idx.numel() == 0:
        return xh
    keys = _pack(chosen)
    k, v = block.kv(gather_rows(x, keys.flat, backend=backend).view(B, -1, x.shape[-1]), keys.cols)
    q_rows = gather_rows(rows, q_idx, backend=backend)
    rank = (chosen.cumsum(1) - 1).view(-1).index_select(0, q_rows)  # each query's own slot among the keys
    xq = gather_rows(xh, q_idx, backend=backend)
    yq = block.forward_rows(xq, k, v, _key_slot_grid(q_rows, rank, B, T, keys.cols.shape[1]))
    out = router.gate(xq, yq, r.view(-1).index_select(0, q_rows))
    scatter_rows(x, q_rows, out, backend=backend)
    return scatter_rows(xh.clone(), q_idx, out, backend=backend)


def _key_slot_grid(q_rows: torch.Tensor, rank: torch.Tensor, B: int, T: int, n_keys: int) -> QueryGrid:
    """Queries at the flat rows q_rows (n,) (ascending) packed left per batch row into a (B, S)
    grid over packed keys (B, n_keys): query i sees the keys of its row up to its own slot
    rank[i]; its rotary position is its column."""
    slot, n_slots = pack_left(q_rows, B, T)
    last = torch.zeros(B * n_slots, dtype=torch.int64, device=q_rows.device).index_copy_(0, slot, rank)
    mask = torch.arange(n_keys, device=q_rows.device) <= last.view(B, n_slots, 1)  # (B, S, n_keys)
    return QueryGrid(slot, n_slots, mask.unsqueeze(1), q_rows % T)


# ----------------------------------------------------------------------------- generation
def track_writes(cache: KVCache) -> KVCache:
    """Make ``cache`` a routed block's: it records which slots hold keys (``KVCache.written``)."""
    cache.written = torch.zeros(cache.k.shape[0], cache.k.shape[2], dtype=torch.bool, device=cache.k.device)
    return cache


def prefill(block: nn.Module, router: Router, cache: KVCache, x: torch.Tensor,
            real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A routed block on a prompt x (B, T0, d) from cache slot 0 (real: (B, T0) bool non-pad
    tokens or None): the chosen tokens' keys/values go to their own slots, they attend among
    themselves and the others pass unchanged -> (B, T0, d)."""
    B, T, d = x.shape
    r = router.scores(x)
    chosen = _decide(router, x, real)
    cache.written[:, :T] = chosen
    packed = _pack(chosen)
    S = packed.cols.shape[1]
    if S == 0:
        return x
    flat_x = x.reshape(B * T, d)
    x_sel = flat_x.index_select(0, packed.flat)  # (B*S, d)
    k, v = block.kv(x_sel.view(B, S, d), packed.cols)  # (B, H, S, hd) at their own positions
    cache.put(torch.arange(B, device=x.device)[:, None], packed.cols, k.transpose(1, 2), v.transpose(1, 2))
    causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()[None, None]
    grid = QueryGrid(torch.arange(B * S, device=x.device), S, causal, packed.cols.reshape(-1))
    out = router.gate(x_sel, block.forward_rows(x_sel, k, v, grid), r.gather(1, packed.cols).reshape(-1),
                      packed.valid.reshape(-1))
    return flat_x.index_copy(0, packed.flat, out).view(B, T, d)


def decode_step(block: nn.Module, router: Router, cache: KVCache, x: torch.Tensor, xh: torch.Tensor,
                rows: torch.Tensor, pos: int, backend: str = "auto"):
    """A routed block for one decode position ``pos``: x (B, d) the current states of every
    row (carried for rows that left at an exit), xh (n, d) those of the running rows (n,).
    Every chosen row writes its keys/values at slot pos from its current state; the running
    chosen rows attend over the slots their row's block processed and run it. Returns
    (x, xh) after the block.

    One host sync (the chosen rows' count; a second, the running ones', once rows have left at
    an exit). A step where no row chose the block costs the predictor alone; where every row
    runs it, it is the dense cached step with the unwritten slots masked (no gathered copies:
    at one row, the common case, this is every step that runs the block); otherwise only the
    chosen rows run, gathered."""
    B = x.shape[0]
    chosen = _decide(router, x, None)
    cache.written[:, pos] = chosen
    writers = compact_indices(chosen, backend=backend)
    if writers.numel() == 0:
        return x, xh
    every_row = rows.numel() == B  # rows = 0..B-1 and xh holds the same states as x
    if every_row and writers.numel() == B:
        y = block.forward_cached(x[:, None], cache, pos, cache.written[:, None, None, :pos + 1])[:, 0]
        x = router.gate(x, y, router.scores(x))
        return x, x
    at = torch.full((writers.numel(), 1), pos, dtype=torch.int64, device=x.device)
    x_w = gather_rows(x, writers, backend=backend)  # (m, d)
    k, v = block.kv(x_w[:, None], at)  # (m, H, 1, hd)
    cache.put(writers, pos, k[:, :, 0], v[:, :, 0])
    if every_row:  # the writers are the queries; they read the cache in place (no copy of their rows)
        q_idx = q_rows = writers
        grid = QueryGrid(q_rows, 1, cache.written[:, None, None, :pos + 1], torch.full_like(q_rows, pos))
        kv, xq = cache.upto(pos + 1), x_w
    else:
        q_idx = compact_indices(chosen.index_select(0, rows), backend=backend)
        if q_idx.numel() == 0:
            return x, xh
        q_rows = gather_rows(rows, q_idx, backend=backend)
        mask = cache.written.index_select(0, q_rows)[:, None, None, :pos + 1]  # (n_q, 1, 1, pos+1)
        grid = QueryGrid(torch.arange(q_rows.numel(), device=x.device), 1, mask, torch.full_like(q_rows, pos))
        kv, xq = cache.upto(pos + 1, q_rows), gather_rows(xh, q_idx, backend=backend)
    yq = block.forward_rows(xq, *kv, grid)
    out = router.gate(xq, yq, router.scores(xq))
    x = scatter_rows(x.clone(), q_rows, out, backend=backend)
    if every_row:  # one copy serves both
        return x, x
    return x, scatter_rows(xh.clone(), q_idx, out, backend=backend)


# ----------------------------------------------------------------------------- accounting
def blocks_run(layers_run: torch.Tensor, routes: Optional[Dict[int, Route]]) -> torch.Tensor:
    """(B, T) blocks each token ran: its layers up to ``layers_run`` (the exit it left at),
    less the routed ones among them that it skipped; ``layers_run`` itself without routes."""
    if not routes:
        return layers_run
    skipped = sum(((layers_run >= layer) & ~route.chosen).long() for layer, route in routes.items())
    return layers_run - skipped
