"""A run folder as an object: create or resume it, train it, load it, evaluate a split.

A run folder holds one training run:

- ``config.json``: the resolved ``RunConfig`` (method, model, training, data identity);
- ``metrics.jsonl``: one JSON line per training step (``kind: "train"``), per periodic
  evaluation (``"eval"``) and for the final evaluation (``"final"``);
- ``ckpt.pt``: the latest checkpoint (``fastexit.checkpoint``), written atomically every
  ``ckpt_every`` steps and at the end; a run trained with ``parallel="fsdp"`` has the sharded
  folder ``ckpt-<step>`` instead. Either kind resumes with any number of processes.
- a run started from a transformers model (``RunConfig.hf_model``) has the folder ``model``
  instead: the model as ``fastexit.hf.save`` writes it (loads with transformers alone), its
  tokenizer, and ``ckpt.pt`` without the weights. Such a run tokenizes with the model folder's
  tokenizer when it has one (``DataConfig.tokenizer``), else with a BPE of the model's vocab_size.

Under torchrun (``parallel="ddp"`` or ``"fsdp"``, inside ``distributed.process_group``) every
rank runs the same calls; rank 0 alone writes config.json, metrics.jsonl, ckpt.pt and logs.

With ``train.early_stopping_patience`` K > 0 a run stops after the periodic evaluation that
makes K in a row without a new best val ppl (``trainer.EarlyStopping``): its checkpoint holds
that step's weights (the last ones, not the best ones), metrics.jsonl gets a ``kind:
"early_stop"`` line with ``best_step`` and ``best_val_ppl``, and ``Run.early_stop`` holds them.
The decision is a function of the logged ``eval`` lines, so a resumed run replays them: an
interrupted run stops at the same step, and resuming a run that stopped early trains nothing.

A run is never overwritten: ``Run.create`` refuses a folder that already holds one, and
``Run.resume`` continues from ``ckpt.pt`` to the same final weights as an uninterrupted run
(only ``RESUME_OVERRIDABLE`` fields may change). Every check runs before anything is written.

One writer at a time: ``Run.create``, ``Run.resume`` and ``Run.calibrate`` take the folder's
lock (``lock_run``: ``fcntl.flock`` on ``.fastexit.lock``, rank 0 under torchrun) and hold it
until the process ends; the OS drops it when the process dies, kill -9 included, so no lock
is ever stale. A second writer gets one error naming the holder's PID. The lock holder first
removes what crashed writers left (``checkpoint.clean_run_folder``). Readers (``Run.load``:
eval, sweep, generate) take no writer lock; they read the checkpoint under the shared
``checkpoint.reading`` lock, so a save running beside them swaps its folders before or after
their load, never during it.

A diverging run stops: a step whose loss or gradient norm is not finite, or a checkpoint whose
weights are not, ends ``train`` with ``RunFailed`` (the step's metrics line is written, with
null for the non-finite values: metrics files are standard JSON) and the last checkpoint,
written at a finite step, stays as it was. ``RunFailed`` is also what a write failing mid-run
becomes (a full disk: "no space left on <folder>").

Bits per byte (``bpb``) sit next to perplexity: ``bpb = mean_nll * n_tokens / (n_bytes * ln 2)``
where ``n_bytes`` is the exact UTF-8 byte count of the scored target tokens, summed from the
tokenizer's per-token byte lengths (``Corpus.bytes_of``), not a split-wide average.
"""
import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import calibrate
from . import checkpoint as ckpt
from . import distributed, hf
from .atomic import json_text, no_space, read_holder, try_lock, write_holder, write_json, write_lines
from .config import DataConfig, RunConfig
from .data import (check_corpus, corpus_identity, load_corpus, load_hf_tokenizer, random_batches, run_tokenizer,
                   split_batches, with_bpb)
from .distributed import log
from .model import EarlyExitTransformer
from .trainer import EarlyStopping, UniversalTrainer

RUN_FILES = ("config.json", "metrics.jsonl", ckpt.CKPT_NAME)
LOCK_NAME = ".fastexit.lock"  # the writer's lock: flock'ed for the life of the process, its PID inside
LOCK_FILES = (LOCK_NAME, ckpt.COMMIT_LOCK)
# Dotted RunConfig fields a resumed run may change; every other field defines the run.
RESUME_OVERRIDABLE = ("train.steps", "train.eval_every", "train.eval_batches", "train.ckpt_every", "data.cache_dir")


