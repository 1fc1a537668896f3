"""The seed's experiments: several runs trained alike, evaluated on one split, one table.

``compare_runs`` trains (or resumes) every run in its own folder under ``out``, evaluates
each in exact mode (the seed's measurement) and in compact mode timed against exact, and
writes ``out/compare.md`` and ``out/compare.png`` (PPL vs compute_cost).
"""
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from . import report
from .config import DEFAULT_PRESET, RunConfig
from .runs import RESUME_OVERRIDABLE, Run, is_run_folder, log, read_config

# The seed's layer-wise LR experiment, on asymmetric_best's weights {1: 0.7, 3: 0.3}:
# (label, folder suffix, scales of a 3-layer model).
LAYER_LR_CONFIGS = (("Decreasing LR (1.0, 0.5, 0.1)", "lr-decreasing", (1.0, 0.5, 0.1)),
                    ("Increasing LR (0.1, 0.5, 1.0)", "lr-increasing", (0.1, 0.5, 1.0)),
                    ("Standard (no Layer-wise LR)", None, None))
Job = Tuple[str, str, RunConfig]  # (table label, folder under out, config)


def lr_scales_flag(values: Tuple[float, ...], n_layers: int) -> str:
    """The seed's 3-layer scales as a --layer-lr-scales value, stretched geometrically over
    other depths."""
    if n_layers == 3:
        scales = values
    else:
        first, last = values[0], values[-1]
        scales = [first * (last / first) ** (i / (n_layers - 1)) for i in range(n_layers)]
    return ",".join(f"{i}={s:g}" for i, s in enumerate(scales, start=1))


def _defining(config: RunConfig) -> Dict[str, Any]:
    """The parts of a run config that decide its weights (for reusing a folder)."""
    d = config.to_dict()
    keys = ("steps", "batch_size", "seq_len", "lr", "warmup_steps", "seed")
    model = {k: d["model"][k] for k in ("n_layers", "d_model", "n_heads")}
    return dict(method=d["method"], preset=d["preset"], model=model, train={k: d["train"][k] for k in keys},
                data={k: d["data"][k] for k in ("paths", "vocab_size")})


def _check_folders(out: Path, jobs: Sequence[Job]) -> None:
    """Before training anything: ``out`` is no run, and a folder reused holds the same run."""
    if is_run_folder(out):
        raise ValueError(f"{out} is a run folder; --out of compare must be a folder of runs")
    for _, folder, config in jobs:
        if is_run_folder(out / folder) and _defining(read_config(out / folder)) != _defining(config):
            raise ValueError(f"{out / folder} holds a run with another config; choose another --out")


def _train_and_evaluate(path: Path, config: RunConfig, split: str, progress: bool, **runtime) -> Dict[str, Any]:
    log(f"== {path.name}: training into {path}")
    if is_run_folder(path):  # the folder's run is this config (_check_folders): only the overridable fields move
        overrides = {f: config.to_dict()[f.split(".")[0]][f.split(".")[1]] for f in RESUME_OVERRIDABLE}
        run = Run.resume(path, overrides, **runtime)
    else:
        run = Run.create(path, config, **runtime)
    run.train(progress=progress)
    exact = run.evaluate(split)
    compact = run.evaluate(split, "compact", compare_exact=True)
    return dict(exact, ppl_compact=compact["ppl"], speedup=compact["speedup_vs_exact"])


def compare_runs(out: Path, jobs: Sequence[Job], names: List[str], split: str, layer_lr: bool, *,
                 progress: bool = True, **runtime) -> str:
    """Train and evaluate every job (a folder shared by two jobs runs once); returns the
    tables' markdown, also written to out/compare.md with the plot out/compare.png."""
    _check_folders(out, jobs)
    results: Dict[str, Dict[str, Any]] = {}
    for _, folder, config in jobs:
        if folder not in results:  # "Standard (no Layer-wise LR)" is the asymmetric_best run
            results[folder] = _train_and_evaluate(out / folder, config, split, progress, **runtime)
    train = jobs[0][2].train
    text = (f"# fastexit compare\n\n{split} split, exact-mode routing (PPL (compact): real skipping, "
            f"speedup: its evaluation speed vs exact); {train.steps} steps, seed {train.seed}.\n\n"
            + _preset_table(results, names))
    points = [(name, results[name]["compute_cost"], results[name]["ppl"]) for name in names]
    if layer_lr:
        lr_text, lr_points = _layer_lr_table(results, jobs)
        text += lr_text
        points += lr_points
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text + "\n", encoding="utf-8")
    report.save_plot(out / "compare.png", points, f"PPL vs compute_cost ({split} split, {train.steps} steps)",
                     "compute_cost", "PPL")
    return text


def _preset_table(results, names) -> str:
    cols = [("Model", "model"), ("PPL", "ppl"), ("acc", "acc"), ("shallow_ratio", "shallow_ratio"),
            ("compute_cost", "compute_cost"), ("bits/byte", "bpb"), ("PPL (compact)", "ppl_compact"),
            ("speedup (compact)", "speedup")]
    return report.markdown_table([dict(results[name], model=name) for name in names], cols)


def _layer_lr_table(results, jobs) -> Tuple[str, list]:
    folder_of = {label: folder for label, folder, _ in jobs}
    baseline = LAYER_LR_CONFIGS[-1][0]
    base = results[folder_of[baseline]]["ppl"]
    rows, points = [], []
    for label, _, _ in LAYER_LR_CONFIGS:
        r = results[folder_of[label]]
        rows.append(dict(config=label, ppl=r["ppl"],
                         vs="baseline" if label == baseline else report.vs_baseline(r["ppl"], base)))
        if label != baseline:
            points.append((label.split(" (")[0], r["compute_cost"], r["ppl"]))
    table = report.markdown_table(rows, [("Config", "config"), ("PPL", "ppl"), ("vs Baseline", "vs")])
    return f"\n\n## Layer-wise LR ({DEFAULT_PRESET} weights {{1: 0.7, 3: 0.3}})\n\n" + table, points
