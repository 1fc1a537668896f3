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
"""
import hashlib
import os
import random
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from .atomic import atomic_write
from .config import ModelConfig, RunConfig
from .model import EarlyExitTransformer

PathLike = Union[str, os.PathLike]

CKPT_NAME = "ckpt.pt"
FORMAT = "fastexit-checkpoint"
FORMAT_VERSION = 2
REQUIRED_KEYS = ("format", "version", "digest", "model", "run_config", "optimizer", "step", "data_state", "rng")
DATA_KEYS = ("vocab_size", "fingerprint", "tokenizer")  # what a checkpoint's corpus must match


# --------------------------------------------------------------------------------- RNG
def capture_rng_state() -> Dict[str, Any]:
    """Python, NumPy and torch (CPU, and every CUDA device when present) RNG states."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(python=[version, list(mt_state), gauss],
                 numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                            has_gauss=int(has_gauss), cached_gaussian=float(cached)),
                 torch=torch.get_rng_state(), cuda=[])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


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
def save_checkpoint(path: PathLike, *, model: torch.nn.Module, run_config: RunConfig,
                    optimizer: Optional[torch.optim.Optimizer], step: int, data_state: Optional[dict]) -> Path:
    """Write a checkpoint atomically to ``path`` and return it.

    ``run_config``: the run's resolved config (its ``data.identity`` names the tokenized
    corpus); ``step``: completed optimizer steps; ``data_state``: the training stream's
    ``state_dict()``. RNG states are captured here, so call it at a step boundary.
    """
    path = Path(path)
    payload = dict(format=FORMAT, version=FORMAT_VERSION, digest="",
                   model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                   run_config=run_config.to_dict(), optimizer=None if optimizer is None else optimizer.state_dict(),
                   step=int(step), data_state=data_state, rng=capture_rng_state())
    payload["digest"] = payload_digest(payload)
    atomic_write(path, lambda tmp: _save(payload, tmp))
    return path


def _save(payload: dict, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        torch.save(payload, f)


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _read(path: Path) -> Dict[str, Any]:
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
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing}")
    return payload


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


def _diff(saved: Dict[str, Any], wanted: Dict[str, Any]) -> str:
    keys = sorted(set(saved) | set(wanted))
    return ", ".join(f"{k} {saved.get(k)!r} (checkpoint) vs {wanted.get(k)!r} (requested)"
                     for k in keys if saved.get(k) != wanted.get(k))


def load_checkpoint(path: PathLike, *, model_config: Optional[ModelConfig] = None,
                    data: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Read and verify a checkpoint written by ``save_checkpoint``; returns its dict, whose
    ``run_config`` is a ``RunConfig``.

    With ``model_config`` / ``data`` it must also match them (see ``check_matches``). Any
    failure raises one ``ValueError`` naming the file and what is wrong
    (``FileNotFoundError`` when the file is absent).
    """
    path = Path(path)
    payload = _read(path)
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
    """Build an ``EarlyExitTransformer`` from a loaded checkpoint and load its weights."""
    model = EarlyExitTransformer(payload["run_config"].model)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise ValueError(f"{path}: model weights do not fit its config: {_first_line(err)}") from None
    return model