class StopTraining(Exception):
    """Raised from the step callback at ``stop_at``, after the checkpoint is written."""


class RunFailed(Exception):
    """Training failed mid-run (a diverged loss, a full disk): the message says why and which
    checkpoint is intact. The command line reports it with exit status 1."""


class _Diverged(Exception):
    """Raised from the step callback at a non-finite step: args (step, what was not finite)."""


def is_run_folder(path: Path) -> bool:
    return any((Path(path) / name).exists() for name in RUN_FILES) or ckpt.find_checkpoint(path) is not None


def _data_key(identity: Dict[str, Any]) -> Dict[str, Any]:
    """The parts of a corpus identity a checkpoint must match (those it records)."""
    return {k: identity[k] for k in ckpt.DATA_KEYS if k in identity}


# ------------------------------------------------------------------------- the lock
_HELD: Dict[str, int] = {}  # resolved run folder -> fd holding its lock until this process ends


def lock_run(path: Path) -> None:
    """Take the run folder's exclusive lock for the rest of this process (the OS releases it
    when the process ends, kill -9 included; taking it again is a no-op), then remove what
    crashed writers left there. ValueError naming the holder's PID when another process has it."""
    path, key = Path(path), str(Path(path).resolve())
    if key in _HELD:
        return
    fd = try_lock(path / LOCK_NAME)
    if fd is None and not (path / LOCK_NAME).exists():
        raise ValueError(f"{path}: cannot create its lock file {LOCK_NAME} (a read-only folder?)")
    if fd is None:
        raise ValueError(f"{path} is in use by {read_holder(path / LOCK_NAME)} (a fastexit train or calibrate of "
                         f"this run); wait for it to end, or stop it")
    with contextlib.suppress(OSError):  # a lock file we may only read still locks
        write_holder(fd)
    _HELD[key] = fd
    removed = ckpt.clean_run_folder(path)
    if removed:
        log(f"{path}: removed what an interrupted writer left: {', '.join(removed)}")


def unlock_run(path: Path) -> None:
    """Give the run folder's lock back before the process ends (``lock_run``)."""
    fd = _HELD.pop(str(Path(path).resolve()), None)
    if fd is not None:
        os.close(fd)


class _Claim:
    """What ``Run.create`` / ``Run.resume`` took before their checks: the run folder's lock
    (rank 0; every rank raises if that fails) and, for a new run, the folders made for it.
    ``give_up`` hands both back when a check fails, so a refused command leaves nothing."""

    def __init__(self, path: Path, create: bool):
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out {path}: a file, not a folder; name a run folder")
        self.path, self.made, self.locked = path, None, False
        try:
            distributed.on_main(lambda: self._take(create))
        except BaseException:
            self.give_up()
            raise

    def _take(self, create: bool) -> None:
        if create and not self.path.exists():
            self.made = next(p for p in reversed((self.path, *self.path.parents)) if not p.exists())
            self.path.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir() and str(self.path.resolve()) not in _HELD:
            lock_run(self.path)
            self.locked = True

    def give_up(self) -> None:
        if self.locked:
            if self.made is not None:
                (self.path / LOCK_NAME).unlink(missing_ok=True)
            unlock_run(self.path)
        if self.made is None:
            return
        for folder in (self.path, *self.path.parents):
            with contextlib.suppress(OSError):  # not empty: someone else's now
                folder.rmdir()
            if folder == self.made:
                return


# ---------------------------------------------------------------------- metrics lines
def read_metrics(path: Path) -> List[Tuple[str, Dict[str, Any]]]:
    """(line, record) of every record of a metrics.jsonl, in order (none if it is absent); a
    line a crash cut short is skipped. ValueError naming the file and line for JSON that is not
    a metrics record (an object with an int ``step`` and a ``kind``)."""
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int) or not isinstance(record.get("kind"), str):
            raise ValueError(f"{path}, line {n}: not a fastexit metrics record ({line[:60]!r}); fix or delete "
                             f"that line")
        out.append((line, record))
    return out


# ------------------------------------------------------------------------- run files
CALIBRATION = "calibration.json"  # thresholds `fastexit calibrate` chose for the checkpoint of its step


