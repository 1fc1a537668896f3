"""fastexit.from_hf: transformers causal LMs as early-exit models, against transformers itself.

Tiny random models built in the test (nothing downloaded). The references are transformers'
own forward (``output_hidden_states``) and ``generate``, and for routing the plain
state-propagation references of test_routing / test_generate.
"""
import operator

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastexit import PRESETS, UniversalConfig, UniversalTrainer, from_hf, get_preset  # noqa: E402
from fastexit import hf as fhf  # noqa: E402
from fastexit.routing import compact_routed_forward, exact_routed_forward  # noqa: E402
from test_generate import left_padded, routed_generation_reference  # noqa: E402
from test_routing import routed_reference  # noqa: E402

VOCAB, N_LAYERS, HEAD_SCALE = 1000, 4, 40.0
_SMALL = dict(hidden_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128,
              bos_token_id=None, eos_token_id=None, pad_token_id=0)
FAMILIES = {  # one per supported model_type, tied and untied heads, GQA, Qwen3's q/k norms
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SMALL)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_SMALL, tie_word_embeddings=True)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**_SMALL, sliding_window=64)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_SMALL, head_dim=32)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=N_LAYERS, n_head=4, vocab_size=VOCAB, n_positions=128, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=0)),
}
ROUTING_FAMILIES = ["llama", "qwen3", "gpt2"]


def make_hf(family, sharpen=False):
    """A random transformers model; ``sharpen`` scales the final norm, so every exit's logits
    (confidences spread over (0, 1), tied embeddings untouched), and the layers' output
    projections (a wrong key or carried state shows in the predictions)."""
    model = FAMILIES[family]().eval()
    if sharpen:
        with torch.no_grad():
            for p in from_hf(model).exit_norms[0].parameters():
                p.mul_(HEAD_SCALE)
            for name, p in model.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight", "c_proj.weight")):
                    p.mul_(4.0)
    return model


def tokens(b=3, t=12):
    return torch.randint(1, VOCAB, (b, t)), torch.randint(0, VOCAB, (b, t))


def reference_loss(model, x, y, weights):
    """sum_i w_i CE(head(norm(h_i))) from transformers' own forward. hidden_states[i] is the
    output of layer i; the last one already went through the final norm."""
    hidden = model(x, output_hidden_states=True).hidden_states
    norm, head, L = from_hf(model).exit_norms[0], model.get_output_embeddings(), len(hidden) - 1
    return sum(w * F.cross_entropy(head(hidden[i] if i == L else norm(hidden[i])).flatten(0, 1), y.flatten())
               for i, w in weights.items() if w > 0)


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- training
WEIGHTS = [get_preset(name, N_LAYERS) for name in PRESETS] + [
    UniversalConfig({2: 1.0}, routing_threshold=0.0), UniversalConfig({1: 0.2, 3: 0.5, 4: 0.3})]


@pytest.mark.parametrize("family", FAMILIES)
def test_compute_loss_equals_transformers_reference(family):
    model = make_hf(family).train()
    ee = from_hf(model)
    x, y = tokens()
    for config in WEIGHTS:
        trainer = UniversalTrainer(config, VOCAB)
        weights = trainer.layer_weights(N_LAYERS)
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(ee, x, y)
        loss.backward()
        ours = grads(model)
        model.zero_grad(set_to_none=True)
        ref = reference_loss(model, x, y, weights)
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        for name, g in grads(model).items():
            torch.testing.assert_close(ours[name], g, rtol=1e-4, atol=1e-6, msg=f"{config.layer_weights}: {name}")


def test_no_layer_above_the_deepest_weighted_exit_runs():
    ee = from_hf(make_hf("llama"))
    ran = []
    for i, layer in enumerate(ee.hf.model.layers, start=1):
        layer.input_layernorm.register_forward_hook(lambda *_, i=i: ran.append(i))
    UniversalTrainer(UniversalConfig({1: 0.5, 2: 0.5}, routing_threshold=0.0), VOCAB).compute_loss(ee, *tokens())
    assert ran == [1, 2]


