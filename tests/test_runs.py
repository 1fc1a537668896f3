"""fastexit.runs: a run folder as an object (the CLI's run tests are in test_cli.py)."""
import json

import torch

from fastexit import checkpoint as ckpt
from fastexit.config import DataConfig, ModelConfig, RunConfig, TrainConfig, make_method
from fastexit.runs import Run, read_config
from test_cli import write_play

STEPS = 6


def config(data_dir, **train):
    text = write_play(data_dir / "play.txt", 1500)
    train = TrainConfig(**dict(dict(steps=STEPS, batch_size=4, seq_len=32, eval_every=0, ckpt_every=2), **train))
    data = DataConfig(paths=[str(text)], vocab_size=300, cache_dir=str(data_dir / "cache"))
    model = ModelConfig(300, n_layers=3, d_model=32, n_heads=2, max_seq_len=32)
    return RunConfig("t", make_method(), model, train, data, preset="asymmetric_best")


def weights(path):
    return torch.load(path / ckpt.CKPT_NAME, weights_only=True)["model"]


def test_train_twice_on_one_run_continues_like_a_resume(tmp_path):
    straight = Run.create(tmp_path / "straight", config(tmp_path))
    assert straight.train(progress=False) == STEPS
    stopped = Run.create(tmp_path / "stopped", config(tmp_path))
    assert stopped.train(progress=False, stop_at=3) == 3
    assert stopped.train(progress=False) == STEPS
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "stopped")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


def test_a_version_1_config_json_is_read(tmp_path):
    """A v1 run folder stopped before its first checkpoint holds only config.json."""
    new = config(tmp_path).to_dict()
    old = dict(new, method=dict(new["method"], preset=new["preset"]),
               train={("warmup" if k == "warmup_steps" else k): v for k, v in new["train"].items()})
    del old["preset"]
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "config.json").write_text(json.dumps(old))
    assert read_config(tmp_path / "v1") == RunConfig.from_dict(new)


def test_train_fraction_trains_on_the_start_of_the_training_split_only(tmp_path):
    whole = Run.create(tmp_path / "whole", config(tmp_path))
    d = config(tmp_path).to_dict()
    d["data"]["train_fraction"] = 0.25
    part = Run.create(tmp_path / "part", RunConfig.from_dict(d))
    train = whole.corpus.splits["train"]
    kept = train[: len(train) // 4]
    assert len(part.corpus.splits["train"]) == len(kept) > 0
    assert (part.corpus.splits["train"] == kept).all()
    assert part.corpus.n_bytes["train"] == whole.corpus.bytes_of(kept) < whole.corpus.n_bytes["train"]
    for split in ("val", "test"):  # held-out text, tokenizer and cache are the whole corpus's
        assert (part.corpus.splits[split] == whole.corpus.splits[split]).all()
    assert part.config.data.identity == whole.config.data.identity
    assert part.config.data.n_tokens == dict(whole.config.data.n_tokens, train=len(kept))
    assert part.train(progress=False) == STEPS
    assert len(Run.load(tmp_path / "part").corpus.splits["train"]) == len(kept)  # resumed runs keep the fraction