def with_calibration(config: RunConfig, path: Path, step: int) -> RunConfig:
    """``config`` routing as ``path/calibration.json`` says (exits, one threshold per exit,
    confidence) when that file was written for checkpoint ``step``; else unchanged (a
    calibration of an earlier step is reported and ignored)."""
    file = Path(path) / CALIBRATION
    if not file.exists():
        return config
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
        exits, thresholds, confidence = list(record["exits"]), list(record["thresholds"]), record["confidence"]
        if not exits:
            raise ValueError("no exits")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{file}: not a calibration written by fastexit calibrate ({err!r}); delete it or "
                         f"calibrate again") from None
    if record.get("step") != step:
        log(f"{file} was chosen for step {record.get('step')}, the checkpoint is at step {step}: ignored "
            f"(run fastexit calibrate again)")
        return config
    d = config.to_dict()
    d["method"] = dict(d["method"], exit_layer=exits[0], exit_layers=exits, routing_thresholds=thresholds,
                       confidence=confidence)
    try:
        return RunConfig.from_dict(d)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{file}: does not fit the run ({err}); delete it or calibrate again") from None


def _read_checkpoint(path: Path):
    """(path, contents) of a run folder's checkpoint, read and verified once, or (None, None)."""
    found = ckpt.find_checkpoint(path)
    return found, ckpt.load_checkpoint(found) if found is not None else None


