"""Routed inference: exact vs compact evaluation, full-depth vs early-exit generation.

Random-weight models with a scaled-up head (so the exit confidence spreads over (0, 1));
thresholds are quantiles of the measured exit-layer confidence, aiming at shallow ratios of
0.25 / 0.5 / 0.75. Each routed benchmark records the ideal speedup (the ratio of the two
modes' matmul FLOPs: block projections, attention scores and values, heads) and the measured
speedup from interleaved timings of both modes in the same process.
"""
import statistics
import time
from dataclasses import dataclass

import pytest
import torch

from bench.conftest import bench_device, cuda_peak_extra_mb, record, run_timed, synchronize
from fastexit.model import EarlyExitTransformer, ModelConfig
from fastexit.routing import compact_routed_forward, exact_routed_forward, generate

HEAD_SCALE = 40.0          # spreads random-init confidences over (0, 1)
SHALLOW_TARGETS = (0.25, 0.5, 0.75)
PAIRED_ROUNDS = 3          # interleaved (baseline, routed) timings per measured speedup


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
def _block_flops(cfg, n_query, n_kv, key_counts):
    """Matmul FLOPs of one block: K/V for n_kv tokens, q/out/MLP for n_query, attention over
    key_counts keys summed over the queries."""
    d, f = cfg.d_model, cfg.d_ff
    return 2 * (2 * d * d) * n_kv + 2 * (2 * d * d + 2 * d * f) * n_query + 4 * d * key_counts


def eval_flops(cfg, exit_layer, hard):
    """Matmul FLOPs of a routed forward; hard: (B, T) bool (all True = exact mode)."""
    B, T = hard.shape
    keys = torch.arange(1, T + 1).expand(B, T)  # causal keys per query
    dense = _block_flops(cfg, B * T, B * T, int(keys.sum()))
    n_hard = int(hard.sum())
    deep = _block_flops(cfg, n_hard, B * T, int(keys[hard].sum()))
    heads = 2 * cfg.d_model * cfg.vocab_size * (B * T + n_hard)
    return exit_layer * dense + (cfg.n_layers - exit_layer) * deep + heads


def generation_flops(cfg, exit_layer, prompt_len, hard, with_exit_head):
    """Matmul FLOPs of generate(): full-depth prefill, then per step s >= 1 exit_layer dense
    blocks over B rows and deeper blocks with q/out/MLP for hard rows; hard: (B, S) bool."""
    B, S = hard.shape
    L, head = cfg.n_layers, 2 * cfg.d_model * cfg.vocab_size
    flops = L * _block_flops(cfg, B * prompt_len, B * prompt_len, B * prompt_len * (prompt_len + 1) // 2)
    for s in range(S):
        n_hard, keys = int(hard[:, s].sum()), prompt_len + s  # step s attends over positions 0..T0+s-1
        if s:
            flops += exit_layer * _block_flops(cfg, B, B, B * keys)
            flops += (L - exit_layer) * _block_flops(cfg, n_hard, B, n_hard * keys)
        flops += head * (n_hard + (B if with_exit_head else 0))
    return flops


# ----------------------------------------------------------------------------- fixtures
def make_model(shape: Shape, device) -> EarlyExitTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=shape.vocab, n_layers=shape.n_layers, d_model=shape.d_model,
                      n_heads=shape.n_heads, max_seq_len=shape.seq_len, tie_embeddings=False)
    model = EarlyExitTransformer(cfg).to(device).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    return model


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
    return dict(shape=shape, model=model, idx=idx, targets=targets, prompt=prompt, device=device,
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


def timed_against(benchmark, baseline, step, device):
    """Benchmark step() with the baseline timed just before every round (pedantic's untimed
    setup), so load drift hits both alike. Returns (median seconds, median of per-round
    baseline/step time ratios)."""
    base = []
    benchmark.pedantic(lambda: (step(), synchronize(device)), setup=lambda: base.append(_seconds(baseline, device)),
                       rounds=PAIRED_ROUNDS, iterations=1, warmup_rounds=1)
    ratios = [b / r for b, r in zip(base[-PAIRED_ROUNDS:], benchmark.stats.stats.data)]
    return benchmark.stats.stats.median, statistics.median(ratios)


def _record_routed(benchmark, setup, *, provider, target, threshold, hard, seconds, measured, flops, base_flops, step):
    ideal = base_flops / flops
    record(benchmark, provider=provider, shape=setup["shape"].label, seconds=seconds, tokens=hard.numel(),
           peak_mem_mb=_peak(step, setup["device"]), flops=flops, target_shallow=target,
           routing_threshold=threshold, shallow_ratio=1 - hard.float().mean().item(), ideal_speedup=ideal,
           measured_speedup=measured, fraction_of_ideal=measured / ideal)


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

    seconds, measured = timed_against(benchmark, _exact_step(setup), step, setup["device"])
    compact, exact = outputs[-1], exact_routed_forward(model, idx, shape.exit_layer, threshold, setup["targets"])
    hard = ~compact.easy.cpu()  # (B, T)
    benchmark.extra_info.update(  # state propagation vs all layers on all tokens (random weights)
        nll_rel_diff_vs_exact=((compact.nll.mean() - exact.nll.mean()) / exact.nll.mean()).item(),
        pred_agreement_vs_exact=(compact.pred == exact.pred).float().mean().item())
    _record_routed(benchmark, setup, provider=f"compact s~{SHALLOW_TARGETS[level]}", target=SHALLOW_TARGETS[level],
                   threshold=threshold, hard=hard, seconds=seconds, measured=measured,
                   flops=eval_flops(model.cfg, shape.exit_layer, hard),
                   base_flops=eval_flops(model.cfg, shape.exit_layer, torch.ones_like(hard)), step=step)


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

    seconds, measured = timed_against(benchmark, _full_depth_step(setup), step, setup["device"])
    hard = (outputs[-1][1] == shape.n_layers).cpu()  # (B, S)
    flops = generation_flops(model.cfg, shape.exit_layer, shape.prompt_len, hard, True)
    base_flops = generation_flops(model.cfg, shape.exit_layer, shape.prompt_len, torch.ones_like(hard), False)
    _record_routed(benchmark, setup, provider=f"early-exit s~{SHALLOW_TARGETS[level]}", target=SHALLOW_TARGETS[level],
                   threshold=threshold, hard=hard, seconds=seconds, measured=measured,
                   flops=flops, base_flops=base_flops, step=step)
