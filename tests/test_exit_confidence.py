"""exit_confidence against softmax of full fp64 logits, both backends (Triton interpreted)."""
import importlib

import pytest
import torch

from fastexit.kernels import HAS_TRITON, ExitStats, exit_confidence, weighted_linear_cross_entropy

ec = importlib.import_module("fastexit.kernels.exit_confidence")  # the module, not the function

NEEDS_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
BACKENDS = ["torch", pytest.param("triton", marks=NEEDS_TRITON)]
# (N, d, V): odd V, N not a multiple of the row block; the Triton shapes stay tiny (interpreter)
CASES = [("torch", 37, 64, 1000), ("torch", 300, 48, 1003),
         pytest.param("triton", 19, 40, 77, marks=NEEDS_TRITON),
         pytest.param("triton", 33, 72, 130, marks=NEEDS_TRITON)]


def reference(hidden, weight, targets=None, ignore_index=-100):
    logits = hidden.double() @ weight.double().T  # (N, V)
    lse = logits.logsumexp(1)
    conf, pred = logits.softmax(1).max(1)
    if targets is None:
        return conf, pred, lse, None
    valid = targets != ignore_index
    nll = lse - logits.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    return conf, pred, lse, torch.where(valid, nll, 0.0)


def make(n, d, v, scale=0.5, dtype=torch.float32):
    hidden = torch.randn(n, d, dtype=dtype)
    weight = (torch.randn(v, d) * scale / d**0.5 * 8).to(dtype)  # logits of a few units
    targets = torch.randint(0, v, (n,))
    targets[::5] = -100
    return hidden, weight, targets


