"""Mixture-of-Depths routed blocks (fastexit.mod, docs/design.md §10) against plain references:
each sequence alone, its top-k tokens (training) or its predictor's tokens (inference) run
through the block in a loop, no gathering into batches."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastexit import EarlyExitTransformer, ModelConfig, UniversalConfig, UniversalTrainer, from_hf, mod
from fastexit.config import RunConfig, TrainConfig, make_method
from fastexit.evaluate import evaluate
from fastexit.generate import generate
from fastexit.routing import compact_routed_forward, exact_routed_forward

V = 53


def native(mod_layers=(2, 4), capacity=0.5, n_layers=4, block_scale=3.0):
    """An fp64 native model with routed blocks whose routers score and predict at random."""
    model = EarlyExitTransformer(ModelConfig(V, n_layers=n_layers, d_model=32, n_heads=4, max_seq_len=32,
                                             tie_embeddings=False, mod_layers=list(mod_layers),
                                             mod_capacity=capacity)).double()
    return _randomised(model, block_scale)


def llama(mod_layers=(2, 4), capacity=0.5, n_layers=4):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = from_hf(transformers.LlamaForCausalLM(config).double())
    model.add_routers(list(mod_layers), capacity)
    return _randomised(model, 1.0)


def _randomised(model, block_scale):
    """Random router scores (no top-k ties), blocks that move the residual stream a lot, and
    predictors that pick about half the tokens of a random batch."""
    with torch.no_grad():
        for router in model.mod_routers.values():
            router.score.weight.normal_(0, 1.0)
        for name, p in model.named_parameters():
            if name.endswith(("out_proj.weight", "fc_out.weight")):
                p.mul_(block_scale)
        x = model.embed(torch.randint(0, V, (4, 16)))
        for i in range(1, model.n_layers + 1):
            if str(i) in model.mod_routers:
                router = model.mod_routers[str(i)]
                router.predictor[2].bias -= router.predict(x).median()
            x = mod.run_block(model.eval(), i, x)
    return model.train()


# rotary angles are fp32 in transformers and in our adapter: positions that differ (padding offsets,
# transformers' own rotary embedding) agree to fp32 rounding only
ROTARY_TOLERANCE = dict(rtol=1e-6, atol=1e-6)


KINDS = {"native": native, "llama": llama}


def twin(model, make):
    """A second model with model's weights (the reference runs on it: separate gradients)."""
    other = make()
    other.load_state_dict(model.state_dict())
    return other.train(model.training)


# ----------------------------------------------------------------------------- the references
def routed_block_reference(block, router, x, chosen, update=None):
    """A routed block on x (B, T, d), one sequence at a time: its chosen (B, T) tokens alone
    run the block, at their own positions, attending among themselves; the others (and those
    not in ``update``) keep their states."""
    rows = []
    for b in range(x.shape[0]):
        cols = chosen[b].nonzero().squeeze(1)
        row = x[b]
        if len(cols):
            xs = x[b:b + 1, cols]
            y = block(xs, None, cols[None])
            new = xs + 2 * torch.sigmoid(xs @ router.score.weight[0])[..., None] * (y - xs)
            keep = torch.ones_like(cols, dtype=torch.bool) if update is None else update[b, cols]
            row = row.index_put((cols[keep],), new[0, keep])
        rows.append(row)
    return torch.stack(rows)


def reference_states(model, idx, layers, capacity, attention_mask=None):
    """Training-mode exit states of each sequence alone (its real tokens only): at a routed
    block the top ceil(capacity * n) router scores of its n tokens run it. Returns the states
    (B, T, d) at the real positions (zeros at pads) and the predictors' mean BCE, summed over
    the routed blocks."""
    B, T = idx.shape
    real = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    out = [torch.zeros(B, T, model.cfg.d_model, dtype=torch.float64) for _ in layers]
    bce = {}
    for b in range(B):
        cols = real[b].nonzero().squeeze(1)
        x = model.embed(idx[b:b + 1, cols])
        for i, block in enumerate(model.blocks, start=1):
            router = model.mod_routers[str(i)] if str(i) in model.mod_routers else None
            if router is None:
                x = block(x)
            else:
                r = x[0] @ router.score.weight[0]
                top = r.topk(math.ceil(capacity * len(cols))).indices.sort().values
                chosen = torch.zeros(1, len(cols), dtype=torch.bool).index_fill(1, top, True)
                logit = router.predictor(F.rms_norm(x.detach(), x.shape[-1:]))[..., 0]
                bce[i] = bce.get(i, 0) + F.binary_cross_entropy_with_logits(logit, chosen.double(), reduction="sum")
                x = routed_block_reference(block, router, x, chosen)
            if i in layers:
                out[layers.index(i)] = out[layers.index(i)].index_put((torch.tensor([b]), cols),
                                                                      model.exit_norms[i - 1](x)[0])
    return out, sum(bce.values()) / real.sum()


