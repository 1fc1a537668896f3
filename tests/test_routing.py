"""Routing (DESIGN §3): exact and compact routed forwards, and early-exit generation."""
import pytest
import torch

from fastexit.model import EarlyExitTransformer, ModelConfig
from fastexit.routing import compact_routed_forward, exact_routed_forward, generate

VOCAB, HEAD_SCALE = 97, 40.0  # a scaled-up random head spreads the confidences over (0, 1)


def make_model(n_layers, d_model=32, max_seq_len=64, block_scale=1.0):
    """Random model; ``block_scale`` > 1 lets every block move the residual stream a lot, so a
    wrong key or state in a deep block shows up in the predictions."""
    cfg = ModelConfig(vocab_size=VOCAB, n_layers=n_layers, d_model=d_model, n_heads=4,
                      max_seq_len=max_seq_len, tie_embeddings=False)
    model = EarlyExitTransformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
        for name, p in model.named_parameters():
            if name.endswith(("out_proj.weight", "fc_out.weight")):
                p.mul_(block_scale)
    return model


def batch(b=3, t=40):
    return torch.randint(0, VOCAB, (b, t)), torch.randint(0, VOCAB, (b, t))


def quantile_thresholds(model, idx, exit_layer):
    conf = exact_routed_forward(model, idx, exit_layer, 0.0).conf
    return conf.flatten().quantile(torch.tensor([0.25, 0.5, 0.75])).tolist()


@torch.no_grad()
def propagation_reference(model, idx, exit_layer, carried):
    """Plain CALM state propagation: every block runs densely on every position, but after
    exit_layer a position in ``carried`` (B, T) keeps its state. Exit-normed states (B, T, d)."""
    x = model.embed(idx)
    for block in model.blocks[:exit_layer]:
        x = block(x)
    h_exit = model.exit_norms[exit_layer - 1](x)
    for block in model.blocks[exit_layer:]:
        x = torch.where(carried[..., None], x, block(x))
    return h_exit, model.exit_norms[-1](x)


def fp64_stats(model, h, targets=None):
    logits = h.double() @ model.lm_head.weight.double().T  # (..., V)
    conf, pred = logits.softmax(-1).max(-1)
    nll = None if targets is None else logits.logsumexp(-1) - logits.gather(-1, targets[..., None]).squeeze(-1)
    return conf, pred, nll


def routed_reference(model, idx, targets, exit_layer, threshold, carried=None):
    """Predictions and NLL (B, T) of the routing rule on the reference states."""
    easy_default = torch.zeros_like(idx, dtype=torch.bool)
    h_exit, h_final = propagation_reference(model, idx, exit_layer, easy_default if carried is None else carried)
    (c_e, p_e, n_e), (_, p_f, n_f) = fp64_stats(model, h_exit, targets), fp64_stats(model, h_final, targets)
    easy = c_e >= threshold if threshold > 0 else easy_default
    nll = None if targets is None else torch.where(easy, n_e, n_f)
    return easy, torch.where(easy, p_e, p_f), nll, c_e


# ----------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("n_layers,exit_layer", [(2, 1), (4, 2)])
def test_exact_forward_matches_fp64_selection(n_layers, exit_layer):
    model, (idx, y) = make_model(n_layers), batch()
    for threshold in [0.0, *quantile_thresholds(model, idx, exit_layer)]:
        out = exact_routed_forward(model, idx, exit_layer, threshold, targets=y)
        easy, pred, nll, conf = routed_reference(model, idx, y, exit_layer, threshold)
        assert torch.equal(out.easy, easy) and torch.equal(out.pred, pred)
        torch.testing.assert_close(out.nll.double(), nll, atol=5e-4, rtol=1e-5)
        torch.testing.assert_close(out.conf.double(), conf, atol=1e-5, rtol=1e-5)
        assert torch.equal(out.layers_run, torch.where(easy, exit_layer, n_layers))
    assert out.easy.float().mean() == pytest.approx(0.25, abs=0.02)


def test_threshold_zero_disables_routing():
    model, (idx, y) = make_model(3), batch()
    for forward in (exact_routed_forward, compact_routed_forward):
        out = forward(model, idx, 1, 0.0, targets=y)
        assert not out.easy.any() and (out.layers_run == 3).all()
        assert torch.equal(out.pred, model(idx).argmax(-1))


