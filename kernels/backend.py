"""Backend choice shared by every op: 'auto' | 'triton' | 'triton_gemm' | 'torch'; the device
guard around every Triton launch; the GPU generation that per-arch tile choices key on."""
import contextlib
import os

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    HAS_TRITON = True
except ImportError:  # Triton is an optional extra: every op has a PyTorch path.
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "triton_gemm", "torch")
TRITON_BACKENDS = ("triton", "triton_gemm")


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map a user's backend name to 'triton', 'triton_gemm' or 'torch' for these tensors.

    'auto' picks 'triton' when Triton imports and the tensors live on CUDA; 'triton' (vendor
    GEMMs around our Triton row kernel) and 'triton_gemm' (our own Triton GEMMs as well) force
    Triton (CPU tensors need TRITON_INTERPRET=1); 'torch' forces the PyTorch path. An op with
    no GEMM of its own to choose (exit_confidence, compaction) runs 'triton_gemm' as 'triton'.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if HAS_TRITON and on_cuda else "torch"
    if backend in TRITON_BACKENDS:
        if not HAS_TRITON:
            raise ValueError(f"backend={backend!r} needs the triton package: pip install 'fastexit[triton]'")
        if not on_cuda and not interpreting():
            raise ValueError(f"backend={backend!r} needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    return backend


def device_guard(t: torch.Tensor):
    """The context every Triton launch runs in: t's CUDA device made current, so that a launch
    on tensors of cuda:1 while cuda:0 is current runs on cuda:1 (Triton launches on the current
    device and its stream). A no-op for CPU tensors (the interpreter) and meta tensors."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def cuda_capability(device: torch.device) -> tuple:
    """(major, minor) compute capability of a CUDA device: what per-arch tile choices key on."""
    return tuple(torch.cuda.get_device_capability(device))


def has_small_shared_memory(capability: tuple) -> bool:
    """sm_86, sm_89 and sm_120 (consumer Ampere, Ada and Blackwell): ~99 KB of shared memory per
    block and mma.sync. Their fp32-operand GEMM tiles of 'triton_gemm' spill at 128 output
    rows where sm_80's do not (tests/test_aot_compile.py), and take 64."""
    return capability[0] == 12 or (capability[0] == 8 and capability[1] != 0)


def is_hopper(capability: tuple) -> bool:
    """sm_90: 128x128 tiles of exit_confidence's split kernel run as two warpgroups of wgmma
    with their accumulator and the online max/argmax in registers. Every other generation
    compiled ahead of time spills there (sm_80/86/89/120 run mma.sync; sm_100's tcgen05 leaves
    the tile in tensor memory, and loading it back for the reductions spills) and takes half
    the classes per tile (tests/test_aot_compile.py, docs/aot-large-shape.md)."""
    return capability[0] == 9


def fp32_matmul_is_tf32() -> bool:
    """Whether torch's own fp32 CUDA matmuls run as TF32: the matmul setting, falling back to the
    global ``torch.backends.fp32_precision`` when it is "none" (torch >= 2.9), else the older
    ``allow_tf32`` switch (reading that one raises once the newer setting has been used)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        return bool(matmul.allow_tf32)
    setting = matmul.fp32_precision
    if setting == "none":
        setting = getattr(torch.backends, "fp32_precision", "none")
    return setting == "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of every ``tl.dot`` in fastexit for operands of ``dtype``: fp32 follows
    torch's fp32 matmul setting ("tf32" or "ieee"); 16-bit operands are exact in either; the
    interpreter computes in IEEE."""
    if interpreting() or dtype != torch.float32:
        return "ieee"
    return "tf32" if fp32_matmul_is_tf32() else "ieee"


def autocast_inputs(*tensors):
    """The tensors cast to the autocast dtype where autocast is on for the first one's device,
    as ``F.linear`` would run them (anything but a 32- or 16-bit float tensor passes through);
    else unchanged.
    The fused ops call this on entry, so under ``torch.autocast`` their GEMMs run in 16 bits
    while fp32 parameters get fp32 gradients through the cast."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor):  # the op's own checks name the argument
        return tensors
    device_type = first.device.type  # meta tensors (the AOT compile check) have no autocast
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    eligible = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves fp64 alone
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in eligible else t for t in tensors)
