import math

import pytest
import torch
import torch.nn.functional as F

from fastexit import (PRESETS, AlphaSchedule, EarlyExitTransformer, ModelConfig, UniversalConfig,
                      UniversalTrainer)
from fastexit import routing
from fastexit.trainer import lr_factor

V, T = 101, 12

# The seed's "equivalent loss" of each preset, written out by hand from its text.
SEED_EQUIVALENT = {
    "standard_llm": lambda l1, l2, l3: l3,
    "lpt": lambda l1, l2, l3: (l1 + l2 + l3) / 3,
    "standard_routing": lambda l1, l2, l3: 0.5 * l1 + 0.5 * l3,
    "asymmetric_best": lambda l1, l2, l3: 0.7 * l1 + 0.3 * l3,
    "lpt_routing": lambda l1, l2, l3: (l1 + l2 + l3) / 3,
    "asymmetric_with_l2": lambda l1, l2, l3: 0.7 * l1 + 1.0 * l2 + 0.3 * l3,
}


def small_model(n_layers=3, seed=0):
    torch.manual_seed(seed)
    return EarlyExitTransformer(ModelConfig(V, n_layers=n_layers, d_model=32, n_heads=4, max_seq_len=32))


def batch(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    return x, torch.randint(0, V, (B, T), generator=g)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(SEED_EQUIVALENT))
def test_compute_loss_equals_seed_equivalent(name):
    model, (x, y) = small_model(), batch()
    loss = UniversalTrainer(PRESETS[name], vocab_size=V).compute_loss(model, x, y)
    loss.backward()
    got = grads(model)
    model.zero_grad()
    per_layer = [F.cross_entropy(lg.reshape(-1, V), y.reshape(-1)) for lg in model.exit_logits(x, [1, 2, 3])]
    expected = SEED_EQUIVALENT[name](*per_layer)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    want = grads(model)
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_weight_zero_layers_and_deeper_blocks_cost_nothing():
    model, (x, y) = small_model(n_layers=4), batch()
    ran = []
    for i, block in enumerate(model.blocks, start=1):
        block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    cfg = UniversalConfig({1: 0.0, 2: 1.0, 3: 0.0, 4: 0.0}, routing_threshold=0)
    UniversalTrainer(cfg, V).compute_loss(model, x, y).backward()
    assert ran == [1, 2]
    assert all(p.grad is None for p in model.blocks[2:].parameters())
    assert model.exit_norms[0].weight.grad is None and model.exit_norms[1].weight.grad is not None


class SeedStyleModel(torch.nn.Module):
    """A model whose forward returns per-layer logits, as in the seed's code base."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner.exit_logits(x, [1, 2, 3])


def test_compute_loss_accepts_seed_style_models():
    model, (x, y) = small_model(), batch()
    trainer = UniversalTrainer(PRESETS["asymmetric_best"], V)
    torch.testing.assert_close(trainer.compute_loss(SeedStyleModel(model), x, y),
                               trainer.compute_loss(model, x, y), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="list of per-layer logits"):
        trainer.compute_loss(torch.nn.Linear(2, 2), torch.zeros(1, 2), y)


def test_compute_loss_rejects_vocab_mismatch():
    with pytest.raises(ValueError, match="vocab_size=50 does not match the model's 101"):
        UniversalTrainer(PRESETS["lpt"], vocab_size=50).compute_loss(small_model(), *batch())


def test_schedule_weights_move_inside_fit():
    """Step k (1-based) trains at progress (k - 1) / steps: its recorded loss is the weighted
    loss at the schedule's alpha there (lr ~ 0 keeps the model fixed, so it can be recomputed)."""
    cfg = UniversalConfig({1: 0.9, 2: 0, 3: 0.1}, alpha_schedule=AlphaSchedule("linear", 0.9, 0.5))
    trainer, model, batches = UniversalTrainer(cfg, V), small_model(), [batch(seed=s) for s in range(4)]
    with torch.no_grad():
        model.lm_head.weight.mul_(25)
        for block in model.blocks:
            block.mlp.fc_out.weight.mul_(50)  # deeper blocks move the state: layer 1 and 3 losses differ
    seen = []
    history = trainer.fit(model, iter(batches), steps=4, base_lr=1e-12, weight_decay=0.0, progress_bar=False,
                          callback=lambda tr, record: seen.append(tr.layer_weights(3)))
    for s, (record, (x, y)) in enumerate(zip(history, batches)):
        alpha = 0.9 - 0.4 * s / 4  # progress = (step - 1) / steps
        with torch.no_grad():
            l1, l3 = [F.cross_entropy(lg.reshape(-1, V), y.reshape(-1)) for lg in model.exit_logits(x, [1, 3])]
        expected = float(alpha * l1 + (1 - alpha) * l3)
        assert 0.1 * abs(float(l1 - l3)) > 5 * 1e-5 * expected  # a neighbouring step's alpha would fail
        assert record["loss"] == pytest.approx(expected, rel=1e-5)
        assert seen[s][1] == pytest.approx(alpha) and seen[s][3] == pytest.approx(1 - alpha)
    assert [r["progress"] for r in history] == [0, 0.25, 0.5, 0.75]
    assert [r["step"] for r in history] == [1, 2, 3, 4] and trainer.step == 4 and trainer.progress == 1.0


