"""Self-distillation inside weighted_linear_cross_entropy against an fp64 full-logits reference.

Every head k of weight w_k > 0 but the teacher adds w_k * lambda * T^2 * KL(softmax(z_t / T) ||
softmax(z_k / T)) to each non-ignored row's loss, the teacher's logits z_t detached (no
gradient to the teacher's hiddens nor, through z_t, to W). The Triton backend runs through
TRITON_INTERPRET=1, so its shapes stay tiny.
"""
import pytest
import torch
import torch.nn.functional as F

import fastexit.kernels.gemm as gemm
import fastexit.kernels.weighted_ce as weighted_ce
from fastexit.kernels.weighted_ce import weighted_linear_cross_entropy
from test_weighted_ce import (BACKENDS, FP32_TOL, IGNORE, NEEDS_TRITON, TORCH_CHUNK_BYTES, assert_matches,
                              loss_and_grads, make_inputs, sizes)

TEACHER_TENSOR = "tensor"  # a case's teacher: a head index, or this for a separate [N, d] tensor


@pytest.fixture(autouse=True)
def _small_torch_chunks(monkeypatch):
    monkeypatch.setattr(weighted_ce, "CHUNK_BYTES", TORCH_CHUNK_BYTES)


def reference(hs, weight, targets, head_weights, *, teacher, distill_weight, distill_temperature,
              reduction="mean", label_smoothing=0.0, z_loss=0.0):
    """sum_k w_k * (cross-entropy + z-loss + [k != teacher] lambda T^2 KL(p_t || p_k)) per valid
    row from fp64 logits, reduced like F.cross_entropy; the teacher's logits are detached."""
    valid, temp = targets != IGNORE, distill_temperature
    z_t = ((hs[teacher] if isinstance(teacher, int) else teacher).double() @ weight.double().T).detach()  # (N, V)
    teacher_head = teacher % len(hs) if isinstance(teacher, int) else None
    rows = []
    for k, (h, w) in enumerate(zip(hs, head_weights)):
        z = h.double() @ weight.double().T  # (N, V)
        row = F.cross_entropy(z, targets, ignore_index=IGNORE, reduction="none", label_smoothing=label_smoothing)
        row = row + z_loss * torch.where(valid, z.logsumexp(1) ** 2, 0.0)
        if k != teacher_head:
            kl = F.kl_div(F.log_softmax(z / temp, 1), F.log_softmax(z_t / temp, 1), reduction="none",
                          log_target=True).sum(1)  # KL(p_t || p_k)
            row = row + torch.where(valid, distill_weight * temp ** 2 * kl, 0.0)
        rows.append(w * row)
    rows = torch.stack(rows)  # (K, N)
    return {"none": rows, "sum": rows.sum(), "mean": rows.sum() / valid.sum().clamp(min=1)}[reduction]


def run_both(backend, hs, weight, targets, head_weights, teacher, seed, inputs=None, **kw):
    """(ours, reference) loss_and_grads; `inputs` (hs, teacher) are what ours sees, if not the same."""
    ours_hs, ours_teacher = inputs or (hs, teacher)
    ours = loss_and_grads(lambda h, w, y: weighted_linear_cross_entropy(
        h, w, y, head_weights, teacher=ours_teacher, backend=backend, **kw), ours_hs, weight, targets, seed)
    ref = loss_and_grads(lambda h, w, y: reference(h, w, y, head_weights, teacher=teacher, **kw),
                         hs, weight, targets, seed)
    return ours, ref


