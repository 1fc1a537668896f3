"""Threshold calibration to a quality target: the cheapest routing thresholds whose quality
loss is certified, with probability >= 1 - delta, on new data from the same distribution.

Routing (docs/design.md §3, several exits): a token leaves at the first exit e whose
confidence c_e >= t_e (t_e = 0 turns that exit off), else it runs to the final layer L; its
prediction and NLL are those of the layer it left at.

1. ``exit_table``: one exact pass over every layer per batch records, per scored token, the
   confidence at each exit and the prediction and NLL at each exit and at the final layer.
   The confidence is an input of the core (``ExitTable.conf``): max probability and margin
   come from ``exit_confidence``, a learned one from the model's confidence heads
   (``routing.exit_score``, as routing scores it).
2. ``route`` / ``route_metrics``: the routing outcome of given thresholds on a table.
3. ``calibrate``: Learn-then-Test (Angelopoulos et al. 2021; CALM, Schuster et al. 2022).

The statistical method. The unit of data is a sequence (a window of the split), not a
token: tokens of one window share their context and are far from independent, so a token-level
bound would claim far more certainty than the data hold. We assume the calibration windows and
the windows the model will later see are i.i.d. draws from one distribution (adjacent windows
of one text are only approximately so). A candidate threshold vector t gives each of the n
sequences a loss: its rate of disagreement with the full-depth prediction, D_s in [0, 1]
(``min_agreement``), or its mean NLL increase over full depth, Delta_s (``max_ppl_increase``).
"t is too aggressive" is the null hypothesis H0: E[D_s] > a = 1 - min_agreement, resp.
H0: E[Delta_s] > tau = log(1 + max_ppl_increase). Its p-value is, for the bounded D_s with mean
R, the Hoeffding-Bentkus p-value of Bates et al. (2021), min(exp(-n KL(min(R, a) || a)),
e * P(Binomial(n, a) <= ceil(n R))) with KL the Bernoulli divergence, valid at every n; for the
unbounded Delta_s, a one-sided z-test over the n sequence means, Phi(-(tau - mean) sqrt(n) / sd),
valid only asymptotically (central limit theorem: use hundreds of sequences). The candidates,
by default one shared threshold for every exit from 1.0 down to 0.005 (compute falls along
the way), or any (K, E) family fixed before seeing the data, are tested in order from the most
conservative, and testing stops at the first p-value that is not <= delta (fixed-sequence
testing: no multiplicity correction, so a fine grid costs nothing; a NaN p-value, from a table
with non-finite NLLs or confidences, fails like any other and the result says why). Every
rejected candidate is certified and the family-wise error is at most delta: with probability >= 1 - delta over the calibration
data, every certified candidate, in particular the chosen one (the certified candidate of least
compute on the calibration data), meets its constraint in expectation over new sequences (at
every n for min_agreement, asymptotically for max_ppl_increase). With windows of equal length
(as ``data.sequential_batches`` makes them) the per-sequence mean is the token mean: the
guarantee is on the expected agreement, resp. the expected ratio ppl / full-depth ppl, of new
data; a finite test set scatters around them. When no candidate is certified the result is full
depth (every threshold 0), which meets either constraint trivially.
"""
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, NamedTuple, Optional, Sequence, Tuple

import torch

from .config import CONFIDENCE_KINDS
from .kernels import exit_confidence
from .protocol import require_early_exit
from .routing import check_confidence_heads, exit_score

DEFAULT_GRID = tuple(round(1 - k / 200, 3) for k in range(200))  # shared thresholds 1.0, 0.995, ..., 0.005


class ExitTable(NamedTuple):
    """Per-token results of one exact pass, N tokens (flattened batches).

    exits: the E exit layers, ascending, each < n_layers; conf: (E, N) float confidence at each
    exit; pred: (E + 1, N) int64 and nll: (E + 1, N) float at each exit and (last row) at the
    final layer; seq: (N,) int64 sequence id; valid: (N,) bool, False where the target is
    ignored (such tokens route but are never scored).
    """
    exits: Tuple[int, ...]
    n_layers: int
    conf: torch.Tensor
    pred: torch.Tensor
    nll: torch.Tensor
    seq: torch.Tensor
    valid: torch.Tensor


class Routed(NamedTuple):
    """Routing outcome per token, all (N,): exit_index in 0..E (E = the final layer),
    layers_run int64, pred int64 and nll of the layer each token left at."""
    exit_index: torch.Tensor
    layers_run: torch.Tensor
    pred: torch.Tensor
    nll: torch.Tensor


