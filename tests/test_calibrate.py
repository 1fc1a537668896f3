"""Threshold calibration (fastexit/calibrate.py): the exit table, the routing outcome, the
statistics, fixed-sequence testing, and the guarantee on tables with a planted structure."""
import math
from statistics import NormalDist

import pytest
import torch

from fastexit import report
from fastexit.calibrate import (ExitTable, binomial_cdf, calibrate, clt_p_value, exit_table, fixed_sequence,
                                hoeffding_bentkus_p_value, route, route_metrics)
from fastexit.model import EarlyExitTransformer, ModelConfig


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("k, n, p", [(0, 10, 0.3), (3, 10, 0.3), (2, 57, 0.01), (12, 200, 0.05), (9, 9, 0.5)])
def test_binomial_cdf_matches_math_comb(k, n, p):
    expected = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
    assert binomial_cdf(k, n, p) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("mean, n, alpha", [(0.04, 50, 0.1), (0.0, 300, 0.02), (0.013, 1000, 0.02), (0.3, 40, 0.1)])
def test_hoeffding_bentkus_p_value_by_hand(mean, n, alpha):
    a = min(mean, alpha)
    kl = (a * math.log(a / alpha) if a else 0.0) + (1 - a) * math.log((1 - a) / (1 - alpha))
    k = math.ceil(round(n * mean, 9))
    bentkus = math.e * sum(math.comb(n, i) * alpha**i * (1 - alpha) ** (n - i) for i in range(k + 1))
    assert hoeffding_bentkus_p_value(mean, n, alpha) == pytest.approx(min(1.0, math.exp(-n * kl), bentkus), rel=1e-9)


def test_hoeffding_bentkus_p_value_is_valid_at_the_boundary():
    """At true risk = alpha, P(p <= delta) <= delta (the p-value is super-uniform)."""
    g = torch.Generator().manual_seed(0)
    n, alpha, delta, draws = 100, 0.1, 0.1, 2000
    means = (torch.rand(draws, n, generator=g) < alpha).double().mean(1)
    rejected = sum(hoeffding_bentkus_p_value(float(m), n, alpha) <= delta for m in means)
    assert rejected / draws <= delta


def test_clt_p_value_by_hand():
    values = torch.tensor([0.1, 0.2, 0.3, 0.6])  # mean 0.3, squared deviations 0.04, 0.01, 0, 0.09
    z = (0.5 - 0.3) * math.sqrt(4) / math.sqrt(0.14 / 3)
    assert clt_p_value(values, 0.5) == pytest.approx(NormalDist().cdf(-z), rel=1e-6)
    assert clt_p_value(values, 0.3) == pytest.approx(0.5)
    assert clt_p_value(torch.full((5,), 0.1), 0.2) == 0.0 and clt_p_value(torch.full((5,), 0.3), 0.2) == 1.0


@pytest.mark.parametrize("p_values, rejected", [([0.01, 0.05, 0.2, 0.01], 2), ([0.5, 0.01], 0), ([], 0),
                                                 ([0.1, 0.1], 2), ([0.01, 0.02, 0.03], 3),
                                                 ([math.nan, 0.01], 0), ([0.01, math.nan, 0.01], 1)])
def test_fixed_sequence_stops_at_the_first_non_rejection(p_values, rejected):
    assert fixed_sequence(p_values, delta=0.1) == rejected


