"""Routing (docs/design.md §3): the exact and compact routed forwards (generation: test_generate.py)."""
import pytest
import torch

from fastexit.model import EarlyExitTransformer, ModelConfig
from fastexit.kernels import HAS_TRITON
from fastexit.routing import compact_routed_forward, exact_routed_forward

VOCAB, HEAD_SCALE = 97, 40.0  # a scaled-up random head spreads the confidences over (0, 1)

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


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


@needs_triton
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
