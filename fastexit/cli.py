"""The ``fastexit`` command: train, eval, sweep, generate, calibrate and compare.

Thin ``cmd_*`` functions only: the parsers and the flags → ``RunConfig`` builder are
``fastexit.flags``, a run folder is a ``fastexit.runs.Run``, tables and texts come from
``fastexit.report``, every default from ``fastexit.config``. Flags spell the config fields they
set (``--routing-threshold``, ``--exit-layer``, ``--layer-lr-scales``, ``--warmup-steps``,
``--compute-dtype``); the older spellings still work for one release, with a deprecation note.
Bad input (a missing data path, a too small corpus, an unknown preset, a malformed flag, a
corrupted or mismatched checkpoint, a damaged file of the run, a run folder another process
holds) ends with one line ``fastexit: error: ...`` on stderr and exit status 2, before
anything is written; a failure mid-run (the loss diverged, the disk is full) with one such line
and exit status 1, the last checkpoint intact. ``train`` and ``calibrate`` hold the run
folder's lock; ``eval``, ``sweep`` and ``generate`` only read. ``train --parallel ddp|fsdp``
runs under torchrun (``torchrun --nproc-per-node 8 -m fastexit.cli train --parallel fsdp
...``); rank 0 prints.
``train --hf-model DIR`` trains a local transformers model folder (``fastexit.hf``) instead of
fastexit's own model: its shape comes from DIR's config.json, its text from DIR's tokenizer
(or a BPE of the model's vocab_size when DIR has none), exit_layer defaults to n_layers // 2.
``train --no-table`` skips the closing table of what early exit buys.
"""
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import distributed, report
from .compare import LAYER_LR_CONFIGS, compare_runs, lr_scales_flag
from .config import DEFAULT_PRESET, MAX_PPL_INCREASE, RUN_MODEL_DEFAULTS, TRAIN_SWEEP_THRESHOLDS, TrainConfig
from .distributed import log, resolve_device
from .flags import (UsageError, build_parser, check_budget_flags, parse_confidences, parse_lrs, parse_number_list,
                    parse_presets, parse_seeds, parse_thresholds, resume_changes, run_config_from_flags,
                    train_method_defaults, with_budget)
from .runs import CALIBRATION, Run, RunFailed

def _runtime(args) -> Dict[str, Any]:
    return dict(device=resolve_device(args.device), backend=args.backend)


def _print_on_rank_0(text: str) -> None:
    if distributed.is_main():
        print(text, flush=True)


# ---------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    """One process, or under torchrun (--parallel) every rank: the same calls; rank 0 prints."""
    parallel = distributed.resolve_parallel(args.parallel)
    if parallel is not None and args.hf_model is not None:
        raise ValueError("--parallel: not yet supported with --hf-model (train it in one process)")
    with distributed.process_group(parallel, resolve_device(args.device)) as device:
        return _train(args, dict(device=device, backend=args.backend, parallel=parallel,
                                 compute_dtype=distributed.COMPUTE_DTYPES[args.compute_dtype]))


def _train(args, runtime: Dict[str, Any]) -> int:
    t0 = time.perf_counter()
    check_budget_flags(args)
    if args.resume:
        path = Path(args.out or Path("runs") / (args.preset or ("custom" if args.layer_weights else DEFAULT_PRESET)))
        run = Run.resume(path, resume_changes(args), **runtime)
    else:
        config = with_budget(args, run_config_from_flags(args, **train_method_defaults(args)))
        run = Run.create(Path(args.out or Path("runs") / config.name), config, **runtime)
    step = run.train(progress=not args.no_progress, stop_at=args.stop_at)
    if step < run.config.train.steps and run.early_stop is None:
        return 0  # --stop-at: evaluate once the run is complete
    stats = run.evaluate("val")  # every rank evaluates its share of the batches
    run.log_final(step, stats)
    m = run.config.method
    _print_on_rank_0(report.eval_table(f"{run.config.name} after {step} steps ({time.perf_counter() - t0:.0f} s): "
                                       f"val split, exact mode, {report.routing_text(m)}", stats, run.model.n_layers))
    if m.exits[-1] < run.model.n_layers and not args.no_table:
        t1 = time.perf_counter()
        rows = run.sweep("val", "compact", TRAIN_SWEEP_THRESHOLDS, compare_exact=True)
        _print_on_rank_0("\n" + report.early_exit_text(rows, "val", m, MAX_PPL_INCREASE, time.perf_counter() - t1))
    return 0


# ------------------------------------------------------------------ eval and sweep
def cmd_eval(args) -> int:
    run = Run.load(Path(args.run), **_runtime(args))
    stats = run.evaluate(args.split, args.mode, eval_batches=args.eval_batches,
                         routing_threshold=args.routing_threshold, per_layer=True if args.per_layer else None,
                         compare_exact=args.compare_exact, confidence=args.confidence)
    method = run.config.method if args.confidence is None else replace(run.config.method, confidence=args.confidence)
    rule = report.routing_text(method, args.routing_threshold)
    print(report.eval_table(f"{run.config.name} ({run.path}): {args.split} split, {args.mode} mode, {rule}", stats,
                            run.model.n_layers), flush=True)
    return 0


