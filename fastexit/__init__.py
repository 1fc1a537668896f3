"""fastexit: train and serve early-exit language models.

The configs (standard library only) import eagerly; the model and the trainer (torch and the
kernels) on first use, so that e.g. ``fastexit.data`` loads a corpus without the model.
``from_hf`` (fastexit.hf) takes a model the caller built with transformers; only
``fastexit.hf.load`` imports transformers itself.
"""
import importlib

from .config import (PRESETS, AlphaSchedule, DataConfig, ModelConfig, RunConfig, TrainConfig, UniversalConfig,
                     get_preset, make_method)

_LAZY = {"EarlyExitModel": "model", "EarlyExitTransformer": "model", "UniversalTrainer": "trainer", "from_hf": "hf"}

__all__ = ["AlphaSchedule", "DataConfig", "EarlyExitModel", "EarlyExitTransformer", "ModelConfig", "PRESETS",
           "RunConfig", "TrainConfig", "UniversalConfig", "UniversalTrainer", "from_hf", "get_preset", "make_method"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fastexit' has no attribute {name!r}")
