"""Several exits and a choice of confidence (docs/design.md §3): config, routed forwards,
evaluation, generation and the command line, against references built from each layer's
full logits (``model.exit_logits``) or from a dense state-propagation pass."""
import json

import pytest
import torch

from fastexit import UniversalConfig, make_method
from fastexit.cli import build_parser, main, resume_changes, run_config_from_flags
from fastexit.config import RunConfig
from fastexit.generate import generate
from fastexit.routing import compact_routed_forward, exact_routed_forward, resolve_routing
from fastexit.trainer import UniversalTrainer
from test_cli import data, tiny  # noqa: F401 (the module's corpus fixture)
from test_generate import left_padded
from test_routing import VOCAB, batch, make_model, needs_triton

TINY = 1e-9  # a threshold every confidence reaches: every token that gets there leaves
FORWARDS = [exact_routed_forward, compact_routed_forward]
SCORE = {"max_prob": 0, "margin": 1}  # the confidence's index in fp64_of_logits


def fp64_of_logits(logits, targets=None):
    """conf (max probability), margin (top-1 minus top-2), pred and NLL (...) of logits (..., V) in fp64."""
    logits = logits.double()
    top2 = logits.softmax(-1).topk(2, dim=-1)
    nll = None if targets is None else logits.logsumexp(-1) - logits.gather(-1, targets[..., None]).squeeze(-1)
    return top2.values[..., 0], top2.values[..., 0] - top2.values[..., 1], top2.indices[..., 0], nll


@torch.no_grad()
def fp64_exit(model, idx, layer, targets=None):
    """``fp64_of_logits`` of one exit's full logits (B, T, V)."""
    return fp64_of_logits(model.exit_logits(idx, [layer])[0], targets)


def first_exit(confs, exits, thresholds, n_layers):
    """(B, T) layer each token leaves at: the first exit whose confidence reaches its threshold."""
    at = torch.full(confs[0].shape, n_layers, dtype=torch.int64)
    for layer, t, c in reversed(list(zip(exits, thresholds, confs))):
        if t > 0:
            at[c >= t] = layer
    return at


def kernel_score(stats, confidence):
    """The (N,) confidence of one exit's ExitStats (to place thresholds between tokens)."""
    return stats.margin if confidence == "margin" else stats.conf


def per_token(values, layers, at):
    """Per token, values[i] (each shaped like at) where at == layers[i]; the last value where
    at is past the last layer (a hard token's confidence is that of the last exit)."""
    slot = torch.bucketize(at, torch.tensor(layers)).clamp(max=len(layers) - 1)
    return torch.stack(values).gather(0, slot[None]).squeeze(0)


def gap_threshold(conf, q):
    """A threshold near the q-quantile of conf that lies halfway between two confidences, so no
    token sits on it (rounding cannot flip a decision)."""
    values = conf.flatten().double().sort().values
    k = int(q * (values.numel() - 1))
    return float((values[k] + values[k + 1]) / 2)


@torch.no_grad()
def cascade_reference(model, idx, at, layers):
    """Dense CALM state propagation with several exits: every block runs on every position, but
    a position that left at exit ``at`` (B, T) keeps its state in the blocks after it.
    Exit-normed states (B, T, d) after each of ``layers``."""
    x, states = model.embed(idx), {}
    for i, block in enumerate(model.blocks, start=1):
        x = torch.where((at < i)[..., None], x, block(x))
        states[i] = model.exit_norms[i - 1](x)
    return [states[i] for i in layers]


def fp64_of_states(model, h, targets=None):
    """``fp64_of_logits`` of exit-normed states h (..., d)."""
    return fp64_of_logits(h.double() @ model.lm_head.weight.double().T, targets)


# ----------------------------------------------------------------------------- routed forwards
@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("thresholds,at", [([TINY, 0.5, 0.5], 1), ([0.0, TINY, 0.0], 2), ([0.0, 0.0, TINY], 3),
                                           ([0.0, 0.0, 0.0], 5), ([1.0, 1.0, 1.0], 5)])
