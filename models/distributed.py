"""Processes and devices: joining the ``torchrun`` process group, gathering per-rank state, per-rank RNG state."""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run initialized the process group and destroys it at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group that ``torchrun`` describes (nccl on CUDA, gloo on the CPU), or run alone."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device_arg).type
    except RuntimeError:
        raise ValueError(f"--device {device_arg!r} is not a device; give auto, cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device_arg}: CUDA is not available here; use --device cpu (or auto)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo()
    if dist.is_available() and dist.is_initialized():
        info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    elif world > 1:
        backend = "nccl" if device_arg.startswith("cuda") else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
        info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)
    device = torch.device(device_arg)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return info, device


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """``obj`` of every rank, in rank order (a one-item list when running alone)."""
    if info.world == 1:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def rng_state(device: torch.device) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def seed_rng(seed: int, rank: int, step: int) -> None:
    """Every random state of this process derived from ``(seed, rank, step)``: an elastic resume has no saved state
    for a new rank, so every rank starts from one of these."""
    derived = int.from_bytes(hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest(), "little")
    torch.manual_seed(derived)  # the CPU generator and every CUDA one
    random.seed(derived)


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


__all__ = ["DistInfo", "gather", "init_distributed", "rng_state", "seed_rng", "set_rng_state"]
