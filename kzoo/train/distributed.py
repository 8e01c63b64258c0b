"""One process or many: the process group, the device, and the wrapped model.

``torchrun`` sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process and every
collective below is a no-op, so the loop has one code path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Context:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> Context:
    """Join the torchrun process group (NCCL on GPUs, Gloo on CPUs) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {kind!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
    chosen = torch.device(kind, local_rank) if kind == "cuda" else torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", device_id=chosen if kind == "cuda" else None)
    return Context(rank, local_rank, world_size, chosen)


def teardown(context: Context) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()


def all_sum(context: Context, values: list[float]) -> list[float]:
    """Element-wise sum of a few numbers over ranks (float64, so counts stay exact)."""
    if not context.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64,
                          device=context.device if context.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_sum_(context: Context, tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place, on its device: no host sync under NCCL."""
    if context.distributed:
        dist.all_reduce(tensor)
    return tensor


def wrap(model: nn.Module, context: Context, *, fsdp: bool) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard``) for models too big for one device.

    FSDP2 shards every entry of the model's ModuleLists (transformer blocks, stages) and then the
    root, so parameters are gathered one block at a time; the module keeps its class and its
    parameter names. Single-process runs get the model back unchanged.
    """
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():
            raise ValueError("--fsdp needs a torchrun launch (WORLD_SIZE > 1)")
        for module in model.modules():
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block)
        fully_shard(model)
        return model
    if context.distributed:
        # Non-persistent buffers (attention ranges, say) follow from the configuration and are equal
        # on every rank. DDP would broadcast them before each forward, which writes them in place:
        # that moves their version counters and makes the attention op re-plan at every step.
        persistent = set(model.state_dict())
        derived = [name for name, _ in model.named_buffers() if name not in persistent]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, derived)
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[context.local_rank] if context.device.type == "cuda" else None)
    return model