# ----------------------------------------------------------------------------- correctness
CASES = {  # name: (head_weights, teacher, reduction, label_smoothing, z_loss, temperature)
    "last_head_teacher_mean": ((0.5, 0.0, 0.7), 2, "mean", 0.0, 0.0, 2.0),
    "middle_head_teacher_none": ((0.5, 0.3, 0.7), 1, "none", 0.0, 0.0, 1.0),
    "zero_weight_head_teacher_sum": ((0.6, 0.0, 0.4), 1, "sum", 0.0, 0.0, 0.5),
    "tensor_teacher_smoothing_z_mean": ((0.3, 0.7), TEACHER_TENSOR, "mean", 0.1, 1e-3, 3.0),
    "negative_index_smoothing_z_none": ((0.25, 0.5, 1.5), -1, "none", 0.2, 1e-2, 1.5),
    "tensor_teacher_sum": ((1.0, 0.0, 0.5), TEACHER_TENSOR, "sum", 0.0, 1e-3, 1.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, case):
    head_weights, teacher, reduction, smoothing, z_loss, temperature = CASES[case]
    n, d, n_classes = sizes(backend, 1000, 67)
    hs, weight, targets = make_inputs(len(head_weights), n, d, n_classes, ignore_every=5)
    teacher = torch.randn(n, d) if teacher == TEACHER_TENSOR else teacher
    ours, ref = run_both(backend, hs, weight, targets, head_weights, teacher, 21, reduction=reduction,
                         label_smoothing=smoothing, z_loss=z_loss, distill_weight=0.8, distill_temperature=temperature)
    assert_matches(ours, ref, FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_vocab_and_row_padding(monkeypatch, backend):
    """V = 1000 or 131 (no power of two, no multiple of 16), rows no multiple of a block. The Triton
    path's logits rows, the separate teacher's included, are padded: filled with NaN before
    every chunk, the padding reaches neither the loss nor any gradient."""
    if backend != "torch":  # both Triton paths keep their logits in _logits_buffer's padded rows
        new_buffer = weighted_ce._logits_buffer

        def poisoned(*args, **kwargs):
            logits = new_buffer(*args, **kwargs)  # (A, c, V) view of rows padded to stride(1)
            torch.as_strided(logits, (*logits.shape[:2], logits.stride(1)), logits.stride()).fill_(float("nan"))
            return logits
        monkeypatch.setattr(weighted_ce, "_logits_buffer", poisoned)
    n, d, n_classes = (21, 16, 131) if backend != "torch" else (203, 48, 1000)  # the interpreter is slow
    hs, weight, targets = make_inputs(2, n, d, n_classes, ignore_every=7)
    for teacher in (1, torch.randn(n, d)):
        ours, ref = run_both(backend, hs, weight, targets, [0.6, 0.4], teacher, 22, reduction="none",
                             label_smoothing=0.1, z_loss=1e-3, distill_weight=0.5, distill_temperature=2.0)
        assert_matches(ours, ref, FP32_TOL)


@pytest.mark.parametrize("backend, every_row", [("torch", False), ("torch", True),
                                                pytest.param("triton", False, marks=NEEDS_TRITON)])
def test_ignored_rows_are_never_read(monkeypatch, backend, every_row):
    """Ignored rows get no distillation and enter no GEMM: NaN in their hiddens, the teacher
    tensor's included, changes nothing. every_row: the PyTorch path as on CUDA, where it runs
    every row (skipping needs the live count on the host) and zeroes the ignored ones."""
    if every_row:
        monkeypatch.setattr(weighted_ce, "_kept_rows", lambda targets, ignore_index: None)
    n, d, n_classes = sizes(backend, 1000, 67)
    hs, weight, targets = make_inputs(2, n, d, n_classes)
    targets[torch.randperm(n)[: n // 3]] = IGNORE  # scattered, so live and ignored rows share chunks
    ignored = (targets == IGNORE).unsqueeze(1)
    poison = lambda t: t.masked_fill(ignored, float("nan"))  # noqa: E731
    for teacher in (0, torch.randn(n, d)):
        ours_teacher = teacher if isinstance(teacher, int) else poison(teacher)
        ours, ref = run_both(backend, hs, weight, targets, [0.6, 0.4], teacher, 23,
                             inputs=([poison(h) for h in hs], ours_teacher), reduction="none",
                             label_smoothing=0.1, z_loss=1e-3, distill_weight=1.0, distill_temperature=2.0)
        assert_matches(ours, ref, FP32_TOL)
        assert all(not g[targets == IGNORE].any() for g in ours[1][1:])  # dH of ignored rows is exactly 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_all_rows_ignored(backend, reduction):
    hs, weight, targets = make_inputs(2, 19, 16, 67)
    targets.fill_(IGNORE)
    leaves = [t.clone().requires_grad_() for t in (weight, *hs)]
    out = weighted_linear_cross_entropy(leaves[1:], leaves[0], targets, [0.7, 0.3], reduction=reduction,
                                        distill_weight=1.0, teacher=torch.randn(19, 16), backend=backend)
    grads = torch.autograd.grad(out.sum(), leaves)
    assert not out.any() and torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() and not g.any() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_equal_to_its_teacher_adds_nothing(backend):
    """KL(p || p) = 0 with zero gradient: a student whose hiddens are the teacher's gets the
    plain cross-entropy's value and gradients, at any temperature."""
    n, d, n_classes = sizes(backend, 1000, 67)
    hs, weight, targets = make_inputs(1, n, d, n_classes, ignore_every=4)
    plain = loss_and_grads(lambda h, w, y: weighted_linear_cross_entropy(h, w, y, [1.0], backend=backend),
                           hs, weight, targets, 24)
    distilled = loss_and_grads(lambda h, w, y: weighted_linear_cross_entropy(
        h, w, y, [1.0], distill_weight=2.0, distill_temperature=0.7, teacher=hs[0], backend=backend),
        hs, weight, targets, 24)
    assert_matches(distilled, plain, FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_distill_weight_zero_is_bit_identical(backend, reduction):
    """distill_weight = 0 (the default) takes the plain pass: a teacher and a temperature given
    with it are checked, then change no bit of the value or the gradients."""
    n, d, n_classes = (19, 16, 67) if backend != "torch" else (203, 48, 1000)  # the interpreter is slow
    hs, weight, targets = make_inputs(3, n, d, n_classes, ignore_every=4)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, backend=backend)
    runs = [loss_and_grads(lambda h, w, y: weighted_linear_cross_entropy(h, w, y, [0.7, 0.0, 0.3], **kw, **extra),
                           hs, weight, targets, 25)
            for extra in ({}, dict(distill_weight=0.0, teacher=2, distill_temperature=3.0),
                          dict(distill_weight=0.0, teacher=torch.randn(n, d)))]
    (value, grads), others = runs[0], runs[1:]
    for other_value, other_grads in others:
        assert torch.equal(other_value, value) and all(torch.equal(a, b) for a, b in zip(other_grads, grads))


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_tensor_gets_no_gradient(backend):
    """The teacher is detached: a teacher tensor that requires grad stays out of the graph, as
    teacher.detach() would (autograd.grad gives None with allow_unused, .grad stays None), and
    the other gradients equal those of passing teacher.detach()."""
    hs, weight, targets = make_inputs(2, 19, 16, 67, ignore_every=4)
    teacher = torch.randn(19, 16, requires_grad=True)
    leaves = [t.clone().requires_grad_() for t in (weight, *hs)]
    kw = dict(distill_weight=1.0, distill_temperature=2.0, backend=backend)
    out = weighted_linear_cross_entropy(leaves[1:], leaves[0], targets, [0.7, 0.3], teacher=teacher, **kw)
    *grads, teacher_grad = torch.autograd.grad(out, [*leaves, teacher], allow_unused=True, retain_graph=True)
    detached = weighted_linear_cross_entropy(leaves[1:], leaves[0], targets, [0.7, 0.3], teacher=teacher.detach(), **kw)
    assert teacher_grad is None
    assert torch.equal(out, detached)
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(detached, leaves)))
    out.backward()
    assert teacher.grad is None


@pytest.mark.parametrize("teacher", [1, TEACHER_TENSOR])
def test_at_most_one_extra_logits_gemm(monkeypatch, teacher):
    """Distillation from a running head reuses its logits (no GEMM more than the plain loss);
    a teacher tensor costs one logits GEMM: N * d * V multiply-adds, whatever the chunking."""
    products = []
    linear_fp32 = gemm.linear_fp32
    monkeypatch.setattr(gemm, "linear_fp32", lambda a, b: products.append(a.shape[0] * a.shape[1] * b.shape[0])
                        or linear_fp32(a, b))
    n, d, n_classes = 203, 48, 1000
    hs, weight, targets = make_inputs(2, n, d, n_classes)
    macs = []
    for kw in ({}, dict(distill_weight=1.0, teacher=torch.randn(n, d) if teacher == TEACHER_TENSOR else teacher)):
        products.clear()
        loss = weighted_linear_cross_entropy(hs, weight.requires_grad_(), targets, [0.5, 0.5], backend="torch", **kw)
        loss.backward()
        macs.append(sum(products))
    assert macs[1] - macs[0] == (n * d * n_classes if teacher == TEACHER_TENSOR else 0)


@NEEDS_TRITON
@pytest.mark.parametrize("teacher", [1, TEACHER_TENSOR])
@pytest.mark.parametrize("backend", ["triton", "triton_gemm"])
def test_triton_at_most_one_extra_logits_gemm(monkeypatch, teacher, backend):
    """The Triton paths' logits GEMM (torch's for 'triton', the Triton logits kernel for
    'triton_gemm'): one more GEMM of one head's rows per chunk for a teacher tensor, none for a
    teacher head."""
    rows = []
    if backend == "triton":
        mm_into = gemm.mm_into  # logits: (rows, d) @ (d, V); dH: (rows, V) @ (V, d)
        monkeypatch.setattr(gemm, "mm_into", lambda out, a, b: (rows.append(a.shape[0]) if b.shape[1] == 67 else None)
                            or mm_into(out, a, b))
    else:
        launch = weighted_ce._launch_logits
        monkeypatch.setattr(weighted_ce, "_launch_logits", lambda x, *args: rows.append(x.shape[0] * x.shape[1])
                            or launch(x, *args))
    hs, weight, targets = make_inputs(2, 19, 16, 67)
    counts = []
    for kw in ({}, dict(distill_weight=1.0, teacher=torch.randn(19, 16) if teacher == TEACHER_TENSOR else teacher)):
        rows.clear()
        weighted_linear_cross_entropy(hs, weight, targets, [0.5, 0.5], backend=backend, **kw)
        counts.append(sum(rows))
    assert counts[0] == 2 * 19  # both heads' rows, once
    assert counts[1] - counts[0] == (19 if teacher == TEACHER_TENSOR else 0)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, error, match", [
    (dict(distill_weight=-0.5, teacher=0), ValueError, "distill_weight"),
    (dict(distill_weight=float("nan"), teacher=0), ValueError, "distill_weight"),
    (dict(distill_weight=float("inf"), teacher=0), ValueError, "distill_weight"),
    (dict(distill_weight="0.5", teacher=0), TypeError, "distill_weight"),
    (dict(distill_weight=0.5, teacher=0, distill_temperature=0.0), ValueError, "distill_temperature"),
    (dict(distill_weight=0.5, teacher=0, distill_temperature=-1.0), ValueError, "distill_temperature"),
    (dict(distill_weight=0.5, teacher=0, distill_temperature=float("inf")), ValueError, "distill_temperature"),
    (dict(distill_weight=0.5, teacher=0, distill_temperature=None), TypeError, "distill_temperature"),
    (dict(distill_weight=0.5), ValueError, "teacher"),
    (dict(distill_weight=0.5, teacher=2), ValueError, "teacher"),
    (dict(distill_weight=0.5, teacher=-3), ValueError, "teacher"),
    (dict(distill_weight=0.0, teacher=2), ValueError, "teacher"),  # checked even when unused
    (dict(distill_weight=0.5, teacher=True), TypeError, "teacher"),
    (dict(distill_weight=0.5, teacher=1.0), TypeError, "teacher"),
    (dict(distill_weight=0.5, teacher=torch.randn(9, 7)), ValueError, "teacher"),
    (dict(distill_weight=0.5, teacher=torch.randn(8, 8)), ValueError, "teacher"),
    (dict(distill_weight=0.5, teacher=torch.randn(2, 9, 8)), ValueError, "teacher"),
    (dict(distill_weight=0.5, teacher=torch.randn(9, 8, dtype=torch.float64)), TypeError, "teacher"),
    (dict(distill_weight=0.5, teacher=torch.ones(9, 8, dtype=torch.long)), TypeError, "teacher"),
])
def test_bad_input_names_the_argument(kw, error, match):
    hs, weight, targets = make_inputs(2, 9, 8, 11)
    with pytest.raises(error, match=match):
        weighted_linear_cross_entropy(hs, weight, targets, (0.7, 0.3), **kw)
