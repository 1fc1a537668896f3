"""The kernels compiled for a real GPU: run with TRITON_INTERPRET=0 on a CUDA machine.

    TRITON_INTERPRET=0 python -m pytest -q tests/test_cuda_kernels.py

The rest of tests/ checks every Triton kernel through the interpreter on CPU tensors (CI has
no GPU). This file runs every backend on CUDA tensors at shapes where the GPU tile sizes and
the bf16/fp16 tensor-core paths are used, against fp64 references, and checks that the
training loss, a whole training step and routed evaluation never synchronise with the host
beyond what docs/design.md allows. Sized for an 80 GB GPU (the offsets past 2**31 included).
Without CUDA (or under the interpreter) it is skipped as a whole. `bash bench/gpu_check.sh`
runs it first, its most important tests first.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastexit import EarlyExitTransformer, ModelConfig, UniversalConfig, UniversalTrainer, distributed
from fastexit.config import LayerDropout
from fastexit.kernels import HAS_TRITON, compact_indices, exit_confidence, gather_rows, scatter_rows
from fastexit.kernels.backend import dot_precision, interpreting
from fastexit.kernels import gemm, weighted_ce
from fastexit.kernels.weighted_ce import weighted_linear_cross_entropy
from fastexit.routing import compact_routed_forward, exact_routed_forward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or interpreting(),
                                reason="compiled GPU kernels: needs CUDA and TRITON_INTERPRET=0")
NEEDS_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
BACKENDS = [pytest.param("triton", marks=NEEDS_TRITON), pytest.param("triton_gemm", marks=NEEDS_TRITON), "torch"]
TRITON_BACKENDS = ["triton", "triton_gemm"]
IGNORE = -100
HEAD_WEIGHTS = (0.7, 0.0, 0.3)
TOL = {torch.float32: 1e-4, torch.bfloat16: None, torch.float16: None}  # None: 2x PyTorch's own error
ODD_VOCABS = [5003, 50257]  # rows of no multiple of 16 classes: the Triton path pads them
LOSS_SCALES = [32768.0, 65536.0]  # GradScaler starts at 2**16, above fp16's max (65504)
SMALL_HEAD_WEIGHTS = (1e-3, 0.0, 5e-4)
ZERO_SHARE_FLOOR = 1e-3  # gradient entries flushed to 0 that count as none


def inputs(dtype, n=1500, d=256, v=5003, seed=0):
    gen = torch.Generator("cuda").manual_seed(seed)
    hs = [torch.randn(n, d, device="cuda", generator=gen).to(dtype) for _ in HEAD_WEIGHTS]
    weight = (torch.randn(v, d, device="cuda", generator=gen) * 4 / math.sqrt(d)).to(dtype)
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    targets[torch.randperm(n, device="cuda", generator=gen)[: n // 4]] = IGNORE
    return hs, weight, targets


def value_and_grads(fn, hs, weight, targets):
    leaves = [t.detach().clone().requires_grad_() for t in (weight, *hs)]
    out = fn(leaves[1:], leaves[0], targets)
    g = torch.linspace(0.5, 3.0, out.numel(), device=out.device).view(out.shape)  # grad_output != 1
    return [out.detach().double(), *(x.double() for x in torch.autograd.grad((out * g).sum(), leaves))]


def naive(hs, weight, targets, reduction):
    per_head = [w * F.cross_entropy(h @ weight.T, targets, ignore_index=IGNORE, reduction=reduction)
                for h, w in zip(hs, HEAD_WEIGHTS)]
    return torch.stack(per_head) if reduction == "none" else sum(per_head)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("n_classes", ODD_VOCABS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_ce_on_gpu(backend, dtype, reduction, n_classes):
    hs, weight, targets = inputs(dtype, v=n_classes)
    hs = [h.masked_fill((targets == IGNORE)[:, None], float("nan")) for h in hs]  # never read
    clean = [h.nan_to_num(0.0) for h in hs]
    ours = value_and_grads(lambda h, w, y: weighted_linear_cross_entropy(
        h, w, y, HEAD_WEIGHTS, reduction=reduction, backend=backend), hs, weight, targets)
    exact = value_and_grads(lambda h, w, y: naive([x.double() for x in h], w.double(), y, reduction),
                            clean, weight, targets)
    same_dtype = value_and_grads(lambda h, w, y: naive(h, w, y, reduction), clean, weight, targets)
    for i, (a, r, p) in enumerate(zip(ours, exact, same_dtype)):
        bound = TOL[dtype] if TOL[dtype] is not None else 2 * rel_err(p, r) + 1e-3
        assert torch.isfinite(a).all() and rel_err(a, r) <= bound, f"tensor {i}: {rel_err(a, r):.3g} > {bound:.3g}"


def naive_distill(hs, weight, targets, reduction, teacher, distill_weight=0.8, temperature=2.0):
    """naive() plus distill_weight * w_k * T^2 * KL(softmax(z_t / T) || softmax(z_k / T)) per valid
    row of every head but the teacher (an index, or hiddens [N, d]); z_t detached, W included."""
    valid = targets != IGNORE
    z_t = ((hs[teacher] if isinstance(teacher, int) else teacher) @ weight.T).detach()
    per_head = []
    for k, (h, w) in enumerate(zip(hs, HEAD_WEIGHTS)):
        z = h @ weight.T
        row = F.cross_entropy(z, targets, ignore_index=IGNORE, reduction="none")
        if not (isinstance(teacher, int) and k == teacher):
            kl = F.kl_div(F.log_softmax(z / temperature, 1), F.log_softmax(z_t / temperature, 1), reduction="none",
                          log_target=True).sum(1)
            row = row + torch.where(valid, distill_weight * temperature ** 2 * kl, 0.0)
        per_head.append(w * row)
    rows = torch.stack(per_head)
    return {"none": rows, "mean": rows.sum() / valid.sum()}[reduction]


@pytest.mark.parametrize("teacher", ["head", "tensor"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_on_gpu(backend, dtype, reduction, teacher):
    """Self-distillation from the last weighted head (its logits reused) or from a separate
    tensor (one more logits GEMM): value and every gradient against fp64, NaN in ignored rows
    of every hidden state never read."""
    hs, weight, targets = inputs(dtype, v=5003)
    t_hidden = torch.randn(hs[0].shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(dtype)
    ignored = (targets == IGNORE)[:, None]
    hs, t_hidden = [h.masked_fill(ignored, float("nan")) for h in hs], t_hidden.masked_fill(ignored, float("nan"))
    clean, t_clean = [h.nan_to_num(0.0) for h in hs], t_hidden.nan_to_num(0.0)
    ours_teacher, ref_teacher = (2, 2) if teacher == "head" else (t_hidden, t_clean)
    ours = value_and_grads(lambda h, w, y: weighted_linear_cross_entropy(
        h, w, y, HEAD_WEIGHTS, reduction=reduction, distill_weight=0.8, distill_temperature=2.0,
        teacher=ours_teacher, backend=backend), hs, weight, targets)
    exact = value_and_grads(lambda h, w, y: naive_distill(
        [x.double() for x in h], w.double(), y, reduction,
        ref_teacher if isinstance(ref_teacher, int) else ref_teacher.double()), clean, weight, targets)
    same_dtype = value_and_grads(lambda h, w, y: naive_distill(h, w, y, reduction, ref_teacher), clean, weight, targets)
    for i, (a, r, p) in enumerate(zip(ours, exact, same_dtype)):
        bound = TOL[dtype] if TOL[dtype] is not None else 2 * rel_err(p, r) + 1e-3
        assert torch.isfinite(a).all() and rel_err(a, r) <= bound, f"tensor {i}: {rel_err(a, r):.3g} > {bound:.3g}"


@NEEDS_TRITON
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("teacher", ["head", "tensor"])
def test_distill_never_syncs_with_the_host(teacher, backend):
    hs, weight, targets = inputs(torch.bfloat16)
    leaves = [t.requires_grad_() for t in (weight, *hs)]
    t_hidden = 2 if teacher == "head" else torch.randn_like(hs[0])

    def step():
        loss = weighted_linear_cross_entropy(leaves[1:], leaves[0], targets, HEAD_WEIGHTS, distill_weight=0.5,
                                             distill_temperature=2.0, teacher=t_hidden, backend=backend)
        loss.backward()
        return loss

    step()  # compiles; the out_dtype probe reads its result once per process
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


def elementwise_error(grad, exact):
    """(median of |grad - exact| / |exact|, share of entries flushed to 0) where exact != 0."""
    nonzero = exact != 0
    rel = ((grad.double() - exact).abs() / exact.abs())[nonzero]
    return rel.median().item(), (grad[nonzero] == 0).double().mean().item()


def scaled_grads(fn, hs, weight, loss_scale):
    leaves = [t.detach().clone().requires_grad_() for t in (weight, *hs)]
    out = fn(leaves[1:], leaves[0])
    return torch.autograd.grad(out, leaves, grad_outputs=torch.tensor(loss_scale, device="cuda", dtype=out.dtype))


@pytest.mark.parametrize("loss_scale", LOSS_SCALES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_ce_loss_scaled_grads_on_gpu(backend, dtype, loss_scale):
    """A GradScaler's grad_output and small head weights over many rows (dlogits ~ w_k / N * p,
    ~1e-11 here): gradients finite and, entry by entry against fp64, at most ~2x as wrong as
    PyTorch under autocast (16-bit logits, fp32 cross_entropy), with no more entries at 0."""
    hs, weight, targets = inputs(dtype, n=4096, v=50257)
    naive_amp = lambda h, w: sum(  # noqa: E731  as autocast runs it: logits in h's dtype, the loss in >= fp32
        wk * F.cross_entropy((hk @ w.T).to(torch.promote_types(hk.dtype, torch.float32)), targets, ignore_index=IGNORE)
        for hk, wk in zip(h, SMALL_HEAD_WEIGHTS))
    ours = scaled_grads(lambda h, w: weighted_linear_cross_entropy(h, w, targets, SMALL_HEAD_WEIGHTS, backend=backend),
                        hs, weight, loss_scale)
    plain = scaled_grads(naive_amp, hs, weight, loss_scale)
    exact = scaled_grads(naive_amp, [h.double() for h in hs], weight.double(), loss_scale)
    for i in (0, 1, 3):  # dW and the dH of the two weighted heads
        assert ours[i].dtype == dtype and torch.isfinite(ours[i]).all(), f"grad {i} is not finite"
        (ours_median, ours_zeros), (plain_median, plain_zeros) = (elementwise_error(ours[i], exact[i]),
                                                                  elementwise_error(plain[i], exact[i]))
        assert ours_median <= 2 * plain_median, f"grad {i}: median error {ours_median:.3g} vs {plain_median:.3g}"
        assert ours_zeros <= 2 * plain_zeros + ZERO_SHARE_FLOOR, f"grad {i}: {ours_zeros:.3g} flushed to 0"


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_head_weights_on_the_device(backend, reduction):
    """A CUDA tensor of head weights is never read on the host, so every head runs (the zero
    one with a zero coefficient): value and gradients equal the numbers' up to GEMM rounding."""
    hs, weight, targets = inputs(torch.float32)
    run = lambda head_weights: value_and_grads(lambda h, w, y: weighted_linear_cross_entropy(  # noqa: E731
        h, w, y, head_weights, reduction=reduction, backend=backend), hs, weight, targets)
    on_device, numbers = run(torch.tensor(HEAD_WEIGHTS, device="cuda")), run(HEAD_WEIGHTS)
    for i, (a, r) in enumerate(zip(on_device, numbers)):
        assert torch.isfinite(a).all() and rel_err(a, r) <= 1e-5, f"tensor {i}: {rel_err(a, r):.3g}"
    assert not on_device[2].any()  # (value, dW, dh0, dh1, dh2): the zero-weight head's gradient is 0


