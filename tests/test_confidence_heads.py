"""Learned confidence heads (confidence="learned", docs/design.md §3): their loss and gradients,
routing with them in exact, compact and generation, calibration tables, checkpoints and bad
input, against plain references (full fp64 logits for the labels, sigmoid(head(norm(h))) for
the confidence)."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastexit import PRESETS, UniversalConfig, UniversalTrainer
from fastexit import checkpoint as ckpt
from fastexit.calibrate import exit_table
from fastexit.config import LayerDropout, RunConfig
from fastexit.evaluate import confidence_head_flops
from fastexit.generate import generate
from fastexit.model import ConfidenceHeads
from fastexit.routing import compact_routed_forward, exact_routed_forward
from fastexit.runs import Run
from test_multi_exit import cascade_reference, first_exit, gap_threshold, per_token
from test_routing import VOCAB, batch, make_model
from test_runs import config as run_config

TINY = 1e-9  # a threshold every confidence reaches


def learned(n_layers, exits, weights=None, **kwargs):
    return UniversalConfig(weights or {n_layers: 1.0}, exit_layers=exits, routing_thresholds=[0.0] * len(exits),
                           confidence="learned", **kwargs)


def with_heads(model, exits, scale=1.0):
    """The model with random (not zero) confidence heads at ``exits``, confidences spread over (0, 1)."""
    model.add_confidence_heads(exits)
    with torch.no_grad():
        for head in model.confidence_heads.values():
            head.weight.normal_(0, scale)
            head.bias.normal_(0, 0.5)
    return model


def fp64_confidence(model, layer, h):
    """sigmoid(head(h)) in fp64 of exit-normed states h (..., d)."""
    head = model.confidence_heads[str(layer)]
    return torch.sigmoid(h.detach().double() @ head.weight.detach().double()[0] + head.bias.detach().double()[0])


# ----------------------------------------------------------------------------- loss
def reference_confidence_loss(model, x, y, config, ignore_index=-100):
    """The heads' loss from full fp64 logits: labels from argmaxes of h @ W.T, BCE in fp64 of
    the heads on the (detached unless confidence_backbone_grad) exit-normed states."""
    L, exits = model.n_layers, config.exits
    states = dict(zip([*exits, L], model.exit_hidden_states(x, [*exits, L])))
    W, y = model.lm_head.weight.detach().double(), y.reshape(-1)
    pred = {i: (h.detach().double().reshape(-1, h.shape[-1]) @ W.T).argmax(-1) for i, h in states.items()}
    target = y if config.confidence_label == "correct" else pred[L]
    valid = y != ignore_index
    terms = []
    for e in exits:
        h = states[e].reshape(-1, states[e].shape[-1])
        h = h if config.confidence_backbone_grad else h.detach()
        head = model.confidence_heads[str(e)]
        logit = h.double() @ head.weight.double()[0] + head.bias.double()[0]
        bce = F.binary_cross_entropy_with_logits(logit, (pred[e] == target).double(), reduction="none")
        terms.append(bce[valid].sum())
    return config.confidence_loss_weight * torch.stack(terms).mean() / valid.sum()


def grads(model):
    return {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in model.named_parameters()}


@pytest.mark.parametrize("label", ["consistency", "correct"])
@pytest.mark.parametrize("backbone_grad", [False, True])
@pytest.mark.parametrize("weights", [{1: 0.5, 4: 0.5}, {1: 1.0}])  # the final layer weighted or not
def test_confidence_loss_value_and_gradients_match_the_fp64_reference(label, backbone_grad, weights):
    model = with_heads(make_model(4, block_scale=2.0), [1, 2], scale=0.3).train()
    x, y = batch(3, 24)
    y[0, ::5] = -100  # ignored targets are not scored
    method = dict(exit_layers=[1, 2], routing_thresholds=[0.9, 0.9])
    config = UniversalConfig(weights, confidence="learned", confidence_loss_weight=0.7, confidence_label=label,
                             confidence_backbone_grad=backbone_grad, **method)
    plain = UniversalTrainer(UniversalConfig(weights, **method), VOCAB, backend="torch")
    ours = UniversalTrainer(config, VOCAB, backend="torch")

    plain_loss = plain.compute_loss(model, x, y)
    plain_loss.backward()
    without = grads(model)
    model.zero_grad()
    loss = ours.compute_loss(model, x, y)
    loss.backward()
    diff = {n: g - without[n] for n, g in grads(model).items()}  # the heads' loss's gradient
    model.zero_grad()
    ref = reference_confidence_loss(model, x, y, config)
    ref.backward()
    expected = grads(model)

    torch.testing.assert_close((loss - plain_loss).double(), ref.detach(), atol=1e-5, rtol=1e-5)
    heads = [n for n in diff if n.startswith("confidence_heads.")]
    assert heads and all(expected[n].abs().sum() > 0 for n in heads)
    for name, g in diff.items():
        if backbone_grad or name in heads:
            torch.testing.assert_close(g.double(), expected[name].double(), atol=1e-5, rtol=1e-4, msg=name)
        else:  # the heads see detached states: their loss leaves the backbone's gradients bit for bit
            assert torch.equal(g, torch.zeros_like(g)), name
    if backbone_grad:
        assert diff["exit_norms.0.weight"].abs().sum() > 0 and diff["blocks.0.mlp.fc_in.weight"].abs().sum() > 0


def test_confidence_loss_of_an_all_ignored_batch_is_zero_with_zero_gradients():
    model = with_heads(make_model(3), [1])
    x, y = batch(2, 8)
    y[:] = -100
    trainer = UniversalTrainer(learned(3, [1], confidence_loss_weight=1.0), VOCAB, backend="torch")
    states = dict(zip([1, 3], (h.reshape(-1, h.shape[-1]) for h in model.exit_hidden_states(x, [1, 3]))))
    loss = trainer.confidence_loss(model, states, y)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(loss)
    assert all(p.grad.abs().sum() == 0 for p in model.confidence_heads.parameters())


def test_head_learns_a_separable_target():
    """A head trained alone on synthetic states whose label is linear: exit 1 predicts class 0
    exactly where h.u > 0 (lm_head rows u and -u), and the 'correct' label with targets 0 is
    that half-space."""
    d, n = 16, 4000
    u = torch.randn(d)
    model = SimpleNamespace(lm_head=SimpleNamespace(weight=torch.stack([u, -u])), n_layers=2,
                            confidence_heads=ConfidenceHeads())
    model.confidence_heads.add([1], model.lm_head.weight)
    trainer = UniversalTrainer(learned(2, [1], confidence_loss_weight=1.0, confidence_label="correct"), 2,
                               backend="torch")
    h, y = torch.randn(n, d), torch.zeros(n, dtype=torch.long)
    opt = torch.optim.Adam(model.confidence_heads.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        trainer.confidence_loss(model, {1: h}, y).backward()
        opt.step()
    h_test = torch.randn(n, d)
    with torch.no_grad():
        predicted = model.confidence_heads.logit(1, h_test) > 0
    assert (predicted == (h_test @ u > 0)).float().mean() > 0.98


@pytest.mark.parametrize("extra", [dict(distill_weight=0.5), dict(layer_dropout=LayerDropout(0.5)),
                                   dict(distill_weight=0.5, layer_dropout=LayerDropout(0.5, "linear"))])
def test_learned_heads_train_with_distillation_and_layer_dropout(extra):
    model = make_model(4).train()
    config = learned(4, [1, 2], weights={1: 0.5, 3: 0.5}, confidence_loss_weight=1.0, **extra)
    trainer = UniversalTrainer(config, VOCAB, backend="torch")
    trainer.fit(model, iter([batch(4, 16) for _ in range(3)]), 3, progress_bar=False)
    assert all(p.abs().sum() > 0 for p in model.confidence_heads.parameters())  # moved from their zero init
    x, y = batch(4, 16)
    loss = trainer.compute_loss(model, x, y, trainer.layer_drops(4, 4))
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- routing
@pytest.mark.parametrize("forward", [exact_routed_forward, compact_routed_forward])
@pytest.mark.parametrize("thresholds,at", [([TINY, 0.0], 1), ([0.0, TINY], 3), ([0.0, 0.0], 5)])
def test_thresholds_that_force_one_exit_route_there(forward, thresholds, at):
    model, (idx, y) = with_heads(make_model(5, block_scale=4.0), [1, 3]), batch()
    out = forward(model, idx, [1, 3], thresholds, targets=y, confidence="learned")
    assert (out.layers_run == at).all()
    h = model.exit_hidden_states(idx, [min(at, 3)])[0]
    torch.testing.assert_close(out.conf.double(), fp64_confidence(model, min(at, 3), h), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("forward", [exact_routed_forward, compact_routed_forward])
def test_routing_with_learned_confidence_follows_the_heads(forward):
    """Three exits on 6 layers: exact routing against the exact states, compact against dense
    state propagation, both with sigmoid(head(norm(h))) as each exit's confidence."""
    model, (idx, y) = with_heads(make_model(6, block_scale=4.0), [1, 3, 4]), batch(4, 48)
    exits, L = [1, 3, 4], 6
    dense = dict(zip(exits, model.exit_hidden_states(idx, exits)))
    thresholds = [gap_threshold(fp64_confidence(model, e, dense[e]), q) for e, q in zip(exits, (0.7, 0.6, 0.5))]
    out = forward(model, idx, exits, thresholds, targets=y, confidence="learned")
    states = model.exit_hidden_states(idx, [*exits, L]) if forward is exact_routed_forward \
        else cascade_reference(model, idx, out.layers_run, [*exits, L])
    confs = [fp64_confidence(model, e, h) for e, h in zip(exits, states)]
    at = first_exit(confs, exits, thresholds, L)
    assert torch.equal(out.layers_run, at) and all((at == e).any() for e in (*exits, L))
    preds = [(h.double() @ model.lm_head.weight.double().T).argmax(-1) for h in states]
    assert torch.equal(out.pred, per_token(preds, [*exits, L], at))
    torch.testing.assert_close(out.conf.double(), per_token(confs, exits, at), atol=1e-6, rtol=1e-5)


