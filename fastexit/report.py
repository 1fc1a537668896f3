"""What the command line shows: markdown tables, Pareto flags, plots, rendered tokens, and the
text of each command (the routing rule a title names, the closing "what early exit buys"
table of ``fastexit train``, the sweep, calibration and generation reports).

Pure functions of metric dicts and configs (no model, no data); plots need matplotlib (the
``data`` extra) and are skipped with a note without it.
"""
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

Columns = Sequence[Tuple[str, str]]  # (header, key)


def _fmt(value) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def markdown_table(rows: Sequence[Dict[str, Any]], columns: Columns) -> str:
    """rows of dicts -> markdown; columns are (header, key)."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(k, "")) for _, k in columns) + " |" for row in rows]
    return "\n".join(lines)


def eval_columns(n_layers: int, per_layer: bool, compare_exact: bool,
                 exit_ratios: Sequence[str] = ()) -> List[Tuple[str, str]]:
    """Columns of an evaluation table; exit_ratios: the exit_ratio_L{i} keys to show (one per
    exit, worth showing with several exits)."""
    cols = [("split", "split"), ("tokens", "n_tokens"), ("ppl", "ppl"), ("bits/byte", "bpb"), ("acc", "acc"),
            ("shallow_ratio", "shallow_ratio"), ("compute_cost", "compute_cost"), ("flop_cost", "flop_cost")]
    cols += [(key, key) for key in exit_ratios]
    if per_layer:
        cols += [(f"ppl_L{i}", f"ppl_L{i}") for i in range(1, n_layers + 1)]
    if compare_exact:
        cols += [("ppl_exact", "ppl_exact"), ("ppl_diff_vs_exact", "ppl_diff_vs_exact"),
                 ("speedup_vs_exact", "speedup_vs_exact")]
    return cols


def eval_table(title: str, stats: Dict[str, Any], n_layers: int) -> str:
    ratios = [key for key in stats if key.startswith("exit_ratio_L")]
    cols = eval_columns(n_layers, "ppl_L1" in stats, "speedup_vs_exact" in stats, ratios if len(ratios) > 1 else ())
    return f"{title}\n\n{markdown_table([stats], cols)}"


def pareto_flags(rows: Sequence[Dict[str, Any]], x: str = "compute_cost", y: str = "ppl") -> List[bool]:
    """True where no other row is at least as good on both x and y and better on one."""
    def dominated(a):
        return any(b[x] <= a[x] and b[y] <= a[y] and (b[x] < a[x] or b[y] < a[y]) for b in rows)
    return [not dominated(r) for r in rows]


def sweep_columns(compare_exact: bool, variants: bool = False) -> List[Tuple[str, str]]:
    cols = [("routing", "variant")] if variants else []
    cols += [("routing_threshold", "routing_threshold"), ("ppl", "ppl"), ("bits/byte", "bpb"), ("acc", "acc"),
             ("shallow_ratio", "shallow_ratio"), ("compute_cost", "compute_cost"), ("flop_cost", "flop_cost")]
    if compare_exact:
        cols.append(("speedup_vs_exact", "speedup_vs_exact"))
    return cols + [("pareto", "pareto")]


def sweep_table(rows: List[Dict[str, Any]], compare_exact: bool) -> str:
    """The threshold sweep's table; marks Pareto-optimal rows (``pareto``: "*", over every
    row, whatever its routing ``variant``) in place."""
    for row, best in zip(rows, pareto_flags(rows)):
        row["pareto"] = "*" if best else ""
    return markdown_table(rows, sweep_columns(compare_exact, any("variant" in r for r in rows)))


def cheapest_within(rows: Sequence[Dict[str, Any]], full_depth_ppl: float, max_increase: float,
                    cost: str = "compute_cost") -> Optional[dict]:
    """The row with the lowest ``cost`` (a column: compute_cost or flop_cost) whose ppl is
    within ``max_increase`` (a fraction) of ``full_depth_ppl``; None when none is."""
    ok = [r for r in rows if r["ppl"] <= full_depth_ppl * (1 + max_increase)]
    return min(ok, key=lambda r: r[cost]) if ok else None


def within_line(rows: Sequence[Dict[str, Any]], full_depth_ppl: float, max_increase: float) -> str:
    """One sentence naming the cheapest threshold that keeps ppl within the bound: cheapest in
    FLOPs where the rows count them (a threshold that saves layers but costs FLOPs saves
    nothing), else in layers run."""
    flops = all("flop_cost" in r for r in rows)
    best = cheapest_within(rows, full_depth_ppl, max_increase, "flop_cost" if flops else "compute_cost")
    bound = f"{max_increase:.0%} of full depth (ppl {full_depth_ppl:.2f})"
    if best is None or best["shallow_ratio"] == 0:
        saves = "saves FLOPs" if flops else "lets tokens leave early"
        return f"No threshold in this table {saves} while keeping ppl within {bound}."
    flop_text = f", flop_cost {best['flop_cost']:.3f}" if flops else ""
    return (f"routing_threshold {best['routing_threshold']} keeps ppl within {bound}: ppl {best['ppl']:.2f}, "
            f"{best['shallow_ratio']:.0%} of tokens leave early, compute_cost {best['compute_cost']:.3f}{flop_text}.")


# ------------------------------------------------------------- the commands' texts
def exits_text(method) -> str:
    """'exit_layer 1', or 'exit_layers [2, 4]' (and the confidence when not max_prob)."""
    exits = f"exit_layers {method.exits}" if method.exit_layers is not None else f"exit_layer {method.exit_layer}"
    return exits if method.confidence == "max_prob" else f"{exits}, confidence {method.confidence}"


def routing_text(method, routing_threshold: Optional[float] = None) -> str:
    """The routing rule of a method (a ``UniversalConfig``) as table titles name it;
    routing_threshold: an override of every exit's threshold."""
    if routing_threshold is not None:
        th = f"routing_threshold {routing_threshold}" + (" at every exit" if len(method.exits) > 1 else "")
    elif method.routing_thresholds is not None:
        th = f"routing_thresholds {method.routing_thresholds}"
    else:
        th = f"routing_threshold {method.routing_threshold}"
    return f"{th}, {exits_text(method)}"


