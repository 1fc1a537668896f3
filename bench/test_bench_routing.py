"""Routed inference: exact vs compact evaluation (routed forwards, and whole
`UniversalTrainer.evaluate()` calls with default arguments), full-depth vs early-exit generation.

Random-weight models with a scaled-up head (so the exit confidence spreads over (0, 1));
thresholds are quantiles of the measured exit-layer confidence, aiming at shallow ratios of
0.25 / 0.5 / 0.75. Each routed benchmark records the ideal speedup (the ratio of the two
modes' matmul FLOPs: block projections, attention scores and values, heads) and the measured
speedup from interleaved timings of both modes in the same process (the median of per-round
ratios, and the ratio of the fastest rounds, which other jobs on a shared box disturb least).
"""
import statistics
import time
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch

from bench.conftest import (bench_device, block_flops, causal_block_flops, cuda_peak_extra_mb, head_flops, record,
                            run_timed, synchronize)
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
    exit_layer: int
    vocab: int = 8192
    batch: int = 4          # evaluation batch (B, T)
    seq_len: int = 256
    gen_batch: int = 64     # generation rows (CPU GEMMs of a few rows run far below peak), prompt, new tokens
    prompt_len: int = 8
    new_tokens: int = 48

    @property
    def label(self) -> str:
        return f"L{self.n_layers}-d{self.d_model}-exit{self.exit_layer}-V{self.vocab}"


SHAPES = [Shape(12, 512, 8, 4), Shape(3, 256, 4, 1)]


# ----------------------------------------------------------------------------- FLOP model
def eval_flops(cfg, exit_layer, hard):
    """Matmul FLOPs of a routed forward; hard: (B, T) bool (all True = exact mode)."""
    B, T = hard.shape
    keys = torch.arange(1, T + 1).expand(B, T)  # causal keys per query
    n_hard = int(hard.sum())
    deep = block_flops(cfg, n_hard, B * T, int(keys[hard].sum()))
    blocks = exit_layer * causal_block_flops(cfg, B, T) + (cfg.n_layers - exit_layer) * deep
    return blocks + head_flops(cfg, B * T + n_hard)


def generation_flops(cfg, exit_layer, prompt_len, hard, with_exit_head):
    """Matmul FLOPs of generate(): full-depth prefill, then per step s >= 1 exit_layer dense
    blocks over B rows and deeper blocks with q/out/MLP for hard rows; hard: (B, S) bool."""
    (B, S), L = hard.shape, cfg.n_layers
    flops = L * causal_block_flops(cfg, B, prompt_len)
    for s in range(S):
        n_hard, keys = int(hard[:, s].sum()), prompt_len + s  # step s attends over positions 0..T0+s-1
        if s:
            flops += exit_layer * block_flops(cfg, B, B, B * keys)
            flops += (L - exit_layer) * block_flops(cfg, n_hard, B, n_hard * keys)
        flops += head_flops(cfg, n_hard + (B if with_exit_head else 0))
    return flops


def evaluate_flops(cfg, exit_layer, hards, per_layer):
    """Matmul FLOPs of one trainer.evaluate() over batches with these (B, T) hard masks (all
    True in exact mode): each batch's routed forward (eval_flops), plus, with per_layer, the
    head at the n_layers - 2 other layers, which exact mode scores in that same forward."""
    other_heads = cfg.n_layers - 2 if per_layer else 0
    return sum(eval_flops(cfg, exit_layer, hard) + other_heads * head_flops(cfg, hard.numel()) for hard in hards)


# ----------------------------------------------------------------------------- fixtures
def make_model(shape: Shape, device) -> EarlyExitTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=shape.vocab, n_layers=shape.n_layers, d_model=shape.d_model,
                      n_heads=shape.n_heads, max_seq_len=shape.seq_len, tie_embeddings=False)
    model = EarlyExitTransformer(cfg).to(device).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    return model


def random_batch(shape: Shape, device):
    """(x, y), each (B, T) int64."""
    return tuple(torch.randint(0, shape.vocab, (2, shape.batch, shape.seq_len), device=device))


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: s.label)
def setup(request):
    shape, device = request.param, bench_device()
    model = make_model(shape, device)
    idx = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len), device=device)
    targets = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len), device=device)
    prompt = torch.randint(0, shape.vocab, (shape.gen_batch, shape.prompt_len), device=device)
    eval_conf = exact_routed_forward(model, idx, shape.exit_layer, 0.0).conf.flatten().float()
    gen_conf = generate(model, prompt, shape.new_tokens, 0.0, shape.exit_layer, return_conf=True)[2].flatten()
    quantiles = torch.tensor([1 - s for s in SHALLOW_TARGETS], device=device)
    batches = [(idx, targets)] + [random_batch(shape, device) for _ in range(EVAL_BATCHES - 1)]
    return dict(shape=shape, model=model, idx=idx, targets=targets, batches=batches, prompt=prompt, device=device,
                eval_thresholds=eval_conf.quantile(quantiles).tolist(),
                gen_thresholds=gen_conf.quantile(quantiles).tolist())


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


