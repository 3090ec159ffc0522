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
from dataclasses import dataclass
from typing import Any

import torch

from mmload.layouts import (
    PATCH_SIZE,
    ImageBatch,
    ImageLayout,
    JaggedImages,
    JaggedText,
    ModelInput,
    PackedEmbeddings,
    TextBatch,
)
from mmload.sample import Modality, Sample
from mmload.tensors import BatchStats, TensorBatch, can_pin_memory, collect_tensors, map_leaves, map_tensors


class Batch(TensorBatch):
    """What every batch type has beyond the tensor mixin: its accounting, its samples back, its model input."""

    keys: list[str]

    def stats(self, patch_size: int = PATCH_SIZE) -> BatchStats:
        """What the batch costs; image tokens are counted with ``patch_size`` (give the model's)."""
        raise NotImplementedError(f"{type(self).__name__} must define stats()")

    def unbatch(self) -> list[Sample]:
        raise NotImplementedError(f"{type(self).__name__} must define unbatch()")

    def model_input(self) -> ModelInput:
        raise NotImplementedError(f"{type(self).__name__} must define model_input()")


def _image_tokens(images: ImageLayout | None, patch_size: int) -> dict[str, int]:
    """``stats()``'s image fields: real and padded image tokens."""
    if images is None:
        return {"image_tokens": 0, "padded_image_tokens": 0}
    return {"image_tokens": images.tokens(patch_size), "padded_image_tokens": images.padded_tokens(patch_size)}


def _image_samples(images: ImageLayout | None, keys: list[str]) -> dict[int, Sample]:
    out: dict[int, Sample] = {}
    if images is not None:
        for i, pixels, label in zip(images.index.tolist(), images.images(), images.labels.tolist()):
            out[i] = Sample(keys[i], Modality.IMAGE, pixels=pixels.contiguous(), label=int(label))
    return out


def _add_text(out: dict[int, Sample], keys: list[str], i: int, ids: torch.Tensor, mlm: torch.Tensor,
              label: int) -> None:
    ids, mlm = ids.long(), mlm.long()
    if i in out:  # paired sample: the image side came first
        s = out[i]
        out[i] = Sample(s.key, Modality.IMAGE_TEXT, pixels=s.pixels, ids=ids, mlm_labels=mlm, label=s.label)
    else:
        out[i] = Sample(keys[i], Modality.TEXT, ids=ids, mlm_labels=mlm, label=label)


@dataclass(repr=False)  # TensorBatch.__repr__: shapes, not values
class PaddedBatch(Batch):
    """The baseline: one dense sub-batch per modality present. Bucketed batches hold a single modality."""

    image: ImageBatch | None
    text: TextBatch | None
    keys: list[str]

    def stats(self, patch_size: int = PATCH_SIZE) -> BatchStats:
        real = int(self.text.mask.sum()) if self.text is not None else 0
        total = self.text.mask.numel() if self.text is not None else 0
        return BatchStats(samples=len(self.keys), images=len(self.image) if self.image is not None else 0,
                          texts=len(self.text) if self.text is not None else 0, real_tokens=real,
                          padded_tokens=total - real, bytes=self.nbytes(), tensors=len(self.tensors()),
                          **_image_tokens(self.image, patch_size))

    def unbatch(self) -> list[Sample]:
        out = _image_samples(self.image, self.keys)
        if self.text is not None:
            for row, i in enumerate(self.text.index.tolist()):
                keep = self.text.mask[row]
                _add_text(out, self.keys, i, self.text.ids[row][keep], self.text.mlm_labels[row][keep],
                          int(self.text.labels[row]))
        return [out[i] for i in range(len(self.keys))]

    def model_input(self) -> ModelInput:
        return ModelInput(image=self.image, text=self.text)


@dataclass(repr=False)  # TensorBatch.__repr__: shapes, not values
class PerSampleBatch(Batch):
    """A list of one-sample batches; the model runs them one at a time until its losses are summed."""

    items: list[PaddedBatch]
    keys: list[str]

    def stats(self, patch_size: int = PATCH_SIZE) -> BatchStats:
        total = sum((item.stats(patch_size) for item in self.items), BatchStats(0, 0, 0, 0, 0, 0, 0))
        return dataclasses.replace(total, samples=len(self.keys))

    def unbatch(self) -> list[Sample]:
        return [s for item in self.items for s in item.unbatch()]

    def model_input(self) -> ModelInput:
        """One part per item, run one after another; each item's indices shifted to the whole batch's."""
        parts, start = [], 0
        for item in self.items:
            part = item.model_input()
            parts.append(ModelInput(image=_shifted(part.image, start), text=_shifted(part.text, start)))
            start += len(item.keys)
        return ModelInput(parts=tuple(parts))


def _shifted(layout: Any, start: int) -> Any:
    """A layout (any with an ``index`` field) with its indices moved by ``start``; None stays None."""
    return layout if layout is None or start == 0 else dataclasses.replace(layout, index=layout.index + start)


