"""Mixture-of-Depths on Shakespeare at equal training FLOPs (docs/research/mod.md).

Four methods on one 6-layer native model shape, each seed trained from the same init seed:
- standard: every block on every token, the final layer's loss (standard_llm);
- early exit: asymmetric_best with its exit at layer 2 (0.7 / 0.3 weights, threshold 0.95),
  evaluated with its routing in compact mode;
- MoD c=0.5 and MoD c=0.125: blocks 2, 4, 6 routed, the final layer's loss;
- a control: MoD c=0.125 at the standard model's steps (so fewer FLOPs).
Each method gets as many steps as the standard model's budget of training FLOPs buys it
(fwd+bwd = 3 x forward matmul FLOPs: blocks with their attention, the weighted heads, the
routers and predictors); warmup and cosine decay span each method's own steps.

    python docs/research/mod_compare.py --steps 100 --seeds 0,1 --out docs/research/mod
writes results.json, compare.md and compare.png there. Runs can be split over processes:
``--methods 0,2 --results a.json`` trains methods 0 and 2 (of METHODS, in order) into a.json;
``--report`` then writes the table and plot from every results*.json of --out.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastexit import EarlyExitTransformer, ModelConfig, UniversalTrainer, get_preset, mod
from fastexit.config import DataConfig
from fastexit.data import load_corpus, random_batches, split_batches, with_bpb

N_LAYERS, D_MODEL, N_HEADS, VOCAB, BATCH, SEQ_LEN, LR = 6, 128, 4, 4096, 8, 64, 3e-3
MOD_LAYERS, EXIT_LAYER = [2, 4, 6], 2
METHODS = {
    "standard": dict(preset="standard_llm"),
    "early exit (asymmetric_best at layer 2)": dict(preset="asymmetric_best"),
    "MoD c=0.5": dict(preset="standard_llm", capacity=0.5),
    "MoD c=0.125": dict(preset="standard_llm", capacity=0.125),
    # a control: the standard model's steps (fewer FLOPs), to tell the routing from the extra steps
    "MoD c=0.125, standard's steps": dict(preset="standard_llm", capacity=0.125, same_steps=True),
}


def model_config(capacity=None) -> ModelConfig:
    routed = {} if capacity is None else dict(mod_layers=MOD_LAYERS, mod_capacity=capacity)
    return ModelConfig(VOCAB, n_layers=N_LAYERS, d_model=D_MODEL, n_heads=N_HEADS, max_seq_len=SEQ_LEN, **routed)


def step_flops(model, method, capacity=None) -> float:
    """fwd+bwd matmul FLOPs of one training step of (B, T) tokens."""
    d, f, V, T = D_MODEL, model.cfg.d_ff, VOCAB, SEQ_LEN
    weights = 2 * (4 * d * d + 2 * d * f)  # per token: q, k, v, out, MLP

    def block(n_tokens):  # one sequence's n causal tokens
        return n_tokens * weights + 4 * d * n_tokens * (n_tokens + 1) / 2

    K = T if capacity is None else math.ceil(capacity * T)
    blocks = sum(block(K) if capacity is not None and i in MOD_LAYERS else block(T) for i in range(1, N_LAYERS + 1))
    routers = sum(2 * p.numel() for r in (mod.routers_of(model) or {}).values() for p in r.parameters() if p.dim() == 2)
    heads = sum(w > 0 for w in method.layer_weights.values())
    return 3 * BATCH * (blocks + T * (heads * 2 * d * V + routers))


def train_one(name, spec, seed, base_steps, corpus, val, val_bytes, base_flops):
    method = get_preset(spec["preset"], N_LAYERS, EXIT_LAYER)
    torch.manual_seed(seed)
    model = EarlyExitTransformer(model_config(spec.get("capacity")))
    flops = step_flops(model, method, spec.get("capacity"))
    steps = base_steps if spec.get("same_steps") else round(base_steps * base_flops / flops)
    trainer = UniversalTrainer(method, VOCAB, seed=seed)
    batches = random_batches(corpus.splits["train"], BATCH, SEQ_LEN, seed=seed)
    t0 = time.perf_counter()
    history = trainer.fit(model, batches, steps, LR, warmup_steps=steps // 10, progress_bar=False)
    seconds = time.perf_counter() - t0
    full = with_bpb(trainer.evaluate(model, val, routing_threshold=0.0, per_layer=False), val_bytes)
    out = dict(method=name, seed=seed, steps=steps, train_flops=steps * flops, train_seconds=seconds,
               final_loss=history[-1]["loss"], ppl=full["ppl"], bpb=full["bpb"], flop_cost=full["flop_cost"],
               compute_cost=full["compute_cost"],
               **{k: v for k, v in full.items() if k.startswith("mod_")})
    if spec.get("capacity") is not None:
        out["topk_ppl"] = top_k_ppl(model, val)
    if method.routing:  # the early-exit preset as it is served: its own threshold, compact mode
        routed = with_bpb(trainer.evaluate(model, val, "compact"), val_bytes)
        out.update(routed_ppl=routed["ppl"], routed_bpb=routed["bpb"], routed_flop_cost=routed["flop_cost"],
                   routed_compute_cost=routed["compute_cost"], shallow_ratio=routed["shallow_ratio"])
    print(json.dumps(out), flush=True)
    return out


@torch.no_grad()
def top_k_ppl(model, val) -> float:
    """Val perplexity with the routed blocks deciding by top-k as in training (it looks at the
    whole window: a diagnostic of what the causal predictor loses, not a servable number)."""
    model.train()  # routers pick by top-k; the model has no dropout
    nll, n = 0.0, 0
    for x, y in val:
        logits = model.exit_logits(x, [N_LAYERS])[0]
        nll += F.cross_entropy(logits.flatten(0, 1).double(), y.flatten(), reduction="sum").item()
        n += y.numel()
    model.eval()
    return math.exp(nll / n)


def table(results) -> str:
    rows = ["| method | steps | train TFLOP | val ppl (mean ± sd) | bpb | inference flop_cost | compute_cost | "
            "predictor agreement (L2/L4/L6) | share run (L2/L4/L6) | ppl, top-k routes (not causal) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name in METHODS:
        runs = [r for r in results if r["method"] == name]
        if not runs:
            continue
        for prefix, label in (("", name), ("routed_", f"{name}, routed at 0.95")):
            if prefix + "ppl" not in runs[0]:
                continue
            ppl = torch.tensor([r[prefix + "ppl"] for r in runs], dtype=torch.float64)
            sd = ppl.std().item() if len(runs) > 1 else float("nan")
            agree = "/".join(f"{sum(r.get(f'mod_agreement_L{i}', math.nan) for r in runs) / len(runs):.3f}"
                             for i in MOD_LAYERS) if "mod_agreement_L2" in runs[0] else "-"
            share = "/".join(f"{sum(r.get(f'mod_ratio_L{i}', math.nan) for r in runs) / len(runs):.3f}"
                             for i in MOD_LAYERS) if "mod_ratio_L2" in runs[0] else "-"
            mean = lambda key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
            topk = f"{mean('topk_ppl'):.2f}" if "topk_ppl" in runs[0] and not prefix else "-"
            rows.append(f"| {label} | {runs[0]['steps']} | {mean('train_flops') / 1e12:.2f} | "
                        f"{ppl.mean():.2f} ± {sd:.2f} | {mean(prefix + 'bpb'):.4f} | {mean(prefix + 'flop_cost'):.3f} | "
                        f"{mean(prefix + 'compute_cost'):.3f} | {agree} | {share} | {topk} |")
    return "\n".join(rows)


def plot(results, path: Path) -> None:
    import matplotlib  # optional dependency: the data extra
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in METHODS:
        for prefix, marker in (("", "o"), ("routed_", "s")):
            runs = [r for r in results if r["method"] == name and prefix + "ppl" in r]
            if runs:
                label = name + (", routed" if prefix else "")
                ax.scatter([r[prefix + "flop_cost"] for r in runs], [r[prefix + "ppl"] for r in runs], marker=marker,
                           label=label)
    ax.set_xlabel("inference flop_cost (forward FLOPs / dense full depth)")
    ax.set_ylabel("val perplexity (lower is better)")
    ax.set_title("Shakespeare, 6 layers d=128, equal training FLOPs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="the standard model's steps (the FLOP budget)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--methods", default=",".join(str(i) for i in range(len(METHODS))),
                   help="indices into METHODS, e.g. 0,2")
    p.add_argument("--out", default="docs/research/mod")
    p.add_argument("--results", default="results.json", help="file (in --out) this process writes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", action="store_true", help="only write compare.md / compare.png from results*.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        results = [r for f in sorted(out.glob("results*.json")) for r in json.loads(f.read_text())]
        (out / "compare.md").write_text(table(results) + "\n")
        plot(results, out / "compare.png")
        print(table(results))
        return
    corpus = load_corpus(DataConfig(vocab_size=VOCAB))
    val, val_bytes = split_batches(corpus, "val", BATCH, SEQ_LEN, args.eval_batches, "cpu")
    base = step_flops(EarlyExitTransformer(model_config()), get_preset("standard_llm", N_LAYERS, EXIT_LAYER))
    path = out / args.results
    results = json.loads(path.read_text()) if path.exists() else []
    done = {(r["method"], r["seed"]) for r in results}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in [list(METHODS)[int(i)] for i in args.methods.split(",")]:
            if (name, seed) not in done:
                results.append(train_one(name, METHODS[name], seed, args.steps, corpus, val, val_bytes, base))
                path.write_text(json.dumps(results, indent=1))
    (out / "compare.md").write_text(table(results) + "\n")
    plot(results, out / "compare.png")
    print(table(results))


if __name__ == "__main__":
    main()