def _record_routed(benchmark, setup, *, provider, target, threshold, hard, seconds, measured, flops, base_flops, step):
    record(benchmark, provider=provider, shape=setup["shape"].label, seconds=seconds, tokens=hard.numel(),
           peak_mem_mb=_peak(step, setup["device"]), flops=flops, target_shallow=target,
           routing_threshold=threshold, shallow_ratio=1 - hard.float().mean().item(),
           **speedup_info(measured, base_flops / flops))


# ----------------------------------------------------------------------------- evaluation
def _exact_step(setup):
    s = setup["shape"]
    return lambda: exact_routed_forward(setup["model"], setup["idx"], s.exit_layer, 0.0, setup["targets"])


def test_eval_exact(benchmark, setup):
    shape, model = setup["shape"], setup["model"]
    benchmark.group = f"routing-eval {shape.label}"
    step = _exact_step(setup)
    seconds = run_timed(benchmark, step, setup["device"], rounds=PAIRED_ROUNDS)
    flops = eval_flops(model.cfg, shape.exit_layer, torch.ones_like(setup["idx"], dtype=torch.bool).cpu())
    record(benchmark, provider="exact", shape=shape.label, seconds=seconds, tokens=setup["idx"].numel(),
           peak_mem_mb=_peak(step, setup["device"]), flops=flops, shallow_ratio=0.0)


@pytest.mark.parametrize("level", range(len(SHALLOW_TARGETS)))
def test_eval_compact(benchmark, setup, level):
    shape, model, idx = setup["shape"], setup["model"], setup["idx"]
    threshold, outputs = setup["eval_thresholds"][level], []
    benchmark.group = f"routing-eval {shape.label}"

    def step():
        outputs.append(compact_routed_forward(model, idx, shape.exit_layer, threshold, setup["targets"]))

    seconds, (measured,) = timed_against(benchmark, [_exact_step(setup)], step, setup["device"])
    compact, exact = outputs[-1], exact_routed_forward(model, idx, shape.exit_layer, threshold, setup["targets"])
    hard = ~compact.easy.cpu()  # (B, T)
    benchmark.extra_info.update(  # state propagation vs all layers on all tokens (random weights)
        nll_rel_diff_vs_exact=((compact.nll.mean() - exact.nll.mean()) / exact.nll.mean()).item(),
        pred_agreement_vs_exact=(compact.pred == exact.pred).float().mean().item())
    _record_routed(benchmark, setup, provider=f"compact s~{SHALLOW_TARGETS[level]}", target=SHALLOW_TARGETS[level],
                   threshold=threshold, hard=hard, seconds=seconds, measured=measured,
                   flops=eval_flops(model.cfg, shape.exit_layer, hard),
                   base_flops=eval_flops(model.cfg, shape.exit_layer, torch.ones_like(hard)), step=step)


# ----------------------------------------------------------------------------- evaluate()
def _evaluate(setup, threshold, mode, **kwargs):
    """trainer.evaluate(model, batches, mode) of a trainer routing at the shape's exit layer
    with this threshold; kwargs only where a benchmark departs from the defaults."""
    shape = setup["shape"]
    config = UniversalConfig({shape.n_layers: 1.0}, exit_layer=shape.exit_layer, routing_threshold=threshold)
    trainer = UniversalTrainer(config, shape.vocab, device=setup["device"])
    return lambda: trainer.evaluate(setup["model"], setup["batches"], mode, **kwargs)


def _all_hard(setup):
    return [torch.ones(x.shape, dtype=torch.bool) for x, _ in setup["batches"]]  # (B, T) each


def _compact_hard(setup, threshold):
    """(B, T) hard mask of each batch under compact_routed_forward (what the FLOP count needs)."""
    s = setup["shape"]
    return [~compact_routed_forward(setup["model"], x, s.exit_layer, threshold).easy.cpu() for x, _ in setup["batches"]]


def _evaluate_flops(setup, hards, per_layer):
    return evaluate_flops(setup["model"].cfg, setup["shape"].exit_layer, hards, per_layer)


def _evaluate_group(benchmark, setup):
    benchmark.group = f"evaluate compact vs exact {setup['shape'].label}"