def test_padded_exit_states_equal_transformers_with_its_generate_positions():
    model, (x, _) = make_hf("gpt2"), tokens()
    mask = torch.ones_like(x)
    mask[0, :4], mask[1, -3:] = 0, 0  # left and right padding
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    ref = model(x, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(from_hf(model)(x, attention_mask=mask)[mask.bool()], ref[mask.bool()])


def test_layer_dropout_rows_skip_whole_layers():
    """drops[l][b] (the trainer's layer dropout): row b passes layer l + 1 unchanged."""
    ee, (x, _) = from_hf(make_hf("qwen3")), tokens()
    drops = [[False] * 3, [True, False, False], [False, False, True], [False] * 3]
    got = ee.exit_hidden_states(x, [1, 4], drops=drops)
    for b in range(3):
        h = ee.embed(x[b:b + 1])
        for layer, block in enumerate(ee.blocks, start=1):
            h = h if drops[layer - 1][b] else block(h)
            if layer in (1, 4):
                torch.testing.assert_close(got[[1, 4].index(layer)][b:b + 1], ee.exit_norms[0](h))
    with pytest.raises(ValueError, match="drops"):
        ee.exit_hidden_states(x, [1], drops=[[False] * 3])


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_layer_lr_groups_cover_exactly_the_decoder_layers(family):
    model = make_hf(family)
    ee = from_hf(model)
    config = UniversalConfig({1: 0.5, N_LAYERS: 0.5}, layer_lr_scales={1: 0.5, N_LAYERS: 2.0})
    opt = UniversalTrainer(config, VOCAB).create_optimizer(ee, 1e-3)
    layers = fhf.FAMILIES[model.config.model_type].layers
    for i, layer in enumerate(operator.attrgetter(layers)(model), start=1):
        group_ids = {id(p) for g in opt.param_groups if g["layer"] == i for p in g["params"]}
        assert group_ids == {id(p) for p in layer.parameters()}
        assert all(g["lr"] == pytest.approx(1e-3 * config.lr_scale(i)) for g in opt.param_groups if g["layer"] == i)
    in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups)) == len(list(model.parameters()))  # tied head counted once
    assert ee.state_dict().keys() == {f"hf.{k}" for k in model.state_dict()}  # adapters add no second copy


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_without_exits_equals_transformers_greedy(family, padded):
    model = make_hf(family)  # random head: no confidence comes near 1
    ee = from_hf(model)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in ((7, 3, 5) if padded else (6, 6, 6))]
    idx, mask = left_padded(prompts)
    ref = model.generate(idx, attention_mask=mask.long(), max_new_tokens=10, do_sample=False)
    for threshold in (0.0, 1.0):  # 1.0: routing on, but no token is that confident
        out, layers, *_ = ee.generate(idx, 10, threshold, 1, attention_mask=mask)
        assert torch.equal(out, ref) and (layers == N_LAYERS).all()
    assert torch.equal(ee.generate(idx, 10, attention_mask=mask, speculative=3)[0], ref)


@pytest.mark.parametrize("family", ROUTING_FAMILIES)
def test_routed_generation_follows_the_rule(family):
    """Exited tokens' deeper caches are filled from their carried state (as the native model):
    the routing reference recomputed from scratch with the same carried positions agrees."""
    ee, (idx, _) = from_hf(make_hf(family, sharpen=True)), tokens(3, 6)
    conf = exact_routed_forward(ee, idx, 1, 0.0).conf
    threshold = conf.flatten().quantile(0.5).item()
    out, layers, conf, _ = ee.generate(idx, 12, threshold, 1, return_conf=True)
    easy = layers == 1
    assert 0 < easy.float().mean() < 1
    ref_tokens, ref_easy, ref_conf = routed_generation_reference(ee, out, idx.shape[1], 1, threshold, easy)
    assert torch.equal(easy, ref_easy) and torch.equal(out[:, idx.shape[1]:], ref_tokens)
    torch.testing.assert_close(conf.double(), ref_conf, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ROUTING_FAMILIES)
