"""Layer dropout: the rates over depth, the per-step draws, and a forward/backward that skips
dropped sequences' blocks, against a per-sequence reference written from the model's blocks."""
import pytest
import torch

from fastexit import EarlyExitTransformer, ModelConfig, from_hf
from fastexit.config import LayerDropout, UniversalConfig
from fastexit.kernels import HAS_TRITON, replace_rows, select_rows

V = 61
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


def test_rates_follow_the_shape_over_depth():
    assert LayerDropout(0.2).rates(4) == [0.2] * 4
    assert LayerDropout(0.3, "linear").rates(4) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    exp = LayerDropout(0.4, "exponential").rates(3)
    assert exp == pytest.approx([0.0, 0.4 * (2 ** 0.5 - 1), 0.4])
    assert LayerDropout(0.5, "linear").rates(1) == [0.5]


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_rate=1.0), "max_rate"), (dict(max_rate=-0.1), "max_rate"), (dict(max_rate=True), "max_rate"),
    (dict(max_rate=0.1, shape="cubic"), "shape"),
])
def test_bad_settings_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LayerDropout(**kwargs)


def test_config_round_trip_and_default_off():
    cfg = UniversalConfig({1: 0.5, 2: 0.5}, layer_dropout=LayerDropout(0.2, "linear"))
    assert UniversalConfig.from_dict(cfg.to_dict()) == cfg
    assert UniversalConfig({1: 1.0}).layer_dropout is None
    with pytest.raises(TypeError, match="layer_dropout"):
        UniversalConfig({1: 1.0}, layer_dropout=0.2)


def test_draws_are_a_function_of_seed_and_step():
    ld = LayerDropout(0.3)
    assert ld.draw(4, 16, seed=1, step=7) == ld.draw(4, 16, seed=1, step=7)
    assert ld.draw(4, 16, seed=1, step=7) != ld.draw(4, 16, seed=1, step=8)
    assert ld.draw(4, 16, seed=1, step=7) != ld.draw(4, 16, seed=2, step=7)
    assert not any(any(row) for row in LayerDropout(0.0).draw(3, 8, 0, 0))


def test_draws_hit_the_rates():
    rates = LayerDropout(0.4, "linear").rates(3)
    drops = [LayerDropout(0.4, "linear").draw(3, 100, seed=0, step=s) for s in range(50)]  # 5000 per layer
    for layer, p in enumerate(rates):
        share = sum(sum(d[layer]) for d in drops) / 5000
        assert abs(share - p) < 4 * (p * (1 - p) / 5000) ** 0.5 + 1e-9, (layer, share, p)


def small_model(kind="native"):
    """An fp64 3-layer early-exit model of either kind: fastexit's own, or a transformers
    Llama through from_hf (the kept-rows behaviour is the shared model's, tested on both)."""
    if kind == "native":
        return EarlyExitTransformer(ModelConfig(vocab_size=V, n_layers=3, d_model=32, n_heads=4, max_seq_len=16)).double()
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return from_hf(transformers.LlamaForCausalLM(config).double())


KINDS = ["native", "llama"]


def reference_states(model, idx, layers, drops):
    """Each sequence alone, through the blocks it does not drop."""
    out = [[] for _ in layers]
    for b in range(idx.shape[0]):
        x = model.embed(idx[b:b + 1])
        for i, block in enumerate(model.blocks, start=1):
            if not drops[i - 1][b]:
                x = block(x)
            if i in layers:
                out[layers.index(i)].append(model.exit_norms[i - 1](x))
    return [torch.cat(rows) for rows in out]