def test_evaluate_exact(benchmark, setup):
    """Default exact mode (per_layer on: one forward, the head at every layer): the baseline."""
    _evaluate_group(benchmark, setup)
    step, hards = _evaluate(setup, ROUTING_OFF, "exact"), _all_hard(setup)
    seconds = run_timed(benchmark, step, setup["device"], rounds=PAIRED_ROUNDS)
    record(benchmark, provider="exact", shape=setup["shape"].label, seconds=seconds, tokens=torch.cat(hards).numel(),
           peak_mem_mb=_peak(step, setup["device"]), flops=_evaluate_flops(setup, hards, True), shallow_ratio=0.0)


def test_evaluate_exact_exit_final(benchmark, setup):
    """Exact mode with per_layer=False (heads at the exit and final layers only) vs the default."""
    _evaluate_group(benchmark, setup)
    step, hards = _evaluate(setup, ROUTING_OFF, "exact", per_layer=False), _all_hard(setup)
    seconds, (measured,) = timed_against(benchmark, [_evaluate(setup, ROUTING_OFF, "exact")], step, setup["device"])
    flops = _evaluate_flops(setup, hards, False)
    record(benchmark, provider="exact per_layer=False", shape=setup["shape"].label, seconds=seconds,
           tokens=torch.cat(hards).numel(), peak_mem_mb=_peak(step, setup["device"]), flops=flops, shallow_ratio=0.0,
           **speedup_info(measured, _evaluate_flops(setup, hards, True) / flops))


@pytest.mark.parametrize("level", range(len(SHALLOW_TARGETS)))
def test_evaluate_compact(benchmark, setup, level):
    """Default compact mode vs default exact mode, and vs exact mode with per_layer=False."""
    threshold, outputs = setup["eval_thresholds"][level], []
    _evaluate_group(benchmark, setup)
    compact = _evaluate(setup, threshold, "compact")
    baselines = [_evaluate(setup, threshold, "exact"), _evaluate(setup, threshold, "exact", per_layer=False)]
    seconds, (measured, measured_exit_final) = timed_against(benchmark, baselines, lambda: outputs.append(compact()),
                                                             setup["device"])
    hards, dense = _compact_hard(setup, threshold), _all_hard(setup)
    hard = torch.cat(hards)  # (EVAL_BATCHES * B, T)
    assert outputs[-1]["shallow_ratio"] == pytest.approx(1 - hard.float().mean().item()), "FLOPs miscounted"
    flops = _evaluate_flops(setup, hards, False)
    benchmark.extra_info.update(speedup_info(measured_exit_final, _evaluate_flops(setup, dense, False) / flops,
                                             VS_EXIT_FINAL))
    _record_routed(benchmark, setup, provider=f"compact s~{SHALLOW_TARGETS[level]}", target=SHALLOW_TARGETS[level],
                   threshold=threshold, hard=hard, seconds=seconds, measured=measured, flops=flops,
                   base_flops=_evaluate_flops(setup, dense, True), step=compact)


# ----------------------------------------------------------------------------- generation
def _full_depth_step(setup):
    s = setup["shape"]
    return lambda: generate(setup["model"], setup["prompt"], s.new_tokens, 0.0, s.exit_layer)


def test_generate_full_depth(benchmark, setup):
    shape, model = setup["shape"], setup["model"]
    benchmark.group = f"routing-generate {shape.label}"
    step = _full_depth_step(setup)
    seconds = run_timed(benchmark, step, setup["device"], rounds=PAIRED_ROUNDS)
    hard = torch.ones(shape.gen_batch, shape.new_tokens, dtype=torch.bool)
    record(benchmark, provider="full-depth", shape=shape.label, seconds=seconds,
           tokens=shape.gen_batch * shape.new_tokens, peak_mem_mb=_peak(step, setup["device"]),
           flops=generation_flops(model.cfg, shape.exit_layer, shape.prompt_len, hard, False), shallow_ratio=0.0)


@pytest.mark.parametrize("level", range(len(SHALLOW_TARGETS)))
def test_generate_early_exit(benchmark, setup, level):
    shape, model = setup["shape"], setup["model"]
    threshold, outputs = setup["gen_thresholds"][level], []
    benchmark.group = f"routing-generate {shape.label}"

    def step():
        outputs.append(generate(model, setup["prompt"], shape.new_tokens, threshold, shape.exit_layer))

    seconds, (measured,) = timed_against(benchmark, [_full_depth_step(setup)], step, setup["device"])
    hard = (outputs[-1][1] == shape.n_layers).cpu()  # (B, S)
    flops = generation_flops(model.cfg, shape.exit_layer, shape.prompt_len, hard, True)
    base_flops = generation_flops(model.cfg, shape.exit_layer, shape.prompt_len, torch.ones_like(hard), False)
    _record_routed(benchmark, setup, provider=f"early-exit s~{SHALLOW_TARGETS[level]}", target=SHALLOW_TARGETS[level],
                   threshold=threshold, hard=hard, seconds=seconds, measured=measured,
                   flops=flops, base_flops=base_flops, step=step)
