"""Work that routing skips (docs/design.md §3): with a learned confidence compact mode and greedy
generation run the LM head only on the tokens leaving an exit (and at the end on those still
running); an exit whose threshold is 0 is not scored where nothing reads its score, in compact
mode and in generation. Outputs against exact_routed_forward where every routed state is
exact, else the dense state-propagation reference; the work by recording every LM-head pass
(``exit_confidence``) and confidence-head call."""
import pytest
import torch

import fastexit.generate as generation
import fastexit.routing as routing
from fastexit.generate import generate
from fastexit.kernels import exit_confidence
from fastexit.routing import compact_routed_forward, exact_routed_forward
from test_confidence_heads import fp64_confidence, with_heads
from test_generate import left_padded
from test_multi_exit import TINY, cascade_reference, fp64_of_states, gap_threshold, per_token
from test_routing import VOCAB, batch, make_model, needs_triton


@pytest.fixture
def head_rows(monkeypatch):
    """Row count of every LM-head pass of compact routing and generation, in call order."""
    rows = []

    def recording(hidden, *args, **kwargs):
        rows.append(hidden.shape[0])
        return exit_confidence(hidden, *args, **kwargs)
    monkeypatch.setattr(routing, "exit_confidence", recording)
    monkeypatch.setattr(generation, "exit_confidence", recording)
    return rows


def record_confidence_heads(monkeypatch, model):
    """The layers of every confidence-head call on ``model``, in call order."""
    layers, logit = [], model.confidence_heads.logit
    monkeypatch.setattr(model.confidence_heads, "logit", lambda layer, h: layers.append(layer) or logit(layer, h))
    return layers


def counts(at, layers):
    """Tokens (at: (B, T) layer each left at) ending at each of ``layers``, zeros dropped."""
    return [n for n in ((at == e).sum().item() for e in layers) if n]


def learned_thresholds(model, idx, exits, kinds, mask=None):
    """One threshold per exit: "some" halfway between two fp64 confidences of the exact states
    (near the median), "all" TINY, "none" 1.0, "off" 0."""
    states = model.exit_hidden_states(idx, exits, attention_mask=mask)
    fixed = {"all": TINY, "none": 1.0, "off": 0.0}
    return [fixed[k] if k in fixed else gap_threshold(fp64_confidence(model, e, h), 0.5)
            for e, h, k in zip(exits, states, kinds)]


# ----------------------------------------------------------------------------- outputs
# every routed state is exact: no token still running runs a block after the first one whose
# keys come from a state carried from an earlier exit (that block is exact, design.md §3)
EXACT_CASES = [([3], ["some"]), ([3], ["all"]), ([1], ["all"]), ([1], ["none"]), ([2, 3], ["some", "all"]),
               ([2, 3], ["all", "some"]), ([2, 3], ["none", "some"]), ([2, 3], ["off", "some"]),
               ([2, 3], ["none", "none"])]


