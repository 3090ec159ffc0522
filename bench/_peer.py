"""The peer: the loader a user writes without mmload, measured in the same run on the same shards.

Exactly this and no slower (issue #11): ``webdataset.WebDataset(urls, handler=warn_and_continue,
shardshuffle=False)``, a ``.map`` that opens each image with PIL, converts it to RGB and resizes it to the square
size (no ``draft``), and tokenizes each text with the same Hugging Face tokenizer (``truncation=True``), then
``.batched(B, collation_fn=...)`` stacking the images and padding the texts with ``tokenizer.pad``, under
``DataLoader(batch_size=None, num_workers=W)``. The benchmark times it as it times mmload's loader alone
(``_measure.LoaderRun``, in the same rounds) and reports mmload's padded loader as a ratio to it.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmload.tensors import BatchStats

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Decode:
    """The peer's ``.map``: PIL open, RGB, square resize; the tokenizer's ids."""

    tokenizer: Any
    image_size: int
    max_text_len: int

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"pixels": None, "ids": None}
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is not None:
            img = Image.open(io.BytesIO(data)).convert("RGB").resize((self.image_size, self.image_size))
            out["pixels"] = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)  # uint8 (3, S, S)
        if "txt" in sample:
            out["ids"] = self.tokenizer(sample["txt"].decode("utf-8"), truncation=True,
                                        max_length=self.max_text_len)["input_ids"]
        return out


@dataclass
class Collate:
    """The peer's ``collation_fn``: images stacked, texts padded by the tokenizer."""

    tokenizer: Any

    def __call__(self, samples: Sequence[dict[str, Any]]) -> PeerBatch:
        images = [s["pixels"] for s in samples if s["pixels"] is not None]
        texts = [s["ids"] for s in samples if s["ids"] is not None]
        padded = self.tokenizer.pad({"input_ids": texts}, return_tensors="pt") if texts else None
        return PeerBatch(torch.stack(images) if images else None, padded, len(samples))


@dataclass
class PeerBatch:
    """A peer batch, with the ``stats()`` the loader timing reads (samples and real text tokens)."""

    pixels: torch.Tensor | None
    text: Any
    samples: int

    def stats(self, patch_size: int = 16) -> BatchStats:
        real = int(self.text["attention_mask"].sum()) if self.text is not None else 0
        total = int(self.text["attention_mask"].numel()) if self.text is not None else 0
        return BatchStats(samples=self.samples, images=0 if self.pixels is None else len(self.pixels),
                          texts=0 if self.text is None else len(self.text["input_ids"]), real_tokens=real,
                          padded_tokens=total - real, bytes=0, tensors=0)


def loader(urls: Sequence[str], tokenizer: Any, *, image_size: int, max_text_len: int, batch_size: int,
           workers: int) -> DataLoader:
    import webdataset as wds

    dataset = (wds.WebDataset(list(urls), handler=wds.warn_and_continue, shardshuffle=False)
               .map(Decode(tokenizer, image_size, max_text_len))
               .batched(batch_size, collation_fn=Collate(tokenizer)))
    return DataLoader(dataset, batch_size=None, num_workers=workers)


def endless(make: Any) -> Iterator[Any]:
    """Batches of ``make()``'s loader, epoch after epoch (a timing must not run out of data)."""
    while True:
        yield from make()
