"""Router-tuning a pretrained transformers model (docs/research/mod.md): Mixture-of-Depths
routers added through fastexit.hf.router_tuning, the backbone frozen, the routers alone trained.

No pretrained checkpoint can be downloaded here, so the script first pretrains a tiny
transformers Llama (4 layers, d=128, Shakespeare BPE of 4096 tokens, 64-token windows) at full depth with the
plain final-layer loss and saves it with save_pretrained; that folder is the "pretrained
model". Then, for each capacity c, routers go on layers 2 and 4 and train for --tune-steps
(LM loss of the final layer; the predictors learn top-k alongside), and the validation split
is evaluated with the predictors deciding per token: ppl against the share of routed-block
compute skipped. Two baselines at the same layers: "untuned" (the routers as added: zero
scores, untrained predictors whose bias is shifted to pick c of the tokens), and "layers
removed" (the two blocks skipped by every token).

    python docs/research/mod_router_tuning.py --out docs/research/mod
"""
import argparse
import json
import time
from pathlib import Path

import torch

from fastexit import UniversalTrainer, from_hf, get_preset, mod
from fastexit.config import DataConfig
from fastexit.data import load_corpus, random_batches, split_batches, with_bpb
from fastexit.hf import from_folder, router_tuning

VOCAB, BATCH, SEQ_LEN = 4096, 8, 64
LAYERS = [2, 4]
CAPACITIES = [0.75, 0.5, 0.25, 0.125]


def pretrain(folder: Path, corpus, steps: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM  # optional dependency: the hf extra
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    view = from_hf(model)
    trainer = UniversalTrainer(get_preset("standard_llm", 4, 1), VOCAB)
    trainer.fit(view, random_batches(corpus.splits["train"], BATCH, SEQ_LEN, seed=0), steps, 3e-3,
                warmup_steps=steps // 10, progress_bar=False)
    model.save_pretrained(folder)


def evaluate(model, val, val_bytes) -> dict:
    trainer = UniversalTrainer(get_preset("standard_llm", 4, 1), VOCAB)
    stats = with_bpb(trainer.evaluate(model, val, per_layer=False), val_bytes)
    ran = [stats.get(f"mod_ratio_L{i}", 1.0) for i in LAYERS]
    return dict(ppl=stats["ppl"], bpb=stats["bpb"], flop_cost=stats["flop_cost"], compute_cost=stats["compute_cost"],
                skipped_share=1 - sum(ran) / len(ran),
                agreement=[stats.get(f"mod_agreement_L{i}") for i in LAYERS], ran=ran)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/research/mod")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--tune-steps", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(DataConfig(vocab_size=VOCAB))
    val, val_bytes = split_batches(corpus, "val", BATCH, SEQ_LEN, args.eval_batches, "cpu")
    folder = out / "tiny-llama"
    if not (folder / "config.json").exists():
        t0 = time.perf_counter()
        pretrain(folder, corpus, args.pretrain_steps)
        print(f"pretrained in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = [dict(setting="pretrained (dense)", capacity=1.0, **evaluate(from_folder(folder), val, val_bytes))]
    removed = router_tuning(from_folder(folder), LAYERS, 1.0)
    with torch.no_grad():
        for router in removed.mod_routers.values():
            router.predictor[2].bias.fill_(-1e4)  # no token runs the routed blocks
    rows.append(dict(setting="layers 2, 4 removed", capacity=0.0, **evaluate(removed, val, val_bytes)))
    sample = torch.cat([x for x, _ in val[:4]])
    for capacity in CAPACITIES:
        untuned = router_tuning(from_folder(folder), LAYERS, capacity)
        mod.set_predictor_shares(untuned, sample)
        rows.append(dict(setting="untuned routers", capacity=capacity, **evaluate(untuned, val, val_bytes)))
        tuned = router_tuning(from_folder(folder), LAYERS, capacity)
        trainer = UniversalTrainer(get_preset("standard_llm", 4, 1), VOCAB, seed=1)
        t0 = time.perf_counter()
        trainer.fit(tuned, random_batches(corpus.splits["train"], BATCH, SEQ_LEN, seed=1), args.tune_steps, 1e-2,
                    warmup_steps=args.tune_steps // 10, progress_bar=False)
        rows.append(dict(setting="router-tuned", capacity=capacity, tune_seconds=time.perf_counter() - t0,
                         trainable=sum(p.numel() for p in tuned.parameters() if p.requires_grad),
                         **evaluate(tuned, val, val_bytes)))
        print(json.dumps(rows[-2:]), flush=True)
    (out / "router_tuning.json").write_text(json.dumps(rows, indent=1))
    lines = ["| setting | capacity | val ppl | bpb | share of routed-block tokens skipped | flop_cost | "
             "predictor agreement (L2/L4) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        agree = "/".join(f"{a:.3f}" for a in r["agreement"]) if r["agreement"][0] is not None else "-"
        lines.append(f"| {r['setting']} | {r['capacity']} | {r['ppl']:.2f} | {r['bpb']:.4f} | {r['skipped_share']:.3f} | "
                     f"{r['flop_cost']:.3f} | {agree} |")
    (out / "router_tuning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
