"""Collectives for the pruning state, on the device the process group communicates through.

NCCL reduces only CUDA tensors; gloo (the CPU tests) reduces tensors on any device it supports. Everything the
pruner averages across processes (gradients, Hessian-vector products, losses, mask gradients) therefore stays on
the model's device until it has been reduced, and :func:`all_reduce_mean` moves a stray host tensor to the
communication device rather than handing it to a backend that refuses it.

:func:`check_rank_agreement` turns a silent divergence into an error: every process must select the same units, or
the processes would train different networks under one DDP wrapper.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes in the default group (1 when torch.distributed is not initialized)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def communication_device(tensor: torch.Tensor) -> torch.device:
    """Where a collective on ``tensor`` must run: the current CUDA device under NCCL, the tensor's own otherwise."""
    if world_size() > 1 and dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def _reduce(tensor: torch.Tensor, op) -> None:
    device = communication_device(tensor)
    if device == tensor.device:
        dist.all_reduce(tensor, op=op)
        return
    moved = tensor.to(device)
    dist.all_reduce(moved, op=op)
    tensor.copy_(moved)


def all_reduce_mean(tensors: Sequence[torch.Tensor]) -> None:
    """Average tensors in place across processes (no-op in a single process)."""
    world = world_size()
    if world == 1:
        return
    for t in tensors:
        _reduce(t, dist.ReduceOp.SUM)
        t.div_(world)


def check_rank_agreement(values: Mapping[str, torch.Tensor], what: str, device=None) -> None:
    """Raise if the tensors in ``values`` differ between processes (no-op in a single process).

    One MIN and one MAX all-reduce of the concatenated values on ``device`` and a single read-back: cheap enough for
    every re-scoring, which is where a selection can diverge (a non-deterministic kernel, a rank that drew other
    scoring data).

    Parameters
    ----------
    values : mapping of str to torch.Tensor
        For example the selection per unit family.
    what : str
        Named in the error.
    device : torch.device, optional
        Where to reduce (default: the first tensor's device).
    """
    if world_size() == 1 or not values:
        return
    names = list(values)
    device = torch.device(device) if device is not None else next(iter(values.values())).device
    flat = torch.cat([values[n].detach().reshape(-1).to(device, torch.float64) for n in names])
    low, high = flat.clone(), flat.clone()
    _reduce(low, dist.ReduceOp.MIN)
    _reduce(high, dist.ReduceOp.MAX)
    differs = (low != high).cpu()
    if not bool(differs.any()):
        return
    bad, start = [], 0
    for n in names:
        size = values[n].numel()
        if bool(differs[start : start + size].any()):
            bad.append(n)
        start += size
    raise RuntimeError(
        f"The processes disagree on {what} ({len(bad)} of {len(names)} families differ, e.g. {bad[:3]}): they would "
        "train different networks. Every process must score the same units on the same data; check that the "
        "scoring data and every criterion option are the same on every process."
    )