def test_thresholds_that_force_one_exit_give_that_layers_predictions(forward, thresholds, at):
    model, (idx, y) = make_model(5, block_scale=4.0), batch()
    out = forward(model, idx, [1, 2, 3], thresholds, targets=y)
    conf, _, pred, nll = fp64_exit(model, idx, at, y)
    assert (out.layers_run == at).all() and torch.equal(out.easy, out.layers_run < 5)
    assert torch.equal(out.pred, pred)
    torch.testing.assert_close(out.nll.double(), nll, atol=5e-4, rtol=1e-5)
    deepest = fp64_exit(model, idx, min(at, 3))[0]  # conf: of the exit left at, else the last exit
    torch.testing.assert_close(out.conf.double(), deepest, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("confidence", ["max_prob", "margin"])
def test_exact_forward_routes_to_the_first_confident_exit(confidence):
    model, (idx, y) = make_model(5, block_scale=4.0), batch(3, 48)
    exits = [1, 2, 4]
    ref = {e: fp64_exit(model, idx, e, y) for e in (*exits, 5)}
    confs = [ref[e][SCORE[confidence]] for e in exits]
    thresholds = [gap_threshold(confs[0], 0.7), gap_threshold(confs[1], 0.5), gap_threshold(confs[2], 0.4)]
    at = first_exit(confs, exits, thresholds, 5)
    assert all((at == e).any() for e in (*exits, 5))  # every exit and full depth are used
    out = exact_routed_forward(model, idx, exits, thresholds, targets=y, confidence=confidence)
    assert torch.equal(out.layers_run, at)
    layers = [*exits, 5]
    assert torch.equal(out.pred, per_token([ref[e][2] for e in layers], layers, at))
    torch.testing.assert_close(out.nll.double(), per_token([ref[e][3] for e in layers], layers, at),
                               atol=5e-4, rtol=1e-5)
    torch.testing.assert_close(out.conf.double(), per_token(confs, exits, at), atol=1e-5, rtol=1e-5)


def test_margin_is_top1_minus_top2_and_differs_from_max_prob():
    model, (idx, _) = make_model(3), batch()
    _, margin, _, _ = fp64_exit(model, idx, 1)
    out = exact_routed_forward(model, idx, 1, 0.0, confidence="margin")
    torch.testing.assert_close(out.conf.double(), margin, atol=1e-5, rtol=1e-5)
    t = gap_threshold(margin, 0.5)
    by_margin = exact_routed_forward(model, idx, 1, t, confidence="margin")
    assert torch.equal(by_margin.easy, margin >= t)
    assert not torch.equal(by_margin.easy, exact_routed_forward(model, idx, 1, t).easy)


@pytest.mark.parametrize("confidence", ["max_prob", "margin"])
def test_compact_is_cascaded_state_propagation(confidence):
    """Three exits on 6 layers: compact equals the dense reference in which every token keeps
    the state of the exit it left at."""
    model, (idx, y) = make_model(6, block_scale=4.0), batch(4, 48)
    exits = [1, 3, 4]
    exact = exact_routed_forward(model, idx, exits, 0.0, confidence=confidence, all_layers=True)
    scores = [kernel_score(exact.layer_stats[e], confidence) for e in exits]
    thresholds = [gap_threshold(c, q) for c, q in zip(scores, (0.75, 0.6, 0.5))]
    out = compact_routed_forward(model, idx, exits, thresholds, targets=y, confidence=confidence)
    assert all((out.layers_run == e).any() for e in (*exits, 6))
    states = cascade_reference(model, idx, out.layers_run, [*exits, 6])
    ref = [fp64_of_states(model, h, y) for h in states]
    confs = [r[SCORE[confidence]] for r in ref[:-1]]
    assert torch.equal(out.layers_run, first_exit(confs, exits, thresholds, 6))
    assert torch.equal(out.pred, per_token([r[2] for r in ref], [*exits, 6], out.layers_run))
    torch.testing.assert_close(out.nll.double(), per_token([r[3] for r in ref], [*exits, 6], out.layers_run),
                               atol=5e-4, rtol=1e-5)
    torch.testing.assert_close(out.conf.double(), per_token(confs, exits, out.layers_run), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("thresholds", [[TINY, 0.3], [0.0, 0.0], [1.0, 1.0]])
def test_compact_equals_exact_when_all_leave_at_the_first_exit_or_none_leave(thresholds):
    model, (idx, y) = make_model(4, block_scale=4.0), batch()
    exact = exact_routed_forward(model, idx, [1, 2], thresholds, targets=y)
    compact = compact_routed_forward(model, idx, [1, 2], thresholds, targets=y)
    assert exact.conf.max() < 1.0 and (exact.layers_run == (1 if thresholds[0] == TINY else 4)).all()
    assert torch.equal(compact.layers_run, exact.layers_run) and torch.equal(compact.pred, exact.pred)
    torch.testing.assert_close(compact.nll, exact.nll, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(compact.conf, exact.conf)


@pytest.mark.parametrize("forward", FORWARDS)
def test_one_exit_as_a_list_is_the_single_exit(forward):
    model, (idx, y) = make_model(4, block_scale=4.0), batch()
    single = forward(model, idx, 2, 0.5, targets=y)
    listed = forward(model, idx, [2], [0.5], targets=y)
    for a, b in zip(single[:5], listed[:5]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("forward", FORWARDS)
def test_padded_multi_exit_rows_equal_rows_alone(forward):
    model = make_model(5, block_scale=4.0)
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (9, 4, 6)]
    idx, mask = left_padded(prompts)
    out = forward(model, idx, [1, 3], [0.6, 0.5], attention_mask=mask)
    assert (out.layers_run[mask] == 1).any() and (out.layers_run[mask] == 5).any()
    for r, p in enumerate(prompts):
        alone = forward(model, p[None], [1, 3], [0.6, 0.5])
        assert torch.equal(out.layers_run[r, mask[r]], alone.layers_run[0])
        assert torch.equal(out.pred[r, mask[r]], alone.pred[0])


@needs_triton
@pytest.mark.parametrize("confidence", ["max_prob", "margin"])
def test_multi_exit_triton_backend_matches_torch(confidence):
    model, (idx, y) = make_model(5, block_scale=4.0), batch(2, 24)
    kwargs = dict(exit_layer=[1, 3], routing_threshold=[0.6, 0.5], confidence=confidence)
    ref = compact_routed_forward(model, idx, targets=y, backend="torch", **kwargs)
    out = compact_routed_forward(model, idx, targets=y, backend="triton", **kwargs)
    assert torch.equal(out.layers_run, ref.layers_run) and torch.equal(out.pred, ref.pred)
    assert all((ref.layers_run == e).any() for e in (1, 3, 5))
    torch.testing.assert_close(out.nll, ref.nll, atol=1e-4, rtol=1e-5)
    ref_gen = generate(model, idx[:, :5], 6, backend="torch", **kwargs)
    out_gen = generate(model, idx[:, :5], 6, backend="triton", **kwargs)
    assert torch.equal(out_gen[0], ref_gen[0]) and torch.equal(out_gen[1], ref_gen[1])


# ----------------------------------------------------------------------------- evaluation
def trainer_for(n_layers, **method):
    return UniversalTrainer(UniversalConfig({n_layers: 1.0}, **method), VOCAB, backend="torch")


@pytest.mark.parametrize("mode", ["exact", "compact"])
@pytest.mark.parametrize("thresholds,at", [([TINY, TINY], 1), ([0.0, TINY], 3), ([0.0, 0.0], 4)])
def test_evaluate_cost_and_exit_ratios_when_every_token_leaves_at_one_exit(mode, thresholds, at):
    model, batches = make_model(4), [batch(2, 16) for _ in range(2)]
    stats = trainer_for(4, exit_layers=[1, 3], routing_thresholds=thresholds).evaluate(model, batches, mode)
    assert stats["compute_cost"] == pytest.approx(at / 4)
    assert stats["exit_ratio_L1"] == (at == 1) and stats["exit_ratio_L3"] == (at == 3)
    assert stats["shallow_ratio"] == (at < 4)
    ppl = torch.stack([fp64_exit(model, x, at, y)[3] for x, y in batches]).mean().exp()
    assert stats["ppl"] == pytest.approx(float(ppl), rel=1e-4)


def test_evaluate_exit_ratios_and_cost_count_each_scored_token_once():
    model, batches = make_model(5, block_scale=4.0), [batch(3, 16) for _ in range(2)]
    batches[0][1][:, ::4] = -100  # ignored targets are not counted
    config = dict(exit_layers=[1, 2, 4], routing_thresholds=[0.6, 0.5, 0.4])
    stats = trainer_for(5, **config).evaluate(model, batches, "exact")
    at = torch.cat([exact_routed_forward(model, x, [1, 2, 4], [0.6, 0.5, 0.4]).layers_run[y != -100]
                    for x, y in batches])  # (n,) layer of each scored token
    assert all((at == e).any() for e in (1, 2, 4, 5))
    for e in (1, 2, 4):
        assert stats[f"exit_ratio_L{e}"] == pytest.approx(float((at == e).double().mean()))
    assert stats["shallow_ratio"] == pytest.approx(float((at < 5).double().mean()))
    assert stats["compute_cost"] == pytest.approx(float(at.double().mean() / 5))
    assert stats["n_tokens"] == at.numel()


def hand_flops(cfg, layers_run, exits_on, learned=False):
    """Forward matmul FLOPs of (B, T) tokens routed to ``layers_run`` and at full depth, from
    the config: a block is q, k, v, o (4 d^2) and the MLP (2 d d_ff) per token, plus 4 d per key
    attended; max_prob scores each exit on that a token reaches with a head pass (2 d V), a
    learned head with 2 d and needs one head pass, where the token stops."""
    d, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    routed = full = 0.0
    for row in layers_run.tolist():
        for t, layers in enumerate(row):
            block = 2 * (4 * d * d + 2 * d * cfg.d_ff) + 4 * d * (t + 1)
            reached = sum(e <= layers for e in exits_on if e < L)
            heads = reached * 2 * d + 2 * d * V if learned else reached * 2 * d * V + (layers == L) * 2 * d * V
            routed += layers * block + heads
            full += L * block + 2 * d * V
    return routed / full


@pytest.mark.parametrize("confidence", ["max_prob", "learned"])
def test_flop_cost_counts_blocks_exit_heads_and_confidence_heads(confidence):
    model, batches = make_model(5, block_scale=4.0), [batch(3, 16)]
    if confidence == "learned":
        model.add_confidence_heads([1, 2, 4])
        with torch.no_grad():
            for head in model.confidence_heads.values():
                head.weight.normal_(generator=torch.Generator().manual_seed(1))
    thresholds = [0.6, 0.0, 0.4]  # exit 2 off: it costs nothing
    stats = trainer_for(5, exit_layers=[1, 2, 4], routing_thresholds=thresholds,
                        confidence=confidence).evaluate(model, batches, "exact")
    at = exact_routed_forward(model, batches[0][0], [1, 2, 4], thresholds, confidence=confidence).layers_run
    assert len(set(at.flatten().tolist())) > 1  # tokens leave at several depths
    assert stats["flop_cost"] == pytest.approx(hand_flops(model.cfg, at, [1, 4], confidence == "learned"), rel=1e-9)


def test_flop_cost_is_one_without_routing():
    model, batches = make_model(4), [batch(2, 16)]
    assert trainer_for(4, exit_layers=[1, 3], routing_thresholds=[0.0, 0.0]).evaluate(
        model, batches)["flop_cost"] == pytest.approx(1.0)


def test_other_exits_than_the_methods_take_its_single_threshold_or_name_the_mismatch():
    model = make_model(4)
    one = UniversalConfig({4: 1.0}, exit_layer=1, routing_threshold=0.3)
    assert resolve_routing(model, None, [1, 2], one).routing_thresholds == [0.3, 0.3]
    per_exit = UniversalConfig({4: 1.0}, exit_layers=[1, 2], routing_thresholds=[0.3, 0.4])
    assert resolve_routing(model, None, [1, 2], per_exit).routing_thresholds == [0.3, 0.4]
    with pytest.raises(ValueError, match="exit_layer=.*give routing_threshold"):
        resolve_routing(model, None, [1, 3], per_exit)


def test_a_dict_without_exit_layer_takes_the_first_exit():
    cfg = UniversalConfig.from_dict({"layer_weights": {"4": 1.0}, "exit_layers": [2, 3]})
    assert cfg.exit_layer == 2 and cfg.exits == [2, 3]
    assert UniversalConfig.from_dict({"layer_weights": {"4": 1.0}, "exit_layer": None}).exit_layer == 1


def test_a_confidence_loss_without_learned_confidence_is_an_error_naming_it():
    with pytest.raises(ValueError, match="confidence_loss_weight=0.5.*confidence='learned'"):
        UniversalConfig({3: 1.0}, confidence_loss_weight=0.5)


def test_evaluate_routing_threshold_override_applies_to_every_exit():
    model, batches = make_model(4), [batch(2, 16)]
    trainer = trainer_for(4, exit_layers=[2, 3], routing_thresholds=[0.0, 0.0])
    assert trainer.evaluate(model, batches, routing_threshold=TINY)["exit_ratio_L2"] == 1.0
    assert trainer.evaluate(model, batches, routing_threshold=[0.0, TINY])["exit_ratio_L3"] == 1.0
    rule = resolve_routing(model, 0.7, None, trainer.config)
    assert rule.exit_layers == [2, 3] and rule.routing_thresholds == [0.7, 0.7]


# ----------------------------------------------------------------------------- generation
def generation_reference(model, tokens, t0, exits, thresholds, at_steps, confidence="max_prob"):
    """Each step re-derived from scratch: the prompt runs full depth, and the position fed at
    step s keeps the state of the exit that step left at (at_steps (B, S)). Returns tokens,
    exit layers and confidences (B, S) of the routing rule on those states."""
    L, out, at_out, conf_out = model.n_layers, [], [], []
    for s in range(tokens.shape[1] - t0):
        seq = tokens[:, :t0 + s]
        at = torch.full_like(seq, L)
        at[:, t0:] = at_steps[:, 1:s + 1]
        ref = [fp64_of_states(model, h[:, -1]) for h in cascade_reference(model, seq, at, [*exits, L])]
        confs = [r[SCORE[confidence]] for r in ref[:-1]]
        layer = first_exit(confs, exits, thresholds, L)
        out.append(per_token([r[2] for r in ref], [*exits, L], layer))
        conf_out.append(per_token(confs, exits, layer))
        at_out.append(layer)
    return torch.stack(out, 1), torch.stack(at_out, 1), torch.stack(conf_out, 1)


@pytest.mark.parametrize("thresholds,at", [([TINY, 0.0], 1), ([0.0, TINY], 3), ([0.0, 0.0], 5)])
def test_generation_forced_to_one_exit_equals_the_reference(thresholds, at):
    model, (idx, _) = make_model(5, block_scale=4.0), batch(3, 6)
    tokens, layers, conf, _ = generate(model, idx, 10, thresholds, [1, 3], return_conf=True)
    assert (layers == at).all()
    ref_tokens, ref_at, ref_conf = generation_reference(model, tokens, 6, [1, 3], thresholds, layers)
    assert torch.equal(tokens[:, 6:], ref_tokens) and torch.equal(layers, ref_at)
    torch.testing.assert_close(conf.double(), ref_conf, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("confidence", ["max_prob", "margin"])
def test_generation_with_several_exits_follows_the_rule(confidence):
    model, (idx, _) = make_model(5, block_scale=4.0), batch(3, 6)
    exact = exact_routed_forward(model, torch.cat([idx, idx], 1), [1, 3], 0.0, confidence=confidence, all_layers=True)
    scores = [kernel_score(exact.layer_stats[e], confidence) for e in (1, 3)]
    thresholds = [gap_threshold(scores[0], 0.6), gap_threshold(scores[1], 0.5)]
    config = UniversalConfig({5: 1.0}, exit_layers=[1, 3], routing_thresholds=thresholds, confidence=confidence)
    tokens, layers, conf, _ = generate(model, idx, 16, config=config, return_conf=True)
    assert all((layers == e).any() for e in (1, 3, 5))
    ref_tokens, ref_at, ref_conf = generation_reference(model, tokens, 6, [1, 3], thresholds, layers, confidence)
    assert torch.equal(layers, ref_at) and torch.equal(tokens[:, 6:], ref_tokens)
    torch.testing.assert_close(conf.double(), ref_conf, atol=1e-5, rtol=1e-5)


def test_left_padded_multi_exit_generation_equals_rows_alone():
    model = make_model(5, block_scale=2.0)
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (7, 3, 1, 5)]
    idx, mask = left_padded(prompts)
    kwargs = dict(routing_threshold=[0.5, 0.4], exit_layer=[1, 3], return_conf=True)
    tokens, layers, conf, _ = generate(model, idx, 12, attention_mask=mask, **kwargs)
    assert (layers == 1).any() and (layers == 3).any() and (layers == 5).any()
    for r, p in enumerate(prompts):
        alone, alone_layers, alone_conf, _ = generate(model, p[None], 12, **kwargs)
        assert torch.equal(tokens[r, idx.shape[1]:], alone[0, p.numel():]) and torch.equal(layers[r], alone_layers[0])
        torch.testing.assert_close(conf[r], alone_conf[0], rtol=1e-4, atol=1e-5)


def test_top_k_one_sampling_with_several_exits_is_greedy():
    """Sampling draws from the states of the exit each row left at (top_k=1: their argmax)."""
    model, (idx, _) = make_model(5, block_scale=2.0), batch(4, 6)
    greedy = generate(model, idx, 12, [0.5, 0.4], [1, 3])
    sampled = generate(model, idx, 12, [0.5, 0.4], [1, 3], temperature=0.7, top_k=1,
                       generator=torch.Generator().manual_seed(0))
    assert all((greedy[1] == e).any() for e in (1, 3, 5))
    assert torch.equal(greedy[0], sampled[0]) and torch.equal(greedy[1], sampled[1])


def test_speculative_drafts_from_the_first_exit():
    model, (idx, _) = make_model(4), batch(2, 5)
    config = UniversalConfig({4: 1.0}, exit_layers=[2, 3], routing_thresholds=[0.9, 0.9])
    several = generate(model, idx, 8, config=config, speculative=2, return_stats=True)
    first = generate(model, idx, 8, exit_layer=2, speculative=2, return_stats=True)
    assert torch.equal(several[0], first[0]) and torch.equal(several.stats["drafted_per_row"], first.stats["drafted_per_row"])
    assert torch.equal(several.stats["accepted_per_row"], first.stats["accepted_per_row"])


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,name", [
    (dict(exit_layer=[1, 3], routing_threshold=0.5), "exit_layer"),  # 3 is the final layer
    (dict(exit_layer=[0, 1]), "exit_layer"), (dict(exit_layer=[2, 1]), "exit_layer"),
    (dict(exit_layer=[1, 1]), "exit_layer"), (dict(exit_layer=[]), "exit_layer"),
    (dict(exit_layer=[1, 2], routing_threshold=[0.5]), "routing_threshold"),
    (dict(exit_layer=[1, 2], routing_threshold=[0.5, 1.5]), "routing_threshold"),
    (dict(confidence="entropy"), "confidence"), (dict(confidence="learned"), "confidence"),
])
@pytest.mark.parametrize("forward", FORWARDS + [generate])
def test_routing_bad_input_names_the_argument(forward, kwargs, name):
    model, (idx, _) = make_model(3), batch(2, 5)
    args = dict(exit_layer=[1, 2], routing_threshold=[0.5, 0.5]) | kwargs
    if forward is generate:
        args["max_new_tokens"] = 2
    with pytest.raises(ValueError, match=name):
        forward(model, idx, **args)


def test_evaluate_with_learned_confidence_needs_confidence_heads():
    trainer = trainer_for(3, confidence="learned")
    with pytest.raises(ValueError, match="confidence"):
        trainer.evaluate(make_model(3), [batch(2, 8)])


@pytest.mark.parametrize("kwargs,name", [
    (dict(exit_layers=[2, 1]), "exit_layers"), (dict(exit_layers=[1, 1]), "exit_layers"),
    (dict(exit_layers=[0, 1]), "exit_layers"), (dict(exit_layers=[]), "exit_layers"),
    (dict(exit_layers=[1, 2.5]), "exit_layers"),
    (dict(exit_layer=1, exit_layers=[2, 3]), "exit_layer"),
    (dict(exit_layers=[1, 2], routing_thresholds=[0.5]), "routing_thresholds"),
    (dict(routing_thresholds=[0.5, 0.5]), "routing_thresholds"),
    (dict(exit_layers=[1, 2], routing_thresholds=[0.5, -0.1]), "routing_thresholds"),
    (dict(exit_layers=[1, 2], routing_thresholds=[0.5, float("nan")]), "routing_thresholds"),
    (dict(confidence="entropy"), "confidence"),
    (dict(confidence_loss_weight=-1.0), "confidence_loss_weight"),
    (dict(confidence_loss_weight=float("inf")), "confidence_loss_weight"),
])
def test_config_bad_input_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        UniversalConfig({3: 1.0}, **kwargs)


def test_exits_out_of_range_for_the_model_are_refused():
    config = UniversalConfig({4: 1.0}, exit_layers=[2, 4], routing_thresholds=[0.9, 0.9])
    with pytest.raises(ValueError, match="exit_layers"):
        config.validate_for(4)
    UniversalConfig({4: 1.0}, exit_layers=[2, 4], routing_thresholds=[0.0, 0.0]).validate_for(4)  # no routing
    with pytest.raises(ValueError, match="exit_layers"):
        make_method(n_layers=4, exit_layers=[1, 5])


# ----------------------------------------------------------------------------- config and CLI
def test_config_defaults_round_trip_and_old_dicts():
    config = UniversalConfig({2: 0.5, 4: 0.5}, exit_layers=[1, 3], routing_thresholds=[0.9, 0.7],
                             confidence="learned", confidence_loss_weight=0.25)
    assert config.exit_layer == 1 and config.exits == [1, 3] and config.exit_thresholds == [0.9, 0.7]
    assert UniversalConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    plain = UniversalConfig({1: 1.0}, exit_layer=2, routing_threshold=0.8)
    assert plain.exits == [2] and plain.exit_thresholds == [0.8] and plain.confidence == "max_prob"
    assert plain.confidence_loss_weight == 0.0 and UniversalConfig({1: 1.0}).exit_layer == 1
    old = {k: v for k, v in plain.to_dict().items()
           if k not in ("exit_layers", "routing_thresholds", "confidence", "confidence_loss_weight")}
    assert UniversalConfig.from_dict(old) == plain


def test_make_method_puts_the_presets_exit_weight_on_the_first_exit():
    method = make_method("asymmetric_best", n_layers=6, exit_layers=[2, 4], routing_thresholds=[0.9, 0.8])
    assert method.exit_layer == 2 and method.layer_weights[2] == 0.7 and method.layer_weights[6] == 0.3
    assert method.exit_thresholds == [0.9, 0.8]


def test_cli_flags_build_the_method_and_resume_compares_them():
    argv = ["train", "--n-layers", "4", "--exit-layers", "1,3", "--routing-thresholds", "0.9,0.7",
            "--confidence", "margin"]
    args = build_parser().parse_args(argv)
    method = run_config_from_flags(args).method
    assert method.exits == [1, 3] and method.exit_thresholds == [0.9, 0.7] and method.confidence == "margin"
    changes = resume_changes(build_parser().parse_args(argv + ["--resume"]))
    assert changes["method.exit_layers"] == [1, 3] and changes["method.routing_thresholds"] == [0.9, 0.7]
    assert changes["method.confidence"] == "margin"
    sweep = build_parser().parse_args(["sweep", "--run", "r", "--routing-thresholds", "0,0.5"])
    assert sweep.sweep_thresholds == "0,0.5"  # sweep's old spelling (deprecated) still names the candidates


@pytest.mark.parametrize("flags,name", [(["--exit-layers", "1,x"], "--exit-layers"),
                                        (["--exit-layers", "2,1"], "exit_layers"),
                                        (["--exit-layers", "1,2", "--routing-thresholds", "0.5"],
                                         "routing_thresholds")])
def test_cli_bad_exit_flags_name_them(data, tmp_path, capsys, flags, name):  # noqa: F811
    assert main(["train", *tiny(data, tmp_path / "bad"), *flags]) == 2
    assert name in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_trains_and_resumes_with_several_exits(data, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "multi"
    flags = ["--exit-layers", "1,2", "--routing-thresholds", "0.3,0.2", "--confidence", "margin"]
    assert main(["train", *tiny(data, out), *flags, "--stop-at", "4"]) == 0
    assert main(["train", "--out", str(out), "--resume", "--no-progress", *flags]) == 0
    text = capsys.readouterr().out
    assert "exit_layers [1, 2], confidence margin" in text
    method = RunConfig.from_dict(json.loads((out / "config.json").read_text())).method
    assert method.exits == [1, 2] and method.exit_thresholds == [0.3, 0.2] and method.confidence == "margin"
    assert main(["train", "--out", str(out), "--resume", "--no-progress", "--exit-layers", "1"]) == 2
    assert "--exit-layers" in capsys.readouterr().err
