"""Batched early-exit generation with a per-layer KV cache (docs/design.md §3, token by token).

Each new token is routed as in ``fastexit.routing``: at each exit a row whose confidence is
>= that exit's threshold emits from there; the rows still running are compacted and alone
run the next blocks' query, attention output, MLP and the next exit's (at the end the final)
head, while the deeper caches of rows that left are filled from their carried exit state
(state propagation). With a learned confidence an exit is scored by its confidence head, and
the LM head runs there only on the rows leaving it (their greedy picks; sampling draws once per
step from each row's exit state). An exit whose threshold is 0 is not scored (no row leaves
it), but for the last exit when ``return_conf`` reports its confidence. The arithmetic is the model's own:
``Block.forward_cached`` for dense steps, ``Block.kv`` + ``Block.forward_rows`` for the running rows.
A Mixture-of-Depths routed block (``fastexit.mod``) decides per row from its causal predictor:
the rows it chooses write their keys/values at their own slot of its cache (which records the
slots written) and attend over the slots it processed; the other rows pass it unchanged.

``speculative=k`` replaces routing by lossless self-speculative decoding (LayerSkip): the
layers up to ``exit_layer`` (the first exit when there are several) draft k tokens and the
full model verifies them in one pass (section "speculative decoding" below).
"""
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import mod
from .config import UniversalConfig
from .kernels import compact_indices, exit_confidence, gather_rows, scatter_rows
from .layers import QueryGrid, padding_layout
from .protocol import require_early_exit
from .routing import Layers, Routing, Thresholds, easy_mask, exit_score, resolve_routing


class Generation(NamedTuple):
    """What ``generate`` returns: tokens (B, T0 + max_new_tokens) int64, prompt included;
    layers_run (B, max_new_tokens) int64, the layer each new token left at (n_layers: full
    depth); conf (B, max_new_tokens) fp32 with ``return_conf``, else None; stats (speculative
    decoding's acceptance counts) with ``return_stats``, else None."""
    tokens: torch.Tensor
    layers_run: torch.Tensor
    conf: Optional[torch.Tensor] = None
    stats: Optional[dict] = None