@dataclass
class Calibration:
    """Result of ``calibrate``: ``thresholds`` (one per exit of ``exits``; all 0 = full depth
    when nothing was certified), the constraint and its target, delta, whether the choice is
    certified, its p-value (uncertified: the first candidate's, which failed), the number of
    candidates tested, the calibration-data ``metrics`` (``route_metrics``) at the choice and,
    when nothing was certified, the ``reason``."""
    exits: Tuple[int, ...]
    thresholds: Tuple[float, ...]
    constraint: str
    target: float
    delta: float
    certified: bool
    p_value: float
    n_tested: int
    n_sequences: int
    metrics: Dict[str, float] = field(default_factory=dict)
    reason: str = ""

    def to_dict(self) -> Dict:
        return asdict(self)


# ----------------------------------------------------------------------------- the table
def _check_exits(exits, n_layers: int) -> Tuple[int, ...]:
    exits = tuple(exits)
    if not exits or any(isinstance(e, bool) or not isinstance(e, int) or not 1 <= e < n_layers for e in exits) \
            or list(exits) != sorted(set(exits)):
        raise ValueError(f"exits must be a non-empty ascending list of distinct ints in [1, {n_layers - 1}] "
                         f"for a {n_layers}-layer model, got {list(exits)!r}")
    return exits


@torch.no_grad()
def exit_table(model, batches: Iterable, exits: Sequence[int], confidence: str = "max_prob", *,
               ignore_index: int = -100, backend: str = "auto") -> ExitTable:
    """One exact pass per batch through every layer; the result on the CPU.

    batches: (x, y) int64 (B, T) pairs; exits: ascending exit layers < n_layers; confidence:
    'max_prob' (max softmax probability), 'margin' (top-1 minus top-2 probability) or
    'learned' (the model's confidence heads, one at every exit). Every exit and the final
    layer go through ``exit_confidence`` on the exit-normed states: no [N, V] logits.
    Sequence ids count the rows of all batches in order.
    """
    require_early_exit(model)
    if confidence not in CONFIDENCE_KINDS:
        raise ValueError(f"confidence must be one of {CONFIDENCE_KINDS}, got {confidence!r}")
    exits = _check_exits(exits, model.n_layers)
    if confidence == "learned":
        check_confidence_heads(model, exits)
    layers, weight = [*exits, model.n_layers], model.lm_head.weight
    was_training, rows = model.training, 0
    model.eval()
    parts = []
    for x, y in batches:
        tgt = y.reshape(-1)
        hidden = [h.reshape(-1, h.shape[-1]) for h in model.exit_hidden_states(x, layers)]  # (B*T, d) each
        stats = [exit_confidence(h, weight, tgt, ignore_index=ignore_index,
                                 want_margin=confidence == "margin" and i < len(exits), backend=backend)
                 for i, h in enumerate(hidden)]
        conf = torch.stack([exit_score(s, confidence, model, e, h)
                            for s, e, h in zip(stats, exits, hidden)])  # (E, B*T)
        seq = torch.arange(rows, rows + x.shape[0]).repeat_interleave(x.shape[1])  # (B*T,)
        parts.append([t.cpu() for t in (conf, torch.stack([s.pred for s in stats]),
                                        torch.stack([s.nll for s in stats]), seq, tgt != ignore_index)])
        rows += x.shape[0]
    model.train(was_training)
    if not parts:
        raise ValueError("batches must hold at least one (x, y) batch")
    conf, pred, nll, seq, valid = (torch.cat([p[k] for p in parts], dim=-1) for k in range(5))
    return ExitTable(exits, model.n_layers, conf, pred, nll, seq, valid)


# ----------------------------------------------------------------------------- routing outcome
def _thresholds(table: ExitTable, thresholds) -> torch.Tensor:
    t = torch.as_tensor(thresholds, dtype=torch.float64).flatten()
    if t.numel() != len(table.exits) or not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"thresholds must be {len(table.exits)} numbers in [0, 1] (one per exit, 0 = off), "
                         f"got {thresholds!r}")
    return t.to(table.conf.dtype)  # compared in the confidence's dtype, as routing compares them


def route(table: ExitTable, thresholds: Sequence[float]) -> Routed:
    """Each token leaves at the first exit e with conf_e >= thresholds[e] > 0, else at the
    final layer. thresholds: E floats in [0, 1]. Returns Routed of (N,) tensors."""
    t = _thresholds(table, thresholds)
    leaves = (table.conf >= t[:, None]) & (t[:, None] > 0)  # (E, N)
    E = len(table.exits)
    exit_index = torch.where(leaves.any(0), leaves.to(torch.uint8).argmax(0), E)  # argmax: the first True
    layers = torch.tensor([*table.exits, table.n_layers])
    pick = lambda a: a.gather(0, exit_index[None]).squeeze(0)  # noqa: E731
    return Routed(exit_index, layers[exit_index], pick(table.pred), pick(table.nll))


