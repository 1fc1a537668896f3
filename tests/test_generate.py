"""Batched early-exit generation (fastexit.generate) against recomputation from scratch."""
import pytest
import torch

from fastexit import UniversalConfig
from fastexit.generate import Generation, generate
from fastexit.routing import compact_routed_forward, exact_routed_forward
from test_routing import VOCAB, batch, make_model, needs_triton, routed_reference


def greedy_reference(model, idx, steps):
    seq = idx
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def test_kv_cache_decoding_equals_recomputation():
    model, (idx, _) = make_model(3), batch(3, 7)
    tokens, exit_layers, *_ = generate(model, idx, 20)  # routing_threshold=None: full depth
    assert torch.equal(tokens, greedy_reference(model, idx, 20))
    assert torch.equal(generate(model, idx, 20, 0.0)[0], tokens)
    assert tokens.shape == (3, 27) and (exit_layers == 3).all()


@pytest.mark.parametrize("top_k", [None, 5])
def test_sampling_equals_recomputation(top_k):
    model, (idx, _) = make_model(3), batch(3, 5)
    temperature, seq = 0.8, idx
    tokens, *_ = generate(model, idx, 12, temperature=temperature, top_k=top_k,
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
        tokens, exit_layers, conf, _ = generate(model, idx, steps, threshold, exit_layer, return_conf=True)
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
    tokens, layers, *_ = generate(model, idx, 14, threshold, 1)
    for r in range(4):
        row_tokens, row_layers, *_ = generate(model, idx[r:r + 1], 14, threshold, 1)
        assert torch.equal(row_tokens[0], tokens[r]) and torch.equal(row_layers[0], layers[r])
    if threshold:
        assert (layers == 1).any() and (layers == 3).any()


def left_padded(prompts, pad_id=0):
    """Prompts of different lengths -> left-padded idx (B, T0) and attention_mask (B, T0)."""
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
    tokens, layers, conf, _ = generate(model, idx, 12, threshold, 1, attention_mask=mask, return_conf=True)
    for r, p in enumerate(prompts):
        alone, alone_layers, alone_conf, _ = generate(model, p[None], 12, threshold, 1, return_conf=True)
        assert torch.equal(tokens[r, idx.shape[1]:], alone[0, p.numel():]), f"row {r}"
        assert torch.equal(layers[r], alone_layers[0])
        torch.testing.assert_close(conf[r], alone_conf[0], rtol=1e-4, atol=1e-5)
    if threshold:
        assert (layers == 1).any() and (layers == 3).any()
    other_pads = generate(model, idx.masked_fill(~mask, 17), 12, threshold, 1, attention_mask=mask)
    assert torch.equal(other_pads[0][:, idx.shape[1]:], tokens[:, idx.shape[1]:])  # pad ids never matter


def test_all_true_attention_mask_is_the_plain_path():
    model, (idx, _) = make_model(3), batch(3, 6)
    plain = generate(model, idx, 8, 0.5, 1)
    masked = generate(model, idx, 8, 0.5, 1, attention_mask=torch.ones_like(idx, dtype=torch.bool))
    assert torch.equal(plain[0], masked[0]) and torch.equal(plain[1], masked[1])


def test_generation_returns_a_named_tuple_with_optional_parts_none_unless_asked():
    model, (idx, _) = make_model(3, block_scale=2.0), batch(2, 5)
    out = generate(model, idx, 6, 0.5, 1)
    assert isinstance(out, Generation) and out.tokens.shape == (2, 11) and out.layers_run.shape == (2, 6)
    assert out.conf is None and out.stats is None
    assert generate(model, idx, 6, 0.5, 1, return_conf=True).conf.shape == (2, 6)
    assert model.generate(idx, 6, speculative=2, return_stats=True).stats["acceptance_rate"] >= 0


def test_int_attention_mask_and_the_deprecated_prompt_mask_generate_alike():
    model = make_model(3, block_scale=2.0)
    idx, mask = left_padded([torch.randint(0, VOCAB, (n,)) for n in (5, 2)])
    ref = generate(model, idx, 6, 0.5, 1, attention_mask=mask)
    assert torch.equal(generate(model, idx, 6, 0.5, 1, attention_mask=mask.long()).tokens, ref.tokens)
    with pytest.warns(DeprecationWarning, match="prompt_mask"):
        old = generate(model, idx, 6, 0.5, 1, prompt_mask=mask)
    assert torch.equal(old.tokens, ref.tokens) and torch.equal(old.layers_run, ref.layers_run)


@needs_triton
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
    (dict(attention_mask=torch.ones(2, 4, dtype=torch.bool)), "attention_mask"),
    (dict(attention_mask=torch.ones(2, 5, dtype=torch.float32)), "attention_mask"),
    (dict(attention_mask=torch.tensor([[True] * 5, [True] * 4 + [False]])), "attention_mask"),  # right-padded
    (dict(attention_mask=torch.tensor([[True] * 5, [False, True, False, True, True]])), "attention_mask"),
    (dict(attention_mask=torch.ones(2, 5, dtype=torch.bool), prompt_mask=torch.ones(2, 5, dtype=torch.bool)),
     "attention_mask"),
])
def test_generate_bad_input(kwargs, name):
    model = make_model(3)
    args = dict(model=model, idx=torch.randint(0, VOCAB, (2, 5)), max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=name):
        generate(**args)


def test_routing_threshold_none_is_the_configs_and_full_depth_without_one():
    """None means the method's own threshold (config=), as in evaluate; no method: full depth."""
    model, (idx, _) = make_model(2, block_scale=10.0), batch(3, 6)
    threshold = 0.5
    config = UniversalConfig({1: 0.5, 2: 0.5}, exit_layer=1, routing_threshold=threshold)
    explicit = generate(model, idx, 8, threshold, 1)
    by_config = generate(model, idx, 8, config=config)
    assert torch.equal(by_config.tokens, explicit.tokens) and torch.equal(by_config.layers_run, explicit.layers_run)
    assert (explicit[1] == 1).any()  # some tokens left early, so the two calls below differ
    full = generate(model, idx, 8)
    assert (full[1] == 2).all() and torch.equal(generate(model, idx, 8, 0.0)[0], full[0])


@pytest.mark.parametrize("forward", [exact_routed_forward, compact_routed_forward])
def test_padded_routing_of_the_native_model_equals_rows_alone(forward):
    """attention_mask in routing goes through the block protocol, so the native model takes it too."""
    model = make_model(4, block_scale=4.0)
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (9, 4, 6)]
    idx, mask = left_padded(prompts)
    out = forward(model, idx, 1, 0.5, attention_mask=mask)
    assert out.easy[mask].any() and not out.easy[mask].all()
    for r, p in enumerate(prompts):
        alone = forward(model, p[None], 1, 0.5)
        assert torch.equal(out.easy[r, mask[r]], alone.easy[0]) and torch.equal(out.pred[r, mask[r]], alone.pred[0])