def _check_prompt(model, idx, max_new_tokens, attention_mask) -> None:
    require_early_exit(model)
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
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype.is_floating_point \
            or attention_mask.shape != idx.shape or attention_mask.device != idx.device:
        raise ValueError(f"attention_mask must be a bool or 0/1 int tensor of idx's shape {tuple(idx.shape)} on "
                         f"{idx.device}, got {getattr(attention_mask, 'dtype', type(attention_mask).__name__)} of "
                         f"shape {tuple(getattr(attention_mask, 'shape', ()))}")
    if not (attention_mask[:, -1].all() and (attention_mask[:, 1:] >= attention_mask[:, :-1]).all()):
        raise ValueError("attention_mask: prompts must be left-padded (each row False... then True..., "
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


def _prompt_layout(idx, attention_mask: Optional[torch.Tensor], max_new_tokens) -> _Prompt:
    B, T0 = idx.shape
    if attention_mask is None or bool(attention_mask.all()):
        positions = torch.arange(T0, device=idx.device).expand(B, T0)
        return _Prompt(positions, torch.full((B,), T0, device=idx.device), None, None)
    real = attention_mask.bool()
    positions, prefill = padding_layout(real, idx)
    key_ok = torch.cat([real, real.new_ones(B, max_new_tokens)], dim=1)
    return _Prompt(positions, real.sum(1), prefill, key_ok)


def _decode_shallow(model, tok: torch.Tensor, caches, slot, positions, mask, backend="auto") -> torch.Tensor:
    """Token ids tok (B,) at cache slot ``slot`` (an int, or (B,) int64 per row; positions
    (B, 1) int64) through the first len(caches) blocks -> (B, d)."""
    x = model.embed(tok[:, None], positions=positions)  # (B, 1, d)
    for layer, (block, cache) in enumerate(zip(model.blocks, caches), start=1):
        router = mod.router_at(model, layer)
        if router is None:
            x = block.forward_cached(x, cache, slot, mask)
        else:  # every row is running here
            every_row = torch.arange(x.shape[0], device=x.device)
            x = mod.decode_step(block, router, cache, x[:, 0], x[:, 0], every_row, slot, backend)[0][:, None]
    return x.squeeze(1)


def _decode_deeper(model, layers, caches, x, xh, rows, pos: int, mask, backend):
    """The blocks of ``layers`` for one decode position: x (B, d) current states of all rows,
    xh (n, d) those of the running rows (n,). Every row's keys/values at ``pos`` are written
    from its current state (carried for rows that left); only running rows run q/out/MLP, and
    their attention reads only their own rows of the cache (decode attention is memory-bound:
    the gathered copy costs less than reading every row's keys and values). A routed block
    (``mod.decode_step``) writes and runs only the rows its predictor chooses. mask:
    (B, 1, 1, pos+1) bool keys to attend for padded prompts, else None. Returns (x, xh)
    after the blocks."""
    B = x.shape[0]
    blocks = [model.blocks[layer - 1] for layer in layers]
    routers = [mod.router_at(model, layer) for layer in layers]
    if rows.numel() == B:  # every row is running (rows = 0..B-1): xh holds x's states, no gathers
        for block, router, cache in zip(blocks, routers, caches):
            if router is None:
                x = block.forward_cached(x[:, None], cache, pos, mask)[:, 0]
            else:
                x = mod.decode_step(block, router, cache, x, x, rows, pos, backend)[0]
        return x, x
    hard_mask = mask.index_select(0, rows) if mask is not None else None  # (n, 1, 1, pos+1)
    grid = QueryGrid(torch.arange(rows.numel(), device=x.device), 1, hard_mask)  # one query per cache row
    x = x.clone()  # refreshed in place with the running rows' states below
    for block, router, cache in zip(blocks, routers, caches):
        if router is not None:
            x, xh = mod.decode_step(block, router, cache, x, xh, rows, pos, backend)
            continue
        cache.write(pos, *block.kv(x.unsqueeze(1)))
        if rows.numel():
            xh = block.forward_rows(xh, *cache.upto(pos + 1, rows), grid)  # (n, H, pos+1, hd) keys
            scatter_rows(x, rows, xh, backend=backend)
    return x, xh


def _emit(model, h, pred, temperature, top_k, generator):
    """Tokens (B,): pred (B,) when greedy, else a draw from the sampling distribution of the
    normed states h (B, d)."""
    if temperature == 0:
        return pred
    return torch.multinomial(_probs(model.lm_head(h), temperature, top_k), 1, generator=generator).squeeze(1)


def _put(full, rows, part, backend):
    """full (B, ...) with its rows (n,) replaced by part (n, ...) in place; part itself when
    there is no full yet (the first exit sees every row)."""
    return part if full is None else scatter_rows(full, rows, part, backend=backend)


def _probs(logits: torch.Tensor, temperature: float, top_k: Optional[int]) -> torch.Tensor:
    """The sampling distribution (..., V) fp32 of logits (..., V): softmax(logits / temperature)
    over the top_k logits (all when None)."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(-1)


def _prefill(model, idx, caches, prompt: _Prompt, layers) -> list:
    """Every layer for every prompt position (B, T0), filling ``caches`` from slot 0; returns
    the last position's states (B, d) after each of ``layers``."""
    x, states = model.embed(idx, positions=prompt.positions), {}
    real = prompt.key_ok[:, :idx.shape[1]] if prompt.key_ok is not None else None
    for i, (block, cache) in enumerate(zip(model.blocks, caches), start=1):
        router = mod.router_at(model, i)
        if router is None:
            x = block.forward_cached(x, cache, 0, prompt.prefill_mask)
        else:
            x = mod.prefill(block, router, cache, x, real)
        states[i] = x[:, -1]
    return [states[i] for i in layers]


class _Decoder:
    """The state of one generate call: caches, output buffers and the routing rule."""

    def __init__(self, model, idx, max_new_tokens, rule: Routing, prompt: _Prompt, want_conf, sampling, backend):
        (B, T0), self.model, self.prompt, self.backend = idx.shape, model, prompt, backend
        self.rule, self.sampling = rule, sampling
        # exits to score: those that are on, and the last one when its confidence is returned (rows
        # running to the end report it); nobody leaves an off exit, and nothing else reads its score
        last = len(rule.exit_layers) - 1
        self.scored = [t > 0 or (want_conf and i == last) for i, t in enumerate(rule.routing_thresholds)]
        self.caches = model.new_kv_caches(B, T0 + max_new_tokens, range(1, model.n_layers + 1))
        self.tokens = torch.cat([idx, idx.new_empty(B, max_new_tokens)], dim=1)
        self.layers_run = idx.new_empty(B, max_new_tokens)
        self.confs = torch.empty(B, max_new_tokens, device=idx.device)
        self.all_rows = torch.arange(B, device=idx.device)

    def step(self, s: int, pos: int, x, prefill=None) -> None:
        """Emit the token at ``pos`` (step s) from x (B, d), the first exit's states of the token
        at pos - 1. prefill: the prefill's states (B, d) at every later exit and the final layer
        (every layer already ran); otherwise the deeper blocks run here."""
        model, L, key_ok, backend = self.model, self.model.n_layers, self.prompt.key_ok, self.backend
        mask = key_ok[:, None, None, :pos] if key_ok is not None else None  # keys of slots 0..pos-1
        greedy, bounds = self.sampling[0] == 0, self.rule.exit_layers + [L]
        rows, xh, at = self.all_rows, x, torch.full_like(self.all_rows, L)  # running rows (n,), states (n, d)
        h_out = pred = conf = None
        for i, layer in enumerate(bounds):
            if i and prefill is not None:
                xh = gather_rows(prefill[i - 1], rows, backend=backend)
            elif i:  # rows that left still write these blocks' caches, from their carried state
                x, xh = _decode_deeper(model, range(bounds[i - 1] + 1, layer + 1), self.caches[bounds[i - 1]:layer],
                                       x, xh, rows, pos - 1, mask, backend)
            final = i == len(bounds) - 1
            if not rows.numel() or not (final or self.scored[i]):
                continue
            h = model.exit_norms[layer - 1](xh)  # (n, d)
            # the final head scores only greedy picks; an exit's its confidence (max_prob, margin) and the
            # running rows' greedy picks; a learned confidence comes from the exit's own head, and the LM
            # head then runs below on the rows leaving there only (the others pick deeper)
            kind = self.rule.confidence
            score = greedy if final else kind != "learned"
            margin = kind == "margin" and not final
            stats = exit_confidence(h, model.lm_head.weight, want_margin=margin, backend=backend) if score else None
            h_out = _put(h_out, rows, h, backend) if not greedy else None
            pred = _put(pred, rows, stats.pred, backend) if greedy and stats is not None else pred
            if final:
                continue
            c = exit_score(stats, kind, model, layer, h)
            conf, leave = _put(conf, rows, c, backend), easy_mask(c, self.rule.routing_thresholds[i])
            at = scatter_rows(at, rows, torch.where(leave, layer, L), backend=backend)
            stay = compact_indices(~leave, backend=backend)  # (n',) of the running rows: the exit's one host sync
            if stay.numel() < rows.numel():
                if greedy and kind == "learned":  # no head pass above: the picks of the rows leaving here
                    pred = self.leaving_picks(pred, rows, h, leave, rows.numel() - stay.numel())
                rows, xh = gather_rows(rows, stay, backend=backend), gather_rows(xh, stay, backend=backend)
        self.tokens[:, pos] = _emit(model, h_out, pred, *self.sampling)
        self.layers_run[:, s] = at
        if conf is not None:
            self.confs[:, s] = conf

    def leaving_picks(self, pred, rows, h, leave, n_leave: int) -> torch.Tensor:
        """pred (B,) (None before any pick) with the greedy picks of the n_leave leaving rows
        written in: rows (n,) the running rows, leave (n,) bool, h (n, d) their exit-normed states."""
        backend = self.backend
        go = torch.nonzero_static(leave, size=n_leave).squeeze(1)  # no sync: the count is the exit's own
        picks = exit_confidence(gather_rows(h, go, backend=backend), self.model.lm_head.weight, backend=backend).pred
        pred = pred if pred is not None else torch.empty_like(self.all_rows)  # every row is picked by the end
        return scatter_rows(pred, gather_rows(rows, go, backend=backend), picks, backend=backend)

    def shallow(self, s: int, pos: int):
        """First-exit states (B, d) of the token emitted at pos - 1."""
        mask = self.prompt.key_ok[:, None, None, :pos] if self.prompt.key_ok is not None else None
        positions = (self.prompt.lengths + s - 1)[:, None]
        return _decode_shallow(self.model, self.tokens[:, pos - 1], self.caches[:self.rule.exit_layers[0]], pos - 1,
                               positions, mask, self.backend)


# ----------------------------------------------------------------------------- speculative decoding
# LayerSkip-style self-speculation: the blocks up to exit_layer, its exit norm and the shared
# head draft k tokens one decode step at a time; the deeper blocks then verify them in one pass.
# The shallow layers never depend on deeper ones, so the draft's exit-layer states and shallow
# keys/values are exactly what a full-depth pass over the same tokens computes: the verify pass
# starts at block exit_layer + 1. Row r's token at column c of the token buffer lives in cache
# slot c of every layer. Rows accept different numbers of drafts, so each row writes at its own
# slots (KVCache.write with per-row starts) and attends through its own causal mask; slots past
# a row's length hold rejected drafts, which the mask hides until the next round overwrites them.


def _check_speculative(model, speculative, routing_threshold, exit_layer, T0, max_new_tokens, return_conf) -> None:
    if speculative is None:
        raise ValueError("return_stats: acceptance statistics come with speculative=k only")
    if isinstance(speculative, bool) or not isinstance(speculative, int) or speculative < 1:
        raise ValueError(f"speculative must be an int >= 1 (tokens drafted per round), got {speculative!r}")
    if routing_threshold > 0:
        raise ValueError(f"speculative={speculative} and routing_threshold={routing_threshold} are two decoding "
                         f"modes: pass routing_threshold=0 (or None) with speculative")
    if exit_layer >= model.n_layers:
        raise ValueError(f"exit_layer: speculative decoding drafts with the layers up to exit_layer, which must be "
                         f"< n_layers={model.n_layers}, got {exit_layer}")
    need, limit = T0 + max_new_tokens + speculative - 1, model.cfg.max_seq_len
    if need > limit:
        raise ValueError(f"speculative={speculative}: drafts run up to {speculative - 1} positions past the last "
                         f"new token, so a {T0}-token prompt with max_new_tokens={max_new_tokens} needs {need} "
                         f"positions, more than max_seq_len={limit}")
    if return_conf:
        raise ValueError("return_conf: speculative decoding has no routing confidences (use return_stats)")


def _row_causal_mask(key_ok: torch.Tensor, start: torch.Tensor, t: int, end: int) -> torch.Tensor:
    """(B, 1, t, end) bool, end = max(start) + t: query j of row r (slot start[r] + j) sees the
    non-pad slots (key_ok (B, >= end)) up to its own."""
    q_slot = start[:, None] + torch.arange(t, device=start.device)  # (B, t)
    causal = torch.arange(end, device=start.device) <= q_slot[..., None]  # (B, t, end)
    return (causal & key_ok[:, None, :end]).unsqueeze(1)


class _Speculator:
    """The state of one speculative generate call. pend (B,): column of each row's newest
    token, which no cache holds yet (the verifier emitted it); a row is done once pend reaches
    ``last``, the column of its max_new_tokens-th token."""

    def __init__(self, model, idx, max_new_tokens, k, exit_layer, prompt: _Prompt, sampling, backend):
        (B, T0), self.model, self.k, self.exit_layer = idx.shape, model, k, exit_layer
        self.prompt, self.sampling, self.backend = prompt, sampling, backend
        width = T0 + max_new_tokens + k  # a round writes tokens up to k + 1 columns past the last pending one
        # zeroed: the per-row masks hide slots a row has not written, but garbage there could be NaN
        self.caches = model.new_kv_caches(B, width - 1, range(1, model.n_layers + 1), zeroed=True)
        self.tokens = torch.cat([idx, idx.new_zeros(B, width - T0)], dim=1)  # (B, width)
        self.key_ok = prompt.key_ok if prompt.key_ok is not None else idx.new_ones(B, width, dtype=torch.bool)
        self.pads = T0 - prompt.lengths  # (B,) position = column - pads
        self.t0, self.last, self.pend = T0, T0 + max_new_tokens - 1, idx.new_full((B,), T0)
        self.accepted, self.drafted = idx.new_zeros(B), idx.new_zeros(B)

    def first_token(self, x_last) -> None:
        """The token at column T0 from the prefill's final states x_last (B, d), as generate."""
        h = self.model.exit_norms[-1](x_last)
        greedy = self.sampling[0] == 0
        pred = exit_confidence(h, self.model.lm_head.weight, backend=self.backend).pred if greedy else None
        self.tokens[:, self.t0] = _emit(self.model, h, pred, *self.sampling)

    def progress(self):
        """(lowest pending column, highest draft start) in the round's one host sync: whether any
        row still needs tokens, and how many cache slots the round's attention reads."""
        lowest, top = torch.stack([self.pend.min(), self.pend.clamp(max=self.last - 1).max()]).tolist()
        return lowest, top

    def round(self, top: int) -> None:
        """Draft, verify and keep the agreeing prefix plus the verifier's token, per row
        (top: the highest draft start, from ``progress``)."""
        active = self.pend < self.last
        start = self.pend.clamp(max=self.last - 1)  # done rows recompute a frozen slot; their output is dropped
        states, drafts, q = self.draft(start, top)
        h = self.verify(states, start, top)
        new, n_acc = self.accept_greedy(h, drafts) if q is None else self.accept_sampled(h, drafts, q)
        cols = start[:, None] + 1 + torch.arange(self.k + 1, device=start.device)  # (B, k+1)
        keep = active[:, None] & (cols <= (start + n_acc + 1)[:, None])
        self.tokens.scatter_(1, cols, torch.where(keep, new, self.tokens.gather(1, cols)))
        self.pend += torch.where(active, n_acc + 1, 0)
        self.accepted += torch.where(active, n_acc, 0)
        self.drafted += torch.where(active, self.k, 0)

    def draft(self, start: torch.Tensor, top: int):
        """k + 1 shallow decode steps from the pending token at column start (B,) (top =
        max(start)): drafts (B, k) from the exit head, their distributions q (B, k, V) (None
        when greedy), and the exit-layer states (B, k+1, d) of the pending token and every
        draft for the verifier."""
        model, E = self.model, self.exit_layer
        tok, states, drafts, qs = self.tokens.gather(1, start[:, None]).squeeze(1), [], [], []
        for j in range(self.k + 1):
            slot = start + j
            x = _decode_shallow(model, tok, self.caches[:E], slot, (slot - self.pads)[:, None],
                                _row_causal_mask(self.key_ok, slot, 1, top + j + 1))  # (B, d)
            states.append(x)
            if j < self.k:
                tok, q = self.draw(model.exit_norms[E - 1](x))
                drafts.append(tok), qs.append(q)
        q = torch.stack(qs, 1) if qs[0] is not None else None
        return torch.stack(states, 1), torch.stack(drafts, 1), q

    def draw(self, h: torch.Tensor):
        """A draft token (B,) from exit-normed states h (B, d), and its distribution q (B, V)."""
        temperature, top_k, generator = self.sampling
        if temperature == 0:
            return exit_confidence(h, self.model.lm_head.weight, backend=self.backend).pred, None
        q = _probs(self.model.lm_head(h), temperature, top_k)
        return torch.multinomial(q, 1, generator=generator).squeeze(1), q

    def verify(self, states: torch.Tensor, start: torch.Tensor, top: int) -> torch.Tensor:
        """The deeper blocks in one pass over the k + 1 positions from their exit-layer states
        (B, k+1, d) at columns start (B,) onwards (top = max(start)) -> final-normed states (B, k+1, d)."""
        x, mask = states, _row_causal_mask(self.key_ok, start, self.k + 1, top + self.k + 1)
        for block, cache in zip(self.model.blocks[self.exit_layer:], self.caches[self.exit_layer:]):
            x = block.forward_cached(x, cache, start, mask)
        return self.model.exit_norms[-1](x)

    def accept_greedy(self, h: torch.Tensor, drafts: torch.Tensor):
        """The verifier's argmax tokens (B, k+1) and the number of leading drafts equal to them (B,)."""
        B, t, d = h.shape
        target = exit_confidence(h.reshape(B * t, d), self.model.lm_head.weight, backend=self.backend).pred
        target = target.view(B, t)
        return target, (drafts == target[:, :-1]).long().cumprod(1).sum(1)

    def accept_sampled(self, h: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor):
        """Standard speculative sampling on the full-model distributions p (B, k+1, V): draft j is
        kept with probability min(1, p_j(x) / q_j(x)); the first rejected one is replaced by a
        draw from norm(max(0, p_j - q_j)); after k kept drafts the bonus is drawn from p_{k+1}.
        Returns the tokens (B, k+1) (kept drafts, then the drawn one) and kept counts (B,)."""
        temperature, top_k, generator = self.sampling
        p = _probs(self.model.lm_head(h), temperature, top_k)  # (B, k+1, V)
        p_x, q_x = p[:, :-1].gather(2, drafts[..., None]).squeeze(2), q.gather(2, drafts[..., None]).squeeze(2)
        u = torch.rand(p_x.shape, generator=generator, device=p_x.device)
        n_acc = (u * q_x < p_x).long().cumprod(1).sum(1)  # (B,)
        at = n_acc[:, None, None].expand(-1, 1, p.shape[2])
        p_at = p.gather(1, at).squeeze(1)  # (B, V)
        q_at = F.pad(q, (0, 0, 0, 1)).gather(1, at).squeeze(1)  # q = 0 after the last draft: the bonus is from p
        residual = (p_at - q_at).clamp(min=0)
        # all zero only where p == q, which never rejects but for rounding
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_at)
        fix = torch.multinomial(residual, 1, generator=generator)  # (B, 1)
        return F.pad(drafts, (0, 1)).scatter(1, n_acc[:, None], fix), n_acc


