"""fastexit.distributed: DDP and FSDP2 on 2 CPU processes (gloo), against one process.

Each test spawns 2 ranks (torch.multiprocessing, or torchrun for the CLI); the ranks assert
themselves, and a failure in either comes back as the test's error with its traceback.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from fastexit import (PRESETS, AlphaSchedule, EarlyExitTransformer, ModelConfig, UniversalConfig,
                      UniversalTrainer, distributed)
from fastexit import checkpoint as ckpt
from fastexit.cli import main
from fastexit.config import DataConfig, LayerDropout, RunConfig, TrainConfig, make_method
from fastexit.routing import exact_routed_forward
from fastexit.runs import LOCK_FILES, Run
from test_cli import error_line, tiny, write_play

V, T, B = 101, 16, 4
WORLD = 2
STEPS = 6
METHODS = dict(PRESETS, alpha_schedule=UniversalConfig({1: 0.9, 2: 0.0, 3: 0.1}, routing_threshold=0.5,
                                                       alpha_schedule=AlphaSchedule("linear", 0.9, 0.3)),
               # the final layer an extra, unweighted teacher exit; layer dropout drawn for the global batch
               distill_extra_teacher=UniversalConfig({1: 0.7, 2: 0.3}, routing_threshold=0, distill_weight=0.5,
                                                     distill_temperature=2.0),
               layer_dropout_and_distill=UniversalConfig({1: 0.5, 3: 0.5}, routing_threshold=0, distill_weight=1.0,
                                                         layer_dropout=LayerDropout(0.5, "linear")),
               # learned confidence heads at two exits: their BCE is a global token mean too
               learned_heads=UniversalConfig({1: 0.5, 3: 0.5}, exit_layers=[1, 2], routing_thresholds=[0.5, 0.5],
                                             confidence="learned", confidence_loss_weight=1.0))


# ------------------------------------------------------------------------ harness
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args):
    """fn(*args) on every rank of a 2-process gloo group, as torchrun would set it up.

    Forked (no second import of torch: a test takes 3 s instead of 10) unless this process
    has initialised CUDA, which a forked child cannot use again; the ranks run one thread.
    """
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    mp.start_processes(_rank_main, args=(fn, free_port(), args), nprocs=WORLD, start_method=method)


def _rank_main(rank, fn, port, args):
    torch.set_num_threads(1)  # first: no OpenMP thread pool in a forked child
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    with distributed.process_group("ddp", torch.device("cpu"), timeout=timedelta(seconds=60)):
        fn(*args)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def global_batch(seed=1):
    """(x, y) (B, T) whose ignored targets fall mostly on rank 1 (rows 2-3): 2T + 2 scored
    tokens on rank 0 against 2 on rank 1, one of its rows fully ignored."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    y[2, :T - 2] = -100
    y[3] = -100
    return x, y


def new_model(tie=True):
    torch.manual_seed(0)
    return EarlyExitTransformer(ModelConfig(V, n_layers=3, d_model=32, n_heads=4, max_seq_len=T, tie_embeddings=tie))


def one_step(method, parallel, tie=True):
    """One fit step (at progress 1/2, which moves the alpha schedule) on the global batch, or
    under ``parallel`` on this rank's rows: (record, model, {name: full gradient})."""
    model, (x, y), trainer = new_model(tie), global_batch(), UniversalTrainer(method, V)
    trainer.add_confidence_heads(model)  # before wrapping; nothing unless the confidence is learned
    module = distributed.wrap(model, parallel)
    rows = distributed.rank_rows(B) if parallel else slice(None)
    record, = trainer.fit(module, iter([(x[rows], y[rows])]), steps=2, start_step=1, base_lr=1e-2,
                          progress_bar=False)
    return record, model, {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}


def assert_step_equal(name, parallel, tie=True):
    want, _, want_grads = one_step(METHODS[name], None, tie)
    got, model, got_grads = one_step(METHODS[name], parallel, tie)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6), name
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), name
    assert got["progress"] == want["progress"] == 0.5
    assert set(got_grads) == set(want_grads), name  # weight-0 exits get no gradient in either
    for n, g in want_grads.items():
        torch.testing.assert_close(got_grads[n], g, rtol=1e-5, atol=1e-7, msg=f"{name}: {n}")
    return model