def cmd_sweep(args) -> int:
    thresholds = parse_thresholds(args.sweep_thresholds)
    run = Run.load(Path(args.run), **_runtime(args))
    method = run.config.method
    exit_sets = [parse_number_list(e, "--exit-layers", int) for e in args.exit_layers or []] or [method.exits]
    confidences = parse_confidences(args.confidence) if args.confidence else [method.confidence]
    if run.model.n_layers <= max(exits[-1] for exits in exit_sets) and any(thresholds):
        raise ValueError(f"--sweep-thresholds: routing needs every exit layer < n_layers={run.model.n_layers}")
    compare = args.compare_exact and args.mode == "compact"
    variants = [(exits, confidence) for exits in exit_sets for confidence in confidences]
    rows, curves = [], []
    for exits, confidence in variants:
        part = run.sweep(args.split, args.mode, thresholds, eval_batches=args.eval_batches, compare_exact=compare,
                         confidence=confidence, exit_layers=exits)
        name = f"exit_layers {exits}, confidence {confidence}"
        rows += [dict(r, variant=name) for r in part] if len(variants) > 1 else part
        curves.append((name, [(r["routing_threshold"], r["compute_cost"], r["ppl"]) for r in part]))
    text = report.sweep_text(f"{run.config.name} ({run.path})", args.split, args.mode, [name for name, _ in curves],
                             rows, compare)
    print(text, flush=True)
    (run.path / f"sweep-{args.mode}.md").write_text(text + "\n", encoding="utf-8")
    report.save_curves(run.path / f"sweep-{args.mode}.png", curves if len(curves) > 1 else [("", curves[0][1])],
                       f"{run.config.name}: routing_threshold sweep ({args.split}, {args.mode})", "compute_cost", "ppl")
    return 0


def cmd_calibrate(args) -> int:
    run = Run.load(Path(args.run), calibration=False, **_runtime(args))  # the calibration it replaces is not read
    exits = parse_number_list(args.exit_layers, "--exit-layers", int) if args.exit_layers else None
    record = run.calibrate(max_ppl_increase=args.max_ppl_increase, min_agreement=args.min_agreement,
                           delta=args.delta, exits=exits, confidence=args.confidence, eval_batches=args.eval_batches)
    print(report.calibration_text(run.path, run.path / CALIBRATION, record), flush=True)
    return 0


# ------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    run = Run.load(Path(args.run), need_data=False, **_runtime(args))
    model, tok = run.model.eval(), run.tokenizer()
    # speculative drafts reach k - 1 positions past the last new token: leave them room (a k that
    # cannot fit at all is generate's error, naming speculative)
    room = model.cfg.max_seq_len - 1 - args.max_new_tokens
    lookahead = max(0, min((args.speculative or 1) - 1, room))
    ids = _prompt_ids(tok, args.prompt, args.max_new_tokens + lookahead, model.cfg.max_seq_len)
    gen = torch.Generator(device=run.device).manual_seed(args.seed)
    out = model.generate(
        torch.tensor([ids], device=run.device), args.max_new_tokens, routing_threshold=args.routing_threshold,
        config=run.config.method, temperature=args.temperature, top_k=args.top_k, generator=gen,
        backend=args.backend, speculative=args.speculative, return_stats=args.speculative is not None)
    # with speculative decoding there is no routing: the full model verified every token
    acceptance = None if out.stats is None else \
        f"speculative={args.speculative}: acceptance rate {out.stats['acceptance_rate']:.1%} of drafts"
    print(report.generation_text(tok, ids, out.tokens[0, len(ids):].tolist(), out.layers_run[0].tolist(),
                                 model.n_layers, report.routing_text(run.config.method, args.routing_threshold),
                                 acceptance))
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


# -------------------------------------------------------------------------- compare
def cmd_compare(args) -> int:
    names, out = parse_presets(args.presets), Path(args.out)
    check_budget_flags(args)
    if args.seeds is not None and args.seed is not None:
        raise ValueError("--seeds: give either --seed or --seeds, not both")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [args.seed or TrainConfig.seed]
    lrs = parse_lrs(args.lrs) if args.lrs is not None else None
    if lrs is not None and args.lr is not None:
        raise ValueError("--lrs: give either --lr or --lrs, not both")
    n_layers = RUN_MODEL_DEFAULTS["n_layers"] if args.n_layers is None else args.n_layers
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


COMMANDS = dict(train=cmd_train, eval=cmd_eval, sweep=cmd_sweep, generate=cmd_generate, calibrate=cmd_calibrate,
                compare=cmd_compare)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fastexit`` command; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except RunFailed as err:  # mid-run: what was committed stays, the message says which checkpoint
        _error_line(f"fastexit: error: {err}")
        return 1
    except (UsageError, ValueError, OSError, ImportError) as err:
        _error_line(f"fastexit: error: {err}")
        return 2
    except KeyboardInterrupt as err:
        _error_line(f"fastexit: {err or 'interrupted'}")
        return 130


def _error_line(text: str) -> None:
    """``text`` and its newline in one write: torchrun's ranks share stderr, and print's two
    writes (text, then newline) of two ranks could interleave into one line."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
