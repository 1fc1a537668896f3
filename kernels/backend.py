"""Backend choice shared by every op: 'auto' | 'triton' | 'torch'."""
import os

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    HAS_TRITON = True
except ImportError:  # Triton is an optional extra: every op has a PyTorch path.
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map a user's backend name to 'triton' or 'torch' for these tensors.

    'auto' picks Triton when it imports and the tensors live on CUDA; 'triton' forces it
    (CPU tensors need TRITON_INTERPRET=1); 'torch' forces the PyTorch path.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if HAS_TRITON and on_cuda else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' needs the triton package: pip install 'fastexit[triton]'")
        if not on_cuda and not interpreting():
            raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    return backend
