"""Host-side input checks shared by the ops: every kernel launch is preceded by these, so no
user input can make a Triton kernel read out of bounds."""
import torch


def describe(x) -> str:
    return f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def check_target_range(targets: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """ValueError naming the first bad target on CPU (host sync); on CUDA an async device
    assert, so the hot path never waits for the host."""
    bad = ((targets < 0) | (targets >= n_classes)) & (targets != ignore_index)
    if targets.is_cuda:
        torch._assert_async(~bad.any(), f"targets must lie in [0, {n_classes}) or equal ignore_index")
    elif bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{i}] = {int(targets[i])} is outside [0, {n_classes}) "
                         f"and is not ignore_index={ignore_index}")
