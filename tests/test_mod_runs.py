"""Mixture-of-Depths routed blocks in whole runs: the CLI flags, checkpoints and resume, DDP and
FSDP2 on 2 CPU processes (gloo), and a rank whose rows all skip a routed block."""
import pytest
import torch

from fastexit import EarlyExitTransformer, ModelConfig, UniversalConfig, UniversalTrainer, distributed
from fastexit.cli import main
from test_cli import assert_same_final_state, error_line, tiny
from test_distributed import B, T, V, full, global_batch, spawn

ROUTED = dict(mod_layers=[2, 3], mod_capacity=0.5)
METHOD = UniversalConfig({1: 0.3, 3: 0.7}, exit_layers=[1, 2], routing_thresholds=[0.5, 0.5], confidence="learned",
                         confidence_loss_weight=0.5)


def new_model():
    torch.manual_seed(0)
    return EarlyExitTransformer(ModelConfig(V, n_layers=3, d_model=32, n_heads=4, max_seq_len=T, **ROUTED))


def one_step(parallel):
    """One fit step on the global batch, or under ``parallel`` on this rank's rows:
    (record, {name: full gradient})."""
    model, (x, y), trainer = new_model(), global_batch(), UniversalTrainer(METHOD, V)
    trainer.add_confidence_heads(model)
    module = distributed.wrap(model, parallel)
    rows = distributed.rank_rows(B) if parallel else slice(None)
    record, = trainer.fit(module, iter([(x[rows], y[rows])]), steps=1, base_lr=1e-2, progress_bar=False)
    return record, {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}


def _step_equals_one_process(parallel):
    """Top-k is per sequence, so splitting the batch over ranks changes no route; the
    predictors' BCE (a mean over each rank's tokens, equal counts) averages like the loss."""
    want, want_grads = one_step(None)
    got, got_grads = one_step(parallel)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert set(got_grads) == set(want_grads) and any(".predictor." in n for n in got_grads)
    for n, g in want_grads.items():
        torch.testing.assert_close(got_grads[n], g, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_routed_step_under_ddp_and_fsdp_equals_one_process(parallel):
    spawn(_step_equals_one_process, parallel)


def _fsdp_rank_whose_rows_all_skip():
    """Rank 0's rows are all padding: no token of it runs a routed block, yet it enters every
    block (its all-gather and reduce-scatter), in training (top-k slots of pads, weighted 0)
    and in inference (zero rows), else rank 1 would wait there until the timeout."""
    model = new_model()
    wrapped = distributed.wrap(model, "fsdp")
    x = torch.randint(0, V, (2, 9))
    real = torch.full((2, 9), distributed.rank() == 1)
    loss = wrapped(lambda m, x: m.exit_hidden_states(x, [3], attention_mask=real)[0][real].sum(), x)
    loss.backward()
    grads = [full(p.grad) for p in model.blocks[1].parameters()]
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    wrapped.eval()
    routes = {}
    with torch.no_grad():
        wrapped(lambda m, x: m.exit_hidden_states(x, [3], attention_mask=real, routes=routes), x)
    assert routes[2].chosen.any() == (distributed.rank() == 1)


def test_fsdp_a_rank_whose_rows_all_skip_a_routed_block_does_not_hang():
    spawn(_fsdp_rank_whose_rows_all_skip)


# ----------------------------------------------------------------------------- the CLI, checkpoints, resume
MOD_FLAGS = ["--n-layers", "4", "--mod-layers", "2,4", "--mod-capacity", "0.5"]


def test_cli_trains_routed_blocks_and_a_resume_continues_exactly(data, tmp_path, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["train", *tiny(data, straight, *MOD_FLAGS)]) == 0
    assert main(["train", *tiny(data, stopped, *MOD_FLAGS), "--stop-at", "3"]) == 0
    assert main(["train", "--out", str(stopped), "--resume", "--no-progress"]) == 0
    assert_same_final_state(straight, stopped)
    weights = torch.load(straight / "ckpt.pt", weights_only=True)["model"]
    assert {k.split(".")[1] for k in weights if k.startswith("mod_routers.")} == {"2", "4"}
    capsys.readouterr()
    assert main(["eval", "--run", str(straight), "--mode", "compact"]) == 0
    assert main(["train", *tiny(data, tmp_path / "bad", "--mod-capacity", "1.5", "--mod-layers", "2")]) == 2
    assert "mod_capacity" in error_line(capsys)
    assert main(["train", *tiny(data, tmp_path / "bad2", "--mod-layers", "2,9")]) == 2
    assert "mod_layers" in error_line(capsys)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from test_cli import write_play
    root = tmp_path_factory.mktemp("data")
    return dict(text=write_play(root / "play.txt", 1500), cache=root / "cache")