def assert_matches(stats, ref, atol=2e-5):
    conf, pred, lse, nll = ref
    assert stats.conf.dtype == stats.lse.dtype == torch.float32 and stats.pred.dtype == torch.int64
    torch.testing.assert_close(stats.conf.double(), conf, atol=atol, rtol=1e-5)
    torch.testing.assert_close(stats.lse.double(), lse, atol=atol, rtol=1e-5)
    assert torch.equal(stats.pred, pred)
    if nll is None:
        assert stats.nll is None
    else:
        torch.testing.assert_close(stats.nll.double(), nll, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("backend,n,d,v", CASES)
@pytest.mark.parametrize("with_targets", [True, False])
def test_matches_fp64_softmax(backend, n, d, v, with_targets):
    hidden, weight, targets = make(n, d, v)
    targets = targets if with_targets else None
    stats = exit_confidence(hidden, weight, targets, backend=backend)
    assert isinstance(stats, ExitStats)
    assert_matches(stats, reference(hidden, weight, targets))
    if with_targets:
        assert torch.all(stats.nll[::5] == 0)


def test_torch_path_chunks_rows(monkeypatch):
    monkeypatch.setattr(ec, "CHUNK_BYTES", 4 * 1000 * 7)  # 7 rows per chunk: many chunks, a ragged last one
    hidden, weight, targets = make(50, 32, 1000)
    assert_matches(exit_confidence(hidden, weight, targets, backend="torch"), reference(hidden, weight, targets))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_one_row(backend):
    hidden, weight, targets = make(1, 24, 77)
    targets[0] = 3
    stats = exit_confidence(hidden, weight, targets, ignore_index=3, backend=backend)
    assert stats.nll.shape == (1,) and stats.nll[0] == 0
    assert_matches(exit_confidence(hidden, weight, targets, ignore_index=-1, backend=backend),
                   reference(hidden, weight, targets, ignore_index=-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_very_confident_rows_stay_finite(backend):
    hidden, weight, targets = make(17, 32, 77, scale=300.0)  # logits in the thousands
    stats = exit_confidence(hidden, weight, targets, backend=backend)
    conf, pred, lse, nll = reference(hidden, weight, targets)
    assert torch.isfinite(stats.lse).all() and torch.isfinite(stats.nll).all()
    assert stats.conf.max() > 0.999
    torch.testing.assert_close(stats.conf.double(), conf, atol=1e-5, rtol=0)
    assert torch.equal(stats.pred, pred)
    torch.testing.assert_close(stats.lse.double(), lse, atol=2e-3, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_pick_the_first_class(backend):
    hidden, weight, _ = make(16, 32, 77)
    weight[3] = weight[70] = hidden[0] * 4  # class 70 lies in another vocabulary tile
    stats = exit_confidence(hidden, weight, backend=backend)
    assert stats.pred[0] == 3


def test_bf16_error_within_twice_pytorch_own():
    hidden, weight, targets = make(64, 64, 1000, dtype=torch.bfloat16)
    conf, _, lse, _ = reference(hidden, weight, targets)
    own = (hidden @ weight.T).float()  # PyTorch's own bf16 logits
    own_err = (own.logsumexp(1).double() - lse).abs().max()
    stats = exit_confidence(hidden, weight, targets, backend="torch")
    assert (stats.lse.double() - lse).abs().max() <= 2 * own_err + 1e-6
    own_conf_err = (own.softmax(1).max(1).values.double() - conf).abs().max()
    assert (stats.conf.double() - conf).abs().max() <= 2 * own_conf_err + 1e-6


BAD = [
    (lambda h, w, t: (h[0], w, t), ValueError, "hidden"),
    (lambda h, w, t: (h.long(), w, t), TypeError, "hidden"),
    (lambda h, w, t: ("not a tensor", w, t), TypeError, "hidden"),
    (lambda h, w, t: (h[:0], w, t[:0]), ValueError, "hidden"),
    (lambda h, w, t: (h, w[:, :-1], t), ValueError, "weight"),
    (lambda h, w, t: (h, w[:0], t), ValueError, "weight"),
    (lambda h, w, t: (h, w.double(), t), TypeError, "weight"),
    (lambda h, w, t: (h, w, t[:-1]), ValueError, "targets"),
    (lambda h, w, t: (h, w, t.float()), TypeError, "targets"),
    (lambda h, w, t: (h, w, t.clone().fill_(77)), ValueError, "targets"),
    (lambda h, w, t: (h, w, t.clone().fill_(-5)), ValueError, "targets"),
]


@pytest.mark.parametrize("mutate,error,name", BAD)
def test_bad_input_names_the_argument(mutate, error, name):
    with pytest.raises(error, match=name):
        exit_confidence(*mutate(*make(8, 16, 77)))


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        exit_confidence(*make(8, 16, 77), backend="cuda")


# one kind of bad input, one exception type, in both ops (kernels/checks.py)
SAME_KIND = {  # kind: (mutate (hidden, weight, targets), expected type, argument named)
    "hidden and weight dtypes differ": (lambda h, w, t: (h, w.double(), t), TypeError, "weight"),
    "hidden not floating point": (lambda h, w, t: (h.long(), w.long(), t), TypeError, "hidden"),
    "targets not integer": (lambda h, w, t: (h, w, t.float()), TypeError, "targets"),
    "targets of the wrong length": (lambda h, w, t: (h, w, t[:-1]), ValueError, "targets"),
    "weight of the wrong width": (lambda h, w, t: (h, w[:, :-1], t), ValueError, "weight"),
    "empty batch": (lambda h, w, t: (h[:0], w, t[:0]), ValueError, "hidden"),
    "target out of range": (lambda h, w, t: (h, w, t.clone().fill_(77)), ValueError, "targets"),
}


@pytest.mark.parametrize("kind", list(SAME_KIND))
def test_same_bad_input_same_exception_in_both_ops(kind):
    mutate, error, name = SAME_KIND[kind]
    hidden, weight, targets = mutate(*make(8, 16, 77))
    with pytest.raises(error, match=name):
        exit_confidence(hidden, weight, targets)
    with pytest.raises(error, match=name):
        weighted_linear_cross_entropy([hidden], weight, targets, [1.0])