# ----------------------------------------------------------------------------- routing outcome
def hand_table():
    """4 tokens of 2 sequences, exits at layers 1 and 2 of a 4-layer model."""
    conf = torch.tensor([[0.9, 0.3, 0.5, 0.0],
                         [0.95, 0.8, 0.2, 0.0]])
    pred = torch.tensor([[7, 1, 5, 3], [8, 2, 6, 3], [9, 2, 6, 4]])
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 1.5, 2.5, 3.5], [0.25, 1.25, 2.25, 3.25]])
    return ExitTable((1, 2), 4, conf, pred, nll, torch.tensor([0, 0, 1, 1]), torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("thresholds, exit_index", [
    ((0.5, 0.7), [0, 1, 0, 2]),   # the first exit reaching its threshold wins; conf == threshold leaves
    ((0.0, 0.7), [1, 1, 2, 2]),   # threshold 0: exit 1 off, even for conf 0
    ((0.0, 0.0), [2, 2, 2, 2]),   # routing off: full depth
    ((1.0, 0.96), [2, 2, 2, 2]),
])
def test_route_on_a_hand_made_table(thresholds, exit_index):
    t = hand_table()
    r = route(t, thresholds)
    cols = torch.arange(4)
    assert r.exit_index.tolist() == exit_index
    assert r.layers_run.tolist() == [(1, 2, 4)[i] for i in exit_index]
    assert torch.equal(r.pred, t.pred[r.exit_index, cols]) and torch.equal(r.nll, t.nll[r.exit_index, cols])


def test_route_metrics_on_a_hand_made_table():
    t = hand_table()._replace(valid=torch.tensor([True, True, True, False]))  # token 3 is not scored
    m = route_metrics(t, (0.5, 0.7))  # exits [0, 1, 0]: layers 1, 2, 1; preds 7, 2, 5 vs final 9, 2, 6
    assert m["ppl"] == pytest.approx(math.exp((1.0 + 1.5 + 3.0) / 3))
    assert m["ppl_full"] == pytest.approx(math.exp((0.25 + 1.25 + 2.25) / 3))
    assert m["agreement"] == pytest.approx(1 / 3)
    assert m["compute_cost"] == pytest.approx((1 + 2 + 1) / 3 / 4)
    assert m["exit_ratio_L1"] == pytest.approx(2 / 3) and m["exit_ratio_L2"] == pytest.approx(1 / 3)
    assert m["shallow_ratio"] == pytest.approx(1.0)
    assert (m["n_tokens"], m["n_sequences"]) == (3, 2)


def test_route_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="thresholds"):
        route(hand_table(), (0.5,))
    with pytest.raises(ValueError, match="thresholds"):
        route(hand_table(), (0.5, 1.5))


# ----------------------------------------------------------------------------- calibration
def test_fixed_sequence_in_calibrate_returns_the_last_certified_before_the_first_failure():
    """Candidates: nobody exits (certified), then exit 1 with disagreeing tokens (fails), then
    exit 2 whose tokens all agree (would pass, cheaper): testing stops at the failure."""
    g = torch.Generator().manual_seed(1)
    n_seq, T = 200, 8
    N = n_seq * T
    conf = torch.rand(2, N, generator=g) * 0.9
    final = torch.randint(0, 50, (N,), generator=g)
    pred = torch.stack([final + 1, final, final])  # exit 1 always disagrees, exit 2 always agrees
    table = ExitTable((1, 2), 3, conf, pred, torch.rand(3, N, generator=g),
                      torch.arange(n_seq).repeat_interleave(T), torch.ones(N, dtype=torch.bool))
    grid = [[0.0, 0.99], [0.5, 0.0], [0.0, 0.5]]  # (K, E) per-exit candidates
    res = calibrate(table, min_agreement=0.95, delta=0.1, grid=grid)
    assert res.certified and res.thresholds == (0.0, 0.99) and res.n_tested == 2
    assert res.metrics["compute_cost"] == 1.0 and res.p_value <= 0.1


def test_calibrate_returns_full_depth_when_nothing_is_certified():
    t = hand_table()
    t = t._replace(conf=torch.ones_like(t.conf))  # every token leaves at exit 1 and disagrees
    res = calibrate(t, min_agreement=0.9)
    assert not res.certified and res.thresholds == (0.0, 0.0) and res.n_tested == 1
    assert res.metrics["compute_cost"] == 1.0 and res.metrics["agreement"] == 1.0 and res.p_value > 0.1


