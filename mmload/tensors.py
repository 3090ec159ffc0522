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


def to_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, torch.dtype | None]:
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    if kwargs:
        raise TypeError(f"to() got unexpected keywords {sorted(kwargs)}")
    for arg in args:
        if isinstance(arg, torch.dtype):
            dtype = arg
        elif isinstance(arg, torch.device | str | int):
            device = arg
        else:
            raise TypeError(f"to() takes a device and/or a dtype, got {type(arg).__name__}")
    return device, dtype


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        where = "" if value.device.type == "cpu" else f" {value.device}"
        if value.is_nested:
            return f"nested {value.size(0)} rows {dtype}{where}"
        return f"{'x'.join(map(str, value.shape)) or 'scalar'} {dtype}{where}"
    if isinstance(value, list | tuple):
        kinds = sorted({type(v).__name__ for v in value})
        return f"[{len(value)} {'/'.join(kinds)}]" if value else "[]"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return repr(value)
    text = repr(value)
    return text if len(text) <= 40 else type(value).__name__


@dataclass(frozen=True)
class BatchStats:
    """What one batch costs to move and to compute.

    ``real_tokens`` and ``padded_tokens`` count text tokens; ``image_tokens`` and ``padded_image_tokens`` count the
    encoder positions of images (patches plus the class token, at the ``patch_size`` given to ``stats()``; a batch
    of square images pads none).
    """

    samples: int
    images: int
    texts: int
    real_tokens: int  # text tokens that carry data
    padded_tokens: int  # text tokens that are padding
    bytes: int  # bytes to move host -> device
    tensors: int  # tensors to move, i.e. host -> device copies
    image_tokens: int = 0  # image positions that carry data: patches + class token, every image
    padded_image_tokens: int = 0  # image positions that are padding

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

    def to(self, *args: Any, non_blocking: bool = False, **kwargs: Any) -> Self:
        """``to(device)``, ``to(dtype)`` or both, as ``Tensor.to`` takes them. A dtype casts only floating-point
        tensors, as Hugging Face's ``BatchFeature.to`` does: token ids, masks, labels and uint8 pixels keep theirs
        (``batch.to(torch.bfloat16)`` must not turn id 2482 into 2480)."""
        device, dtype = to_arguments(args, kwargs)

        def move(t: torch.Tensor) -> torch.Tensor:
            cast = dtype if dtype is not None and t.is_floating_point() else None
            return t.to(device=device, dtype=cast, non_blocking=non_blocking) if (device or cast) else t

        return map_tensors(self, move)

    def __repr__(self) -> str:
        """A short summary, a shape and dtype per tensor (``PaddedBatch(keys=[64 str], image=ImageBatch(pixels=59x3x
        224x224 uint8, ...), ...)``), not the tensors' values."""
        parts = [f"{f.name}={_short(getattr(self, f.name))}" for f in dataclasses.fields(self)
                 if getattr(self, f.name) is not None]
        return f"{type(self).__name__}({', '.join(parts)})"

    def tensors(self) -> list[torch.Tensor]:
        return collect_tensors(self)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
