"""Shared benchmark fixtures: the bench device, timing with derived metrics, peak memory.

Every benchmark records into `benchmark.extra_info`: provider, shape, tokens_per_s,
peak_mem_mb, (where a FLOP count is known) tflops, and load_1m, the 1-minute load average
when it finished (other jobs on a shared box skew CPU timings); bench/report.py turns them
into tables.

With BENCH_RESULTS_JSONL=FILE set, each benchmark's result (or the reason it was skipped) is
appended to FILE as one JSON line the moment its test ends, after a first line describing the
machine: a run stopped by a time limit keeps every result it reached (pytest-benchmark's own
--benchmark-json is written only at the end). `python -m bench.report --jsonl FILE` renders it.

Peak memory (`peak_mem_mb`) is the memory one fwd+bwd step adds on top of its inputs:
- CUDA: torch.cuda.max_memory_allocated() during the step minus memory_allocated() before it.
- CPU: torch keeps no CPU allocator statistics, so the step runs in a fresh child process
  (see cpu_peak_extra_mb): after a warm-up step, a thread samples RSS every 0.5 ms during a
  second step; the figure is the highest sample minus RSS before that step, so it includes
  the returned gradients but not the inputs.

FLOP counts (block_flops, causal_block_flops, head_flops) are matmul FLOPs only: norms,
softmax and the exp over the vocabulary are not in them, so a speedup "ideal" built from them
is the matmul ratio, not a wall-time prediction.
"""
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import threading

import pytest
import torch

REPO_ROOT = __file__.rsplit("/bench/", 1)[0]
RESULTS_ENV = "BENCH_RESULTS_JSONL"
SHAPES_ENV = "BENCH_SHAPES"  # "tiny": each suite's tiny shapes (bash bench/gpu_check.sh --dry-run)
TIMED_ROUNDS = 5
RSS_SAMPLE_S = 0.0005
MMAP_THRESHOLD = 64 * 1024  # bytes


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> "bfloat16", for shape labels."""
    return str(dtype).removeprefix("torch.")


def tiny_shapes() -> bool:
    """Whether the suites run their tiny shapes: the GPU check's dry run on CPU, which only
    shows that every step of bench/gpu_check.sh still runs and writes its results."""
    return os.environ.get(SHAPES_ENV) == "tiny"


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    return f"{model} ({torch.get_num_threads()} threads)"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(torch=torch.__version__, triton=_version("triton"), device=device_name(bench_device()),
                        loadavg=list(os.getloadavg()), cpu_count=os.cpu_count())


_SKIPPED = []  # (test id, reason) of every benchmark that did not run


def pytest_runtest_logreport(report):
    """Remember why a benchmark was skipped, so its provider is listed in the report with the
    reason (a peer not installed, no CUDA) instead of silently missing from its table."""
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped: ")
        if not reason.startswith("Skipping non-benchmark"):  # --benchmark-only's own skips
            _SKIPPED.append(dict(test=report.nodeid.split("::")[-1], reason=reason))
            _append_result(skipped=_SKIPPED[-1])


def _append_result(**line) -> None:
    """One JSON line into $BENCH_RESULTS_JSONL (if set), flushed at once."""
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")


def pytest_sessionstart(session):
    device = bench_device()
    _append_result(machine_info=dict(device=device_name(device), torch=torch.__version__, triton=_version("triton"),
                                     python_version=platform.python_version(), loadavg=list(os.getloadavg()),
                                     cpu_count=os.cpu_count()),
                   commit_info=_commit(), datetime=datetime.datetime.now(datetime.timezone.utc).isoformat())


def _commit() -> dict:
    """HEAD and whether the tree differs from it; unknown outside a git checkout (a device copy)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=REPO_ROOT)
    except (OSError, subprocess.CalledProcessError):
        return {}
    return dict(id=sha.stdout.strip(), dirty=bool(dirty.stdout.strip()))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Append a benchmark's result the moment its test has run (see the module docstring)."""
    outcome = yield
    bench = item.funcargs.get("benchmark") if hasattr(item, "funcargs") else None
    if call.when == "call" and outcome.get_result().passed and getattr(bench, "stats", None) is not None:
        _append_result(benchmark=bench.stats.as_dict(include_data=False))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["skipped"] = list(_SKIPPED)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cuda_peak_extra_mb(step, device: torch.device) -> float:
    """Peak CUDA memory of one call of step() above what was allocated before it."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child_peak_rss_mb(step) -> None:
    """Child side of cpu_peak_extra_mb: warm up, then print step()'s RSS peak over the baseline."""
    step()  # loads libraries, compiles, fills caches
    gc.collect()
    before, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.wait(RSS_SAMPLE_S):
            peak[0] = max(peak[0], _rss_mb())
    sampler = threading.Thread(target=sample)
    sampler.start()
    step()
    done.set()
    sampler.join()
    print(json.dumps({"peak_mem_mb": max(peak[0], _rss_mb()) - before}))


def cpu_peak_extra_mb(module: str, function: str, *args) -> float:
    """Peak RSS that one `module.function(*args)()` step adds, measured in a fresh process.

    Fixed glibc mmap/trim thresholds make every large tensor its own mapping that goes back
    to the OS when freed, so RSS follows the live tensors (glibc's adaptive threshold would
    otherwise keep freed warm-up memory and hide the peak).
    """
    code = (f"import sys; sys.path.insert(0, {REPO_ROOT!r}); import {module} as m; "
            f"from bench.conftest import child_peak_rss_mb; child_peak_rss_mb(m.{function}(*{args!r}))")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(MMAP_THRESHOLD))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    if out.returncode:
        raise RuntimeError(f"peak-memory child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mem_mb"]


def block_flops(cfg, n_query: int, n_kv: int, key_counts: int) -> int:
    """Matmul FLOPs of one transformer block's forward: K/V for n_kv tokens, q/out/MLP for
    n_query, attention over key_counts keys summed over the queries."""
    d, f = cfg.d_model, cfg.d_ff
    return 2 * (2 * d * d) * n_kv + 2 * (2 * d * d + 2 * d * f) * n_query + 4 * d * key_counts


def causal_block_flops(cfg, batch: int, seq_len: int) -> int:
    """block_flops of a dense causal forward over (batch, seq_len) tokens."""
    n = batch * seq_len
    return block_flops(cfg, n, n, batch * seq_len * (seq_len + 1) // 2)


def head_flops(cfg, n_tokens: int) -> int:
    """Matmul FLOPs of one exit head (lm_head) forward over n_tokens."""
    return 2 * cfg.d_model * cfg.vocab_size * n_tokens


def run_timed(benchmark, step, device: torch.device, rounds: int = TIMED_ROUNDS) -> float:
    """Time step() (synchronised on CUDA) with one warm-up round; returns the median seconds.
    Tiny shapes (tiny_shapes()) take one round: their times mean nothing."""
    def synced():
        step()
        synchronize(device)
    benchmark.pedantic(synced, rounds=1 if tiny_shapes() else rounds, iterations=1, warmup_rounds=1)
    return benchmark.stats.stats.median


def record(benchmark, *, provider, shape, seconds, tokens, peak_mem_mb, flops=None, **extra) -> None:
    """Derived metrics next to the timing: tokens/s, TFLOP/s and peak memory."""
    benchmark.extra_info.update(provider=provider, shape=shape, tokens_per_s=tokens / seconds,
                                peak_mem_mb=peak_mem_mb, load_1m=os.getloadavg()[0], **extra)
    if flops is not None:
        benchmark.extra_info["tflops"] = flops / seconds / 1e12


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()
