"""fastexit compare over seeds and base LRs, training budgets and early stopping, on tiny runs."""
import json
import math
import shutil
import statistics

import pytest
import torch

from fastexit import report
from fastexit.cli import main
from fastexit.config import RunConfig, TrainConfig
from fastexit.data import prepare_data
from fastexit.trainer import EarlyStopping, UniversalTrainer

from test_cli import error_line, state, table_rows, write_play

STEPS, EVAL_BATCHES = 6, 2
SEEDS = (0, 1, 2)
PRESETS = ("standard_llm", "asymmetric_best")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262}  # two-sided 95% Student t, from a printed table


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return dict(text=write_play(root / "play.txt", 1500), cache=root / "cache")


def tiny(data, out, *extra, steps=STEPS):
    budget = [] if steps is None else ["--steps", str(steps)]
    return ["--data", str(data["text"]), "--vocab-size", "300", "--cache-dir", str(data["cache"]), "--d-model", "32",
            "--n-heads", "2", *budget, "--batch-size", "4", "--seq-len", "32", "--eval-every", "3",
            "--eval-batches", str(EVAL_BATCHES), "--ckpt-every", "3", "--no-progress", "--out", str(out), *extra]


def cell(text):
    """'mean ± std' -> (mean, std); a lone number -> (value, None)."""
    mean, _, std = text.partition(" ± ")
    return float(mean), float(std) if std else None


def interval(text):
    """'+1.23 [-0.50, +2.96]' -> (1.23, -0.5, 2.96)."""
    mean, _, rest = text.partition(" [")
    low, high = rest.rstrip("]").split(", ")
    return float(mean), float(low), float(high)


def eval_ppl(run, split, capsys):
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--split", split]) == 0
    (row,) = table_rows(capsys.readouterr().out, "split")
    return float(row["ppl"])


@pytest.fixture(scope="module")
def seeded(data, tmp_path_factory):
    """compare of two presets over three seeds (six runs), shared by the read-only tests."""
    out = tmp_path_factory.mktemp("cmp") / "seeds"
    argv = tiny(data, out, "--presets", ",".join(PRESETS), "--seeds", ",".join(map(str, SEEDS)))
    assert main(["compare", *argv]) == 0
    return out, argv


# ---------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_the_printed_table(df):
    assert report.t_quantile(0.975, df) == pytest.approx(T975[df], abs=1e-3)
    assert report.t_cdf(-1.5, df) == pytest.approx(1 - report.t_cdf(1.5, df), abs=1e-12)


def test_paired_interval_of_one_pair_has_no_bounds():
    assert report.paired_interval([2.0]) == (2.0, None, None)


# ------------------------------------------------------------------------------- seeds
def test_seeds_train_distinct_runs(seeded):
    out, _ = seeded
    for preset in PRESETS:
        weights = []
        for seed in SEEDS:
            config = RunConfig.from_dict(json.loads((out / preset / f"seed{seed}" / "config.json").read_text()))
            assert (config.preset, config.train.seed, config.train.steps) == (preset, seed, STEPS)
            weights.append(state(out / preset / f"seed{seed}")["model"]["tok_emb.weight"])
        assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])


def test_table_is_mean_std_and_paired_interval_of_the_runs(seeded, capsys):
    out, _ = seeded
    runs = json.loads((out / "compare.json").read_text())["runs"]
    rows = {r["Model"]: r for r in table_rows((out / "compare.md").read_text(), "Model")}
    ppl = {p: [next(r["ppl"] for r in runs if r["folder"] == p and r["seed"] == s) for s in SEEDS] for p in PRESETS}
    # each run's recorded metric is what `fastexit eval` measures on its checkpoint
    assert ppl["asymmetric_best"][1] == pytest.approx(eval_ppl(out / "asymmetric_best" / "seed1", "test", capsys),
                                                      abs=0.006)  # the eval table's 2 decimals
    for preset in PRESETS:
        assert rows[preset]["n"] == str(len(SEEDS))
        for header, key in (("PPL", "ppl"), ("acc", "acc"), ("compute_cost", "compute_cost")):
            values = [next(r[key] for r in runs if r["folder"] == preset and r["seed"] == s) for s in SEEDS]
            mean, std = cell(rows[preset][header])
            places = 2 if abs(statistics.mean(values)) >= 10 else 4
            assert mean == pytest.approx(statistics.mean(values), abs=0.6 * 10 ** -places)
            assert std == pytest.approx(statistics.stdev(values), abs=0.6 * 10 ** -4 if std < 10 else 0.006)
    assert rows["standard_llm"][f"ΔPPL vs standard_llm"] == "baseline"
    diffs = [a - b for a, b in zip(ppl["asymmetric_best"], ppl["standard_llm"])]
    half = T975[len(SEEDS) - 1] * statistics.stdev(diffs) / math.sqrt(len(diffs))
    got = interval(rows["asymmetric_best"]["ΔPPL vs standard_llm"])
    want = (statistics.mean(diffs), statistics.mean(diffs) - half, statistics.mean(diffs) + half)
    assert got == pytest.approx(want, abs=0.006 + 1e-3 * half)  # 2 decimals; the table's t has 3 digits
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")


