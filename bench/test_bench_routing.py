"""Routed inference: exact vs compact evaluation (routed forwards, and whole
`UniversalTrainer.evaluate()` calls with default arguments), full-depth vs early-exit generation.

Random-weight models with a scaled-up head (so the exit confidence spreads over (0, 1)), with
one exit or several (the 12-layer shape also with exits 3, 6, 9: evenly spaced, so every exit
saves the same three blocks for the tokens leaving there). Shallow ratios of 0.25 / 0.5 / 0.75
are split evenly over the exits (with 3 exits, s~0.75 is 25% leaving at each); each exit's
threshold is a quantile of the confidence of the tokens still running there, measured on the
benchmark's own input with the earlier exits' thresholds in place (cascade_thresholds).
Each routed benchmark records the ideal speedup (the ratio of the two modes' matmul FLOPs:
block projections, attention scores and values, heads) and the measured speedup from
interleaved timings of both modes in the same process (the median of per-round ratios, and the
ratio of the fastest rounds, which other jobs on a shared box disturb least), the shallow ratio
and, with several exits, the share leaving at each exit (exit_ratio_L{i}) and its threshold.
"""
import functools
import statistics
import time
from dataclasses import dataclass
from typing import NamedTuple, Tuple

import pytest
import torch

from bench.conftest import (bench_device, block_flops, causal_block_flops, cuda_peak_extra_mb, dtype_name, head_flops,
                            record, run_timed, synchronize, tiny_shapes)
from fastexit import UniversalConfig, UniversalTrainer
from fastexit.generate import generate
from fastexit.model import EarlyExitTransformer, ModelConfig
from fastexit.routing import compact_routed_forward, exact_routed_forward

HEAD_SCALE = 40.0          # spreads random-init confidences over (0, 1)
SHALLOW_TARGETS = (0.25, 0.5, 0.75)
PAIRED_ROUNDS = 3          # interleaved (baseline, routed) timings per measured speedup
EVAL_BATCHES = 3           # (B, T) batches per evaluate() call: ~1 s of compact evaluation on 2 CPU cores
ROUTING_OFF = 0.0          # exact mode runs every layer on every token whatever the threshold
VS_EXIT_FINAL = "_vs_exact_exit_final"  # suffix of ratios against evaluate(mode="exact", per_layer=False)


@dataclass(frozen=True)
class Shape:
    n_layers: int
    d_model: int
    n_heads: int
    exit_layers: Tuple[int, ...]
    vocab: int = 8192
    batch: int = 4          # evaluation batch (B, T)
    seq_len: int = 256
    gen_batch: int = 64     # generation rows (CPU GEMMs of a few rows run far below peak), prompt, new tokens
    prompt_len: int = 8
    new_tokens: int = 48
    dtype: torch.dtype = torch.float32  # of the model's weights

    @property
    def label(self) -> str:
        exits = f"exit{self.exit_layers[0]}" if len(self.exit_layers) == 1 else \
            "exits" + "_".join(map(str, self.exit_layers))
        dtype = "" if self.dtype == torch.float32 else "-" + dtype_name(self.dtype)
        return f"L{self.n_layers}-d{self.d_model}-{exits}-V{self.vocab}{dtype}"

    def exit_shares(self, level: int) -> Tuple[float, ...]:
        """Target share of all tokens leaving at each exit: SHALLOW_TARGETS[level] split evenly."""
        return (SHALLOW_TARGETS[level] / len(self.exit_layers),) * len(self.exit_layers)


CPU_SHAPES = [Shape(12, 512, 8, (4,)), Shape(3, 256, 4, (1,)), Shape(12, 512, 8, (3, 6, 9))]
# The CPU tables' exits on a 12-layer d=2048 bf16 model; eval 8x1024 tokens, decoding 64 rows.
GPU_SHAPES = [Shape(12, 2048, 16, exits, vocab=32000, batch=8, seq_len=1024, prompt_len=128, new_tokens=128,
                    dtype=torch.bfloat16) for exits in ((4,), (3, 6, 9))]
TINY_SHAPES = [Shape(3, 32, 2, (1,), vocab=97, batch=2, seq_len=16, gen_batch=4, prompt_len=4, new_tokens=6)]  # dry run
SHAPES = TINY_SHAPES if tiny_shapes() else GPU_SHAPES if torch.cuda.is_available() else CPU_SHAPES


