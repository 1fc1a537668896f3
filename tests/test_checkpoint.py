import random

import numpy as np
import pytest
import torch

from fastexit import AlphaSchedule, EarlyExitTransformer, ModelConfig, UniversalConfig, UniversalTrainer
from fastexit import checkpoint as ckpt
from fastexit.config import DataConfig, RunConfig, TrainConfig

V = 97


def make_run(n_layers=3, d_model=32):
    cfg = ModelConfig(V, n_layers=n_layers, d_model=d_model, n_heads=4, max_seq_len=16)
    model = EarlyExitTransformer(cfg)
    config = UniversalConfig({1: 0.9, 3: 0.1}, routing_threshold=0.8,
                             alpha_schedule=AlphaSchedule("cosine", 0.9, 0.4), layer_lr_scales={1: 1.0, 2: 0.5, 3: 0.1})
    trainer = UniversalTrainer(config, V)
    opt = trainer.create_optimizer(model, 1e-3)
    x = torch.randint(0, V, (2, 16))
    trainer.compute_loss(model, x, x.roll(-1, 1)).backward()
    opt.step()  # fills AdamW's state
    return model, cfg, config, opt


def run_config(cfg, config):
    identity = {"vocab_size": V, "fingerprint": "abc", "tokenizer": "t0", "cache_dir": "/c"}
    return RunConfig("t", config, cfg, TrainConfig(steps=10, seq_len=16), DataConfig(identity=identity))


def save(path, model, cfg, config, opt, step=7):
    return ckpt.save_checkpoint(path, model=model, run_config=run_config(cfg, config), optimizer=opt, step=step,
                                data_state={"seed": 3, "step": step})


@pytest.fixture
def saved(tmp_path):
    model, cfg, config, opt = make_run()
    path = save(tmp_path / ckpt.CKPT_NAME, model, cfg, config, opt)
    return path, model, cfg, config, opt


def test_round_trip_restores_everything(saved):
    path, model, cfg, config, opt = saved
    payload = ckpt.load_checkpoint(path, model_config=cfg, data={"vocab_size": V, "fingerprint": "abc"})
    restored = ckpt.restore_model(payload, path)
    for k, v in model.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v), k
    assert restored.lm_head.weight is restored.tok_emb.weight  # tying survives
    assert payload["run_config"] == run_config(cfg, config)  # stored once, as one RunConfig
    again = payload["run_config"].method
    assert again == config
    assert again.alpha_schedule == AlphaSchedule("cosine", 0.9, 0.4)
    assert again.layer_lr_scales == {1: 1.0, 2: 0.5, 3: 0.1}
    opt2 = UniversalTrainer(again, V).create_optimizer(restored, 1e-3)
    opt2.load_state_dict(payload["optimizer"])
    for (a, b) in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert payload["step"] == 7 and payload["data_state"] == {"seed": 3, "step": 7}


def test_contents_load_with_weights_only(saved):
    payload = torch.load(saved[0], weights_only=True)
    assert payload["format"] == ckpt.FORMAT


def test_config_dict_is_json_safe_and_round_trips():
    import json
    config = UniversalConfig({1: 0.7, 2: 0.0, 3: 0.3}, exit_layer=1, routing_threshold=0.95,
                             alpha_schedule=AlphaSchedule("linear", 0.9, 0.5), layer_lr_scales={2: 0.5})
    assert UniversalConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    run = run_config(ModelConfig(V, max_seq_len=16), config)
    assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))) == run


def test_version_1_checkpoint_is_read(saved):
    """A file of the previous format (method and model stored twice, "warmup") still loads."""
    path, model, cfg, config, opt = saved
    v2 = torch.load(path, weights_only=True)
    run = v2["run_config"]
    old_run = dict(name=run["name"], method=dict(run["method"], preset=None), model=run["model"],
                   train={("warmup" if k == "warmup_steps" else k): v for k, v in run["train"].items()},
                   data=run["data"])
    v1 = dict({k: v2[k] for k in ("model", "optimizer", "step", "data_state", "rng")}, format=ckpt.FORMAT,
              version=1, digest="", model_config=run["model"], universal_config=run["method"],
              data=dict(run["data"]["identity"], paths=None), run_config=old_run)
    v1["digest"] = ckpt.payload_digest(v1)
    torch.save(v1, path)
    payload = ckpt.load_checkpoint(path, model_config=cfg, data={"vocab_size": V, "fingerprint": "abc"})
    assert payload["run_config"] == run_config(cfg, config) and payload["step"] == 7
    restored = ckpt.restore_model(payload, path)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in model.state_dict().items())


