"""Trees of tensors (dataclasses, lists, tuples, dicts): map, collect, pin and move them, and what a batch costs.

Every batch type and every layout of :mod:`mmload.layouts` is a dataclass of tensors with the
:class:`TensorBatch` mixin: ``pin_memory()`` (called by the DataLoader's pin thread), ``to(device,
non_blocking=...)``, ``tensors()`` and ``nbytes()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import torch


def can_pin_memory() -> bool:
    """Pinning needs an accelerator; on a CPU-only build ``Tensor.pin_memory()`` raises."""
    return torch.accelerator.is_available()


def map_leaves(obj: Any, fn: Callable[[Any], Any], leaf: type = torch.Tensor) -> Any:
    """Rebuild ``obj`` (dataclasses, lists, tuples, dicts) with ``fn`` applied to every ``leaf``, in field order."""
    if isinstance(obj, leaf):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: map_leaves(getattr(obj, f.name), fn, leaf) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, list | tuple):
        return type(obj)(map_leaves(x, fn, leaf) for x in obj)
    if isinstance(obj, dict):
        return {k: map_leaves(v, fn, leaf) for k, v in obj.items()}
    return obj


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Rebuild ``obj`` with ``fn`` applied to every tensor, in field order."""
    return map_leaves(obj, fn, torch.Tensor)


def collect_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor of ``obj`` in the order ``map_tensors`` visits them."""
    found: list[torch.Tensor] = []
    map_tensors(obj, found.append)
    return found


@dataclass(frozen=True)
class BatchStats:
    """What one batch costs to move and to compute.

    ``real_tokens`` and ``padded_tokens`` count text tokens; images are counted by ``images`` (every decoded image
    of a square batch has the same number of patch tokens).
    """

    samples: int
    images: int
    texts: int
    real_tokens: int  # text tokens that carry data
    padded_tokens: int  # text tokens that are padding
    bytes: int  # bytes to move host -> device
    tensors: int  # tensors to move, i.e. host -> device copies

    @property
    def padding_fraction(self) -> float:
        total = self.real_tokens + self.padded_tokens
        return self.padded_tokens / total if total else 0.0

    def __add__(self, other: BatchStats) -> BatchStats:
        return BatchStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


class TensorBatch:
    """Mixin for dataclasses of tensors: pinning, moving, accounting."""

    def pin_memory(self) -> Self:
        if not can_pin_memory():
            return self
        return map_tensors(self, torch.Tensor.pin_memory)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Self:
        return map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def tensors(self) -> list[torch.Tensor]:
        return collect_tensors(self)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