def test_interrupted_compare_resumes_to_the_uninterrupted_runs(seeded, tmp_path, monkeypatch, capsys):
    done, argv = seeded
    out = tmp_path / "again"
    shutil.copytree(done, out)
    victim = out / "asymmetric_best" / "seed1"
    shutil.rmtree(victim)
    argv = [a if a != str(done) else str(out) for a in argv]
    before = {p: (p / "ckpt.pt").read_bytes() for p in out.glob("*/seed*")}
    real_loss = UniversalTrainer.compute_loss

    def dying_loss(self, *args):
        if self.step == 4 and self.seed == 1:  # Ctrl-C in step 5 of the victim: its last checkpoint is step 3
            raise KeyboardInterrupt
        return real_loss(self, *args)

    monkeypatch.setattr(UniversalTrainer, "compute_loss", dying_loss)
    assert main(["compare", *argv]) == 130
    assert state(victim)["step"] == 3
    monkeypatch.setattr(UniversalTrainer, "compute_loss", real_loss)
    capsys.readouterr()
    assert main(["compare", *argv]) == 0
    err = capsys.readouterr().err
    assert err.count("already trained") == len(PRESETS) * len(SEEDS) - 1  # every other run was skipped
    assert {p: (p / "ckpt.pt").read_bytes() for p in before} == before
    resumed, straight = state(victim), state(done / "asymmetric_best" / "seed1")
    assert resumed["step"] == STEPS
    assert all(torch.equal(v, straight["model"][k]) for k, v in resumed["model"].items())
    steps = [json.loads(ln)["step"] for ln in (victim / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))


# --------------------------------------------------------------------------------- lrs
def test_lrs_compare_each_configuration_at_its_best_val_lr(data, tmp_path, capsys):
    out, lrs = tmp_path / "lrs", (1e-4, 3e-3)
    argv = tiny(data, out, "--presets", "standard_llm", "--seeds", "0,1", "--lrs", ",".join(map(str, lrs)),
                "--tokens", str(5 * 4 * 32), steps=None)
    assert main(["compare", *argv]) == 0
    runs = json.loads((out / "compare.json").read_text())["runs"]
    val = {lr: [r["val_ppl"] for r in runs if r["lr"] == lr] for lr in lrs}
    assert all(len(v) == 2 for v in val.values())
    best = min(lrs, key=lambda lr: statistics.mean(val[lr]))
    run = out / "standard_llm" / f"lr{best:g}" / "seed0"
    assert val[best][0] == pytest.approx(eval_ppl(run, "val", capsys), abs=0.006)
    config = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert (config.train.lr, config.train.steps, config.train.tokens) == (best, 5, 5 * 4 * 32)
    (row,) = table_rows((out / "compare.md").read_text(), "Model")
    assert float(row["LR (best on val)"]) == best
    test_ppl = [r["ppl"] for r in runs if r["lr"] == best]
    assert cell(row["PPL"])[0] == pytest.approx(statistics.mean(test_ppl), abs=0.006)
    assert f"{best:g}: " in row["val PPL per LR (* = best)"] and row["val PPL per LR (* = best)"].count("*") == 1