def test_generation_with_learned_confidence_follows_the_heads():
    """Each step re-derived from scratch: the prompt runs full depth, every generated position
    keeps the state of the exit its step left at; the step's exit is the first whose
    sigmoid(head(norm(h))) reaches its threshold."""
    model, (idx, _) = with_heads(make_model(5, block_scale=4.0), [1, 3]), batch(3, 6)
    exits, L, t0 = [1, 3], 5, 6
    probe = model.exit_hidden_states(torch.cat([idx, idx], 1), exits)
    thresholds = [gap_threshold(fp64_confidence(model, e, h), 0.5) for e, h in zip(exits, probe)]
    config = UniversalConfig({L: 1.0}, exit_layers=exits, routing_thresholds=thresholds, confidence="learned")
    tokens, layers, conf, _ = generate(model, idx, 12, config=config, return_conf=True)
    assert all((layers == e).any() for e in (*exits, L))
    for s in range(12):
        seq, at = tokens[:, :t0 + s], torch.full((3, t0 + s), L)
        at[:, t0:] = layers[:, 1:s + 1]
        states = [h[:, -1] for h in cascade_reference(model, seq, at, [*exits, L])]
        confs = [fp64_confidence(model, e, h) for e, h in zip(exits, states)]
        step_at = first_exit(confs, exits, thresholds, L)
        preds = [(h.double() @ model.lm_head.weight.double().T).argmax(-1) for h in states]
        assert torch.equal(layers[:, s], step_at)
        assert torch.equal(tokens[:, t0 + s], per_token(preds, [*exits, L], step_at))
        torch.testing.assert_close(conf[:, s].double(), per_token(confs, exits, step_at), atol=1e-6, rtol=1e-5)