def early_exit_text(rows: List[Dict[str, Any]], split: str, method, max_increase: float, seconds: float) -> str:
    """The compact-mode sweep ``fastexit train`` ends with (``rows`` from ``Run.sweep`` with
    compare_exact), which threshold stays within ``max_increase`` of full depth, and how long
    the sweep took."""
    full = next((r["ppl"] for r in rows if r["routing_threshold"] == "0"), None)
    text = (f"What early exit buys ({split} split, compact mode: deeper layers really skipped; "
            f"{exits_text(method)})\n\n{sweep_table(rows, compare_exact=True)}")
    if full is not None:
        text += "\n\n" + within_line(rows, full, max_increase)
    return text + f"\n\nThis table took {seconds:.0f} s (fastexit train --no-table skips it)."


def sweep_text(title: str, split: str, mode: str, variants: Sequence[str], rows: List[Dict[str, Any]],
               compare_exact: bool) -> str:
    """``fastexit sweep``'s text: what was swept (one routing variant per name) and the table."""
    return (f"{title}: routing_threshold sweep, {split} split, {mode} mode, {'; '.join(variants)} (each threshold "
            f"at every exit); * = Pareto-optimal (no row has both lower ppl and lower compute_cost)\n\n"
            f"{sweep_table(rows, compare_exact)}")


def calibration_text(run_path: Path, file: Path, record: Dict[str, Any]) -> str:
    """``fastexit calibrate``'s report of a calibration ``record`` (as ``Run.calibrate``
    returns it and writes it to ``file``): constraint, verdict, val and held-out test rows."""
    constraint = (f"ppl at most {record['target']:.2%} above full depth" if record["constraint"] == "max_ppl_increase"
                  else f"agreement with the final layer at least {record['target']:.2%}")
    rows = [dict(split=split, **m, ppl_increase=f"{m['ppl'] / m['ppl_full'] - 1:+.2%}")
            for split, m in (("val", record["val"]), ("test", record["test"]))]
    cols = [("split", "split"), ("ppl", "ppl"), ("full-depth ppl", "ppl_full"), ("ppl increase", "ppl_increase"),
            ("agreement", "agreement"), ("compute_cost", "compute_cost"), ("shallow_ratio", "shallow_ratio")]
    cols += [(f"exit_ratio_L{e}", f"exit_ratio_L{e}") for e in record["exits"]]
    reason = record.get("reason") or f"p = {record['p_value']:.3g} is not <= delta {record['delta']:g}"
    verdict = (f"certified (p = {record['p_value']:.3g} <= delta {record['delta']:g})" if record["certified"] else
               f"not certified by any threshold: full depth ({reason})")
    return (f"{run_path}: {constraint}, with probability >= {1 - record['delta']:g} on new data (Learn-then-Test "
            f"over {record['n_sequences']} val sequences, {record['n_tested']} thresholds tested)\n\n"
            f"routing_thresholds {list(record['thresholds'])} at exit_layers {list(record['exits'])}, confidence "
            f"{record['confidence']}: {verdict}\n\n{markdown_table(rows, cols)}\n\n"
            f"Written to {file}: eval, sweep and generate of this run route with them.")


