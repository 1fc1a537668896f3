"""The early-exit model interface, stated once (docs/design.md §1).

The trainer, evaluation, routing, calibration and generation call these names on a model and
nothing else; they check a model at the door with ``require_early_exit`` and never ask which
kind of model they hold. ``fastexit.model.EarlyExitModel`` implements the shared behaviour
(the exit loop, its checks, layer dropout's kept rows, exit logits, generation) from the parts
each kind supplies: the native ``EarlyExitTransformer`` and transformers models through
``fastexit.from_hf``.
"""
from typing import Any, List, Optional, Protocol, Sequence

import torch
import torch.nn as nn


class EarlyExitModelProtocol(Protocol):
    """What an early-exit model offers. The first five names are the parts a kind of model
    supplies; the rest ``EarlyExitModel`` derives from them."""

    cfg: Any
    """.vocab_size, .n_layers, .d_model, .max_seq_len"""
    blocks: Sequence[nn.Module]
    """one per layer, each with the block interface of ``fastexit.layers``"""
    exit_norms: Sequence[nn.Module]
    """the norm of each layer's exit (kinds may share one module between exits)"""
    lm_head: nn.Module
    """the head every exit shares; .weight (V, d)"""

    def embed(self, idx: torch.Tensor, start_pos: int = 0,
              positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T) int64 token ids -> (B, T, d) input states."""

    n_layers: int

    def check_idx(self, idx: torch.Tensor) -> None:
        """ValueError unless idx is a non-empty int64 (B, T) with T <= cfg.max_seq_len."""

    def exit_hidden_states(self, idx: torch.Tensor, layers: Sequence[int], drops=None, *,
                           attention_mask: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Exit-normed states (B, T, d) after each of ``layers``, no block deeper running."""

    def new_kv_caches(self, batch: int, max_len: int, layers: Sequence[int], zeroed: bool = False) -> list:
        """One empty KVCache per layer in ``layers``."""

    def generate(self, idx: torch.Tensor, max_new_tokens: int, routing_threshold=None, exit_layer=None, **kwargs):
        """``fastexit.generate.generate`` on this model."""

    def add_confidence_heads(self, layers: Sequence[int]) -> None:
        """A learned confidence head (``model.confidence_heads``) at each of ``layers`` that lacks one."""


INTERFACE = (*EarlyExitModelProtocol.__annotations__,
             *(name for name, member in vars(EarlyExitModelProtocol).items()
               if callable(member) and not name.startswith("_")))


def missing_parts(model) -> list:
    """The names of the interface ``model`` lacks (empty for an early-exit model)."""
    return [name for name in INTERFACE if not hasattr(model, name)]


def is_early_exit(model) -> bool:
    return not missing_parts(model)


def require_early_exit(model, argument: str = "model") -> None:
    """TypeError naming what is missing unless ``model`` offers the whole interface."""
    missing = missing_parts(model)
    if missing:
        raise TypeError(f"{argument} must be an early-exit model (fastexit.EarlyExitTransformer, a transformers "
                        f"causal LM through fastexit.from_hf, or a subclass of fastexit.model.EarlyExitModel); "
                        f"{type(model).__name__} lacks {', '.join(missing)}")
