"""Self-speculative decoding (generate(..., speculative=k)) against full-depth decoding."""
import itertools
import math

import pytest
import torch

from fastexit.generate import generate
from fastexit.model import EarlyExitTransformer, ModelConfig
from test_generate import greedy_reference, left_padded
from test_routing import VOCAB, batch, make_model, needs_triton

CASES = [(2, 1), (4, 1), (4, 2)]  # (n_layers, exit_layer)


def padded_prompts():
    return left_padded([torch.randint(0, VOCAB, (n,)) for n in (7, 3, 1, 5)])


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("n_layers,exit_layer", CASES)
def test_greedy_equals_full_depth_greedy(n_layers, exit_layer, k):
    # block_scale 2: the exit layer's argmax agrees with the final one on roughly 10-50% of drafts
    model, (idx, mask) = make_model(n_layers, block_scale=2.0), padded_prompts()
    full, *_ = generate(model, idx, 20, attention_mask=mask)
    tokens, layers, _, stats = generate(model, idx, 20, exit_layer=exit_layer, attention_mask=mask, speculative=k,
                                     return_stats=True)
    assert torch.equal(tokens, full)
    assert layers.shape == (4, 20) and (layers == n_layers).all()
    assert 0 < stats["acceptance_rate"] < 1  # both the accepting and the rejecting branch ran
    assert (stats["accepted_per_row"] <= stats["drafted_per_row"]).all() and (stats["drafted_per_row"] % k == 0).all()


def test_unpadded_batch_equals_recomputation():
    model, (idx, _) = make_model(4, block_scale=2.0), batch(3, 6)
    tokens, *_ = model.generate(idx, 15, exit_layer=2, speculative=3)
    assert torch.equal(tokens, greedy_reference(model, idx, 15))


@torch.no_grad()
def speculation_reference(model, prompt, n, k, exit_layer):
    """Greedy self-speculation of one prompt (1, T0) recomputed from scratch each round:
    (tokens (1, T0 + n), accepted drafts, drafted tokens)."""
    seq, accepted, drafted = greedy_reference(model, prompt, 1), 0, 0
    while seq.shape[1] < prompt.shape[1] + n:
        draft = seq
        for _ in range(k):
            draft = torch.cat([draft, model.exit_logits(draft, [exit_layer])[0][:, -1:].argmax(-1)], 1)
        target = model(draft)[:, -k - 1:].argmax(-1)  # (1, k+1): after the last kept token and each draft
        n_acc = int((draft[:, -k:] == target[:, :k]).long().cumprod(1).sum())
        seq, accepted, drafted = torch.cat([seq, target[:, :n_acc + 1]], 1), accepted + n_acc, drafted + k
    return seq[:, :prompt.shape[1] + n], accepted, drafted


@pytest.mark.parametrize("n_layers,exit_layer,k", [(2, 1, 2), (4, 2, 4)])
def test_rows_accept_what_they_would_alone(n_layers, exit_layer, k):
    """Per-row acceptance lengths in a left-padded batch are those of each row's own rounds."""
    model, (idx, mask) = make_model(n_layers, block_scale=2.0), padded_prompts()
    tokens, _, _, stats = generate(model, idx, 16, exit_layer=exit_layer, attention_mask=mask, speculative=k,
                                return_stats=True)
    for r in range(idx.shape[0]):
        ref, accepted, drafted = speculation_reference(model, idx[r:r + 1, mask[r]], 16, k, exit_layer)
        assert torch.equal(tokens[r, idx.shape[1]:], ref[0, -16:]), f"row {r}"
        assert (int(stats["accepted_per_row"][r]), int(stats["drafted_per_row"][r])) == (accepted, drafted)
    assert len(set(stats["accepted_per_row"].tolist())) > 1  # rows really advanced unevenly


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3])
def test_rows_stop_at_max_new_tokens(max_new_tokens):
    """Drafts may run past the end (k > max_new_tokens): they are cut, and done rows stay put."""
    model, (idx, mask) = make_model(2, block_scale=2.0), padded_prompts()
    full, *_ = generate(model, idx, max_new_tokens, attention_mask=mask)
    tokens, _, _, stats = generate(model, idx, max_new_tokens, attention_mask=mask, speculative=4, return_stats=True)
    assert torch.equal(tokens, full)
    rounds = stats["drafted_per_row"] / 4  # every round yields at least one token per row
    assert (rounds == 0).all() if max_new_tokens == 1 else ((1 <= rounds) & (rounds <= max_new_tokens - 1)).all()


def test_top_k_one_sampling_is_greedy():
    """p and q one-hot: the sampled accept/reject/residual path must reproduce greedy decoding."""
    model, (idx, mask) = make_model(4, block_scale=2.0), padded_prompts()
    full, *_ = generate(model, idx, 14, attention_mask=mask)
    sampled, *_ = generate(model, idx, 14, exit_layer=1, temperature=0.7, top_k=1, attention_mask=mask, speculative=2,
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, full)


