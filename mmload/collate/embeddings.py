"""Precomputed embeddings: fixed-size vectors (or per-token sequences) made once by a frozen encoder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmload.batch import EmbeddingBatch
from mmload.collate._common import check_samples
from mmload.sample import IGNORE_INDEX, Sample
from mmload.staging import PackedBatch, pack


@dataclass
class EmbeddingCollator:
    """``collate_fn`` for shards written by ``mmload precompute``.

    Pooled vectors ``(D,)`` become sequences of length 1, per-token embeddings ``(L, D)`` keep their length;
    both are packed jagged (values + offsets), so no padding is ever shipped. A precomputed ``image_text`` pair
    gives two rows, its image side and then its text side, under one ``index`` (its position in the list).
    """

    dtype: torch.dtype = torch.float16
    pack: bool = False

    def __post_init__(self) -> None:
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {self.dtype}")

    def __call__(self, samples: Sequence[Sample]) -> EmbeddingBatch | PackedBatch:
        check_samples(samples)
        rows = []  # (sample position, sample, embedding (L, D), is_text): a pair gives an image row and a text row
        for i, s in enumerate(samples):
            if s.emb is None:
                raise ValueError(f"sample {s.key!r} has no precomputed embedding; run `mmload precompute` on its "
                                 "shards and read the output shards")
            if s.text_emb is not None:
                rows += [(i, s, _sequence(s.emb), False), (i, s, _sequence(s.text_emb), True)]
            else:
                rows.append((i, s, _sequence(s.emb), s.has_text or s.modality == "text"))
        widths = {e.shape[1] for _, _, e, _ in rows}
        if len(widths) > 1:
            raise ValueError(f"embeddings of one batch must share a width, got {sorted(widths)}")
        lengths = torch.tensor([e.shape[0] for _, _, e, _ in rows], dtype=torch.int64)  # (R,)
        offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)  # (R+1,)
        torch.cumsum(lengths, 0, out=offsets[1:])
        batch = EmbeddingBatch(
            values=torch.cat([e for _, _, e, _ in rows]).to(self.dtype),  # (sum L, D)
            offsets=offsets,
            is_text=torch.tensor([text for *_, text in rows], dtype=torch.bool),  # (R,)
            labels=torch.tensor([s.label for _, s, _, _ in rows], dtype=torch.int64),  # (R,)
            mlm_labels=torch.cat([_token_labels(s, e, text) for _, s, e, text in rows]),  # (sum L,)
            index=torch.tensor([i for i, *_ in rows], dtype=torch.int64),  # (R,)
            keys=[s.key for s in samples],
            max_len=int(lengths.max()),
            teacher_logits=_teacher_logits(rows, self.dtype),
        )
        return pack(batch) if self.pack else batch


def _sequence(emb: torch.Tensor) -> torch.Tensor:
    return emb if emb.dim() == 2 else emb.unsqueeze(0)  # (L, D)


def _teacher_logits(rows: Sequence[tuple[int, Sample, torch.Tensor, bool]], dtype: torch.dtype) -> torch.Tensor | None:
    """(R, C) teacher logits when the image rows carry them (text rows get zeros), else None."""
    images = [s for _, s, _, text in rows if not text]
    have = [s.teacher_logits is not None for s in images]
    if not any(have):
        return None
    if not all(have):
        missing = next(s.key for s in images if s.teacher_logits is None)
        raise ValueError(f"image sample {missing!r} has no teacher logits while others of its batch do; precompute "
                         "every shard of the run with the same --teacher")
    width = {s.teacher_logits.shape for s in images}
    if len(width) > 1:
        raise ValueError(f"teacher logits of one batch must share a shape, got {sorted(width)}")
    (shape,) = width
    out = torch.zeros((len(rows), *shape), dtype=dtype)  # (R, C)
    for row, (_, s, _, text) in enumerate(rows):
        if not text:
            out[row] = s.teacher_logits
    return out


def _token_labels(sample: Sample, emb: torch.Tensor, text: bool) -> torch.Tensor:
    """MLM labels of one row ``emb`` (L, D): the sample's on a per-token text row, else none."""
    length = emb.shape[0]
    pooled = (sample.text_emb if sample.text_emb is not None else sample.emb).dim() == 1
    if not text or sample.mlm_labels is None or pooled:  # a pooled vector has no token labels
        return torch.full((length,), IGNORE_INDEX, dtype=torch.int64)
    if sample.mlm_labels.numel() != length:
        raise ValueError(f"sample {sample.key!r}: {sample.mlm_labels.numel()} MLM labels for {length} token "
                         "embeddings; mask the ids that precompute stored with them (KEY.ids.npy)")
    return sample.mlm_labels.long()