def inference_reference(model, idx, exit_layer=None, carried=None):
    """Inference states of plain per-token decisions: each routed block runs the tokens its
    predictor picks (from their current states); after ``exit_layer`` tokens in ``carried``
    (B, T) keep their states but still give keys where picked (state propagation). Returns
    the exit states (B, T, d) of every layer and {layer: chosen (B, T)}."""
    x, states, routes = model.embed(idx), [], {}
    for i, block in enumerate(model.blocks, start=1):
        update = None if carried is None or exit_layer is None or i <= exit_layer else ~carried
        router = model.mod_routers[str(i)] if str(i) in model.mod_routers else None
        if router is None:
            new = block(x)
            x = new if update is None else torch.where(update[..., None], new, x)
        else:
            routes[i] = router.predictor(F.rms_norm(x, x.shape[-1:]))[..., 0] > 0
            x = routed_block_reference(block, router, x, routes[i], update)
        states.append(model.exit_norms[i - 1](x))
    return states, routes


def padded_batch(lengths, T):
    idx = torch.randint(1, V, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = True  # left padding
    return idx, mask


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", KINDS)
def test_capacity_one_with_unit_router_weights_is_the_dense_block(kind):
    """A zero router weighs every update by 2 * sigmoid(0) = 1; at capacity 1 every token
    runs the block: values and gradients of the dense model's."""
    routed = KINDS[kind](capacity=1.0).train()
    with torch.no_grad():
        for router in routed.mod_routers.values():
            router.score.weight.zero_()
    dense = KINDS[kind](capacity=1.0).train()
    dense.load_state_dict(routed.state_dict())
    del dense.mod_routers
    idx = torch.randint(0, V, (3, 11))
    got, want = routed.exit_hidden_states(idx, [2, 4]), dense.exit_hidden_states(idx, [2, 4])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    probe = [torch.randn_like(g) for g in got]
    sum((g * p).sum() for g, p in zip(got, probe)).backward()
    sum((w * p).sum() for w, p in zip(want, probe)).backward()
    grads = dict(dense.named_parameters())
    for name, p in routed.named_parameters():
        if not name.startswith("mod_routers") and p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in routed.mod_routers.parameters())


@pytest.mark.parametrize("capacity", [0.5, 0.3])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_top_k_gather_and_scatter_equal_each_sequence_alone(kind, padded, capacity):
    """Values and every gradient (blocks, routers' scores and predictors) of the batched,
    gathered training forward against a loop over sequences, with left padding."""
    model = KINDS[kind](capacity=capacity).train()
    ref = twin(model, lambda: KINDS[kind](capacity=capacity))
    lengths = [11, 7, 4] if padded else [11, 11, 11]
    idx, mask = padded_batch(lengths, 11)
    layers = [1, 2, 4]
    got = model.exit_hidden_states(idx, layers, attention_mask=mask if padded else None)
    want, bce = reference_states(ref, idx, layers, capacity, mask)
    probe = [torch.randn_like(g) for g in got]
    tolerance = ROTARY_TOLERANCE if kind == "llama" and padded else dict(rtol=1e-9, atol=1e-10)
    for g, w in zip(got, want):
        torch.testing.assert_close(g[mask], w[mask], **tolerance)
    sum((g * p)[mask].sum() for g, p in zip(got, probe)).backward()  # + the predictors' BCE, inside the backward
    (sum((w * p)[mask].sum() for w, p in zip(want, probe)) + bce).backward()
    reference_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        q = reference_grads[name].grad
        if p.grad is None:
            assert q is None or not q.any(), name
            continue
        tolerance = ROTARY_TOLERANCE if kind == "llama" and padded else dict(rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(p.grad, torch.zeros_like(p) if q is None else q, **tolerance, msg=name)
    assert model.mod_routers["2"].score.weight.grad.abs().sum() > 0  # the router learns from the LM loss


@pytest.mark.parametrize("kind", KINDS)
def test_a_routed_block_runs_on_the_top_k_tokens_only(kind):
    model = KINDS[kind](capacity=0.25).train()
    shapes = []
    model.blocks[1].register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape[:2])))
    model.exit_hidden_states(torch.randint(0, V, (3, 16)), [4])
    assert shapes == [(3, 4)]  # ceil(0.25 * 16) tokens of each sequence
    model.eval()
    routes = {}
    model.exit_hidden_states(torch.randint(0, V, (3, 16)), [4], routes=routes)
    assert shapes[1] == (3, int(routes[2].chosen.sum(1).max()))  # inference: the predictor's tokens


