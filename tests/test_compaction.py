"""compact_indices / gather_rows / scatter_rows, both backends (Triton interpreted)."""
import pytest
import torch

from fastexit.kernels import HAS_TRITON, compact_indices, gather_rows, scatter_rows

NEEDS_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
BACKENDS = ["torch", pytest.param("triton", marks=NEEDS_TRITON)]


def reference_indices(mask):
    return torch.tensor([i for i, m in enumerate(mask.reshape(-1).tolist()) if m], dtype=torch.int64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,p", [(1, 1.0), (1023, 0.3), (1024, 0.5), (1025, 0.9), (5000, 0.05)])
def test_random_masks_ascending(backend, n, p):
    mask = torch.rand(n) < p
    idx = compact_indices(mask, backend=backend)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, reference_indices(mask))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill", [False, True])
def test_empty_and_full_masks(backend, fill):
    mask = torch.full((2051,), fill)
    idx = compact_indices(mask, backend=backend)
    assert torch.equal(idx, torch.arange(2051) if fill else torch.empty(0, dtype=torch.int64))
    assert compact_indices(mask[:0], backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nd_mask_is_read_flat(backend):
    mask = torch.rand(3, 7, 5) < 0.4
    x = torch.randn(3, 7, 5, 4)
    idx = compact_indices(mask, backend=backend)
    assert torch.equal(gather_rows(x.reshape(-1, 4), idx, backend=backend), x[mask])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_gather_scatter_round_trip(backend, dtype):
    n, mask = 301, torch.rand(301) < 0.6
    x = (torch.randn(n, 3, 129) * 100).to(dtype)  # row width over one column block
    idx = compact_indices(mask, backend=backend)
    dense = gather_rows(x, idx, backend=backend)
    assert torch.equal(dense, x[mask])  # order preserved
    out = (torch.randn(n, 3, 129) * 100).to(dtype)
    before = out.clone()
    result = scatter_rows(out, idx, dense + 1, backend=backend)
    assert result is out
    assert torch.equal(out[mask], x[mask] + 1) and torch.equal(out[~mask], before[~mask])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_index(backend):
    x, idx = torch.randn(5, 8), torch.empty(0, dtype=torch.int64)
    assert gather_rows(x, idx, backend=backend).shape == (0, 8)
    assert torch.equal(scatter_rows(x.clone(), idx, x[:0], backend=backend), x)


@NEEDS_TRITON
@pytest.mark.parametrize("backend", ["triton", "triton_gemm"])  # no GEMM here: 'triton_gemm' runs the Triton kernels
def test_backends_agree_on_a_large_mask(backend):
    mask = torch.rand(20_000) < 0.5
    idx = compact_indices(mask, backend=backend)
    assert torch.equal(idx, compact_indices(mask, backend="torch"))
    x = torch.randn(20_000, 3)
    assert torch.equal(gather_rows(x, idx, backend=backend), x[idx])


@pytest.mark.parametrize("call,error,name", [
    (lambda: compact_indices(torch.ones(4, dtype=torch.int64)), TypeError, "mask"),
    (lambda: compact_indices([True, False]), TypeError, "mask"),
    (lambda: gather_rows(torch.randn(4, 2), torch.tensor([0, 4])), ValueError, "idx"),
    (lambda: gather_rows(torch.randn(4, 2), torch.tensor([-1])), ValueError, "idx"),
    (lambda: gather_rows(torch.randn(4, 2), torch.tensor([[0]])), ValueError, "idx"),
    (lambda: gather_rows(torch.randn(4, 2), torch.tensor([0.0])), TypeError, "idx"),
    (lambda: gather_rows(torch.tensor(1.0), torch.tensor([0])), ValueError, "x"),
    (lambda: scatter_rows(torch.randn(4, 2), torch.tensor([1]), torch.randn(2, 2)), ValueError, "values"),
    (lambda: scatter_rows(torch.randn(4, 2), torch.tensor([1]), torch.randn(1, 2).double()), TypeError, "values"),
    (lambda: scatter_rows(torch.randn(4, 2), torch.tensor([5]), torch.randn(1, 2)), ValueError, "idx"),
])
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


@NEEDS_TRITON
def test_triton_scatter_needs_a_contiguous_out():
    with pytest.raises(ValueError, match="out"):
        scatter_rows(torch.randn(2, 4).t(), torch.tensor([1]), torch.randn(1, 2), backend="triton")