def test_compute_loss_outside_fit_uses_progress_zero():
    cfg = UniversalConfig({1: 0.9, 3: 0.1}, alpha_schedule=AlphaSchedule("cosine", 0.8, 0.2))
    trainer, model, (x, y) = UniversalTrainer(cfg, V), small_model(), batch()
    l1, _, l3 = [F.cross_entropy(lg.reshape(-1, V), y.reshape(-1)) for lg in model.exit_logits(x, [1, 2, 3])]
    torch.testing.assert_close(trainer.compute_loss(model, x, y), 0.8 * l1 + 0.2 * l3, rtol=1e-5, atol=1e-6)


def test_create_optimizer_groups():
    cfg = UniversalConfig({1: 0.7, 3: 0.3}, layer_lr_scales={1: 1.0, 2: 0.5, 3: 0.1})
    model = small_model()
    opt = UniversalTrainer(cfg, V).create_optimizer(model, base_lr=1e-3, betas=(0.9, 0.95))
    owner = {}
    for group in opt.param_groups:
        for p in group["params"]:
            assert id(p) not in owner, "parameter in two groups"
            owner[id(p)] = group
    assert len(owner) == len({id(p) for p in model.parameters()})
    for i, block in enumerate(model.blocks, start=1):
        for p in block.parameters():
            assert owner[id(p)]["lr"] == pytest.approx(1e-3 * cfg.layer_lr_scales[i])
    for p in [model.tok_emb.weight, model.pos_emb.weight, *model.exit_norms.parameters()]:
        assert owner[id(p)]["lr"] == pytest.approx(1e-3)
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert all(g["weight_decay"] == 0 for g in opt.param_groups if g["params"][0].dim() == 1)
    assert opt.defaults["fused"] is True  # the default where every parameter is a float on CPU/CUDA
    assert not UniversalTrainer(cfg, V).create_optimizer(model, base_lr=1e-3, foreach=True).defaults["fused"]
    differentiable = UniversalTrainer(cfg, V).create_optimizer(model, base_lr=1e-3, differentiable=True)
    assert differentiable.defaults["differentiable"] and not differentiable.defaults["fused"]


def test_fit_lr_schedule_keeps_layer_ratios():
    cfg = UniversalConfig({1: 0.7, 3: 0.3}, layer_lr_scales={1: 1.0, 2: 0.5, 3: 0.1})
    trainer, model = UniversalTrainer(cfg, V), small_model()
    trainer.fit(model, iter([batch(seed=s) for s in range(3)]), steps=3, base_lr=2e-3,
                warmup_steps=1, progress_bar=False)
    for group in trainer.optimizer.param_groups:
        ratio = group["lr"] / group["initial_lr"]
        assert ratio == pytest.approx(lr_factor(2, 3, 1, 0.1))
        assert group["initial_lr"] == pytest.approx(2e-3 * (cfg.lr_scale(group["layer"]) if group["layer"] else 1))


