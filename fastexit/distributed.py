"""The processes of a run: this one's device, seeds and log lines, and under torchrun DDP or
FSDP2 (docs/design.md §6).

``resolve_device``, ``seed_everything`` and ``log`` (stderr, rank 0 only) serve every command.
The same code runs as one process when torchrun did not start it: every function here is
then the identity (one rank, no collectives). Under torchrun, ``process_group`` joins the job
(nccl on CUDA, gloo on CPU) and ``wrap`` returns the module to train:

- ``ddp``: ``DistributedDataParallel``, a full replica of model and optimizer on every rank;
- ``fsdp``: FSDP2 (``fully_shard``) on every block and on the root, parameters, gradients and
  optimizer state sharded over the ranks.

Either way the loss runs inside the wrapper's forward (``ModelWithLoss``): under FSDP2 that
forward is the one place where ``lm_head.weight``, which the fused loss reads directly, is
unsharded (Liger-Kernel #332, torchtune #2800: outside it, it is a sharded DTensor).

Each rank trains on its rows of every global batch (``RankBatches``); the loss is the mean
over the scored tokens of the global batch (``global_token_mean``); evaluation splits its
batches over the ranks and sums its counts across them.
"""
import gc
import os
import random
import sys
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

# torch.distributed.{tensor,fsdp,checkpoint} are imported where used: together they cost
# about a second at start-up, which a single-process run need not pay.

PARALLEL_MODES = ("ddp", "fsdp")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
COMPUTE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # --compute-dtype; None = the parameters' own


