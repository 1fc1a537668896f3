"""weighted_linear_cross_entropy(return_argmax=True): each head's row argmax against fp64 logits,
and the loss and every gradient bit for bit those of return_argmax=False, every backend.

The Triton backend runs through TRITON_INTERPRET=1 (tests/conftest.py), so its shapes stay tiny:
37 rows (no multiple of a row tile) and V = 67 (three 32-class tiles of the row kernel, the
last one partial).
"""
import pytest
import torch

import fastexit.kernels.weighted_ce as weighted_ce
from fastexit.kernels import HAS_TRITON, exit_confidence
from fastexit.kernels.weighted_ce import weighted_linear_cross_entropy

IGNORE = -100
NEEDS_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
BACKENDS = ["torch", pytest.param("triton", marks=NEEDS_TRITON), pytest.param("triton_gemm", marks=NEEDS_TRITON)]
DTYPES = [torch.float32, torch.bfloat16]
TORCH_CHUNK_BYTES = 4096  # many row chunks in both paths at test sizes
FP32_SUM_ERROR = 2.0 ** -23  # bound on |fp32 dot - exact| per unit of d * sum_i |h_i w_i|, with a factor 2


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(weighted_ce, "CHUNK_BYTES", TORCH_CHUNK_BYTES)


def sizes(backend):
    """(N, d, V): N and V no multiple of any block or chunk."""
    return (37, 32, 67) if backend != "torch" else (203, 48, 1000)


def make_inputs(n_heads, n, d, n_classes, dtype, ignore_every):
    hs = [torch.randn(n, d).to(dtype) for _ in range(n_heads)]
    weight = (torch.randn(n_classes, d) / d ** 0.5).to(dtype)
    targets = torch.randint(0, n_classes, (n,))
    if ignore_every:
        targets[::ignore_every] = IGNORE
    return hs, weight, targets


def assert_argmax(arg, h, weight, targets):
    """arg (N,) is the argmax of the exact logits of h and weight (the inputs as given: bf16
    ones are exact in fp64) on every scored row, but where the top two are closer than the
    fp32 logits' rounding bound; there it must still pick a logit within that bound of the top.
    Ignored rows hold ignore_index."""
    assert arg.dtype == torch.int64 and arg.shape == targets.shape and not arg.requires_grad
    h64, w64 = h.double(), weight.double()
    logits = h64 @ w64.T  # (N, V)
    bound = h64.shape[1] * FP32_SUM_ERROR * (h64.abs() @ w64.abs().T).amax(1)  # (N,)
    valid = targets != IGNORE
    assert (arg[~valid] == IGNORE).all()
    top2 = logits.topk(2, 1).values
    near_tie = top2[:, 0] - top2[:, 1] <= bound
    exact = arg == logits.argmax(1)
    assert (exact | near_tie)[valid].all(), f"{int((~exact & valid).sum())} rows with a wrong argmax"
    picked = logits.gather(1, arg.clamp(min=0).unsqueeze(1)).squeeze(1)
    assert ((top2[:, 0] - picked) <= bound)[valid].all()


def loss_and_grads(hs, weight, targets, head_weights, **kw):
    """(loss, grads to weight and every head, argmax or None) of one call."""
    leaves = [t.detach().clone().requires_grad_() for t in (weight, *hs)]
    out = weighted_linear_cross_entropy(leaves[1:], leaves[0], targets, head_weights, **kw)
    loss, argmax = out if kw.get("return_argmax") else (out, None)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3)) + 3.7
    return loss.detach(), torch.autograd.grad((loss * g).sum(), leaves), argmax