def route_metrics(table: ExitTable, thresholds: Sequence[float]) -> Dict[str, float]:
    """Metrics over the scored tokens of routing with ``thresholds``: ppl, ppl_full (full
    depth), agreement (share predicting what the final layer predicts), compute_cost (mean
    layers run / n_layers), shallow_ratio, exit_ratio_L{e} per exit, n_tokens, n_sequences."""
    r, v = route(table, thresholds), table.valid
    E, n = len(table.exits), int(v.sum())
    if n == 0:
        raise ValueError("the table has no scored token (every target is ignore_index)")
    shares = torch.bincount(r.exit_index[v], minlength=E + 1).double() / n
    metrics = dict(ppl=math.exp(float(r.nll[v].double().mean())),
                   ppl_full=math.exp(float(table.nll[-1, v].double().mean())),
                   agreement=float((r.pred[v] == table.pred[-1, v]).double().mean()),
                   compute_cost=float(r.layers_run[v].double().mean() / table.n_layers),
                   shallow_ratio=float(1 - shares[E]))
    metrics.update({f"exit_ratio_L{e}": float(s) for e, s in zip(table.exits, shares)})
    return dict(metrics, n_tokens=n, n_sequences=int(table.seq[v].unique().numel()))


# ----------------------------------------------------------------------------- statistics
def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in fp64 log space."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    i = torch.arange(k + 1, dtype=torch.float64)
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1)
               + i * math.log(p) + (n - i) * math.log1p(-p))
    return min(1.0, float(log_pmf.logsumexp(0).exp()))


def hoeffding_bentkus_p_value(mean_loss: float, n: int, alpha: float) -> float:
    """p-value of H0: E[loss] > alpha from the mean of n i.i.d. losses in [0, 1] (Bates et
    al. 2021): min(exp(-n h1(min(mean, alpha), alpha)), e * P(Bin(n, alpha) <= ceil(n mean)));
    NaN when the mean is not finite."""
    if not math.isfinite(mean_loss):
        return math.nan
    if alpha <= 0:
        return 1.0  # a zero-risk target is never certified from data
    if alpha >= 1:
        return 0.0
    a = min(mean_loss, alpha)
    h1 = (a * math.log(a / alpha) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - alpha))
    k = math.ceil(round(n * mean_loss, 9))  # n * mean is a count: no float noise above it
    return min(1.0, math.exp(-n * h1), math.e * binomial_cdf(k, n, alpha))


def clt_p_value(values: torch.Tensor, bound: float) -> float:
    """One-sided z-test p-value of H0: E[value] > bound from n >= 2 i.i.d. values (n,):
    Phi(-(bound - mean) sqrt(n) / sd); valid as n grows (central limit theorem). NaN when a
    value is not finite."""
    v = values.double()
    mean, sd = float(v.mean()), float(v.std())  # sd: the n - 1 estimate
    if not (math.isfinite(mean) and math.isfinite(sd)):
        return math.nan
    if sd == 0:
        return 0.0 if mean < bound else 1.0
    z = (bound - mean) * math.sqrt(v.numel()) / sd
    return 0.5 * math.erfc(z / math.sqrt(2))


def fixed_sequence(p_values: Iterable[float], delta: float) -> int:
    """How many leading hypotheses fixed-sequence testing rejects: it walks the p-values in
    order and stops at the first one that is not <= delta (family-wise error <= delta; a NaN
    p-value rejects nothing)."""
    k = 0
    for p in p_values:
        if not p <= delta:
            break
        k += 1
    return k


# ----------------------------------------------------------------------------- calibration
def _check_calibrate_args(max_ppl_increase, min_agreement, delta):
    def number(name, x):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ValueError(f"{name} must be a finite number, got {x!r}")
    if (max_ppl_increase is None) == (min_agreement is None):
        raise ValueError("give exactly one of max_ppl_increase and min_agreement, got "
                         f"max_ppl_increase={max_ppl_increase!r}, min_agreement={min_agreement!r}")
    number("delta", delta)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if max_ppl_increase is not None:
        number("max_ppl_increase", max_ppl_increase)
        if max_ppl_increase <= 0:
            raise ValueError(f"max_ppl_increase must be > 0 (0.02 = ppl at most 2% above full depth), "
                             f"got {max_ppl_increase!r}")
        return "max_ppl_increase", float(max_ppl_increase)
    number("min_agreement", min_agreement)
    if not 0 < min_agreement <= 1:
        raise ValueError(f"min_agreement must be in (0, 1], got {min_agreement!r}")
    return "min_agreement", float(min_agreement)