# ----------------------------------------------------------------------------- FLOP model
def eval_flops(cfg, exits, layers_run):
    """Matmul FLOPs of a routed forward; layers_run: (B, T) int64, each token's exit layer,
    n_layers for tokens that run to the end (all n_layers: exact mode, which also scores every
    exit). Between exits, the tokens still running run q/out/MLP and every token's K/V is
    computed; the head runs at every exit for the tokens reaching it and at the end for the
    rest. Once every token has left, compact mode stops: no deeper block runs."""
    B, T = layers_run.shape
    keys = torch.arange(1, T + 1).expand(B, T)  # causal keys per query
    flops, start = 0, 0
    for end in [*exits, cfg.n_layers]:
        running = layers_run > start  # (B, T): tokens that run blocks start+1..end
        n_run = int(running.sum())
        if n_run == 0:
            break
        flops += (end - start) * block_flops(cfg, n_run, B * T, int(keys[running].sum())) + head_flops(cfg, n_run)
        start = end
    return flops


def generation_flops(cfg, exits, prompt_len, layers_run, exit_heads):
    """Matmul FLOPs of generate(): full-depth prefill, then per step s >= 1 the blocks up to
    the first exit dense over B rows, deeper ones with K/V for every row (their caches) and
    q/out/MLP for the rows still running; per step the final head for rows reaching the end and,
    with exit_heads (routing on: confidences), the head at each exit for the rows reaching it.
    layers_run: (B, S) int64, each step's exit layer (n_layers: the end)."""
    (B, S), L = layers_run.shape, cfg.n_layers
    flops = L * causal_block_flops(cfg, B, prompt_len)
    for s in range(S):
        keys, start = prompt_len + s, 0  # step s attends over positions 0..T0+s-1
        for end in [*exits, L]:
            n_run = int((layers_run[:, s] > start).sum())  # rows that run blocks start+1..end
            if s:
                flops += (end - start) * block_flops(cfg, n_run, B, n_run * keys)
            if exit_heads or end == L:
                flops += head_flops(cfg, n_run)
            start = end
    return flops


def evaluate_flops(cfg, exits, layers_runs, per_layer):
    """Matmul FLOPs of one trainer.evaluate() over batches with these (B, T) layers_run (all
    n_layers in exact mode): each batch's routed forward (eval_flops), plus, with per_layer, the
    head at every other layer, which exact mode scores in that same forward."""
    other_heads = cfg.n_layers - len(exits) - 1 if per_layer else 0
    return sum(eval_flops(cfg, exits, run) + other_heads * head_flops(cfg, run.numel()) for run in layers_runs)


def cascade_thresholds(running_conf, shares, n_tokens):
    """One threshold per exit so that about shares[i] of the n_tokens leave at exit i: the
    quantile of the confidence at exit i of the tokens still running there, running_conf(the
    thresholds of the exits before) -> (n,) fp32, that leaves shares[i] * n_tokens of them."""
    thresholds = []
    for share in shares:
        conf = running_conf(tuple(thresholds))
        thresholds.append(conf.quantile(max(0.0, 1 - share * n_tokens / conf.numel())).item())
    return thresholds


def routing_info(exits, thresholds, layers_run, n_layers) -> dict:
    """extra_info of a routed run: shallow_ratio, and its threshold, or with several exits
    each exit's threshold and the share of tokens leaving there (exit_ratio_L{i})."""
    info = dict(shallow_ratio=(layers_run < n_layers).float().mean().item())
    if len(exits) == 1:
        return dict(info, routing_threshold=thresholds[0])
    for layer, threshold in zip(exits, thresholds):
        info.update({f"routing_threshold_L{layer}": threshold,
                     f"exit_ratio_L{layer}": (layers_run == layer).float().mean().item()})
    return info


