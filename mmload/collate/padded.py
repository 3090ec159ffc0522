"""The padded baseline: texts padded to the batch's longest, one dense sub-batch per modality."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmload.batch import PaddedBatch, TextBatch
from mmload.collate._common import (
    cast_ids,
    check_ids_dtype,
    image_batch,
    labels_and_index,
    masked,
    mlm_or_ignore,
    text_rows,
)
from mmload.raw import RawInput
from mmload.sample import IGNORE_INDEX, Sample
from mmload.staging import PackedBatch, pack


@dataclass
class PaddedCollator(RawInput):
    """``collate_fn`` for the padded strategy (and, after a bucketing stage or sampler, the bucketed one).

    Args:
        pad_id: token id written past each text's end (the mask marks it, so any valid id works).
        ids_dtype: dtype of ids and MLM labels on the wire; int16 halves the bytes when the vocabulary fits.
        pad_to_multiple_of: round the padded length up (tensor-core friendly shapes); ``None`` pads to the longest.
        pack: return a :class:`PackedBatch` (one buffer, one host-to-device copy) instead of the batch.
    """

    pad_id: int = 0
    ids_dtype: torch.dtype = torch.int32
    pad_to_multiple_of: int | None = None
    pack: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ids_dtype(self.ids_dtype)
        if self.pad_id < 0:
            raise ValueError(f"pad_id must be >= 0, got {self.pad_id}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {self.pad_to_multiple_of}")

    def __call__(self, samples: Sequence[Any]) -> PaddedBatch | PackedBatch:
        samples = self.to_samples(samples)
        batch = PaddedBatch(image=image_batch(samples), text=self._text(samples), keys=[s.key for s in samples])
        return pack(batch) if self.pack else batch

    def _text(self, samples: Sequence[Sample]) -> TextBatch | None:
        rows = text_rows(samples)
        if not rows:
            return None
        longest = max(s.num_text_tokens for _, s in rows)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(rows), longest), self.pad_id, dtype=self.ids_dtype)  # (N, T)
        mlm = torch.full((len(rows), longest), IGNORE_INDEX, dtype=self.ids_dtype)  # (N, T)
        mask = torch.zeros((len(rows), longest), dtype=torch.bool)  # (N, T)
        for row, (_, s) in enumerate(rows):
            n = s.num_text_tokens
            ids[row, :n] = cast_ids(s.ids, self.ids_dtype, s.key)
            mlm[row, :n] = cast_ids(mlm_or_ignore(s), self.ids_dtype, s.key)
            mask[row, :n] = True
        return TextBatch(ids=ids, mask=mask, mlm_labels=mlm, masked=masked(rows), **labels_and_index(rows))