def test_evaluate_and_exit_table_with_learned_confidence():
    model, batches = with_heads(make_model(4, block_scale=2.0), [1, 2]), [batch(2, 16) for _ in range(2)]
    table = exit_table(model, batches, [1, 2], "learned", backend="torch")
    hidden = [model.exit_hidden_states(x, [1, 2]) for x, _ in batches]
    for k, e in enumerate([1, 2]):
        ref = torch.cat([fp64_confidence(model, e, h[k]).reshape(-1) for h in hidden])
        torch.testing.assert_close(table.conf[k].double(), ref, atol=1e-6, rtol=1e-5)
    t = gap_threshold(table.conf[0], 0.5)
    trainer = UniversalTrainer(UniversalConfig({4: 1.0}, exit_layer=1, routing_threshold=t, confidence="learned"),
                               VOCAB, backend="torch")
    stats = trainer.evaluate(model, batches, "compact")
    assert stats["exit_ratio_L1"] == pytest.approx(float((table.conf[0] >= t).double().mean()))


def test_confidence_head_flops():
    assert confidence_head_flops(256) == 512 and confidence_head_flops(256, 2.5) == 1280


# ----------------------------------------------------------------------------- checkpoints and runs
def test_checkpoint_round_trip_keeps_the_heads(tmp_path):
    config = run_config(tmp_path)
    config = RunConfig.from_dict(dict(config.to_dict(), method=dict(
        config.method.to_dict(), confidence="learned", confidence_loss_weight=0.5)))
    run = Run.create(tmp_path / "learned", config)
    assert sorted(run.model.confidence_heads) == ["1"]
    run.train(progress=False)
    loaded = Run.load(tmp_path / "learned")
    saved = {k: v for k, v in run.model.state_dict().items() if k.startswith("confidence_heads.")}
    assert saved and all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in saved.items())
    assert any(v.abs().sum() > 0 for v in saved.values())  # trained away from the zero init
    assert 0 <= loaded.evaluate("val", "compact", eval_batches=1)["shallow_ratio"] <= 1
    payload = ckpt.load_checkpoint(tmp_path / "learned" / ckpt.CKPT_NAME)
    restored = ckpt.restore_model(payload)
    assert torch.equal(restored.confidence_heads["1"].weight, loaded.model.confidence_heads["1"].weight)
    resumed = Run.resume(tmp_path / "learned")  # the heads exist before the weights and optimizer load
    assert torch.equal(resumed.model.confidence_heads["1"].bias, saved["confidence_heads.1.bias"])