# ----------------------------------------------------------------------------- fixtures
def make_model(shape: Shape, device) -> EarlyExitTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=shape.vocab, n_layers=shape.n_layers, d_model=shape.d_model,
                      n_heads=shape.n_heads, max_seq_len=shape.seq_len, tie_embeddings=False)
    model = EarlyExitTransformer(cfg).to(device, shape.dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    return model


def random_batch(shape: Shape, device):
    """(x, y), each (B, T) int64."""
    return tuple(torch.randint(0, shape.vocab, (2, shape.batch, shape.seq_len), device=device))


def _eval_running_conf(model, idx, exits):
    """running_conf of compact_routed_forward on idx: confidence at exit len(before) of the
    tokens that left at none of the exits before it, under their thresholds `before` (a tuple)."""
    @functools.lru_cache(maxsize=None)  # the levels share the first exit's pass
    def running_conf(before):
        out = compact_routed_forward(model, idx, list(exits[:len(before) + 1]), [*before, 0.0])
        return out.conf[~out.easy].float()
    return running_conf


def _gen_running_conf(model, prompt, new_tokens, exits):
    """running_conf of generate (greedy, so the tokens depend on the earlier thresholds)."""
    @functools.lru_cache(maxsize=None)
    def running_conf(before):
        _, layers_run, conf, _ = generate(model, prompt, new_tokens, [*before, 0.0], list(exits[:len(before) + 1]),
                                       return_conf=True)
        return conf[layers_run == model.n_layers]
    return running_conf


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: s.label)
def setup(request):
    shape, device = request.param, bench_device()
    model = make_model(shape, device)
    idx = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len), device=device)
    targets = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len), device=device)
    prompt = torch.randint(0, shape.vocab, (shape.gen_batch, shape.prompt_len), device=device)
    batches = [(idx, targets)] + [random_batch(shape, device) for _ in range(EVAL_BATCHES - 1)]
    levels = [shape.exit_shares(level) for level in range(len(SHALLOW_TARGETS))]
    eval_conf = _eval_running_conf(model, idx, shape.exit_layers)
    gen_conf = _gen_running_conf(model, prompt, shape.new_tokens, shape.exit_layers)
    return dict(shape=shape, model=model, idx=idx, targets=targets, batches=batches, prompt=prompt, device=device,
                eval_thresholds=[cascade_thresholds(eval_conf, shares, idx.numel()) for shares in levels],
                gen_thresholds=[cascade_thresholds(gen_conf, shares, shape.gen_batch * shape.new_tokens)
                                for shares in levels])


