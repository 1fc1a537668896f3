"""`bash bench/gpu_check.sh --dry-run`: every step of the GPU check runs on CPU with tiny shapes
(TRITON_INTERPRET=1) and leaves its results in $OUT, so the script cannot rot between GPU
sessions: the correctness step's log, the loss and routing benchmarks' per-benchmark JSON lines
and their markdown tables, within the device tool's 8 files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")
pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
MAX_FILES = 8  # what the device tool brings back from $OUT


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("BENCH_RESULTS_JSONL", None)
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_step_leaves_its_results(out):
    names = {p.name for p in out.iterdir()}
    assert {"env.txt", "check.log", "bench.log", "loss.jsonl", "loss.md", "routing.jsonl", "routing.md"} <= names
    assert len(names) <= MAX_FILES and all(p.is_file() for p in out.iterdir())
    assert "(a) exit status 0" in (out / "check.log").read_text()


def test_loss_step_measures_every_provider_of_the_table(out):
    entries = lines(out / "loss.jsonl")
    assert "machine_info" in entries[0]
    measured = {e["benchmark"]["extra_info"]["provider"] for e in entries if "benchmark" in e}
    assert {"ours_triton", "ours_triton_gemm", "ours_torch", "matmul_floor"} <= measured
    skipped = " ".join(e["skipped"]["test"] for e in entries if "skipped" in e)
    assert "liger" in measured or "liger" in skipped  # a peer missing here is listed, not lost
    table = (out / "loss.md").read_text()
    assert "| ours_triton |" in table and "| ours_triton_gemm |" in table and "speed-up vs matmul_floor" in table


def test_routing_step_measures_evaluation_and_generation(out):
    groups = {e["benchmark"]["group"].split()[0] for e in lines(out / "routing.jsonl") if "benchmark" in e}
    assert groups == {"routing-eval", "routing-generate"}
    table = (out / "routing.md").read_text()
    assert "| compact s~0.5 |" in table and "| early-exit s~0.5 |" in table