def test_rotary_positions_of_gathered_tokens_are_their_own():
    """A routed Llama layer equals transformers' own decoder layer run on the gathered tokens
    with position_ids = their columns; rotating them at their slots in the gathered batch
    (0, 1, 2, ...) gives something else."""
    transformers = pytest.importorskip("transformers")
    model = llama(mod_layers=(1,), capacity=0.5, n_layers=2).train()
    with torch.no_grad():  # sharp attention: where the keys sit matters
        for proj in (model.hf.model.layers[0].self_attn.q_proj, model.hf.model.layers[0].self_attn.k_proj):
            proj.weight.mul_(10.0)
    idx = torch.randint(0, V, (2, 12))
    x = model.embed(idx)
    routes = {}
    got = mod.run_block(model, 1, x, routes=routes)
    chosen = routes[1].chosen
    layer, router = model.hf.model.layers[0], model.mod_routers["1"]
    cols = torch.stack([row.nonzero().squeeze(1) for row in chosen])  # (B, 6): equal counts without padding
    xs = torch.stack([x[b, cols[b]] for b in range(2)])

    def hf_layer(positions):
        mask = torch.full((6, 6), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1)[None, None]
        model.hf.config._attn_implementation = "eager"
        emb = model.hf.model.rotary_emb(xs, positions)
        y = layer(xs, attention_mask=mask, position_ids=positions, position_embeddings=emb)
        y = y[0] if isinstance(y, tuple) else y
        return xs + 2 * torch.sigmoid(xs @ router.score.weight[0])[..., None] * (y - xs)

    want = torch.stack([x[b].index_put((cols[b],), hf_layer(cols)[b]) for b in range(2)])
    torch.testing.assert_close(got, want, **ROTARY_TOLERANCE)
    slots = torch.arange(6)[None].expand(2, 6)
    wrong = torch.stack([x[b].index_put((cols[b],), hf_layer(slots)[b]) for b in range(2)])
    assert (cols != slots).any() and (got - wrong).abs().max() > 1e-3  # a thousand times the tolerance


# ----------------------------------------------------------------------------- inference
@pytest.mark.parametrize("kind", KINDS)
def test_set_predictor_shares_makes_inference_pick_the_capacity(kind):
    """The untuned baseline: each predictor's bias shifted so that inference on the same tokens
    runs each routed block on its capacity's share of them (to one token: the quantile lies
    between two tokens' logits)."""
    model = KINDS[kind](capacity=0.25).eval()
    idx = torch.randint(0, V, (3, 13))
    mod.set_predictor_shares(model, idx)
    routes = {}
    with torch.no_grad():
        model.exit_hidden_states(idx, [4], routes=routes)
    for i in (2, 4):
        assert abs(routes[i].chosen.float().mean().item() - 0.25) <= 1 / idx.numel() + 1e-12, i


