import pytest
import torch
import torch.nn.functional as F

from fastexit import EarlyExitTransformer, ModelConfig

V = 97


def small_model(**kw):
    cfg = ModelConfig(vocab_size=V, n_layers=kw.pop("n_layers", 3), d_model=32, n_heads=4, max_seq_len=24, **kw)
    return EarlyExitTransformer(cfg)


def reference_forward(model, idx):
    """Every exit's logits, written out from the model's parameters with plain ops."""
    T = idx.shape[1]
    x = model.tok_emb.weight[idx] + model.pos_emb.weight[:T]
    outs = []
    for block, norm in zip(model.blocks, model.exit_norms):
        a = block.attn
        h = F.rms_norm(x, (x.shape[-1],), block.attn_norm.weight, block.attn_norm.eps)
        q = h @ a.q_proj.weight.T
        k, v = (h @ a.kv_proj.weight.T).chunk(2, dim=-1)
        heads = lambda t: t.view(*t.shape[:2], a.n_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        y = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + y.transpose(1, 2).reshape(x.shape) @ a.out_proj.weight.T
        h = F.rms_norm(x, (x.shape[-1],), block.mlp_norm.weight, block.mlp_norm.eps)
        x = x + F.gelu(h @ block.mlp.fc_in.weight.T, approximate="tanh") @ block.mlp.fc_out.weight.T
        outs.append(F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps) @ model.lm_head.weight.T)
    return outs


def test_exit_logits_match_reference():
    model = small_model()
    idx = torch.randint(0, V, (2, 11))
    expected = reference_forward(model, idx)
    got = model.exit_logits(idx, [1, 2, 3])
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(idx), expected[-1], rtol=1e-4, atol=1e-5)


def test_exit_hidden_states_runs_no_deeper_block():
    model = small_model(n_layers=4)
    calls = []
    for i, block in enumerate(model.blocks, start=1):
        block.register_forward_hook(lambda m, args, out, i=i: calls.append(i))
    states = model.exit_hidden_states(torch.randint(0, V, (2, 5)), [2, 1])
    assert calls == [1, 2]
    assert [s.shape for s in states] == [(2, 5, 32)] * 2


def test_causal():
    model = small_model()
    idx = torch.randint(0, V, (1, 10))
    changed = idx.clone()
    changed[0, 7] = (idx[0, 7] + 1) % V
    torch.testing.assert_close(model(idx)[:, :7], model(changed)[:, :7])
    assert not torch.allclose(model(idx)[:, 7], model(changed)[:, 7])


def test_tied_and_untied_head():
    tied, untied = small_model(), small_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert tied.lm_head.weight.shape == (V, 32)
    # Untied: the extra [V, d] embedding is not counted as compute-bearing.
    assert tied.num_params() == untied.num_params()
    assert untied.num_params(non_embedding=False) == tied.num_params(non_embedding=False) + V * 32


def test_num_params_counts_shared_once():
    model = small_model()
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params(non_embedding=False) == sum(unique.values())
    assert model.num_params() == sum(unique.values()) - 24 * 32


@pytest.mark.parametrize("idx, match", [
    (torch.zeros(2, 5), "idx must be an int64 tensor"),
    (torch.zeros(5, dtype=torch.long), "idx must be an int64 tensor"),
    (torch.zeros(1, 25, dtype=torch.long), "25 positions.*max_seq_len=24"),
    (torch.zeros(1, 0, dtype=torch.long), "non-empty"),
])
def test_bad_idx(idx, match):
    with pytest.raises(ValueError, match=match):
        small_model()(idx)


@pytest.mark.parametrize("layers", [[], [0], [4], [1.0]])
def test_bad_layers(layers):
    with pytest.raises(ValueError, match="layers must be"):
        small_model().exit_hidden_states(torch.zeros(1, 3, dtype=torch.long), layers)


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(vocab_size=10, d_model=30, n_heads=4), "divisible by n_heads"),
    (dict(vocab_size=10, dropout=1.0), "dropout"),
    (dict(vocab_size=10, dropout="x"), "dropout"),
    (dict(vocab_size=10, d_ff=0), "d_ff"),
    (dict(vocab_size=10, norm_eps=-1.0), "norm_eps"),
])
def test_model_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_generate_method_is_greedy_decoding_of_the_final_layer():
    model = small_model()
    prompt = torch.randint(0, V, (2, 5))
    tokens, exit_layers, *_ = model.generate(prompt, max_new_tokens=6)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, seq)
    assert (exit_layers == 3).all()


def test_forward_cached_several_tokens_after_a_prefill_equals_the_full_forward():
    """A block step of t > 1 tokens at slot start > 0 without a mask attends to every earlier
    key (SDPA's own is_causal would align its triangle to the top-left)."""
    model = small_model()
    x = model.embed(torch.randint(0, model.cfg.vocab_size, (2, 8)))
    block = model.blocks[0]
    cache = model.new_kv_caches(2, 8, [1])[0]
    with torch.no_grad():
        head = block.forward_cached(x[:, :5], cache, 0)
        tail = block.forward_cached(x[:, 5:], cache, 5)
        torch.testing.assert_close(torch.cat([head, tail], 1), block(x), rtol=1e-5, atol=1e-5)
