"""Every Triton launch runs inside backend.device_guard of its tensors' device, and inputs on two
devices are a ValueError naming the argument.

Triton launches on the current CUDA device, so a launch on tensors of cuda:1 while cuda:0 is
current would run on the wrong GPU; the guard makes the tensors' device current. On CPU (the
interpreter) the guard is a no-op, so this file checks the structure: with device_guard
replaced by a recorder in every kernels module and each launch checked, every kernel of every
op must launch inside a guard entered for the device of the op's tensors.
(tests/test_cuda_kernels.py runs the ops on a second GPU where a machine has two.)
"""
import contextlib
import importlib
import math

import pytest
import torch

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from fastexit.kernels import compact_indices, exit_confidence, gather_rows, scatter_rows  # noqa: E402
from fastexit.kernels.weighted_ce import weighted_linear_cross_entropy  # noqa: E402

# the modules themselves (the package's attribute exit_confidence is the function)
MODULES = [importlib.import_module(f"fastexit.kernels.{name}") for name in ("weighted_ce", "exit_confidence",
                                                                             "compaction")]


@pytest.fixture
def launches(monkeypatch):
    """[(kernel name, device of the innermost guard or None)] of every launch."""
    guards, seen = [], []

    @contextlib.contextmanager
    def recording_guard(t):
        guards.append(t.device)
        try:
            yield
        finally:
            guards.pop()

    run = InterpretedFunction.run

    def checked_run(self, *args, **kwargs):
        seen.append((self.__name__, guards[-1] if guards else None))
        return run(self, *args, **kwargs)

    for module in MODULES:
        monkeypatch.setattr(module, "device_guard", recording_guard)
    monkeypatch.setattr(InterpretedFunction, "run", checked_run)
    return seen


def assert_guarded(seen, kernels):
    assert {name for name, _ in seen} >= set(kernels), f"launched {sorted({n for n, _ in seen})}"
    unguarded = sorted({name for name, device in seen if device != torch.device("cpu")})
    assert not unguarded, f"launched outside a device guard: {unguarded}"


@pytest.mark.parametrize("backend, kernels", [
    ("triton", ["_ce_rows_kernel"]),
    ("triton_gemm", ["_logits_kernel", "_ce_rows_kernel", "_dh_kernel", "_dw_kernel"]),
])
def test_weighted_ce_launches_are_guarded(launches, backend, kernels):
    hs = [torch.randn(19, 16, requires_grad=True) for _ in range(2)]
    weight = (torch.randn(37, 16) / math.sqrt(16)).requires_grad_()
    targets = torch.randint(0, 37, (19,))
    loss = weighted_linear_cross_entropy(hs, weight, targets, [0.6, 0.4], distill_weight=0.5, teacher=1,
                                         backend=backend)
    loss.backward()
    assert_guarded(launches, kernels)


def test_exit_confidence_and_compaction_launches_are_guarded(launches):
    hidden, weight = torch.randn(7, 16), torch.randn(37, 16)
    exit_confidence(hidden, weight, torch.randint(0, 37, (7,)), want_margin=True, backend="triton")
    idx = compact_indices(torch.rand(7) < 0.5, backend="triton")
    scatter_rows(torch.zeros_like(hidden), idx, gather_rows(hidden, idx, backend="triton"), backend="triton")
    assert_guarded(launches, ["_split_partials_kernel", "_combine_splits_kernel", "_block_count_kernel",
                              "_block_positions_kernel", "_copy_rows_kernel"])


@pytest.mark.parametrize("call, name", [
    (lambda: exit_confidence(torch.randn(4, 8), torch.randn(11, 8, device="meta")), "weight"),
    (lambda: exit_confidence(torch.randn(4, 8), torch.randn(11, 8), torch.zeros(4, dtype=torch.long,
                                                                                   device="meta")), "targets"),
    (lambda: gather_rows(torch.randn(4, 8), torch.zeros(2, dtype=torch.long, device="meta")), "idx"),
    (lambda: scatter_rows(torch.zeros(4, 8), torch.zeros(1, dtype=torch.long), torch.ones(1, 8, device="meta")),
     "values"),
])
def test_inputs_on_two_devices_name_the_argument(call, name):
    """A meta tensor stands for a second device: the error comes before any launch."""
    with pytest.raises(ValueError, match=name):
        call()