def _seconds(fn, device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def _peak(step, device):
    return cuda_peak_extra_mb(step, device) if device.type == "cuda" else None  # CPU: not measured here


class Speedup(NamedTuple):
    """Baseline time / step time: paired = median of the per-round ratios; min_time = ratio of
    the fastest rounds (what is left when other jobs on the box only ever add time)."""
    paired: float
    min_time: float


def timed_against(benchmark, baselines, step, device, rounds: int = PAIRED_ROUNDS):
    """Benchmark step() with every baseline timed just before every round (pedantic's untimed
    setup), so load drift hits them all alike. Returns (median seconds, [Speedup] per baseline)."""
    base = [[] for _ in baselines]

    def time_baselines():
        for times, baseline in zip(base, baselines):
            times.append(_seconds(baseline, device))
    benchmark.pedantic(lambda: (step(), synchronize(device)), setup=time_baselines,
                       rounds=rounds, iterations=1, warmup_rounds=1)
    data = benchmark.stats.stats.data
    return benchmark.stats.stats.median, [
        Speedup(statistics.median([b / r for b, r in zip(times[-rounds:], data)]),
                min(times[-rounds:]) / min(data)) for times in base]


def speedup_info(measured: Speedup, ideal, suffix="") -> dict:
    """extra_info of a measured speedup next to its FLOP ideal."""
    return {f"measured_speedup{suffix}": measured.paired, f"min_time_speedup{suffix}": measured.min_time,
            f"ideal_speedup{suffix}": ideal, f"fraction_of_ideal{suffix}": measured.paired / ideal,
            f"min_time_fraction_of_ideal{suffix}": measured.min_time / ideal}


def _record_routed(benchmark, setup, *, mode, level, thresholds, layers_run, seconds, measured, flops, base_flops,
                   step):
    shape = setup["shape"]
    info = routing_info(shape.exit_layers, thresholds, layers_run, shape.n_layers)
    record(benchmark, provider=f"{mode} s~{SHALLOW_TARGETS[level]}", shape=shape.label, seconds=seconds,
           tokens=layers_run.numel(), peak_mem_mb=_peak(step, setup["device"]), flops=flops,
           target_shallow=SHALLOW_TARGETS[level], **info, **speedup_info(measured, base_flops / flops))


def _exits(setup):
    return list(setup["shape"].exit_layers)


def _full_depth(setup, shape):
    """layers_run (int64, of this shape) of exact mode or full-depth generation: n_layers everywhere."""
    return torch.full(shape, setup["shape"].n_layers, dtype=torch.int64)


# ----------------------------------------------------------------------------- evaluation
def _exact_step(setup):
    return lambda: exact_routed_forward(setup["model"], setup["idx"], _exits(setup), 0.0, setup["targets"])


def test_eval_exact(benchmark, setup):
    shape, model = setup["shape"], setup["model"]
    benchmark.group = f"routing-eval {shape.label}"
    step = _exact_step(setup)
    seconds = run_timed(benchmark, step, setup["device"], rounds=PAIRED_ROUNDS)
    flops = eval_flops(model.cfg, _exits(setup), _full_depth(setup, setup["idx"].shape))
    record(benchmark, provider="exact", shape=shape.label, seconds=seconds, tokens=setup["idx"].numel(),
           peak_mem_mb=_peak(step, setup["device"]), flops=flops, shallow_ratio=0.0)


@pytest.mark.parametrize("level", range(len(SHALLOW_TARGETS)))
def test_eval_compact(benchmark, setup, level):
    shape, model, idx, exits = setup["shape"], setup["model"], setup["idx"], _exits(setup)
    thresholds, outputs = setup["eval_thresholds"][level], []
    benchmark.group = f"routing-eval {shape.label}"

    def step():
        outputs.append(compact_routed_forward(model, idx, exits, thresholds, setup["targets"]))

    seconds, (measured,) = timed_against(benchmark, [_exact_step(setup)], step, setup["device"])
    compact, exact = outputs[-1], exact_routed_forward(model, idx, exits, thresholds, setup["targets"])
    layers_run = compact.layers_run.cpu()  # (B, T)
    benchmark.extra_info.update(  # state propagation vs all layers on all tokens (random weights)
        nll_rel_diff_vs_exact=((compact.nll.mean() - exact.nll.mean()) / exact.nll.mean()).item(),
        pred_agreement_vs_exact=(compact.pred == exact.pred).float().mean().item())
    _record_routed(benchmark, setup, mode="compact", level=level, thresholds=thresholds, layers_run=layers_run,
                   seconds=seconds, measured=measured, flops=eval_flops(model.cfg, exits, layers_run),
                   base_flops=eval_flops(model.cfg, exits, _full_depth(setup, layers_run.shape)), step=step)


# ----------------------------------------------------------------------------- evaluate()
def _evaluate(setup, thresholds, mode, **kwargs):
    """trainer.evaluate(model, batches, mode) of a trainer routing at the shape's exits with
    these thresholds (one per exit); kwargs only where a benchmark departs from the defaults."""
    shape = setup["shape"]
    config = UniversalConfig({shape.n_layers: 1.0}, exit_layers=_exits(setup), routing_thresholds=list(thresholds))
    trainer = UniversalTrainer(config, shape.vocab, device=setup["device"])
    return lambda: trainer.evaluate(setup["model"], setup["batches"], mode, **kwargs)


def _all_full_depth(setup):
    return [_full_depth(setup, x.shape) for x, _ in setup["batches"]]  # (B, T) each


def _compact_layers_run(setup, thresholds):
    """(B, T) layers_run of each batch under compact_routed_forward (what the FLOP count needs)."""
    return [compact_routed_forward(setup["model"], x, _exits(setup), thresholds).layers_run.cpu()
            for x, _ in setup["batches"]]


def _evaluate_flops(setup, layers_runs, per_layer):
    return evaluate_flops(setup["model"].cfg, _exits(setup), layers_runs, per_layer)


def _evaluate_group(benchmark, setup):
    benchmark.group = f"evaluate compact vs exact {setup['shape'].label}"


def _routing_off(setup):
    return [ROUTING_OFF] * len(setup["shape"].exit_layers)


def test_evaluate_exact(benchmark, setup):
    """Default exact mode (per_layer on: one forward, the head at every layer): the baseline."""
    _evaluate_group(benchmark, setup)
    step, runs = _evaluate(setup, _routing_off(setup), "exact"), _all_full_depth(setup)
    seconds = run_timed(benchmark, step, setup["device"], rounds=PAIRED_ROUNDS)
    record(benchmark, provider="exact", shape=setup["shape"].label, seconds=seconds, tokens=torch.cat(runs).numel(),
           peak_mem_mb=_peak(step, setup["device"]), flops=_evaluate_flops(setup, runs, True), shallow_ratio=0.0)


def test_evaluate_exact_exit_final(benchmark, setup):
    """Exact mode with per_layer=False (heads at the exits and the final layer only) vs the default."""
    _evaluate_group(benchmark, setup)
    off = _routing_off(setup)
    step, runs = _evaluate(setup, off, "exact", per_layer=False), _all_full_depth(setup)
    seconds, (measured,) = timed_against(benchmark, [_evaluate(setup, off, "exact")], step, setup["device"])
    flops = _evaluate_flops(setup, runs, False)
    record(benchmark, provider="exact per_layer=False", shape=setup["shape"].label, seconds=seconds,
           tokens=torch.cat(runs).numel(), peak_mem_mb=_peak(step, setup["device"]), flops=flops, shallow_ratio=0.0,
           **speedup_info(measured, _evaluate_flops(setup, runs, True) / flops))


@pytest.mark.parametrize("level", range(len(SHALLOW_TARGETS)))
def test_evaluate_compact(benchmark, setup, level):
    """Default compact mode vs default exact mode, and vs exact mode with per_layer=False."""
    thresholds, outputs, n_layers = setup["eval_thresholds"][level], [], setup["shape"].n_layers
    _evaluate_group(benchmark, setup)
    compact = _evaluate(setup, thresholds, "compact")
    baselines = [_evaluate(setup, thresholds, "exact"), _evaluate(setup, thresholds, "exact", per_layer=False)]
    seconds, (measured, measured_exit_final) = timed_against(benchmark, baselines, lambda: outputs.append(compact()),
                                                             setup["device"])
    runs, dense = _compact_layers_run(setup, thresholds), _all_full_depth(setup)
    layers_run = torch.cat(runs)  # (EVAL_BATCHES * B, T)
    info = routing_info(_exits(setup), thresholds, layers_run, n_layers)
    for key in [k for k in info if k.startswith(("shallow_ratio", "exit_ratio_L"))]:
        assert outputs[-1][key] == pytest.approx(info[key]), f"FLOPs miscounted: {key}"
    flops = _evaluate_flops(setup, runs, False)
    benchmark.extra_info.update(speedup_info(measured_exit_final, _evaluate_flops(setup, dense, False) / flops,
                                             VS_EXIT_FINAL))
    _record_routed(benchmark, setup, mode="compact", level=level, thresholds=thresholds, layers_run=layers_run,
                   seconds=seconds, measured=measured, flops=flops, base_flops=_evaluate_flops(setup, dense, True),
                   step=compact)


# ----------------------------------------------------------------------------- generation
def _full_depth_step(setup):
    s = setup["shape"]
    return lambda: generate(setup["model"], setup["prompt"], s.new_tokens, 0.0, _exits(setup))


def test_generate_full_depth(benchmark, setup):
    shape, model = setup["shape"], setup["model"]
    benchmark.group = f"routing-generate {shape.label}"
    step = _full_depth_step(setup)
    seconds = run_timed(benchmark, step, setup["device"], rounds=PAIRED_ROUNDS)
    layers_run = _full_depth(setup, (shape.gen_batch, shape.new_tokens))
    record(benchmark, provider="full-depth", shape=shape.label, seconds=seconds,
           tokens=shape.gen_batch * shape.new_tokens, peak_mem_mb=_peak(step, setup["device"]),
           flops=generation_flops(model.cfg, _exits(setup), shape.prompt_len, layers_run, False), shallow_ratio=0.0)


@pytest.mark.parametrize("level", range(len(SHALLOW_TARGETS)))
def test_generate_early_exit(benchmark, setup, level):
    shape, model, exits = setup["shape"], setup["model"], _exits(setup)
    thresholds, outputs = setup["gen_thresholds"][level], []
    benchmark.group = f"routing-generate {shape.label}"

    def step():
        outputs.append(generate(model, setup["prompt"], shape.new_tokens, thresholds, exits))

    seconds, (measured,) = timed_against(benchmark, [_full_depth_step(setup)], step, setup["device"])
    layers_run = outputs[-1][1].cpu()  # (B, S)
    flops = generation_flops(model.cfg, exits, shape.prompt_len, layers_run, True)
    base_flops = generation_flops(model.cfg, exits, shape.prompt_len, _full_depth(setup, layers_run.shape), False)
    _record_routed(benchmark, setup, mode="early-exit", level=level, thresholds=thresholds, layers_run=layers_run,
                   seconds=seconds, measured=measured, flops=flops, base_flops=base_flops, step=step)