@pytest.mark.parametrize("drops", [
    [[False, True, False, True], [True, True, False, False], [False, False, False, True]],
    [[True] * 4, [False] * 4, [True, False, True, False]],  # a block nobody runs, one everybody runs
])
@pytest.mark.parametrize("kind", KINDS)
def test_dropped_sequences_skip_their_blocks(drops, kind):
    model, idx, layers = small_model(kind), torch.randint(0, V, (4, 9)), [1, 3]
    got = model.exit_hidden_states(idx, layers, drops=drops)
    ref_model = small_model(kind)
    ref_model.load_state_dict(model.state_dict())
    expected = reference_states(ref_model, idx, layers, drops)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    probe = [torch.randn_like(g) for g in got]
    sum((g * p).sum() for g, p in zip(got, probe)).backward()
    sum((e * p).sum() for e, p in zip(expected, probe)).backward()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        if p.grad is None:  # an exit norm no loss reads
            assert q.grad is None, name
            continue
        expected_grad = torch.zeros_like(p) if q.grad is None else q.grad  # a block nobody runs: a zero gradient
        torch.testing.assert_close(p.grad, expected_grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_a_dropped_block_does_no_work_on_dropped_rows(kind):
    model, idx = small_model(kind), torch.randint(0, V, (4, 9))
    batch_sizes = []
    model.blocks[1].register_forward_hook(lambda m, args, out: batch_sizes.append(args[0].shape[0]))
    model.exit_hidden_states(idx, [3], drops=[[False] * 4, [True, False, True, True], [False] * 4])
    assert batch_sizes == [1]


@pytest.mark.parametrize("kind", KINDS)
def test_a_block_every_sequence_drops_runs_on_zero_rows(kind):
    """Under FSDP2 every rank must enter every block (its all-gather), whatever it drew."""
    model, idx = small_model(kind), torch.randint(0, V, (3, 9))
    batch_sizes = []
    model.blocks[0].register_forward_hook(lambda m, args, out: batch_sizes.append(args[0].shape[0]))
    (state,) = model.exit_hidden_states(idx, [1], drops=[[True] * 3, [False] * 3, [False] * 3])
    torch.testing.assert_close(state, model.exit_norms[0](model.embed(idx)))
    assert batch_sizes == [0]


def test_drops_of_the_wrong_shape_are_an_error():
    model, idx = small_model(), torch.randint(0, V, (2, 5))
    with pytest.raises(ValueError, match="drops"):
        model.exit_hidden_states(idx, [3], drops=[[False, False]] * 2)
    with pytest.raises(ValueError, match="drops"):
        model.exit_hidden_states(idx, [3], drops=[[False]] * 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_and_replace_rows_gradients(backend):
    x = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)
    values = torch.randn(3, 3, 5, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([4, 0, 2])
    picked = select_rows(x, rows, backend=backend)
    torch.testing.assert_close(picked, x[rows])
    out = replace_rows(x, rows, values, backend=backend)
    expected = x.detach().clone()
    expected[rows] = values.detach()
    torch.testing.assert_close(out, expected)
    g1, g2 = torch.randn_like(picked), torch.randn_like(out)
    dx, dv = torch.autograd.grad((picked * g1).sum() + (out * g2).sum(), (x, values))
    dx_ref = g2.clone()
    dx_ref[rows] = 0
    dx_ref.index_add_(0, rows, g1)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dv, g2[rows])


def _fsdp_block_that_one_rank_drops_entirely():
    """Rank 0's rows all drop block 2, rank 1's keep it: rank 0 still enters the block (on zero
    rows) for its all-gather and reduce-scatter, else rank 1 would wait there until the timeout."""
    from fastexit import UniversalTrainer, distributed
    torch.manual_seed(0)
    model = EarlyExitTransformer(ModelConfig(vocab_size=V, n_layers=3, d_model=32, n_heads=4, max_seq_len=16))
    wrapped = distributed.wrap(model, "fsdp")
    trainer = UniversalTrainer(UniversalConfig({1: 0.5, 3: 0.5}, routing_threshold=0), V)
    x, y = torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 9))
    drop = distributed.rank() == 0
    trainer.compute_loss(wrapped, x, y, drops=[[False, False], [drop, drop], [False, False]]).backward()
    grads = [p.grad.full_tensor() for p in model.blocks[1].parameters()]
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_fsdp_a_block_one_rank_drops_entirely_does_not_hang():
    from test_distributed import spawn
    spawn(_fsdp_block_that_one_rank_drops_entirely)