def test_padded_routed_generation_equals_rows_alone(family):
    ee = from_hf(make_hf(family, sharpen=True))
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (6, 2, 4)]
    idx, mask = left_padded(prompts)
    out, layers, *_ = ee.generate(idx, 10, 0.5, 1, attention_mask=mask)
    assert (layers == 1).any() and (layers == N_LAYERS).any()
    for r, p in enumerate(prompts):
        alone, alone_layers, *_ = ee.generate(p[None], 10, 0.5, 1)
        assert torch.equal(out[r, idx.shape[1]:], alone[0, p.numel():]) and torch.equal(layers[r], alone_layers[0])


# ----------------------------------------------------------------------------- evaluation routing
@pytest.mark.parametrize("family", ROUTING_FAMILIES)
def test_routed_forwards_follow_the_rule(family):
    """exact: the rule on full-depth states; compact: state propagation of its easy tokens;
    with one deeper layer (exit 3 of 4) compact is exact."""
    ee, (idx, y) = from_hf(make_hf(family, sharpen=True)), tokens(3, 24)
    for exit_layer in (1, 3):
        conf = exact_routed_forward(ee, idx, exit_layer, 0.0).conf
        for threshold in conf.flatten().quantile(torch.tensor([0.3, 0.7])).tolist():
            exact = exact_routed_forward(ee, idx, exit_layer, threshold, targets=y)
            easy, pred, nll, _ = routed_reference(ee, idx, y, exit_layer, threshold)
            assert torch.equal(exact.easy, easy) and torch.equal(exact.pred, pred)
            compact = compact_routed_forward(ee, idx, exit_layer, threshold, targets=y)
            easy, pred, nll, _ = routed_reference(ee, idx, y, exit_layer, threshold, carried=compact.easy)
            assert torch.equal(compact.easy, easy) and torch.equal(compact.pred, pred)
            torch.testing.assert_close(compact.nll.double(), nll, atol=5e-4, rtol=1e-5)
            if exit_layer == N_LAYERS - 1:
                assert torch.equal(compact.pred, exact.pred)


@pytest.mark.parametrize("forward", [exact_routed_forward, compact_routed_forward])
@pytest.mark.parametrize("family", ROUTING_FAMILIES)
def test_padded_routed_forwards_equal_rows_alone(family, forward):
    ee = from_hf(make_hf(family, sharpen=True))
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (9, 4, 6)]
    idx, mask = left_padded(prompts)
    out = forward(ee, idx, 1, 0.5, attention_mask=mask)
    assert out.easy[mask].any() and not out.easy[mask].all()
    for r, p in enumerate(prompts):
        alone = forward(ee, p[None], 1, 0.5)
        real = mask[r]
        assert torch.equal(out.easy[r, real], alone.easy[0]) and torch.equal(out.pred[r, real], alone.pred[0])
        torch.testing.assert_close(out.conf[r, real], alone.conf[0], atol=1e-5, rtol=1e-4)


def test_fit_and_evaluate_run_on_hf_models():
    ee, batches = from_hf(make_hf("llama", sharpen=True)), [tokens(2, 16) for _ in range(3)]
    trainer = UniversalTrainer(get_preset("asymmetric_best", N_LAYERS), VOCAB)
    before = {n: p.clone() for n, p in ee.hf.named_parameters()}
    history = trainer.fit(ee, iter(batches), steps=3, base_lr=1e-3, progress_bar=False)
    assert len(history) == 3 and all(r["grad_norm"] > 0 for r in history)
    assert all(not torch.equal(before[n], p) for n, p in ee.hf.named_parameters() if p.dim() >= 2)
    exact = trainer.evaluate(ee, batches, routing_threshold=0.5)
    compact = trainer.evaluate(ee, batches, "compact", routing_threshold=0.5)
    assert 0 < exact["shallow_ratio"] < 1 and exact["shallow_ratio"] == compact["shallow_ratio"]
    assert set(exact) >= {f"ppl_L{i}" for i in range(1, N_LAYERS + 1)}


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_and_load_round_trip(family, tmp_path):
    ee, (x, y) = from_hf(make_hf(family, sharpen=True)), tokens()
    config = get_preset("asymmetric_best", N_LAYERS)
    fhf.save(ee, tmp_path, config)
    loaded, loaded_config = fhf.load(tmp_path)
    assert loaded_config == config and isinstance(loaded, fhf.HFEarlyExit)
    trainer = UniversalTrainer(config, VOCAB)
    assert trainer.compute_loss(loaded, x, y).item() == trainer.compute_loss(ee, x, y).item()
    generated = [m.generate(x, 8, config=config) for m in (loaded, ee)]
    assert all(torch.equal(generated[0][i], generated[1][i]) for i in range(2)) and (generated[0].layers_run == 1).any()
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)  # transformers alone
    assert torch.equal(plain(x).logits, ee.hf(x).logits)


