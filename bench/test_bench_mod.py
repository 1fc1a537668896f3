"""Mixture-of-Depths routed blocks that skip: a training step and greedy generation of a model
whose every other block is routed at capacity c, against the same model dense, in one process.

- training step: trainer.compute_loss (the final layer's loss), backward, AdamW step; the routed
  blocks run the top ceil(c*T) tokens of each sequence. FLOP ideal: fwd+bwd matmul FLOPs of
  the dense step over the routed one's, counting each routed block on its K gathered tokens
  (K/V, q, out, MLP; attention over the K(K+1)/2 causal pairs) plus every token's router and
  predictor; goal: measured speedup >= 80% of it at c = 0.5 and 0.125.
- generation: generate() greedy from a prompt, the routed blocks deciding per token by their
  predictors. An untrained predictor picks an arbitrary share, so its output bias is set to
  pick about c of the prompt's tokens at each routed block; the ideal is the forward FLOPs of
  the routes generation actually took (its return_routes) against dense generation's. A decode
  step of a few rows reads every weight of each block it runs, whatever the rows: the second
  ideal (weight_read_*) counts the weights read instead, a routed block's wherever at least one
  row ran it, the ceiling of a step bound by weight reads (batch 8 here; at one row both
  ideals are one).

The pairs are timed interleaved (bench/test_bench_routing.timed_against), so load drift on a
shared box hits both alike.
"""
import math

import pytest
import torch

from bench.conftest import bench_device, block_flops, causal_block_flops, head_flops, record, tiny_shapes
from bench.test_bench_routing import speedup_info, timed_against
from bench.test_bench_train import FWD_BWD, TRAIN
from fastexit import EarlyExitTransformer, ModelConfig, UniversalTrainer, get_preset, mod

N_LAYERS, D_MODEL, N_HEADS, VOCAB, BATCH, SEQ_LEN = (2, 64, 4, 512, 2, 16) if tiny_shapes() else (12, 512, 8, 8192, 8, 128)
PROMPT, NEW_TOKENS = (4, 4) if tiny_shapes() else (32, 32)
GEN_BATCHES = [1, 8]  # one row: a skipped token skips the block; 8 rows: decode GEMMs read every weight anyway
MOD_LAYERS = list(range(2, N_LAYERS + 1, 2))  # every other block
CAPACITIES = [0.5, 0.125]
ROUNDS = 1 if tiny_shapes() else 5


def model_config(capacity=None) -> ModelConfig:
    routed = {} if capacity is None else dict(mod_layers=MOD_LAYERS, mod_capacity=capacity)
    return ModelConfig(VOCAB, n_layers=N_LAYERS, d_model=D_MODEL, n_heads=N_HEADS, max_seq_len=SEQ_LEN, **routed)


def new_model(device, capacity=None):
    torch.manual_seed(0)
    return EarlyExitTransformer(model_config(capacity)).to(device)


def router_flops(model, n_tokens: int) -> int:
    """Forward matmul FLOPs of every router and predictor over n_tokens each."""
    routers = mod.routers_of(model)
    per_token = sum(2 * p.numel() for r in (routers or {}).values() for p in r.parameters() if p.dim() == 2)
    return per_token * n_tokens


