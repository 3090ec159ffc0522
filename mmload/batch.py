"""Batch types produced by the collators.

Every batch is a dataclass of tensors with ``pin_memory()`` (called by the DataLoader's pin thread),
``to(device, non_blocking=...)``, ``stats()`` (what the batch costs to move and to compute) and
``unbatch()`` (the samples back, in the order they were collated).

NOTE [index fields]: images and texts of one batch are split into per-modality tensors. Each part keeps
``index``, the position of each row in the list of samples given to the collator, so that results can be
put back in sample order and a paired (image_text) sample shows up under the same index on both sides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import torch

from mmload.sample import Modality, Sample


def can_pin_memory() -> bool:
    """Pinning needs an accelerator; on a CPU-only build ``Tensor.pin_memory()`` raises."""
    return torch.accelerator.is_available()


def map_leaves(obj: Any, fn: Callable[[Any], Any], leaf: type = torch.Tensor) -> Any:
    """Rebuild ``obj`` (dataclasses, lists, tuples, dicts) with ``fn`` applied to every ``leaf``, in field order."""
    if isinstance(obj, leaf):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: map_leaves(getattr(obj, f.name), fn, leaf) for f in dataclasses.fields(obj)}
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
    """What one batch costs. Text tokens only: every image has the same number of patch tokens."""

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
    """Mixin for batch dataclasses: pinning, moving, accounting."""

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

    def stats(self) -> BatchStats:
        raise NotImplementedError(f"{type(self).__name__} must define stats()")

    def unbatch(self) -> list[Sample]:
        raise NotImplementedError(f"{type(self).__name__} must define unbatch()")


@dataclass
class ImageBatch(TensorBatch):
    pixels: torch.Tensor  # uint8 (N, 3, H, W), normalized on the device by the model
    labels: torch.Tensor  # int64 (N,), IGNORE_INDEX when unlabelled
    index: torch.Tensor  # int64 (N,), see NOTE [index fields]

    def __len__(self) -> int:
        return self.pixels.shape[0]


@dataclass
class TextBatch(TensorBatch):
    """Texts padded to the longest member."""

    ids: torch.Tensor  # int (N, T), pad_id past each length
    mask: torch.Tensor  # bool (N, T), True on real tokens
    mlm_labels: torch.Tensor  # int (N, T), ids' dtype, IGNORE_INDEX where no MLM loss is taken
    labels: torch.Tensor  # int64 (N,)
    index: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return self.ids.shape[0]


@dataclass
class JaggedText(TensorBatch):
    """Texts packed end to end, no padding; ``offsets`` double as ``cu_seqlens`` for varlen attention."""

    values: torch.Tensor  # int (sum T,)
    offsets: torch.Tensor  # int64 (N+1,), offsets[0] == 0
    mlm_labels: torch.Tensor  # int (sum T,), ids' dtype
    labels: torch.Tensor  # int64 (N,)
    index: torch.Tensor  # int64 (N,)
    max_len: int  # kept on the host so kernels need no device sync to read it

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def nested(self) -> torch.Tensor:
        """The ids as a ``torch.nested`` jagged tensor ``(N, j)``."""
        return torch.nested.nested_tensor_from_jagged(self.values, self.offsets)


def _image_samples(images: ImageBatch | None, keys: list[str]) -> dict[int, Sample]:
    out: dict[int, Sample] = {}
    if images is not None:
        for row, i in enumerate(images.index.tolist()):
            out[i] = Sample(keys[i], Modality.IMAGE, pixels=images.pixels[row], label=int(images.labels[row]))
    return out


def _add_text(out: dict[int, Sample], keys: list[str], i: int, ids: torch.Tensor, mlm: torch.Tensor,
              label: int) -> None:
    ids, mlm = ids.long(), mlm.long()
    if i in out:  # paired sample: the image side came first
        s = out[i]
        out[i] = Sample(s.key, Modality.IMAGE_TEXT, pixels=s.pixels, ids=ids, mlm_labels=mlm, label=s.label)
    else:
        out[i] = Sample(keys[i], Modality.TEXT, ids=ids, mlm_labels=mlm, label=label)


@dataclass
class PaddedBatch(TensorBatch):
    """The baseline: one dense sub-batch per modality present. Bucketed batches hold a single modality."""

    image: ImageBatch | None
    text: TextBatch | None
    keys: list[str]

    def stats(self) -> BatchStats:
        real = int(self.text.mask.sum()) if self.text is not None else 0
        total = self.text.mask.numel() if self.text is not None else 0
        return BatchStats(samples=len(self.keys), images=len(self.image) if self.image is not None else 0,
                          texts=len(self.text) if self.text is not None else 0, real_tokens=real,
                          padded_tokens=total - real, bytes=self.nbytes(), tensors=len(self.tensors()))

    def unbatch(self) -> list[Sample]:
        out = _image_samples(self.image, self.keys)
        if self.text is not None:
            for row, i in enumerate(self.text.index.tolist()):
                keep = self.text.mask[row]
                _add_text(out, self.keys, i, self.text.ids[row][keep], self.text.mlm_labels[row][keep],
                          int(self.text.labels[row]))
        return [out[i] for i in range(len(self.keys))]


@dataclass
class PerSampleBatch(TensorBatch):
    """A list of one-sample batches; the model runs them one at a time until its losses are summed."""

    items: list[PaddedBatch]
    keys: list[str]

    def stats(self) -> BatchStats:
        total = sum((item.stats() for item in self.items), BatchStats(0, 0, 0, 0, 0, 0, 0))
        return dataclasses.replace(total, samples=len(self.keys))

    def unbatch(self) -> list[Sample]:
        return [s for item in self.items for s in item.unbatch()]


@dataclass
class NestedBatch(TensorBatch):
    """Texts as one jagged tensor; images (all one size after decoding) as one dense tensor.

    The model joins image patch sequences and text sequences into a single jagged sequence batch.
    """

    image: ImageBatch | None
    text: JaggedText | None
    keys: list[str]

    def stats(self) -> BatchStats:
        real = self.text.values.numel() if self.text is not None else 0
        return BatchStats(samples=len(self.keys), images=len(self.image) if self.image is not None else 0,
                          texts=len(self.text) if self.text is not None else 0, real_tokens=real,
                          padded_tokens=0, bytes=self.nbytes(), tensors=len(self.tensors()))

    def unbatch(self) -> list[Sample]:
        out = _image_samples(self.image, self.keys)
        if self.text is not None:
            bounds = self.text.offsets.tolist()
            for row, i in enumerate(self.text.index.tolist()):
                lo, hi = bounds[row], bounds[row + 1]
                _add_text(out, self.keys, i, self.text.values[lo:hi], self.text.mlm_labels[lo:hi],
                          int(self.text.labels[row]))
        return [out[i] for i in range(len(self.keys))]


@dataclass
class EmbeddingBatch(TensorBatch):
    """Precomputed embeddings, jagged: a pooled vector is a sequence of length 1."""

    values: torch.Tensor  # float16 (sum L, D)
    offsets: torch.Tensor  # int64 (N+1,)
    is_text: torch.Tensor  # bool (N,)
    labels: torch.Tensor  # int64 (N,)
    mlm_labels: torch.Tensor  # int64 (sum L,), IGNORE_INDEX where no MLM loss (always, for pooled vectors)
    keys: list[str]
    max_len: int
    teacher_logits: torch.Tensor | None = None  # (N, C) from `mmload precompute --teacher`; 0 on text rows

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def stats(self) -> BatchStats:
        texts = int(self.is_text.sum())
        text_tokens = int(self.offsets.diff()[self.is_text].sum())
        return BatchStats(samples=len(self.keys), images=len(self) - texts, texts=texts, real_tokens=text_tokens,
                          padded_tokens=0, bytes=self.nbytes(), tensors=len(self.tensors()))

    def unbatch(self) -> list[Sample]:
        bounds = self.offsets.tolist()
        out = []
        for row, key in enumerate(self.keys):
            lo, hi = bounds[row], bounds[row + 1]
            emb = self.values[lo:hi]
            text = bool(self.is_text[row])
            logits = None if self.teacher_logits is None or text else self.teacher_logits[row]
            out.append(Sample(key, Modality.TEXT if text else Modality.IMAGE, emb=emb if hi - lo > 1 else emb[0],
                              mlm_labels=self.mlm_labels[lo:hi] if text else None, label=int(self.labels[row]),
                              teacher_logits=logits))
        return out


AnyBatch = PaddedBatch | PerSampleBatch | NestedBatch | EmbeddingBatch

__all__ = ["AnyBatch", "BatchStats", "EmbeddingBatch", "ImageBatch", "JaggedText", "NestedBatch", "PaddedBatch",
           "PerSampleBatch", "TensorBatch", "TextBatch"]