def test_lr_factor_endpoints():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, 0.0) == pytest.approx(0.5)


def reference_routed_metrics(model, batches, threshold, exit_layer=1):
    """Routed metrics from full logits, docs/design.md §3, computed independently of the kernels."""
    nll, correct, easy, n = 0.0, 0, 0, 0
    for x, y in batches:
        l_exit, l_final = (lg.reshape(-1, V).double() for lg in model.exit_logits(x, [exit_layer, 3]))
        y = y.reshape(-1)
        is_easy = l_exit.softmax(-1).max(-1).values >= threshold if threshold > 0 else torch.zeros_like(y, dtype=torch.bool)
        logits = torch.where(is_easy[:, None], l_exit, l_final)
        nll += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        easy += is_easy.sum().item()
        n += y.numel()
    s = easy / n
    return dict(ppl=math.exp(nll / n), acc=correct / n, shallow_ratio=s,
                compute_cost=s * exit_layer / 3 + (1 - s))


def confident_model():
    model = small_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(25)  # spread the exit confidences over (0, 1)
    return model


def test_evaluate_without_routing():
    model, batches = confident_model(), [batch(seed=s) for s in range(2)]
    stats = UniversalTrainer(PRESETS["lpt"], V).evaluate(model, batches)
    ref = reference_routed_metrics(model, batches, threshold=0)
    assert stats["shallow_ratio"] == 0 and stats["compute_cost"] == 1
    assert stats["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)
    assert stats["ppl"] == pytest.approx(stats["ppl_L3"], rel=1e-9)
    assert stats["acc"] == pytest.approx(ref["acc"])
    assert stats["n_tokens"] == 2 * 3 * T and stats["tokens_per_s"] > 0


# No token's exit confidence may lie this close to a test's threshold: the reference (fp64 softmax
# of fp32 logits) and evaluate (the fused exit_confidence kernel) compute it in different orders,
# and their results differ by a few fp32 ulps (~1e-7), more or fewer with the GEMM's blocking.
THRESHOLD_MARGIN = 1e-5


def threshold_between_tokens(model, batches, exit_layer=1):
    """A routing threshold near the median exit confidence, at the middle of the widest gap
    between the confidences of the middle half of all tokens: no token sits on it, so no
    rounding difference between two correct computations can flip a token's exit."""
    with torch.no_grad():
        conf = torch.cat([model.exit_logits(x, [exit_layer])[0].double().softmax(-1).max(-1).values.flatten()
                          for x, _ in batches]).sort().values
    n = conf.numel()
    middle = conf[n // 4: 3 * n // 4 + 1]
    gaps = middle[1:] - middle[:-1]
    i = int(gaps.argmax())
    threshold = float(middle[i] + middle[i + 1]) / 2
    assert float((conf - threshold).abs().min()) > THRESHOLD_MARGIN
    return threshold


def test_evaluate_routed_matches_hand_computation():
    model, batches = confident_model(), [batch(seed=s) for s in range(2)]
    threshold = threshold_between_tokens(model, batches)  # about half of the tokens leave at layer 1
    stats = UniversalTrainer(PRESETS["asymmetric_best"], V).evaluate(model, batches, routing_threshold=threshold)
    ref = reference_routed_metrics(model, batches, threshold)
    assert 0.2 < ref["shallow_ratio"] < 0.8
    for key in ("ppl", "acc", "shallow_ratio", "compute_cost"):
        assert stats[key] == pytest.approx(ref[key], rel=1e-5), key


def test_evaluate_routed_agrees_with_the_reference_under_any_rounding(monkeypatch):
    """The cause of the old flake: the threshold was the median token's own confidence, so that
    token sat exactly on it and its exit flipped with a last-bit difference in how the kernel
    summed its logits. Nudging every confidence evaluate computes by a relative 1e-6 (far more
    than any summation order moves it) must change nothing with the threshold chosen above."""
    model, batches = confident_model(), [batch(seed=s) for s in range(2)]
    threshold = threshold_between_tokens(model, batches)
    ref = reference_routed_metrics(model, batches, threshold)
    real = routing.exit_confidence
    for nudge in (1 - 1e-6, 1 + 1e-6):
        def nudged(*args, _nudge=nudge, **kwargs):
            stats = real(*args, **kwargs)
            return stats._replace(conf=stats.conf * _nudge)
        monkeypatch.setattr(routing, "exit_confidence", nudged)
        stats = UniversalTrainer(PRESETS["asymmetric_best"], V).evaluate(model, batches, routing_threshold=threshold)
        for key in ("ppl", "acc", "shallow_ratio", "compute_cost"):
            assert stats[key] == pytest.approx(ref[key], rel=1e-5), (nudge, key)


def test_evaluate_ignores_ignore_index_and_rejects_all_ignored():
    model, (x, y) = confident_model(), batch()
    y_masked = y.clone()
    y_masked[:, :4] = -100
    trainer = UniversalTrainer(PRESETS["standard_llm"], V)
    stats = trainer.evaluate(model, [(x, y_masked)])
    assert stats["n_tokens"] == 3 * (T - 4)
    with pytest.raises(ValueError, match="no scored tokens"):
        trainer.evaluate(model, [(x, torch.full_like(y, -100))])
    with pytest.raises(ValueError, match="mode must be one of"):
        trainer.evaluate(model, [(x, y)], mode="fast")
    with pytest.raises(ValueError, match="val_batches is empty"):
        trainer.evaluate(model, [])


def test_trainer_argument_validation():
    with pytest.raises(ValueError, match="backend must be one of"):
        UniversalTrainer(PRESETS["lpt"], V, backend="cuda")
    with pytest.raises(TypeError, match="config must be a UniversalConfig"):
        UniversalTrainer({1: 1.0}, V)
    with pytest.raises(ValueError, match="vocab_size"):
        UniversalTrainer(PRESETS["lpt"], 0)
    trainer = UniversalTrainer(PRESETS["lpt"], V)
    with pytest.raises(ValueError, match="base_lr"):
        trainer.create_optimizer(small_model(), base_lr=-1)
    with pytest.raises(ValueError, match="steps must be"):
        trainer.fit(small_model(), iter([]), steps=0)
    with pytest.raises(ValueError, match="has layer 4"):
        UniversalTrainer(UniversalConfig({4: 1.0}), V).compute_loss(small_model(), *batch())


def periodic_batches(n_batches, B=8, period=7, seed=0):
    """Token streams that repeat a fixed random phrase: learnable, but not from unigram stats."""
    phrase = torch.randint(0, V, (period,), generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        starts = torch.randint(0, period, (B,), generator=g)
        seq = phrase[(starts[:, None] + torch.arange(T + 1)) % period]
        yield seq[:, :-1], seq[:, 1:]


def test_three_layer_model_learns():
    trainer = UniversalTrainer(PRESETS["asymmetric_best"], V)
    model = small_model()
    history = trainer.fit(model, periodic_batches(60), steps=60, base_lr=3e-3, warmup_steps=5, progress_bar=False)
    first, last = history[0]["loss"], sum(r["loss"] for r in history[-5:]) / 5
    assert first > 0.8 * math.log(V) and last < 0.25 * first
    stats = trainer.evaluate(model, list(periodic_batches(2, seed=1)))
    assert stats["acc"] > 0.8 and stats["ppl_L3"] < 3


def test_seed_usage_snippet_runs_as_written():
    vocab_size = V
    model = small_model()
    x, y = batch()
    val_batches = [batch(seed=7)]
    # --- the seed's "Usage" section, with `experiments.universal_trainer` -> `fastexit`
    from fastexit import UniversalConfig, UniversalTrainer, PRESETS  # noqa: F811
    config = PRESETS['asymmetric_best']
    config = UniversalConfig(
        layer_weights={1: 0.8, 2: 0, 3: 0.2},
        routing_threshold=0.95
    )
    trainer = UniversalTrainer(config, vocab_size=vocab_size, device='cpu')
    loss = trainer.compute_loss(model, x, y)
    stats = trainer.evaluate(model, val_batches)
    # --- end of the snippet
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"ppl", "acc", "shallow_ratio", "compute_cost"} <= set(stats)


def _two_layer_routed():
    torch.manual_seed(0)
    model = EarlyExitTransformer(ModelConfig(V, n_layers=2, d_model=32, n_heads=4, max_seq_len=32))
    with torch.no_grad():
        model.lm_head.weight.mul_(25)
    batches = [batch(seed=s) for s in range(2)]
    conf = model.exit_logits(batches[0][0], [1])[0].softmax(-1).max(-1).values
    cfg = UniversalConfig({1: 0.5, 2: 0.5}, routing_threshold=conf.median().item())
    return UniversalTrainer(cfg, V), model, batches


def test_evaluate_compact_mode_reports_its_difference_from_exact():
    trainer, model, batches = _two_layer_routed()
    exact = trainer.evaluate(model, batches)
    compact = trainer.evaluate(model, batches, mode="compact", compare_exact=True, per_layer=True)
    # exit at 1 of 2 layers: the one block after the exit is exact, so the modes agree
    assert 0 < exact["shallow_ratio"] < 1
    for key in ("ppl", "acc", "shallow_ratio", "compute_cost", "ppl_L1", "ppl_L2"):
        assert compact[key] == pytest.approx(exact[key], rel=1e-5), key
    assert compact["ppl_exact"] == pytest.approx(exact["ppl"], rel=1e-9)
    assert compact["ppl_diff_vs_exact"] == pytest.approx(compact["ppl"] - exact["ppl"])
    assert compact["speedup_vs_exact"] > 0


def test_evaluate_defaults_compact_pass_only_and_per_layer_in_exact():
    trainer, model, batches = _two_layer_routed()
    exact, compact = trainer.evaluate(model, batches), trainer.evaluate(model, batches, mode="compact")
    assert {"ppl_L1", "acc_L1", "ppl_L2"} <= set(exact)
    assert not {"ppl_L1", "ppl_exact", "ppl_diff_vs_exact", "speedup_vs_exact"} & set(compact)
    assert compact["ppl"] == pytest.approx(exact["ppl"], rel=1e-5)
    assert exact["exit_ratio_L1"] == exact["shallow_ratio"] == compact["exit_ratio_L1"] > 0  # design §7, one exit
    lean = trainer.evaluate(model, batches, per_layer=False)
    assert "ppl_L1" not in lean and lean["ppl"] == pytest.approx(exact["ppl"], rel=1e-9)
    with pytest.raises(ValueError, match="compare_exact.*mode='compact'"):
        trainer.evaluate(model, batches, compare_exact=True)


def test_evaluate_routing_threshold_none_is_the_configs():
    trainer, model, batches = _two_layer_routed()
    explicit = trainer.evaluate(model, batches, routing_threshold=trainer.config.routing_threshold)
    assert trainer.evaluate(model, batches) == pytest.approx(dict(explicit, tokens_per_s=pytest.approx(0, abs=1e12),
                                                                   seconds=pytest.approx(0, abs=1e12)))
    assert trainer.evaluate(model, batches, routing_threshold=0)["shallow_ratio"] == 0


# ----------------------------------------------------------------------------- self-distillation
def distill_reference(model, x, y, weights, lam, temp):
    """sum_i w_i CE_i + lam * w_i * T^2 * KL(p_L || p_i) over weighted i < L, token means, from
    full fp64 logits with the final layer's detached as the teacher."""
    L = model.n_layers
    logits = model.exit_logits(x, list(range(1, L + 1)))
    teacher = F.log_softmax(logits[-1].detach().flatten(0, 1) / temp, -1)
    total = 0.0
    for i, w in weights.items():
        z = logits[i - 1].flatten(0, 1)
        total = total + w * F.cross_entropy(z, y.flatten())
        if i < L and w > 0:
            kl = (teacher.exp() * (teacher - F.log_softmax(z / temp, -1))).sum(-1).mean()
            total = total + lam * w * temp ** 2 * kl
    return total


@pytest.mark.parametrize("weights", [{1: 0.7, 3: 0.3}, {1: 0.5, 2: 0.5}, {2: 1.0, 3: 1.0}],
                         ids=["teacher weighted", "teacher an extra exit", "middle student"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compute_loss_adds_self_distillation(weights, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    lam, temp = 0.5, 2.0
    model, (x, y) = small_model(), batch()
    model = model.double() if backend == "torch" else model
    cfg = UniversalConfig(weights, routing_threshold=0, distill_weight=lam, distill_temperature=temp)
    loss = UniversalTrainer(cfg, V, backend=backend).compute_loss(model, x, y)
    loss.backward()
    got = grads(model)
    model.zero_grad()
    expected = distill_reference(model, x, y, weights, lam, temp)
    expected.backward()
    tol = dict(rtol=1e-9, atol=1e-11) if backend == "torch" else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, expected.to(loss.dtype), **tol)
    ref = grads(model)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], **tol, msg=name)


def test_distill_weight_zero_is_the_plain_loss():
    model, (x, y) = small_model(), batch()
    plain = UniversalTrainer(UniversalConfig({1: 0.7, 3: 0.3}), V).compute_loss(model, x, y)
    off = UniversalTrainer(UniversalConfig({1: 0.7, 3: 0.3}, distill_temperature=3.0), V).compute_loss(model, x, y)
    assert torch.equal(plain, off)


# ----------------------------------------------------------------------------- layer dropout
def test_fit_draws_layer_drops_from_seed_and_step(monkeypatch):
    from fastexit.config import LayerDropout
    cfg = UniversalConfig({1: 0.5, 3: 0.5}, routing_threshold=0, layer_dropout=LayerDropout(0.5))
    trainer, model = UniversalTrainer(cfg, V, seed=7), small_model()
    seen = []
    original = UniversalTrainer.compute_loss

    def spy(self, model, x, y, drops=None):
        seen.append(drops)
        return original(self, model, x, y, drops)
    monkeypatch.setattr(UniversalTrainer, "compute_loss", spy)
    trainer.fit(model, iter([batch(4, seed=s) for s in range(3)]), steps=3, progress_bar=False)
    assert seen == [LayerDropout(0.5).draw(3, 4, seed=7, step=k) for k in range(3)]
    assert any(any(layer) for drops in seen for layer in drops)


def test_layer_dropout_training_is_reproducible_and_changes_the_result():
    from fastexit.config import LayerDropout

    def train(dropout, seed=0):
        cfg = UniversalConfig({1: 0.5, 3: 0.5}, routing_threshold=0, layer_dropout=dropout)
        model = small_model()
        UniversalTrainer(cfg, V, seed=seed).fit(model, iter([batch(4, seed=s) for s in range(3)]), steps=3,
                                                progress_bar=False)
        return torch.cat([p.detach().flatten() for p in model.parameters()])
    dropped = train(LayerDropout(0.5))
    assert torch.equal(dropped, train(LayerDropout(0.5)))
    assert not torch.equal(dropped, train(None))
    assert not torch.equal(dropped, train(LayerDropout(0.5), seed=1))
    assert torch.equal(train(LayerDropout(0.0)), train(None))


def test_layer_dropout_is_off_in_evaluation():
    from fastexit.config import LayerDropout
    model, b = small_model(), batch()
    with_dropout = UniversalConfig({1: 0.5, 3: 0.5}, routing_threshold=0, layer_dropout=LayerDropout(0.9))
    stats = UniversalTrainer(with_dropout, V).evaluate(model, [b])
    plain = UniversalTrainer(UniversalConfig({1: 0.5, 3: 0.5}, routing_threshold=0), V).evaluate(model, [b])
    assert stats["ppl"] == plain["ppl"] and stats["ppl_L3"] == plain["ppl_L3"]


def test_layer_dropout_needs_exit_hidden_states():
    from fastexit.config import LayerDropout
    cfg = UniversalConfig({1: 0.5, 2: 0.5}, routing_threshold=0, layer_dropout=LayerDropout(0.2))

    class LogitsModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(V, V))

        def forward(self, x):
            return [self.w[x], self.w[x]]
    with pytest.raises(TypeError, match="layer_dropout"):
        UniversalTrainer(cfg, V).fit(LogitsModel(), iter([batch()]), steps=1, progress_bar=False)


# ----------------------------------------------------------------------------- learned confidence labels
def learned_model(n_layers, exits):
    """small_model with random (not zero) confidence heads at ``exits``: zero heads give every
    label the same BCE, log 2, and would hide a wrong label."""
    model = small_model(n_layers=n_layers)
    model.add_confidence_heads(exits)
    with torch.no_grad():
        for head in model.confidence_heads.values():
            head.weight.normal_(0, 0.5)
            head.bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("weights, extra, head_passes", [
    ({1: 0.5, 4: 0.5}, {}, [2]),  # exit 2 is not weighted: its labels alone need a head pass
    ({1: 0.5, 2: 0.5, 4: 1.0}, {}, []),
    ({2: 1.0}, {}, [1, 4]),
    ({1: 0.5, 2: 0.5}, dict(distill_weight=0.5), [4]),  # the final layer is the teacher, not a weighted head
    ({1: 0.5, 4: 0.5}, dict(distill_weight=0.5), [2]),
    ({1: 0.5, 3: 0.5}, dict(confidence_label="correct"), [2]),  # no final layer: the targets are the labels
], ids=["exit-unweighted", "all-weighted", "final-unweighted", "distill-extra-teacher", "distill-head-teacher",
        "correct"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_confidence_labels_reuse_the_fused_loss_argmax(monkeypatch, backend, weights, extra, head_passes):
    """With a learned confidence, compute_loss takes the weighted layers' argmax from the fused
    loss: exit_confidence runs only for the label layers it did not compute, and the loss and
    every gradient are those of labelling every layer with exit_confidence (the former path)."""
    if backend == "triton":
        pytest.importorskip("triton")
    import fastexit.trainer as trainer_module
    model, (x, y) = learned_model(4, [1, 2]), batch()
    y[0, ::5] = -100
    config = UniversalConfig(weights, exit_layers=[1, 2], routing_thresholds=[0.9, 0.9], confidence="learned",
                             confidence_loss_weight=0.7, **extra)
    trainer = UniversalTrainer(config, V, backend=backend)
    states = [h.detach().reshape(-1, h.shape[-1]) for h in model.exit_hidden_states(x, [1, 2, 3, 4])]
    calls, exit_confidence = [], trainer_module.exit_confidence

    def counting(hidden, *args, **kwargs):  # records the layer whose states it scores
        calls.append(next(i for i, h in enumerate(states, start=1) if torch.equal(h, hidden)))
        return exit_confidence(hidden, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "exit_confidence", counting)
    loss = trainer.compute_loss(model, x, y)
    loss.backward()
    got, new_calls = grads(model), sorted(calls)
    model.zero_grad()
    calls.clear()
    confidence_loss = UniversalTrainer.confidence_loss  # the former path: every label from exit_confidence
    monkeypatch.setattr(UniversalTrainer, "confidence_loss",
                        lambda self, *args, preds=None, **kwargs: confidence_loss(self, *args, **kwargs))
    former = trainer.compute_loss(model, x, y)
    former.backward()
    assert new_calls == head_passes
    assert sorted(calls) == ([1, 2] if extra.get("confidence_label") == "correct" else [1, 2, 4])
    assert torch.equal(loss, former)
    want = grads(model)
    assert set(got) == set(want) and any(n.startswith("confidence_heads.") for n in got)
    for name in want:
        assert torch.equal(got[name], want[name]), name
