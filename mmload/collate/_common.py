"""Helpers the collators share: validation and splitting a sample list by modality."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmload.batch import ImageBatch
from mmload.layouts import pad_images
from mmload.sample import IGNORE_INDEX, Sample

ID_DTYPES = (torch.int16, torch.int32, torch.int64)


def check_ids_dtype(dtype: torch.dtype) -> None:
    if dtype not in ID_DTYPES:
        raise ValueError(f"ids_dtype must be one of {ID_DTYPES}, got {dtype}")


def check_samples(samples: Sequence[Sample]) -> None:
    """For the embeddings collator, which takes precomputed samples only (the others take raw ones too)."""
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    bad = next((i for i, s in enumerate(samples) if not isinstance(s, Sample)), None)
    if bad is not None:
        raise TypeError(f"EmbeddingCollator takes mmload.Sample with precomputed embeddings (read the output of "
                        f"`mmload precompute` with mmload.ShardDataset); sample {bad} is a "
                        f"{type(samples[bad]).__name__}")


def cast_ids(ids: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    """Narrow token ids (or MLM labels) for the transfer; refuse ids that do not fit rather than wrap them."""
    # only int16 can be too narrow: no vocabulary comes near 2**31 word pieces (mmload.raw refuses ids past it)
    if dtype == torch.int16 and ids.numel() and int(ids.max()) > torch.iinfo(dtype).max:
        raise ValueError(f"sample {key!r}: token id {int(ids.max())} does not fit {dtype}; use ids_dtype=torch.int32")
    return ids.to(dtype)


def image_batch(samples: Sequence[Sample]) -> ImageBatch | None:
    rows = [(i, s) for i, s in enumerate(samples) if s.pixels is not None]
    if not rows:
        return None
    # several sizes (native resolution): each image in the top-left of the largest, its size beside
    pixels, sizes = pad_images([s.pixels for _, s in rows])  # (N, 3, H, W), (N, 2) or None
    return ImageBatch(pixels=pixels, sizes=sizes, **labels_and_index(rows))


def labels_and_index(rows: Sequence[tuple[int, Sample]]) -> dict[str, torch.Tensor]:
    """The ``labels`` and ``index`` fields (int64 ``(N,)``) of a sub-batch made of ``(position, sample)`` rows."""
    return {"labels": torch.tensor([s.label for _, s in rows], dtype=torch.int64),
            "index": torch.tensor([i for i, _ in rows], dtype=torch.int64)}


def text_rows(samples: Sequence[Sample]) -> list[tuple[int, Sample]]:
    return [(i, s) for i, s in enumerate(samples) if s.ids is not None]


def masked(rows: Sequence[tuple[int, Sample]]) -> bool:
    """Whether a masking stage ran on the texts of a batch: any of them came with MLM labels."""
    return any(s.mlm_labels is not None for _, s in rows)


def mlm_or_ignore(sample: Sample) -> torch.Tensor:
    if sample.mlm_labels is not None:
        return sample.mlm_labels
    return torch.full_like(sample.ids, IGNORE_INDEX)
