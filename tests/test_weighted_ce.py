"""weighted_linear_cross_entropy against an fp64 full-logits reference, every backend: 'torch',
'triton' (torch GEMMs around the Triton row kernel) and 'triton_gemm' (Triton GEMMs too).

The Triton backends run through TRITON_INTERPRET=1 (tests/conftest.py), so their shapes stay
tiny. 16-bit operands, which CPU GEMMs upcast, are multiplied as on CUDA where a test says
`cuda_operands` (the 'triton' path then stores 16-bit dlogits over its fp32 logits).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastexit.kernels.gemm as gemm
import fastexit.kernels.weighted_ce as weighted_ce
from fastexit.kernels import HAS_TRITON
from fastexit.kernels.weighted_ce import weighted_linear_cross_entropy

IGNORE = -100
NEEDS_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
TRITON_BACKENDS = [pytest.param("triton", marks=NEEDS_TRITON), pytest.param("triton_gemm", marks=NEEDS_TRITON)]
BACKENDS = ["torch", *TRITON_BACKENDS]
FP32_TOL = 2e-5  # max abs error relative to the reference's max abs value
FP64_TOL = 1e-10
CONFIDENT_TOL = 2e-3  # fp32 logits near 50 carry ~1e-6 absolute error; p - 1 ~ 1e-6 as well
LOW_PRECISION_FLOOR = 1e-3  # below this, bf16/fp16 errors are equal for practical purposes
TORCH_CHUNK_BYTES = 4096  # forces many row chunks in the PyTorch path even at test sizes
ODD_VOCABS = [1000, 5003]  # no multiple of 16 (1000 = 8 * 125), and odd
ODD_SMALL_VOCAB = 131  # odd, for the Triton paths under the interpreter
LOSS_SCALES = [32768.0, 65536.0]  # GradScaler starts at 2**16, above fp16's max (65504)
ZERO_SHARE_FLOOR = 1e-3  # gradient entries flushed to 0 that count as none
SCALER_STEP_LR = 0.1
SCALER_STEP_TOL = 2e-3  # median error of a gradient entry: ~4e-4 for plain PyTorch under autocast


# ----------------------------------------------------------------------------- reference
def reference(hs, weight, targets, head_weights, *, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    """sum_k w_k * (F.cross_entropy(h_k @ W.T) + z_loss * lse^2, reduced alike) from fp64 logits."""
    valid = targets != IGNORE
    per_head = []
    for h, w in zip(hs, head_weights):
        logits = h.double() @ weight.double().T  # (N, V)
        ce = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction=reduction, label_smoothing=label_smoothing)
        z = z_loss * torch.where(valid, logits.logsumexp(1) ** 2, 0.0)  # (N,)
        per_head.append(w * (ce + {"none": z, "sum": z.sum(), "mean": z.sum() / valid.sum()}[reduction]))
    return torch.stack(per_head) if reduction == "none" else sum(per_head)


def make_inputs(n_heads, n, d, n_classes, *, dtype=torch.float32, ignore_every=0, logit_scale=1.0):
    hs = [torch.randn(n, d, dtype=dtype) for _ in range(n_heads)]
    weight = (torch.randn(n_classes, d) * logit_scale / math.sqrt(d)).to(dtype)
    targets = torch.randint(0, n_classes, (n,))
    if ignore_every:
        targets[::ignore_every] = IGNORE
    return hs, weight, targets


def loss_and_grads(fn, hs, weight, targets, grad_seed):
    """fn's value and the grads of (value * g).sum() to weight and every head (g random, != 1)."""
    leaves = [t.detach().clone().requires_grad_() for t in (weight, *hs)]
    out = fn(leaves[1:], leaves[0], targets)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64) + 3.7
    grads = torch.autograd.grad((out.double() * g).sum(), leaves)
    return out.detach().double(), [gr.double() for gr in grads]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def assert_matches(ours, ref, tol):
    (v, gs), (rv, rgs) = ours, ref
    assert torch.isfinite(v).all()
    assert rel_err(v, rv) <= tol, f"value: {rel_err(v, rv):.3g}"
    for i, (g, rg) in enumerate(zip(gs, rgs)):
        assert rel_err(g, rg) <= tol or (rg.abs().max() == 0 and g.abs().max() == 0), f"grad {i}: {rel_err(g, rg):.3g}"


@pytest.fixture(autouse=True)
def _small_torch_chunks(monkeypatch):
    monkeypatch.setattr(weighted_ce, "CHUNK_BYTES", TORCH_CHUNK_BYTES)


def sizes(backend, n_classes_torch, n_classes_triton):
    """(N, d, V): N not a multiple of any block or chunk; the interpreter gets tiny shapes."""
    return (37, 32, n_classes_triton) if backend != "torch" else (203, 48, n_classes_torch)


