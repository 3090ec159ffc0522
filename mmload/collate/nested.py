"""Nested (jagged) batching: all texts of a batch packed end to end, offsets instead of padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmload.batch import JaggedText, NestedBatch
from mmload.collate._common import (
    cast_ids,
    check_ids_dtype,
    image_batch,
    labels_and_index,
    masked,
    mlm_or_ignore,
    text_rows,
)
from mmload.layouts import PATCH_SIZE, ImageLayout, JaggedImages
from mmload.raw import RawInput
from mmload.sample import Sample
from mmload.staging import PackedBatch, pack


@dataclass
class NestedCollator(RawInput):
    """``collate_fn`` for the nested strategy: zero padded tokens, text or image.

    Texts are packed end to end (:class:`~mmload.layouts.JaggedText`). Images of one size stay one dense
    ``(N, 3, H, W)`` tensor (nothing to leave out); images of several sizes (native resolution) are cut into
    ``patch_size`` patches here, on the host, and packed end to end (:class:`~mmload.layouts.JaggedImages`), so
    only real patches are moved and embedded. ``patch_size`` (default 16) must be the model's; ``make_loader``
    sets it.

    ``pack`` defaults to True: a nested batch is a handful of tensors (ids, offsets, labels, pixels) and
    moving them as one buffer makes the transfer a single copy.
    """

    ids_dtype: torch.dtype = torch.int32
    pack: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ids_dtype(self.ids_dtype)

    def __call__(self, samples: Sequence[Any]) -> NestedBatch | PackedBatch:
        samples = self.to_samples(samples)
        batch = NestedBatch(image=self._images(samples), text=self._text(samples), keys=[s.key for s in samples])
        return pack(batch) if self.pack else batch

    def _images(self, samples: Sequence[Sample]) -> ImageLayout | None:
        rows = [(i, s) for i, s in enumerate(samples) if s.pixels is not None]
        if len({tuple(s.pixels.shape) for _, s in rows}) <= 1:
            return image_batch(samples)  # one size (or none): dense, no padding
        patch = PATCH_SIZE if self.patch_size is None else self.patch_size
        odd = next((s for _, s in rows if s.pixels.shape[-2] % patch or s.pixels.shape[-1] % patch), None)
        if odd is not None:
            h, w = odd.pixels.shape[-2:]
            raise ValueError(f"sample {odd.key!r}: an image of {h}x{w} pixels is not whole patches of {patch}"
                             + (" (the default: give NestedCollator(patch_size=...) the model's)"
                                if self.patch_size is None else "")
                             + "; images of several sizes travel as patches: decode with resolution='native' at "
                             "the model's patch_size (make_loader(patch_size=...)), or resize them")
        return JaggedImages.from_images([s.pixels for _, s in rows], **labels_and_index(rows), patch_size=patch)

    def _text(self, samples: Sequence[Sample]) -> JaggedText | None:
        rows = text_rows(samples)
        if not rows:
            return None
        lengths = torch.tensor([s.num_text_tokens for _, s in rows], dtype=torch.int64)  # (N,)
        offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)  # (N+1,)
        torch.cumsum(lengths, 0, out=offsets[1:])
        return JaggedText(
            values=torch.cat([cast_ids(s.ids, self.ids_dtype, s.key) for _, s in rows]),  # (sum T,)
            offsets=offsets,
            mlm_labels=torch.cat([cast_ids(mlm_or_ignore(s), self.ids_dtype, s.key) for _, s in rows]),  # (sum T,)
            max_len=int(lengths.max()),
            masked=masked(rows),
            **labels_and_index(rows),
        )