def test_rng_states_round_trip():
    state = ckpt.capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)  # move every generator on
    ckpt.restore_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_failed_write_keeps_previous_checkpoint(saved, monkeypatch):
    path, model, cfg, config, opt = saved
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save(path, model, cfg, config, opt, step=8)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [ckpt.CKPT_NAME]  # no temp file left


def test_truncated_checkpoint_is_refused(saved):
    path = saved[0]
    data = path.read_bytes()
    for size in (0, 100, len(data) // 2, len(data) - 10):
        path.write_bytes(data[:size])
        with pytest.raises(ValueError, match="not a readable checkpoint") as err:
            ckpt.load_checkpoint(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_flipped_tensor_byte_is_refused(saved):
    path, model = saved[0], saved[1]
    data = bytearray(path.read_bytes())
    tensor_bytes = model.blocks[1].mlp.fc_in.weight.detach().numpy().tobytes()
    at = bytes(data).find(tensor_bytes[:64])
    assert at > 0
    data[at + 17] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted") as err:
        ckpt.load_checkpoint(path)
    assert str(path) in str(err.value)


def test_garbage_and_foreign_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        ckpt.load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, foreign)
    with pytest.raises(ValueError, match="not a fastexit checkpoint"):
        ckpt.load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")


def test_mismatched_model_config_or_data_is_refused(saved):
    path, model, cfg, config, opt = saved
    other = ModelConfig(V, n_layers=3, d_model=64, n_heads=4, max_seq_len=16)
    with pytest.raises(ValueError, match=r"model config mismatch: .*d_model 32 \(checkpoint\) vs 64") as err:
        ckpt.load_checkpoint(path, model_config=other)
    assert str(path) in str(err.value) and "d_ff" in str(err.value)
    with pytest.raises(ValueError, match=r"data mismatch.*vocab_size 97 \(checkpoint\) vs 500"):
        ckpt.load_checkpoint(path, data={"vocab_size": 500})
    with pytest.raises(ValueError, match="fingerprint"):
        ckpt.load_checkpoint(path, data={"vocab_size": V, "fingerprint": "zzz"})


def test_weights_that_do_not_fit_the_config_are_refused(saved):
    path = saved[0]
    payload = ckpt.load_checkpoint(path)
    payload["run_config"].model.d_ff = 64
    with pytest.raises(ValueError, match="do not fit its config"):
        ckpt.restore_model(payload, path)


def test_find_checkpoint_picks_the_latest_committed_one(saved):
    """ckpt.pt (step 7) against sharded ckpt-<step> folders; unfinished saves never count."""
    path = saved[0]
    run_dir = path.parent
    assert ckpt.find_checkpoint(run_dir) == path
    (run_dir / ".ckpt-000009.tmp").mkdir()  # a save a rank died in
    (run_dir / "ckpt-notes.txt").write_text("not a checkpoint")
    (run_dir / "ckpt-000005").mkdir()
    assert ckpt.find_checkpoint(run_dir) == path
    (run_dir / "ckpt-000008").mkdir()  # committed after ckpt.pt: a crash before its clean-up
    assert ckpt.find_checkpoint(run_dir) == run_dir / "ckpt-000008"
    ckpt.remove_older_checkpoints(run_dir, keep=run_dir / "ckpt-000008")
    assert sorted(p.name for p in run_dir.iterdir()) == ["ckpt-000008", "ckpt-notes.txt"]
    assert ckpt.find_checkpoint(run_dir / "missing") is None
