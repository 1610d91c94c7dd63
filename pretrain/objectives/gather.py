"""All-gather across data-parallel ranks for the contrastive losses (a world of one returns its input)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, d) -> (world * B, d) with gradients flowing back to every rank's rows; also this rank's index."""
    rank, world = _world()
    if world == 1:
        return x, 0
    return torch.cat(dist_fn.all_gather(x), dim=0), rank


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, d) -> (world * B, d), no gradient (MoCo's keys come from the momentum encoder)."""
    rank, world = _world()
    if world == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0), rank