def _candidates(grid, n_exits: int) -> torch.Tensor:
    """(K, E) threshold vectors: a 1-D grid is one shared threshold per candidate."""
    g = torch.as_tensor(DEFAULT_GRID if grid is None else grid, dtype=torch.float64)
    if g.dim() == 1:
        if g.numel() == 0 or not bool(((g > 0) & (g <= 1)).all()) or not bool((g[1:] < g[:-1]).all()):
            raise ValueError(f"grid must be a non-empty, strictly decreasing sequence in (0, 1] (most conservative "
                             f"first), got {grid!r}")
        return g[:, None].expand(-1, n_exits)
    if g.dim() != 2 or g.shape[0] == 0 or g.shape[1] != n_exits or not bool(((g >= 0) & (g <= 1)).all()):
        raise ValueError(f"grid must be 1-D (shared thresholds) or (K, {n_exits}) per-exit thresholds in [0, 1], "
                         f"got shape {tuple(g.shape)}")
    return g


def calibrate(table: ExitTable, *, max_ppl_increase: Optional[float] = None, min_agreement: Optional[float] = None,
              delta: float = 0.1, grid=None) -> Calibration:
    """The thresholds of least compute certified to meet one constraint with probability
    >= 1 - delta (Learn-then-Test, module docstring).

    max_ppl_increase: ppl at most (1 + it) x full depth's, > 0; min_agreement: share of tokens
    predicting what the final layer predicts, in (0, 1]; give exactly one. grid: candidates
    from most conservative to most aggressive, either shared thresholds (strictly decreasing
    in (0, 1]; default 1.0, 0.995, ..., 0.005) or a (K, E) tensor of per-exit thresholds,
    fixed before seeing the table. Nothing certified: thresholds all 0 (full depth).
    """
    constraint, target = _check_calibrate_args(max_ppl_increase, min_agreement, delta)
    cands = _candidates(grid, len(table.exits))
    v = table.valid
    seq = torch.unique(table.seq[v], return_inverse=True)[1]  # (n_scored,) in 0..S-1
    n_seq = int(seq.max()) + 1 if seq.numel() else 0
    if n_seq < 2:
        raise ValueError(f"calibration needs scored tokens in at least 2 sequences, got {n_seq}")
    counts = torch.bincount(seq, minlength=n_seq).double()
    per_seq = lambda loss: torch.zeros(n_seq, dtype=torch.float64).index_add_(0, seq, loss.double()) / counts  # noqa: E731

    def p_value(r: Routed) -> float:
        if constraint == "min_agreement":
            return hoeffding_bentkus_p_value(float(per_seq(r.pred[v] != table.pred[-1, v]).mean()), n_seq, 1 - target)
        return clt_p_value(per_seq(r.nll[v].double() - table.nll[-1, v].double()), math.log1p(target))

    costs, p_values = [], []

    def tested():  # lazily: fixed_sequence stops drawing at the first non-rejection
        for t in cands:
            r = route(table, t)
            costs.append(float(r.layers_run[v].double().mean()))
            p_values.append(p_value(r))
            yield p_values[-1]

    n_certified = fixed_sequence(tested(), delta)
    if n_certified:
        best = min(range(n_certified), key=lambda i: (costs[i], -i))  # least compute; ties: the later one
        thresholds, p, reason = tuple(float(x) for x in cands[best]), p_values[best], ""
    else:
        thresholds, p = (0.0,) * len(table.exits), p_values[0]
        reason = _failure_reason(table, p, delta)
    return Calibration(table.exits, thresholds, constraint, target, float(delta), n_certified > 0, p,
                       len(p_values), n_seq, route_metrics(table, thresholds), reason)


def _failure_reason(table: ExitTable, p: float, delta: float) -> str:
    """Why the first candidate was not certified."""
    if math.isnan(p):
        v = table.valid
        bad = int((~torch.isfinite(table.nll[:, v])).any(0).sum() + (~torch.isfinite(table.conf[:, v])).any(0).sum())
        return (f"its p-value is nan, not <= delta {delta:g}: {bad} scored tokens have a non-finite NLL or "
                f"confidence (has the model diverged?)" if bad else f"its p-value is nan, not <= delta {delta:g}")
    return f"p = {p:.3g} > delta {delta:g} at the most conservative threshold"
