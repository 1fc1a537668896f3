"""torch.compile(fullgraph=True) of training and routing steps that call the fused ops.

weighted_linear_cross_entropy and exit_confidence are torch.library ops (a fake implementation
for shapes, a registered backward for the loss), so a compiled step keeps each as one node:
no graph break, and the same values and gradients as the step run eagerly (inductor's CPU
backend compiles the rest of the step; the ops themselves run their eager implementations).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastexit.kernels import HAS_TRITON, exit_confidence
from fastexit.kernels.weighted_ce import weighted_linear_cross_entropy

IGNORE = -100
N, D, V = 24, 16, 37
TOL = 1e-5  # compiled vs eager: inductor's fused projections round differently from eager's
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(D, D, generator=gen) / math.sqrt(D)
    head = torch.randn(V, D, generator=gen) / math.sqrt(D)
    return [t.requires_grad_() for t in (proj, head)]


def make_batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen)
    y = torch.randint(0, V, (N,), generator=gen)
    y[::5] = IGNORE
    return x, y


def run(step, params, x, y):
    """step's outputs (detached) and the gradients of their first one to params."""
    outs = step(*params, x, y)
    grads = torch.autograd.grad(outs[0], params)
    return [o.detach() for o in outs], list(grads)


def assert_same(compiled, eager):
    (c_outs, c_grads), (e_outs, e_grads) = compiled, eager
    for i, (c, e) in enumerate(zip(c_outs, e_outs)):
        if c.is_floating_point():
            assert rel_err(c, e) <= TOL, f"output {i}: {rel_err(c, e):.3g}"
        else:
            assert torch.equal(c, e), f"output {i}"
    for i, (c, e) in enumerate(zip(c_grads, e_grads)):
        assert rel_err(c, e) <= TOL, f"grad {i}: {rel_err(c, e):.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_step_equals_eager(backend):
    """Two exits through a projection, self-distillation from the deeper one, the argmax of
    every head, and exit_confidence of the shallow one, all in one compiled graph."""
    def step(proj, head, x, y):
        h1 = torch.tanh(x @ proj)
        h2 = h1 + F.gelu(h1 @ proj)
        loss, argmax = weighted_linear_cross_entropy([h1, h2], head, y, [0.7, 0.3], label_smoothing=0.1,
                                                     distill_weight=0.5, distill_temperature=2.0, teacher=1,
                                                     return_argmax=True, backend=backend)
        stats = exit_confidence(h1, head, y, want_margin=True, backend=backend)
        return loss * 2.0, argmax[0], argmax[1], stats.conf, stats.pred, stats.nll, stats.margin

    params, (x, y) = make_params(), make_batch()
    torch._dynamo.reset()
    compiled = run(torch.compile(step, fullgraph=True), params, x, y)
    assert_same(compiled, run(step, params, x, y))
    exact = F.cross_entropy(torch.tanh(x.double() @ params[0].double()) @ params[1].double().T, y,
                            ignore_index=IGNORE, reduction="none")
    assert rel_err(compiled[0][5], exact) <= TOL  # exit_confidence's nll: the compiled op computed it


def test_compiled_per_token_loss_equals_eager():
    """reduction='none' (its backward reruns the pass in a second registered op) with a
    per-token weighting after it, and head weights given as a tensor."""
    def step(proj, head, x, y):
        h1 = torch.tanh(x @ proj)
        rows = weighted_linear_cross_entropy([h1, h1 * 0.5], head, y, torch.tensor([0.25, 0.75]), reduction="none",
                                             backend="torch")  # (K, N)
        return ((rows * torch.linspace(0.5, 2.0, N)).sum(),)

    params, (x, y) = make_params(2), make_batch(3)
    torch._dynamo.reset()
    assert_same(run(torch.compile(step, fullgraph=True), params, x, y), run(step, params, x, y))


def test_targets_out_of_range_are_found_inside_the_compiled_op():
    """The value check runs inside the op, where a compiled graph never depends on it."""
    params, (x, y) = make_params(), make_batch()
    y[3] = V

    def step(proj, head, x, y):
        return weighted_linear_cross_entropy([x @ proj], head, y, [1.0], backend="torch")

    torch._dynamo.reset()
    with pytest.raises(ValueError, match="targets"):
        torch.compile(step, fullgraph=True)(*params, x, y)
