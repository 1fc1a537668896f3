"""bf16 mixed precision: the fused ops under torch.autocast, UniversalTrainer(compute_dtype=...)
and `fastexit train --compute-dtype bf16` in one process.

Under autocast the fused loss and the confidence kernel must compute exactly what they compute
on inputs cast to bf16 by hand (as F.linear would cast them), with fp32 gradients for fp32
leaves; a trainer with compute_dtype runs its loss and its evaluation under autocast and keeps
fp32 weights.
"""
import math

import pytest
import torch

from fastexit import EarlyExitTransformer, ModelConfig, UniversalConfig, UniversalTrainer
from fastexit.cli import main
from fastexit.kernels import exit_confidence
from fastexit.kernels.weighted_ce import weighted_linear_cross_entropy

from test_cli import tiny, write_play

BACKENDS = ["torch", "triton"]  # triton through the interpreter (tests/conftest.py)
BF16 = torch.bfloat16
IGNORE = -100


def leaves(n=40, d=32, v=67, heads=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hs = [torch.randn(n, d, generator=gen).requires_grad_() for _ in range(heads)]
    weight = (torch.randn(v, d, generator=gen) / math.sqrt(d)).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::5] = IGNORE
    return hs, weight, targets


def loss_and_grads(loss_fn, hs, weight):
    loss = loss_fn(hs, weight)
    return [loss.detach(), *torch.autograd.grad(loss, [weight, *hs])]