# ------------------------------------------------------------------------------ budgets
def test_epochs_and_tokens_become_steps(data, tmp_path):
    n_train = len(prepare_data(data["text"], vocab_size=300, cache_dir=data["cache"]).splits["train"])
    for flag, value, steps in (("--tokens", "700", math.ceil(700 / 128)),
                               ("--epochs", "0.05", math.ceil(0.05 * n_train / 128))):
        out = tmp_path / flag.strip("-")
        assert main(["train", *tiny(data, out, flag, value, "--stop-at", "1", steps=None)]) == 0
        train = RunConfig.from_dict(json.loads((out / "config.json").read_text())).train
        assert train.steps == steps and train.warmup_steps == min(50, steps // 10)
        assert getattr(train, flag.strip("-")) == float(value)


def test_old_train_configs_load_with_todays_behaviour():
    old = {k: v for k, v in TrainConfig().to_dict().items() if k not in ("epochs", "tokens", "early_stopping_patience")}
    config = TrainConfig.from_dict(old)
    assert (config.epochs, config.tokens, config.early_stopping_patience) == (None, None, 0)


# ------------------------------------------------------------------------ early stopping
def test_early_stopping_counts_evaluations_without_a_new_best():
    early = EarlyStopping(2)
    assert [early.update(s, p) for s, p in enumerate([10, 9, 9.5, 8, 8, float("nan")], 1)] == \
        [False, False, False, False, False, True]
    assert early.summary() == dict(best_step=4, best_val_ppl=8)


PLANTED = {1: 10.0, 2: 9.0, 3: 9.5, 4: 9.7, 5: 9.8, 6: 8.0, 7: 7.0, 8: 6.0}  # val ppl of the evaluation at step k


@pytest.fixture
def planted_val(monkeypatch):
    """Periodic evaluations (EVAL_BATCHES batches) report PLANTED ppl: the best is step 2."""
    real = UniversalTrainer.evaluate

    def evaluate(self, model, val_batches, *args, **kwargs):
        stats = real(self, model, val_batches, *args, **kwargs)
        return dict(stats, ppl=PLANTED[self.step + 1]) if len(val_batches) == EVAL_BATCHES else stats

    monkeypatch.setattr(UniversalTrainer, "evaluate", evaluate)


def test_early_stopping_stops_when_val_ppl_stops_improving(data, tmp_path, planted_val, capsys):
    flags = ("--eval-every", "1", "--early-stopping-patience", "2")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["train", *tiny(data, straight, *flags, steps=8)]) == 0
    assert state(straight)["step"] == 4  # evaluations 3 and 4 did not beat step 2
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [1, 2, 3, 4]
    assert [r for r in records if r["kind"] == "early_stop"] == [dict(kind="early_stop", step=4, best_step=2,
                                                                      best_val_ppl=9.0)]
    assert records[-1]["kind"] == "final" and records[-1]["best_step"] == 2 and records[-1]["stopped_early"]
    before = (straight / "ckpt.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(straight), "--resume", "--no-progress"]) == 0
    assert "already stopped early at step 4" in capsys.readouterr().err
    assert (straight / "ckpt.pt").read_bytes() == before
    # interrupted before the stop, the resumed run replays its evaluations and stops at the same step
    assert main(["train", *tiny(data, stopped, *flags, "--stop-at", "3", steps=8)]) == 0
    assert main(["train", "--out", str(stopped), "--resume", "--no-progress"]) == 0
    a, b = state(straight), state(stopped)
    assert b["step"] == 4 and all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


# ---------------------------------------------------------------------------- bad flags
@pytest.mark.parametrize("command, flags, needle", [
    ("compare", ["--seeds", "0,x"], "--seeds"),
    ("compare", ["--seeds", "1,1"], "--seeds"),
    ("compare", ["--seeds", "0,1", "--seed", "3"], "--seeds"),
    ("compare", ["--lrs", "0,1e-3"], "--lrs"),
    ("compare", ["--lrs", "fast"], "--lrs"),
    ("compare", ["--lrs", "1e-3", "--lr", "1e-3"], "--lrs"),
    ("compare", ["--epochs", "1"], "--epochs"),
    ("train", ["--tokens", "1000"], "--tokens"),
    ("train", ["--epochs", "1", "--tokens", "1000", "!"], "--tokens"),
    ("train", ["--epochs", "-1", "!"], "--epochs"),
    ("train", ["--tokens", "100", "!"], "--tokens"),
    ("train", ["--early-stopping-patience", "2", "--eval-every", "0"], "--early-stopping-patience"),
    ("train", ["--early-stopping-patience", "-1"], "--early-stopping-patience"),
])
def test_bad_flags_are_one_error_line_naming_the_flag(data, tmp_path, capsys, command, flags, needle):
    no_steps = "!" in flags  # "!": the flags are the budget, without --steps
    argv = tiny(data, tmp_path / "out", *[f for f in flags if f != "!"], steps=None if no_steps else STEPS)
    capsys.readouterr()
    assert main([command, *argv]) == 2
    assert needle in error_line(capsys)
    assert not (tmp_path / "out").exists()
