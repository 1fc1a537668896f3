"""fastexit.evaluate on its own: the public function against the trainer's method, the FLOP
accounting against a count from the model's config, and the module's place in the import graph.
(The metrics themselves are tested through UniversalTrainer.evaluate in test_trainer.py and
test_multi_exit.py.)"""
import ast
from pathlib import Path

import pytest
import torch

import fastexit.evaluate as evaluation
from fastexit import UniversalConfig, UniversalTrainer
from fastexit.evaluate import _TokenFlops, confidence_head_flops, evaluate
from test_routing import VOCAB, make_model

TIMING = ("tokens_per_s", "seconds", "speedup_vs_exact")


def untimed(stats):
    return {k: v for k, v in stats.items() if k not in TIMING}


def fresh_batches(n=2, b=3, t=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batches = [tuple(torch.randint(0, VOCAB, (2, b, t), generator=gen)) for _ in range(n)]  # (x, y) (B, T)
    batches[0][1][:, ::5] = -100  # ignored targets are not scored
    return batches


def multi_exit_method(confidence="max_prob"):
    return UniversalConfig({4: 1.0}, exit_layers=[1, 2, 3], routing_thresholds=[0.5, 0.0, 0.3],
                           confidence=confidence)


@pytest.mark.parametrize("mode,kwargs", [("exact", {}), ("exact", dict(per_layer=False)), ("compact", {}),
                                         ("compact", dict(per_layer=True, compare_exact=True)),
                                         ("exact", dict(routing_threshold=0.4, exit_layers=[2]))])
def test_evaluate_is_what_the_trainer_returns(mode, kwargs):
    model, batches, method = make_model(4, block_scale=2.0), fresh_batches(), multi_exit_method()
    ours = evaluate(model, batches, mode, config=method, backend="torch", **kwargs)
    theirs = UniversalTrainer(method, VOCAB, backend="torch").evaluate(model, batches, mode, **kwargs)
    assert list(ours) == list(theirs)  # same metrics, same order
    assert untimed(ours) == untimed(theirs)  # bit for bit
    assert ours["seconds"] > 0 and ours["tokens_per_s"] > 0


def test_evaluate_without_a_method_runs_full_depth():
    model, batches = make_model(4), fresh_batches()
    stats = evaluate(model, batches, "compact")
    assert stats["shallow_ratio"] == 0 and stats["compute_cost"] == 1 and stats["flop_cost"] == 1
    assert stats["exit_ratio_L1"] == 0 and "ppl_L1" not in stats


def test_evaluate_runs_under_the_given_autocast_and_restores_training_mode():
    model, batches, method = make_model(4), fresh_batches(), multi_exit_method()
    model.train()
    ours = evaluate(model, batches, "compact", config=method, autocast=torch.autocast("cpu", torch.bfloat16))
    assert model.training
    with torch.autocast("cpu", torch.bfloat16):
        ref = evaluate(model, batches, "compact", config=method)
    fp32 = evaluate(model, batches, "compact", config=method)
    assert untimed(ours) == untimed(ref) and ours["nll"] != fp32["nll"]


@pytest.mark.parametrize("mode,kwargs,match", [("fast", {}, "mode must be one of"),
                                               ("exact", dict(compare_exact=True), "needs mode='compact'")])
def test_evaluate_names_a_wrong_argument(mode, kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate(make_model(2), fresh_batches(), mode, **kwargs)
    with pytest.raises(ValueError, match="val_batches is empty"):
        evaluate(make_model(2), [])


# ----------------------------------------------------------------------------- FLOP accounting
def hand_count(cfg, layers_run, exits_on, learned):
    """(routed, full) FLOPs of each token of a (B, T) layers_run, from the config alone."""
    d, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    routed, full = [], []
    for row in layers_run.tolist():
        routed.append([]), full.append([])
        for t, layers in enumerate(row):
            block = 2 * (4 * d * d + 2 * d * cfg.d_ff) + 4 * d * (t + 1)  # q, k, v, o, MLP; t + 1 keys
            reached = sum(e <= layers for e in exits_on if e < L)
            heads = reached * 2 * d + 2 * d * V if learned else (reached + (layers == L)) * 2 * d * V
            routed[-1].append(layers * block + heads)
            full[-1].append(L * block + 2 * d * V)
    return torch.tensor(routed, dtype=torch.float64), torch.tensor(full, dtype=torch.float64)


@pytest.mark.parametrize("confidence", ["max_prob", "margin", "learned"])
def test_token_flops_match_a_hand_count(confidence):
    model = make_model(5, d_model=48)
    layers_run = torch.tensor([[1, 5, 4, 2, 5, 1, 4], [4, 4, 1, 5, 2, 2, 1]])  # (B, T), exits 1, 2, 4
    exits_on = [1, 4]  # exit 2 is off: it costs nothing
    routed, full = _TokenFlops.of(model, confidence).routed_and_full(layers_run, exits_on, model.n_layers)
    want_routed, want_full = hand_count(model.cfg, layers_run, exits_on, confidence == "learned")
    assert routed.dtype == full.dtype == torch.float64 and routed.shape == full.shape == layers_run.shape
    assert torch.equal(routed, want_routed) and torch.equal(full, want_full)


def test_confidence_head_flops_is_two_d_per_exit_reached():
    assert confidence_head_flops(48) == 96 and confidence_head_flops(48, 3) == 288
    model = make_model(3, d_model=48)
    assert _TokenFlops.of(model, "learned").confidence_head == confidence_head_flops(48)
    assert _TokenFlops.of(model, "max_prob").confidence_head == _TokenFlops.of(model, "margin").confidence_head == 0


def test_evaluate_module_imports_neither_the_trainer_nor_inside_functions():
    tree = ast.parse(Path(evaluation.__file__).read_text())
    top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    inner = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) and node not in top]
    names = {alias.name for node in top for alias in node.names} | {getattr(node, "module", None) or "" for node in top}
    assert not inner and not any("trainer" in name for name in names)