# ---------------------------------------------------------------------- this process
def resolve_device(device: Optional[str]) -> torch.device:
    """'auto' (or None): cuda when available, else cpu; otherwise ``torch.device(device)``.
    ValueError naming ``--device`` when torch does not know it or this machine lacks it (cuda
    without a GPU or a CUDA build of torch, cuda:3 on a machine with two GPUs)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {device!r}") from None
    if resolved.type == "cpu":
        return resolved
    try:  # a device this machine lacks fails here, not deep inside a model's .to()
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError) as err:  # a CPU-only torch asserts "not compiled with CUDA"
        raise ValueError(f"--device {device}: not available on this machine "
                         f"({(str(err).strip().splitlines() or [type(err).__name__])[0]})") from None
    return resolved


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (model init, dropout)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def log(msg: str) -> None:
    """A line on stderr from rank 0 (or the only process)."""
    if is_main():
        print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ the launch
def resolve_parallel(parallel: Optional[str], env=os.environ) -> Optional[str]:
    """The parallel mode of this launch: None (one process) or 'ddp' / 'fsdp' under torchrun.

    ValueError naming ``--parallel`` for an unknown mode, for a mode without the environment
    torchrun sets, and for torchrun with several processes but no mode (each would train the
    whole run alone, into the same folder).
    """
    if parallel is not None and parallel not in PARALLEL_MODES:
        raise ValueError(f"--parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    missing = [k for k in TORCHRUN_ENV if k not in env]
    if parallel is not None and missing:
        raise ValueError(f"--parallel {parallel} needs the environment torchrun sets (missing {', '.join(missing)}); "
                         f"launch with: torchrun --nproc-per-node N -m fastexit.cli train --parallel {parallel} ...")
    if parallel is None and int(env.get("WORLD_SIZE", 1)) > 1:
        raise ValueError(f"torchrun started {env['WORLD_SIZE']} processes but --parallel is not given: "
                         f"choose --parallel ddp or --parallel fsdp")
    return parallel


@contextmanager
def process_group(parallel: Optional[str], device: torch.device,
                  timeout: Optional[timedelta] = None) -> Iterator[torch.device]:
    """Join the torchrun job for the duration of the block; yields this rank's device.

    nccl on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on the CPU. Without ``parallel``:
    nothing to join, yields ``device``.
    """
    if parallel is None:
        yield device
        return
    if device.type == "cuda":
        if device.index is not None and int(os.environ["WORLD_SIZE"]) > 1:
            raise ValueError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; give --device cuda")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    try:
        yield device
        dist.barrier()  # gloo's barrier also waits for this rank's unfinished work: none is cut off below
    finally:
        # FSDP2 modules hold the group in reference cycles: freed now, its threads are joined
        # now, not cut off at interpreter exit (std::terminate, "SIGABRT").
        gc.collect()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes logs, metrics and tables."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def on_main(fn: Callable[[], None]) -> None:
    """``fn()`` on rank 0 alone (taking a run folder's lock, say); a ValueError or OSError it
    raises is raised on every rank, with its message, so that all ranks stop together rather
    than wait for rank 0 at the next collective."""
    error = None
    if is_main():
        try:
            fn()
        except (ValueError, OSError) as err:
            error = err
    if world_size() > 1:
        message = [None if error is None else str(error)]
        dist.broadcast_object_list(message, src=0)
        if error is None and message[0] is not None:
            raise ValueError(message[0])
    if error is not None:
        raise error


@contextmanager
def local_rank_zero_first():
    """Local rank 0 of every node runs the block first (e.g. building the data cache), the
    other ranks after it has finished."""
    first = world_size() == 1 or int(os.environ.get("LOCAL_RANK", 0)) == 0
    if not first:
        barrier()
    try:
        yield
    finally:  # should the first rank fail, the others go on (and fail on their own) rather than wait
        if first:
            barrier()


# ---------------------------------------------------------------------- the model
class ModelWithLoss(nn.Module):
    """The model and a loss as one module: ``forward(loss_fn, *args)`` returns
    ``loss_fn(model, *args)``, so the loss runs inside the forward DDP and FSDP2 wrap (FSDP2
    unshards the root's parameters, ``lm_head.weight`` among them, only there)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, loss_fn, *args, **kwargs):
        return loss_fn(self.model, *args, **kwargs)


def wrap(model: nn.Module, parallel: Optional[str], *, compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The module to train: ``model`` itself in one process, else ``ModelWithLoss(model)``
    under DDP, or under FSDP2 with every block and the root sharded (``model``'s parameters
    become DTensor shards in place; build the optimizer on them afterwards).

    ``compute_dtype`` (FSDP2 only; elsewhere ``UniversalTrainer(compute_dtype=)`` autocasts):
    compute in this dtype (e.g. bf16) with fp32 parameters and fp32 gradient reduction
    (``MixedPrecisionPolicy``).
    """
    if compute_dtype is not None and parallel != "fsdp":
        raise ValueError(f"--compute-dtype {str(compute_dtype).removeprefix('torch.')} needs --parallel fsdp "
                         "(FSDP2's MixedPrecisionPolicy)")
    if parallel is None:
        return model
    device = next(model.parameters()).device
    if parallel == "ddp":
        # Layers with loss weight 0 (and their exit norms) get no gradient: DDP must look for them.
        return DistributedDataParallel(ModelWithLoss(model), device_ids=[device] if device.type == "cuda" else None,
                                       find_unused_parameters=True, gradient_as_bucket_view=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The root holds embeddings, exit norms and the head: a tied head and embedding stay one parameter.
    return fully_shard(ModelWithLoss(model), mesh=mesh, mp_policy=policy)


def is_wrapped(model: nn.Module) -> bool:
    """True for what ``wrap`` returns under DDP or FSDP2: its loss must run inside its forward."""
    return isinstance(model, (DistributedDataParallel, ModelWithLoss))


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside what ``wrap`` returned (under FSDP2 its parameters are shards)."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return model.model if isinstance(model, ModelWithLoss) else model


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 shard); no tensor is one before anything imported
    torch.distributed.tensor, so this check does not import it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def is_sharded(model: nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def check_unsharded(weight: torch.Tensor, name: str = "lm_head.weight") -> None:
    if is_dtensor(weight):
        raise ValueError(f"{name} is an FSDP2 shard (DTensor) here: call compute_loss with the module "
                         "distributed.wrap returned, whose forward runs the loss on the unsharded head")


def evaluation_model(model: nn.Module) -> nn.Module:
    """The plain model to evaluate: the one inside a DDP wrapper, or under FSDP2 a full copy
    of the weights on every rank (routing calls ``Block.kv`` / ``forward_rows``, which FSDP2
    does not hook). Every rank must call it under FSDP2: gathering the weights is collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    model = unwrap(model)
    if not is_sharded(model):
        return model
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    with torch.device("meta"):
        copy = type(model)(model.cfg)
        if hasattr(model, "confidence_heads"):  # learned confidence: the copy needs its heads' slots
            copy.add_confidence_heads([int(layer) for layer in model.confidence_heads])
    copy.load_state_dict(state, assign=True)
    if model.cfg.tie_embeddings:
        copy.lm_head.weight = copy.tok_emb.weight
    return copy


def shard_like_params(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A full optimizer ``state_dict()`` (as one process saves it) with every per-parameter
    tensor distributed like its parameter (FSDP2 shards), for ``optimizer.load_state_dict``.
    The optimizer must list its parameters in the saved order (``create_optimizer`` does)."""
    from torch.distributed.tensor import distribute_tensor
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def place(value, param):
        if is_dtensor(param) and isinstance(value, torch.Tensor) and value.shape == param.shape:
            return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
        return value

    per_param = {i: {k: place(v, params[i]) for k, v in s.items()} for i, s in state["state"].items()}
    return dict(state, state=per_param)


# ------------------------------------------------------------------ the arithmetic
def global_token_mean(total: torch.Tensor, y: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``total * world_size / n_global``: this rank's share of the mean over the global
    batch's scored tokens, times world_size; DDP's and FSDP2's gradient averaging (a division
    by world_size) complete it, wherever the ignored tokens fall.

    total: () this rank's summed loss; y: this rank's targets (B_local, T). n_global is
    all-reduced (clamped to 1: an all-ignored batch gives 0, never NaN).
    """
    n = (y != ignore_index).sum()
    if world_size() > 1:
        dist.all_reduce(n)
    return total * (world_size() / n.clamp(min=1).to(total.dtype))


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world_size()


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value


def max_over_ranks(value: float, device: torch.device) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``nn.utils.clip_grad_norm_`` that also takes FSDP2's sharded gradients: the norm of
    DTensor shards is reduced over the ranks (a DDP gradient is already the same everywhere)."""
    params = [p for p in parameters if p.grad is not None]
    total = nn.utils.get_total_norm([p.grad for p in params])
    if is_dtensor(total):
        total = total.full_tensor()
    nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# ----------------------------------------------------------------------- the data
def this_ranks_share(items: Sequence) -> List:
    """Every world_size-th item, from this rank's index: evaluation batches split over ranks."""
    return list(items)[rank()::world_size()]


def rank_rows(batch_size: int) -> slice:
    """This rank's rows of a global batch of ``batch_size`` rows: [rank * b, (rank + 1) * b),
    b = batch_size / world_size (anything drawn per row of the global batch, e.g. layer
    dropout, keeps these rows)."""
    if batch_size % world_size():
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world_size()} processes "
                         "(WORLD_SIZE): every rank trains on batch_size / WORLD_SIZE rows")
    local = batch_size // world_size()
    return slice(rank() * local, (rank() + 1) * local)


class RankBatches:
    """This rank's rows (``rank_rows``) of every global (B, T) batch of ``stream``, moved to
    ``device``.

    ``stream`` (e.g. ``data.RandomBatches`` on the host) yields the global batches a single
    process would train on, so the union over ranks is the same global batch for any world
    size, and its ``state_dict`` (the step) resumes with any world size.
    """

    def __init__(self, stream, batch_size: int, device):
        self.stream, self.device, self.rows = stream, torch.device(device), rank_rows(batch_size)

    def __iter__(self):
        return self

    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return tuple(self._to_device(t[self.rows]) for t in next(self.stream))

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.contiguous().pin_memory().to(self.device, non_blocking=True)
        return t.contiguous().to(self.device)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
