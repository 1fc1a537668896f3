"""Issue 28: nothing lost, nothing used wrongly. One test (at least) per defect the hostile-user
probes found: two writers on one run folder, kill -9 leftovers, a failing command rebuilding a
run's cache, calibration on NaN, a diverging run, every damaged file a run reads, and the
failures that printed a traceback instead of one ``fastexit: error:`` line."""
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from fastexit import atomic, runs
from fastexit import checkpoint as ckpt
from fastexit import data as fdata
from fastexit.cli import main
from fastexit.data import prepare_data, train_tokenizer
from fastexit.kernels import weighted_linear_cross_entropy
from fastexit.runs import LOCK_FILES, Run
from fastexit.trainer import UniversalTrainer
from test_cli import STEPS, data, error_line, tiny, write_play  # noqa: F401 - data is a fixture

PY = sys.executable
CACHE_FILES = ("meta.json", "tokenizer.json", "train.bin", "val.bin", "test.bin")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One tiny run (checkpoints at steps 3, 6 and 8), copied by the tests that change it."""
    out = tmp_path_factory.mktemp("robust") / "run"
    assert main(["train", *tiny(data, out, "--no-table")]) == 0
    return out


def copy_of(run, tmp_path, name="copy"):
    return shutil.copytree(run, tmp_path / name)


def strict_json(line):
    """json.loads refusing the bare NaN / Infinity Python writes."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(line, parse_constant=refuse)


def flip_byte(path, at=None):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 if at is None else at] ^= 0xFF
    path.write_bytes(bytes(raw))


