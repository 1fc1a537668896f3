"""Layer dropout that skips: a training step at drop rate p against the same step without
dropout, on the 12-layer CPU shape of the routing benchmarks.

One step = trainer.compute_loss(drops=...) (each block runs on the sequences that keep it),
backward, AdamW step. The drops are one fixed draw (LayerDropout.draw at step 0), so every
timed round does the same work, and the FLOP ideal is that draw's exactly: fwd+bwd matmul FLOPs
of every block over the rows that run it, plus the weighted heads over all tokens. The two
steps are timed interleaved (bench/test_bench_routing.timed_against); goal: the measured saving
(1 - time ratio) is >= 80% of the ideal saving at mean rate 0.2.
"""
import pytest
import torch

from bench.conftest import bench_device, causal_block_flops, head_flops, record
from bench.test_bench_routing import speedup_info, timed_against
from bench.test_bench_train import FWD_BWD, TRAIN
from fastexit import EarlyExitTransformer, ModelConfig, UniversalTrainer, get_preset
from fastexit.config import LayerDropout

N_LAYERS, D_MODEL, N_HEADS, EXIT_LAYER, VOCAB, BATCH, SEQ_LEN = 12, 512, 8, 4, 8192, 8, 64
PRESET = "asymmetric_best"
SETTINGS = [LayerDropout(0.2, "constant"), LayerDropout(0.4, "linear")]  # both: mean rate 0.2 over depth
ROUNDS = 9  # interleaved pairs: a ~15% saving needs more than routing's 3 to stand out of a shared box's noise


def model_config() -> ModelConfig:
    return ModelConfig(VOCAB, n_layers=N_LAYERS, d_model=D_MODEL, n_heads=N_HEADS, max_seq_len=SEQ_LEN)


def step_flops(drops) -> int:
    """fwd+bwd matmul FLOPs of one step; drops=None runs every block on every sequence."""
    cfg = model_config()
    per_sequence = causal_block_flops(cfg, 1, SEQ_LEN)
    kept = [BATCH - (sum(row) if drops else 0) for row in (drops or [None] * N_LAYERS)]
    n_heads = sum(w > 0 for w in get_preset(PRESET, N_LAYERS, EXIT_LAYER).layer_weights.values())
    return FWD_BWD * (sum(kept) * per_sequence + n_heads * head_flops(cfg, BATCH * SEQ_LEN))


def make_step(device, drops, with_optimizer: bool = True):
    torch.manual_seed(0)
    model = EarlyExitTransformer(model_config()).to(device).train()
    trainer = UniversalTrainer(get_preset(PRESET, N_LAYERS, EXIT_LAYER), VOCAB, device=device)
    optimizer = trainer.create_optimizer(model, TRAIN.lr, weight_decay=TRAIN.weight_decay)
    x, y = torch.randint(0, VOCAB, (2, BATCH, SEQ_LEN), device=device)

    def step():
        trainer.compute_loss(model, x, y, drops=drops).backward()
        if with_optimizer:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


@pytest.mark.parametrize("with_optimizer", [True, False], ids=["step", "fwd+bwd"])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s.shape}-{s.max_rate}")
def test_layer_dropout_step(benchmark, setting, with_optimizer):
    """with_optimizer=False times forward + backward only: the AdamW update over every
    parameter is a fixed cost that no FLOP count of the step includes."""
    device = bench_device()
    part = "step" if with_optimizer else "fwd+bwd"
    benchmark.group = f"train {part} with layer dropout {device.type} L{N_LAYERS}-d{D_MODEL}-V{VOCAB} {BATCH}x{SEQ_LEN}"
    drops = setting.draw(N_LAYERS, BATCH, seed=0, step=0)
    seconds, (measured,) = timed_against(benchmark, [make_step(device, None, with_optimizer)],
                                         make_step(device, drops, with_optimizer), device, rounds=ROUNDS)
    full, dropped = step_flops(None), step_flops(drops)
    ideal = full / dropped
    record(benchmark, provider=f"{setting.shape} max {setting.max_rate}", shape=f"L{N_LAYERS}-d{D_MODEL}",
           seconds=seconds, tokens=BATCH * SEQ_LEN, peak_mem_mb=None, flops=dropped,
           drop_share=sum(map(sum, drops)) / (N_LAYERS * BATCH), **speedup_info(measured, ideal),
           measured_saving=1 - 1 / measured.paired, ideal_saving=1 - 1 / ideal,
           fraction_of_ideal_saving=(1 - 1 / measured.paired) / (1 - 1 / ideal))
