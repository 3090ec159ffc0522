"""One-copy transfer: every tensor of a batch packed into one contiguous byte buffer.

NOTE [one copy]: a padded mixed batch has 5-10 tensors, a per-sample batch several per sample. Each
``.to(device)`` is one ``cudaMemcpyAsync`` with its own launch and latency, and small copies run far
below the link's bandwidth. Packing all fields into one (pinnable) uint8 buffer with an offset table turns
that into a single copy; on the device every field is a view of the one buffer, so nothing is copied twice.
Offsets are aligned so that each view can be reinterpreted as its dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from mmload.batch import Batch
from mmload.layouts import PATCH_SIZE, ModelInput
from mmload.tensors import BatchStats, can_pin_memory, collect_tensors, map_leaves, map_tensors, to_arguments

ALIGN = 64  # bytes; a multiple of every dtype's size and of a cache line


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives in the packed buffer."""

    index: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int


@dataclass(repr=False)  # TensorBatch.__repr__: shapes, not values
class PackedBatch(Batch):
    """A batch whose tensors share one uint8 buffer; ``to(device)`` gives back the batch with views on the device.

    It is a batch like the others: ``stats()``, ``unbatch()``, ``keys`` and ``model_input()`` (host views) work on
    it directly.
    """

    buffer: torch.Tensor  # uint8 (nbytes,)
    template: Any  # the original batch with every tensor replaced by its Slot

    def pin_memory(self) -> PackedBatch:
        if not can_pin_memory():
            return self
        return PackedBatch(self.buffer.pin_memory(), self.template)

    def to(self, *args: Any, non_blocking: bool = False, **kwargs: Any) -> Any:
        """The batch on ``device`` in one copy of the buffer; a dtype then casts its floating-point tensors."""
        device, dtype = to_arguments(args, kwargs)
        batch = unpack(self.buffer.to(device, non_blocking=non_blocking) if device is not None else self.buffer,
                       self.template)
        return batch if dtype is None else batch.to(dtype)

    def __repr__(self) -> str:
        return f"PackedBatch({self.buffer.numel()} bytes in one buffer, of {self.unpack()!r})"

    def unpack(self) -> Any:
        """The batch with host views on the buffer (no copy)."""
        return unpack(self.buffer, self.template)

    def stats(self, patch_size: int = PATCH_SIZE) -> BatchStats:
        """The unpacked batch's tokens and padding (read off host views, no copy); bytes and tensors are the
        packing's: one buffer."""
        return dataclasses.replace(self.unpack().stats(patch_size), bytes=self.buffer.numel(), tensors=1)

    def unbatch(self) -> list:
        return self.unpack().unbatch()

    def model_input(self) -> ModelInput:
        return self.unpack().model_input()

    def tensors(self) -> list[torch.Tensor]:
        return [self.buffer]

    @property
    def keys(self) -> list[str]:
        return self.template.keys


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pack(batch: Any) -> PackedBatch:
    """Copy every tensor of ``batch`` into one contiguous uint8 buffer (pinned later by ``pin_memory()``)."""
    tensors = collect_tensors(batch)
    slots, offset = [], 0
    for i, t in enumerate(tensors):
        slots.append(Slot(i, t.dtype, tuple(t.shape), offset))
        offset += _aligned(t.numel() * t.element_size())
    # Allocating pinned here (in the worker) would pin twice; the DataLoader's pin thread pins the one buffer.
    buffer = torch.empty(max(offset, ALIGN), dtype=torch.uint8)
    for t, slot in zip(tensors, slots):
        nbytes = t.numel() * t.element_size()
        if nbytes:
            buffer[slot.offset:slot.offset + nbytes].copy_(t.contiguous().reshape(-1).view(torch.uint8))
    it = iter(slots)
    template = map_tensors(batch, lambda _t: next(it))
    return PackedBatch(buffer, template)


def _view(buffer: torch.Tensor, slot: Slot) -> torch.Tensor:
    nbytes = slot.dtype.itemsize
    for d in slot.shape:
        nbytes *= d
    return buffer[slot.offset:slot.offset + nbytes].view(slot.dtype).view(slot.shape)


def unpack(buffer: torch.Tensor, template: Any) -> Any:
    """The batch of ``template`` with every Slot replaced by a view of ``buffer``."""
    return map_leaves(template, lambda slot: _view(buffer, slot), Slot)
