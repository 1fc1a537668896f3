"""The seed's experiments: several configurations trained alike, over seeds and base LRs.

``compare_runs`` trains (or resumes) every configuration once per seed (and per base LR with
``lrs``) in its own run folder ``out/<config>/seed<k>`` (``out/<config>/lr<lr>/seed<k>`` with
``lrs``), evaluates each on the table's split in exact mode (the seed's measurement) and in
compact mode timed against exact, and writes

- ``out/compare.md``: per configuration the mean ± sample standard deviation over seeds of
  every metric, n, and the paired difference of PPL against the baseline row (the same
  seeds, the same data): the mean of the per-seed differences with a 95% t-interval
  (t quantile computed from Student's t distribution, ``report.t_quantile``);
- ``out/compare.png``: PPL vs compute_cost, a faint point per seed and the mean ± std bars;
- ``out/compare.json``: every run's metrics and every row's numbers.

With ``lrs`` each configuration is compared at its own best base LR, the one with the lowest
mean (over seeds) exact-mode PPL on the *val* split; its runs on the table's split are shown.
A run that is finished is not trained again (its evaluation is read back from
``<run>/compare-eval.json``); an unfinished one resumes from its checkpoint.
"""
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import report
from .atomic import write_json
from .config import DEFAULT_PRESET, RunConfig, TrainConfig
from .distributed import log
from .runs import RESUME_OVERRIDABLE, Run, is_run_folder, read_config

# The seed's layer-wise LR experiment, on asymmetric_best's weights {1: 0.7, 3: 0.3}:
# (label, folder suffix, scales of a 3-layer model).
LAYER_LR_CONFIGS = (("Decreasing LR (1.0, 0.5, 0.1)", "lr-decreasing", (1.0, 0.5, 0.1)),
                    ("Increasing LR (0.1, 0.5, 1.0)", "lr-increasing", (0.1, 0.5, 1.0)),
                    ("Standard (no Layer-wise LR)", None, None))
Job = Tuple[str, str, RunConfig]  # (table label, folder under out, config)
TRAIN_DEFAULTS = TrainConfig().to_dict()  # for configs written before a field existed
METRICS = (("PPL", "ppl"), ("acc", "acc"), ("shallow_ratio", "shallow_ratio"), ("compute_cost", "compute_cost"),
           ("bits/byte", "bpb"), ("PPL (compact)", "ppl_compact"), ("speedup (compact)", "speedup"))


def lr_scales_flag(values: Tuple[float, ...], n_layers: int) -> str:
    """The seed's 3-layer scales as a --layer-lr-scales value, stretched geometrically over
    other depths."""
    if n_layers == 3:
        scales = values
    else:
        first, last = values[0], values[-1]
        scales = [first * (last / first) ** (i / (n_layers - 1)) for i in range(n_layers)]
    return ",".join(f"{i}={s:g}" for i, s in enumerate(scales, start=1))


def run_folder(folder: str, seed: int, lr: Optional[float] = None) -> str:
    """A run's folder under ``out``: ``<config>/seed<k>``, or ``<config>/lr<lr>/seed<k>``."""
    return f"{folder}/seed{seed}" if lr is None else f"{folder}/lr{lr:g}/seed{seed}"


def _variant(config: RunConfig, seed: int, lr: Optional[float]) -> RunConfig:
    d = config.to_dict()
    d["train"] = dict(d["train"], seed=seed, lr=d["train"]["lr"] if lr is None else lr)
    return RunConfig.from_dict(d)


def _defining(config: RunConfig) -> Dict[str, Any]:
    """The parts of a run config that decide its weights (for reusing a folder)."""
    d = config.to_dict()
    keys = ("steps", "batch_size", "seq_len", "lr", "warmup_steps", "seed", "early_stopping_patience", "eval_every")
    model = {k: d["model"][k] for k in ("n_layers", "d_model", "n_heads")}
    return dict(method=d["method"], preset=d["preset"], model=model,
                train={k: d["train"].get(k, TRAIN_DEFAULTS.get(k)) for k in keys},
                data=dict({k: d["data"][k] for k in ("paths", "vocab_size")},
                          train_fraction=d["data"].get("train_fraction", 1.0)))


