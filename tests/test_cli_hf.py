"""``fastexit train --hf-model DIR`` and the commands on its runs, with tiny random transformers
models saved in the test (nothing downloaded): a Llama folder with weights and a tokenizer, a
GPT-2 folder with only config.json (random init, fastexit's BPE of the model's vocab_size)."""
import json
import shutil

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

from fastexit import checkpoint as ckpt  # noqa: E402
from fastexit.cli import build_parser, main, run_config_from_flags  # noqa: E402
from fastexit.config import RunConfig  # noqa: E402
from fastexit.data import train_tokenizer  # noqa: E402
from fastexit.runs import Run  # noqa: E402
from test_cli import error_line, write_play  # noqa: E402

STEPS, N_LAYERS, VOCAB, MAX_POS = 6, 4, 400, 64
FAMILIES = ("llama", "gpt2")


def hf_config(family):
    if family == "llama":
        return transformers.LlamaConfig(hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, vocab_size=VOCAB,
                                        max_position_embeddings=MAX_POS, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2Config(n_embd=32, n_layer=N_LAYERS, n_head=2, vocab_size=VOCAB, n_positions=MAX_POS,
                                   bos_token_id=None, eos_token_id=None)  # dropout 0.1: resume must restore RNG


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfdata")
    return dict(text=write_play(root / "play.txt", 400), cache=root / "cache")


@pytest.fixture(scope="module")
def folders(data, tmp_path_factory):
    """llama: weights + a tokenizer of 300 tokens; gpt2: config.json alone."""
    root = tmp_path_factory.mktemp("hfmodels")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(hf_config("llama"))
    llama.save_pretrained(root / "llama")
    tok = train_tokenizer(data["text"].read_text(encoding="utf-8"), 300)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(root / "llama")
    hf_config("gpt2").save_pretrained(root / "gpt2")
    return {"llama": root / "llama", "gpt2": root / "gpt2"}


def hf_args(data, folder, out, *extra):
    return ["train", "--hf-model", str(folder), "--data", str(data["text"]), "--cache-dir", str(data["cache"]),
            "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "32", "--eval-every", "3", "--eval-batches",
            "1", "--ckpt-every", "2", "--lr", "1e-3", "--no-progress", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def runs(data, folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("hfruns")
    for family in FAMILIES:
        assert main(hf_args(data, folders[family], root / family)) == 0
    return {family: root / family for family in FAMILIES}


def trainer_state(run_dir):
    return torch.load(run_dir / ckpt.HF_DIR / ckpt.CKPT_NAME, weights_only=True)


def weights(run_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / ckpt.HF_DIR)
    return model.state_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_train_writes_a_transformers_folder_and_the_run_config(family, runs, folders):
    run = runs[family]
    config = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert config.hf_model == str(folders[family].resolve())
    assert config.method.exit_layer == N_LAYERS // 2 and config.model.n_layers == N_LAYERS
    assert config.model.vocab_size == VOCAB  # the model's vocabulary, whatever the tokenizer's size
    if family == "llama":  # the folder's own tokenizer
        assert config.data.tokenizer == str(folders["llama"].resolve()) and config.data.identity["vocab_size"] == 300
    else:  # fastexit's BPE, asked for the model's vocab_size
        assert config.data.tokenizer is None and config.data.identity["vocab_size"] <= VOCAB
    state = trainer_state(run)
    assert state["step"] == STEPS and state["model"] is None and state["optimizer"]["state"]
    meta = json.loads((run / ckpt.HF_DIR / "fastexit.json").read_text())
    assert meta["exit_layers"] == [N_LAYERS // 2] and meta["n_layers"] == N_LAYERS
    assert not list(run.glob(".model*")) and not (run / ckpt.CKPT_NAME).exists()
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["kind"] == "final" and final["step"] == STEPS and final["ppl"] > 1


def test_hf_and_bpe_corpora_never_share_a_cache(runs):
    a, b = (RunConfig.from_dict(json.loads((runs[f] / "config.json").read_text())).data.identity for f in FAMILIES)
    assert a["cache_dir"] != b["cache_dir"] and a["tokenizer"] != b["tokenizer"]


@pytest.mark.parametrize("family", FAMILIES)
def test_model_folder_loads_with_transformers_alone_and_gives_the_same_logits(family, runs):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(runs[family] / ckpt.HF_DIR).eval()
    tok = transformers.AutoTokenizer.from_pretrained(runs[family] / ckpt.HF_DIR)
    ids = torch.tensor([tok.encode("the king speak thy heart", add_special_tokens=False)])
    ours = Run.load(runs[family], need_data=False).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_run_starts_from_the_folders_weights_or_a_seeded_init(family, data, folders, runs, tmp_path):
    args = build_parser().parse_args(hf_args(data, folders[family], tmp_path / "unused"))
    start = Run.create(tmp_path / "a", run_config_from_flags(args)).model.hf.state_dict()
    if family == "llama":
        expected = transformers.AutoModelForCausalLM.from_pretrained(folders["llama"]).state_dict()
    else:  # config.json alone: initialised from the run's seed, the same every time
        expected = Run.create(tmp_path / "b", run_config_from_flags(args)).model.hf.state_dict()
    assert start.keys() == expected.keys() and all(torch.equal(start[k], expected[k]) for k in start)
    trained = weights(runs[family])
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # training moved them


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_then_resume_matches_an_uninterrupted_run(family, runs, data, folders, tmp_path):
    out = tmp_path / "stopped"
    assert main(hf_args(data, folders[family], out, "--stop-at", "3")) == 0
    assert trainer_state(out)["step"] == 3
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    a, b = trainer_state(runs[family]), trainer_state(out)
    assert a["step"] == b["step"] == STEPS and a["data_state"] == b["data_state"]
    for p, s in a["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b["optimizer"]["state"][p][k]), (p, k)
    wa, wb = weights(runs[family]), weights(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_sweep_and_generate_on_an_hf_run(family, runs, capsys):
    run = str(runs[family])
    assert main(["eval", "--run", run, "--eval-batches", "1"]) == 0
    assert "ppl" in capsys.readouterr().out
    assert main(["sweep", "--run", run, "--mode", "compact", "--sweep-thresholds", "0,0.5", "--eval-batches", "1"]) == 0
    assert (runs[family] / "sweep-compact.md").exists()
    capsys.readouterr()
    assert main(["generate", "--run", run, "--prompt", "the king", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the king") and len(out.split("exit layer per token: ")[1].split("\n")[0].split()) == 5


def test_resume_refuses_another_hf_model(runs, data, folders, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(runs["llama"], copy)
    assert main(["train", "--out", str(copy), "--resume", "--hf-model", str(folders["gpt2"])]) == 2
    assert "--hf-model" in error_line(capsys)


def test_parallel_training_of_an_hf_run_is_refused_on_resume_too(runs):
    config = RunConfig.from_dict(json.loads((runs["llama"] / "config.json").read_text()))
    for parallel in ("ddp", "fsdp"):
        with pytest.raises(ValueError, match="--parallel: not yet supported"):
            Run(runs["llama"], config, parallel=parallel)


@pytest.mark.parametrize("case, extra, needle", [
    ("no config.json", (), "config.json"),
    ("unsupported model_type", (), "model_type 'bert' is not supported"),
    ("exit layer beyond depth", ("--exit-layer", "9"), "--exit-layer 9 is beyond"),
    ("seq_len beyond max_seq_len", ("--seq-len", "128"), "--seq-len 128 exceeds"),
    ("vocab mismatch", ("--vocab-size", "500"), "--vocab-size 500 does not match"),
    ("shape flag", ("--n-layers", "2"), "--n-layers"),
])
def test_bad_input_is_one_error_line_naming_the_flag(case, extra, needle, data, folders, tmp_path, capsys):
    folder = folders["gpt2"]
    if case == "no config.json":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif case == "unsupported model_type":
        folder = tmp_path / "bert"
        transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64).save_pretrained(folder)
    assert main(hf_args(data, folder, tmp_path / "run", *extra)) == 2  # a repeated flag: the last one counts
    line = error_line(capsys)
    assert needle in line and ("--hf-model" in line or extra[0] in line)
    assert not (tmp_path / "run").exists()


def test_tiny_vocabulary_without_a_tokenizer_is_refused(data, tmp_path, capsys):
    folder = tmp_path / "tiny"
    transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=MAX_POS).save_pretrained(folder)
    assert main(hf_args(data, folder, tmp_path / "run")) == 2
    assert "below the minimum 257" in error_line(capsys)


def test_a_crash_between_the_renames_of_a_save_resumes_from_the_previous_folder(runs, data, folders, tmp_path):
    out = tmp_path / "crashed"
    assert main(hf_args(data, folders["llama"], out, "--stop-at", "4")) == 0
    (out / ckpt.HF_DIR).rename(out / f".{ckpt.HF_DIR}.old")  # the save of step 4 was moved away, then the crash
    (out / f".{ckpt.HF_DIR}.tmp").mkdir()  # and a half-written next save
    assert ckpt.find_checkpoint(out) == out / f".{ckpt.HF_DIR}.old"
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".model", "model"))) == [ckpt.HF_DIR]
    wa, wb = weights(runs["llama"]), weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_generate_without_the_data_cache_uses_the_checkpoint_folders_tokenizer(runs, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(runs["gpt2"], copy)
    config = json.loads((copy / "config.json").read_text())
    run = Run.load(copy, need_data=False)
    run.config.data.identity["cache_dir"] = str(tmp_path / "gone")  # as if the cache and the text were gone:
    run.config.data.paths = [str(tmp_path / "gone.txt")]  # rebuilding through the corpus would fail
    assert run.tokenizer().get_vocab_size() == config["data"]["identity"]["vocab_size"]