@NEEDS_TRITON
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights_on_device", [False, True])
def test_weighted_ce_never_syncs_with_the_host(weights_on_device, dtype, backend):
    hs, weight, targets = inputs(dtype)
    leaves = [t.requires_grad_() for t in (weight, *hs)]
    head_weights = torch.tensor(HEAD_WEIGHTS, device="cuda") if weights_on_device else HEAD_WEIGHTS

    def step():
        loss = weighted_linear_cross_entropy(leaves[1:], leaves[0], targets, head_weights, backend=backend)
        loss.backward()
        return loss

    step()  # compiles; the out_dtype probe reads its result once per process
    torch.cuda.synchronize()  # the copy above may sync; the loss must not
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


@NEEDS_TRITON
@pytest.mark.parametrize("n", [1, 3, 64, 777])  # decode steps (16-row blocks, many vocabulary splits); a batch
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exit_confidence_on_gpu(dtype, n):
    """fp32 runs at torch's default fp32 matmul precision (IEEE, not TF32): 1e-4 against fp64,
    so both backends route the same tokens."""
    assert dot_precision(torch.float32) == "ieee", "torch's fp32 matmul setting was changed from its default"
    hs, weight, targets = inputs(dtype, n=n)
    stats = exit_confidence(hs[0], weight, targets, backend="triton")
    logits = hs[0].double() @ weight.double().T
    conf, _ = logits.softmax(1).max(1)
    lse = logits.logsumexp(1)
    valid = targets != IGNORE
    nll = torch.where(valid, lse - logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for ours, ref in ((stats.conf, conf), (stats.lse, lse), (stats.nll, nll)):
        assert rel_err(ours.double(), ref) <= tol
    assert (logits.gather(1, stats.pred[:, None]).squeeze(1) >= logits.max(1).values - 1e-3).all()


@NEEDS_TRITON
@pytest.mark.parametrize("n", [1, 3, 64, 777])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exit_confidence_margin_on_gpu(backend, dtype, n):
    """margin = top-1 - top-2 softmax probability against fp64: 1e-4 in fp32 (IEEE), at most
    ~2x PyTorch's own error in 16 bits; conf, pred, lse and nll as without the margin."""
    hs, weight, targets = inputs(dtype, n=n)
    stats = exit_confidence(hs[0], weight, targets, want_margin=True, backend=backend)
    plain = exit_confidence(hs[0], weight, targets, backend=backend)
    assert plain.margin is None and torch.equal(stats.pred, plain.pred)
    for ours, theirs in zip((stats.conf, stats.lse, stats.nll), (plain.conf, plain.lse, plain.nll)):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=1e-6)
    exact = (hs[0].double() @ weight.double().T).softmax(1).topk(2, 1).values  # (N, 2)
    own = (hs[0] @ weight.T).float().softmax(1).topk(2, 1).values  # PyTorch's own logits in dtype
    exact, own = exact[:, 0] - exact[:, 1], (own[:, 0] - own[:, 1]).double()
    bound = 1e-4 if dtype == torch.float32 else 2 * (own - exact).abs().max().item() + 1e-4
    assert (stats.margin.double() - exact).abs().max().item() <= bound


