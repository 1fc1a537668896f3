"""One config for every early-exit training method: per-layer loss weights, routing, schedules.

A training method is a set of per-layer loss weights (``Loss = sum_i w_i * CE_i``) plus the
routing used at inference. ``PRESETS`` holds the seed's six methods for a 3-layer model;
``get_preset`` maps them onto a model of another depth.
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional

ALPHA_KINDS = ("constant", "linear", "cosine")


def _check_unit(field: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(f"{field} must be a number in [0, 1], got {value!r}")


@dataclass
class AlphaSchedule:
    """Weight of the exit layer as a pure function of training progress p in [0, 1].

    linear: ``start + (end - start) * p``; cosine: ``end + (start - end) * (1 + cos(pi p)) / 2``;
    constant: ``start``. While a schedule is set, the exit layer's loss weight is alpha and the
    final layer's is ``1 - alpha``.
    """
    kind: str = "constant"
    start: float = 0.5
    end: Optional[float] = None

    def __post_init__(self):
        if self.kind not in ALPHA_KINDS:
            raise ValueError(f"AlphaSchedule.kind must be one of {ALPHA_KINDS}, got {self.kind!r}")
        if self.end is None:
            self.end = self.start
        _check_unit("AlphaSchedule.start", self.start)
        _check_unit("AlphaSchedule.end", self.end)

    def __call__(self, progress: float) -> float:
        _check_unit("progress", progress)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * progress
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * (1 + math.cos(math.pi * progress)) / 2
        return self.start


@dataclass
class UniversalConfig:
    """Per-layer loss weights (1-indexed, >= 0) and the inference routing of one method.

    ``routing_threshold = 0`` disables routing; otherwise a token whose max softmax probability
    at ``exit_layer`` is >= threshold leaves there. ``layer_lr_scales`` multiplies the learning
    rate of transformer block i (1-indexed); other parameters keep the base rate.
    """
    layer_weights: Dict[int, float]
    exit_layer: int = 1
    routing_threshold: float = 0.95
    alpha_schedule: Optional[AlphaSchedule] = None
    layer_lr_scales: Optional[Dict[int, float]] = None

    def __post_init__(self):
        self._check_layer_weights()
        if isinstance(self.exit_layer, bool) or not isinstance(self.exit_layer, int) or self.exit_layer < 1:
            raise ValueError(f"exit_layer must be an int >= 1, got {self.exit_layer!r}")
        _check_unit("routing_threshold", self.routing_threshold)
        if self.alpha_schedule is not None and not isinstance(self.alpha_schedule, AlphaSchedule):
            raise TypeError(f"alpha_schedule must be an AlphaSchedule, got {type(self.alpha_schedule).__name__}")
        self._check_lr_scales()

    def _check_layer_weights(self):
        if not isinstance(self.layer_weights, dict) or not self.layer_weights:
            raise ValueError(f"layer_weights must be a non-empty dict {{layer: weight}}, got {self.layer_weights!r}")
        for layer, w in self.layer_weights.items():
            _check_layer_key("layer_weights", layer)
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"layer_weights[{layer}] must be a finite number >= 0, got {w!r}")
        if self.alpha_schedule is None and not any(w > 0 for w in self.layer_weights.values()):
            raise ValueError(f"layer_weights needs at least one weight > 0, got {self.layer_weights!r}")

    def _check_lr_scales(self):
        for layer, s in (self.layer_lr_scales or {}).items():
            _check_layer_key("layer_lr_scales", layer)
            if not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
                raise ValueError(f"layer_lr_scales[{layer}] must be a finite number > 0, got {s!r}")

    @property
    def routing(self) -> bool:
        return self.routing_threshold > 0

    def validate_for(self, n_layers: int) -> None:
        """Depth-dependent checks against a model with ``n_layers`` blocks."""
        for field in ("layer_weights", "layer_lr_scales"):
            for layer in getattr(self, field) or {}:
                if layer > n_layers:
                    raise ValueError(f"{field} has layer {layer}, but the model has {n_layers} layers")
        if self.exit_layer > n_layers or (self.routing and self.exit_layer >= n_layers):
            raise ValueError(f"exit_layer must be < n_layers={n_layers} when routing is on "
                             f"(and <= n_layers always), got {self.exit_layer}")
        if self.alpha_schedule is not None and self.exit_layer >= n_layers:
            raise ValueError(f"alpha_schedule needs exit_layer < n_layers={n_layers}, got {self.exit_layer}")

    def weights_at(self, progress: float, n_layers: int) -> Dict[int, float]:
        """Loss weight of every layer 1..n_layers at training progress p (0 when not set)."""
        weights = {i: float(self.layer_weights.get(i, 0.0)) for i in range(1, n_layers + 1)}
        if self.alpha_schedule is not None:
            alpha = self.alpha_schedule(progress)
            weights[self.exit_layer] = alpha
            weights[n_layers] = 1.0 - alpha
        if not any(w > 0 for w in weights.values()):
            raise ValueError(f"all layer weights are 0 at progress {progress}: {weights}")
        return weights

    def lr_scale(self, layer: int) -> float:
        return float((self.layer_lr_scales or {}).get(layer, 1.0))


def _check_layer_key(field: str, layer) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
        raise ValueError(f"{field} keys are 1-indexed layer numbers (int >= 1), got {layer!r}")


# The seed's six methods, written as weights of (exit layer "L1", middle "L2", final "L3").
_PRESET_TABLE = {
    "standard_llm": ((0.0, 0.0, 1.0), 0.0),
    "lpt": ((1 / 3, 1 / 3, 1 / 3), 0.0),
    "standard_routing": ((0.5, 0.0, 0.5), 0.95),
    "asymmetric_best": ((0.7, 0.0, 0.3), 0.95),
    "lpt_routing": ((1 / 3, 1 / 3, 1 / 3), 0.7),
    "asymmetric_with_l2": ((0.7, 1.0, 0.3), 0.95),
}


def get_preset(name: str, n_layers: int = 3, exit_layer: int = 1) -> UniversalConfig:
    """The preset ``name`` mapped onto a model of ``n_layers`` blocks exiting at ``exit_layer``.

    The seed's "L1" weight goes to ``exit_layer``, "L3" to the final layer, and "L2" is shared
    equally by the layers strictly between them (so the weights sum as in the seed); layers
    below the exit layer get 0. For 3 layers with exit 1 this is exactly the seed's table.
    """
    if name not in _PRESET_TABLE:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(_PRESET_TABLE)}")
    if n_layers < 2 or not 1 <= exit_layer < n_layers:
        raise ValueError(f"presets need n_layers >= 2 and 1 <= exit_layer < n_layers, "
                         f"got n_layers={n_layers}, exit_layer={exit_layer}")
    (w_exit, w_mid, w_final), threshold = _PRESET_TABLE[name]
    middle = range(exit_layer + 1, n_layers)
    weights = {i: 0.0 for i in range(1, n_layers + 1)}
    weights.update({i: w_mid / len(middle) for i in middle})
    weights[exit_layer], weights[n_layers] = w_exit, w_final
    return UniversalConfig(weights, exit_layer=exit_layer, routing_threshold=threshold)


PRESETS: Dict[str, UniversalConfig] = {name: get_preset(name) for name in _PRESET_TABLE}
