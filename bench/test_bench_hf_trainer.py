"""A transformers ``Trainer`` step with and without fastexit, on the same model, data and optimizer.

One step is the Trainer's own ``training_step`` (its compute_loss -> the model's forward ->
backward through accelerate) followed by the optimizer step, on a freshly seeded random Llama.
Providers:
- "transformers": the user's script as it is, transformers' final-layer loss (another, cheaper
  objective: the baseline a user starts from);
- "transformers multi-exit": the same Trainer computing the early-exit objective the obvious way
  (a compute_loss override: output_hidden_states, final norm + head per weighted exit,
  ``F.cross_entropy``);
- "fastexit": ``fastexit.hf.apply_early_exit(model, method)``, the same objective through the
  fused loss inside the model's forward (the script otherwise unchanged).
Shapes: SmolLM2-135M's (30 layers, d=576, V=49152, tied head) with exits at 8, 15, 22 and the
final layer, and a 3-layer d=256 V=32000 model with three exits, where the heads dominate.
"""
from dataclasses import dataclass
from typing import Dict, Optional

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import dtype_name
from bench.test_bench_train import time_train_step
from fastexit import UniversalConfig
from fastexit.hf import apply_early_exit

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' Trainer needs it


@dataclass(frozen=True)
class TrainerShape:
    name: str
    vocab: int
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    tied: bool
    layer_weights: tuple  # ((layer, weight), ...)
    batch: int
    seq_len: int
    autocast: Optional[torch.dtype] = None

    @property
    def label(self) -> str:
        amp = "" if self.autocast is None else " " + dtype_name(self.autocast)
        exits = ",".join(str(i) for i, _ in self.layer_weights)
        return (f"{self.name} L{self.n_layers}-d{self.d_model}-V{self.vocab} {self.batch}x{self.seq_len} "
                f"exits {exits}{amp}")

    @property
    def n_tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def flops(self) -> Optional[float]:
        return None  # the three providers compute different things: compare tokens/s and memory

    def method(self) -> UniversalConfig:
        return UniversalConfig(dict(self.layer_weights), routing_threshold=0.0)

    def hf_config(self):
        return transformers.LlamaConfig(vocab_size=self.vocab, hidden_size=self.d_model,
                                        num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
                                        num_key_value_heads=self.n_kv_heads, intermediate_size=self.d_ff,
                                        max_position_embeddings=self.seq_len, tie_word_embeddings=self.tied)


SMOLLM2_EXITS = ((8, 0.1), (15, 0.15), (22, 0.25), (30, 0.5))
CPU_SHAPES = [TrainerShape("smollm2-135m", 49152, 30, 576, 9, 3, 1536, True, SMOLLM2_EXITS, 4, 256),
              TrainerShape("small", 32000, 3, 256, 4, 2, 704, False, ((1, 1 / 3), (2, 1 / 3), (3, 1 / 3)), 8, 128)]
GPU_SHAPES = [TrainerShape("llama-3.2-1b", 128256, 16, 2048, 32, 8, 8192, True, ((4, 0.2), (8, 0.3), (16, 0.5)), 4,
                           2048, torch.bfloat16)]
SHAPES = GPU_SHAPES if torch.cuda.is_available() else CPU_SHAPES


class MultiExitTrainer(transformers.Trainer):
    """The early-exit objective written the obvious way: every weighted exit's logits."""

    def __init__(self, *args, layer_weights: Dict[int, float], **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_weights = layer_weights

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        out = model(input_ids=inputs["input_ids"], output_hidden_states=True)
        norm, head, L = model.model.norm, model.lm_head, model.config.num_hidden_layers
        targets = F.pad(labels, (0, 1), value=-100)[:, 1:].flatten()
        loss = 0.0
        for i, w in self.layer_weights.items():
            logits = out.logits if i == L else head(norm(out.hidden_states[i]))
            loss = loss + w * F.cross_entropy(logits.flatten(0, 1).float(), targets, reduction="sum")
        loss = loss / num_items_in_batch
        return (loss, out) if return_outputs else loss


def make_step(provider: str, shape_index: int, device_type: str):
    """One Trainer step (training_step, then the optimizer step) of a freshly seeded model."""
    shape = SHAPES[shape_index]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(shape.hf_config()).train()
    if provider == "fastexit":
        apply_early_exit(model, shape.method())
    args = transformers.TrainingArguments(
        output_dir="/tmp/fastexit-bench-trainer", per_device_train_batch_size=shape.batch, learning_rate=1e-4,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=device_type == "cpu",
        bf16=shape.autocast == torch.bfloat16)
    cls = MultiExitTrainer if provider == "transformers multi-exit" else transformers.Trainer
    extra = dict(layer_weights=dict(shape.layer_weights)) if cls is MultiExitTrainer else {}
    trainer = cls(model=model, args=args, **extra)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    model = trainer.model.to(trainer.args.device)
    x = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len), device=trainer.args.device)
    batch = dict(input_ids=x, labels=x)
    n_items = (x[:, 1:] != -100).sum()

    def step():
        loss = trainer.training_step(model, dict(batch), n_items)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


PROVIDERS = ["transformers", "transformers multi-exit", "fastexit"]


@pytest.mark.parametrize("shape_index", range(len(SHAPES)), ids=[s.label for s in SHAPES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_hf_trainer_step(benchmark, provider, shape_index):
    time_train_step(benchmark, "bench.test_bench_hf_trainer", SHAPES, provider, shape_index, "hf Trainer step")