def test_calibrate_on_a_nan_table_certifies_nothing_and_says_why():
    """A diverged model's table: every NLL NaN. Before, the fixed-sequence test stopped only on
    p > delta, which a NaN p-value never is, and printed "certified (p = nan <= delta 0.1)"."""
    table = planted_table(torch.Generator().manual_seed(0))
    table = table._replace(nll=torch.full_like(table.nll, math.nan))
    res = calibrate(table, max_ppl_increase=0.02, delta=0.1)
    assert not res.certified and res.thresholds == (0.0, 0.0) and math.isnan(res.p_value)
    assert "nan, not <= delta 0.1" in res.reason and "9600 scored tokens have a non-finite NLL" in res.reason
    text = report.calibration_text("run", "run/calibration.json", dict(res.to_dict(), confidence="max_prob",
                                                                       val=res.metrics, test=res.metrics))
    assert f"not certified by any threshold: full depth ({res.reason})" in text and "certified (p" not in text


def test_p_values_of_non_finite_losses_are_nan():
    assert math.isnan(hoeffding_bentkus_p_value(math.nan, 100, 0.1))
    assert math.isnan(clt_p_value(torch.tensor([0.1, math.nan, 0.2]), 0.5))
    assert math.isnan(clt_p_value(torch.tensor([0.1, math.inf, 0.2]), 0.5))


BOUNDARY, EASY_RATE, EASY_INC, NOISE = 0.6, 0.005, 0.005, 0.3


def planted_table(g, n_seq=300, T=32, exits=(1, 2), n_layers=4):
    """Exits whose confidence is uniform on (0, 1): above BOUNDARY a token disagrees with the
    final layer w.p. EASY_RATE and its NLL rises by EASY_INC on average; below it, w.p. and by
    h_s, a per-sequence difficulty uniform on (0.5, 1) (tokens of a sequence are dependent)."""
    E, N = len(exits), n_seq * T
    seq = torch.arange(n_seq).repeat_interleave(T)
    hard = (0.5 + 0.5 * torch.rand(n_seq, generator=g, dtype=torch.float64))[seq]  # (N,)
    conf = torch.rand(E, N, generator=g, dtype=torch.float64)
    easy = conf >= BOUNDARY
    disagree = torch.rand(E, N, generator=g, dtype=torch.float64) < torch.where(easy, EASY_RATE, hard)
    final = torch.randint(0, 100, (N,), generator=g)
    pred = torch.cat([torch.where(disagree, final + 1, final), final[None]])
    nll_final = torch.empty(N, dtype=torch.float64).exponential_(generator=g)
    increase = torch.where(easy, EASY_INC, hard) + NOISE * torch.randn(E, N, generator=g, dtype=torch.float64)
    nll = torch.cat([nll_final + increase, nll_final[None]])
    return ExitTable(exits, n_layers, conf.float(), pred, nll, seq, torch.ones(N, dtype=torch.bool))


def population_risk(lam: float, easy_value: float) -> float:
    """Expected disagreement (easy_value=EASY_RATE) or NLL increase (EASY_INC) per token at a
    shared threshold lam over two exits: exit 1 takes mass g(lam), exit 2 lam * g(lam)."""
    g = easy_value * (1 - max(lam, BOUNDARY)) + 0.75 * max(BOUNDARY - lam, 0.0)  # E[h_s] = 0.75
    return (1 + lam) * g


def test_population_risk_matches_a_large_draw():
    t = planted_table(torch.Generator().manual_seed(2), n_seq=2000)
    for lam in (0.9, 0.6, 0.55):
        m = route_metrics(t, (lam, lam))
        assert 1 - m["agreement"] == pytest.approx(population_risk(lam, EASY_RATE), abs=3e-3)
        increase = math.log(m["ppl"] / m["ppl_full"])
        assert increase == pytest.approx(population_risk(lam, EASY_INC), abs=5e-3)


