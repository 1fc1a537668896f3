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