@pytest.mark.parametrize("kind", KINDS)
def test_inference_routes_each_token_by_its_predictor(kind):
    model = KINDS[kind]().eval()
    idx = torch.randint(0, V, (3, 13))
    routes = {}
    with torch.no_grad():
        got = model.exit_hidden_states(idx, [1, 2, 3, 4], routes=routes)
        want, want_routes = inference_reference(model, idx)
    for i in (2, 4):
        assert torch.equal(routes[i].chosen, want_routes[i])
        assert 0 < routes[i].chosen.float().mean() < 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_no_look_ahead_in_evaluation(kind):
    """Changing the tokens from position t on changes no earlier token's route or output, in
    exact and compact evaluation (with an exit before the routed blocks)."""
    model = KINDS[kind]().eval()
    idx = torch.randint(0, V, (3, 16))
    later = idx.clone()
    later[:, 9:] = torch.randint(0, V, (3, 7))
    for forward, threshold in ((exact_routed_forward, 0.0), (compact_routed_forward, 0.0),
                               (compact_routed_forward, 0.05), (exact_routed_forward, 0.05)):
        a, b = (forward(model, t, 1, threshold, targets=idx) for t in (idx, later))
        for i in (2, 4):
            assert torch.equal(a.mod_routes[i].chosen[:, :9], b.mod_routes[i].chosen[:, :9])
        assert torch.equal(a.layers_run[:, :9], b.layers_run[:, :9]) and torch.equal(a.pred[:, :9], b.pred[:, :9])
        torch.testing.assert_close(a.nll[:, :9], b.nll[:, :9], rtol=1e-9, atol=1e-9)
        assert not torch.equal(a.mod_routes[2].chosen, b.mod_routes[2].chosen) or threshold  # the future did change