def test_a_run_without_heads_refuses_learned_confidence(tmp_path):
    run = Run.create(tmp_path / "plain", run_config(tmp_path))
    assert not hasattr(run.model, "confidence_heads")
    run.train(progress=False)
    loaded = Run.load(tmp_path / "plain")
    assert not any(k.startswith("confidence_heads") for k in loaded.model.state_dict())
    with pytest.raises(ValueError, match="confidence"):
        loaded.evaluate("val", confidence="learned", eval_batches=1)
    with pytest.raises(ValueError, match="confidence"):
        generate(loaded.model, torch.zeros(1, 3, dtype=torch.long), 2, 0.5, 1, confidence="learned")


def test_hf_model_saves_and_loads_its_heads(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fastexit import hf
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    model = with_heads(hf.from_hf(transformers.LlamaForCausalLM(transformers.LlamaConfig(**small)).eval()), [1])
    config = UniversalConfig({3: 1.0}, exit_layer=1, routing_threshold=0.5, confidence="learned")
    hf.save(model, tmp_path / "m", config)
    loaded, loaded_config = hf.load(tmp_path / "m")
    assert loaded_config == config
    assert torch.equal(loaded.confidence_heads["1"].weight, model.confidence_heads["1"].weight)
    idx = torch.randint(0, VOCAB, (2, 10))
    a = exact_routed_forward(model, idx, 1, 0.5, confidence="learned")
    b = compact_routed_forward(loaded, idx, 1, 0.5, confidence="learned")
    assert torch.equal(a.layers_run, b.layers_run) and torch.equal(a.conf, b.conf)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # still a transformers folder
    assert torch.equal(plain.lm_head.weight, model.lm_head.weight)


# ----------------------------------------------------------------------------- defaults and bad input
def test_defaults_leave_every_existing_config_and_model_unchanged():
    plain = UniversalConfig({1: 0.5, 3: 0.5})
    assert plain.confidence_label == "consistency" and plain.confidence_backbone_grad is False
    assert plain.confidence_head_layers == []
    old = {k: v for k, v in plain.to_dict().items() if k not in ("confidence_label", "confidence_backbone_grad")}
    assert UniversalConfig.from_dict(old) == plain
    config = learned(4, [1, 2], confidence_label="correct", confidence_backbone_grad=True)
    assert UniversalConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert all(p.confidence == "max_prob" and p.confidence_head_layers == [] for p in PRESETS.values())
    model = make_model(3)
    keys = list(model.state_dict())
    for method in PRESETS.values():
        UniversalTrainer(method, VOCAB).create_optimizer(model, 1e-3)
    assert not hasattr(model, "confidence_heads") and list(model.state_dict()) == keys


def test_learned_with_zero_loss_weight_is_the_plain_loss_bit_for_bit():
    model = make_model(4).train()
    x, y = batch(2, 16)
    weights = {1: 0.5, 4: 0.5}
    plain = UniversalTrainer(UniversalConfig(weights, exit_layers=[1, 2], routing_thresholds=[0.9, 0.9]), VOCAB)
    heads = UniversalTrainer(learned(4, [1, 2], weights=weights), VOCAB)
    heads.add_confidence_heads(model)
    assert torch.equal(plain.compute_loss(model, x, y), heads.compute_loss(model, x, y))


@pytest.mark.parametrize("grad_clip", [1e-3, None])
def test_heads_off_the_backbone_leave_the_lm_training_bit_for_bit(grad_clip):
    """Learned heads trained beside the LM (confidence_backbone_grad False) change none of its
    weights, gradient clipping included: the heads' gradient is clipped on its own (in one
    global norm, their BCE gradient shrank the LM's steps; a small max_norm makes every step clip)."""
    weights = {1: 0.5, 4: 0.5}
    trained = []
    for config in (UniversalConfig(weights, exit_layers=[1, 2], routing_thresholds=[0.9, 0.9]),
                   learned(4, [1, 2], weights=weights, confidence_loss_weight=5.0)):
        torch.manual_seed(0)
        model = make_model(4).train()
        trainer = UniversalTrainer(config, VOCAB, backend="torch")
        torch.manual_seed(1)
        trainer.fit(model, iter([batch(2, 16) for _ in range(3)]), 3, grad_clip=grad_clip, progress_bar=False)
        trained.append({n: p.detach().clone() for n, p in model.named_parameters() if "confidence" not in n})
    assert trained[0].keys() == trained[1].keys()
    assert all(torch.equal(trained[0][n], trained[1][n]) for n in trained[0])


def test_heads_are_zero_initialised_and_draw_no_random_numbers():
    model = make_model(3)
    state = torch.get_rng_state()
    model.add_confidence_heads([1, 2])
    model.add_confidence_heads([2])  # a layer that has one keeps it
    assert torch.equal(state, torch.get_rng_state()) and sorted(model.confidence_heads) == ["1", "2"]
    assert all(p.abs().sum() == 0 for p in model.confidence_heads.parameters())
    opt = UniversalTrainer(learned(3, [1, 2]), VOCAB).create_optimizer(model, 1e-3)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in model.confidence_heads.parameters())


