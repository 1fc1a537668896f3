"""Save and resume a training run: one self-checking file per run folder.

A checkpoint (``ckpt.pt`` in the run folder) holds everything a resumed run needs to end on
the same weights as an uninterrupted one: the model state, the run's ``RunConfig`` (once, as
a plain dict: method, model, training, data and the tokenized corpus's identity), the
optimizer state, the step (completed optimizer steps), the data stream's state and the RNG
states (Python, NumPy, torch CPU and CUDA).

Contents are plain dicts, lists, numbers, strings and tensors, so the file loads with
``torch.load(path, weights_only=True)``. A SHA-256 digest of every value is stored beside
them: a truncated, corrupted or foreign file is refused with one ``ValueError`` naming the
file, never half-loaded. Writes go to a temporary file in the same folder, then
``os.replace`` (``fastexit.atomic``): a crash mid-write leaves the previous checkpoint intact.
Version-1 files (which stored the method and model configs a second time beside an older
run-config layout) are read and converted.

A run trained with FSDP2 (``fastexit train --parallel fsdp``) saves a sharded checkpoint
instead: the folder ``ckpt-<step>`` (``save_sharded_checkpoint``), in which every rank wrote
its shards of the model and optimizer state with torch.distributed.checkpoint (keyed by
parameter name, so that any number of ranks, or one process, can load them) and rank 0 wrote
``meta.pt`` (everything else, with its digest, and the size and SHA-256 of every shard file:
DCP keeps no checksums of its own). The folder is written under a temporary name and renamed
once every rank has written, so a rank that fails mid-save leaves nothing a loader reads.
``find_checkpoint`` picks a run folder's latest checkpoint of either kind; ``load_checkpoint``,
``load_weights`` and ``load_optimizer`` read both.

A run started from a transformers model (``RunConfig.hf_model``) saves the folder ``model``
(``save_hf_checkpoint``): ``fastexit.hf.save``'s save_pretrained files and fastexit.json (it
loads with transformers alone), the run's tokenizer, and ``ckpt.pt`` as above without the
weights (its ``model`` is None) but with the SHA-256 of every other file in the folder
(``file_digests``), which ``load_checkpoint`` checks before anything loads them. The folder is
written under a temporary name and swapped in by two renames; ``find_checkpoint`` also finds
the previous folder if a crash fell between them.

Every file a checkpoint lists is checked where it is read: a damaged or missing one is one
``ValueError`` naming it. Folder swaps and the removal of older checkpoints happen under the
run folder's commit lock (``committing``), which readers share (``reading``): a load never
sees a folder vanish under it. A full disk during a save is one ``OSError`` "no space left on
<run folder>", the previous checkpoint untouched; what crashed saves left is removed by
``clean_run_folder`` when the next writer takes the run.
"""
import hashlib
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Set, Union

import numpy as np
import torch

from . import distributed, hf
from .atomic import atomic_write, file_digest, locked, no_space, remove_stale_temps
from .config import ModelConfig, RunConfig
from .model import EarlyExitTransformer

PathLike = Union[str, os.PathLike]

CKPT_NAME = "ckpt.pt"
FORMAT = "fastexit-checkpoint"
FORMAT_VERSION = 2
REQUIRED_KEYS = ("format", "version", "digest", "model", "run_config", "optimizer", "step", "data_state", "rng")
SHARDED_PREFIX = "ckpt-"  # a sharded checkpoint is the folder ckpt-<step, 6 digits>
META_NAME = "meta.pt"  # in it, beside the shards: every key but the model and optimizer tensors
SHARDED_KEYS = tuple(k for k in REQUIRED_KEYS if k not in ("model", "optimizer")) + ("files",)
DATA_KEYS = ("vocab_size", "fingerprint", "tokenizer", "files")  # what a checkpoint's corpus must match
HF_DIR = "model"  # an HF run's checkpoint folder: save_pretrained files + ckpt.pt without weights
FILE_DIGESTS = "file_digests"  # {file name: SHA-256} of the files a checkpoint keeps beside its payload
COMMIT_LOCK = ".fastexit.commit.lock"  # in a run folder: held to swap checkpoint folders, shared to read them
# What interrupted saves leave in a run folder: sharded and HF folders under their temporary or
# previous names (an HF folder's previous copy only goes once the new one is complete: see clean_run_folder).
_SAVE_LEFTOVERS = re.compile(rf"^\.({re.escape(SHARDED_PREFIX)}\d+\.(tmp|old)|{HF_DIR}\.tmp)$")


