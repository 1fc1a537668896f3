"""Save and resume a training run: one self-checking file per run folder.

A checkpoint (``ckpt.pt`` in the run folder) holds everything a resumed run needs to end on
the same weights as an uninterrupted one: the model state, ``ModelConfig`` and
``UniversalConfig`` (as plain dicts), the optimizer state, the trainer step, the data stream's
state, the RNG states (Python, NumPy, torch CPU and CUDA), the identity of the tokenized
corpus (vocab size, fingerprint, cache folder) and the resolved run config.

Contents are plain dicts, lists, numbers, strings and tensors, so the file loads with
``torch.load(path, weights_only=True)``. A SHA-256 digest of every value is stored beside
them: a truncated, corrupted or foreign file is refused with one ``ValueError`` naming the
file, never half-loaded. Writes go to a temporary file in the same folder, then
``os.replace``: a crash mid-write leaves the previous checkpoint intact.
"""
import hashlib
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch

from .config import AlphaSchedule, UniversalConfig
from .model import EarlyExitTransformer, ModelConfig

PathLike = Union[str, os.PathLike]

CKPT_NAME = "ckpt.pt"
FORMAT = "fastexit-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "version", "digest", "model", "model_config", "universal_config",
                 "optimizer", "step", "data_state", "rng", "data", "run_config")


# ------------------------------------------------------------------------ config <-> dict
def config_to_dict(config: UniversalConfig) -> Dict[str, Any]:
    """``UniversalConfig`` as a JSON-safe dict (layer keys become strings)."""
    schedule = config.alpha_schedule
    return dict(
        layer_weights={str(k): float(v) for k, v in config.layer_weights.items()},
        exit_layer=config.exit_layer,
        routing_threshold=float(config.routing_threshold),
        alpha_schedule=None if schedule is None else dict(kind=schedule.kind, start=schedule.start, end=schedule.end),
        layer_lr_scales=None if config.layer_lr_scales is None
        else {str(k): float(v) for k, v in config.layer_lr_scales.items()},
    )


def config_from_dict(d: Dict[str, Any]) -> UniversalConfig:
    """Inverse of ``config_to_dict``; validates through ``UniversalConfig``."""
    schedule = d.get("alpha_schedule")
    scales = d.get("layer_lr_scales")
    return UniversalConfig(
        layer_weights={int(k): float(v) for k, v in d["layer_weights"].items()},
        exit_layer=int(d.get("exit_layer", 1)),
        routing_threshold=float(d.get("routing_threshold", 0.95)),
        alpha_schedule=None if schedule is None else AlphaSchedule(**schedule),
        layer_lr_scales=None if scales is None else {int(k): float(v) for k, v in scales.items()},
    )


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
def save_checkpoint(path: PathLike, *, model: torch.nn.Module, model_config: ModelConfig,
                    config: UniversalConfig, optimizer: Optional[torch.optim.Optimizer], step: int,
                    data_state: Optional[dict], data: Dict[str, Any], run_config: Dict[str, Any]) -> Path:
    """Write a checkpoint atomically to ``path`` and return it.

    ``data``: corpus identity, at least ``vocab_size`` and ``fingerprint``; ``data_state``: the
    training stream's ``state_dict()``; ``run_config``: the run's resolved config (JSON-safe).
    RNG states are captured here, so call it at a step boundary.
    """
    path = Path(path)
    payload = dict(format=FORMAT, version=FORMAT_VERSION, digest="",
                   model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                   model_config=asdict(model_config), universal_config=config_to_dict(config),
                   optimizer=None if optimizer is None else optimizer.state_dict(), step=int(step),
                   data_state=data_state, rng=capture_rng_state(), data=dict(data), run_config=run_config)
    payload["digest"] = payload_digest(payload)
    atomic_write(path, lambda tmp: _save(payload, tmp))
    return path


def _save(payload: dict, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        torch.save(payload, f)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename over ``path``: a crash mid-write leaves the old file intact."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left over when `write` failed


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
    if payload.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {payload.get('version')!r}, "
                         f"this fastexit reads version {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing}")
    if payload_digest(payload) != payload["digest"]:
        raise ValueError(f"{path}: checkpoint is corrupted (its contents do not match their digest)")
    return payload


def _diff(saved: Dict[str, Any], wanted: Dict[str, Any]) -> str:
    keys = sorted(set(saved) | set(wanted))
    return ", ".join(f"{k} {saved.get(k)!r} (checkpoint) vs {wanted.get(k)!r} (requested)"
                     for k in keys if saved.get(k) != wanted.get(k))


def load_checkpoint(path: PathLike, *, model_config: Optional[ModelConfig] = None,
                    data: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Read and verify a checkpoint written by ``save_checkpoint``; returns its dict.

    With ``model_config`` / ``data`` it must also match them (see ``check_matches``). Any
    failure raises one ``ValueError`` naming the file and what is wrong
    (``FileNotFoundError`` when the file is absent).
    """
    path = Path(path)
    payload = _read(path)
    try:
        ModelConfig(**payload["model_config"])
        config_from_dict(payload["universal_config"])
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: invalid config in checkpoint: {_first_line(err)}") from None
    check_matches(payload, path, model_config=model_config, data=data)
    return payload


def check_matches(payload: Dict[str, Any], path: PathLike, *, model_config: Optional[ModelConfig] = None,
                  data: Optional[Dict[str, Any]] = None) -> None:
    """ValueError unless the saved model config equals ``model_config`` and every key of
    ``data`` (e.g. ``vocab_size``, ``fingerprint``) that the checkpoint recorded equals it."""
    if data is not None:  # first: a changed corpus also changes the vocab, hence the model config
        keys = [k for k in data if k in payload["data"]]  # what this checkpoint recorded
        saved, wanted = {k: payload["data"][k] for k in keys}, {k: data[k] for k in keys}
        if saved != wanted:
            raise ValueError(f"{path}: data mismatch (tokenizer or corpus changed): {_diff(saved, wanted)}")
    if model_config is not None and payload["model_config"] != asdict(model_config):
        raise ValueError(f"{path}: model config mismatch: {_diff(payload['model_config'], asdict(model_config))}")


def restore_model(payload: Dict[str, Any], path: PathLike = "checkpoint"):
    """Build an ``EarlyExitTransformer`` from a loaded checkpoint and load its weights."""
    model = EarlyExitTransformer(ModelConfig(**payload["model_config"]))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise ValueError(f"{path}: model weights do not fit its config: {_first_line(err)}") from None
    return model
