"""Lossless self-speculative decoding on a trained 12-layer model vs full-depth decoding.

The model is a run folder trained with an early-exit preset on Shakespeare (default
runs/spec-L12; another with FASTEXIT_SPEC_RUN), made by

    fastexit train --preset asymmetric_best --n-layers 12 --exit-layer 4 --steps 400 \
        --batch-size 16 --out runs/spec-L12

Greedy decoding of NEW_TOKENS tokens after val-split prompts, batch 1 and 8, speculative=k
against generate(routing_threshold=0) timed interleaved (bench/test_bench_routing.timed_against).
Both outputs are checked equal (lossless). The ideal speedup implied by the acceptance rate a
counts weight passes, the cost that bounds small-batch decoding: a round drafts k tokens
(k passes of exit_layer blocks and the head), verifies them in one pass of the deeper blocks and
the head, and yields 1 + a*k tokens per row, where full-depth decoding pays one pass of all
blocks and the head per token. A head pass costs V / (12 d) block passes (its V*d weights
against a block's 12 d^2).
"""
import os
from pathlib import Path

import pytest
import torch

from bench.conftest import REPO_ROOT, bench_device, record
from bench.test_bench_routing import speedup_info, timed_against
from fastexit.generate import generate
from fastexit.runs import Run

RUN = Path(os.environ.get("FASTEXIT_SPEC_RUN", Path(REPO_ROOT) / "runs" / "spec-L12"))
PROMPT_LEN, NEW_TOKENS = 16, 48
BATCHES, DRAFTS = (1, 8), (2, 4)


@pytest.fixture(scope="module")
def run():
    if not (RUN / "ckpt.pt").exists():
        pytest.skip(f"no trained run at {RUN}: train it with the command in this module's docstring")
    run = Run.load(RUN, device=bench_device())
    run.model.eval()
    return run


def prompts(run, batch: int) -> torch.Tensor:
    """(batch, PROMPT_LEN) int64: consecutive windows of the val split."""
    val = torch.as_tensor(run.corpus.splits["val"][:batch * PROMPT_LEN].astype("int64"))
    return val.view(batch, PROMPT_LEN).to(run.device)


def ideal_speedup(cfg, exit_layer: int, k: int, acceptance: float) -> float:
    head = cfg.vocab_size / (12 * cfg.d_model)  # a head pass in block passes
    L, E = cfg.n_layers, exit_layer
    return (1 + acceptance * k) * (L + head) / (k * (E + head) + (L - E) + head)


@pytest.mark.parametrize("k", DRAFTS)
@pytest.mark.parametrize("batch", BATCHES)
def test_speculative_vs_full_depth(benchmark, run, batch, k):
    model, idx, device = run.model, prompts(run, batch), run.device
    exit_layer = run.config.method.exit_layer
    benchmark.group = f"speculative decoding {device.type} L{model.n_layers}-d{model.cfg.d_model} batch {batch}"
    outputs = []

    def full():
        return generate(model, idx, NEW_TOKENS, 0.0)[0]

    def speculative():
        outputs.append(generate(model, idx, NEW_TOKENS, exit_layer=exit_layer, speculative=k, return_stats=True))

    seconds, (measured,) = timed_against(benchmark, [full], speculative, device)
    tokens, stats = outputs[-1].tokens, outputs[-1].stats
    assert torch.equal(tokens, full()), "speculative greedy decoding must equal full-depth greedy decoding"
    acceptance = stats["acceptance_rate"]
    record(benchmark, provider=f"speculative k={k}", shape=f"batch {batch}", seconds=seconds,
           tokens=batch * NEW_TOKENS, peak_mem_mb=None, acceptance_rate=acceptance, exit_layer=exit_layer,
           full_depth_tokens_per_s=batch * NEW_TOKENS / (seconds * measured.paired),
           **speedup_info(measured, ideal_speedup(model.cfg, exit_layer, k, acceptance)))