# --------------------------------------------------------------------------------- RNG
def _cuda_rng_devices() -> list:
    """Every CUDA device in one process; under torchrun the rank's own (reading another GPU's
    generator would open a CUDA context there, on every rank)."""
    return [torch.cuda.current_device()] if distributed.world_size() > 1 else list(range(torch.cuda.device_count()))


def capture_rng_state() -> Dict[str, Any]:
    """Python, NumPy and torch (CPU, and every CUDA device when present; under torchrun the
    rank's own) RNG states."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(python=[version, list(mt_state), gauss],
                 numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                            has_gauss=int(has_gauss), cached_gaussian=float(cached)),
                 torch=torch.get_rng_state(), cuda=[])
    if torch.cuda.is_available():
        state["cuda"] = [torch.cuda.get_rng_state(d) for d in _cuda_rng_devices()]
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        for device, cuda_state in zip(_cuda_rng_devices(), state["cuda"]):
            torch.cuda.set_rng_state(cuda_state, device)


# ------------------------------------------------------------------------------ digest
def _feed(h, value) -> None:
    """Hash ``value`` canonically: dicts by sorted key, tensors by dtype, shape and bytes."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(value.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(b"D{")
        for k in sorted(value, key=repr):
            h.update(repr(k).encode() + b"=")
            _feed(h, value[k])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"L[")
        for item in value:
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def payload_digest(payload: Dict[str, Any]) -> str:
    """SHA-256 over every entry of a checkpoint except ``digest`` itself."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "digest"})
    return h.hexdigest()


# -------------------------------------------------------------------------- save / load
def save_checkpoint(path: PathLike, *, model: Optional[torch.nn.Module], run_config: RunConfig,
                    optimizer: Optional[torch.optim.Optimizer], step: int, data_state: Optional[dict],
                    file_digests: Optional[Dict[str, str]] = None) -> Path:
    """Write a checkpoint atomically to ``path`` and return it.

    ``model`` None: the weights are kept elsewhere (``save_hf_checkpoint``), whose files'
    SHA-256 ``file_digests`` records. ``run_config``: the run's resolved config (its
    ``data.identity`` names the tokenized corpus); ``step``: completed optimizer steps;
    ``data_state``: the training stream's ``state_dict()``. RNG states are captured here, so
    call it at a step boundary.
    """
    path = Path(path)
    payload = dict(format=FORMAT, version=FORMAT_VERSION, digest="",
                   model=None if model is None else {k: v.detach().cpu() for k, v in model.state_dict().items()},
                   run_config=run_config.to_dict(), optimizer=None if optimizer is None else optimizer.state_dict(),
                   step=int(step), data_state=data_state, rng=capture_rng_state())
    if file_digests is not None:
        payload[FILE_DIGESTS] = dict(file_digests)
    payload["digest"] = payload_digest(payload)
    atomic_write(path, lambda tmp: _save(payload, tmp))
    return path


def _save(payload: dict, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        torch.save(payload, f)


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _read(path: Path, required=REQUIRED_KEYS) -> Dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint there")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    # A damaged zip/pickle stream can fail with nearly any exception type: report them all
    # as one "unreadable" error naming the file instead of a traceback from the loader.
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupted?): "
                         f"{type(err).__name__}: {_first_line(err)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fastexit checkpoint")
    if payload.get("version") not in (1, FORMAT_VERSION):
        raise ValueError(f"{path}: checkpoint format version {payload.get('version')!r}, "
                         f"this fastexit reads versions 1 and {FORMAT_VERSION}")
    if "digest" not in payload or payload_digest(payload) != payload["digest"]:
        raise ValueError(f"{path}: checkpoint is corrupted (its contents do not match their digest)")
    if payload["version"] == 1:
        try:
            payload = _from_version_1(payload)
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: version-1 checkpoint lacks {_first_line(err)}") from None
    missing = [k for k in required if k not in payload]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing}")
    return payload


def _read_sharded(path: Path) -> Dict[str, Any]:
    """meta.pt of a sharded checkpoint, checked, and every shard file at its recorded size
    (DCP keeps no checksums: a cut or missing shard is caught here, not halfway through a load)."""
    payload = _read(path / META_NAME, SHARDED_KEYS)
    wrong = sorted(name for name, size in payload["files"].items()
                   if not (path / name).is_file() or (path / name).stat().st_size != size)
    if wrong:
        raise ValueError(f"{path}: sharded checkpoint is truncated or incomplete ({', '.join(wrong)} "
                         "missing or not at the size written)")
    check_file_digests(path, payload, path / META_NAME)
    return payload


def digest_files(folder: Path, skip=()) -> Dict[str, str]:
    """{name: SHA-256} of every file directly in ``folder`` but those named in ``skip``."""
    return {f.name: file_digest(f) for f in sorted(Path(folder).iterdir()) if f.is_file() and f.name not in skip}


def check_file_digests(folder: Path, payload: Dict[str, Any], source: Path) -> None:
    """Each file a checkpoint recorded (``payload['file_digests']``, written by a fastexit that
    records them) against its SHA-256: one ValueError naming the first damaged or missing file."""
    for name, digest in sorted((payload.get(FILE_DIGESTS) or {}).items()):
        file = Path(folder) / name
        if not file.is_file():
            raise ValueError(f"{file}: missing (the checkpoint {source} lists it)")
        if file_digest(file) != digest:
            raise ValueError(f"{file}: damaged (its SHA-256 does not match the one recorded in {source})")


def _from_version_1(payload: Dict[str, Any]) -> Dict[str, Any]:
    """A version-1 payload in today's layout: one RunConfig dict."""
    run = run_dict_from_version_1(payload["run_config"])
    run["method"], run["model"] = payload["universal_config"], payload["model_config"]
    keep = ("model", "optimizer", "step", "data_state", "rng")
    return dict({k: payload[k] for k in keep}, format=FORMAT, version=FORMAT_VERSION, digest=payload["digest"],
                run_config=run)