@pytest.mark.parametrize("kwargs,name", [(dict(confidence_label="target"), "confidence_label"),
                                         (dict(confidence_backbone_grad=1), "confidence_backbone_grad")])
def test_config_bad_input_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        UniversalConfig({3: 1.0}, **kwargs)


def test_bad_input_names_the_argument():
    model = make_model(3)
    with pytest.raises(ValueError, match="layers"):
        model.add_confidence_heads([0])
    with pytest.raises(ValueError, match="layers"):
        model.add_confidence_heads([4])
    trainer = UniversalTrainer(learned(3, [1, 2], confidence_loss_weight=1.0), VOCAB)
    with pytest.raises(ValueError, match="confidence"):  # the trainer adds heads before its optimizer, not here
        trainer.compute_loss(model, *batch(2, 8))
    model.add_confidence_heads([1])  # a head at one exit of two
    with pytest.raises(ValueError, match="confidence.*\\[2\\]"):
        exact_routed_forward(model, batch(2, 8)[0], [1, 2], 0.5, confidence="learned")
    with pytest.raises(ValueError, match="confidence"):
        exit_table(model, [batch(2, 8)], [1, 2], "learned")

    class Logits(nn.Module):  # the seed's style: a list of per-layer logits, no heads to add
        def forward(self, x):
            return [torch.zeros(*x.shape, VOCAB)]
    with pytest.raises(ValueError, match="confidence"):
        trainer.create_optimizer(Logits(), 1e-3)
