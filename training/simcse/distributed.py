"""Multi-process training helpers (torchrun + DistributedDataParallel), all no-ops in one process.

`gather_with_grad` is what makes in-batch negatives global: every process sees the embeddings of every
other process's examples as negatives. Its backward sums the gradient each process computed for a
slice and hands every process the gradient of its own slice, so the local rows receive the
contributions of all processes' losses. With DDP averaging parameter gradients, one step then equals a
single-process step on the global batch (tests/test_training_simcse_distributed.py checks loss and gradients).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str) -> DistEnv:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), else one process.

    CUDA processes use NCCL and the GPU of their LOCAL_RANK; CPU processes use gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not dist.is_initialized():
        return DistEnv(0, 1, torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
    env = DistEnv(dist.get_rank(), dist.get_world_size(), torch_device)
    log.info("process %d of %d on %s", env.rank, env.world_size, env.device)
    return env


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward: sum the gradients of all processes, keep this process's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)  # (world * rows, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # all_reduce + slice works on every backend (gloo has no reduce_scatter).
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows, dim) -> (world * rows, dim) in rank order, and the offset of this process's rows."""
    if not is_distributed():
        return tensor, 0
    return _GatherWithGrad.apply(tensor), dist.get_rank() * tensor.shape[0]


def mean_over_processes(value: float) -> float:
    """The mean of a scalar across processes (e.g. each process's loss on its share of the batch)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / dist.get_world_size()


def any_process(flag: bool) -> bool:
    """True on every process when it is true on any (a stop signal must stop all processes at one step)."""
    if not is_distributed():
        return flag
    return mean_over_processes(1.0 if flag else 0.0) > 0.0


def barrier() -> None:
    if is_distributed():
        dist.barrier()