# ----------------------------------------------------------- one step, both modes
def _ddp_step():
    for name in METHODS:
        assert_step_equal(name, "ddp")
    with pytest.raises(ValueError, match="batch_size 5 is not divisible by the 2 processes"):
        distributed.rank_rows(5)


def _fsdp_step():
    for name in METHODS:
        model = assert_step_equal(name, "fsdp", tie=name != "lpt")
        assert distributed.is_sharded(model)


def test_ddp_step_equals_one_process_on_the_global_batch():
    spawn(_ddp_step)


def test_fsdp_step_equals_one_process_on_the_global_batch():
    spawn(_fsdp_step)


def _fsdp_tied():
    model = assert_step_equal("asymmetric_with_l2", "fsdp", tie=True)
    assert model.lm_head.weight is model.tok_emb.weight and isinstance(model.lm_head.weight, DTensor)
    # outside the root's forward the head is a shard: the plain call names the fix
    with pytest.raises(ValueError, match="lm_head.weight is an FSDP2 shard.*distributed.wrap"):
        UniversalTrainer(PRESETS["lpt"], V).compute_loss(model, *global_batch())
    copy = distributed.evaluation_model(model)  # the gathered copy stays tied
    assert copy.lm_head.weight is copy.tok_emb.weight
    torch.testing.assert_close(copy.lm_head.weight, full(model.tok_emb.weight), rtol=0, atol=0)


def test_fsdp_tied_embeddings_are_one_sharded_parameter():
    spawn(_fsdp_tied)


def _fsdp_bf16():
    model, (x, y) = new_model(), global_batch()
    module = distributed.wrap(model, "fsdp", compute_dtype=torch.bfloat16)
    rows = distributed.rank_rows(B)
    loss = UniversalTrainer(PRESETS["lpt"], V).compute_loss(module, x[rows], y[rows])
    loss.backward()
    want = UniversalTrainer(PRESETS["lpt"], V).compute_loss(new_model(), x, y)
    assert loss.dtype == torch.float32
    assert distributed.mean_over_ranks(loss).item() == pytest.approx(want.item(), rel=2e-2)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_fsdp_bf16_compute_dtype_keeps_fp32_weights_and_gradients():
    spawn(_fsdp_bf16)


