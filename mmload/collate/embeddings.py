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
    both are packed jagged (values + offsets), so no padding is ever shipped.
    """

    dtype: torch.dtype = torch.float16
    pack: bool = False

    def __post_init__(self) -> None:
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {self.dtype}")

    def __call__(self, samples: Sequence[Sample]) -> EmbeddingBatch | PackedBatch:
        check_samples(samples)
        seqs = []
        for s in samples:
            if s.emb is None:
                raise ValueError(f"sample {s.key!r} has no precomputed embedding; run `mmload precompute` on its "
                                 "shards and read the output shards")
            seqs.append(s.emb if s.emb.dim() == 2 else s.emb.unsqueeze(0))  # (L, D)
        widths = {e.shape[1] for e in seqs}
        if len(widths) > 1:
            raise ValueError(f"embeddings of one batch must share a width, got {sorted(widths)}")
        lengths = torch.tensor([e.shape[0] for e in seqs], dtype=torch.int64)  # (N,)
        offsets = torch.zeros(len(seqs) + 1, dtype=torch.int64)  # (N+1,)
        torch.cumsum(lengths, 0, out=offsets[1:])
        batch = EmbeddingBatch(
            values=torch.cat(seqs).to(self.dtype),  # (sum L, D)
            offsets=offsets,
            is_text=torch.tensor([_is_text(s) for s in samples], dtype=torch.bool),
            labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
            mlm_labels=torch.cat([_token_labels(s, e.shape[0]) for s, e in zip(samples, seqs)]),  # (sum L,)
            keys=[s.key for s in samples],
            max_len=int(lengths.max()),
            teacher_logits=_teacher_logits(samples, self.dtype),
        )
        return pack(batch) if self.pack else batch


def _is_text(sample: Sample) -> bool:
    return sample.has_text or sample.modality == "text"


def _teacher_logits(samples: Sequence[Sample], dtype: torch.dtype) -> torch.Tensor | None:
    """(N, C) teacher logits when the image samples carry them (text rows get zeros), else None."""
    images = [s for s in samples if not _is_text(s)]
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
    out = torch.zeros((len(samples), *shape), dtype=dtype)  # (N, C)
    for row, s in enumerate(samples):
        if s.teacher_logits is not None:
            out[row] = s.teacher_logits
    return out


def _token_labels(sample: Sample, length: int) -> torch.Tensor:
    if sample.mlm_labels is None or (length == 1 and sample.emb.dim() == 1):  # a pooled vector has no token labels
        return torch.full((length,), IGNORE_INDEX, dtype=torch.int64)
    if sample.mlm_labels.numel() != length:
        raise ValueError(f"sample {sample.key!r}: {sample.mlm_labels.numel()} MLM labels for {length} token "
                         "embeddings; mask the ids that precompute stored with them (KEY.ids.npy)")
    return sample.mlm_labels.long()