def _speculative_generate(model, idx, max_new_tokens, k, exit_layer, attention_mask, sampling, backend, return_stats):
    """generate(..., speculative=k) after the checks: the prefill and first token as generate,
    then draft-and-verify rounds until every row holds max_new_tokens new tokens."""
    B, T0 = idx.shape
    spec = _Speculator(model, idx, max_new_tokens, k, exit_layer, _prompt_layout(idx, attention_mask, max_new_tokens + k),
                       sampling, backend)
    spec.first_token(_prefill(model, idx, spec.caches, spec.prompt, [model.n_layers])[0])
    lowest, top = spec.progress()
    while lowest < spec.last:
        spec.round(top)
        lowest, top = spec.progress()
    tokens, layers_run = spec.tokens[:, :T0 + max_new_tokens], idx.new_full((B, max_new_tokens), model.n_layers)
    if not return_stats:
        return Generation(tokens, layers_run)
    drafted = int(spec.drafted.sum())
    rate = int(spec.accepted.sum()) / drafted if drafted else float("nan")
    return Generation(tokens, layers_run, stats=dict(accepted_per_row=spec.accepted, drafted_per_row=spec.drafted,
                                                     acceptance_rate=rate))


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, routing_threshold: Optional[Thresholds] = None,
             exit_layer: Optional[Layers] = None, temperature: float = 0.0, top_k: Optional[int] = None,
             generator: Optional[torch.Generator] = None, *, attention_mask: Optional[torch.Tensor] = None,
             config: Optional[UniversalConfig] = None, return_conf: bool = False, backend: str = "auto",
             speculative: Optional[int] = None, return_stats: bool = False, confidence: Optional[str] = None,
             prompt_mask: Optional[torch.Tensor] = None, return_routes: bool = False) -> Generation:
    """Early-exit decoding with a per-layer KV cache; rows of the batch exit independently.

    idx: (B, T0) int64 prompt; the prefill runs every layer for every position. Routing
    (module docstring): ``routing_threshold`` / ``exit_layer`` None mean the method's own,
    taken from ``config`` (a UniversalConfig: its exits, per-exit thresholds and confidence)
    when given, else no routing (full depth) and exit layer 1 (``fastexit.routing.resolve_routing``;
    evaluate reads None the same way). exit_layer may list several exits and routing_threshold
    give one number per exit; a single number applies to every exit. ``confidence``
    ("max_prob", "margin", "learned"): None = the config's, else max_prob.
    temperature=0: greedy; otherwise sample softmax(logits / temperature), optionally from the
    top_k logits (routing always uses the temperature-1 confidence).

    Prompts of different lengths: left-pad them in idx and pass attention_mask (B, T0), bool
    or 0/1 ints, True on real tokens (``prompt_mask``, its old name, works for one release).
    Each row then counts positions from its first real token, and no query ever attends to a
    pad, so a row generates what it would alone.

    speculative=k (an int >= 1): lossless self-speculative decoding instead of routing
    (``routing_threshold`` None means 0 here; > 0 is an error). Each round the layers up to
    ``exit_layer`` (< n_layers; the first exit when there are several) with its exit norm and
    the shared head draft k tokens; the deeper blocks verify them in one pass, reusing the draft's shallow keys/values and
    exit-layer states; every row keeps its longest agreeing prefix plus the verifier's next
    token. Greedy output is that of full-depth greedy decoding. Sampling draws from exactly the
    full model's distribution: q and p are the temperature/top_k-processed distributions of the
    draft and the full model (the ones plain sampling draws from), draft x is kept with
    probability min(1, p(x)/q(x)), a rejected one is replaced by a draw from
    norm(max(0, p - q)), and after k kept drafts a bonus token is drawn from p. Needs
    T0 + max_new_tokens + k - 1 <= max_seq_len (drafts run up to k - 1 positions past the
    last new token).

    Returns a ``Generation``: tokens (B, T0 + max_new_tokens) int64 and layers_run
    (B, max_new_tokens) int64, the layer each new token left at (n_layers: full depth); conf
    (B, max_new_tokens) fp32, the confidence of each step at the deepest exit it reached (the
    one it left at, else the last), when ``return_conf``, else None. With speculative,
    layers_run is n_layers everywhere (the full model verifies every token), and
    ``return_stats`` gives stats {accepted_per_row (B,) int64, drafted_per_row (B,) int64,
    acceptance_rate float (nan when nothing was drafted)}, counting every round each row took
    part in (drafts past max_new_tokens included); else stats is None.

    Mixture-of-Depths routed blocks (``fastexit.mod``) decide per token from their causal
    predictors, in the prefill and at every step; ``return_routes`` gives stats
    {"mod_routes": {layer: (B, T0 + max_new_tokens - 1) bool}}, whether each position that ran
    through the blocks (the last new token never does) ran that routed block. Self-speculative
    decoding verifies drafts at per-row cache slots, which routed blocks do not support: refused.
    """
    if prompt_mask is not None:
        if attention_mask is not None:
            raise ValueError("give attention_mask only (prompt_mask is its deprecated name)")
        warnings.warn("generate(prompt_mask=...) is deprecated; use attention_mask=", DeprecationWarning,
                      stacklevel=2)
        attention_mask = prompt_mask
    _check_prompt(model, idx, max_new_tokens, attention_mask)
    if speculative is not None and routing_threshold is None:
        routing_threshold = 0.0  # speculative decoding replaces routing, whatever the method's threshold
    # speculative decoding scores no confidence: the method's kind does not matter there
    rule = resolve_routing(model, routing_threshold, exit_layer, config,
                           confidence="max_prob" if speculative is not None else confidence)
    _check_sampling(model, temperature, top_k)
    T0, sampling = idx.shape[1], (temperature, top_k, generator)
    routers = mod.routers_of(model)
    if routers is not None and (speculative is not None or return_stats):
        raise ValueError(f"speculative={speculative}: self-speculative decoding is not supported on a model with "
                         f"routed (Mixture-of-Depths) blocks at layers {routers.layers}; generate without it")
    if return_routes and routers is None:
        raise ValueError("return_routes: the model has no routed (Mixture-of-Depths) blocks")
    if speculative is not None or return_stats:
        _check_speculative(model, speculative, max(rule.routing_thresholds), rule.exit_layers[0], T0, max_new_tokens,
                           return_conf)
        return _speculative_generate(model, idx, max_new_tokens, speculative, rule.exit_layers[0], attention_mask,
                                     sampling, backend, return_stats)
    dec = _Decoder(model, idx, max_new_tokens, rule, _prompt_layout(idx, attention_mask, max_new_tokens), return_conf,
                   sampling, backend)
    x_first, *prefill = _prefill(model, idx, dec.caches, dec.prompt, rule.exit_layers + [model.n_layers])
    dec.step(0, T0, x_first, prefill)
    for s in range(1, max_new_tokens):  # the token emitted at pos is predicted from position pos - 1
        dec.step(s, T0 + s, dec.shallow(s, T0 + s))
    stats = None
    if return_routes:
        end = T0 + max_new_tokens - 1
        stats = dict(mod_routes={layer: dec.caches[layer - 1].written[:, :end] for layer in routers.layers})
    return Generation(dec.tokens, dec.layers_run, dec.confs if return_conf else None, stats)