def _check_folders(out: Path, runs: Dict[str, RunConfig], folders: Sequence[str]) -> None:
    """Before training anything: ``out`` is no run, and a folder reused holds the same run."""
    if is_run_folder(out):
        raise ValueError(f"{out} is a run folder; --out of compare must be a folder of runs")
    for folder in folders:
        if is_run_folder(out / folder):
            raise ValueError(f"{out / folder} holds a run of the one-seed layout of an older fastexit (runs are now "
                             f"in <config>/seed<k>); choose another --out")
    for rel, config in runs.items():
        if is_run_folder(out / rel) and _defining(read_config(out / rel)) != _defining(config):
            raise ValueError(f"{out / rel} holds a run with another config; choose another --out")


def _train_and_evaluate(path: Path, config: RunConfig, split: str, need_val: bool, progress: bool,
                        **runtime) -> Dict[str, Any]:
    """Train (or resume, or skip when finished) one run; its metrics on ``split`` (exact, plus
    ppl_compact and speedup), with ``val_ppl`` when ``need_val``. Cached in compare-eval.json."""
    log(f"== {path}: training")
    if is_run_folder(path):  # the folder's run is this config (_check_folders): only the overridable fields move
        overrides = {f: config.to_dict()[f.split(".")[0]][f.split(".")[1]] for f in RESUME_OVERRIDABLE}
        run = Run.resume(path, overrides, **runtime)
    else:
        run = Run.create(path, config, **runtime)
    step = run.train(progress=progress)
    cache_path = path / "compare-eval.json"
    cache = _read_json(cache_path) if cache_path.exists() else {}
    if cache.get("step") != step:
        cache = dict(step=step)
    if split not in cache:
        exact = run.evaluate(split)
        compact = run.evaluate(split, "compact", compare_exact=True)
        cache[split] = dict(exact, ppl_compact=compact["ppl"], speedup=compact["speedup_vs_exact"])
    if need_val and "val" not in cache:
        cache["val"] = run.evaluate("val")
    write_json(cache_path, cache)
    early = run.early_stop or {}
    return dict(cache[split], val_ppl=cache["val"]["ppl"] if need_val else None, step=step,
                best_step=early.get("best_step"))


def _read_json(path: Path) -> Dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def compare_runs(out: Path, jobs: Sequence[Job], names: List[str], split: str, layer_lr: bool, *,
                 seeds: Sequence[int] = (0,), lrs: Optional[Sequence[float]] = None, progress: bool = True,
                 **runtime) -> str:
    """Train and evaluate every job once per seed (and base LR in ``lrs``; None: the job's own
    LR); a folder shared by two jobs runs once. Returns the tables' markdown, also written to
    out/compare.md with out/compare.png and out/compare.json."""
    folders = list(dict.fromkeys(folder for _, folder, _ in jobs))
    config_of = {folder: config for _, folder, config in jobs}
    grid = [(folder, lr, seed) for folder in folders for lr in (lrs or [None]) for seed in seeds]
    runs = {run_folder(f, s, lr): _variant(config_of[f], s, lr) for f, lr, s in grid}
    _check_folders(out, runs, folders)
    results = {}
    for folder, lr, seed in grid:
        rel = run_folder(folder, seed, lr)
        results[(folder, lr, seed)] = _train_and_evaluate(out / rel, runs[rel], split, lrs is not None, progress,
                                                          **runtime)
    rows = {folder: _aggregate(results, folder, seeds, lrs) for folder in folders}
    baseline = names[0] if names else None
    text = _header(jobs[0][2], split, seeds, lrs) + _preset_table(rows, names, baseline, lrs)
    series = [(name, rows[name]["compute_cost"], rows[name]["ppl"]) for name in names]
    if layer_lr:
        lr_text, lr_series = _layer_lr_table(rows, jobs, lrs)
        text += lr_text
        series += lr_series
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text + "\n", encoding="utf-8")
    write_json(out / "compare.json", dict(
        split=split, seeds=list(seeds), lrs=None if lrs is None else list(lrs), baseline=baseline,
        runs=[dict(folder=f, lr=lr, seed=s, path=run_folder(f, s, lr), **results[(f, lr, s)]) for f, lr, s in grid],
        rows={folder: {k: v for k, v in row.items() if k != "runs"} for folder, row in rows.items()}))
    steps = jobs[0][2].train.steps
    report.save_spread_plot(out / "compare.png", series, f"PPL vs compute_cost ({split} split, {steps} steps, "
                            f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''})", "compute_cost", "PPL")
    return text