@dataclass(repr=False)  # TensorBatch.__repr__: shapes, not values
class NestedBatch(Batch):
    """Texts as one jagged tensor; images as one dense tensor, or (images of several sizes) as patch sequences end
    to end (:class:`~mmload.layouts.JaggedImages`).

    The model joins image patch sequences (each of its own length) and text sequences into a single jagged
    sequence batch: one packed encoder call, no padding on either side.
    """

    image: ImageBatch | JaggedImages | None
    text: JaggedText | None
    keys: list[str]

    def stats(self, patch_size: int = PATCH_SIZE) -> BatchStats:
        real = self.text.values.numel() if self.text is not None else 0
        images = _image_tokens(self.image, patch_size)  # one size, or patch sequences: no padding either way
        return BatchStats(samples=len(self.keys), images=len(self.image) if self.image is not None else 0,
                          texts=len(self.text) if self.text is not None else 0, real_tokens=real,
                          padded_tokens=0, bytes=self.nbytes(), tensors=len(self.tensors()), **images)

    def unbatch(self) -> list[Sample]:
        out = _image_samples(self.image, self.keys)
        if self.text is not None:
            bounds = self.text.offsets.tolist()
            for row, i in enumerate(self.text.index.tolist()):
                lo, hi = bounds[row], bounds[row + 1]
                _add_text(out, self.keys, i, self.text.values[lo:hi], self.text.mlm_labels[lo:hi],
                          int(self.text.labels[row]))
        return [out[i] for i in range(len(self.keys))]

    def model_input(self) -> ModelInput:
        return ModelInput(image=self.image, text=self.text, joint=True)


@dataclass(repr=False)  # TensorBatch.__repr__: shapes, not values
class EmbeddingBatch(Batch):
    """Precomputed embeddings, jagged: a pooled vector is a sequence of length 1. A row is one sample, or one side
    of a precomputed ``image_text`` pair (two rows, image then text, with the same ``index``)."""

    values: torch.Tensor  # float16 (sum L, D)
    offsets: torch.Tensor  # int64 (R+1,)
    is_text: torch.Tensor  # bool (R,)
    labels: torch.Tensor  # int64 (R,), the sample's label on each of its rows
    mlm_labels: torch.Tensor  # int64 (sum L,), IGNORE_INDEX where no MLM loss (always, for pooled vectors)
    index: torch.Tensor  # int64 (R,), each row's sample: its position in keys (NOTE [index fields])
    keys: list[str]
    max_len: int
    teacher_logits: torch.Tensor | None = None  # (R, C) from `mmload precompute --teacher`; 0 on text rows

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def stats(self, patch_size: int = PATCH_SIZE) -> BatchStats:
        """Image tokens are the image rows' own lengths (a pooled vector is one): ``patch_size`` does not apply."""
        texts = int(self.is_text.sum())
        lengths = self.offsets.diff()  # (R,)
        text_tokens = int(lengths[self.is_text].sum())
        return BatchStats(samples=len(self.keys), images=len(self) - texts, texts=texts, real_tokens=text_tokens,
                          padded_tokens=0, bytes=self.nbytes(), tensors=len(self.tensors()),
                          image_tokens=int(lengths[~self.is_text].sum()))

    def unbatch(self) -> list[Sample]:
        bounds = self.offsets.tolist()
        sides: dict[int, dict[bool, int]] = {}  # sample position -> {is_text: row}
        for row, (i, text) in enumerate(zip(self.index.tolist(), self.is_text.tolist())):
            sides.setdefault(i, {})[text] = row

        def emb(row: int) -> torch.Tensor:  # (L, D), or (D,) for a pooled vector
            lo, hi = bounds[row], bounds[row + 1]
            return self.values[lo:hi] if hi - lo > 1 else self.values[lo]

        out = []
        for i, key in enumerate(self.keys):
            rows = sides[i]
            image, text = rows.get(False), rows.get(True)
            first = image if image is not None else text
            logits = None if self.teacher_logits is None or image is None else self.teacher_logits[image]
            mlm = None if text is None else self.mlm_labels[bounds[text]:bounds[text + 1]]
            modality = Modality.IMAGE_TEXT if len(rows) == 2 else Modality.TEXT if image is None else Modality.IMAGE
            out.append(Sample(key, modality, emb=emb(first), text_emb=emb(text) if len(rows) == 2 else None,
                              mlm_labels=mlm, label=int(self.labels[first]), teacher_logits=logits))
        return out

    def model_input(self) -> ModelInput:
        return ModelInput(embeddings=PackedEmbeddings(
            values=self.values, offsets=self.offsets, is_text=self.is_text, labels=self.labels,
            mlm_labels=self.mlm_labels, index=self.index, max_len=self.max_len, teacher_logits=self.teacher_logits))


AnyBatch = Batch  # every batch type, PackedBatch included, is a Batch

__all__ = ["AnyBatch", "Batch", "BatchStats", "EmbeddingBatch", "ImageBatch", "JaggedImages", "JaggedText",
           "NestedBatch", "PaddedBatch", "PerSampleBatch", "TensorBatch", "TextBatch", "can_pin_memory",
           "collect_tensors", "map_leaves", "map_tensors"]