def read_config(path: Path) -> RunConfig:
    """The RunConfig of a run folder; the checkpoint's copy wins over config.json (it is the
    one the weights belong to)."""
    checkpoint = ckpt.find_checkpoint(path)
    if checkpoint is not None:
        return ckpt.load_checkpoint(checkpoint)["run_config"]
    file = path / "config.json"
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(d, dict):
            raise TypeError(f"a JSON {type(d).__name__}, not an object")
        return RunConfig.from_dict(ckpt.run_dict_from_version_1(d) if ckpt.is_version_1_run_dict(d) else d)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not a run folder (no {ckpt.CKPT_NAME} or config.json)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{file}: not a valid run config ({err})") from None


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop the lines an interrupted run wrote after its last checkpoint."""
    if path.exists():
        write_lines(path, [line for line, record in read_metrics(path)
                           if record["step"] <= last_step and record["kind"] != "final"])


def _field(d: Dict[str, Any], dotted: str):
    section, _, key = dotted.rpartition(".")
    return (d[section] if section else d).get(key)


def _flag(dotted: str) -> str:
    """The command-line flag that sets a dotted RunConfig field."""
    key = dotted.rpartition(".")[2]
    return "--data" if key == "paths" else "--" + key.replace("_", "-")


def apply_resume_changes(saved: RunConfig, changes: Dict[str, Any], source: Path) -> RunConfig:
    """The saved config with ``changes`` ({dotted field: value in to_dict form}) applied where
    ``RESUME_OVERRIDABLE`` allows; any other field that differs is an error naming both."""
    run = saved.to_dict()
    for dotted, value in changes.items():
        if dotted in RESUME_OVERRIDABLE:
            section, key = dotted.split(".")
            run[section][key] = value
        elif value != _field(run, dotted):
            raise ValueError(f"{_flag(dotted)} {value!r} does not match the run being resumed ({dotted} = "
                             f"{_field(run, dotted)!r} in {source}); a resumed run keeps its config")
    return RunConfig.from_dict(run)


# ------------------------------------------------------------------------------- Run
class Run:
    """One run folder: its config, and once prepared its corpus, model and trainer.

    ``parallel`` (None, 'ddp' or 'fsdp') and ``compute_dtype`` say how ``train`` runs under
    torchrun (``distributed.wrap``): properties of the launch, not of the run, which resumes
    with any of them and any number of ranks. ``compute_dtype`` torch.bfloat16 computes in bf16
    with fp32 weights: FSDP2's MixedPrecisionPolicy under 'fsdp', else the trainer's autocast
    (``UniversalTrainer.compute_dtype``), in training and evaluation.
    """

    def __init__(self, path: Path, config: RunConfig, *, device="cpu", backend: str = "auto",
                 parallel: Optional[str] = None, compute_dtype: Optional[torch.dtype] = None):
        if parallel is not None and config.hf_model is not None:
            raise ValueError(f"--parallel: not yet supported for runs of a transformers model ({path} trains "
                             f"{config.hf_model}); train or resume it in one process")
        self.path, self.config = Path(path), config
        self.device, self.backend = torch.device(device), backend
        self.parallel, self.compute_dtype = parallel, compute_dtype
        self.corpus, self.model, self.trainer, self.payload, self.ckpt_path = None, None, None, None, None
        self.trained = False  # train() ran on this object: its in-memory state may be mid-run
        self.step: Optional[int] = None  # Run.load: the step of the checkpoint loaded
        self.early_stop: Optional[Dict[str, Any]] = None  # dict(step, best_step, best_val_ppl) once it stopped early

    # ---------------------------------------------------------------- opening a run
    @classmethod
    def create(cls, path: Path, config: RunConfig, **runtime) -> "Run":
        """A new run in ``path``, locked (``lock_run``) for the rest of this process; refuses a
        folder that already holds a run. A failure before training leaves no folder behind."""
        path = Path(path)
        claim = _Claim(path, create=True)
        try:
            if is_run_folder(path):
                raise ValueError(f"{path} already holds a run; resume it (fastexit train --resume, or Run.resume), "
                                 "or choose another folder (fastexit never overwrites a run)")
            return cls(path, config, **runtime)._prepare()
        except BaseException:
            claim.give_up()
            raise

    @classmethod
    def resume(cls, path: Path, changes: Optional[Dict[str, Any]] = None, **runtime) -> "Run":
        """The run in ``path``, locked (``lock_run``), continued from its checkpoint (or
        started, if it has none)."""
        claim = _Claim(Path(path), create=False)
        try:
            found, payload = _read_checkpoint(Path(path))  # read once: _prepare checks it against the run
            saved = payload["run_config"] if payload is not None else read_config(Path(path))
            config = apply_resume_changes(saved, changes or {}, Path(path))
            return cls(path, config, **runtime)._prepare((found, payload))
        except BaseException:
            claim.give_up()
            raise

    @classmethod
    def load(cls, path: Path, *, need_data: bool = True, calibration: bool = True, **runtime) -> "Run":
        """A trained run's model and trainer from its checkpoint (and its corpus), routing as
        its calibration.json says unless ``calibration`` is False. Takes no writer lock: the
        checkpoint is read under ``checkpoint.reading``."""
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such run folder")
        with ckpt.reading(path):  # a save beside us swaps its folders before or after this, not during it
            ckpt_path = ckpt.find_checkpoint(path)
            if ckpt_path is None:
                raise FileNotFoundError(f"{Path(path) / ckpt.CKPT_NAME}: no checkpoint there (train the run first)")
            payload = ckpt.load_checkpoint(ckpt_path)
            hf_model = payload["run_config"].hf_model is not None
            model = _hf_model(hf.load, ckpt_path) if hf_model else ckpt.restore_model(payload, ckpt_path)
        run = cls(path, payload["run_config"], **runtime)
        if need_data:
            run.corpus = load_corpus(run.config.data)
            ckpt.check_matches(payload, ckpt_path, data=_data_key(corpus_identity(run.corpus)))
        run.model = model.to(run.device)
        run.step = payload["step"]  # of the checkpoint loaded
        if calibration:
            run.config = with_calibration(run.config, run.path, run.step)
        run.trainer = run._new_trainer()
        return run

    def _new_trainer(self) -> UniversalTrainer:
        return UniversalTrainer(self.config.method, self.config.model.vocab_size, device=self.device,
                                backend=self.backend, seed=self.config.train.seed,
                                compute_dtype=None if self.parallel == "fsdp" else self.compute_dtype)

    def _prepare(self, checkpoint=(None, None)) -> "Run":
        """Load data, fix the model's vocabulary and the corpus identity in the config, build
        the model (restored from ``checkpoint``, ``_read_checkpoint``'s (path, contents), when
        resuming) and check that checkpoint, config and data agree. Writes nothing."""
        cfg = self.config
        with distributed.local_rank_zero_first():  # one rank per node builds a missing data cache
            self.corpus = load_corpus(cfg.data)
        check_corpus(self.corpus, cfg.train.batch_size, cfg.train.seq_len)
        identity = corpus_identity(self.corpus)
        data = DataConfig(**dict(cfg.data.to_dict(), identity=identity, n_bytes=dict(self.corpus.n_bytes),
                                 n_tokens={s: int(len(a)) for s, a in self.corpus.splits.items()}))
        model = cfg.model.to_dict()
        if cfg.hf_model is None:  # a native model's vocabulary is the tokenizer's
            model["vocab_size"] = identity["vocab_size"]
        elif identity["vocab_size"] > model["vocab_size"]:
            raise ValueError(f"--hf-model: the tokenizer has {identity['vocab_size']} tokens, more than the model's "
                             f"vocab_size {model['vocab_size']}")
        self.config = RunConfig.from_dict(dict(cfg.to_dict(), data=data.to_dict(), model=model))
        self._load_state(checkpoint)
        return self

    def _load_state(self, checkpoint=(None, None)) -> None:
        """The model (and trainer) as ``checkpoint`` (``_read_checkpoint``'s (path, contents))
        left them, or freshly initialised from the seed when it is (None, None)."""
        cfg = self.config
        self.ckpt_path, self.payload = checkpoint
        if self.payload is not None:
            ckpt.check_matches(self.payload, self.ckpt_path, model_config=cfg.model, data=_data_key(cfg.data.identity))
            if self.payload["step"] > cfg.train.steps:
                raise ValueError(f"steps {cfg.train.steps} is below the checkpoint's step {self.payload['step']} "
                                 f"({self.ckpt_path})")
        distributed.seed_everything(cfg.train.seed)
        self.trainer = self._new_trainer()
        if cfg.hf_model is not None:  # the checkpoint's transformers folder, or the one the run starts from
            self.model = _hf_model(hf.load, self.ckpt_path) if self.payload is not None else \
                _hf_model(hf.from_folder, Path(cfg.hf_model))
            self.trainer.add_confidence_heads(self.model)  # a new run's (a saved folder has its own)
        else:
            self.model = self.trainer.add_confidence_heads(EarlyExitTransformer(cfg.model))  # before the weights load
            if self.payload is not None:
                ckpt.load_weights(self.model, self.payload, self.ckpt_path)
        self.model.to(self.device)

    # ---------------------------------------------------------------------- training
    def train(self, *, progress: bool = True, stop_at: Optional[int] = None) -> int:
        """Train (or continue) to ``train.steps``, or stop after step ``stop_at``; writes
        config.json, metrics.jsonl and the checkpoint. Returns the step reached. Under torchrun
        every rank calls it (each trains on its rows of every batch)."""
        t = self.config.train
        if stop_at is not None and not 1 <= stop_at <= t.steps:
            raise ValueError(f"stop_at must be in [1, steps={t.steps}], got {stop_at}")
        if self.trained:  # a second call continues from what the first left on disk, as a new process would
            self._load_state(_read_checkpoint(self.path))
        self.trained = True
        fsdp_dtype = self.compute_dtype if self.parallel == "fsdp" else None  # else the trainer's autocast
        model = distributed.wrap(self.model, self.parallel, compute_dtype=fsdp_dtype)  # self.model in one process
        optimizer = self.trainer.create_optimizer(self.model, t.lr, weight_decay=t.weight_decay)
        stream = self._train_stream()
        start = self._restore_state(optimizer, stream)
        val, val_bytes = split_batches(self.corpus, "val", t.batch_size, t.seq_len, t.eval_batches, self.device)
        distributed.barrier()  # every rank has checked the folder before rank 0 writes to it
        main = distributed.is_main()
        if main:  # every check passed: from here on, files are written
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.path / "config.json", self.config.to_dict())
            truncate_metrics(self.path / "metrics.jsonl", start)
        if start == t.steps:
            log(f"{self.path}: already trained to step {start}")
            return start
        early = self._early_stopping(start)
        if early is not None and early.stop:
            self.early_stop = dict(step=start, **early.summary())
            log(f"{self.path}: already stopped early at step {start} (best val ppl at step {early.best_step})")
            return start
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") if main else contextlib.nullcontext() as metrics:
            writer = _StepWriter(self, optimizer, stream, metrics, val_bytes, stop_at, start)
            try:
                self.trainer.fit(model, stream, t.steps, t.lr, warmup_steps=t.warmup_steps,
                                 min_lr_ratio=t.min_lr_ratio, grad_clip=t.grad_clip, val_batches=val,
                                 eval_every=t.eval_every, start_step=start, optimizer=optimizer,
                                 progress_bar=progress and main, callback=writer, early_stopping=early)
                step = self.trainer.step
                writer.save(step)
            except StopTraining as stop:
                log(f"stopped after step {stop.args[0]} of {t.steps}; continue with: "
                    f"fastexit train --out {self.path} --resume")
                return stop.args[0]
            except KeyboardInterrupt:
                raise writer.interrupted() from None
            except _Diverged as bad:
                raise RunFailed(f"{self.path}: step {bad.args[0]}: {bad.args[1]}: the run diverged and training "
                                f"stopped; {writer.where(resume=False)} (resumed, it would diverge again: a new run "
                                f"with a lower --lr or longer --warmup-steps may not)") from None
            except OSError as err:  # a full disk, mostly: what was committed stays
                err = no_space(self.path, err) or err  # a metrics line that did not fit says so too
                raise RunFailed(f"{err}: training stopped in step {writer.step}; {writer.where()}") from None
        if early is not None and early.stop:
            self.early_stop = dict(step=step, **early.summary())
            log(f"{self.path}: stopped early at step {step} of {t.steps}: {early.patience} evaluations without a "
                f"better val ppl than {early.best_ppl:.3f} (step {early.best_step})")
        return step

    def _early_stopping(self, start: int) -> Optional[EarlyStopping]:
        """The early-stopping state after step ``start``, replayed from the logged evaluations
        (None when the run does not stop early)."""
        patience = self.config.train.early_stopping_patience
        if not patience:
            return None
        early, path = EarlyStopping(patience), self.path / "metrics.jsonl"
        for _, record in read_metrics(path):
            if record["kind"] == "eval" and record["step"] <= start:
                ppl = record.get("ppl", math.nan)
                if ppl is not None and (isinstance(ppl, bool) or not isinstance(ppl, (int, float))):
                    raise ValueError(f"{path}: the eval line of step {record['step']} has ppl {ppl!r}, not a number")
                early.update(record["step"], math.nan if ppl is None else ppl)  # null: not finite, never the best
        return early

    def _train_stream(self):
        """This process's training batches: the global ones in one process; under torchrun the
        rank's rows of them (``distributed.RankBatches``), so any world size sees the same data."""
        t = self.config.train
        if distributed.world_size() == 1:
            return random_batches(self.corpus.splits["train"], t.batch_size, t.seq_len, seed=t.seed, device=self.device)
        stream = random_batches(self.corpus.splits["train"], t.batch_size, t.seq_len, seed=t.seed)  # on the host
        return distributed.RankBatches(stream, t.batch_size, self.device)

    def _restore_state(self, optimizer, stream) -> int:
        """Optimizer, data stream and RNG states from the checkpoint; returns its step (0 if none)."""
        if self.payload is None:
            return 0
        ckpt.load_optimizer(optimizer, self.model, self.payload, self.ckpt_path)
        stream.load_state_dict(self.payload["data_state"])
        ckpt.restore_rng_state(self.payload["rng"])
        return self.payload["step"]

    def save(self, optimizer, stream, step: int) -> None:
        """A checkpoint of ``step``: sharded under FSDP2 (every rank writes its shards), else
        ``ckpt.pt`` from rank 0 (DDP replicas are all alike); older checkpoints go."""
        if not _finite_weights(self.model):  # every rank: under FSDP2 each checks its shards
            raise _Diverged(step, "the weights are not finite")
        args = dict(model=self.model, run_config=self.config, optimizer=optimizer, step=step,
                    data_state=stream.state_dict())
        if self.config.hf_model is not None:
            if distributed.is_main():
                ckpt.save_hf_checkpoint(self.path, tokenizer=self._hf_tokenizer(), **args)
        elif self.parallel == "fsdp":
            ckpt.save_sharded_checkpoint(self.path, **args)
        elif distributed.is_main():
            path = ckpt.save_checkpoint(self.path / ckpt.CKPT_NAME, **args)
            with ckpt.committing(self.path):
                ckpt.remove_older_checkpoints(self.path, keep=path)

    def log_final(self, step: int, stats: Dict[str, Any]) -> None:
        if distributed.is_main():
            with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as metrics:
                metrics.write(json_text(dict(kind="final", step=step, **stats, **self._early_fields())) + "\n")

    def _early_fields(self) -> Dict[str, Any]:
        return {} if self.early_stop is None else dict(stopped_early=True, best_step=self.early_stop["best_step"],
                                                       best_val_ppl=self.early_stop["best_val_ppl"])

    # -------------------------------------------------------------------- evaluation
    def evaluate(self, split: str = "val", mode: str = "exact", *, eval_batches: Optional[int] = None,
                 routing_threshold: Optional[float] = None, per_layer: Optional[bool] = None,
                 compare_exact: bool = False, confidence: Optional[str] = None,
                 exit_layers: Optional[Sequence[int]] = None) -> Dict[str, Any]:
        """``UniversalTrainer.evaluate`` on the first ``eval_batches`` batches (None: all) of a
        split, with bits per byte; ``routing_threshold``, ``confidence`` and ``exit_layers``
        None = the run's ("learned" needs a run trained with it: its checkpoint holds the
        confidence heads)."""
        t = self.config.train
        check_corpus(self.corpus, t.batch_size, t.seq_len, splits=(split,))
        batches, n_bytes = split_batches(self.corpus, split, t.batch_size, t.seq_len, eval_batches, self.device)
        stats = self.trainer.evaluate(self.model, batches, mode=mode, routing_threshold=routing_threshold,
                                      per_layer=per_layer, compare_exact=compare_exact, confidence=confidence,
                                      exit_layers=exit_layers)
        return dict(with_bpb(stats, n_bytes), split=split, mode=mode)


    def calibrate(self, *, max_ppl_increase: Optional[float] = None, min_agreement: Optional[float] = None,
                  delta: float = 0.1, exits: Optional[Sequence[int]] = None, confidence: Optional[str] = None,
                  eval_batches: Optional[int] = None) -> Dict[str, Any]:
        """Thresholds chosen on val (``calibrate.calibrate``: Learn-then-Test, one constraint),
        their held-out routing metrics on test, written to ``calibration.json``; from then on
        ``Run.load`` routes with them (the run's exits and confidence unless given). A run from
        ``Run.load``; the calibration holds for its checkpoint's step."""
        if self.step is None or self.corpus is None:
            raise ValueError(f"{self.path}: calibrate a run opened with Run.load (with its data): the calibration "
                             f"belongs to the checkpoint's step")
        lock_run(self.path)  # it writes into the run folder: not beside a training process
        m, t = self.config.method, self.config.train
        exits, confidence = list(exits or m.exits), confidence or m.confidence
        tables = {split: calibrate.exit_table(self.model, split_batches(self.corpus, split, t.batch_size, t.seq_len,
                                                                        eval_batches, self.device)[0],
                                              exits, confidence, backend=self.backend) for split in ("val", "test")}
        result = calibrate.calibrate(tables["val"], max_ppl_increase=max_ppl_increase, min_agreement=min_agreement,
                                     delta=delta)
        record = dict(result.to_dict(), confidence=confidence, step=self.step, eval_batches=eval_batches,
                      val=result.metrics, test=calibrate.route_metrics(tables["test"], result.thresholds))
        write_json(self.path / CALIBRATION, record)
        self.config = with_calibration(self.config, self.path, self.step)
        self.trainer = self._new_trainer()
        return record

    def sweep(self, split: str, mode: str, thresholds: Sequence[float], *, eval_batches: Optional[int] = None,
              compare_exact: bool = False, confidence: Optional[str] = None,
              exit_layers: Optional[Sequence[int]] = None) -> List[Dict[str, Any]]:
        """One evaluation per routing threshold (no per-layer pass), each row with its
        ``routing_threshold`` as text; compare_exact applies in compact mode only; confidence
        and exit_layers as in ``evaluate``."""
        rows = []
        for th in thresholds:
            stats = self.evaluate(split, mode, eval_batches=eval_batches, routing_threshold=th, per_layer=False,
                                  compare_exact=compare_exact and mode == "compact", confidence=confidence,
                                  exit_layers=exit_layers)
            rows.append(dict(stats, routing_threshold=f"{th:g}"))
            log(f"routing_threshold {th:g}: ppl {stats['ppl']:.3f}, compute_cost {stats['compute_cost']:.3f}")
        return rows

    def _hf_tokenizer(self):
        """The run's tokenizer as a transformers tokenizer, for the checkpoint folder."""
        if self.config.data.tokenizer is not None:
            return load_hf_tokenizer(self.config.data.tokenizer)
        from transformers import PreTrainedTokenizerFast  # optional (the hf extra): only runs of an HF model get here
        return PreTrainedTokenizerFast(tokenizer_object=self.corpus.tokenizer)

    def tokenizer(self):
        """The run's tokenizer (a ``tokenizers.Tokenizer``) from its data cache, else (an HF
        run) from its checkpoint folder; rebuilt through the corpus if both are gone."""
        identity = self.config.data.identity or {}
        with ckpt.reading(self.path):
            saved = ckpt.find_checkpoint(self.path) if self.config.hf_model is not None else None
            candidates = [(Path(identity["cache_dir"]) / "tokenizer.json", True)] if identity.get("cache_dir") else []
            for path, cached in candidates + ([(saved / "tokenizer.json", False)] if saved else []):
                if path.is_file():  # checked against the run's record: a replaced tokenizer is an error
                    tok = run_tokenizer(identity, path, cached=cached)
                    if tok.get_vocab_size() == identity.get("vocab_size", self.model.cfg.vocab_size):
                        return tok
        return load_corpus(self.config.data).tokenizer


class _StepWriter:
    """The step callback of ``fit``: metrics.jsonl lines (rank 0; ``metrics`` is None on the
    other ranks), periodic checkpoints, stop_at."""

    def __init__(self, run: Run, optimizer, stream, metrics, val_bytes: int, stop_at, start: int):
        self.run, self.optimizer, self.stream, self.metrics = run, optimizer, stream, metrics
        self.val_bytes, self.stop_at, self.saved_step = val_bytes, stop_at, start
        self.step = start + 1  # the step under way
        self.t0 = time.perf_counter()

    def save(self, step: int) -> None:
        self.run.save(self.optimizer, self.stream, step)
        self.saved_step = step

    def __call__(self, _trainer, record: Dict[str, Any]) -> None:
        step, t = record["step"], self.run.config.train
        self.step = step
        if self.metrics is not None:  # rank 0
            self._write(record)
        bad = [f"{k} {record[k]}" for k in ("loss", "grad_norm") if record.get(k) is not None
               and not math.isfinite(record[k])]  # the same on every rank: loss and norm are global
        if bad:
            raise _Diverged(step, " and ".join(bad))
        if step == self.stop_at or (step % t.ckpt_every == 0 and step < t.steps):
            self.save(step)
        if step == self.stop_at and step < t.steps:
            raise StopTraining(step)

    def _write(self, record: Dict[str, Any]) -> None:
        line = {k: v for k, v in record.items() if k not in ("eval", "early_stop")}
        self.metrics.write(json_text(dict(kind="train", elapsed_s=round(time.perf_counter() - self.t0, 3),
                                          **line)) + "\n")
        if "eval" in record:
            stats = with_bpb(record["eval"], self.val_bytes)
            self.metrics.write(json_text(dict(kind="eval", step=record["step"], split="val", mode="exact",
                                              **stats)) + "\n")
        if "early_stop" in record:
            self.metrics.write(json_text(dict(kind="early_stop", step=record["step"], **record["early_stop"])) + "\n")
        self.metrics.flush()

    def where(self, resume: bool = True) -> str:
        """Which checkpoint is intact (and how to go on from it)."""
        path = self.run.path
        if not self.saved_step:
            return "no checkpoint was written yet"
        held = f"{ckpt.find_checkpoint(path)} holds step {self.saved_step}"
        return f"{held}; continue with: fastexit train --out {path} --resume" if resume else held

    def interrupted(self) -> KeyboardInterrupt:
        return KeyboardInterrupt(f"interrupted; {self.where()}")


def _hf_model(load, folder: Path):
    """The transformers model ``load`` (``hf.load`` or ``hf.from_folder``) reads from
    ``folder``; one ValueError naming the folder when its files do not load (a truncated
    safetensors file, say)."""
    from safetensors import SafetensorError  # optional (the hf extra): only runs of a transformers model get here
    try:
        model = load(folder, dtype=torch.float32)
    except (OSError, RuntimeError, SafetensorError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{folder}: the model does not load ({first}); truncated or damaged?") from None
    return model[0] if isinstance(model, tuple) else model


def _finite_weights(model: torch.nn.Module) -> bool:
    """Whether every weight is finite, on every rank (FSDP2: each rank checks its shards)."""
    local = [p.to_local() if distributed.is_dtensor(p) else p for p in model.parameters()]
    flags = [torch.isfinite(p).all() for p in local if p.numel()]
    bad = torch.stack(flags).logical_not().any().to(torch.float32) if flags else torch.zeros(())
    return distributed.sum_over_ranks(bad).item() == 0
