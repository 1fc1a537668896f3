"""Markdown tables from pytest-benchmark JSON: one table per `benchmark.group`.

    python -m bench.report [--json FILE | --jsonl FILE] [--out bench/results/<device>.md]
                           [--baseline NAME ...] [-- PYTEST ARGS]

Without --json it first runs `pytest bench/ --benchmark-only` (plus PYTEST ARGS, e.g. `-k loss`)
and reads the JSON it writes. --jsonl reads the lines bench/conftest.py appends per benchmark
under BENCH_RESULTS_JSONL (what a run cut short by a time limit leaves). Columns come from each benchmark's extra_info: provider,
tokens_per_s, peak_mem_mb, tflops, then any other numeric keys, so every suite in bench/ is
reported the same way. Speed-ups (baseline median / median) are given against every --baseline
provider present in a group (default: naive, linear_ce, fastexit; else the group's first row); peak
memory is compared with the first of them. Groups named in GROUP_COLUMNS show those columns
instead, in that order, and no median speed-ups: they record their own, from interleaved timings.
Benchmarks that were skipped (a peer not installed, no CUDA) are listed last with the reason.
There a key ending in "*" stands for every key with that prefix (per-exit metrics such as
exit_ratio_L3, exit_ratio_L6), in the order of the number after it.
"""
import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

KNOWN_COLUMNS = [("tokens_per_s", "tokens/s"), ("peak_mem_mb", "peak MB"), ("tflops", "TFLOP/s")]
SKIPPED_KEYS = {"provider", "shape"}
DEFAULT_BASELINES = ("naive", "linear_ce", "fastexit")
_VS_EXIT_FINAL = "_vs_exact_exit_final"  # bench/test_bench_routing.py's evaluate(mode="exact", per_layer=False)


def _speedup_columns(suffix: str, baseline: str) -> list:
    """One baseline's paired and min-time speedups, FLOP ideal, and speedup/ideal of both."""
    return [(f"measured_speedup{suffix}", f"speedup vs {baseline}"), (f"min_time_speedup{suffix}", "(min times)"),
            (f"ideal_speedup{suffix}", "ideal"), (f"fraction_of_ideal{suffix}", "speedup/ideal"),
            (f"min_time_fraction_of_ideal{suffix}", "(min times)")]


# Group-name prefix -> (key, title) columns: evaluate() compact vs exact, against two exact baselines.
GROUP_COLUMNS = {
    "evaluate compact vs exact": [("shallow_ratio", "shallow_ratio"), ("exit_ratio_L*", "share L*"),
                                  ("routing_threshold", "threshold"), ("routing_threshold_L*", "threshold L*"),
                                  ("peak_mem_mb", "peak MB"), *_speedup_columns("", "exact"),
                                  *_speedup_columns(_VS_EXIT_FINAL, "exact exit+final"), ("load_1m", "load_1m")],
}


def run_benchmarks(pytest_args: list) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "pytest", "bench/", "--benchmark-only", f"--benchmark-json={out}", *pytest_args]
        done = subprocess.run(cmd)
        if not out.exists():
            sys.exit(f"pytest wrote no benchmark JSON (exit code {done.returncode})")
        if done.returncode:  # some benchmark failed: the others still make their tables
            print(f"pytest exited with {done.returncode}: the tables hold the benchmarks that ran", file=sys.stderr)
        return json.loads(out.read_text())


def read_jsonl(path: Path) -> dict:
    """pytest-benchmark's JSON layout from bench/conftest.py's per-benchmark lines."""
    data = dict(machine_info={}, benchmarks=[], skipped=[])
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if "machine_info" in entry:
            data.update(entry)
        elif "benchmark" in entry:
            data["benchmarks"].append(entry["benchmark"])
        elif "skipped" in entry:
            data["skipped"].append(entry["skipped"])
    return data


def fmt(value) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    if value == 0 or 0.01 <= abs(value) < 1e6:
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:.3g}"


def header(data: dict) -> list:
    machine, commit = data["machine_info"], data.get("commit_info", {})
    sha = (commit.get("id") or "unknown")[:12] + ("-dirty" if commit.get("dirty") else "")
    return [f"# Benchmarks on {machine.get('device', machine.get('cpu', {}).get('brand_raw', 'unknown device'))}", "",
            f"torch {machine.get('torch', '?')}, triton {machine.get('triton', '?')}, "
            f"python {machine.get('python_version', '?')}, commit {sha}, run {data.get('datetime', '?')[:19]}", "",
            *load_line(machine),
            "Times are pytest-benchmark medians (min beside them: the box may be shared). "
            "peak MB: memory one step adds over its inputs (see bench/conftest.py).", ""]