@needs_triton
def test_triton_backend_matches_torch():
    model, (idx, mask) = make_model(4, block_scale=2.0), padded_prompts()
    ref = generate(model, idx, 10, exit_layer=2, attention_mask=mask, speculative=2, backend="torch")
    out = generate(model, idx, 10, exit_layer=2, attention_mask=mask, speculative=2, backend="triton")
    assert torch.equal(out[0], ref[0])


# ----------------------------------------------------------------------------- sampling
def tiny_model():
    """V=5; scaled blocks make the exit layer's q differ from the final layer's p (~75% acceptance)."""
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=5, n_layers=2, d_model=16, n_heads=2, d_ff=32, max_seq_len=16, tie_embeddings=False)
    model = EarlyExitTransformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
        for name, p in model.named_parameters():
            if name.endswith(("out_proj.weight", "fc_out.weight")):
                p.mul_(5.0)
    return model


@torch.no_grad()
def exact_distribution(model, prompt, n, temperature, top_k):
    """Probability (V**n,) fp64 of every continuation of n tokens under the full model, by enumeration."""
    V, T0 = model.cfg.vocab_size, prompt.numel()
    cont = torch.tensor(list(itertools.product(range(V), repeat=n)))  # (V**n, n), lexicographic
    logits = model(torch.cat([prompt.expand(len(cont), T0), cont], 1))[:, T0 - 1:-1].double() / temperature
    if top_k is not None:
        logits[logits < logits.topk(top_k).values[..., -1:]] = float("-inf")
    return logits.softmax(-1).gather(2, cont[..., None]).squeeze(2).prod(1)


def chi_square(observed, expected):
    """Pearson's statistic and degrees of freedom; cells expecting < 5 are pooled into one."""
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    return float(((observed - expected) ** 2 / expected).sum()), len(observed) - 1


def chi2_upper(df, z=5.0):
    """Wilson-Hilferty: the chi-square quantile of df degrees of freedom z sigmas out (z=5: p ~ 3e-7)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.8, 3)])
def test_sampling_matches_the_full_model_distribution(k, temperature, top_k):
    """The first 3 new tokens of 20000 rows (125 outcomes: accepted drafts, residual draws after a
    rejection and bonus tokens all occur) against the full model's exact distribution. Sampling
    from the draft q instead gives chi2 > 100x this bound."""
    model, prompt, n, rows = tiny_model(), torch.tensor([1, 3, 0]), 3, 20000
    tokens, _, _, stats = generate(model, prompt.expand(rows, 3).clone(), n, exit_layer=1, temperature=temperature,
                                top_k=top_k, speculative=k, generator=torch.Generator().manual_seed(0),
                                return_stats=True)
    assert 0.5 < stats["acceptance_rate"] < 0.9
    outcome = (tokens[:, 3:] * torch.tensor([25, 5, 1])).sum(1)
    observed = torch.bincount(outcome, minlength=125).double()
    expected = exact_distribution(model, prompt, n, temperature, top_k) * rows
    assert observed[expected == 0].sum() == 0  # nothing outside the top_k is ever emitted
    chi2, df = chi_square(observed[expected > 0], expected[expected > 0])
    assert chi2 < chi2_upper(df), f"chi2 {chi2:.1f} on {df} degrees of freedom"


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,names", [
    (dict(speculative=0), ["speculative"]), (dict(speculative=-2), ["speculative"]),
    (dict(speculative=1.5), ["speculative"]), (dict(speculative="2"), ["speculative"]),
    (dict(speculative=True), ["speculative"]),
    (dict(speculative=57), ["speculative", "max_seq_len"]),  # 5 + 4 + 57 - 1 > 64
    (dict(speculative=2, max_new_tokens=59), ["speculative", "max_seq_len"]),  # fits without drafts
    (dict(speculative=2, routing_threshold=0.5), ["speculative", "routing_threshold"]),
    (dict(speculative=2, exit_layer=3), ["exit_layer"]),
    (dict(speculative=2, return_conf=True), ["return_conf"]),
    (dict(return_stats=True), ["return_stats", "speculative"]),
])
def test_speculative_bad_input(kwargs, names):
    model = make_model(3)
    args = dict(model=model, idx=torch.randint(0, VOCAB, (2, 5)), max_new_tokens=4) | kwargs
    with pytest.raises(ValueError) as err:
        generate(**args)
    assert all(name in str(err.value) for name in names), str(err.value)


def test_speculative_fits_max_seq_len_exactly():
    model, idx = make_model(3, block_scale=2.0), torch.randint(0, VOCAB, (2, 5))
    tokens, *_ = generate(model, idx, 56, speculative=4)  # 5 + 56 + 4 - 1 = 64 positions
    assert torch.equal(tokens, generate(model, idx, 56)[0])