@pytest.mark.parametrize("constraint, value, easy_value, bound", [
    ("min_agreement", 0.98, EASY_RATE, 0.02),
    ("max_ppl_increase", 0.02, EASY_INC, math.log1p(0.02)),
])
def test_calibrate_guarantee_on_planted_structure(constraint, value, easy_value, bound):
    """Over many calibration draws the chosen thresholds meet the constraint on the population
    in at least ~1 - delta of them, and sit near the planted boundary (the certifiable limit)."""
    g, delta, draws = torch.Generator().manual_seed(3), 0.1, 60
    violations, chosen = 0, []
    for _ in range(draws):
        res = calibrate(planted_table(g), delta=delta, **{constraint: value})
        assert res.certified and res.thresholds[0] == res.thresholds[1]
        lam = res.thresholds[0]
        violations += population_risk(lam, easy_value) > bound
        chosen.append(lam)
    assert violations / draws <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
    chosen = torch.tensor(chosen)
    assert (chosen - BOUNDARY).abs().max() <= 0.03, chosen
    assert res.metrics["compute_cost"] < 0.75  # routing really saves compute at the choice


@pytest.mark.parametrize("kwargs, name", [
    (dict(), "max_ppl_increase"),
    (dict(max_ppl_increase=0.02, min_agreement=0.99), "min_agreement"),
    (dict(max_ppl_increase=0.0), "max_ppl_increase"),
    (dict(max_ppl_increase=-0.1), "max_ppl_increase"),
    (dict(min_agreement=0.0), "min_agreement"),
    (dict(min_agreement=1.5), "min_agreement"),
    (dict(min_agreement=0.99, delta=0.0), "delta"),
    (dict(min_agreement=0.99, delta=1.0), "delta"),
    (dict(min_agreement=0.99, grid=[0.5, 0.9]), "grid"),
    (dict(min_agreement=0.99, grid=[1.0, 0.0]), "grid"),
])
def test_calibrate_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        calibrate(hand_table(), **kwargs)


# ----------------------------------------------------------------------------- the exit table
def tiny_model(n_layers=4, vocab=37):
    torch.manual_seed(0)
    model = EarlyExitTransformer(ModelConfig(vocab_size=vocab, n_layers=n_layers, d_model=32, n_heads=4,
                                             max_seq_len=16, tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # spread the confidences over (0, 1)
    return model


@pytest.mark.parametrize("confidence", ["max_prob", "margin"])
def test_exit_table_matches_full_logits_in_fp64(confidence):
    model, exits = tiny_model(), (1, 3)
    batches = [(torch.randint(0, 37, (b, 11)), torch.randint(0, 37, (b, 11))) for b in (3, 2)]
    batches[1][1][0, 4:7] = -100
    table = exit_table(model, batches, exits, confidence, backend="torch")
    with torch.no_grad():
        logp = [torch.cat([lg.double().log_softmax(-1).reshape(-1, 37) for lg in model.exit_logits(x, [i])])
                for i in (*exits, 4) for x in [torch.cat([bx for bx, _ in batches])]]  # (N, V) per layer
    y = torch.cat([by.reshape(-1) for _, by in batches])
    valid = y != -100
    top2 = [lp.exp().topk(2, -1).values for lp in logp[:-1]]
    ref_conf = torch.stack([t[:, 0] if confidence == "max_prob" else t[:, 0] - t[:, 1] for t in top2])
    ref_nll = torch.stack([-lp.gather(1, y.clamp(min=0)[:, None]).squeeze(1) * valid for lp in logp])
    assert table.exits == exits and table.n_layers == 4
    assert table.conf.shape == (2, 55) and table.pred.shape == table.nll.shape == (3, 55)
    torch.testing.assert_close(table.conf.double(), ref_conf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(table.nll.double(), ref_nll, atol=1e-4, rtol=1e-5)
    assert torch.equal(table.pred, torch.stack([lp.argmax(-1) for lp in logp]))
    assert torch.equal(table.seq, torch.arange(5).repeat_interleave(11)) and torch.equal(table.valid, valid)


def test_exit_table_bad_input():
    model, batches = tiny_model(), [(torch.randint(0, 37, (2, 5)), torch.randint(0, 37, (2, 5)))]
    for exits in ([], [4], [2, 1], [0]):
        with pytest.raises(ValueError, match="exits"):
            exit_table(model, batches, exits)
    with pytest.raises(ValueError, match="confidence"):
        exit_table(model, batches, [1], "entropy")