def generation_text(tokenizer, prompt_ids: List[int], new_ids: List[int], layers_run: List[int], n_layers: int,
                    rule: str, acceptance: Optional[str] = None) -> str:
    """``fastexit generate``'s text: the prompt and the new tokens, those that left before
    ``n_layers`` in [brackets], each token's exit layer, and how many left early (or, for
    speculative decoding, the ``acceptance`` line instead)."""
    early = [layer < n_layers for layer in layers_run]
    lines = [tokenizer.decode(prompt_ids, skip_special_tokens=False)
             + render_tokens(token_pieces(tokenizer, prompt_ids, new_ids), early),
             "\nexit layer per token: " + " ".join(str(layer) for layer in layers_run)]
    if acceptance is not None:
        return "\n".join(lines + [acceptance])
    n_early = sum(early)
    return "\n".join(lines + [f"[...] = left at an exit before layer {n_layers} ({rule}); exited early: "
                              f"{n_early}/{len(new_ids)} tokens ({100 * n_early / len(new_ids):.1f}%)"])


def vs_baseline(ppl: float, baseline: float) -> str:
    """The seed's "vs Baseline" cell: PPL improvement relative to the baseline, in %."""
    gain = (baseline - ppl) / baseline * 100
    return f"{gain:.1f}% improvement" if gain >= 0 else f"{-gain:.1f}% worse"


# ------------------------------------------------------------------ across seeds
def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0.0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def spread_cell(values: Sequence[float]) -> str:
    """'mean ± std' over seeds, or the value alone for one seed."""
    mean, std = mean_std(values)
    return _fmt(float(mean)) if len(values) == 1 else f"{_fmt(float(mean))} ± {_fmt(float(std))}"


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: int) -> float:
    """Student's t distribution function with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (p in (0.5, 1)), computed (no scipy): bisection on
    ``t_cdf``, to ~1e-10."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-10:
            break
    return (lo + hi) / 2


def paired_interval(diffs: Sequence[float], confidence: float = 0.95) -> Tuple[float, Optional[float], Optional[float]]:
    """(mean, low, high) of paired differences: mean ± t_{(1+c)/2, n-1} * sd / sqrt(n); the
    bounds are None for a single pair."""
    mean, std = mean_std(diffs)
    n = len(diffs)
    if n < 2:
        return mean, None, None
    half = t_quantile((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
    return mean, mean - half, mean + half


def interval_cell(mean: float, low: Optional[float], high: Optional[float]) -> str:
    return f"{mean:+.2f}" if low is None else f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def _pyplot(path: Path):
    """matplotlib.pyplot on the Agg backend, or None (with a note) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; skipped {path}", file=sys.stderr)
        return None
    return plt


def _finish(plt, fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> None:
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_spread_plot(path: Path, series: Sequence[Tuple[str, Sequence[float], Sequence[float]]], title: str,
                     xlabel: str, ylabel: str) -> Optional[Path]:
    """One point per seed (faint) and the mean with ±1 sample-std error bars for every
    (label, xs, ys) as a PNG; None without matplotlib."""
    plt = _pyplot(path)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, xs, ys in series:
        (mx, sx), (my, sy) = mean_std(xs), mean_std(ys)
        bar = ax.errorbar([mx], [my], xerr=[sx], yerr=[sy], fmt="o", capsize=3)
        ax.scatter(xs, ys, s=12, alpha=0.4, color=bar[0].get_color())
        ax.annotate(label, (mx, my), textcoords="offset points", xytext=(5, 5), fontsize=8)
    _finish(plt, fig, ax, path, title, xlabel, ylabel)
    return path


def save_curves(path: Path, curves: Sequence[Tuple[str, Sequence[Tuple[str, float, float]]]], title: str,
                xlabel: str, ylabel: str, line: bool = True) -> Optional[Path]:
    """One labelled series of annotated (label, x, y) points per (name, points), joined when
    ``line``, with a legend when the series have names; None without matplotlib."""
    plt = _pyplot(path)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, points in curves:
        ax.plot([p[1] for p in points], [p[2] for p in points], "o-" if line else "o", label=name or None)
        for label, x, y in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if any(name for name, _ in curves):
        ax.legend(fontsize=8)
    _finish(plt, fig, ax, path, title, xlabel, ylabel)
    return path


def render_tokens(pieces: Sequence[str], early: Sequence[bool]) -> str:
    """Join decoded pieces, wrapping those that left early in [ ] (after leading spaces)."""
    out = []
    for piece, is_early in zip(pieces, early):
        if is_early and piece.strip():
            body = piece.lstrip()
            out.append(f"{piece[:len(piece) - len(body)]}[{body}]")
        else:
            out.append(piece)
    return "".join(out)


def token_pieces(tokenizer, prompt_ids: List[int], new_ids: List[int]) -> List[str]:
    """The text each new token adds, decoded in context (byte-level pieces can merge)."""
    texts = [tokenizer.decode(prompt_ids + new_ids[:i], skip_special_tokens=False) for i in range(len(new_ids) + 1)]
    return [b[len(a):] if b.startswith(a) else b for a, b in zip(texts, texts[1:])]
