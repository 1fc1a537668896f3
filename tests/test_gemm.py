"""kernels/gemm.py: linear_fp32 (an fp32-result GEMM) and the differentiable linear (input dtype)
against fp64 F.linear."""
import pytest
import torch
import torch.nn.functional as F

import fastexit.kernels.gemm as gemm

FP32_TOL = 1e-5  # max abs error relative to the reference's max abs value


def rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("shape", [(37, 48), (3, 29, 48)])
def test_linear_value_and_grads(monkeypatch, onednn, shape):
    if not onednn:
        monkeypatch.setattr(gemm, "use_onednn", lambda t: False)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(70, 48, requires_grad=True)
    g = torch.randn(*shape[:-1], 70) + 2.5  # grad_output != 1
    y = gemm.linear(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = F.linear(x64, w64)
    rdx, rdw = torch.autograd.grad(y64, (x64, w64), g.double())
    assert y.shape == y64.shape and y.dtype == torch.float32
    for ours, ref in ((y, y64), (dx, rdx), (dw, rdw)):
        assert rel_err(ours, ref) <= FP32_TOL


def test_linear_only_weight_grad():
    x, w = torch.randn(5, 7, 16), torch.randn(9, 16, requires_grad=True)
    (dw,) = torch.autograd.grad(gemm.linear(x, w).square().sum(), (w,))
    w64 = w.detach().double().requires_grad_()
    (rdw,) = torch.autograd.grad(F.linear(x.double(), w64).square().sum(), (w64,))
    assert rel_err(dw, rdw) <= FP32_TOL


def test_linear_without_grad_and_other_dtypes():
    x, w = torch.randn(4, 6, 16), torch.randn(9, 16)
    with torch.no_grad():
        assert rel_err(gemm.linear(x, w), F.linear(x.double(), w.double())) <= FP32_TOL
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(gemm.linear(xb, wb), F.linear(xb, wb))  # not fp32: F.linear itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_linear_fp32_result_dtype(dtype):
    a, b = torch.randn(11, 24).to(dtype), torch.randn(13, 24).to(dtype)
    out = gemm.linear_fp32(a, b)
    assert out.dtype == gemm.acc_dtype(a)
    assert rel_err(out, a.double() @ b.double().T) <= FP32_TOL  # bf16 operands multiply exactly in fp32


# ----------------------------------------------------------------------------- the fused loss's GEMMs
def padded_out(rows, cols, pad=5):
    """(rows, cols) fp32 view of a NaN-filled (rows, cols + pad) buffer: a strided out=."""
    return torch.full((rows, cols + pad), float("nan"))[:, :cols]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mm_into_a_strided_view(dtype):
    a, b = torch.randn(13, 24).to(dtype), torch.randn(24, 29).to(dtype)
    out = padded_out(13, 29)
    result = gemm.mm_into(out, a, b)
    assert result.data_ptr() == out.data_ptr() and out.dtype == torch.float32
    assert rel_err(out, a.double() @ b.double()) <= FP32_TOL  # 16-bit products are exact in fp32
    assert torch.isnan(torch.as_strided(out, (13, 5), (34, 1), 29)).all()  # the padding is untouched


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_accumulate_dw_over_chunks(monkeypatch, dtype, onednn):
    """dW = sum over chunks of dlogits^T @ x in fp32: the first chunk stores it, the later ones
    add in place (the same tensor comes back), except oneDNN's fused add on CPU fp32. Where
    torch lacks the out_dtype addmm (here: every CPU build), 16-bit operands add slice by
    slice (DW_SLICE_ROWS made small so that the last slice is partial)."""
    if not onednn:
        monkeypatch.setattr(gemm, "use_onednn", lambda t: False)
    monkeypatch.setattr(gemm, "DW_SLICE_ROWS", 7)
    chunks = [(torch.randn(r, 31).to(dtype), torch.randn(r, 12).to(dtype)) for r in (9, 16, 3)]  # (R, V), (R, d)
    dw = None
    for dlogits, x in chunks:
        before = dw
        dw = gemm.accumulate_dw(dw, dlogits, x)
        in_place = before is None or dw.data_ptr() == before.data_ptr()
        assert in_place or (onednn and gemm.use_onednn(x))
    exact = sum(dl.double().T @ x.double() for dl, x in chunks)  # (V, d)
    assert dw.shape == (31, 12) and dw.dtype == torch.float32
    assert rel_err(dw, exact) <= FP32_TOL


def test_out_dtype_forms_are_probed_once_per_device_and_dtype():
    """The probe says a form is there exactly when it runs and is right (CPU builds of torch
    2.13 have neither for 16-bit operands), and answers later calls from its cache."""
    gemm.out_dtype_forms.cache_clear()
    a, b = torch.randn(4, 6).bfloat16(), torch.randn(6, 5).bfloat16()
    try:
        runs = torch.allclose(torch.mm(a, b, out_dtype=torch.float32), a.double() @ b.double(), atol=1e-4)
    except (RuntimeError, TypeError, NotImplementedError):
        runs = False
    assert gemm.out_dtype_forms("cpu", torch.bfloat16).mm == runs
    gemm.out_dtype_forms("cpu", torch.bfloat16)
    assert gemm.out_dtype_forms.cache_info().hits == 1