@NEEDS_TRITON
@pytest.mark.parametrize("n", [3, 777])  # decode tiles; batch tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exit_confidence_margin_of_a_tie_across_splits_on_gpu(dtype, n):
    """Integer inputs (every logit exact in either dtype): row 0's top logit |h0|^2 >= 9 (every
    other class <= 6) at the first and the last class, in the first and last vocabulary split:
    margin exactly 0 and pred the first class."""
    gen = torch.Generator("cuda").manual_seed(0)
    d, v = 16, 5003
    hidden = torch.randint(-3, 4, (n, d), device="cuda", generator=gen).float()
    hidden[0, 0] = 3
    weight = torch.randint(-1, 2, (v, d), device="cuda", generator=gen).float() / 8
    weight[[0, v - 1]] = hidden[0]
    stats = exit_confidence(hidden.to(dtype), weight.to(dtype), want_margin=True, backend="triton")
    assert stats.margin[0] == 0 and stats.pred[0] == 0
    top = (hidden.double() @ weight.double().T).softmax(1).topk(2, 1).values
    assert rel_err(stats.margin.double(), top[:, 0] - top[:, 1]) <= 1e-5


@NEEDS_TRITON
@pytest.mark.parametrize("want_margin", [False, True])
def test_exit_confidence_never_syncs_with_the_host(want_margin):
    hs, weight, targets = inputs(torch.bfloat16, n=3)
    exit_confidence(hs[0], weight, targets, want_margin=want_margin, backend="triton")  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = exit_confidence(hs[0], weight, targets, want_margin=want_margin, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(stats.lse).all()


@NEEDS_TRITON
def test_compaction_on_gpu():
    mask = torch.rand(100_003, device="cuda") < 0.3
    idx = compact_indices(mask, backend="triton")
    assert torch.equal(idx, mask.nonzero().squeeze(1))
    x = torch.randn(100_003, 96, device="cuda")
    assert torch.equal(gather_rows(x, idx, backend="triton"), x[idx])
    out = torch.zeros_like(x)
    scatter_rows(out, idx, x[idx] * 2, backend="triton")
    assert torch.equal(out[idx], x[idx] * 2) and not out[~mask].any()


# ----------------------------------------------------------------------------- offsets past 2**31
REF_ROWS, REF_CLASSES = 2048, 8192  # the fp64 reference's blocks: never all of W, or all logits, in fp64
# (N, d, V, chunk bytes). Chunks bound every per-chunk buffer (2**31 bytes by default), so:
# "logits": one chunk of 17000 x 128256 fp32 logits (8.7 GB, flat offsets to 2.2e9; their 16-bit
# dlogits view to 4.4e9), the chunk budget raised for it; "weight": a 152064 x 16384 head (Qwen's
# vocabulary at d=16384): W and its fp32 gradient hold 2.5e9 entries at the default budget.
# About 35 GB at most: W (5 GB bf16), its copy and gradients, our fp32 dW (10 GB); the
# references compare dW on CHECKED_CLASSES rows only.
OFFSET_CASES = {"logits": (17000, 64, 128256, 2**34), "weight": (512, 16384, 152064, None)}
CHECKED_CLASSES = 4096  # dW rows compared: the first and the last (past 2**31 / d) CHECKED_CLASSES // 2


def checked_classes(n_classes: int) -> torch.Tensor:
    half = CHECKED_CLASSES // 2
    return torch.cat([torch.arange(half), torch.arange(n_classes - half, n_classes)]).cuda()


def blockwise_exact(h, weight, targets, g, classes):
    """fp64 per-row NLL (N,), dh (N, d) and dW[classes] of sum(g * nll), REF_ROWS rows x
    REF_CLASSES classes at a time: an online logsumexp, then the softmax gradient."""
    n, n_classes = h.shape[0], weight.shape[0]
    rows, dh = torch.zeros(n, dtype=torch.float64, device="cuda"), torch.zeros(h.shape, dtype=torch.float64, device="cuda")
    dw = torch.zeros(classes.numel(), h.shape[1], dtype=torch.float64, device="cuda")
    valid = targets != IGNORE
    for r in range(0, n, REF_ROWS):
        h64, tgt, gr = h[r:r + REF_ROWS].double(), targets[r:r + REF_ROWS], g[r:r + REF_ROWS].double()
        blocks = [(v, weight[v:v + REF_CLASSES].double()) for v in range(0, n_classes, REF_CLASSES)]
        lse = torch.stack([(h64 @ w.T).logsumexp(1) for _, w in blocks]).logsumexp(0)  # (R,)
        scale = torch.where(valid[r:r + REF_ROWS], gr, 0.0)[:, None]
        for v, w in blocks:
            logits = h64 @ w.T  # (R, C)
            is_target = (tgt[:, None] == torch.arange(v, v + w.shape[0], device="cuda")[None, :])
            rows[r:r + REF_ROWS] -= torch.where(is_target, logits, 0.0).sum(1)
            dlogits = scale * ((logits - lse[:, None]).exp() - is_target.double())
            dh[r:r + REF_ROWS] += dlogits @ w
            inside = (classes >= v) & (classes < v + w.shape[0])
            dw[inside] += dlogits[:, classes[inside] - v].T @ h64
        rows[r:r + REF_ROWS] = torch.where(valid[r:r + REF_ROWS], rows[r:r + REF_ROWS] + lse, 0.0)
    return [rows, dh, dw]


def chunked_rows_and_grads(h, weight, targets, g, dtype, classes):
    """PyTorch's own in ``dtype`` (16-bit: cross_entropy in fp32, as autocast runs it),
    REF_ROWS rows at a time: per-row NLL (N,), dh and dW[classes] of sum(g * nll), as fp64."""
    h, weight = (t.detach().to(dtype).requires_grad_() for t in (h, weight))
    rows = []
    for i in range(0, h.shape[0], REF_ROWS):
        logits = (h[i:i + REF_ROWS] @ weight.T).to(torch.promote_types(dtype, torch.float32))
        nll = F.cross_entropy(logits, targets[i:i + REF_ROWS], ignore_index=IGNORE, reduction="none")
        (nll * g[i:i + REF_ROWS]).sum().backward()
        rows.append(nll.detach())
    return [torch.cat(rows).double(), h.grad.double(), weight.grad[classes].double()]


@pytest.mark.parametrize("case", list(OFFSET_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_ce_past_int32_offsets(backend, case, monkeypatch):
    """Flat offsets past 2**31 in bf16, into one chunk's logits or into W and dW: per-row
    losses and both gradients against fp64, at most 2x as wrong as PyTorch's own bf16 (an int32
    offset wraps or faults on the rows past the boundary)."""
    n, d, v, chunk_bytes = OFFSET_CASES[case]
    if chunk_bytes is not None:
        monkeypatch.setattr(weighted_ce, "CUDA_CHUNK_BYTES", chunk_bytes)
    hs, weight, targets = inputs(torch.bfloat16, n=n, d=d, v=v)
    assert (n if case == "logits" else d) * v > 2**31
    targets[-1] = v - 1  # the very last logit is a target
    g, classes = torch.linspace(0.5, 3.0, n, device="cuda"), checked_classes(v)
    leaves = [t.detach().clone().requires_grad_() for t in (hs[0], weight)]
    rows = weighted_linear_cross_entropy([leaves[0]], leaves[1], targets, (1.0,), reduction="none",
                                         backend=backend).reshape(-1)
    dh, dw = torch.autograd.grad((rows * g).sum(), leaves)
    if case == "weight":  # every class past the boundary got its softmax gradient
        assert dw[2**31 // d:].abs().amax(1).gt(0).all()
    ours = [rows.detach().double(), dh.double(), dw[classes].double()]
    del leaves, dw
    exact = blockwise_exact(hs[0], weight, targets, g, classes)
    same_dtype = chunked_rows_and_grads(hs[0], weight, targets, g, torch.bfloat16, classes)
    for name, a, r, p in zip(("rows", "dh", "dW"), ours, exact, same_dtype):
        bound = 2 * rel_err(p, r) + 1e-3
        assert torch.isfinite(a).all() and rel_err(a, r) <= bound, f"{name}: {rel_err(a, r):.3g} > {bound:.3g}"
    if case == "logits":  # the rows past the boundary were scored
        past = (torch.arange(n, device="cuda") * v >= 2**31) & (targets != IGNORE)
        assert past.sum() > 100 and (ours[0][past] > 0).all()


# ----------------------------------------------------------------------------- host syncs in training
SYNC_VOCAB, SYNC_LAYERS = 5003, 4
SYNC_METHODS = {
    "asymmetric": dict(weights={2: 0.7, 4: 0.3}),
    "distill": dict(weights={2: 0.5, 4: 0.5}, distill_weight=0.5),
    "layer_dropout": dict(weights={2: 0.5, 4: 0.5}, layer_dropout=LayerDropout(0.5, "linear")),
    "learned_confidence": dict(weights={2: 0.5, 4: 0.5}, exit_layers=[2], routing_thresholds=[0.9],
                               confidence="learned", confidence_loss_weight=1.0),
}


def tiny_model(dtype=torch.float32, **kw) -> EarlyExitTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(SYNC_VOCAB, n_layers=SYNC_LAYERS, d_model=256, n_heads=4, max_seq_len=128, **kw)
    return EarlyExitTransformer(cfg).to("cuda", dtype)


@NEEDS_TRITON
@pytest.mark.parametrize("method", list(SYNC_METHODS))
def test_training_step_never_syncs_with_the_host(method):
    """What fit() runs per step between its log line's one sync: loss, backward, clipping,
    fused AdamW. A first step outside the check builds the optimizer state and compiles."""
    kw = dict(SYNC_METHODS[method])
    model, weights = tiny_model(), kw.pop("weights")
    trainer = UniversalTrainer(UniversalConfig(weights, **kw), SYNC_VOCAB, device="cuda", backend="triton")
    optimizer = trainer.create_optimizer(model, 1e-3)
    x, y = torch.randint(0, SYNC_VOCAB, (2, 8, 128), device="cuda")
    drops = trainer.layer_drops(SYNC_LAYERS, x.shape[0]) if kw.get("layer_dropout") else None

    def step():
        loss = trainer.compute_loss(model, x, y, drops)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


# ----------------------------------------------------------------------------- routed evaluation
@NEEDS_TRITON
@pytest.mark.parametrize("exits", [[1], [1, 2, 3]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_matches_exact_on_gpu(dtype, exits):
    """Compact mode on CUDA routes like exact mode: a token that leaves at exit e gets exit e's
    prediction and NLL in both (tokens running on see states that differ only through the keys
    of tokens that left, so only exits and the first exit's results are compared exactly)."""
    model = tiny_model(dtype, tie_embeddings=False).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # spreads random-init confidences over (0, 1)
    idx, targets = torch.randint(0, SYNC_VOCAB, (2, 4, 128), device="cuda")
    conf = exact_routed_forward(model, idx, exits[0], 0.0).conf.flatten().float().sort().values  # the first exit's
    middle = conf.numel() // 2  # halfway between two confidences: no token sits on the threshold
    thresholds = [float(conf[middle - 1:middle + 1].mean())] * len(exits)
    compact = compact_routed_forward(model, idx, exits, thresholds, targets, backend="triton")
    exact = exact_routed_forward(model, idx, exits, thresholds, targets, backend="triton")
    first = exact.layers_run == exits[0]  # decided before any token has left: the same in both modes
    assert 0 < first.float().mean() < 1
    assert torch.equal(compact.layers_run == exits[0], first)
    assert torch.equal(compact.pred[first], exact.pred[first])
    assert torch.allclose(compact.nll[first], exact.nll[first], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- in-place dW, devices, compile
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_accumulate_dw_in_place_on_gpu(dtype):
    """The fused loss's dW update on this torch: the out_dtype addmm where the probe finds it
    (then dW is updated in place: the same tensor comes back), the sliced fallback elsewhere;
    fp32 sums of 16-bit products against fp64 either way."""
    forms = gemm.out_dtype_forms("cuda", dtype)
    chunks = [(torch.randn(r, 5003, device="cuda").to(dtype), torch.randn(r, 256, device="cuda").to(dtype))
              for r in (700, 1024, 33)]  # (R, V), (R, d)
    dw = None
    for dlogits, x in chunks:
        before = dw
        dw = gemm.accumulate_dw(dw, dlogits, x)
        assert before is None or dw.data_ptr() == before.data_ptr()
    exact = sum(dl.double().T @ x.double() for dl, x in chunks)
    assert dw.dtype == torch.float32 and rel_err(dw.double(), exact) <= 1e-5
    print(f"out_dtype forms for {dtype}: {forms}")  # the check's log records what this torch has


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_on_a_second_gpu(backend):
    """Tensors on cuda:1 while cuda:0 is current: every launch runs on cuda:1 (the device guard),
    with the results of the same call on cuda:0."""
    hs, weight, targets = inputs(torch.bfloat16)
    on = lambda device: value_and_grads(lambda h, w, y: weighted_linear_cross_entropy(  # noqa: E731
        h, w, y, HEAD_WEIGHTS, backend=backend), [h.to(device) for h in hs], weight.to(device), targets.to(device))
    with torch.cuda.device(0):
        first, second = on("cuda:0"), on("cuda:1")
        stats = exit_confidence(hs[0].to("cuda:1"), weight.to("cuda:1"), targets.to("cuda:1"), backend=backend)
    for a, b in zip(first, second):
        assert b.device == torch.device("cuda:1") and torch.allclose(a, b.to("cuda:0"), rtol=1e-5, atol=1e-6)
    assert stats.conf.device == torch.device("cuda:1")


@NEEDS_TRITON
def test_compiled_step_on_gpu():
    """torch.compile(fullgraph=True) of a bf16 step calling the fused loss (the default backend)
    and exit_confidence: the same value and gradients as eager."""
    hs, weight, targets = inputs(torch.bfloat16)

    def step(h, w, y):
        loss = weighted_linear_cross_entropy([torch.tanh(x) for x in h], w, y, HEAD_WEIGHTS)
        return loss + exit_confidence(h[0].detach(), w.detach(), y).nll.sum() * 0

    eager = value_and_grads(step, hs, weight, targets)
    torch._dynamo.reset()
    compiled = value_and_grads(torch.compile(step, fullgraph=True), hs, weight, targets)
    for i, (a, b) in enumerate(zip(compiled, eager)):
        assert rel_err(a, b) <= 1e-2, f"tensor {i}: {rel_err(a, b):.3g}"  # tanh fused in bf16 rounds apart