def _aggregate(results, folder: str, seeds: Sequence[int], lrs) -> Dict[str, Any]:
    """A configuration's row: its best LR (lowest mean val PPL over seeds; None without
    ``lrs``), that LR's per-seed values of every metric and their mean / std."""
    mean_val = {lr: report.mean_std([results[(folder, lr, s)]["val_ppl"] for s in seeds])[0] for lr in lrs or []}
    best = min(mean_val, key=lambda lr: (math.isnan(mean_val[lr]), mean_val[lr])) if lrs else None
    runs = [results[(folder, best, s)] for s in seeds]
    row = dict(lr=best, val_ppl_by_lr=mean_val or None, n=len(runs), runs=runs)
    for _, key in METRICS:
        values = [r[key] for r in runs]
        row[key] = values
        row[f"{key}_mean"], row[f"{key}_std"] = report.mean_std(values)
    return row


def _header(config: RunConfig, split: str, seeds, lrs) -> str:
    t = config.train
    budget = f"{t.steps} steps" + (f" ({t.epochs:g} epochs)" if t.epochs else "") + \
        (f" ({t.tokens} tokens)" if t.tokens else "")
    if config.data.train_fraction < 1:
        budget += f" on the first {config.data.train_fraction:g} of the training split"
    if t.early_stopping_patience:
        budget += f", early stopping after {t.early_stopping_patience} evaluations without a better val PPL"
    lr_text = (f" Base LR chosen per configuration among {', '.join(f'{lr:g}' for lr in lrs)} by the lowest "
               f"mean val PPL; the columns are that LR's runs.") if lrs else ""
    seed_text = (f"seeds {', '.join(map(str, seeds))}: mean ± sample std over seeds; ΔPPL: mean of the per-seed "
                 f"differences to the baseline row with a 95% t-interval (Student t quantile, computed)"
                 if len(seeds) > 1 else f"seed {seeds[0]}")
    return (f"# fastexit compare\n\n{split} split, exact-mode routing (PPL (compact): real skipping, speedup: its "
            f"evaluation speed vs exact); {budget}; {seed_text}.{lr_text}\n\n")


def _lr_cells(row, lrs) -> Dict[str, str]:
    if not lrs:
        return {}
    by_lr = ", ".join(f"{lr:g}: {report.spread_cell([v])}" + ("*" if lr == row["lr"] else "")
                      for lr, v in row["val_ppl_by_lr"].items())
    return dict(best_lr=f"{row['lr']:g}", val_by_lr=by_lr)


def _delta(row, base) -> Tuple[float, Optional[float], Optional[float]]:
    return report.paired_interval([a - b for a, b in zip(row["ppl"], base["ppl"])])


def _preset_table(rows, names, baseline, lrs) -> str:
    cols = [("Model", "model")] + ([("LR (best on val)", "best_lr")] if lrs else []) + [("n", "n")]
    cols += [(header, key) for header, key in METRICS] + [(f"ΔPPL vs {baseline}", "delta")]
    cols += [("val PPL per LR (* = best)", "val_by_lr")] if lrs else []
    table = []
    for name in names:
        row = rows[name]
        delta = "baseline" if name == baseline else report.interval_cell(*_delta(row, rows[baseline]))
        cells = {key: report.spread_cell(row[key]) for _, key in METRICS}
        table.append(dict(cells, model=name, n=row["n"], delta=delta, **_lr_cells(row, lrs)))
    return report.markdown_table(table, cols)


def _layer_lr_table(rows, jobs, lrs) -> Tuple[str, list]:
    folder_of = {label: folder for label, folder, _ in jobs}
    baseline = LAYER_LR_CONFIGS[-1][0]
    base = rows[folder_of[baseline]]
    table, series = [], []
    for label, _, _ in LAYER_LR_CONFIGS:
        r = rows[folder_of[label]]
        is_base = label == baseline
        table.append(dict(config=label, n=r["n"], ppl=report.spread_cell(r["ppl"]), **_lr_cells(r, lrs),
                          vs="baseline" if is_base else report.vs_baseline(r["ppl_mean"], base["ppl_mean"]),
                          delta="baseline" if is_base else report.interval_cell(*_delta(r, base))))
        if not is_base:
            series.append((label.split(" (")[0], r["compute_cost"], r["ppl"]))
    cols = [("Config", "config")] + ([("LR (best on val)", "best_lr")] if lrs else [])
    cols += [("n", "n"), ("PPL", "ppl"), ("vs Baseline", "vs"), ("ΔPPL vs Baseline", "delta")]
    title = f"\n\n## Layer-wise LR ({DEFAULT_PRESET} weights {{1: 0.7, 3: 0.3}})\n\n"
    return title + report.markdown_table(table, cols), series
