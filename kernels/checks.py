"""Host-side input checks shared by the ops: every kernel launch is preceded by these, so no
user input can make a Triton kernel read out of bounds.

One exception type per kind of bad input, in every op, and every message names the argument:
- TypeError: not a tensor, or the wrong dtype (hidden states or weight not floating point or
  not of one dtype, targets not int64/int32, idx not int64, mask not bool);
- ValueError: the wrong rank or shape, an empty batch, a device mismatch, values out of range.
"""
from typing import Optional

import torch


def describe(x) -> str:
    return f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {describe(x)}")


def check_dtype(name: str, x: torch.Tensor, *dtypes: torch.dtype) -> None:
    """x must be a tensor of one of `dtypes` (TypeError)."""
    check_tensor(name, x)
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(map(str, dtypes))}, got {x.dtype}")


def check_shape(name: str, x: torch.Tensor, shape: tuple) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def check_device(name: str, x: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """x must live on ref's device (ValueError); `what` names ref in the message."""
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device}, {what} on {ref.device}")


def check_same(name: str, x: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """x must have ref's dtype (TypeError) and device (ValueError); `what` names ref."""
    check_tensor(name, x)
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, expected {ref.dtype} (the dtype of {what})")
    check_device(name, x, ref, what)


def check_matrix(name: str, x, n_cols: Optional[int] = None) -> None:
    """x: a floating-point (TypeError) 2-D tensor with at least one row (ValueError), and
    n_cols columns (the model dim d) when given."""
    check_tensor(name, x)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.dim() != 2 or (n_cols is not None and x.shape[1] != n_cols):
        width = "" if n_cols is None else f" with {n_cols} columns (d)"
        raise ValueError(f"{name} must be a 2-D tensor{width}, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows)")


def check_targets(targets, n: int, ref: torch.Tensor, what: str) -> None:
    """targets: int64 (or int32) (TypeError) of shape [n] on ref's device (ValueError).
    Their range is check_target_range's: it reads the values, so ops run it last."""
    check_dtype("targets", targets, torch.int64, torch.int32)
    check_shape("targets", targets, (n,))
    check_device("targets", targets, ref, what)


def check_head_weights(head_weights, n_heads: int) -> None:
    """head_weights: a sequence of n_heads numbers or a 1-D tensor of them (ValueError for
    another rank); bools are flags, not weights (TypeError). Their count and values are checked
    where they are read."""
    if isinstance(head_weights, torch.Tensor):
        if head_weights.dtype == torch.bool:
            raise TypeError("head_weights must be numbers, got a bool tensor")
        if head_weights.dim() != 1:
            raise ValueError(f"head_weights must be a 1-D tensor of {n_heads} weights, got shape "
                             f"{tuple(head_weights.shape)}")
    elif any(isinstance(w, bool) or str(getattr(w, "dtype", "")) in ("bool", "torch.bool") for w in head_weights):
        raise TypeError(f"head_weights must be {n_heads} numbers, got {list(head_weights)!r}")


def check_in_range(name: str, values: torch.Tensor, ok: torch.Tensor, allowed: str) -> None:
    """ok (same shape as values, bool): True where a value is valid.

    CPU: ValueError naming the first bad entry (reading a CPU tensor is no sync). CUDA: an
    async device assert instead, so the hot path never waits for the host; it surfaces as a
    CUDA error at the next sync, before any kernel could have used the values.
    """
    if values.is_cuda:
        torch._assert_async(ok.all(), f"every entry of {name} must lie in {allowed}")
    elif not bool(ok.all()):
        i = int((~ok).reshape(-1).nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {values.reshape(-1)[i].item()} must lie in {allowed}")


def check_target_range(targets: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    ok = ((targets >= 0) & (targets < n_classes)) | (targets == ignore_index)
    check_in_range("targets", targets, ok, f"[0, {n_classes}) or equal ignore_index={ignore_index}")


def check_index(idx, n_rows: int, rows_name: str) -> None:
    """idx: 1-D int64 (TypeError for another dtype) with values in [0, n_rows) (ValueError)."""
    check_dtype("idx", idx, torch.int64)
    if idx.dim() != 1:
        raise ValueError(f"idx must be 1-D, got shape {tuple(idx.shape)}")
    check_in_range("idx", idx, (idx >= 0) & (idx < n_rows), f"[0, {n_rows}) ({rows_name}.shape[0])")
