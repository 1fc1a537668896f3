"""The early-exit model interface: both kinds implement it from their parts, and a model that
does not is refused at every door with one TypeError naming what it lacks."""
import pytest
import torch
import torch.nn as nn

from fastexit import EarlyExitModel, EarlyExitTransformer, ModelConfig, UniversalConfig, UniversalTrainer
from fastexit.calibrate import exit_table
from fastexit.generate import generate
from fastexit.protocol import INTERFACE, is_early_exit
from fastexit.routing import compact_routed_forward, exact_routed_forward

V = 37


class NotAnEarlyExitModel(nn.Module):
    """Has some of the names, not all (a plain LM with blocks and a head)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])
        self.lm_head = nn.Linear(4, V, bias=False)

    def forward(self, idx):
        return self.lm_head(torch.zeros(*idx.shape, 4))


def native():
    return EarlyExitTransformer(ModelConfig(vocab_size=V, n_layers=3, d_model=16, n_heads=2, max_seq_len=16))


def llama():
    transformers = pytest.importorskip("transformers")
    from fastexit import from_hf
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return from_hf(transformers.LlamaForCausalLM(config))


@pytest.mark.parametrize("make", [native, llama])
def test_both_kinds_are_early_exit_models(make):
    model = make()
    assert isinstance(model, EarlyExitModel) and is_early_exit(model)
    idx = torch.randint(0, V, (2, 5))
    final, = model.exit_logits(idx, [3])
    torch.testing.assert_close(model(idx), final)
    assert [c.k.shape[2] for c in model.new_kv_caches(2, 7, [1, 3])] == [7, 7]


CALLS = {
    "compute_loss": lambda m, x: UniversalTrainer(UniversalConfig({1: 1.0}, layer_dropout=None), V).compute_loss(
        m, x, x),
    "evaluate": lambda m, x: UniversalTrainer(UniversalConfig({3: 1.0}, routing_threshold=0), V).evaluate(m, [(x, x)]),
    "exact_routed_forward": lambda m, x: exact_routed_forward(m, x, 1, 0.5),
    "compact_routed_forward": lambda m, x: compact_routed_forward(m, x, 1, 0.5),
    "generate": lambda m, x: generate(m, x, 2),
    "exit_table": lambda m, x: exit_table(m, [(x, x)], [1]),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_a_model_without_the_interface_is_one_type_error_naming_what_it_lacks(call):
    x = torch.randint(0, V, (2, 5))
    with pytest.raises(TypeError) as err:
        CALLS[call](NotAnEarlyExitModel(), x)
    message = str(err.value)
    assert "early-exit model" in message and "NotAnEarlyExitModel" in message
    missing = [name for name in INTERFACE if not hasattr(NotAnEarlyExitModel(), name)]
    assert "exit_hidden_states" in missing and all(name in message for name in missing)
    assert "blocks" not in message.split("lacks")[1]  # what it has is not listed
