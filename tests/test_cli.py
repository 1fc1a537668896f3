"""The fastexit command on tiny runs (d_model 32, vocab 300, a few steps), called in-process."""
import dataclasses
import json
import math
import random
import re
import shutil

import pytest
import torch

from fastexit import PRESETS, report, runs
from fastexit import checkpoint as ckpt
from fastexit.cli import main
from fastexit.compare import LAYER_LR_CONFIGS
from fastexit.config import TRAIN_CONFIDENCE_DEFAULTS, TRAIN_SWEEP_THRESHOLDS, RunConfig
from fastexit.trainer import UniversalTrainer
from fastexit.runs import LOCK_FILES, Run, read_config

STEPS = 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WORDS = ("the king queen lord lady sword crown night day love death fair foul heart blood honour "
         "speak go come my thy thou art is not and but what doth hath shall").split()


def write_play(path, n_speeches, seed=0):
    rng = random.Random(seed)
    speeches = []
    for _ in range(n_speeches):
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        speeches.append(f"{rng.choice(['HAMLET', 'OPHELIA', 'KING', 'QUEEN'])}:\n{line.capitalize()}.\n")
    path.write_text("\n".join(speeches), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return dict(text=write_play(root / "play.txt", 1500), cache=root / "cache")


def tiny(data, out, *extra):
    return ["--data", str(data["text"]), "--vocab-size", "300", "--cache-dir", str(data["cache"]),
            "--d-model", "32", "--n-heads", "2", "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "32",
            "--eval-every", "4", "--eval-batches", "2", "--ckpt-every", "3", "--no-progress", "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """One uninterrupted tiny run (asymmetric_best, train's default learned confidence), shared by
    the read-only tests."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert main(["train", *tiny(data, out)]) == 0
    return out


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastexit: error: "), err
    return err[0]


def run_files(run_dir):
    """{name: bytes} of a run folder's files, but its lock files (a writer's lock holds its PID)."""
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name not in LOCK_FILES}


def state(run_dir):
    return torch.load(run_dir / ckpt.CKPT_NAME, weights_only=True)


def assert_same_final_state(a, b):
    sa, sb = state(a), state(b)
    assert sa["step"] == sb["step"] == STEPS
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    for p, s in sa["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, sb["optimizer"]["state"][p][k]), (p, k)
    assert sa["data_state"] == sb["data_state"]


def table_rows(text, first_header):
    """Rows (dicts) of the markdown table whose first header cell is `first_header`."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    start = next(i for i, ln in enumerate(lines) if ln.split("|")[1].strip() == first_header)
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for ln in lines[start + 2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(header) or cells == header:
            break
        rows.append(dict(zip(header, cells)))
    return rows


# ----------------------------------------------------------------------------- help
@pytest.mark.parametrize("argv", [[], ["train"], ["eval"], ["compare"], ["sweep"], ["generate"]])
def test_help_everywhere(argv, capsys):
    assert main([*argv, "--help"]) == 0
    assert "usage: fastexit" in capsys.readouterr().out


# ---------------------------------------------------------------------------- train
def test_train_writes_metrics_config_and_checkpoint(run, data):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 8]
    final = records[-1]
    assert final["kind"] == "final" and final["step"] == STEPS and final["split"] == "val"
    for key in ("ppl", "bpb", "acc", "shallow_ratio", "compute_cost", "ppl_L1", "ppl_L2", "ppl_L3"):
        assert math.isfinite(final[key]), key
    config = json.loads((run / "config.json").read_text())
    saved = state(run)
    assert config == saved["run_config"]  # the checkpoint stores the config once, as config.json has it
    assert not {"model_config", "universal_config", "data"} & set(saved)
    typed = RunConfig.from_dict(config)
    # the preset, routed by learned confidence heads trained beside the LM (train's default)
    assert typed.method == dataclasses.replace(PRESETS["asymmetric_best"], **TRAIN_CONFIDENCE_DEFAULTS)
    assert typed.preset == "asymmetric_best"
    assert typed.model.d_model == 32 and typed.train.steps == STEPS and typed.train.warmup_steps == 0
    assert typed.data.identity["vocab_size"] == typed.model.vocab_size <= 300


def test_final_table_bits_per_byte_use_the_scored_bytes(run, data):
    """bpb = mean NLL * tokens / (bytes of exactly the scored target tokens * ln 2)."""
    from fastexit.data import prepare_data, sequential_batches
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    corpus = prepare_data(data["text"], vocab_size=300, cache_dir=data["cache"])
    batches = sequential_batches(corpus.splits["val"], 4, 32)
    n_bytes = sum(len(corpus.decode(y.reshape(-1).tolist()).encode("utf-8")) for _, y in batches)  # ASCII text
    assert final["n_tokens"] == sum(y.numel() for _, y in batches)
    assert final["bpb"] == pytest.approx(final["nll"] * final["n_tokens"] / (n_bytes * math.log(2)), rel=1e-12)


def test_train_prints_the_eval_table_and_what_early_exit_buys(data, tmp_path, capsys):
    out = tmp_path / "custom"
    argv = tiny(data, out, "--layer-weights", "1=0.5,3=0.5", "--routing-threshold", "0.3",
                "--alpha-schedule", "linear:0.9:0.5", "--layer-lr-scales", "1=1,2=0.5,3=0.1")
    argv[argv.index("--steps") + 1] = "3"
    assert main(["train", *argv]) == 0
    text = capsys.readouterr().out
    (row,) = table_rows(text, "split")
    assert row["split"] == "val" and {"ppl", "bits/byte", "acc", "shallow_ratio", "compute_cost", "ppl_L3"} <= set(row)
    sweep = table_rows(text, "routing_threshold")
    assert [r["routing_threshold"] for r in sweep] == [f"{t:g}" for t in TRAIN_SWEEP_THRESHOLDS]
    assert all(float(r["speedup_vs_exact"]) > 0 for r in sweep) and float(sweep[0]["shallow_ratio"]) == 0
    full = float(sweep[0]["ppl"])
    assert float(sweep[0]["ppl"]) == pytest.approx(float(row["ppl_L3"]), rel=1e-3)  # threshold 0: full depth
    assert "keeps ppl within 2% of full depth" in text or "No threshold in this table" in text
    assert re.search(r"This table took \d+ s \(fastexit train --no-table skips it\)\.", text)
    best = report.cheapest_within([dict(r, ppl=float(r["ppl"]), compute_cost=float(r["compute_cost"]))
                                   for r in sweep], full, 0.02)
    assert best is not None and float(best["ppl"]) <= 1.02 * full
    method = RunConfig.from_dict(json.loads((out / "config.json").read_text())).method
    assert method.routing_threshold == 0.3 and method.alpha_schedule.kind == "linear"
    assert method.layer_lr_scales == {1: 1.0, 2: 0.5, 3: 0.1}


def test_old_flag_spellings_still_work_with_a_note(data, tmp_path, capsys):
    out = tmp_path / "old"
    argv = tiny(data, out, "--threshold", "0.3", "--layer-lr", "1=1,2=0.5,3=0.1", "--warmup", "1")
    argv[argv.index("--steps") + 1] = "2"
    assert main(["train", *argv]) == 0
    err = capsys.readouterr().err
    for old, new in (("--threshold", "--routing-threshold"), ("--layer-lr", "--layer-lr-scales"),
                     ("--warmup", "--warmup-steps")):
        assert f"{old} is deprecated; use {new}" in err
    config = RunConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert config.method.routing_threshold == 0.3 and config.method.layer_lr_scales == {1: 1.0, 2: 0.5, 3: 0.1}
    assert config.train.warmup_steps == 1


@pytest.mark.parametrize("command, flags", [
    ("train", ["--routing-threshold", "--exit-layer", "--layer-lr-scales", "--warmup-steps"]),
    ("eval", ["--routing-threshold", "--compare-exact", "--eval-batches"]),
    ("sweep", ["--sweep-thresholds", "--compare-exact"]),
    ("generate", ["--routing-threshold"]),
])
def test_help_uses_the_config_vocabulary(command, flags, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in flags)
    assert not re.search(r"--(threshold|layer-lr|warmup|thresholds|param-dtype)\b(?!-)", text)
    if command == "sweep":  # in train, --routing-thresholds is one threshold per exit; sweep's candidates differ
        assert "--routing-thresholds" not in text


# --------------------------------------------------------------------------- resume
def test_stop_then_resume_matches_an_uninterrupted_run(run, data, tmp_path):
    out = tmp_path / "stopped"
    assert main(["train", *tiny(data, out, "--stop-at", "4")]) == 0
    assert state(out)["step"] == 4
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert_same_final_state(run, out)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))


def test_resume_reads_the_checkpoint_once(data, tmp_path, monkeypatch):
    out = tmp_path / "stopped"
    assert main(["train", *tiny(data, out, "--stop-at", "3")]) == 0
    reads, real = [], ckpt.load_checkpoint
    monkeypatch.setattr(ckpt, "load_checkpoint", lambda path, **kw: reads.append(path) or real(path, **kw))
    try:
        run = Run.resume(out)
        assert reads == [out / ckpt.CKPT_NAME] and run.payload["step"] == 3
        assert run.train(progress=False) == STEPS  # the checkpoint read once is the one training continues from
    finally:
        runs.unlock_run(out)


def test_layer_dropout_and_distillation_resume_to_the_uninterrupted_run(data, tmp_path):
    flags = ("--layer-dropout", "0.4:linear", "--distill-weight", "0.5", "--distill-temperature", "2")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["train", *tiny(data, straight, *flags)]) == 0
    method = RunConfig.from_dict(json.loads((straight / "config.json").read_text())).method
    assert (method.distill_weight, method.distill_temperature) == (0.5, 2.0)
    assert (method.layer_dropout.max_rate, method.layer_dropout.shape) == (0.4, "linear")
    assert main(["train", *tiny(data, stopped, *flags, "--stop-at", "4")]) == 0
    assert main(["train", "--out", str(stopped), "--resume", "--no-progress"]) == 0
    assert_same_final_state(straight, stopped)


@pytest.mark.parametrize("value", ["1.5", "0.2:cubic", "x"])
def test_bad_layer_dropout_flag_names_it(data, tmp_path, capsys, value):
    assert main(["train", *tiny(data, tmp_path / "run", "--layer-dropout", value)]) == 2
    assert "--layer-dropout" in error_line(capsys)


def test_kill_mid_run_then_resume_matches_an_uninterrupted_run(run, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "killed"
    real_loss = UniversalTrainer.compute_loss

    def dying_loss(self, *args):
        if self.step == 5:  # Ctrl-C in the middle of step 6: the checkpoint of step 3 is the last
            raise KeyboardInterrupt
        return real_loss(self, *args)

    monkeypatch.setattr(UniversalTrainer, "compute_loss", dying_loss)
    assert main(["train", *tiny(data, out)]) == 130
    assert "holds step 3" in capsys.readouterr().err
    assert state(out)["step"] == 3
    monkeypatch.setattr(UniversalTrainer, "compute_loss", real_loss)
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert_same_final_state(run, out)


def test_resume_of_a_finished_run_only_evaluates(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = (copy / ckpt.CKPT_NAME).read_bytes()
    assert main(["train", "--out", str(copy), "--resume", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "already trained" in captured.err and "What early exit buys" in captured.out
    assert (copy / ckpt.CKPT_NAME).read_bytes() == before
    assert main(["train", "--out", str(copy), "--resume", "--no-progress", "--no-table"]) == 0
    out = capsys.readouterr().out
    assert table_rows(out, "split") and "What early exit buys" not in out and "table took" not in out


# ------------------------------------------------------------------------ bad input
def test_existing_run_is_never_overwritten(run, data, capsys):
    before = run_files(run)
    capsys.readouterr()
    assert main(["train", *tiny(data, run)]) == 2
    assert "--resume" in error_line(capsys)
    assert run_files(run) == before


@pytest.mark.parametrize("case, flags, needle", [
    ("missing", ["--data", "{tmp}/nope.txt"], "nope.txt"),
    ("empty", ["--data", "{tmp}/empty.txt"], "empty"),
    ("small", ["--data", "{tmp}/small.txt"], "too small"),
    ("preset", ["--preset", "best_ever"], "best_ever"),
    ("weights", ["--layer-weights", "1:0.7,3=0.3"], "--layer-weights"),
    ("weights_layer", ["--layer-weights", "1=0.7,9=0.3"], "layer 9"),
    ("alpha", ["--alpha-schedule", "wobbly:0.9"], "--alpha-schedule"),
    ("threshold", ["--routing-threshold", "1.5"], "routing_threshold"),
    ("warmup", ["--warmup-steps", "99"], "warmup_steps"),
    ("fraction", ["--train-fraction", "1.5"], "train_fraction"),
    ("flag", ["--colour", "red"], "--colour"),
])
def test_bad_input_is_one_error_line(case, flags, needle, data, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "small.txt").write_text("KING:\nGo.\n" * 3)
    capsys.readouterr()
    flags = [f.format(tmp=tmp_path) for f in flags]
    argv = tiny(data, tmp_path / "out")
    if "--data" in flags:
        del argv[0:2]
    assert main(["train", *argv, *flags]) == 2
    assert needle in error_line(capsys)
    assert not (tmp_path / "out").exists()


def corrupt(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"not a checkpoint at all" * 50)
    else:  # a flipped byte inside the checkpoint
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(flipped))


@pytest.mark.parametrize("how", ["truncated", "garbage", "flipped"])
def test_corrupted_checkpoint_is_one_error_line_and_untouched(how, run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    corrupt(copy / ckpt.CKPT_NAME, how)
    before = run_files(copy)
    capsys.readouterr()
    assert main(["eval", "--run", str(copy)]) == 2
    assert ckpt.CKPT_NAME in error_line(capsys)
    assert main(["train", "--out", str(copy), "--resume", "--no-progress"]) == 2
    assert ckpt.CKPT_NAME in error_line(capsys)
    assert run_files(copy) == before


def test_mismatched_resume_is_refused(run, data, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = (copy / ckpt.CKPT_NAME).read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(copy), "--resume", "--d-model", "64"]) == 2
    assert "--d-model 64" in error_line(capsys)
    assert main(["train", "--out", str(copy), "--resume", "--vocab-size", "400"]) == 2
    assert "--vocab-size" in error_line(capsys)
    assert main(["train", "--out", str(copy), "--resume", "--routing-threshold", "0.5"]) == 2
    assert "--routing-threshold 0.5" in error_line(capsys)
    assert main(["train", "--out", str(copy), "--resume", "--layer-weights", "1=0.5,3=0.5"]) == 2
    assert "--layer-weights" in error_line(capsys)
    assert main(["train", "--out", str(copy), "--resume", "--train-fraction", "0.5"]) == 2
    assert "--train-fraction 0.5" in error_line(capsys)
    assert (copy / ckpt.CKPT_NAME).read_bytes() == before


def test_changed_data_is_refused(data, tmp_path, capsys):
    text = write_play(tmp_path / "play.txt", 1500, seed=1)
    out = tmp_path / "run"
    argv = tiny(dict(data, text=text, cache=tmp_path / "cache"), out, "--stop-at", "3")
    assert main(["train", *argv]) == 0
    before = (out / ckpt.CKPT_NAME).read_bytes()
    write_play(text, 1500, seed=2)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 2
    assert "data mismatch" in error_line(capsys)
    assert main(["eval", "--run", str(out)]) == 2
    assert "fingerprint" in error_line(capsys)
    assert (out / ckpt.CKPT_NAME).read_bytes() == before


# ---------------------------------------------------------------- eval/sweep/generate
def test_eval_compact_on_test_split(run, capsys):
    assert main(["eval", "--run", str(run), "--mode", "compact", "--split", "test", "--routing-threshold", "0.05",
                 "--compare-exact"]) == 0
    (row,) = table_rows(capsys.readouterr().out, "split")
    assert row["split"] == "test"
    assert float(row["speedup_vs_exact"]) > 0
    assert float(row["ppl"]) - float(row["ppl_exact"]) == pytest.approx(float(row["ppl_diff_vs_exact"]), abs=2e-2)


def test_sweep_table_and_plot(run, capsys):
    assert main(["sweep", "--run", str(run), "--sweep-thresholds", "0.5,0,0.005,0.02,0.1,1"]) == 0
    rows = table_rows(capsys.readouterr().out, "routing_threshold")
    assert [float(r["routing_threshold"]) for r in rows] == [0, 0.005, 0.02, 0.1, 0.5, 1]
    shallow = [float(r["shallow_ratio"]) for r in rows]
    cost = [float(r["compute_cost"]) for r in rows]
    assert shallow[0] == 0 and cost[0] == 1
    assert all(a >= b for a, b in zip(shallow[1:], shallow[2:]))  # fewer tokens leave as the bar rises
    assert all(a <= b for a, b in zip(cost[1:], cost[2:]))
    assert shallow[1] > 0  # a 0.5% bar (uniform is 1/300) lets tokens leave
    assert any(r["pareto"] == "*" for r in rows)
    assert (run / "sweep-exact.md").read_text().count("\n| ") == len(rows) + 1
    assert (run / "sweep-exact.png").read_bytes().startswith(PNG_MAGIC)


def test_sweep_takes_its_candidates_under_the_old_spelling_with_a_note(run, capsys):
    assert main(["sweep", "--run", str(run), "--routing-thresholds", "0,0.5", "--eval-batches", "1"]) == 0
    captured = capsys.readouterr()
    assert "--routing-thresholds is deprecated; use --sweep-thresholds" in captured.err
    assert [r["routing_threshold"] for r in table_rows(captured.out, "routing_threshold")] == ["0", "0.5"]
    assert main(["sweep", "--run", str(run), "--sweep-thresholds", "0,1.5"]) == 2
    assert "--sweep-thresholds" in error_line(capsys)


def test_calibrate_writes_thresholds_the_run_then_routes_with(data, tmp_path, capsys):
    copy = tmp_path / "copy"  # max_prob: any exit layers can be calibrated (learned heads sit at the run's exits)
    assert main(["train", *tiny(data, copy, "--confidence", "max_prob")]) == 0
    capsys.readouterr()
    assert main(["calibrate", "--run", str(copy), "--min-agreement", "60%", "--exit-layers", "1,2"]) == 0
    out = capsys.readouterr().out
    record = json.loads((copy / "calibration.json").read_text())
    assert record["exits"] == [1, 2] and record["target"] == 0.6 and record["step"] == STEPS
    assert f"routing_thresholds {record['thresholds']}" in out
    test = {r["split"]: r for r in table_rows(out, "split")}["test"]
    # The held-out row is the routing outcome of the chosen thresholds; eval now routes with them (its own pass).
    assert main(["eval", "--run", str(copy), "--split", "test"]) == 0
    (row,) = table_rows(capsys.readouterr().out, "split")
    for key in ("ppl", "compute_cost", "shallow_ratio", "exit_ratio_L1", "exit_ratio_L2"):
        assert float(row[key]) == pytest.approx(float(test[key]), abs=1e-3), key
        assert record["test"][key] == pytest.approx(float(test[key]), abs=1e-3), key
    if record["certified"]:
        assert record["test"]["agreement"] >= 0.6 - 0.1  # a held-out split scatters around the guarantee
    # Trained further, the run's calibration no longer holds: it is ignored with a note.
    assert main(["train", "--out", str(copy), "--resume", "--steps", str(STEPS + 2), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(copy), "--split", "test"]) == 0
    captured = capsys.readouterr()
    assert "calibration.json was chosen for step" in captured.err and "exit_layer 1" in captured.out


def test_a_damaged_calibration_is_one_error_naming_it_and_calibrate_needs_a_loaded_run(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "calibration.json").write_text('{"exits": [1]}')
    capsys.readouterr()
    assert main(["eval", "--run", str(copy)]) == 2
    assert "calibration.json" in error_line(capsys)
    with pytest.raises(ValueError, match="Run.load"):
        Run(copy, read_config(copy)).calibrate(min_agreement=0.9)


@pytest.mark.parametrize("flags, needle", [
    (["--min-agreement", "0.9", "--max-ppl-increase", "2%"], "not allowed with"),
    (["--min-agreement", "lots"], "--min-agreement"),
    (["--min-agreement", "0.9", "--delta", "1.5"], "delta"),
    (["--max-ppl-increase=-1%"], "max_ppl_increase"),
    (["--min-agreement", "0.9", "--exit-layers", "2,1"], "exit"),
])
def test_calibrate_bad_input_is_one_error_line(run, flags, needle, capsys):
    capsys.readouterr()
    assert main(["calibrate", "--run", str(run), *flags]) == 2
    assert needle in error_line(capsys)
    assert not (run / "calibration.json").exists()


def test_learned_confidence_trains_evaluates_and_resumes(data, tmp_path, capsys):
    out = tmp_path / "learned"
    flags = ["--confidence", "learned", "--confidence-loss-weight", "1", "--exit-layers", "1,2",
             "--routing-thresholds", "0.5,0.5"]
    assert main(["train", *tiny(data, out, "--stop-at", "3"), *flags]) == 0
    method = json.loads((out / "config.json").read_text())["method"]
    assert (method["confidence"], method["confidence_loss_weight"], method["exit_layers"]) == ("learned", 1.0, [1, 2])
    assert any(k.startswith("confidence_heads.") for k in state(out)["model"])
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--confidence-loss-weight", "2", "--no-progress"]) == 2
    assert "--confidence-loss-weight 2" in error_line(capsys)
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--split", "test"]) == 0
    text = capsys.readouterr().out
    (row,) = table_rows(text, "split")
    assert "confidence learned" in text and {"exit_ratio_L1", "exit_ratio_L2"} <= set(row)
    assert main(["sweep", "--run", str(out), "--confidence", "max_prob,margin,learned", "--exit-layers", "1",
                 "--exit-layers", "1,2", "--routing-thresholds", "0,0.5"]) == 0
    rows = table_rows(capsys.readouterr().out, "routing")
    variants = [f"exit_layers {e}, confidence {c}" for e in ([1], [1, 2]) for c in ("max_prob", "margin", "learned")]
    assert [r["routing"] for r in rows] == [v for v in variants for _ in range(2)]
    assert all(float(r["compute_cost"]) == 1 for r in rows[::2])  # threshold 0: full depth in every variant
    assert (out / "sweep-exact.png").read_bytes().startswith(PNG_MAGIC)


def test_learned_confidence_on_a_run_without_heads_names_it(data, tmp_path, capsys):
    run = tmp_path / "max_prob"
    assert main(["train", *tiny(data, run, "--confidence", "max_prob", "--no-table")]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--confidence", "learned"]) == 2
    assert "confidence" in error_line(capsys)


def test_pareto_flags():
    rows = [dict(ppl=10, compute_cost=1.0), dict(ppl=12, compute_cost=0.5), dict(ppl=13, compute_cost=0.6),
            dict(ppl=10, compute_cost=1.0)]
    assert report.pareto_flags(rows) == [True, True, False, True]


def test_cheapest_threshold_within_the_ppl_bound():
    rows = [dict(routing_threshold="0", ppl=100.0, compute_cost=1.0, shallow_ratio=0.0),
            dict(routing_threshold="0.2", ppl=104.0, compute_cost=0.6, shallow_ratio=0.6),
            dict(routing_threshold="0.5", ppl=101.5, compute_cost=0.8, shallow_ratio=0.3),
            dict(routing_threshold="0.9", ppl=100.2, compute_cost=0.9, shallow_ratio=0.15)]
    assert report.cheapest_within(rows, 100.0, 0.02)["routing_threshold"] == "0.5"
    assert "routing_threshold 0.5 keeps ppl within 2% of full depth" in report.within_line(rows, 100.0, 0.02)
    assert report.within_line(rows[:1], 100.0, 0.02).startswith("No threshold")
    # with FLOPs counted, the cheapest in FLOPs: 0.5 saves layers but costs FLOPs (an exit head for every token)
    flops = [dict(r, flop_cost=f) for r, f in zip(rows, [1.0, 0.7, 1.2, 0.95])]
    assert report.cheapest_within(flops, 100.0, 0.02, "flop_cost")["routing_threshold"] == "0.9"
    assert report.within_line(flops, 100.0, 0.02).endswith("compute_cost 0.900, flop_cost 0.950.")
    costly = [dict(r, flop_cost=f) for r, f in zip(rows, [1.0, 1.1, 1.2, 1.3])]
    assert report.within_line(costly, 100.0, 0.02).startswith("No threshold in this table saves FLOPs")


def test_routing_text_and_the_early_exit_table_name_the_rule_and_the_time():
    one = PRESETS["asymmetric_best"]
    assert report.routing_text(one) == "routing_threshold 0.95, exit_layer 1"
    assert report.routing_text(one, 0.5) == "routing_threshold 0.5, exit_layer 1"
    rows = [dict(routing_threshold="0", ppl=100.0, bpb=1.0, acc=0.5, shallow_ratio=0.0, compute_cost=1.0,
                 flop_cost=1.0, speedup_vs_exact=1.0),
            dict(routing_threshold="0.5", ppl=101.0, bpb=1.0, acc=0.5, shallow_ratio=0.4, compute_cost=0.7,
                 flop_cost=0.9, speedup_vs_exact=1.2)]
    text = report.early_exit_text(rows, "val", one, 0.02, 12.4)
    assert text.startswith("What early exit buys (val split, compact mode: deeper layers really skipped; exit_layer 1)")
    assert "routing_threshold 0.5 keeps ppl within 2%" in text
    assert text.endswith("This table took 12 s (fastexit train --no-table skips it).")


@pytest.mark.parametrize("threshold, early", [("0", 0), ("0.001", 12)])
def test_generate_shows_exit_layers(run, threshold, early, capsys):
    assert main(["generate", "--run", str(run), "--prompt", "KING:\n", "--routing-threshold", threshold,
                 "--max-new-tokens", "12", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    layers = re.search(r"exit layer per token: ([\d ]+)", out).group(1).split()
    assert len(layers) == 12 and layers.count("1") == early and layers.count("3") == 12 - early
    assert f"exited early: {early}/12 tokens" in out
    assert out.startswith("KING:\n") and out.count("[") >= min(early, 1)


def test_generate_speculative_prints_the_full_depth_text_and_acceptance_rate(run, capsys):
    argv = ["generate", "--run", str(run), "--prompt", "KING:\n", "--max-new-tokens", "12", "--temperature", "0"]
    assert main([*argv, "--routing-threshold", "0"]) == 0
    full = capsys.readouterr().out.split("\nexit layer per token")[0]
    assert main([*argv, "--speculative", "3"]) == 0  # the run routes (asymmetric_best): speculative replaces it
    out = capsys.readouterr().out
    assert out.split("\nexit layer per token")[0] == full
    rate = float(re.search(r"speculative=3: acceptance rate ([\d.]+)% of drafts", out).group(1))
    assert 0 <= rate <= 100
    assert main([*argv, "--speculative", "0"]) == 2 and "speculative" in error_line(capsys)


def test_generate_rejects_an_empty_prompt(run, capsys):
    capsys.readouterr()
    assert main(["generate", "--run", str(run), "--prompt", ""]) == 2
    assert "--prompt" in error_line(capsys)


# --------------------------------------------------------------------------- compare
def test_compare_every_preset_and_layer_lr(data, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = tiny(data, out, "--presets", "all", "--layer-lr-configs", "--split", "val")
    argv[argv.index("--steps") + 1] = "3"
    assert main(["compare", *argv]) == 0
    text = (out / "compare.md").read_text()
    assert text.strip() == capsys.readouterr().out.strip()
    rows = table_rows(text, "Model")
    assert [r["Model"] for r in rows] == list(PRESETS)
    for r in rows:
        assert float(r["PPL"]) > 1 and 1 / 3 <= float(r["compute_cost"]) <= 1
    lr_rows = {r["Config"]: r for r in table_rows(text, "Config")}
    assert list(lr_rows) == [label for label, _, _ in LAYER_LR_CONFIGS]
    base = float(lr_rows["Standard (no Layer-wise LR)"]["PPL"])
    assert lr_rows["Standard (no Layer-wise LR)"]["vs Baseline"] == "baseline"
    assert base == float(next(r for r in rows if r["Model"] == "asymmetric_best")["PPL"])
    dec = lr_rows["Decreasing LR (1.0, 0.5, 0.1)"]
    gain = (base - float(dec["PPL"])) / base * 100
    assert dec["vs Baseline"] == (f"{gain:.1f}% improvement" if gain >= 0 else f"{-gain:.1f}% worse")
    assert (out / "compare.png").read_bytes().startswith(PNG_MAGIC)
    method = json.loads((out / "asymmetric_best_lr-decreasing" / "seed0" / "config.json").read_text())["method"]
    assert method["layer_lr_scales"] == {"1": 1.0, "2": 0.5, "3": 0.1}