def test_plain_transformers_folder_loads_without_a_method(tmp_path):
    make_hf("qwen3").save_pretrained(tmp_path)
    model, config = fhf.load(tmp_path)
    assert config is None and model.n_layers == N_LAYERS


# ----------------------------------------------------------------------------- bad input
def test_unsupported_model_type_names_it():
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                                             num_attention_heads=2, vocab_size=50,
                                                             word_embed_proj_dim=16))
    with pytest.raises(ValueError, match=r"model_type 'opt'.*supported model types: \['gpt2', 'llama'"):
        from_hf(opt)
    with pytest.raises(TypeError, match="model"):
        from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="causal LM"):
        from_hf(transformers.LlamaModel(transformers.LlamaConfig(**_SMALL)))


def test_dynamic_rope_is_refused():
    config = transformers.LlamaConfig(**_SMALL, rope_scaling=dict(rope_type="dynamic", factor=2.0))
    with pytest.raises(NotImplementedError, match="dynamic"):
        from_hf(transformers.LlamaForCausalLM(config))


def test_exit_layer_beyond_the_depth_is_an_error_naming_it(tmp_path):
    ee, (x, y) = from_hf(make_hf("llama")), tokens()
    with pytest.raises(ValueError, match="layer_weights"):
        UniversalTrainer(UniversalConfig({N_LAYERS + 1: 1.0}, routing_threshold=0.0), VOCAB).compute_loss(ee, x, y)
    with pytest.raises(ValueError, match="layers"):
        ee.exit_hidden_states(x, [N_LAYERS + 1])
    with pytest.raises(ValueError, match="exit_layer"):
        ee.generate(x, 4, 0.5, N_LAYERS)
    with pytest.raises(ValueError, match="exit_layer"):
        exact_routed_forward(ee, x, N_LAYERS + 1, 0.0)
    with pytest.raises(ValueError, match="exit_layer"):
        fhf.save(ee, tmp_path, UniversalConfig({1: 1.0}, exit_layer=N_LAYERS))


def test_vocabulary_mismatch_is_an_error_naming_it(tmp_path):
    ee, (x, y) = from_hf(make_hf("llama")), tokens()
    with pytest.raises(ValueError, match="vocab_size"):
        UniversalTrainer(get_preset("lpt", N_LAYERS), VOCAB - 1).compute_loss(ee, x, y)
    fhf.save(ee, tmp_path, get_preset("lpt", N_LAYERS))
    meta = tmp_path / fhf.METADATA
    meta.write_text(meta.read_text().replace(f'"vocab_size": {VOCAB}', '"vocab_size": 7'))
    with pytest.raises(ValueError, match="vocab_size"):
        fhf.load(tmp_path)
    meta.write_text("{not json")
    with pytest.raises(ValueError, match="fastexit.json"):
        fhf.load(tmp_path)


def test_sequence_limits_follow_the_model():
    assert from_hf(make_hf("mistral")).cfg.max_seq_len == 64  # the sliding window
    ee = from_hf(make_hf("gpt2"))
    with pytest.raises(ValueError, match="max_seq_len"):
        ee.generate(torch.ones(1, 120, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="attention_mask"):
        ee(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
