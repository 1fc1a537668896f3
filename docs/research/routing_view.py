"""The routing view of docs/research.md: for the routing presets of a finished study (each at
its best base LR), test-split exact-mode PPL, shallow_ratio and compute_cost per routing
threshold, mean ± std over the study's seeds, and the cheapest threshold whose mean PPL stays
within 2% of full depth.

    python docs/research/routing_view.py runs/study/short runs/study/long > docs/research/routing.md
"""
import json
import sys
from pathlib import Path

from fastexit import report
from fastexit.config import MAX_PPL_INCREASE
from fastexit.runs import Run

THRESHOLDS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.95)
PRESETS = ("standard_routing", "asymmetric_best", "lpt")
COLUMNS = [("routing_threshold", "threshold"), ("PPL", "ppl"), ("ΔPPL vs threshold 0", "delta"),
           ("shallow_ratio", "shallow_ratio"), ("compute_cost", "compute_cost"), ("flop_cost", "flop_cost")]


def preset_view(study: Path, summary: dict, preset: str) -> str:
    lr = summary["rows"][preset]["lr"]
    paths = [study / r["path"] for r in summary["runs"] if r["folder"] == preset and r["lr"] == lr]
    sweeps = [Run.load(path).sweep("test", "exact", THRESHOLDS) for path in paths]  # per seed, per threshold
    rows = []
    for i, th in enumerate(THRESHOLDS):
        at = [sweep[i] for sweep in sweeps]
        ppl = [r["ppl"] for r in at]
        rel = [r["ppl"] / sweep[0]["ppl"] - 1 for r, sweep in zip(at, sweeps)]
        spreads = {key: report.spread_cell([r[key] for r in at])
                   for key in ("shallow_ratio", "compute_cost", "flop_cost")}
        rows.append(dict(spreads, threshold=f"{th:g}", ppl=report.spread_cell(ppl), ppl_mean=report.mean_std(ppl)[0],
                         delta=f"{100 * report.mean_std(rel)[0]:+.2f}%",
                         cost_mean=report.mean_std([r["compute_cost"] for r in at])[0]))
    full = rows[0]["ppl_mean"]
    within = [r for r in rows[1:] if r["ppl_mean"] <= full * (1 + MAX_PPL_INCREASE)]
    best = min(within, key=lambda r: r["cost_mean"]) if within else None
    line = (f"Cheapest threshold within {MAX_PPL_INCREASE:.0%} of full depth (mean over seeds): "
            + (f"{best['threshold']} (compute_cost {best['cost_mean']:.3f})." if best else "none of those tried."))
    return (f"### {preset} (base LR {lr:g}, {len(paths)} seeds)\n\n" + report.markdown_table(rows, COLUMNS)
            + "\n\n" + line + "\n")


def main(studies) -> None:
    for study in map(Path, studies):
        summary = json.loads((study / "compare.json").read_text(encoding="utf-8"))
        print(f"## {study.name}\n")
        for preset in PRESETS:
            print(preset_view(study, summary, preset))


if __name__ == "__main__":
    main(sys.argv[1:])
