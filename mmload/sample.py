"""The one sample schema every stage, collator and model of mmload shares."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

IGNORE_INDEX = -100  # label value that losses ignore (torch's CrossEntropyLoss default)


class Modality(StrEnum):
    IMAGE = "image"
    TEXT = "text"
    IMAGE_TEXT = "image_text"  # a paired sample: both pixels and ids


@dataclass
class Sample:
    """One decoded sample.

    ``pixels`` is uint8 ``(3, H, W)``; ``ids`` is int64 ``(T,)`` word pieces including the special tokens;
    ``mlm_labels`` (set by a masking stage) is int64 ``(T,)`` with ``IGNORE_INDEX`` where no loss is taken;
    ``emb`` is a precomputed float16 embedding, ``(D,)`` pooled or ``(L, D)`` per token (of the image, for a
    pair); ``text_emb`` is the text side's of a precomputed ``image_text`` pair (``ids`` then belong to it);
    ``teacher_logits`` are a frozen teacher's class logits ``(C,)`` stored beside it by ``mmload precompute
    --teacher``.
    """

    key: str
    modality: Modality
    pixels: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    mlm_labels: torch.Tensor | None = None
    emb: torch.Tensor | None = None
    label: int = IGNORE_INDEX
    teacher_logits: torch.Tensor | None = None
    url: str = ""
    text_emb: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.modality = Modality(self.modality)
        if self.emb is not None:
            for name, emb in (("emb", self.emb), ("text_emb", self.text_emb)):
                if emb is not None and emb.dim() not in (1, 2):
                    raise ValueError(f"sample {self.key!r}: {name} must be (D,) or (L, D), got shape "
                                     f"{tuple(emb.shape)}")
            return
        if self.text_emb is not None:
            raise ValueError(f"sample {self.key!r}: text_emb is the text side of a precomputed pair; give emb too")
        if self.modality in (Modality.IMAGE, Modality.IMAGE_TEXT):
            if self.pixels is None or self.pixels.dtype != torch.uint8 or self.pixels.dim() != 3:
                raise ValueError(f"sample {self.key!r}: {self.modality} needs uint8 pixels (3, H, W)")
        if self.modality in (Modality.TEXT, Modality.IMAGE_TEXT):
            if self.ids is None or self.ids.dim() != 1 or self.ids.numel() == 0:
                raise ValueError(f"sample {self.key!r}: {self.modality} needs non-empty 1-D ids")
            if self.mlm_labels is not None and self.mlm_labels.shape != self.ids.shape:
                raise ValueError(f"sample {self.key!r}: mlm_labels shape {tuple(self.mlm_labels.shape)} "
                                 f"!= ids shape {tuple(self.ids.shape)}")

    @property
    def has_image(self) -> bool:
        return self.pixels is not None

    @property
    def has_text(self) -> bool:
        return self.ids is not None

    @property
    def num_text_tokens(self) -> int:
        return 0 if self.ids is None else int(self.ids.numel())