# --------------------------------------------------------------------- evaluation
def _evaluate(parallel, confidence):
    model = new_model()
    method = replace(PRESETS["asymmetric_best"], confidence=confidence)
    trainer = UniversalTrainer(method, V)
    trainer.add_confidence_heads(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(25)  # confident exits: routing sends some tokens out early
        for head in getattr(model, "confidence_heads", {}).values():
            head.weight.normal_(generator=torch.Generator().manual_seed(0))
    batches = [global_batch(seed) for seed in range(3)]  # 3 batches on 2 ranks
    # about half of the tokens leave at layer 1
    conf = exact_routed_forward(model, batches[0][0], 1, 1e-9, confidence=confidence).conf
    threshold = conf.median().item()
    want = {mode: trainer.evaluate(model, batches, mode, routing_threshold=threshold, per_layer=True)
            for mode in ("exact", "compact")}
    module = distributed.wrap(model, parallel)
    for mode, expected in want.items():
        got = trainer.evaluate(module, batches, mode, routing_threshold=threshold, per_layer=True)
        assert 0 < expected["shallow_ratio"] < 1
        assert set(got) == set(expected)
        for key, value in expected.items():
            if key not in ("seconds", "tokens_per_s"):
                assert got[key] == pytest.approx(value, rel=1e-9), (mode, key)


@pytest.mark.parametrize("confidence", ["max_prob", "learned"])
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_evaluate_sums_every_ranks_share_exact_and_compact(parallel, confidence):
    spawn(_evaluate, parallel, confidence)


# ------------------------------------------------------------------ runs: resume
@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_data")
    text = write_play(root / "play.txt", 1200)
    train = TrainConfig(steps=STEPS, batch_size=4, seq_len=32, eval_every=3, eval_batches=2, ckpt_every=2)
    data = DataConfig(paths=[str(text)], vocab_size=300, cache_dir=str(root / "cache"))
    model = ModelConfig(300, n_layers=3, d_model=32, n_heads=2, max_seq_len=32)
    return RunConfig("t", make_method(), model, train, data, preset="asymmetric_best")


@pytest.fixture(scope="module")
def one_process_run(run_config, tmp_path_factory):
    """The reference: one process, uninterrupted (this also builds the data cache)."""
    path = tmp_path_factory.mktemp("dist_runs") / "one"
    Run.create(path, run_config).train(progress=False)
    return path


def run_files(path):
    """The names in a run folder, but its lock files."""
    return sorted(p.name for p in Path(path).iterdir() if p.name not in LOCK_FILES)


def final_weights(path):
    return Run.load(path, need_data=False).model.state_dict()  # reads ckpt.pt or a sharded checkpoint


def assert_same_weights(a, b, exact=False):
    wa, wb = final_weights(a), final_weights(b)
    for k, v in wa.items():
        torch.testing.assert_close(wb[k], v, rtol=0 if exact else 1e-4, atol=0 if exact else 2e-5, msg=k)


def _resume(config, root):
    Run.create(root / "fsdp", config, parallel="fsdp").train(progress=False)
    assert Run.create(root / "fsdp_stopped", config, parallel="fsdp").train(progress=False, stop_at=3) == 3
    if distributed.is_main():
        shutil.copytree(root / "fsdp_stopped", root / "fsdp_stopped_for_1")
    distributed.barrier()
    Run.resume(root / "fsdp_stopped", parallel="fsdp").train(progress=False)  # 2 ranks -> 2
    Run.resume(root / "one_stopped", parallel="fsdp").train(progress=False)  # 1 process -> 2 (ckpt.pt sharded)
    assert Run.create(root / "ddp_stopped", config, parallel="ddp").train(progress=False, stop_at=3) == 3
    Run.resume(root / "ddp_stopped", parallel="ddp").train(progress=False)


@pytest.fixture(scope="module")
def resumed_runs(run_config, one_process_run):
    """Runs stopped at step 3 and resumed, by 1 process and by 2 ranks (``_resume``)."""
    root = one_process_run.parent
    Run.create(root / "one_stopped", run_config).train(progress=False, stop_at=3)
    spawn(_resume, run_config, root)
    return root


def test_resume_with_2_and_with_1_rank_matches_an_uninterrupted_run(resumed_runs, one_process_run):
    root = resumed_runs
    assert run_files(root / "fsdp_stopped_for_1") == \
        ["ckpt-000003", "config.json", "metrics.jsonl"]
    Run.resume(root / "fsdp_stopped_for_1").train(progress=False)  # 2 ranks -> 1 process
    assert run_files(root / "fsdp_stopped_for_1") == \
        ["ckpt.pt", "config.json", "metrics.jsonl"]  # the sharded checkpoint made way for ckpt.pt
    assert_same_weights(root / "fsdp", root / "fsdp_stopped", exact=True)
    for path in ("fsdp", "fsdp_stopped_for_1", "one_stopped", "ddp_stopped"):
        assert_same_weights(one_process_run, root / path)
    lines = [json.loads(s) for s in (root / "fsdp_stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, STEPS + 1))  # rank 0 alone wrote
    assert [r["step"] for r in lines if r["kind"] == "eval"] == [3, 6]


@pytest.mark.parametrize("damage", ["shard", "meta"])
def test_a_damaged_sharded_checkpoint_is_one_error_naming_it(damage, resumed_runs, tmp_path):
    run = shutil.copytree(resumed_runs / "fsdp", tmp_path / "fsdp")
    name = "__1_0.distcp" if damage == "shard" else ckpt.META_NAME
    target = run / "ckpt-000006" / name
    target.write_bytes(target.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{run / 'ckpt-000006'}.*(truncated|corrupted)"):
        Run.load(run, need_data=False)


@pytest.mark.parametrize("name", ["__1_0.distcp", ".metadata"])
def test_same_size_damage_inside_a_shard_is_one_error_naming_the_file(name, resumed_runs, tmp_path):
    """Sizes alone passed this: the shard was loaded into the optimizer state. meta.pt now keeps
    every file's SHA-256, checked before anything is read."""
    run = shutil.copytree(resumed_runs / "fsdp", tmp_path / "fsdp")
    target = run / "ckpt-000006" / name
    flipped = bytearray(target.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    target.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=f"{target}: damaged"):
        Run.load(run, need_data=False)
    with pytest.raises(ValueError, match=f"{target}: damaged"):
        Run.resume(run)


# ------------------------------------------------------------------ runs: crashes
def _crash(config, path, where):
    """Rank 1 dies (os._exit, no clean-up) in step 3, or halfway through writing its shard of
    the checkpoint at step 4; the one at step 2 is complete."""
    if distributed.rank() == 1:
        if where == "save":
            import torch.distributed.checkpoint as dcp
            write = dcp.FileSystemWriter.write_data

            def half_write(self, plan, planner):
                if "000004" in str(self.path):
                    (Path(self.path) / "__1_0.distcp").write_bytes(b"half a shard")
                    os._exit(1)
                return write(self, plan, planner)
            dcp.FileSystemWriter.write_data = half_write
        else:
            step = UniversalTrainer._train_step

            def die_in_step_3(self, *args):
                if self.step == 2:
                    os._exit(1)
                return step(self, *args)
            UniversalTrainer._train_step = die_in_step_3
    Run.create(path, config, parallel="fsdp").train(progress=False)


@pytest.mark.parametrize("where", ["step", "save"])
def test_a_rank_dying_mid_step_or_mid_save_leaves_the_last_complete_checkpoint(where, run_config, one_process_run,
                                                                                tmp_path):
    path = tmp_path / "crash"
    with pytest.raises(mp.ProcessExitedException):
        spawn(_crash, run_config, path, where)
    assert (path / ".ckpt-000004.tmp").is_dir() == (where == "save")  # what the dead rank left: never read
    assert ckpt.find_checkpoint(path) == path / "ckpt-000002"
    assert ckpt.load_checkpoint(path / "ckpt-000002")["step"] == 2
    Run.resume(path).train(progress=False)
    assert run_files(path) == ["ckpt.pt", "config.json", "metrics.jsonl"]  # leftovers gone
    assert_same_weights(one_process_run, path)


# --------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_cli")
    return dict(text=write_play(root / "play.txt", 1500), cache=root / "cache")


def test_cli_train_ddp_under_torchrun_writes_one_run_folder_that_eval_reads(cli_data, tmp_path, capsys):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
           "-m", "fastexit.cli", "train", "--parallel", "ddp", *tiny(cli_data, out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("What early exit buys") == 1  # one table: rank 0 printed
    assert run_files(out) == ["ckpt.pt", "config.json", "metrics.jsonl"]
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, 9))
    assert [r["kind"] for r in lines].count("final") == 1
    assert main(["eval", "--run", str(out), "--mode", "compact"]) == 0
    assert "compact mode" in capsys.readouterr().out


def test_torchrun_ranks_stop_together_when_another_process_holds_the_run(cli_data, tmp_path):
    """Rank 0 takes the run folder's lock; every rank gets its error, none waits for the others."""
    out = tmp_path / "held"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom fastexit.runs import lock_run\n"
                               "lock_run(sys.argv[1]); print('locked', flush=True); time.sleep(600)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               "-m", "fastexit.cli", "train", "--parallel", "ddp", *tiny(cli_data, out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    finally:
        holder.kill()
        holder.wait()
    errors = [line for line in done.stderr.splitlines() if "fastexit: error:" in line]
    assert done.returncode != 0 and len(errors) == WORLD, done.stderr[-3000:]
    assert all(f"in use by process {holder.pid} on" in line for line in errors)
    assert run_files(out) == []  # nothing written


# ---------------------------------------------------------------------- bad input
def test_parallel_without_torchrun_or_unknown_is_an_error_naming_it(cli_data, tmp_path, capsys, monkeypatch):
    for key in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    assert main(["train", "--parallel", "ddp", *tiny(cli_data, tmp_path / "a")]) == 2
    assert "--parallel ddp needs the environment torchrun sets" in error_line(capsys)
    assert main(["train", "--parallel", "tp", *tiny(cli_data, tmp_path / "b")]) == 2
    assert "argument --parallel: invalid choice: 'tp'" in error_line(capsys)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", *tiny(cli_data, tmp_path / "d")]) == 2
    assert "torchrun started 2 processes but --parallel is not given" in error_line(capsys)
    assert not any((tmp_path / name).exists() for name in "abd")
