"""Training step of a transformers model: fastexit's loss via from_hf vs the transformers baseline.

One step = forward, weighted loss over 3 exits, backward, AdamW step, on a small random
Llama (V = 32000). fastexit: `trainer.compute_loss(from_hf(model), x, y)` (the layers up to the
deepest weighted exit, then the fused weighted linear cross-entropy). transformers: the
obvious user code, `model(x, output_hidden_states=True)`, then final norm + head on every
intermediate exit (the final layer's logits come with the output) and `F.cross_entropy`.
Both use the same model, batch and AdamW groups (`trainer.create_optimizer`).
"""
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import dtype_name
from bench.test_bench_train import FWD_BWD, optimizer_step, time_train_step
from fastexit import TrainConfig, UniversalTrainer, from_hf, get_preset

transformers = pytest.importorskip("transformers")


@dataclass(frozen=True)
class HFShape:
    vocab: int
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    batch: int
    seq_len: int
    preset: str
    autocast: Optional[torch.dtype] = None  # the step's compute dtype (weights stay fp32); None: fp32

    @property
    def label(self) -> str:
        amp = "" if self.autocast is None else " " + dtype_name(self.autocast)
        return f"llama L{self.n_layers}-d{self.d_model}-V{self.vocab} {self.batch}x{self.seq_len} {self.preset}{amp}"

    @property
    def n_tokens(self) -> int:
        return self.batch * self.seq_len

    def hf_config(self):
        return transformers.LlamaConfig(vocab_size=self.vocab, hidden_size=self.d_model,
                                        num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
                                        num_key_value_heads=self.n_kv_heads, intermediate_size=self.d_ff,
                                        max_position_embeddings=self.seq_len, tie_word_embeddings=False)

    def method(self):
        return get_preset(self.preset, self.n_layers)

    @property
    def flops(self) -> float:
        """Matmul FLOPs of fwd+bwd: the layers up to the deepest weighted exit (q, grouped k/v,
        o, the gated MLP's three matrices, causal attention), one head per weighted exit."""
        d, kv, f, n = self.d_model, self.d_model * self.n_kv_heads // self.n_heads, self.d_ff, self.n_tokens
        keys = self.batch * self.seq_len * (self.seq_len + 1) // 2  # causal keys summed over queries
        layer = 2 * n * (2 * d * d + 2 * d * kv + 3 * d * f) + 4 * d * keys
        weights = self.method().weights_at(0.0, self.n_layers)
        layers = [i for i, w in weights.items() if w > 0]
        return FWD_BWD * (max(layers) * layer + len(layers) * 2 * d * self.vocab * n)


# "lpt": three weighted exits (1/3 each); 8 x 128 tokens keep the baseline step near a second on 2 cores.
CPU_SHAPES = [HFShape(32000, 3, 256, 4, 2, 704, 8, 128, "lpt")]
# Llama-3.2-1B's shape (untied head), bf16 autocast, two weighted exits (layers 1 and 16).
GPU_SHAPES = [HFShape(128256, 16, 2048, 32, 8, 8192, 4, 2048, "asymmetric_best", torch.bfloat16)]
SHAPES = GPU_SHAPES if torch.cuda.is_available() else CPU_SHAPES


def fastexit_loss(trainer, model, x, y):
    return trainer.compute_loss(model, x, y)


def transformers_loss(trainer, model, x, y):
    weights, hf = trainer.layer_weights(model.n_layers), model.hf
    out = hf(x, output_hidden_states=True)
    norm, head, L = hf.model.norm, hf.lm_head, model.n_layers
    logits = {i: out.logits if i == L else head(norm(out.hidden_states[i])) for i, w in weights.items() if w > 0}
    return sum(weights[i] * F.cross_entropy(z.flatten(0, 1), y.flatten()) for i, z in logits.items())


PROVIDERS = {"fastexit": fastexit_loss, "transformers": transformers_loss}


def make_step(provider: str, shape_index: int, device_type: str):
    """One training step of a freshly seeded model; the step returns its loss (detached)."""
    shape, device, loss_fn = SHAPES[shape_index], torch.device(device_type), PROVIDERS[provider]
    torch.manual_seed(0)
    model = from_hf(transformers.LlamaForCausalLM(shape.hf_config())).to(device).train()
    trainer = UniversalTrainer(shape.method(), shape.vocab, device=device)
    optimizer = trainer.create_optimizer(model, TrainConfig.lr, weight_decay=TrainConfig.weight_decay)
    x, y = torch.randint(0, shape.vocab, (2, shape.batch, shape.seq_len), device=device)
    return optimizer_step(loss_fn, trainer, model, optimizer, x, y, shape.autocast)


@pytest.mark.parametrize("shape_index", range(len(SHAPES)), ids=[s.label for s in SHAPES])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_hf_train_step(benchmark, provider, shape_index):
    time_train_step(benchmark, "bench.test_bench_hf", SHAPES, provider, shape_index, "hf train step")