@pytest.mark.parametrize("n_layers,exit_layer", [(2, 1), (4, 3)])
def test_compact_equals_exact_with_one_deeper_block(n_layers, exit_layer):
    """One block after the exit layer: its keys come from exact states, so compact is exact."""
    model, (idx, y) = make_model(n_layers), batch()
    for threshold in [0.0, *quantile_thresholds(model, idx, exit_layer), 1.0]:
        exact = exact_routed_forward(model, idx, exit_layer, threshold, targets=y)
        compact = compact_routed_forward(model, idx, exit_layer, threshold, targets=y)
        assert torch.equal(compact.easy, exact.easy) and torch.equal(compact.layers_run, exact.layers_run)
        assert torch.equal(compact.pred, exact.pred)
        torch.testing.assert_close(compact.nll, exact.nll, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(compact.conf, exact.conf)


def test_compact_equals_exact_when_no_token_is_easy():
    model, (idx, y) = make_model(4), batch()
    exact = exact_routed_forward(model, idx, 1, 1.0, targets=y)
    assert exact.conf.max() < 1.0
    compact = compact_routed_forward(model, idx, 1, 1.0, targets=y)
    assert not compact.easy.any() and torch.equal(compact.pred, exact.pred)
    torch.testing.assert_close(compact.nll, exact.nll, atol=1e-4, rtol=1e-5)


def test_compact_is_state_propagation_on_a_deeper_model():
    """4 layers, exit 1: compact equals plain state propagation (carried easy states)."""
    model, (idx, y) = make_model(4, block_scale=10.0), batch(4, 48)
    for threshold in quantile_thresholds(model, idx, 1):
        compact = compact_routed_forward(model, idx, 1, threshold, targets=y)
        easy, pred, nll, _ = routed_reference(model, idx, y, 1, threshold, carried=compact.easy)
        assert torch.equal(compact.easy, easy) and torch.equal(compact.pred, pred)
        torch.testing.assert_close(compact.nll.double(), nll, atol=5e-4, rtol=1e-5)


def test_compact_differs_modestly_from_exact_on_a_deeper_model():
    """4 layers, exit 1, random init: the carried keys of easy positions move the mean NLL
    by well under 2% and change few predictions."""
    model, (idx, y) = make_model(4), batch(4, 48)
    for threshold in quantile_thresholds(model, idx, 1):
        exact = exact_routed_forward(model, idx, 1, threshold, targets=y)
        compact = compact_routed_forward(model, idx, 1, threshold, targets=y)
        rel_nll = (compact.nll.mean() - exact.nll.mean()).abs() / exact.nll.mean()
        agree = (compact.pred == exact.pred).float().mean()
        print(f"threshold {threshold:.3f}: shallow {exact.easy.float().mean():.2f}, "
              f"mean nll rel diff {rel_nll:.2e}, pred agreement {agree:.3f}")
        assert torch.equal(compact.easy, exact.easy) and rel_nll < 0.02 and agree > 0.9


def test_compact_triton_backend_matches_torch():
    model, (idx, y) = make_model(3), batch(2, 24)
    threshold = quantile_thresholds(model, idx, 1)[1]
    ref = compact_routed_forward(model, idx, 1, threshold, targets=y, backend="torch")
    out = compact_routed_forward(model, idx, 1, threshold, targets=y, backend="triton")
    assert torch.equal(out.easy, ref.easy) and torch.equal(out.pred, ref.pred)
    torch.testing.assert_close(out.nll, ref.nll, atol=1e-4, rtol=1e-5)


def test_ignored_targets_get_zero_nll():
    model, (idx, y) = make_model(2), batch()
    y[:, ::3] = -100
    for forward in (exact_routed_forward, compact_routed_forward):
        out = forward(model, idx, 1, 0.3, targets=y)
        assert (out.nll[:, ::3] == 0).all() and (out.nll[:, 1::3] > 0).all()
        assert forward(model, idx, 1, 0.3).nll is None


@pytest.mark.parametrize("forward", [exact_routed_forward, compact_routed_forward])
@pytest.mark.parametrize("kwargs,name", [
    (dict(exit_layer=0), "exit_layer"), (dict(exit_layer=3), "exit_layer"),
    (dict(routing_threshold=-0.1), "routing_threshold"), (dict(routing_threshold=1.5), "routing_threshold"),
    (dict(targets=torch.zeros(3, 5, dtype=torch.int64)), "targets"),
    (dict(idx=torch.zeros(3, 40)), "idx"),
])
def test_routed_forward_bad_input(forward, kwargs, name):
    model, (idx, _) = make_model(3), batch()
    args = dict(model=model, idx=idx, exit_layer=1, routing_threshold=0.5) | kwargs
    with pytest.raises(ValueError, match=name):
        forward(**args)


# ----------------------------------------------------------------------------- generation
def greedy_reference(model, idx, steps):
    seq = idx
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def test_kv_cache_decoding_equals_recomputation():
    model, (idx, _) = make_model(3), batch(3, 7)
    tokens, exit_layers = generate(model, idx, 20)  # routing_threshold=None: full depth
    assert torch.equal(tokens, greedy_reference(model, idx, 20))
    assert torch.equal(generate(model, idx, 20, 0.0)[0], tokens)
    assert tokens.shape == (3, 27) and (exit_layers == 3).all()


@pytest.mark.parametrize("top_k", [None, 5])
def test_sampling_equals_recomputation(top_k):
    model, (idx, _) = make_model(3), batch(3, 5)
    temperature, seq = 0.8, idx
    tokens, _ = generate(model, idx, 12, temperature=temperature, top_k=top_k,
                         generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(12):
            logits = model(seq)[:, -1] / temperature
            if top_k is not None:
                logits[logits < logits.topk(top_k).values[:, -1:]] = float("-inf")
            seq = torch.cat([seq, torch.multinomial(logits.softmax(-1), 1, generator=gen)], dim=1)
    assert torch.equal(tokens, seq)


def routed_generation_reference(model, tokens, t0, exit_layer, threshold, easy_steps):
    """Token s re-derived from scratch: positions fed after the prompt are carried where their
    step was easy. Returns tokens (B, S), easy (B, S), conf (B, S)."""
    out, easy, conf = [], [], []
    for s in range(tokens.shape[1] - t0):
        seq = tokens[:, :t0 + s]
        carried = torch.zeros_like(seq, dtype=torch.bool)
        carried[:, t0:] = easy_steps[:, 1:s + 1]
        e, p, _, c = routed_reference(model, seq, None, exit_layer, threshold, carried)
        out.append(p[:, -1]), easy.append(e[:, -1]), conf.append(c[:, -1])
    return torch.stack(out, 1), torch.stack(easy, 1), torch.stack(conf, 1)


@pytest.mark.parametrize("n_layers,exit_layer", [(2, 1), (4, 1), (4, 2)])
def test_routed_generation_follows_the_rule(n_layers, exit_layer):
    model, (idx, _) = make_model(n_layers, block_scale=10.0), batch(3, 6)
    t0, steps = idx.shape[1], 16
    prefill = exact_routed_forward(model, torch.cat([idx, idx], 1), exit_layer, 0.0).conf
    for threshold in prefill.flatten().quantile(torch.tensor([0.3, 0.7])).tolist():
        tokens, exit_layers, conf = generate(model, idx, steps, threshold, exit_layer, return_conf=True)
        easy = exit_layers == exit_layer
        assert torch.equal(exit_layers, torch.where(conf >= threshold, exit_layer, n_layers))
        assert 0 < easy.float().mean() < 1
        ref_tokens, ref_easy, ref_conf = routed_generation_reference(model, tokens, t0, exit_layer, threshold, easy)
        torch.testing.assert_close(conf.double(), ref_conf, atol=1e-5, rtol=1e-5)
        assert torch.equal(easy, ref_easy) and torch.equal(tokens[:, t0:], ref_tokens)


def test_top_k_one_sampling_is_greedy_with_routing():
    model, (idx, _) = make_model(3), batch(3, 6)
    greedy = generate(model, idx, 10, 0.5, 1)
    sampled = generate(model, idx, 10, 0.5, 1, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy[0], sampled[0]) and torch.equal(greedy[1], sampled[1])


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_rows_exit_independently(threshold):
    model, (idx, _) = make_model(3), batch(4, 6)
    tokens, layers = generate(model, idx, 14, threshold, 1)
    for r in range(4):
        row_tokens, row_layers = generate(model, idx[r:r + 1], 14, threshold, 1)
        assert torch.equal(row_tokens[0], tokens[r]) and torch.equal(row_layers[0], layers[r])
    if threshold:
        assert (layers == 1).any() and (layers == 3).any()


def left_padded(prompts, pad_id=0):
    """Prompts of different lengths -> left-padded idx (B, T0) and prompt_mask (B, T0)."""
    t0 = max(p.numel() for p in prompts)
    idx = torch.full((len(prompts), t0), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(prompts), t0, dtype=torch.bool)
    for r, p in enumerate(prompts):
        idx[r, t0 - p.numel():], mask[r, t0 - p.numel():] = p, True
    return idx, mask


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_left_padded_rows_generate_what_they_would_alone(threshold):
    model = make_model(3, block_scale=2.0)
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (7, 3, 1, 5)]
    idx, mask = left_padded(prompts)
    tokens, layers, conf = generate(model, idx, 12, threshold, 1, prompt_mask=mask, return_conf=True)
    for r, p in enumerate(prompts):
        alone, alone_layers, alone_conf = generate(model, p[None], 12, threshold, 1, return_conf=True)
        assert torch.equal(tokens[r, idx.shape[1]:], alone[0, p.numel():]), f"row {r}"
        assert torch.equal(layers[r], alone_layers[0])
        torch.testing.assert_close(conf[r], alone_conf[0], rtol=1e-4, atol=1e-5)
    if threshold:
        assert (layers == 1).any() and (layers == 3).any()
    other_pads = generate(model, idx.masked_fill(~mask, 17), 12, threshold, 1, prompt_mask=mask)
    assert torch.equal(other_pads[0][:, idx.shape[1]:], tokens[:, idx.shape[1]:])  # pad ids never matter


def test_all_true_prompt_mask_is_the_plain_path():
    model, (idx, _) = make_model(3), batch(3, 6)
    plain = generate(model, idx, 8, 0.5, 1)
    masked = generate(model, idx, 8, 0.5, 1, prompt_mask=torch.ones_like(idx, dtype=torch.bool))
    assert torch.equal(plain[0], masked[0]) and torch.equal(plain[1], masked[1])


def test_generation_triton_backend_matches_torch():
    model, (idx, _) = make_model(3), batch(2, 5)
    ref = generate(model, idx, 6, 0.5, 1, backend="torch")
    out = generate(model, idx, 6, 0.5, 1, backend="triton")
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("kwargs,name", [
    (dict(routing_threshold=1.2), "routing_threshold"), (dict(routing_threshold=-0.5), "routing_threshold"),
    (dict(exit_layer=3, routing_threshold=0.5), "exit_layer"), (dict(exit_layer=0), "exit_layer"),
    (dict(idx=torch.zeros(2, 65, dtype=torch.int64)), "max_seq_len"),
    (dict(max_new_tokens=60), "max_new_tokens"),
    (dict(idx=torch.zeros(2, 0, dtype=torch.int64)), "idx"),
    (dict(idx=torch.zeros(2, 5, dtype=torch.int32)), "idx"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_k=VOCAB + 1), "top_k"),
    (dict(prompt_mask=torch.ones(2, 4, dtype=torch.bool)), "prompt_mask"),
    (dict(prompt_mask=torch.ones(2, 5, dtype=torch.int64)), "prompt_mask"),
    (dict(prompt_mask=torch.tensor([[True] * 5, [True] * 4 + [False]])), "prompt_mask"),  # right-padded
    (dict(prompt_mask=torch.tensor([[True] * 5, [False, True, False, True, True]])), "prompt_mask"),
])
def test_generate_bad_input(kwargs, name):
    model = make_model(3)
    args = dict(model=model, idx=torch.randint(0, VOCAB, (2, 5)), max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=name):
        generate(**args)
