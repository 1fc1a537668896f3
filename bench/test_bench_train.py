"""End-to-end training step: UniversalTrainer vs a plain PyTorch trainer, same model and batch.

One step = forward, weighted loss, backward, AdamW step. fastexit: `trainer.compute_loss`
(fused weighted linear cross-entropy, no block above the deepest weighted layer). plain
PyTorch: the full logits (B, T, V) of every weighted exit, `model.lm_head(h)` on
`model.exit_hidden_states`, + F.cross_entropy, weighted sum. Both start from the same seed and
batch and step through `trainer.create_optimizer` (the same AdamW groups and settings).
"""
import contextlib
import importlib
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import (bench_device, causal_block_flops, cpu_peak_extra_mb, cuda_peak_extra_mb, dtype_name,
                            head_flops, record, run_timed)
from fastexit import EarlyExitTransformer, ModelConfig, TrainConfig, UniversalTrainer, get_preset
from fastexit.config import DEFAULT_PRESET, DEFAULT_VOCAB_SIZE, RUN_MODEL_DEFAULTS

FWD_BWD = 3  # backward = two forward-sized GEMMs per forward GEMM (input and weight gradients)


@dataclass(frozen=True)
class TrainShape:
    vocab: int
    n_layers: int
    d_model: int
    n_heads: int
    batch: int              # training batch (B, T)
    seq_len: int
    preset: str
    autocast: Optional[torch.dtype] = None  # the step's compute dtype (weights stay fp32); None: fp32

    @property
    def label(self) -> str:
        amp = "" if self.autocast is None else " " + dtype_name(self.autocast)
        return f"L{self.n_layers}-d{self.d_model}-V{self.vocab} {self.batch}x{self.seq_len} {self.preset}{amp}"

    @property
    def n_tokens(self) -> int:
        return self.batch * self.seq_len

    def model_config(self) -> ModelConfig:
        return ModelConfig(self.vocab, n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
                           max_seq_len=self.seq_len)

    def method(self):
        return get_preset(self.preset, self.n_layers)

    @property
    def flops(self) -> float:
        """Matmul FLOPs of fwd+bwd: blocks up to the deepest weighted layer, one head per weighted layer."""
        cfg, weights = self.model_config(), self.method().weights_at(0.0, self.n_layers)
        layers = [i for i, w in weights.items() if w > 0]
        forward = max(layers) * causal_block_flops(cfg, self.batch, self.seq_len)
        return FWD_BWD * (forward + len(layers) * head_flops(cfg, self.n_tokens))


TRAIN = TrainConfig()  # `fastexit train`'s defaults: batch, sequence, peak LR, weight decay
DEFAULT_SHAPE = TrainShape(DEFAULT_VOCAB_SIZE, **RUN_MODEL_DEFAULTS, batch=TRAIN.batch_size, seq_len=TRAIN.seq_len,
                           preset=DEFAULT_PRESET)
# Three weighted exits at V=32k; 8 rows keep one plain step near 1.3 s on 2 CPU cores.
CPU_SHAPES = [DEFAULT_SHAPE, TrainShape(32000, 3, 256, 4, 8, 128, "lpt")]
# A 12-layer d=2048 model in bf16 autocast, 8x1024 tokens: two weighted exits at V=32k and at
# Llama 3's 128k, and lpt's twelve at 32k.
GPU_SHAPES = [DEFAULT_SHAPE] + [TrainShape(vocab, 12, 2048, 16, 8, 1024, preset, torch.bfloat16)
                                for vocab, preset in ((32000, DEFAULT_PRESET), (128256, DEFAULT_PRESET), (32000, "lpt"))]
SHAPES = GPU_SHAPES if torch.cuda.is_available() else CPU_SHAPES


# ----------------------------------------------------------------------------- providers
def fastexit_loss(trainer, model, x, y):
    return trainer.compute_loss(model, x, y)


def plain_loss(trainer, model, x, y):
    weights = trainer.layer_weights(model.n_layers)
    layers = [i for i, w in weights.items() if w > 0]
    hiddens = model.exit_hidden_states(x, layers)  # (B, T, d) each
    return sum(weights[i] * F.cross_entropy(model.lm_head(h).flatten(0, 1), y.flatten())  # (B*T, V) logits
               for i, h in zip(layers, hiddens))


PROVIDERS = {"fastexit": fastexit_loss, "plain PyTorch": plain_loss}


# ----------------------------------------------------------------------------- steps
def make_step(provider: str, shape_index: int, device_type: str):
    """One training step of a freshly seeded model; the step returns its loss (detached)."""
    shape, device, loss_fn = SHAPES[shape_index], torch.device(device_type), PROVIDERS[provider]
    torch.manual_seed(0)
    model = EarlyExitTransformer(shape.model_config()).to(device).train()
    trainer = UniversalTrainer(shape.method(), shape.vocab, device=device)
    optimizer = trainer.create_optimizer(model, TRAIN.lr, weight_decay=TRAIN.weight_decay)
    x, y = torch.randint(0, shape.vocab, (2, shape.batch, shape.seq_len), device=device)
    return optimizer_step(loss_fn, trainer, model, optimizer, x, y, shape.autocast)


def optimizer_step(loss_fn, trainer, model, optimizer, x, y, autocast: Optional[torch.dtype] = None):
    """step(): loss_fn(trainer, model, x, y) (under autocast to that dtype, if given), backward,
    optimizer step; returns the loss (detached)."""
    def step():
        with torch.autocast(x.device.type, autocast) if autocast else contextlib.nullcontext():
            loss = loss_fn(trainer, model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # gradients count in the step's peak, not in its inputs
        return loss.detach()
    return step


def time_train_step(benchmark, module: str, shapes, provider: str, shape_index: int, group: str) -> None:
    """Time ``module.make_step(provider, shape_index, device)`` and record tokens/s, peak memory
    (on CPU measured in a child process that imports ``module``) and TFLOP/s."""
    device, shape = bench_device(), shapes[shape_index]
    benchmark.group = f"{group} {device.type} {shape.label}"
    step = importlib.import_module(module).make_step(provider, shape_index, device.type)
    initial_loss = step().item()  # the same for every provider: same model, batch and weights
    seconds = run_timed(benchmark, step, device)
    peak = (cuda_peak_extra_mb(step, device) if device.type == "cuda"
            else cpu_peak_extra_mb(module, "make_step", provider, shape_index, "cpu"))
    record(benchmark, provider=provider, shape=shape.label, seconds=seconds, tokens=shape.n_tokens,
           peak_mem_mb=peak, flops=shape.flops, initial_loss=initial_loss)


@pytest.mark.parametrize("shape_index", range(len(SHAPES)), ids=[s.label for s in SHAPES])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_train_step(benchmark, provider, shape_index):
    time_train_step(benchmark, "bench.test_bench_train", SHAPES, provider, shape_index, "train step")
