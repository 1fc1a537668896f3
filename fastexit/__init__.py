"""fastexit: train and serve early-exit language models."""
from .config import AlphaSchedule, PRESETS, UniversalConfig, get_preset
from .model import EarlyExitTransformer, ModelConfig
from .trainer import UniversalTrainer

__all__ = ["AlphaSchedule", "EarlyExitTransformer", "ModelConfig", "PRESETS",
           "UniversalConfig", "UniversalTrainer", "get_preset"]