@pytest.mark.parametrize("teacher", [None, "tensor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_loss_under_autocast_is_the_loss_of_bf16_inputs(backend, teacher):
    hs, weight, targets = leaves()
    kw = dict(backend=backend)
    if teacher == "tensor":
        kw.update(distill_weight=0.5, distill_temperature=2.0, teacher=torch.randn(hs[0].shape))

    def by_hand(h, w):
        cast = dict(kw, teacher=kw["teacher"].to(BF16)) if teacher else kw
        return weighted_linear_cross_entropy([x.to(BF16) for x in h], w.to(BF16), targets, [0.7, 0.3], **cast)

    def under_autocast(h, w):
        with torch.autocast("cpu", BF16):
            return weighted_linear_cross_entropy(h, w, targets, [0.7, 0.3], **kw)

    ours, ref = loss_and_grads(under_autocast, hs, weight), loss_and_grads(by_hand, hs, weight)
    assert all(g.dtype == torch.float32 for g in ours[1:])  # fp32 leaves, fp32 gradients
    for a, r in zip(ours, ref):
        assert torch.equal(a, r)
    fp32 = loss_and_grads(lambda h, w: weighted_linear_cross_entropy(h, w, targets, [0.7, 0.3], **kw), hs, weight)
    assert not torch.equal(ours[0], fp32[0])  # the GEMMs did run in bf16
    assert abs(ours[0] - fp32[0]) <= 2e-2 * fp32[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_exit_confidence_under_autocast_is_that_of_bf16_inputs(backend):
    (h, _), weight, targets = leaves()
    with torch.autocast("cpu", BF16):
        ours = exit_confidence(h.detach(), weight.detach(), targets, want_margin=True, backend=backend)
    ref = exit_confidence(h.detach().to(BF16), weight.detach().to(BF16), targets, want_margin=True, backend=backend)
    for a, r in zip(ours, ref):
        assert torch.equal(a, r)


def test_autocast_disabled_inside_an_enabled_one_casts_nothing():
    (h, _), weight, targets = leaves()
    with torch.autocast("cpu", BF16):
        with torch.autocast("cpu", BF16, enabled=False):
            ours = weighted_linear_cross_entropy([h], weight, targets, [1.0], backend="torch")
        cast = weighted_linear_cross_entropy([h], weight, targets, [1.0], backend="torch")
    assert torch.equal(ours, weighted_linear_cross_entropy([h], weight, targets, [1.0], backend="torch"))
    assert not torch.equal(ours, cast)


def test_fp64_inputs_are_not_cast_under_autocast():
    (h, _), weight, targets = leaves()
    h, weight = h.detach().double(), weight.detach().double()
    with torch.autocast("cpu", BF16):
        ours = weighted_linear_cross_entropy([h], weight, targets, [1.0], backend="torch")
    assert ours.dtype == torch.float64
    assert torch.equal(ours, weighted_linear_cross_entropy([h], weight, targets, [1.0], backend="torch"))


# ----------------------------------------------------------------------------- the trainer
VOCAB, LAYERS = 61, 3


def model_and_batches(seed=0):
    torch.manual_seed(seed)
    model = EarlyExitTransformer(ModelConfig(VOCAB, n_layers=LAYERS, d_model=32, n_heads=2, max_seq_len=16))
    gen = torch.Generator().manual_seed(seed)
    batches = [tuple(torch.randint(0, VOCAB, (2, 4, 16), generator=gen)) for _ in range(3)]
    return model, batches


def method():
    return UniversalConfig({1: 0.7, LAYERS: 0.3}, exit_layer=1, routing_threshold=0.2)


def test_compute_dtype_bf16_trains_under_autocast_with_fp32_weights(monkeypatch):
    model, batches = model_and_batches()
    trainer = UniversalTrainer(method(), VOCAB, compute_dtype=BF16)
    seen, compute_loss = [], trainer.compute_loss

    def spy(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return compute_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "compute_loss", spy)
    records = trainer.fit(model, iter(batches), steps=3, base_lr=1e-2, progress_bar=False)
    assert seen == [(True, BF16)] * 3
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(r["loss"]) for r in records)

    plain_model, _ = model_and_batches()
    plain = UniversalTrainer(method(), VOCAB)
    x, y = batches[0]
    with torch.autocast("cpu", BF16):
        expected = plain.compute_loss(plain_model, x, y).item()
    assert records[0]["loss"] == pytest.approx(expected, rel=1e-6)  # the first step's loss, before any update


def test_compute_dtype_bf16_evaluates_under_autocast():
    model, batches = model_and_batches()
    ours = UniversalTrainer(method(), VOCAB, compute_dtype=BF16).evaluate(model, batches, "compact")
    with torch.autocast("cpu", BF16):
        ref = UniversalTrainer(method(), VOCAB).evaluate(model, batches, "compact")
    fp32 = UniversalTrainer(method(), VOCAB).evaluate(model, batches, "compact")
    timing = {"tokens_per_s", "seconds"}
    assert {k: v for k, v in ours.items() if k not in timing} == {k: v for k, v in ref.items() if k not in timing}
    assert ours["nll"] != fp32["nll"] and ours["nll"] == pytest.approx(fp32["nll"], rel=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, "bf16"])
def test_compute_dtype_other_than_bf16_is_an_error_naming_it(dtype):
    with pytest.raises(ValueError, match="compute_dtype must be None"):
        UniversalTrainer(method(), VOCAB, compute_dtype=dtype)


@pytest.mark.parametrize("flag", ["--compute-dtype", "--param-dtype"])  # --param-dtype: the old spelling
def test_cli_compute_dtype_bf16_in_one_process_trains_with_autocast(tmp_path, monkeypatch, capsys, flag):
    data = dict(text=write_play(tmp_path / "play.txt", 1500), cache=tmp_path / "cache")
    made = []
    init = UniversalTrainer.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self.compute_dtype)

    monkeypatch.setattr(UniversalTrainer, "__init__", record)
    assert main(["train", flag, "bf16", *tiny(data, tmp_path / "bf16")]) == 0
    assert made and set(made) == {BF16}
    assert (tmp_path / "bf16" / "ckpt.pt").exists()
    deprecated = "--param-dtype is deprecated; use --compute-dtype" in capsys.readouterr().err
    assert deprecated == (flag == "--param-dtype")