@pytest.mark.parametrize("exits,kinds", EXACT_CASES)
@pytest.mark.parametrize("with_targets", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_learned_compact_equals_exact_where_the_states_are_exact(exits, kinds, with_targets, padded):
    model = with_heads(make_model(4, block_scale=4.0), exits, scale=0.5)
    if padded:
        idx, mask = left_padded([torch.randint(0, VOCAB, (n,)) for n in (30, 17, 24)])
    else:
        (idx, _), mask = batch(3, 30), None
    y = torch.randint(0, VOCAB, idx.shape) if with_targets else None
    if with_targets and padded:
        y[~mask] = -100  # pads are not scored
    thresholds = learned_thresholds(model, idx, exits, kinds, mask)
    kwargs = dict(targets=y, attention_mask=mask, confidence="learned")
    exact = exact_routed_forward(model, idx, exits, thresholds, **kwargs)
    out = compact_routed_forward(model, idx, exits, thresholds, **kwargs)
    assert exact.conf.max() < 1.0
    reached = torch.ones_like(exact.easy)  # the thresholds do what they say at each exit
    for e, k in zip(exits, kinds):
        here = exact.layers_run == e
        assert torch.equal(here, reached) if k == "all" else (here.any() or not reached.any()) if k == "some" \
            else not here.any()
        reached &= ~here
    assert torch.equal(out.layers_run, exact.layers_run) and torch.equal(out.easy, exact.easy)
    assert torch.equal(out.pred, exact.pred)
    torch.testing.assert_close(out.conf, exact.conf, atol=1e-6, rtol=1e-5)
    if with_targets:
        torch.testing.assert_close(out.nll, exact.nll, atol=1e-4, rtol=1e-5)
    else:
        assert out.nll is None


@pytest.mark.parametrize("with_targets", [True, False])
def test_learned_compact_with_two_exits_is_cascaded_state_propagation(with_targets):
    """Tokens leave at both exits and others run to the end: compact equals the dense reference
    in which every token keeps the state of the exit it left at."""
    model, (idx, y) = with_heads(make_model(5, block_scale=4.0), [1, 3]), batch(4, 40)
    y = y if with_targets else None
    thresholds = learned_thresholds(model, idx, [1, 3], ["some", "some"])
    out = compact_routed_forward(model, idx, [1, 3], thresholds, targets=y, confidence="learned")
    assert all((out.layers_run == e).any() for e in (1, 3, 5))
    states = cascade_reference(model, idx, out.layers_run, [1, 3, 5])
    ref = [fp64_of_states(model, h, y) for h in states]
    confs = [fp64_confidence(model, e, h) for e, h in zip([1, 3], states)]
    assert torch.equal(out.pred, per_token([r[2] for r in ref], [1, 3, 5], out.layers_run))
    torch.testing.assert_close(out.conf.double(), per_token(confs, [1, 3], out.layers_run), atol=1e-6, rtol=1e-5)
    if with_targets:
        torch.testing.assert_close(out.nll.double(), per_token([r[3] for r in ref], [1, 3, 5], out.layers_run),
                                   atol=5e-4, rtol=1e-5)


@needs_triton
def test_learned_compact_triton_backend_matches_torch():
    model, (idx, y) = with_heads(make_model(5, block_scale=4.0), [1, 3]), batch(2, 24)
    kwargs = dict(exit_layer=[1, 3], routing_threshold=learned_thresholds(model, idx, [1, 3], ["some", "some"]),
                  targets=y, confidence="learned")
    ref = compact_routed_forward(model, idx, backend="torch", **kwargs)
    out = compact_routed_forward(model, idx, backend="triton", **kwargs)
    assert all((ref.layers_run == e).any() for e in (1, 3, 5))
    assert torch.equal(out.layers_run, ref.layers_run) and torch.equal(out.pred, ref.pred)
    torch.testing.assert_close(out.conf, ref.conf)
    torch.testing.assert_close(out.nll, ref.nll, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- work: compact mode
@pytest.mark.parametrize("kinds", [["some", "some"], ["all", "some"], ["none", "none"], ["off", "some"]])
@pytest.mark.parametrize("with_targets", [True, False])
def test_learned_compact_runs_the_lm_head_only_where_tokens_stop(head_rows, monkeypatch, kinds, with_targets):
    """One LM-head pass per exit that tokens leave at, on those tokens alone, and one on the
    tokens that reach the final layer; the confidence head scores every exit that is on."""
    model, (idx, y) = with_heads(make_model(5, block_scale=4.0), [1, 3]), batch(3, 32)
    thresholds = learned_thresholds(model, idx, [1, 3], kinds)
    heads = record_confidence_heads(monkeypatch, model)
    out = compact_routed_forward(model, idx, [1, 3], thresholds, targets=y if with_targets else None,
                                 confidence="learned")
    assert head_rows == counts(out.layers_run, [1, 3, 5]) and sum(head_rows) == idx.numel()  # one pass per token
    assert heads == ([3] if kinds[0] == "off" else [1] if kinds[0] == "all" else [1, 3])
    assert len(head_rows) == (3 if kinds == ["some", "some"] else 2 if kinds == ["off", "some"] else 1)


def test_compact_does_not_score_an_off_exit_but_the_last(head_rows):
    """max_prob, exits 1 (off), 2 (on), 3 (off): exit 1 is not scored; exit 3 is, for every token
    reaching it (a hard token's conf is the last exit's), then the final head."""
    model, (idx, y) = make_model(5, block_scale=4.0), batch(3, 32)
    conf2 = exact_routed_forward(model, idx, 2, 0.0).conf
    thresholds = [0.0, gap_threshold(conf2, 0.5), 0.0]
    head_rows.clear()
    out = compact_routed_forward(model, idx, [1, 2, 3], thresholds, targets=y)
    hard = (out.layers_run == 5).sum().item()
    assert 0 < hard < idx.numel() and head_rows == [idx.numel(), hard, hard]
    conf3 = fp64_of_states(model, cascade_reference(model, idx, out.layers_run, [3])[0])[0]
    torch.testing.assert_close(out.conf[out.layers_run == 5].double(), conf3[out.layers_run == 5],
                               atol=1e-5, rtol=1e-5)


def test_learned_compact_scores_only_the_last_exit_without_routing(head_rows, monkeypatch):
    model, (idx, y) = with_heads(make_model(4), [1, 2]), batch(2, 16)
    exact = exact_routed_forward(model, idx, [1, 2], 0.0, targets=y, confidence="learned")
    heads = record_confidence_heads(monkeypatch, model)
    head_rows.clear()
    out = compact_routed_forward(model, idx, [1, 2], 0.0, targets=y, confidence="learned")
    assert heads == [2] and head_rows == [idx.numel()]
    assert torch.equal(out.pred, exact.pred) and not out.easy.any()
    torch.testing.assert_close(out.conf, exact.conf, atol=1e-6, rtol=1e-5)  # the last exit's


# ----------------------------------------------------------------------------- work: generation
def per_step_rows(layers, stages):
    """Expected LM-head rows of each generation step, flattened: for each stage (a list of
    layers), the rows whose step ended at one of them, where there are any."""
    rows = []
    for s in range(layers.shape[1]):
        rows += [n for n in (sum((layers[:, s] == e).sum().item() for e in stage) for stage in stages) if n]
    return rows


def generation_thresholds(model, idx, kinds, confidence="max_prob"):
    probe = torch.cat([idx, idx], 1)
    if confidence == "learned":
        return learned_thresholds(model, probe, [1, 3], kinds)
    stats = exact_routed_forward(model, probe, [1, 3], 0.0, all_layers=True).layer_stats
    return [0.0 if k == "off" else gap_threshold(stats[e].conf, 0.5) for e, k in zip([1, 3], kinds)]


@pytest.mark.parametrize("kinds,return_conf", [(["off", "some"], False), (["off", "some"], True),
                                               (["some", "off"], False), (["some", "off"], True)])
def test_generation_does_not_score_an_off_exit_nothing_reads(head_rows, kinds, return_conf):
    """max_prob, exits 1 and 3 of 5: an off exit gets no head pass, except the last exit when
    the confidences are returned (a row that runs to the end reports the last exit's)."""
    model, (idx, _) = make_model(5, block_scale=4.0), batch(3, 6)
    thresholds = generation_thresholds(model, idx, kinds)
    head_rows.clear()
    _, layers, *_ = generate(model, idx, 10, thresholds, [1, 3], return_conf=return_conf)
    assert (layers == 5).any() and (layers < 5).any()
    scored_last = kinds[1] == "some" or return_conf
    stages = [[1, 3, 5]] * (kinds[0] == "some") + [[3, 5]] * scored_last + [[5]]
    assert head_rows == per_step_rows(layers, stages)


@pytest.mark.parametrize("kinds,return_conf", [(["off", "some"], False), (["some", "off"], False),
                                               (["some", "off"], True)])
def test_learned_generation_does_not_score_an_off_exit_nothing_reads(head_rows, monkeypatch, kinds, return_conf):
    """Greedy with a learned confidence: an exit that is on runs the LM head for the picks of the
    rows leaving there; an off exit runs none, and its confidence head only where it is the
    last exit and the confidences are returned."""
    model, (idx, _) = with_heads(make_model(5, block_scale=4.0), [1, 3]), batch(3, 6)
    thresholds = generation_thresholds(model, idx, kinds, "learned")
    heads = record_confidence_heads(monkeypatch, model)
    _, layers, *_ = generate(model, idx, 10, thresholds, [1, 3], confidence="learned", return_conf=return_conf)
    assert (layers == 5).any() and (layers < 5).any()
    on = [[e] for e, k in zip([1, 3], kinds) if k == "some"]  # rows leaving at an exit that is on
    assert head_rows == per_step_rows(layers, on + [[5]])
    scored = [e for e, k in zip([1, 3], kinds) if k == "some" or (e == 3 and return_conf)]
    assert heads == [e for s in range(10) for e in scored if (layers[:, s] >= e).any()]


LEARNED_KINDS = [["some", "some"], ["all", "some"], ["none", "some"], ["some", "none"], ["none", "none"],
                 ["off", "some"]]


def check_kinds(layers, kinds):
    """The thresholds do what they say in generation: at each exit some steps leave ("some", where
    any reach it), every step that reaches it ("all"), or none ("none", "off")."""
    reached = torch.ones_like(layers, dtype=torch.bool)
    for e, k in zip([1, 3], kinds):
        here = layers == e
        assert torch.equal(here, reached) if k == "all" else (here.any() or not reached.any()) if k == "some" \
            else not here.any()
        reached &= ~here


@pytest.mark.parametrize("kinds", LEARNED_KINDS)
@pytest.mark.parametrize("return_conf", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_learned_greedy_generation_runs_the_lm_head_only_on_rows_leaving(head_rows, kinds, return_conf, padded):
    """Greedy with a learned confidence: each step runs one LM-head pass per exit that rows leave
    at, on those rows alone (their picks), and one on the rows reaching the final layer; a row
    gets exactly one pick per step, where it stops."""
    model = with_heads(make_model(5, block_scale=4.0), [1, 3])
    if padded:
        idx, mask = left_padded([torch.randint(0, VOCAB, (n,)) for n in (6, 2, 4)])
    else:
        (idx, _), mask = batch(3, 6), None
    thresholds = generation_thresholds(model, idx, kinds, "learned")
    head_rows.clear()
    _, layers, *_ = generate(model, idx, 10, thresholds, [1, 3], confidence="learned", return_conf=return_conf,
                             attention_mask=mask)
    check_kinds(layers, kinds)
    assert head_rows == per_step_rows(layers, [[1], [3], [5]]) and sum(head_rows) == layers.numel()


@pytest.mark.parametrize("return_conf", [False, True])
def test_learned_sampling_generation_runs_no_exit_confidence(head_rows, return_conf):
    """Sampling with a learned confidence draws from the head over each row's exit state once
    per step (model.lm_head); no exit_confidence pass runs at any exit."""
    model, (idx, _) = with_heads(make_model(5, block_scale=4.0), [1, 3]), batch(3, 6)
    thresholds = generation_thresholds(model, idx, ["some", "some"], "learned")
    head_rows.clear()
    _, layers, *_ = generate(model, idx, 10, thresholds, [1, 3], temperature=0.8, confidence="learned",
                             return_conf=return_conf, generator=torch.Generator().manual_seed(0))
    assert all((layers == e).any() for e in (1, 3, 5)) and head_rows == []


@pytest.mark.parametrize("kinds", LEARNED_KINDS)
@pytest.mark.parametrize("padded", [False, True])
def test_learned_greedy_picks_are_those_of_a_head_over_every_row(kinds, padded):
    """The picks from the leaving rows alone equal those of top_k=1 sampling, whose head runs on
    every row's exit state: tokens, exits and confidences bit for bit."""
    model = with_heads(make_model(5, block_scale=4.0), [1, 3])
    if padded:
        idx, mask = left_padded([torch.randint(0, VOCAB, (n,)) for n in (6, 2, 4)])
    else:
        (idx, _), mask = batch(3, 6), None
    kwargs = dict(routing_threshold=generation_thresholds(model, idx, kinds, "learned"), exit_layer=[1, 3],
                  confidence="learned", return_conf=True, attention_mask=mask)
    greedy = generate(model, idx, 10, **kwargs)
    sampled = generate(model, idx, 10, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(0), **kwargs)
    check_kinds(greedy[1], kinds)
    assert all(torch.equal(a, b) for a, b in zip(greedy[:3], sampled[:3]))


@pytest.mark.parametrize("kinds", [["some", "some"], ["all", "some"], ["none", "some"], ["some", "none"]])
def test_learned_greedy_generation_equals_recomputation(kinds):
    """Each step re-derived from scratch in fp64 (dense state propagation: every generated
    position keeps the state of the exit its step left at): its exit, its pick from that exit
    and its confidence at the deepest exit reached."""
    model, (idx, _) = with_heads(make_model(5, block_scale=4.0), [1, 3]), batch(3, 6)
    exits, L, t0, steps = [1, 3], 5, idx.shape[1], 10
    thresholds = generation_thresholds(model, idx, kinds, "learned")
    tokens, layers, conf, _ = generate(model, idx, steps, thresholds, exits, confidence="learned", return_conf=True)
    check_kinds(layers, kinds)
    for s in range(steps):
        at = torch.full((3, t0 + s), L)
        at[:, t0:] = layers[:, 1:s + 1]
        states = [h[:, -1] for h in cascade_reference(model, tokens[:, :t0 + s], at, [*exits, L])]
        confs = [fp64_confidence(model, e, h) for e, h in zip(exits, states)]
        step_at = torch.full((3,), L)
        for e, t, c in reversed(list(zip(exits, thresholds, confs))):
            step_at = torch.where(c >= t, e, step_at)
        preds = [fp64_of_states(model, h)[2] for h in states]
        assert torch.equal(layers[:, s], step_at)
        assert torch.equal(tokens[:, t0 + s], per_token(preds, [*exits, L], step_at))
        torch.testing.assert_close(conf[:, s].double(), per_token(confs, exits, step_at), atol=1e-6, rtol=1e-5)


@needs_triton
def test_learned_greedy_generation_triton_backend_matches_torch():
    model, (idx, _) = with_heads(make_model(5, block_scale=4.0), [1, 3]), batch(2, 5)
    kwargs = dict(routing_threshold=generation_thresholds(model, idx, ["some", "some"], "learned"), exit_layer=[1, 3],
                  confidence="learned", return_conf=True)
    ref = generate(model, idx, 6, backend="torch", **kwargs)
    out = generate(model, idx, 6, backend="triton", **kwargs)
    assert all((ref[1] == e).any() for e in (1, 3))
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    torch.testing.assert_close(out.conf, ref.conf)
