"""Several processes under torchrun: who this process is, and FSDP2 over the model's body.

One process (no torchrun) is the default and changes nothing. Under `torchrun --nproc-per-node N`
every process runs the same loop:

- generation and judging are data-parallel: each rank takes every N-th batch of the plan into
  a shard file of its own, and the shards are merged in the plan's order, so the files equal a
  one-process run's;
- training shards the body of the policy (and of a frozen reference copy) with FSDP2
  (`fully_shard` per decoder layer, then the body), so gradients and optimizer states are split
  N ways. The LM head stays whole on every rank: the fused log-prob kernel needs the full
  [V, H] matrix for its rank's tokens; a trained head's gradient is averaged like DDP's;
- only rank 0 writes the run folder's shared files and prints progress.

Everything here is torch.distributed's own; the gloo backend runs it on CPUs (the tests do).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_world = World()


def world() -> World:
    """This process's place among the run's processes (one process: rank 0 of 1)."""
    return _world


def start_world() -> World:
    """Join the process group torchrun describes in the environment; without torchrun, a world of one."""
    global _world
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return _world
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # "cuda" then means this rank's card
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    _world = World(rank=rank, size=size, local_rank=local_rank)
    return _world


def stop_world() -> None:
    global _world
    if dist.is_initialized():
        dist.destroy_process_group()
    _world = World()


def barrier() -> None:
    if _world.distributed:
        dist.barrier()


def gather_lists(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (host objects: pickled)."""
    if not _world.distributed:
        return list(items)
    parts: list = [None] * _world.size
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def broadcast_value(value):
    """Rank 0's `value` on every rank."""
    if not _world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def collective_device() -> torch.device:
    """Where a tensor of our own must live for the process group to reduce it: NCCL reduces CUDA
    tensors only (a CPU one raises), gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (a stop signal that reached one process)."""
    if not _world.distributed:
        return flag
    value = torch.tensor([int(flag)], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def my_batches(count: int) -> list[int | None]:
    """This rank's batches of a plan of `count`, every N-th, one per round, None in a round where it
    has none left: every rank runs as many rounds as the others, so they can agree after each."""
    size, rank = _world.size, _world.rank
    return [i if (i := r * size + rank) < count else None for r in range(-(-count // size))]


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    if _world.distributed:
        dist.all_reduce(tensor)
    return tensor


# --------------------------------------------------------------------------- FSDP2


def model_body(model):
    """The decoder stack a causal LM runs before its head (through a peft wrapper if there is one)."""
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    return base.get_decoder()


def shard_model(model, *, frozen_whole: bool = False) -> None:
    """FSDP2 over the body: each decoder layer a unit, then the rest of the body; the head stays whole.

    The body is what `models.final_hidden_states` calls, so its hooks gather and free each
    layer's weights around that call (twice per micro-batch with a shared reference: once
    with gradient, once without). A head tied to the input embedding stays whole with it.
    `frozen_whole`: frozen parameters (a LoRA base) stay whole on every rank too, so only the
    trained ones are sharded and gathered.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    body = model_body(model)
    if not _world.distributed or isinstance(body, FSDPModule):  # one process, or sharded by an earlier stage step
        return
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(next(model.parameters()).device.type, (_world.size,))
    whole = set(model.get_output_embeddings().parameters())
    if frozen_whole:
        whole |= {p for p in model.parameters() if not p.requires_grad}
    layers = getattr(body, "layers", None)
    if layers is None:
        raise ValueError(f"{type(body).__name__} has no `layers`: FSDP2 sharding knows decoder stacks only")
    for layer in layers:
        if any(p not in whole for p in layer.parameters()):  # a layer with nothing to shard stays as it is
            fully_shard(layer, mesh=mesh, ignored_params=whole & set(layer.parameters()))
    fully_shard(body, mesh=mesh, ignored_params=whole)


def is_sharded(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (a collective: every rank calls it), else the tensor."""
    return param.full_tensor() if is_sharded(param) else param


def average_whole_gradients(params: list[torch.Tensor]) -> None:
    """The gradients of parameters FSDP does not shard (the head), averaged over ranks as FSDP averages its own."""
    if not _world.distributed:
        return
    for param in params:
        if param.grad is not None and not is_sharded(param):
            dist.all_reduce(param.grad)
            param.grad /= _world.size


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ over the global gradient, whether parameters are sharded, whole, or both.

    A sharded gradient's squares are summed over ranks; a whole one (identical on every rank
    once averaged) counts once.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not _world.distributed:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    sharded = [g.to_local() for g in grads if is_sharded(g)]
    whole = [g for g in grads if not is_sharded(g)]
    device = grads[0].device if grads else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for g in sharded:
        squares += g.float().pow(2).sum()
    dist.all_reduce(squares)
    for g in whole:
        squares += g.float().pow(2).sum()
    total = squares.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in sharded + whole:
        g.mul_(scale.to(g.dtype))
    return total