def load_line(machine: dict) -> list:
    """Other processes on the box skew CPU timings: say how busy it was when the run ended."""
    if "loadavg" not in machine:
        return []
    one, five, fifteen = machine["loadavg"]
    return [f"Load average at the end of the run: {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) "
            f"on {machine.get('cpu_count', '?')} CPUs.", ""]


def numeric(value) -> bool:
    return isinstance(value, (int, float))


def fixed_columns(group: str):
    return next((cols for prefix, cols in GROUP_COLUMNS.items() if group.startswith(prefix)), None)


def expand_wildcards(columns: list, keys: set) -> list:
    """columns with each ("prefix*", "title*") replaced by one column per key with that prefix,
    ordered by the number after it, "*" in the title becoming that suffix."""
    out = []
    for key, title in columns:
        if not key.endswith("*"):
            out.append((key, title))
            continue
        prefix = key[:-1]
        suffixes = sorted((k[len(prefix):] for k in keys if k.startswith(prefix)),
                          key=lambda x: (int(x) if x.isdigit() else float("inf"), x))
        out += [(prefix + x, title.replace("*", x)) for x in suffixes]
    return out


def extra_columns(group: str, rows: list) -> list:
    """(key, title) of the group's GROUP_COLUMNS, else the known metrics, then any other
    numeric extra_info keys; only keys some row has a number for."""
    keys = {k for r in rows for k, v in r["extra_info"].items() if numeric(v)}
    fixed = fixed_columns(group)
    if fixed is not None:
        return [(k, t) for k, t in expand_wildcards(fixed, keys) if k in keys]
    known = [(k, t) for k, t in KNOWN_COLUMNS if k in keys]
    other = sorted(keys - {k for k, _ in KNOWN_COLUMNS} - SKIPPED_KEYS)
    return known + [(k, k) for k in other]


def pick_baselines(rows: list, baselines: list) -> list:
    """The rows of the named baseline providers present in the group, else its first row."""
    by_provider = {r["extra_info"].get("provider"): r for r in rows}
    return [by_provider[b] for b in baselines if b in by_provider] or rows[:1]


def provider(row: dict) -> str:
    return row["extra_info"].get("provider", row["name"])


def group_table(group: str, rows: list, baselines: list) -> list:
    bases = pick_baselines(rows, baselines) if fixed_columns(group) is None else []
    columns, base_peak = extra_columns(group, rows), bases[0]["extra_info"].get("peak_mem_mb") if bases else None
    titles = ["provider", "median ms", "min ms", *[t for _, t in columns]]
    titles += [f"speed-up vs {provider(b)}" for b in bases] + ([f"peak vs {provider(bases[0])}"] if base_peak else [])
    lines = [f"## {group}", "", "| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for r in rows:
        info, median = r["extra_info"], r["stats"]["median"]
        cells = [provider(r), fmt(median * 1e3), fmt(r["stats"]["min"] * 1e3)]
        cells += [fmt(info[k]) if numeric(info.get(k)) else "" for k, _ in columns]
        cells += [f"{b['stats']['median'] / median:.2f}x" for b in bases]
        if base_peak:
            cells += [f"{info['peak_mem_mb'] / base_peak:.1%}" if "peak_mem_mb" in info else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def render(data: dict, baselines: list) -> str:
    groups = {}
    for bench in data["benchmarks"]:
        groups.setdefault(bench["group"] or "ungrouped", []).append(bench)
    lines = header(data)
    for group, rows in groups.items():
        lines += group_table(group, rows, baselines)
    return "\n".join(lines + skipped_table(data.get("skipped", [])))


def skipped_table(skipped: list) -> list:
    """The benchmarks that did not run (a provider this machine cannot run), with the reason."""
    if not skipped:
        return []
    return (["## Not run", "", "| benchmark | reason |", "|---|---|"]
            + [f"| {s['test']} | {s['reason']} |" for s in skipped] + [""])


def default_out(data: dict) -> Path:
    machine = data["machine_info"]
    slug = re.sub(r"[^a-z0-9]+", "-", str(machine.get("device", machine.get("node", "device"))).lower()).strip("-")
    return Path("bench/results") / f"{slug}.md"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--json", type=Path, help="pytest-benchmark JSON to read instead of running bench/")
    source.add_argument("--jsonl", type=Path, help="bench/conftest.py's per-benchmark lines (BENCH_RESULTS_JSONL)")
    parser.add_argument("--out", type=Path, help="markdown file to write (default bench/results/<device>.md)")
    parser.add_argument("--baseline", action="append", help="provider to compare against (repeatable)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments when running bench/")
    args = parser.parse_args(argv)
    if args.jsonl:
        data = read_jsonl(args.jsonl)
    else:
        data = json.loads(args.json.read_text()) if args.json else run_benchmarks(args.pytest_args)
    out = args.out or default_out(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(data, args.baseline or list(DEFAULT_BASELINES)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