def test_compact_routing_is_state_propagation_through_routed_blocks():
    """Exit at 1, routed blocks 2 and 4: tokens that left keep their state and give keys to
    the routed blocks that pick them; compact mode equals the per-token reference."""
    model = native(block_scale=1.0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # spread the confidences
    idx = torch.randint(0, V, (3, 16))
    for threshold in (0.2, 0.5):
        out = compact_routed_forward(model, idx, 1, threshold, targets=idx)
        assert 0 < out.easy.float().mean() < 1
        with torch.no_grad():
            states, routes = inference_reference(model, idx, 1, out.easy)
        pred = torch.where(out.easy, model.lm_head(states[0]).argmax(-1), model.lm_head(states[-1]).argmax(-1))
        assert torch.equal(out.pred, pred)
        for i in (2, 4):
            assert torch.equal(out.mod_routes[i].chosen, routes[i])


@pytest.mark.parametrize("batch", [3, 1])  # one row: each decode step of a routed block is all or nothing
@pytest.mark.parametrize("kind", KINDS)
def test_cached_generation_equals_evaluation_of_the_same_routes(kind, batch):
    model = KINDS[kind](n_layers=5).eval()
    idx = torch.randint(0, V, (batch, 6))
    # exit 4 (after both routed blocks) is scored but never left at: its confidence (fp32) tests
    # the states themselves, router weights included, beyond the greedy tokens
    gen = generate(model, idx, 10, 0.0, 4, return_routes=True, return_conf=True)
    routes = {}
    with torch.no_grad():
        at_4, final = model.exit_hidden_states(gen.tokens[:, :-1], [4, 5], routes=routes)
    assert torch.equal(gen.tokens[:, 6:], model.lm_head(final)[:, 5:].argmax(-1))
    conf = model.lm_head(at_4)[:, 5:].softmax(-1).amax(-1)
    torch.testing.assert_close(gen.conf.double(), conf, rtol=1e-5, atol=1e-6)
    for i in (2, 4):
        assert torch.equal(gen.stats["mod_routes"][i], routes[i].chosen)
        assert 0 < routes[i].chosen.float().mean() < 1
    prompt = idx.clone()
    prompt[:, 4:] = torch.randint(0, V, (batch, 2))  # no look-ahead in the prefill either
    other = generate(model, prompt, 1, 0.0, 4, return_routes=True)
    for i in (2, 4):
        assert torch.equal(other.stats["mod_routes"][i][:, :4], gen.stats["mod_routes"][i][:, :4])


def test_left_padded_generation_of_routed_blocks_is_each_row_alone():
    model = native().eval()
    prompts = [torch.randint(1, V, (n,)) for n in (7, 3, 5)]
    idx = torch.stack([torch.cat([torch.zeros(7 - len(p), dtype=torch.long), p]) for p in prompts])
    mask = idx != 0
    for threshold in (0.0, 0.05):
        batch = generate(model, idx, 8, threshold, 1, attention_mask=mask)
        for b, p in enumerate(prompts):
            alone = generate(model, p[None], 8, threshold, 1)
            assert torch.equal(batch.tokens[b, 7:], alone.tokens[0, len(p):])
            assert torch.equal(batch.layers_run[b], alone.layers_run[0])


def test_routed_blocks_skip_rows_in_generation():
    """A decode step runs a routed block's projections and MLP on the chosen rows only: on
    some rows (gathered), on every row (the dense step) or on none."""
    model = native().eval()
    calls, seen = [], set()
    mlp = model.blocks[1].mlp
    mlp.forward = (lambda f: lambda a: calls.append(a.numel() // a.shape[-1]) or f(a))(mlp.forward)
    for seed in range(4):
        torch.manual_seed(seed)
        calls.clear()
        gen = generate(model, torch.randint(0, V, (4, 5)), 6, return_routes=True)
        chosen = gen.stats["mod_routes"][2][:, 5:].sum(0).tolist()  # the decode steps' positions
        assert calls[1:] == [c for c in chosen if c]  # calls[0]: the prefill
        seen |= set(chosen)
    assert {0, 4} <= seen and seen - {0, 4}  # the three kinds of step ran


# ----------------------------------------------------------------------------- metrics and FLOPs
def test_evaluate_reports_agreement_ratio_and_counts_skipped_blocks():
    model = native(capacity=0.5)
    batches = [(torch.randint(0, V, (2, 12)), torch.randint(0, V, (2, 12))) for _ in range(2)]
    stats = evaluate(model, batches)
    routes = [exact_routed_forward(model.eval(), x, 1, 0.0).mod_routes for x, _ in batches]
    for i in (2, 4):
        chosen = torch.cat([r[i].chosen for r in routes])
        top = torch.cat([r[i].top_k for r in routes])
        assert stats[f"mod_ratio_L{i}"] == pytest.approx(chosen.double().mean().item())
        assert stats[f"mod_agreement_L{i}"] == pytest.approx((chosen == top).double().mean().item())
        assert top.sum(1).eq(6).all()  # top-k: ceil(0.5 * 12) of each sequence
    skipped = sum((~torch.cat([r[i].chosen for r in routes])).double().sum() for i in (2, 4))
    assert stats["compute_cost"] == pytest.approx(1 - skipped.item() / (48 * 4))
    # FLOPs by hand: a routed block costs its router and predictor, plus the block for a chosen
    # token, which attends to the chosen tokens up to it
    d, T = 32, 12
    block = 2 * sum(p.numel() for p in model.blocks[0].parameters() if p.dim() == 2)
    router = 2 * sum(p.numel() for p in model.mod_routers["2"].parameters() if p.dim() == 2)
    full = routed = 0.0
    for r in routes:
        for b in range(2):
            for t in range(T):
                full += 4 * (block + 4 * d * (t + 1)) + 2 * d * V
                routed += 2 * (block + 4 * d * (t + 1)) + 2 * d * V
                for i in (2, 4):
                    chosen = r[i].chosen[b]
                    routed += router + (block + 4 * d * int(chosen[:t + 1].sum()) if chosen[t] else 0)
    assert stats["flop_cost"] == pytest.approx(routed / full)


# ----------------------------------------------------------------------------- composition
def test_weighted_losses_several_exits_and_learned_confidence_compose():
    model = native(mod_layers=(2, 3), capacity=0.5)
    method = UniversalConfig({1: 0.3, 2: 0.3, 4: 0.4}, exit_layers=[1, 2], routing_thresholds=[0.6, 0.6],
                             confidence="learned", confidence_loss_weight=0.5)
    trainer = UniversalTrainer(method, V)
    optimizer = trainer.create_optimizer(model, 1e-2)
    x = torch.randint(0, V, (3, 12))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = trainer.compute_loss(model, x, x)
    loss.backward()
    optimizer.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("confidence_heads") for n in moved)
    assert any(".predictor." in n for n in moved) and any(".score." in n for n in moved)
    for mode in ("exact", "compact"):
        stats = trainer.evaluate(model, [(x, x)], mode)
        assert {"mod_agreement_L2", "mod_ratio_L3", "exit_ratio_L2"} <= stats.keys()
    gen = generate(model.eval(), x[:, :4], 5, config=method)
    assert set(gen.layers_run.unique().tolist()) <= {1, 2, 4}


def test_layer_dropout_composes_with_routed_blocks():
    model = native().train()
    idx = torch.randint(0, V, (4, 10))
    drops = [[False] * 4, [True, False, True, False], [False] * 4, [True] * 4]
    got, = model.exit_hidden_states(idx, [4], drops=drops)
    for b in range(4):
        row = [[d[b]] for d in drops]
        alone, = model.exit_hidden_states(idx[b:b + 1], [4], drops=row)
        torch.testing.assert_close(got[b], alone[0], rtol=1e-9, atol=1e-10)


def test_predictor_learns_the_top_k_decision():
    """A few hundred steps on a fixed batch: the predictors agree with top-k on most tokens."""
    torch.manual_seed(0)
    model = EarlyExitTransformer(ModelConfig(V, n_layers=2, d_model=32, n_heads=4, max_seq_len=32,
                                             mod_layers=[2], mod_capacity=0.25))
    trainer = UniversalTrainer(UniversalConfig({2: 1.0}, routing_threshold=0), V)
    batches = [(torch.randint(0, V, (8, 16)),) * 2 for _ in range(4)]
    trainer.fit(model, iter(batches * 60), 240, 3e-3, progress_bar=False)
    stats = trainer.evaluate(model, batches)
    assert stats["mod_agreement_L2"] > 0.8 and 0.1 < stats["mod_ratio_L2"] < 0.45


def test_defaults_leave_config_weights_and_init_unchanged():
    plain = ModelConfig(V, n_layers=4, d_model=32, n_heads=4)
    assert "mod_layers" not in plain.to_dict() and ModelConfig.from_dict(plain.to_dict()) == plain
    routed = ModelConfig(V, n_layers=4, d_model=32, n_heads=4, mod_layers=[2, 4], mod_capacity=0.125)
    assert ModelConfig.from_dict(routed.to_dict()) == routed
    torch.manual_seed(3)
    a = EarlyExitTransformer(plain)
    torch.manual_seed(3)
    b = EarlyExitTransformer(routed)
    assert not hasattr(a, "mod_routers")
    extra = set(b.state_dict()) - set(a.state_dict())
    assert extra and all(k.startswith("mod_routers.") for k in extra)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,name", [
    (dict(mod_layers=[2], mod_capacity=0.0), "mod_capacity"),
    (dict(mod_layers=[2], mod_capacity=1.5), "mod_capacity"),
    (dict(mod_layers=[2], mod_capacity=float("nan")), "mod_capacity"),
    (dict(mod_layers=[2], mod_capacity=True), "mod_capacity"),
    (dict(mod_capacity=0.5), "mod_layers"),
    (dict(mod_layers=[0, 2]), "mod_layers"),
    (dict(mod_layers=[2, 5]), "mod_layers"),
    (dict(mod_layers=[3, 2]), "mod_layers"),
    (dict(mod_layers=[2, 2]), "mod_layers"),
    (dict(mod_layers=[]), "mod_layers"),
    (dict(mod_layers="2,4"), "mod_layers"),
])
def test_bad_mod_settings_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=f"ModelConfig.{name}"):
        ModelConfig(V, n_layers=4, d_model=32, n_heads=4, **kwargs)


def test_refused_combinations_name_the_argument():
    model = native().eval()
    idx = torch.randint(0, V, (2, 5))
    with pytest.raises(ValueError, match="speculative"):
        generate(model, idx, 4, speculative=2)
    with pytest.raises(ValueError, match="return_routes"):
        generate(native(mod_layers=(2,)).eval().__class__(ModelConfig(V, n_layers=2, d_model=32, n_heads=4)), idx, 2,
                 return_routes=True)
    with pytest.raises(ValueError, match="capacity"):
        model.add_routers([1], 0.0)
    with pytest.raises(ValueError, match="layers"):
        model.add_routers([5], 0.5)
    routed = ModelConfig(V, n_layers=4, d_model=32, n_heads=4, max_seq_len=32, mod_layers=[2])
    with pytest.raises(ValueError, match="mod_layers"):
        RunConfig("t", make_method(n_layers=4), routed, TrainConfig(seq_len=32), hf_model="/some/folder")