def run_dict_from_version_1(old: Dict[str, Any]) -> Dict[str, Any]:
    """A version-1 run config (config.json, or inside a v1 checkpoint) as a RunConfig dict: v1
    named the preset inside the method and called warmup_steps "warmup"."""
    method = dict(old["method"])
    train = dict(old["train"])
    train["warmup_steps"] = train.pop("warmup")
    return dict(name=old["name"], preset=method.pop("preset", None), method=method, model=old["model"],
                train=train, data=old["data"])


def is_version_1_run_dict(d: Dict[str, Any]) -> bool:
    return "warmup" in d.get("train", {}) and "preset" in d.get("method", {})


def _diff(saved: Dict[str, Any], wanted: Dict[str, Any], prefix: str = "") -> str:
    keys = sorted(set(saved) | set(wanted))
    return ", ".join(_diff(saved[k], wanted[k], f"{prefix}{k}.") if isinstance(saved.get(k), dict)
                     and isinstance(wanted.get(k), dict) else
                     f"{prefix}{k} {saved.get(k)!r} (checkpoint) vs {wanted.get(k)!r} (requested)"
                     for k in keys if saved.get(k) != wanted.get(k))


def load_checkpoint(path: PathLike, *, model_config: Optional[ModelConfig] = None,
                    data: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Read and verify a checkpoint written by ``save_checkpoint`` (or the ``meta.pt`` of a
    sharded one, given its folder); returns its dict, whose ``run_config`` is a ``RunConfig``
    (a sharded checkpoint's has no ``model`` and ``optimizer``: see ``load_weights``).

    With ``model_config`` / ``data`` it must also match them (see ``check_matches``). Any
    failure raises one ``ValueError`` naming the file and what is wrong
    (``FileNotFoundError`` when the file is absent).
    """
    path = Path(path)
    if not path.is_dir():
        payload = _read(path)
    elif (path / CKPT_NAME).is_file():  # an HF run's folder: ckpt.pt lists its transformers files
        payload = _read(path / CKPT_NAME)
        check_file_digests(path, payload, path / CKPT_NAME)
    else:  # a sharded checkpoint: meta.pt lists its shards
        payload = _read_sharded(path)
    try:
        payload["run_config"] = RunConfig.from_dict(payload["run_config"])
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: invalid config in checkpoint: {_first_line(err)}") from None
    check_matches(payload, path, model_config=model_config, data=data)
    return payload


def check_matches(payload: Dict[str, Any], path: PathLike, *, model_config: Optional[ModelConfig] = None,
                  data: Optional[Dict[str, Any]] = None) -> None:
    """ValueError unless the saved model config equals ``model_config`` and every key of
    ``data`` (e.g. ``vocab_size``, ``fingerprint``) that the checkpoint's corpus identity
    recorded equals it."""
    run = payload["run_config"]
    if data is not None:  # first: a changed corpus also changes the vocab, hence the model config
        recorded = run.data.identity or {}
        keys = [k for k in data if k in recorded]
        saved, wanted = {k: recorded[k] for k in keys}, {k: data[k] for k in keys}
        if saved != wanted:
            raise ValueError(f"{path}: data mismatch (tokenizer or corpus changed): {_diff(saved, wanted)}")
    if model_config is not None and run.model != model_config:
        raise ValueError(f"{path}: model config mismatch: {_diff(run.model.to_dict(), model_config.to_dict())}")


def restore_model(payload: Dict[str, Any], path: PathLike = "checkpoint") -> EarlyExitTransformer:
    """Build an ``EarlyExitTransformer`` from a loaded checkpoint and load its weights (with
    the confidence heads of a method whose confidence is "learned")."""
    run = payload["run_config"]
    model = EarlyExitTransformer(run.model)
    if run.method.confidence_head_layers:
        model.add_confidence_heads(run.method.confidence_head_layers)
    load_weights(model, payload, path)
    return model


def load_weights(model: torch.nn.Module, payload: Dict[str, Any], path: PathLike) -> None:
    """The weights of a loaded checkpoint into ``model``, a plain (unwrapped) model: from the
    file, or from the shards of the sharded checkpoint ``path`` (under torchrun every rank
    calls it and reads the full weights)."""
    if "model" in payload and payload["model"] is None:
        raise ValueError(f"{path}: this checkpoint keeps its weights in a transformers folder (fastexit.hf.load)")
    if "model" not in payload:
        _read_shards({"model": model.state_dict()}, path, "model weights")  # in place, into the parameters
        return
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise ValueError(f"{path}: model weights do not fit its config: {_first_line(err)}") from None


def load_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, payload: Dict[str, Any],
                   path: PathLike) -> None:
    """The optimizer state of a loaded checkpoint into ``optimizer``, which
    ``UniversalTrainer.create_optimizer`` built on ``model`` (after ``distributed.wrap``:
    under FSDP2 its parameters are shards, and so becomes the state)."""
    if "optimizer" in payload:  # one process's full state, in create_optimizer's parameter order
        state = payload["optimizer"]
        optimizer.load_state_dict(distributed.shard_like_params(state, optimizer)
                                  if distributed.is_sharded(model) else state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    saved = _names_with_optimizer_state(Path(path))
    state = get_optimizer_state_dict(model, optimizer)  # this process's layout: torch gives every parameter a state
    state["state"] = {name: s for name, s in state["state"].items() if name in saved}  # AdamW has none without a grad
    _read_shards({"optimizer": state}, path, "optimizer state")
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(strict=False))


def _read_shards(state: Dict[str, Any], path: PathLike, what: str) -> None:
    """torch.distributed.checkpoint's load into ``state``: collective under torchrun, else one
    process reading every shard (which DCP warns about each time: here that is the intent).
    Any failure is one ValueError naming the folder."""
    import torch.distributed.checkpoint as dcp
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path, no_dist=distributed.world_size() == 1)
    except (RuntimeError, ValueError, dcp.CheckpointException) as err:
        raise ValueError(f"{path}: {what} cannot be read from its shards (truncated, or of another model?): "
                         f"{_first_line(err)}") from None


def _names_with_optimizer_state(path: Path) -> Set[str]:
    """Parameter names with optimizer state in a sharded checkpoint (its keys are
    'optimizer.state.<parameter name>.<state key>')."""
    import torch.distributed.checkpoint as dcp
    prefix = "optimizer.state."
    keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    return {k[len(prefix):].rpartition(".")[0] for k in keys if k.startswith(prefix)}


# ------------------------------------------------------------------ sharded (FSDP2)
def sharded_path(run_dir: PathLike, step: int) -> Path:
    return Path(run_dir) / f"{SHARDED_PREFIX}{step:06d}"


def _sharded_step(path: Path) -> Optional[int]:
    digits = path.name[len(SHARDED_PREFIX):]
    ok = path.name.startswith(SHARDED_PREFIX) and digits.isdigit() and path.is_dir()
    return int(digits) if ok else None


def save_sharded_checkpoint(run_dir: PathLike, *, model: torch.nn.Module, run_config: RunConfig,
                            optimizer: torch.optim.Optimizer, step: int, data_state: Optional[dict]) -> Path:
    """Every rank: write the sharded checkpoint ``run_dir/ckpt-<step>`` and return it.

    ``model``: the model inside ``distributed.wrap``'s module (FSDP2 shards); the other
    arguments as for ``save_checkpoint``. Each rank writes its shards of the model and
    optimizer state, rank 0 ``meta.pt``, all into a temporary folder that rank 0 renames once
    every rank has written; then it removes the run's older checkpoints. ``meta.pt`` records
    the size of every shard file, which ``load_checkpoint`` checks.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final = sharded_path(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that failed
    distributed.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)  # returns once all wrote
    except Exception as err:  # noqa: BLE001 - DCP wraps a full disk in its CheckpointException
        full = no_space(Path(run_dir), err)
        if full is None:
            raise
        raise full from None
    if distributed.is_main():
        meta = dict(format=FORMAT, version=FORMAT_VERSION, digest="", run_config=run_config.to_dict(),
                    step=int(step), data_state=data_state, rng=capture_rng_state(),
                    files={f.name: f.stat().st_size for f in tmp.iterdir()}, **{FILE_DIGESTS: digest_files(tmp)})
        meta["digest"] = payload_digest(meta)
        atomic_write(tmp / META_NAME, lambda f: _save(meta, f))
        with committing(run_dir):
            _commit(tmp, final)
            remove_older_checkpoints(run_dir, keep=final)
    distributed.barrier()
    return final


def committing(run_dir: PathLike):
    """Held (exclusive) while a save swaps checkpoint folders in and removes older ones; a
    reader (``reading``) never sees a folder vanish halfway through its load."""
    return locked(Path(run_dir) / COMMIT_LOCK)


def reading(run_dir: PathLike):
    """Held (shared) while a reader loads a run's checkpoint: a concurrent save finishes its
    swap before or after, never during (``committing``). Writes nothing but the lock file."""
    return locked(Path(run_dir) / COMMIT_LOCK, shared=True)


def clean_run_folder(run_dir: PathLike) -> list:
    """Remove what crashed writers left in a run folder: ``.<name>.<pid>.tmp`` files of atomic
    writes, unfinished sharded and HF checkpoint folders, and an HF folder's previous copy once
    the new one is complete. Call it holding the run's lock. Returns the names removed."""
    run_dir = Path(run_dir)
    removed = remove_stale_temps(run_dir) + remove_stale_temps(run_dir, _SAVE_LEFTOVERS)
    if (run_dir / HF_DIR / CKPT_NAME).is_file():
        removed += remove_stale_temps(run_dir, re.compile(rf"^\.{HF_DIR}\.old$"))
    return removed


def _commit(tmp: Path, final: Path) -> None:
    if final.exists():  # this very step was committed before (a crash right after): the new copy wins
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)


def remove_older_checkpoints(run_dir: PathLike, keep: Path) -> None:
    """Once ``keep`` is committed: delete the run folder's other checkpoints (``ckpt.pt``,
    ``ckpt-<step>`` folders) and what interrupted sharded saves left (``.ckpt-*`` folders)."""
    for path in Path(run_dir).iterdir():
        if path == Path(keep):
            continue
        if path.name == CKPT_NAME:
            path.unlink()
        elif path.is_dir() and (_sharded_step(path) is not None or path.name.startswith("." + SHARDED_PREFIX)):
            shutil.rmtree(path)


# ------------------------------------------------------------------ transformers runs
def save_hf_checkpoint(run_dir: PathLike, *, model: torch.nn.Module, run_config: RunConfig,
                       optimizer: torch.optim.Optimizer, step: int, data_state: Optional[dict],
                       tokenizer=None) -> Path:
    """Write ``run_dir/model``: ``fastexit.hf.save(model, ..., run_config.method)``, the
    transformers ``tokenizer`` (if any, its ``save_pretrained``) and ``ckpt.pt`` without the
    weights; all into a temporary folder first, then swapped in. Returns the folder."""
    final = Path(run_dir) / HF_DIR
    tmp, old = final.with_name(f".{HF_DIR}.tmp"), final.with_name(f".{HF_DIR}.old")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a save that failed
    try:
        hf.save(model, tmp, run_config.method)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_checkpoint(tmp / CKPT_NAME, model=None, run_config=run_config, optimizer=optimizer, step=step,
                        data_state=data_state, file_digests=digest_files(tmp))
    except Exception as err:  # noqa: BLE001 - safetensors and tokenizers report a full disk in their own types
        full = no_space(Path(run_dir), err)
        shutil.rmtree(tmp, ignore_errors=True)
        if full is None:
            raise
        raise full from None
    with committing(run_dir):
        _commit(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    return final


def _hf_checkpoint(run_dir: Path) -> Optional[Path]:
    """``run_dir/model``, or its previous copy when a crash fell between the two renames of a save."""
    for name in (HF_DIR, f".{HF_DIR}.old"):
        if (run_dir / name / CKPT_NAME).is_file():
            return run_dir / name
    return None


def find_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """The latest checkpoint of a run folder: ``ckpt.pt``, the ``ckpt-<step>`` folder of the
    highest step (both exist only after a crash between a save and its clean-up), or an HF
    run's ``model`` folder; None if it has none. Temporary folders of unfinished saves are
    never returned."""
    run_dir = Path(run_dir)
    hf_ckpt = _hf_checkpoint(run_dir) if run_dir.is_dir() else None
    if hf_ckpt is not None:
        return hf_ckpt
    steps = {_sharded_step(p): p for p in run_dir.glob(SHARDED_PREFIX + "*")} if run_dir.is_dir() else {}
    steps.pop(None, None)
    single = run_dir / CKPT_NAME
    if not steps:
        return single if single.exists() else None
    if single.exists() and _read(single)["step"] >= max(steps):
        return single
    return steps[max(steps)]