def train_flops(model, capacity=None) -> int:
    """fwd+bwd matmul FLOPs of one training step (standard_llm: the final head only)."""
    cfg, n = model.cfg, BATCH * SEQ_LEN
    K = SEQ_LEN if capacity is None else math.ceil(capacity * SEQ_LEN)
    routed = block_flops(cfg, BATCH * K, BATCH * K, BATCH * K * (K + 1) // 2)
    blocks = sum(routed if capacity is not None and i in MOD_LAYERS else causal_block_flops(cfg, BATCH, SEQ_LEN)
                 for i in range(1, N_LAYERS + 1))
    return FWD_BWD * (blocks + head_flops(cfg, n) + router_flops(model, n))


def make_train_step(device, capacity=None):
    model = new_model(device, capacity).train()
    trainer = UniversalTrainer(get_preset("standard_llm", N_LAYERS, 1), VOCAB, device=device)
    optimizer = trainer.create_optimizer(model, TRAIN.lr, weight_decay=TRAIN.weight_decay)
    x, y = torch.randint(0, VOCAB, (2, BATCH, SEQ_LEN), device=device)

    def step():
        trainer.compute_loss(model, x, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, step


@pytest.mark.parametrize("capacity", CAPACITIES)
def test_mod_train_step(benchmark, capacity):
    device = bench_device()
    benchmark.group = f"train step, routed blocks {MOD_LAYERS} {device.type} L{N_LAYERS}-d{D_MODEL}-V{VOCAB} " \
                      f"{BATCH}x{SEQ_LEN}"
    dense, dense_step = make_train_step(device)
    routed, routed_step = make_train_step(device, capacity)
    seconds, (measured,) = timed_against(benchmark, [dense_step], routed_step, device, rounds=ROUNDS)
    flops = train_flops(routed, capacity)
    ideal = train_flops(dense) / flops
    record(benchmark, provider=f"MoD c={capacity}", shape=f"L{N_LAYERS}-d{D_MODEL}", seconds=seconds,
           tokens=BATCH * SEQ_LEN, peak_mem_mb=None, flops=flops, capacity=capacity,
           **speedup_info(measured, ideal), measured_saving=1 - 1 / measured.paired, ideal_saving=1 - 1 / ideal,
           fraction_of_ideal_saving=(1 - 1 / measured.paired) / (1 - 1 / ideal))


# ----------------------------------------------------------------------------- generation
def generation_flops(model, routes, batch: int, prompt_len: int, new_tokens: int) -> int:
    """Forward matmul FLOPs of greedy generation: every position fed through the blocks (the
    prompt and all new tokens but the last), a routed block only on the positions it chose
    (attending to the chosen ones so far) plus every position's router and predictor, and the
    final head once per new token."""
    cfg = model.cfg
    n_fed = prompt_len + new_tokens - 1
    weights = block_flops(cfg, 1, 1, 0)
    keys = torch.arange(1, n_fed + 1, dtype=torch.float64)
    dense = batch * n_fed * weights + 4 * cfg.d_model * batch * float(keys.sum())
    total = head_flops(cfg, batch * new_tokens) + router_flops(model, batch * n_fed)
    for i in range(1, N_LAYERS + 1):
        if routes is None or i not in routes:
            total += dense
            continue
        chosen = routes[i].double()  # (B, n_fed)
        total += float((chosen * (weights + 4 * cfg.d_model * chosen.cumsum(1))).sum())
    return int(total)


def weights_read(model, routes, prompt_len: int, new_tokens: int) -> int:
    """Weights read by greedy generation: every block and the head in the prefill, then per
    decode step the head, every router and predictor, the dense blocks, and a routed block
    wherever at least one row ran it at that position."""
    block = sum(p.numel() for p in model.blocks[0].parameters())
    head = model.lm_head.weight.numel()
    routers = sum(p.numel() for r in (mod.routers_of(model) or {}).values() for p in r.parameters())
    n_steps = new_tokens - 1
    total = N_LAYERS * block + head + n_steps * (head + routers)
    for i in range(1, N_LAYERS + 1):
        runs = n_steps if routes is None or i not in routes else int(routes[i][:, prompt_len:].any(0).sum())
        total += runs * block
    return total


@pytest.mark.parametrize("capacity", CAPACITIES)
@pytest.mark.parametrize("batch", GEN_BATCHES)
def test_mod_generate(benchmark, batch, capacity):
    device = bench_device()
    benchmark.group = f"greedy generation, routed blocks {MOD_LAYERS} {device.type} L{N_LAYERS}-d{D_MODEL}-V{VOCAB} " \
                      f"{batch}x({PROMPT}+{NEW_TOKENS})"
    idx = torch.randint(0, VOCAB, (batch, PROMPT), device=device)
    dense, routed = new_model(device).eval(), new_model(device, capacity)
    mod.set_predictor_shares(routed, torch.randint(0, VOCAB, (8, SEQ_LEN), device=device))
    seconds, (measured,) = timed_against(benchmark, [lambda: dense.generate(idx, NEW_TOKENS)],
                                         lambda: routed.generate(idx, NEW_TOKENS), device, rounds=ROUNDS)
    routes = routed.generate(idx, NEW_TOKENS, return_routes=True).stats["mod_routes"]
    routes = {i: r.cpu() for i, r in routes.items()}
    flops = generation_flops(routed, routes, batch, PROMPT, NEW_TOKENS)
    read_ideal = weights_read(dense, None, PROMPT, NEW_TOKENS) / weights_read(routed, routes, PROMPT, NEW_TOKENS)
    record(benchmark, provider=f"MoD c={capacity}", shape=f"L{N_LAYERS}-d{D_MODEL}", seconds=seconds,
           tokens=batch * NEW_TOKENS, peak_mem_mb=None, flops=flops, capacity=capacity,
           processed_share=float(torch.stack([r.float().mean() for r in routes.values()]).mean()),
           weight_read_ideal_speedup=read_ideal, fraction_of_weight_read_ideal=measured.paired / read_ideal,
           **speedup_info(measured, generation_flops(dense, None, batch, PROMPT, NEW_TOKENS) / flops))