def one_error(stderr):
    lines = [line for line in stderr.splitlines() if line.startswith("fastexit: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def hold_lock(folder):
    """Another process holding ``folder``'s lock (as a training process would); kill it to end."""
    script = ("import sys, time\nfrom fastexit.runs import lock_run\nlock_run(sys.argv[1])\n"
              "print('locked', flush=True)\ntime.sleep(600)")
    holder = subprocess.Popen([PY, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


# --------------------------------------------------------------- 1. one writer per run
def test_two_trains_started_together_exactly_one_trains(data, tmp_path, trained):
    """Before: both exited 0 and metrics.jsonl lost lines and held two final lines."""
    out = tmp_path / "run"
    argv = [PY, "-m", "fastexit.cli", "train", *tiny(data, out, "--no-table")]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = [(p, *p.communicate(timeout=600)) for p in procs]
    assert sorted(p.returncode for p, _, _ in done) == [0, 2], [err[-2000:] for _, _, err in done]
    winner = next(p for p, _, _ in done if p.returncode == 0)
    (loser_err,) = [err for p, _, err in done if p.returncode == 2]
    assert f"in use by process {winner.pid} on " in one_error(loser_err)
    records = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert [r["kind"] for r in records].count("final") == 1


def test_the_lock_dies_with_its_holder_and_readers_are_not_refused(trained, tmp_path, capsys):
    copy = copy_of(trained, tmp_path)
    holder = hold_lock(copy)
    try:
        capsys.readouterr()
        assert main(["train", "--out", str(copy), "--resume", "--no-progress"]) == 2
        assert f"in use by process {holder.pid} on " in error_line(capsys)
        assert main(["calibrate", "--run", str(copy), "--min-agreement", "0.9", "--eval-batches", "1"]) == 2
        assert f"in use by process {holder.pid} on " in error_line(capsys)
        assert main(["eval", "--run", str(copy), "--eval-batches", "1"]) == 0  # a reader: no writer lock
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: no clean-up of its own
        holder.wait()
    runs.lock_run(copy)  # the OS released it: no stale lock
    runs.unlock_run(copy)
    assert main(["train", "--out", str(copy), "--resume", "--no-progress", "--no-table"]) == 0


def test_a_refused_new_run_leaves_no_folder_and_frees_the_lock(data, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "run"
    assert main(["train", *tiny(data, out, "--routing-threshold", "1.5")]) == 2
    assert "routing_threshold" in error_line(capsys)
    assert not (tmp_path / "a").exists()
    assert str(out.resolve()) not in runs._HELD


# ------------------------------------------------------------ 6. kill -9 leftovers
def test_kill_9_leftovers_of_our_writers_go_on_the_next_start(trained, tmp_path):
    copy = copy_of(trained, tmp_path)
    # a writer killed (SIGKILL) halfway through an atomic write of ckpt.pt leaves .ckpt.pt.<pid>.tmp
    script = textwrap.dedent("""
        import os, signal, sys
        from pathlib import Path
        from fastexit.atomic import atomic_write
        def half(tmp):
            tmp.write_bytes(b"half a checkpoint" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write(Path(sys.argv[1]), half)
    """)
    killed = subprocess.run([PY, "-c", script, str(copy / ckpt.CKPT_NAME)])
    assert killed.returncode == -signal.SIGKILL
    left = [p.name for p in copy.iterdir() if p.name.startswith(".ckpt.pt.")]
    assert len(left) == 1 and re.fullmatch(r"\.ckpt\.pt\.\d+\.tmp", left[0])
    (copy / ".metrics.jsonl.12345.tmp").write_text("{}")
    (copy / ".ckpt-000006.tmp").mkdir()  # an unfinished sharded save
    (copy / ".model.tmp").mkdir()  # an unfinished transformers save
    mine = ["notes.tmp", ".notes.tmp", ".draft.v2.tmp"]  # not ours by pattern: they stay
    for name in mine:
        (copy / name).write_text("keep me")
    before = (copy / ckpt.CKPT_NAME).read_bytes()
    assert main(["train", "--out", str(copy), "--resume", "--no-progress", "--no-table"]) == 0
    assert sorted(p.name for p in copy.iterdir() if p.name not in LOCK_FILES) == \
        sorted(["ckpt.pt", "config.json", "metrics.jsonl", *mine])
    assert (copy / ckpt.CKPT_NAME).read_bytes() == before  # it was finished: nothing to train


def test_a_crashed_cache_build_is_cleaned_when_the_cache_is_next_read(tmp_path):
    text = write_play(tmp_path / "play.txt", 300)
    cache = tmp_path / "cache"
    prepare_data(text, vocab_size=300, cache_dir=cache)
    (tmp_path / ".cache.4242.tmp").mkdir()  # a build beside it, killed
    (cache / ".train.bin.4242.tmp").write_bytes(b"\0" * 10)  # an in-place write of an older fastexit, killed
    (tmp_path / "cache.4242.tmp").mkdir()  # not ours by pattern
    prepare_data(text, vocab_size=300, cache_dir=cache)
    assert not (tmp_path / ".cache.4242.tmp").exists() and not (cache / ".train.bin.4242.tmp").exists()
    assert (tmp_path / "cache.4242.tmp").exists()


# ------------------------------------------- 3. a failing command never rebuilds a run's cache
def test_a_failing_eval_leaves_the_runs_cache_and_tokenizer_alone(data, tmp_path, capsys):
    """Before: eval printed "data mismatch" after rebuilding the cache in place, and generate then
    decoded with the new tokenizer and exited 0."""
    text = write_play(tmp_path / "play.txt", 1500, seed=1)
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["train", *tiny(dict(data, text=text, cache=cache), out, "--stop-at", "3")]) == 0
    prompt = ["generate", "--run", str(out), "--prompt", "KING:", "--max-new-tokens", "8"]
    assert main(prompt) == 0
    said = capsys.readouterr().out
    before = {name: (cache / name).read_bytes() for name in CACHE_FILES}
    write_play(text, 1500, seed=2)  # the corpus is edited
    for command in (["eval", "--run", str(out)], ["sweep", "--run", str(out)],
                    ["calibrate", "--run", str(out), "--min-agreement", "0.9"],
                    ["train", "--out", str(out), "--resume", "--no-progress"]):
        assert main(command) == 2, command
        assert "data mismatch" in error_line(capsys)
    assert {name: (cache / name).read_bytes() for name in CACHE_FILES} == before
    assert main(prompt) == 0  # the run's own tokenizer, which the edit did not touch
    assert capsys.readouterr().out == said


def test_generate_refuses_a_tokenizer_the_run_was_not_trained_with(data, tmp_path, capsys):
    text = write_play(tmp_path / "play.txt", 1500, seed=4)
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["train", *tiny(dict(data, text=text, cache=cache), out, "--stop-at", "3")]) == 0
    other = train_tokenizer(write_play(tmp_path / "other.txt", 600, seed=7).read_text(), 300)
    assert other.get_vocab_size() == 300
    other.save(str(cache / "tokenizer.json"))  # a valid tokenizer of the same size, another vocabulary
    capsys.readouterr()
    assert main(["generate", "--run", str(out), "--prompt", "KING:", "--max-new-tokens", "4"]) == 2
    assert f"{cache / 'tokenizer.json'}: not the tokenizer the run was trained with" in error_line(capsys)


def test_a_changed_corpus_builds_its_cache_beside_the_old_one_and_swaps_it_in(tmp_path):
    text, cache = write_play(tmp_path / "play.txt", 300), tmp_path / "cache"
    old = prepare_data(text, vocab_size=300, cache_dir=cache)
    val, old_fp = old.splits["val"][:50].copy(), json.loads((cache / "meta.json").read_text())["fingerprint"]
    write_play(text, 300, seed=5)
    new = prepare_data(text, vocab_size=300, cache_dir=cache)
    assert new.cache_dir == cache and fdata.corpus_identity(new)["fingerprint"] != old_fp
    assert (old.splits["val"][:50] == val).all()  # a reader's memory map still sees the cache it opened
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["cache", "play.txt"]
    (cache / "notes.txt").write_text("mine")  # a folder that is not only a cache is never replaced
    write_play(text, 300, seed=6)
    with pytest.raises(fdata.CacheError, match="notes.txt"):
        prepare_data(text, vocab_size=300, cache_dir=cache)
    assert (cache / "notes.txt").exists()


# ------------------------------------------------------------------- 4. damaged files
@pytest.mark.parametrize("name, how", [("train.bin", "flip"), ("val.bin", "flip"), ("val.bin", "out_of_range"),
                                       ("test.bin", "truncate"), ("tokenizer.json", "truncate"),
                                       ("tokenizer.json", "flip"), ("meta.json", "truncate")])
def test_a_damaged_token_cache_is_one_error_naming_the_file(name, how, tmp_path):
    """Before: ids garbled in range gave a wrong perplexity with exit 0, out of range an
    IndexError, a truncated tokenizer.json a parser traceback."""
    text, cache = write_play(tmp_path / "play.txt", 300), tmp_path / "cache"
    prepare_data(text, vocab_size=300, cache_dir=cache)
    target = cache / name
    if how == "flip":
        flip_byte(target, at=len(target.read_bytes()) // 2 & ~1)
    elif how == "out_of_range":
        target.write_bytes(b"\xff\xff" + target.read_bytes()[2:])  # id 65535 >= vocab 300
    else:
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    damaged = target.read_bytes()
    with pytest.raises(fdata.CacheError, match=f"{target}: .*damaged"):
        prepare_data(text, vocab_size=300, cache_dir=cache)
    assert target.read_bytes() == damaged  # refused, not rebuilt over


@pytest.mark.parametrize("name", ["train.bin", "tokenizer.json"])
def test_a_damaged_cache_file_of_a_run_stops_eval_and_resume(name, data, tmp_path, capsys):
    text = write_play(tmp_path / "play.txt", 1500, seed=3)
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["train", *tiny(dict(data, text=text, cache=cache), out, "--stop-at", "3")]) == 0
    flip_byte(cache / name, at=64)
    capsys.readouterr()
    for command in (["eval", "--run", str(out)], ["train", "--out", str(out), "--resume", "--no-progress"]):
        assert main(command) == 2, command
        assert f"{cache / name}: " in error_line(capsys)
    assert main(["generate", "--run", str(out), "--prompt", "KING:", "--max-new-tokens", "4"]) == \
        (2 if name == "tokenizer.json" else 0)


def test_a_cache_written_before_digests_is_still_read(tmp_path):
    text, cache = write_play(tmp_path / "play.txt", 300), tmp_path / "cache"
    corpus = prepare_data(text, vocab_size=300, cache_dir=cache)
    meta = json.loads((cache / "meta.json").read_text())
    del meta["sha256"]
    (cache / "meta.json").write_text(json.dumps(meta))
    again = prepare_data(text, vocab_size=300, cache_dir=cache)
    assert (again.splits["train"] == corpus.splits["train"]).all()
    assert "files" not in fdata.corpus_identity(again)
    raw = bytearray((cache / "val.bin").read_bytes())
    raw[0:2] = b"\xff\xff"
    (cache / "val.bin").write_bytes(bytes(raw))
    with pytest.raises(fdata.CacheError, match="val.bin: damaged token cache .id 65535"):
        prepare_data(text, vocab_size=300, cache_dir=cache)


def test_run_files_that_do_not_parse_are_one_error_naming_them(trained, tmp_path, capsys):
    copy = copy_of(trained, tmp_path)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    for bad in ("42", '{"kind": "train", "step": "x"}', "[1, 2]"):
        (copy / "metrics.jsonl").write_text("\n".join(lines[:2] + [bad] + lines[2:]) + "\n")
        capsys.readouterr()
        assert main(["train", "--out", str(copy), "--resume", "--steps", str(STEPS + 1), "--no-progress"]) == 2
        assert f"{copy / 'metrics.jsonl'}, line 3: not a fastexit metrics record" in error_line(capsys)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for bad in ("[]", "42", '{"name": 1}', "{not json"):
        (fresh / "config.json").write_text(bad)
        assert main(["train", "--out", str(fresh), "--resume", "--no-progress"]) == 2
        assert f"{fresh / 'config.json'}: not a valid run config" in error_line(capsys)


def test_a_damaged_calibration_is_replaced_by_calibrate_and_named_by_the_others(trained, tmp_path, capsys):
    copy = copy_of(trained, tmp_path)
    for damaged, needle in (('{"exits": [1]}', "not a calibration"),
                            ('{"exits": [99], "thresholds": [0.5], "confidence": "max_prob", "step": 8}',
                             "does not fit the run")):
        (copy / "calibration.json").write_text(damaged)
        capsys.readouterr()
        assert main(["eval", "--run", str(copy), "--eval-batches", "1"]) == 2
        line = error_line(capsys)
        assert f"{copy / 'calibration.json'}: {needle}" in line and "calibrate again" in line
    assert main(["calibrate", "--run", str(copy), "--min-agreement", "0.5", "--eval-batches", "2"]) == 0
    assert json.loads((copy / "calibration.json").read_text())["step"] == STEPS
    assert main(["eval", "--run", str(copy), "--eval-batches", "1"]) == 0


# ------------------------------------------------------ 4. transformers runs and FSDP shards
@pytest.fixture(scope="module")
def hf_run(data, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from test_cli_hf import hf_args, hf_config
    root = tmp_path_factory.mktemp("hf_robust")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_config("llama")).save_pretrained(root / "llama")
    hf_data = dict(text=write_play(root / "play.txt", 400), cache=root / "cache")
    assert main([*hf_args(hf_data, root / "llama", root / "run", "--no-table")]) == 0
    return root


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_damaged_file_of_a_transformers_run_is_one_error_and_resume_leaves_it(name, hf_run, tmp_path, capsys):
    """Before: damaged weights gave ppl nan with exit 0, and --resume trained on them."""
    copy = copy_of(hf_run / "run", tmp_path)
    target = copy / ckpt.HF_DIR / name
    flip_byte(target, at=len(target.read_bytes()) - 20)  # same size: inside the tensor data / the JSON
    before = {p.name: p.read_bytes() for p in (copy / ckpt.HF_DIR).iterdir()}
    capsys.readouterr()
    assert main(["eval", "--run", str(copy), "--eval-batches", "1"]) == 2
    assert f"{target}: damaged" in error_line(capsys)
    assert main(["train", "--out", str(copy), "--resume", "--steps", "8", "--no-progress"]) == 2
    assert f"{target}: damaged" in error_line(capsys)
    assert {p.name: p.read_bytes() for p in (copy / ckpt.HF_DIR).iterdir()} == before
    target.unlink()
    assert main(["eval", "--run", str(copy), "--eval-batches", "1"]) == 2
    assert f"{target}: missing" in error_line(capsys)


def test_a_transformers_folder_without_its_sizes_or_with_cut_weights_is_one_error(hf_run, data, tmp_path, capsys):
    """Before: transformers filled in a 4096-wide Llama and failed after a long load; a truncated
    safetensors file was a SafetensorError traceback."""
    from test_cli_hf import hf_args
    folder = shutil.copytree(hf_run / "llama", tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    sized = dict(config)
    del config["hidden_size"], config["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(config))
    hf_data = dict(text=hf_run / "play.txt", cache=hf_run / "cache")
    capsys.readouterr()
    assert main(hf_args(hf_data, folder, tmp_path / "a")) == 2
    line = error_line(capsys)
    assert f"{folder / 'config.json'} does not give hidden_size, num_hidden_layers" in line
    (folder / "config.json").write_text(json.dumps(sized))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(hf_args(hf_data, folder, tmp_path / "b")) == 2
    assert f"{folder}: the model does not load" in error_line(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_checkpoint_records_and_checks_every_files_digest(tmp_path, trained):
    """One process writes the same torch.distributed.checkpoint folder as FSDP2's ranks."""
    run = Run.load(trained, need_data=False)
    trainer = UniversalTrainer(run.config.method, run.config.model.vocab_size)
    optimizer = trainer.create_optimizer(run.model, 1e-3)
    path = ckpt.save_sharded_checkpoint(tmp_path, model=run.model, run_config=run.config, optimizer=optimizer,
                                        step=8, data_state={"seed": 0, "step": 8})
    meta = ckpt.load_checkpoint(path)
    assert set(meta[ckpt.FILE_DIGESTS]) == {p.name for p in path.iterdir() if p.name != ckpt.META_NAME}
    shard = next(p for p in path.iterdir() if p.suffix == ".distcp")
    flip_byte(shard)
    with pytest.raises(ValueError, match=f"{shard}: damaged"):
        ckpt.load_checkpoint(path)


# ------------------------------------------------------------------------- 5. NaN / inf
def test_a_diverging_run_stops_with_one_line_and_keeps_its_last_finite_checkpoint(data, tmp_path, capsys):
    """A huge LR: the grad norm is NaN at step 2. Before: exit 0, NaN weights over the
    checkpoint, bare NaN in metrics.jsonl."""
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", *tiny(data, out, "--lr", "1e4", "--warmup-steps", "0", "--ckpt-every", "1")]) == 1
    line = error_line(capsys)
    assert "step 2: grad_norm nan" in line and "diverged" in line and "holds step 1" in line
    saved = torch.load(out / ckpt.CKPT_NAME, weights_only=True)
    assert saved["step"] == 1 and all(torch.isfinite(v).all() for v in saved["model"].values())
    records = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[1]["grad_norm"] is None
    assert "final" not in [r["kind"] for r in records]


def test_a_nan_loss_stops_training_before_the_checkpoint_is_written(data, tmp_path, monkeypatch, capsys):
    real_loss = UniversalTrainer.compute_loss

    def nan_at_step_5(self, *args):
        loss = real_loss(self, *args)
        return loss * math.nan if self.step == 4 else loss

    monkeypatch.setattr(UniversalTrainer, "compute_loss", nan_at_step_5)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", *tiny(data, out)]) == 1
    assert "step 5: loss nan" in error_line(capsys)
    assert torch.load(out / ckpt.CKPT_NAME, weights_only=True)["step"] == 3
    records = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 5 and records[-1]["loss"] is None


def test_weights_that_turn_non_finite_are_never_checkpointed(data, tmp_path, monkeypatch, capsys):
    real_step, calls = torch.optim.AdamW.step, []

    def poisoned_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # the update of step 3, whose loss and norm were finite, makes a weight inf
            self.param_groups[0]["params"][0].data[0] = math.inf
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", *tiny(data, out)]) == 1
    line = error_line(capsys)
    assert "step 3: the weights are not finite" in line and "no checkpoint was written yet" in line
    assert not (out / ckpt.CKPT_NAME).exists()


def test_metrics_files_hold_standard_json():
    assert atomic.json_text({"ppl": math.inf, "loss": [math.nan, 1.5]}) == '{"ppl": null, "loss": [null, 1.5]}'


# ------------------------------------------------------------------------ 7. one line each
def test_a_full_disk_mid_run_is_one_line_and_keeps_the_previous_checkpoint(trained, tmp_path, monkeypatch,
                                                                              capsys):
    copy = copy_of(trained, tmp_path)
    real_save = ckpt._save

    def full_disk(payload, tmp):
        real_save(payload, tmp)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_save", full_disk)
    before = (copy / ckpt.CKPT_NAME).read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(copy), "--resume", "--steps", str(STEPS + 3), "--no-progress"]) == 1
    line = error_line(capsys)
    assert f"no space left on {copy}" in line and f"holds step {STEPS}" in line
    assert (copy / ckpt.CKPT_NAME).read_bytes() == before
    assert not [p for p in copy.iterdir() if p.name.endswith(".tmp")]
    # torch.save reports a full disk as a RuntimeError without an errno: the free space tells
    def torch_full_disk(payload, tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(ckpt, "_save", torch_full_disk)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: SimpleNamespace(total=10, used=10, free=0))
    assert main(["train", "--out", str(copy), "--resume", "--steps", str(STEPS + 3), "--no-progress"]) == 1
    assert f"no space left on {copy}" in error_line(capsys)
    assert (copy / ckpt.CKPT_NAME).read_bytes() == before


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root with CAP_SYS_ADMIN only; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_really_full_disk(trained, small_disk, capsys):
    run = shutil.copytree(trained, small_disk / "run")
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the disk, then leave 40 KB: less than a checkpoint
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    size = filler.stat().st_size
    filler.write_bytes(b"\0" * (size - 40_000))
    before = (run / ckpt.CKPT_NAME).read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", str(STEPS + 3), "--no-progress"]) == 1
    assert "no space left on " in error_line(capsys)
    assert (run / ckpt.CKPT_NAME).read_bytes() == before
    assert ckpt.load_checkpoint(run / ckpt.CKPT_NAME)["step"] == STEPS


def test_a_device_this_machine_lacks_is_one_line(trained, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["eval", "--run", str(trained), "--device", "cuda"]) == 2
    assert "--device cuda: not available on this machine" in error_line(capsys)


def test_out_naming_a_file_is_one_line_before_any_data_is_read(data, tmp_path, capsys):
    (tmp_path / "run").write_text("a file")
    cache = tmp_path / "cache"
    assert main(["train", *tiny(dict(data, cache=cache), tmp_path / "run")]) == 2
    assert f"--out {tmp_path / 'run'}: a file, not a folder" in error_line(capsys)
    assert not cache.exists() and (tmp_path / "run").read_text() == "a file"


@pytest.mark.parametrize("head_weights, error", [
    (torch.tensor([[0.7, 0.3]]), ValueError), ([True, False], TypeError), (torch.tensor([True, False]), TypeError)])
def test_head_weights_are_a_flat_list_of_numbers(head_weights, error):
    h, w = [torch.randn(5, 8) for _ in range(2)], torch.randn(11, 8)
    with pytest.raises(error, match="head_weights"):
        weighted_linear_cross_entropy(h, w, torch.randint(0, 11, (5,)), head_weights)


def test_readers_take_the_shared_lock_that_a_save_takes_to_swap(tmp_path):
    """checkpoint.reading and checkpoint.committing exclude each other, readers do not."""
    with ckpt.reading(tmp_path), ckpt.reading(tmp_path):
        fd = atomic.try_lock(tmp_path / ckpt.COMMIT_LOCK)
        assert fd is None  # a writer would wait
    fd = atomic.try_lock(tmp_path / ckpt.COMMIT_LOCK)
    assert fd is not None
    os.close(fd)