# ----------------------------------------------------------------------------- correctness
CASES = {  # name: (head_weights, reduction, label_smoothing, z_loss, ignore_every)
    "one_head": ((1.0,), "mean", 0.0, 0.0, 0),
    "two_heads_sum": ((0.7, 0.3), "sum", 0.0, 0.0, 4),
    "zero_head": ((0.7, 0.0, 0.3), "mean", 0.0, 0.0, 5),
    "four_heads_none": ((0.25, 0.0, 0.5, 1.5), "none", 0.0, 0.0, 3),
    "smoothing": ((0.7, 0.0, 0.3), "mean", 0.1, 0.0, 5),
    "z_loss": ((0.7, 0.3), "mean", 0.0, 1e-3, 5),
    "smoothing_z_none": ((0.5, 0.5, 0.0), "none", 0.2, 1e-2, 6),
    "smoothing_z_sum": ((0.0, 2.0), "sum", 0.05, 1e-4, 2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, case):
    head_weights, reduction, smoothing, z_loss, ignore_every = CASES[case]
    n, d, n_classes = sizes(backend, 1000, 67)
    hs, weight, targets = make_inputs(len(head_weights), n, d, n_classes, ignore_every=ignore_every)
    kw = dict(reduction=reduction, label_smoothing=smoothing, z_loss=z_loss)
    ours = loss_and_grads(lambda h, w, y: weighted_linear_cross_entropy(h, w, y, head_weights, backend=backend, **kw),
                          hs, weight, targets, grad_seed=1)
    ref = loss_and_grads(lambda h, w, y: reference(h, w, y, head_weights, **kw), hs, weight, targets, grad_seed=1)
    assert_matches(ours, ref, FP32_TOL)


def odd_vocab_sizes(backend, n_classes):
    """(N, d, V) at a vocabulary that is no multiple of 16; the interpreter gets few rows."""
    return (21, 16, n_classes) if backend != "torch" else (203, 48, n_classes)


@pytest.mark.parametrize("backend, n_classes", [  # the interpreter is slow: the Triton paths at V = 1000 and an odd
    *(("torch", v) for v in ODD_VOCABS),          # V = 131 (5003 took 50 s of CI), 'triton' at 131 below
    *(pytest.param("triton_gemm", v, marks=NEEDS_TRITON) for v in (ODD_VOCABS[0], ODD_SMALL_VOCAB)),
    pytest.param("triton", ODD_VOCABS[0], marks=NEEDS_TRITON)])
def test_odd_vocab(backend, n_classes):
    """Rows of V classes where V % 16 != 0 (the Triton path pads the row stride): values and
    every gradient equal the fp64 reference's, with and without label smoothing and z-loss."""
    n, d, _ = odd_vocab_sizes(backend, n_classes)
    hs, weight, targets = make_inputs(3, n, d, n_classes, ignore_every=7)
    ws = [0.7, 0.0, 0.3]
    for kw in (dict(reduction="mean"), dict(reduction="none", label_smoothing=0.1, z_loss=1e-3)):
        fn = lambda h, w, y: weighted_linear_cross_entropy(h, w, y, ws, backend=backend, **kw)  # noqa: E731
        ref = lambda h, w, y: reference(h, w, y, ws, **kw)  # noqa: E731
        assert_matches(loss_and_grads(fn, hs, weight, targets, 2), loss_and_grads(ref, hs, weight, targets, 2),
                       FP32_TOL)


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("n_classes", [ODD_SMALL_VOCAB])  # interpreted: 5 tiles of 32 classes, the last partial
def test_triton_row_padding_is_never_read_as_logits(monkeypatch, backend, n_classes):
    """The Triton paths' logits rows are padded to an aligned stride. Filled with NaN when the
    buffer is made, the padding must reach neither the loss (it is no logit) nor the gradients
    (the 'triton_gemm' dH and dW GEMMs read it only after the row kernel has zeroed it)."""
    new_buffer = weighted_ce._logits_buffer

    def poisoned(*args, **kwargs):
        logits = new_buffer(*args, **kwargs)  # (A, c, V) view of rows padded to stride(1)
        assert logits.stride(1) % 16 == 0 and logits.stride(1) >= n_classes
        torch.as_strided(logits, (*logits.shape[:2], logits.stride(1)), logits.stride()).fill_(float("nan"))
        return logits

    monkeypatch.setattr(weighted_ce, "_logits_buffer", poisoned)
    hs, weight, targets = make_inputs(2, 37, 16, n_classes, ignore_every=6)
    for kw in (dict(reduction="mean"), dict(reduction="none", label_smoothing=0.1, z_loss=1e-3)):
        fn = lambda h, w, y: weighted_linear_cross_entropy(h, w, y, [0.6, 0.4], backend=backend, **kw)  # noqa: E731
        ref = lambda h, w, y: reference(h, w, y, [0.6, 0.4], **kw)  # noqa: E731
        assert_matches(loss_and_grads(fn, hs, weight, targets, 12), loss_and_grads(ref, hs, weight, targets, 12),
                       FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_row(backend):
    hs, weight, targets = make_inputs(2, 1, 16, 67)
    fn = lambda h, w, y: weighted_linear_cross_entropy(h, w, y, [0.4, 0.6], backend=backend)  # noqa: E731
    ref = lambda h, w, y: reference(h, w, y, [0.4, 0.6])  # noqa: E731
    assert_matches(loss_and_grads(fn, hs, weight, targets, 3), loss_and_grads(ref, hs, weight, targets, 3), FP32_TOL)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("tiles", [(16, 32, 64), (64, 32, 16)])
def test_triton_gemm_tiles_of_three_sizes(monkeypatch, tiles):
    """Each GEMM launcher maps (out_rows, out_cols, inner) onto its kernel's row, class and
    model-dim blocks; the interpreter's default tiles are all 16, where a mix-up is invisible."""
    monkeypatch.setattr(weighted_ce, "INTERPRET_GEMM_TILES", weighted_ce.GemmTiles(*tiles))
    hs, weight, targets = make_inputs(2, 37, 48, 131, ignore_every=6)
    fn = lambda h, w, y: weighted_linear_cross_entropy(h, w, y, [0.6, 0.4], backend="triton_gemm")  # noqa: E731
    ref = lambda h, w, y: reference(h, w, y, [0.6, 0.4])  # noqa: E731
    assert_matches(loss_and_grads(fn, hs, weight, targets, 11), loss_and_grads(ref, hs, weight, targets, 11), FP32_TOL)


@NEEDS_TRITON
@pytest.mark.parametrize("capability, fp32_rows", [((8, 0), 128), ((8, 6), 64), ((8, 9), 64), ((9, 0), 128),
                                                  ((10, 0), 128), ((12, 0), 64)])
def test_triton_gemm_tiles_per_gpu_generation(monkeypatch, capability, fp32_rows):
    """'triton_gemm''s fp32-operand tiles (fp32/TF32 GEMMs, and the fp32 dlogits of every dH/dW)
    take 64 output rows on the ~99 KB mma.sync parts, where 128 spill (the AOT matrix), and
    128 elsewhere; 16-bit logits tiles take 128 everywhere."""
    monkeypatch.setattr(weighted_ce, "interpreting", lambda: False)
    monkeypatch.setattr(weighted_ce, "cuda_capability", lambda device: capability)
    cpu = torch.device("cpu")
    assert weighted_ce._gemm_config(torch.float32, cpu)[0] == weighted_ce.GemmTiles(fp32_rows, 128, 32)
    assert weighted_ce._gemm_config(torch.bfloat16, cpu)[0] == weighted_ce.GemmTiles(128, 128, 64)


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_fp64_needs_the_torch_backend(backend):
    hs, weight, targets = make_inputs(2, 9, 8, 11, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='torch'"):
        weighted_linear_cross_entropy(hs, weight, targets, [0.5, 0.5], backend=backend)


def test_fp64_inputs_stay_fp64():
    hs, weight, targets = make_inputs(2, 45, 24, 1000, dtype=torch.float64, ignore_every=3)
    kw = dict(reduction="sum", label_smoothing=0.1, z_loss=1e-3)
    ours = loss_and_grads(lambda h, w, y: weighted_linear_cross_entropy(h, w, y, [0.6, 0.4], backend="torch", **kw),
                          hs, weight, targets, 6)
    ref = loss_and_grads(lambda h, w, y: reference(h, w, y, [0.6, 0.4], **kw), hs, weight, targets, 6)
    assert_matches(ours, ref, FP64_TOL)


def test_torch_path_without_onednn(monkeypatch):
    """CPUs without mkldnn take torch.mm / addmm_ for the three GEMMs."""
    monkeypatch.setattr(gemm, "use_onednn", lambda t: False)
    hs, weight, targets = make_inputs(3, 45, 24, 1000, ignore_every=3)
    fn = lambda h, w, y: weighted_linear_cross_entropy(h, w, y, [0.7, 0.0, 0.3], backend="torch")  # noqa: E731
    ref = lambda h, w, y: reference(h, w, y, [0.7, 0.0, 0.3])  # noqa: E731
    assert_matches(loss_and_grads(fn, hs, weight, targets, 7), loss_and_grads(ref, hs, weight, targets, 7), FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stacked_input_matches_list(backend):
    n, d, n_classes = sizes(backend, 1000, 67)
    hs, weight, targets = make_inputs(3, n, d, n_classes, ignore_every=4)
    stacked = torch.stack(hs).requires_grad_()
    weighted_linear_cross_entropy(stacked, weight, targets, (0.7, 0.0, 0.3), backend=backend).mul(2.5).backward()
    ref_hs = [h.double().requires_grad_() for h in hs]
    reference(ref_hs, weight, targets, (0.7, 0.0, 0.3)).mul(2.5).backward()
    for k in range(3):
        assert rel_err(stacked.grad[k].double(), ref_hs[k].grad) <= FP32_TOL or not stacked.grad[k].any()
    assert not stacked.grad[1].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, reduction):
    hs, weight, targets = make_inputs(2, 19, 16, 67)
    targets.fill_(IGNORE)
    leaves = [t.clone().requires_grad_() for t in (weight, *hs)]
    out = weighted_linear_cross_entropy(leaves[1:], leaves[0], targets, [0.7, 0.3], reduction=reduction,
                                        label_smoothing=0.1, z_loss=1e-3, backend=backend)
    grads = torch.autograd.grad(out.sum(), leaves)
    assert not out.any() and torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() and not g.any() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ignored_rows_are_never_read(backend, reduction):
    """Ignored rows skip every GEMM: NaN in their hiddens (0 * NaN = NaN in a GEMM) changes nothing."""
    n, d, n_classes = sizes(backend, 1000, 67)
    hs, weight, targets = make_inputs(2, n, d, n_classes)
    targets[torch.randperm(n)[: n // 3]] = IGNORE  # scattered, so live and ignored rows share chunks
    poisoned = [h.masked_fill((targets == IGNORE).unsqueeze(1), float("nan")) for h in hs]
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    ours = loss_and_grads(lambda h, w, y: weighted_linear_cross_entropy(h, w, y, [0.6, 0.4], backend=backend, **kw),
                          poisoned, weight, targets, 8)
    ref = loss_and_grads(lambda h, w, y: reference(h, w, y, [0.6, 0.4], **kw), hs, weight, targets, 8)
    assert_matches(ours, ref, FP32_TOL)
    assert all(not g[targets == IGNORE].any() for g in ours[1][1:])  # dH of ignored rows is exactly 0


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=NEEDS_TRITON)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_running_every_row_ignores_nan_in_ignored_rows(backend, reduction, monkeypatch):
    """On CUDA the 'torch' and 'triton' paths run every row (skipping needs the live count on
    the host): the ignored rows' NaN must still reach neither the loss nor any gradient, and
    their dH is exactly 0. Forced here on CPU."""
    monkeypatch.setattr(weighted_ce, "_kept_rows", lambda targets, ignore_index: None)
    test_ignored_rows_are_never_read(backend, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_zero_weight_heads_are_never_read(backend, reduction):
    """A head of weight 0 enters no GEMM (0 * NaN = NaN in a GEMM): NaN hiddens there change
    nothing, and its gradient is exactly 0 without allow_unused (it stays in the graph)."""
    n, d, n_classes = sizes(backend, 1000, 67)
    hs, weight, targets = make_inputs(3, n, d, n_classes, ignore_every=5)
    poisoned = [hs[0], torch.full_like(hs[1], float("nan")), hs[2]]
    numbers = [0.5, 0.0, 0.5]
    for head_weights in (numbers, torch.tensor(numbers)):  # a CPU tensor is read on the host like numbers
        ours = loss_and_grads(lambda h, w, y: weighted_linear_cross_entropy(
            h, w, y, head_weights, reduction=reduction, backend=backend), poisoned, weight, targets, 9)
        ref = loss_and_grads(lambda h, w, y: reference(h, w, y, numbers, reduction=reduction), hs, weight, targets, 9)
        assert_matches(ours, ref, FP32_TOL)
        assert not ours[1][2].any()  # grads are (weight, h0, h1, h2): h1's is exactly 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_head_weights_as_cpu_tensor_equal_numbers(backend, reduction):
    """CPU tensors of head weights are read on the host: bit for bit the numbers' result."""
    n, d, n_classes = sizes(backend, 1000, 67)
    hs, weight, targets = make_inputs(3, n, d, n_classes, ignore_every=4)
    numbers = [0.7, 0.0, 0.3]
    runs = [loss_and_grads(lambda h, w, y: weighted_linear_cross_entropy(
                h, w, y, head_weights, reduction=reduction, backend=backend), hs, weight, targets, 10)
            for head_weights in (numbers, torch.tensor(numbers), torch.tensor(numbers, dtype=torch.float64))]
    (value, grads), others = runs[0], runs[1:]
    for other_value, other_grads in others:
        assert torch.equal(other_value, value) and all(torch.equal(a, b) for a, b in zip(other_grads, grads))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_head_weights_zero(reduction):
    hs, weight, targets = make_inputs(2, 19, 16, 67)
    leaves = [t.clone().requires_grad_() for t in (weight, *hs)]
    out = weighted_linear_cross_entropy(leaves[1:], leaves[0], targets, [0.0, 0.0], reduction=reduction)
    assert not out.any() and not any(g.any() for g in torch.autograd.grad(out.sum(), leaves))


def confident_inputs(n, d, n_classes, miss):
    """Rows whose target softmax is 1 - miss: h_i = a_i * w_t, a_i found by bisection in fp64."""
    weight = F.normalize(torch.randn(n_classes, d, dtype=torch.float64), dim=1)
    targets = torch.randint(0, n_classes, (n,))
    cos = weight[targets] @ weight.T - 1  # (N, V): 0 at the target, < 0 elsewhere
    lo, hi = torch.zeros(n, 1, dtype=torch.float64), torch.full((n, 1), 1e4, dtype=torch.float64)
    for _ in range(80):
        mid = (lo + hi) / 2
        too_unsure = (mid * cos).exp().sum(1, keepdim=True) - 1 > miss  # sum_{j != t} p_j / p_t
        lo, hi = torch.where(too_unsure, mid, lo), torch.where(too_unsure, hi, mid)
    return [(hi * weight[targets]).float()], weight.float(), targets


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_rows(backend):
    """Target softmax 1 - 1e-6: the true-class gradient p - 1 must not cancel in fp32."""
    hs, weight, targets = confident_inputs(24, 64, 67, miss=1e-6)
    fn = lambda h, w, y: weighted_linear_cross_entropy(h, w, y, [1.0], reduction="sum", backend=backend)  # noqa: E731
    ref = lambda h, w, y: reference(h, w, y, [1.0], reduction="sum")  # noqa: E731
    ours, expect = loss_and_grads(fn, hs, weight, targets, 4), loss_and_grads(ref, hs, weight, targets, 4)
    assert 0.5e-6 < expect[0].item() / 24 < 2e-6  # the rows really are that confident
    assert_matches(ours, expect, CONFIDENT_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_error_at_most_twice_pytorch(backend, dtype):
    n, d, n_classes = sizes(backend, 1000, 131)
    hs, weight, targets = make_inputs(2, n, d, n_classes, dtype=dtype, ignore_every=5, logit_scale=4.0)
    ws = [0.7, 0.3]
    ours = loss_and_grads(lambda h, w, y: weighted_linear_cross_entropy(h, w, y, ws, backend=backend),
                          hs, weight, targets, 5)
    torch_low = loss_and_grads(lambda h, w, y: sum(wk * F.cross_entropy(hk @ w.T, y, ignore_index=IGNORE)
                                                    for wk, hk in zip(ws, h)), hs, weight, targets, 5)
    exact = loss_and_grads(lambda h, w, y: reference(h, w, y, ws), hs, weight, targets, 5)
    for i, (a, b, r) in enumerate(zip([ours[0], *ours[1]], [torch_low[0], *torch_low[1]], [exact[0], *exact[1]])):
        ours_err, torch_err = rel_err(a, r), rel_err(b, r)
        assert ours_err <= 2 * torch_err + LOW_PRECISION_FLOOR, f"tensor {i}: {ours_err:.3g} vs torch's {torch_err:.3g}"


def amp_naive(hs, weight, targets, head_weights):
    """Plain PyTorch as fp16/bf16 autocast runs it: 16-bit logits, cross_entropy in fp32."""
    return sum(w * F.cross_entropy((h @ weight.T).float(), targets, ignore_index=IGNORE)
               for h, w in zip(hs, head_weights))


def scaled_grads(fn, hs, weight, targets, loss_scale):
    """Grads of fn to weight and every head for grad_output = loss_scale, as GradScaler gives."""
    leaves = [t.detach().clone().requires_grad_() for t in (weight, *hs)]
    out = fn(leaves[1:], leaves[0], targets)
    return torch.autograd.grad(out, leaves, grad_outputs=torch.tensor(loss_scale, dtype=out.dtype))


def elementwise_error(grad, exact):
    """(median of |grad - exact| / |exact|, share of entries flushed to 0) where exact != 0."""
    nonzero = exact != 0
    rel = ((grad.double() - exact).abs() / exact.abs())[nonzero]
    return rel.median().item(), (grad[nonzero] == 0).double().mean().item()


def emulate_cuda_operands(monkeypatch):
    """The Triton path multiplies 16-bit operands as on CUDA (on CPU it upcasts them to fp32)."""
    monkeypatch.setattr(gemm, "mm_dtype", lambda t: t.dtype)


LOSS_SCALE_CASES = [  # (backend, cuda_operands, dtype); the interpreter's tl.dot has no bf16
    pytest.param(backend, False, dtype, marks=marks, id=f"{backend}-{str(dtype)[6:]}")
    for backend, marks in (("torch", ()), ("triton", NEEDS_TRITON), ("triton_gemm", NEEDS_TRITON))
    for dtype in (torch.float16, torch.bfloat16)
] + [pytest.param(backend, True, torch.float16, marks=NEEDS_TRITON, id=f"{backend}-float16-cuda_operands")
     for backend in ("triton", "triton_gemm")]


@pytest.mark.parametrize("loss_scale", LOSS_SCALES)
@pytest.mark.parametrize("backend, cuda_operands, dtype", LOSS_SCALE_CASES)
def test_loss_scaled_grads_elementwise(monkeypatch, backend, cuda_operands, dtype, loss_scale):
    """Under a GradScaler loss scale the gradients stay finite, and element by element (relative
    to each fp64 entry, which a max-normalised error hides) are at most ~2x as wrong as plain
    PyTorch under autocast, with no more entries flushed to 0. Small head weights over many
    rows make dlogits ~ w_k / N * p: below fp16's subnormals unless kept out of 16-bit storage
    until the scale is applied."""
    if cuda_operands:
        emulate_cuda_operands(monkeypatch)
    n, d, n_classes = (64, 32, 256) if backend != "torch" else (512, 64, 2048)
    hs, weight, targets = make_inputs(2, n, d, n_classes, dtype=dtype, ignore_every=5)
    ws = [1e-3, 5e-4]
    ours = scaled_grads(lambda h, w, y: weighted_linear_cross_entropy(h, w, y, ws, backend=backend),
                        hs, weight, targets, loss_scale)
    plain = scaled_grads(lambda h, w, y: amp_naive(h, w, y, ws), hs, weight, targets, loss_scale)
    exact = scaled_grads(lambda h, w, y: reference(h, w, y, ws), [h.double() for h in hs], weight.double(),
                         targets, loss_scale)
    for i, (a, p, r) in enumerate(zip(ours, plain, exact)):
        assert a.dtype == dtype and torch.isfinite(a).all(), f"grad {i} is not finite"
        (ours_median, ours_zeros), (plain_median, plain_zeros) = elementwise_error(a, r), elementwise_error(p, r)
        assert ours_median <= 2 * plain_median, f"grad {i}: median error {ours_median:.3g} vs {plain_median:.3g}"
        assert ours_zeros <= 2 * plain_zeros + ZERO_SHARE_FLOOR, f"grad {i}: {ours_zeros:.3g} flushed to 0"


@pytest.mark.parametrize("backend, cuda_operands", [
    ("torch", False), pytest.param("triton", False, marks=NEEDS_TRITON),
    pytest.param("triton", True, marks=NEEDS_TRITON, id="triton-cuda_operands"),
    pytest.param("triton_gemm", True, marks=NEEDS_TRITON, id="triton_gemm-cuda_operands")])
def test_grad_scaler_step_under_fp16_autocast(monkeypatch, backend, cuda_operands):
    """One real torch.amp.GradScaler step (initial scale 2**16, above fp16's max) on fp32
    parameters under fp16 autocast, the fused loss on the autocast hiddens: the step is taken
    (no inf/NaN found, the scale stays) and the gradients it applies are the fp64 step's, entry
    by entry (the updates themselves round to the parameters' fp32 resolution)."""
    if cuda_operands:
        emulate_cuda_operands(monkeypatch)
    n, d, n_classes = (48, 32, 131) if backend != "torch" else (512, 64, 1000)
    proj = torch.nn.Linear(d, d)
    head = torch.nn.Parameter(torch.randn(n_classes, d) / math.sqrt(d))
    x, targets = torch.randn(n, d), torch.randint(0, n_classes, (n,))
    params = [proj.weight, proj.bias, head]
    start = [p.detach().double().requires_grad_() for p in params]
    exact = torch.autograd.grad(reference([F.linear(x.double(), *start[:2])], start[2], targets, [1e-3]), start)
    scaler, opt = torch.amp.GradScaler("cpu"), torch.optim.SGD(params, lr=SCALER_STEP_LR)
    with torch.autocast("cpu", dtype=torch.float16):
        h = proj(x)
        loss = weighted_linear_cross_entropy([h], head.to(h.dtype), targets, [1e-3], backend=backend)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 16, "the step was skipped: inf/NaN gradients"
    for i, (p, p0, g) in enumerate(zip(params, start, exact)):
        assert torch.equal(p.detach(), p0.detach().float().add(p.grad, alpha=-SCALER_STEP_LR)), f"param {i} not updated"
        median, zeros = elementwise_error(p.grad, g)
        assert median <= SCALER_STEP_TOL and zeros <= ZERO_SHARE_FLOOR, f"param {i}: {median:.3g}, {zeros:.3g} at 0"


# ----------------------------------------------------------------------------- 'triton' as on CUDA
def reference_distill(hs, weight, targets, head_weights, *, reduction, teacher, distill_weight, temperature):
    """reference() plus distill_weight * w_k * T^2 * KL(softmax(z_t / T) || softmax(z_k / T)) per
    valid row of every head but the teacher (a head index, or hiddens [N, d]); z_t detached."""
    valid = targets != IGNORE
    z_t = ((hs[teacher] if isinstance(teacher, int) else teacher).double() @ weight.double().T).detach()
    rows = []
    for k, (h, w) in enumerate(zip(hs, head_weights)):
        z = h.double() @ weight.double().T
        row = F.cross_entropy(z, targets, ignore_index=IGNORE, reduction="none")
        if not (isinstance(teacher, int) and k == teacher):
            kl = F.kl_div(F.log_softmax(z / temperature, 1), F.log_softmax(z_t / temperature, 1), reduction="none",
                          log_target=True).sum(1)
            row = row + torch.where(valid, distill_weight * temperature ** 2 * kl, 0.0)
        rows.append(w * row)
    rows = torch.stack(rows)
    return {"none": rows, "sum": rows.sum(), "mean": rows.sum() / valid.sum()}[reduction]


TRITON_CASES = {  # name: (head_weights, reduction, teacher): K = 1..4, distillation from a head or a tensor
    "one_head": ((1.0,), "mean", None),
    "two_heads_sum": ((0.7, 0.3), "sum", None),
    "three_heads_teacher_head": ((0.5, 0.0, 0.5), "mean", 2),
    "four_heads_teacher_tensor_none": ((0.25, 0.25, 0.0, 0.5), "none", "tensor"),
}
TRITON_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ODD_TRITON_VOCAB = 131  # three 32-class row tiles and a partial one; rows padded to 160 columns


@NEEDS_TRITON
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_path_with_cuda_operands(monkeypatch, case, dtype):
    """backend='triton' with 16-bit operands multiplied as on CUDA (bf16/fp16 dlogits written
    over the fp32 logits, fp16 ones times a power of two; reduction='none' keeps fp16 dlogits
    in fp32): loss, argmax and every gradient against fp64, at an odd V, with ignored rows
    scattered through the chunks and NaN in their hiddens. 16-bit results may be at most ~2x
    as wrong as PyTorch's own in that dtype."""
    emulate_cuda_operands(monkeypatch)
    head_weights, reduction, teacher = TRITON_CASES[case]
    n, d = 37, 32
    hs, weight, targets = make_inputs(len(head_weights), n, d, ODD_TRITON_VOCAB, dtype=dtype, logit_scale=4.0)
    targets[torch.randperm(n)[: n // 4]] = IGNORE
    ignored = (targets == IGNORE).unsqueeze(1)
    t_hidden = torch.randn(n, d).to(dtype) if teacher == "tensor" else None
    kw = dict(reduction=reduction)
    if teacher is not None:
        kw.update(distill_weight=0.8, temperature=2.0)
    ours_teacher = teacher if t_hidden is None else t_hidden.masked_fill(ignored, float("nan"))
    argmaxes = []

    def ours(h, w, y):
        extra = {} if teacher is None else dict(teacher=ours_teacher, distill_weight=0.8, distill_temperature=2.0)
        out, arg = weighted_linear_cross_entropy([x.masked_fill(ignored, float("nan")) for x in h], w, y,
                                                 head_weights, reduction=reduction, backend="triton",
                                                 return_argmax=True, **extra)
        argmaxes.append(arg)
        return out

    def naive(h, w, y):  # in h's dtype (the logits too), or fp64
        if teacher is None:
            return reference(h, w, y, head_weights, reduction=reduction) if h[0].dtype == torch.float64 else \
                _same_dtype_reference(h, w, y, head_weights, reduction)
        t = teacher if t_hidden is None else t_hidden.to(h[0].dtype)
        return reference_distill(h, w, y, head_weights, teacher=t, **kw)

    got = loss_and_grads(ours, hs, weight, targets, 14)
    exact = loss_and_grads(naive, [h.double() for h in hs], weight.double(), targets, 14)
    own = loss_and_grads(naive, hs, weight, targets, 14) if dtype != torch.float32 else None
    for i, (a, r) in enumerate(zip([got[0], *got[1]], [exact[0], *exact[1]])):
        bound = FP32_TOL if own is None else 2 * rel_err([own[0], *own[1]][i], r) + LOW_PRECISION_FLOOR
        assert torch.isfinite(a).all() and rel_err(a, r) <= bound, f"tensor {i}: {rel_err(a, r):.3g} > {bound:.3g}"
    logits = torch.stack([h.double() @ weight.double().T for h in hs])  # (K, N, V)
    for k, arg in enumerate(argmaxes[0]):
        if head_weights[k] == 0:
            assert arg is None
            continue
        assert (arg[targets == IGNORE] == IGNORE).all()
        picked = logits[k].gather(1, arg.clamp(min=0)[:, None]).squeeze(1)
        top = logits[k].amax(1)
        assert ((top - picked) <= 1e-4 * top.abs().clamp(min=1))[targets != IGNORE].all()


def _same_dtype_reference(hs, weight, targets, head_weights, reduction):
    """PyTorch in the inputs' dtype: 16-bit logits and cross_entropy on them."""
    per_head = [w * F.cross_entropy(h @ weight.T, targets, ignore_index=IGNORE, reduction=reduction)
                for h, w in zip(hs, head_weights)]
    return torch.stack(per_head) if reduction == "none" else sum(per_head)


@NEEDS_TRITON
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda t: str(t)[6:])
def test_triton_path_stores_16bit_dlogits_over_its_logits(monkeypatch, dtype):
    """The dH GEMM of backend='triton' reads dlogits in the operand dtype from the storage the
    logits GEMM wrote its fp32 result to (no second buffer)."""
    emulate_cuda_operands(monkeypatch)
    calls, mm_into = [], gemm.mm_into

    def spy(out, a, b):
        calls.append((out.untyped_storage().data_ptr(), a.dtype, a.untyped_storage().data_ptr()))
        return mm_into(out, a, b)

    monkeypatch.setattr(gemm, "mm_into", spy)
    hs, weight, targets = make_inputs(2, 21, 16, 67, dtype=dtype, ignore_every=4)
    leaves = [t.requires_grad_() for t in (weight, *hs)]
    weighted_linear_cross_entropy(leaves[1:], leaves[0], targets, [0.6, 0.4], backend="triton").backward()
    logits_storage = calls[0][0]  # the first chunk's logits GEMM
    assert any(dt == dtype and ptr == logits_storage for _, dt, ptr in calls[1:])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_does_not_reach_the_passes(monkeypatch, reduction):
    """autocast would recast the PyTorch path's own torch.mm GEMMs (the ones CPUs without
    oneDNN and CUDA take) to 16 bits: inside it, value and gradients equal those outside."""
    monkeypatch.setattr(gemm, "use_onednn", lambda t: False)
    hs, weight, targets = make_inputs(2, 45, 24, 1000, dtype=torch.float16, ignore_every=3)
    fn = lambda h, w, y: weighted_linear_cross_entropy(h, w, y, [0.7, 0.3], reduction=reduction)  # noqa: E731
    outside = loss_and_grads(fn, hs, weight, targets, 13)
    with torch.autocast("cpu", dtype=torch.float16):
        inside = loss_and_grads(fn, hs, weight, targets, 13)
    assert all(torch.equal(a, b) for a, b in zip([inside[0], *inside[1]], [outside[0], *outside[1]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_keep_input_dtype(backend, dtype):
    hs, weight, targets = make_inputs(2, 19, 16, 67, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (weight, *hs)]
    out = weighted_linear_cross_entropy(leaves[1:], leaves[0], targets, [0.7, 0.3], backend=backend)
    assert out.dtype == torch.float32
    assert all(g.dtype == dtype for g in torch.autograd.grad(out, leaves))


# ----------------------------------------------------------------------------- bad input
def _call(hs=None, weight=None, targets=None, head_weights=(0.7, 0.3), **kw):
    d_hs, d_weight, d_targets = make_inputs(2, 9, 8, 11)
    return weighted_linear_cross_entropy(d_hs if hs is None else hs, d_weight if weight is None else weight,
                                         d_targets if targets is None else targets, head_weights, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [11, 12, -1, -101])
def test_out_of_range_target(backend, bad):
    targets = torch.randint(0, 11, (9,))
    targets[4] = bad
    with pytest.raises(ValueError, match="targets"):
        _call(targets=targets, backend=backend)


@pytest.mark.parametrize("kw, error, match", [
    (dict(hs=[torch.randn(9, 8), torch.randn(8, 8)]), ValueError, "hiddens"),
    (dict(hs=[torch.randn(9, 8), torch.randn(9, 8, dtype=torch.float64)]), TypeError, "hiddens"),
    (dict(hs=torch.randn(9, 8)), ValueError, "hiddens"),
    (dict(hs="not a tensor"), TypeError, "hiddens"),
    (dict(hs=[torch.randn(9, 8), "not a tensor"]), TypeError, "hiddens"),
    (dict(hs=[torch.randint(0, 5, (9, 8)), torch.randint(0, 5, (9, 8))]), TypeError, "hiddens"),
    (dict(hs=[torch.randn(0, 8), torch.randn(0, 8)], targets=torch.zeros(0, dtype=torch.long)), ValueError, "hiddens"),
    (dict(weight=torch.randn(11, 7)), ValueError, "weight"),
    (dict(weight=torch.randn(11, 8, dtype=torch.float64)), TypeError, "weight"),
    (dict(weight=torch.randn(0, 8)), ValueError, "weight"),
    (dict(targets=torch.zeros(8, dtype=torch.long)), ValueError, "targets"),
    (dict(targets=torch.zeros(9)), TypeError, "targets"),
    (dict(head_weights=(0.7, -0.3)), ValueError, "head_weights"),
    (dict(head_weights=(0.7, float("nan"))), ValueError, "head_weights"),
    (dict(head_weights=(float("inf"), 0.3)), ValueError, "head_weights"),
    (dict(head_weights=(0.7, 0.2, 0.1)), ValueError, "head_weights"),
    (dict(head_weights=torch.tensor([0.7, -0.3])), ValueError, "head_weights"),
    (dict(head_weights=torch.tensor([0.7, 0.2, 0.1])), ValueError, "head_weights"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
])
def test_bad_input_names_the_argument(kw, error, match):
    with pytest.raises(error, match=match):
        _call(**kw)


@pytest.mark.parametrize("kw, name", [
    (dict(weight=torch.randn(11, 8, device="meta")), "weight"),
    (dict(targets=torch.zeros(9, dtype=torch.long, device="meta")), "targets"),
    (dict(hs=[torch.randn(9, 8), torch.randn(9, 8, device="meta")]), "hiddens"),
    (dict(head_weights=torch.tensor([0.7, 0.3], device="meta")), "head_weights"),
    (dict(teacher=torch.randn(9, 8, device="meta"), distill_weight=0.5), "teacher"),
])
def test_device_mismatch_names_the_argument(kw, name):
    """Inputs on two devices (a meta tensor stands for the second one here) are a ValueError
    naming the argument, before any kernel could run on the wrong device."""
    with pytest.raises(ValueError, match=name):
        _call(**kw)