CASES = {  # name: (head_weights, reduction, ignore_every, options)
    "one_head": ((1.0,), "mean", 0, {}),
    "ignored_rows": ((0.7, 0.3), "sum", 3, {}),
    "zero_head": ((0.7, 0.0, 0.3), "mean", 5, {}),
    "none_smoothing_z": ((0.25, 0.0, 1.5), "none", 4, dict(label_smoothing=0.1, z_loss=1e-3)),
    "distill_teacher_head": ((0.5, 0.5, 1.0), "mean", 4, dict(distill_weight=0.5, distill_temperature=2.0,
                                                               teacher=2)),
    "distill_zero_weight_teacher": ((0.5, 1.0, 0.0), "sum", 6, dict(distill_weight=0.5, teacher=-1)),
    "distill_teacher_tensor": ((0.5, 1.0), "none", 3, dict(distill_weight=0.3, teacher="tensor")),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_argmax_matches_fp64_and_leaves_loss_and_grads_unchanged(backend, dtype, case):
    head_weights, reduction, ignore_every, options = CASES[case]
    n, d, n_classes = sizes(backend)
    hs, weight, targets = make_inputs(len(head_weights), n, d, n_classes, dtype, ignore_every)
    if options.get("teacher") == "tensor":
        options = dict(options, teacher=torch.randn(n, d).to(dtype))
    kw = dict(reduction=reduction, backend=backend, **options)
    loss, grads, _ = loss_and_grads(hs, weight, targets, head_weights, **kw)
    loss_a, grads_a, argmax = loss_and_grads(hs, weight, targets, head_weights, return_argmax=True, **kw)
    assert torch.equal(loss_a, loss)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads))
    assert isinstance(argmax, list) and len(argmax) == len(hs)
    for h, w, arg in zip(hs, head_weights, argmax):
        if w == 0:  # a head that does not run (a teacher of weight 0 included)
            assert arg is None
        else:
            assert_argmax(arg, h, weight, targets)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=NEEDS_TRITON)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_running_every_row_returns_ignore_index_there(backend, reduction, monkeypatch):
    """On CUDA the 'torch' and 'triton' paths run every row (zeroed where ignored): forced here
    on CPU."""
    monkeypatch.setattr(weighted_ce, "_kept_rows", lambda targets, ignore_index: None)
    n, d, n_classes = sizes(backend)
    hs, weight, targets = make_inputs(2, n, d, n_classes, torch.float32, ignore_every=3)
    _, argmax = weighted_linear_cross_entropy(hs, weight, targets, [0.5, 1.0], reduction=reduction,
                                              backend=backend, return_argmax=True)
    for h, arg in zip(hs, argmax):
        assert_argmax(arg, h, weight, targets)


TIED_CLASSES = [(3, 9), (20, 50), (40, 66)]  # V = 67 in 32-class tiles: in one tile, across, into the last


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_take_the_first_index_as_exit_confidence(backend):
    """Exact ties (integer logits): the smallest index wins, within a vocabulary tile and
    across tiles, as torch.argmax and exit_confidence's pred (the trainer's confidence labels
    compare the two)."""
    n, d, n_classes = 24, 16, 67
    weight = torch.randint(-2, 3, (n_classes, d)).float()
    hs = [torch.randint(-1, 2, (n, d)).float() for _ in range(2)]
    for g, (a, b) in enumerate(TIED_CLASSES):  # rows g, g + 4, ... of head 0: 8 at a and b, <= 2 elsewhere
        weight[a] = weight[b] = 8.0 * torch.eye(d)[g]
        hs[0][g::4] = torch.eye(d)[g]
    targets = torch.randint(0, n_classes, (n,))
    _, argmax = weighted_linear_cross_entropy(hs, weight, targets, [1.0, 0.5], backend=backend, return_argmax=True)
    for h, arg in zip(hs, argmax):
        assert torch.equal(arg, (h @ weight.T).argmax(1))
        assert torch.equal(arg, exit_confidence(h, weight, backend=backend).pred)
    tied = torch.tensor([i % 4 < len(TIED_CLASSES) for i in range(n)])
    assert torch.equal(argmax[0][tied], torch.tensor([TIED_CLASSES[i % 4][0] for i in range(n) if tied[i]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_edge_cases(backend):
    """All rows ignored: ignore_index everywhere; every head of weight 0: no argmax at all; the
    default call returns the loss tensor alone."""
    hs, weight, targets = make_inputs(2, 21, 16, 67, torch.float32, ignore_every=0)
    all_ignored = torch.full_like(targets, IGNORE)
    loss, argmax = weighted_linear_cross_entropy(hs, weight, all_ignored, [1.0, 1.0], backend=backend,
                                                 return_argmax=True)
    assert loss.item() == 0 and all(torch.equal(a, all_ignored) for a in argmax)
    loss, argmax = weighted_linear_cross_entropy(hs, weight, targets, [0.0, 0.0], backend=backend,
                                                 return_argmax=True)
    assert loss.item() == 0 and argmax == [None, None]
    assert isinstance(weighted_linear_cross_entropy(hs, weight, targets, [1.0, 1.0], backend=backend), torch.Tensor)
