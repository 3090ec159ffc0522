"""BERT masked-language-model masking as a per-sample transform.

NOTE [masking per sample]: masking happens on each Sample before collation, from a generator seeded by
(seed, epoch, sample key). A sample is therefore masked the same way whichever batch, worker, rank or
strategy it lands in, which is what lets the five batching strategies be compared loss for loss. The seed goes
through hashlib, not ``hash()``: Python salts string hashes per process (PYTHONHASHSEED), so ``hash(key)``
would differ between DataLoader workers and runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from mmload.sample import IGNORE_INDEX, Sample


@dataclass
class MLMMasking:
    """``MLMMasking(vocab_size, mask_id, special_ids)(sample) -> new Sample`` with masked ids and ``mlm_labels``.

    Each non-special token is selected with probability ``prob``; a selected token becomes ``mask_id`` (80%),
    a uniformly random id (10%) or stays itself (10%). ``mlm_labels`` holds the original id at selected positions
    and ``IGNORE_INDEX`` elsewhere. Samples without ids pass through unchanged. Picklable (no lambdas, no state).
    """

    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]  # never masked, e.g. CLS, SEP, PAD
    prob: float = 0.15
    seed: int = 0
    epoch: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.vocab_size, int) or self.vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2, got {self.vocab_size!r}")
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_id must be in [0, vocab_size={self.vocab_size}), got {self.mask_id!r}; "
                             f"use the tokenizer's mask_token_id")
        self.special_ids = tuple(sorted({int(i) for i in self.special_ids}))
        if not 0.0 < self.prob < 1.0:
            raise ValueError(f"prob must be in (0, 1), got {self.prob!r} (BERT uses 0.15)")
        if not isinstance(self.seed, int) or not isinstance(self.epoch, int) or self.epoch < 0:
            raise ValueError(f"seed and epoch must be ints (epoch >= 0), got seed={self.seed!r}, "
                             f"epoch={self.epoch!r}")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, seed: int = 0, epoch: int = 0, prob: float = 0.15) -> MLMMasking:
        """From a Hugging Face tokenizer: its vocabulary size, ``[MASK]`` id and special token ids."""
        if tokenizer.mask_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no mask token; MLM needs one (e.g. a BERT tokenizer)")
        return cls(vocab_size=len(tokenizer), mask_id=int(tokenizer.mask_token_id),
                   special_ids=tuple(tokenizer.all_special_ids), prob=prob, seed=seed, epoch=epoch)

    def for_epoch(self, epoch: int) -> MLMMasking:
        """The same masking with another epoch: new masks every epoch, still deterministic."""
        return dataclasses.replace(self, epoch=epoch)

    def generator(self, key: str) -> torch.Generator:
        digest = hashlib.blake2b(f"{self.seed}\0{self.epoch}\0{key}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little"))

    def __call__(self, sample: Sample) -> Sample:
        if sample.ids is None:
            return sample
        ids = sample.ids
        g = self.generator(sample.key)
        n = ids.numel()
        # three draws of fixed size per sample, so the masks depend on nothing but (seed, epoch, key, length)
        selected = torch.rand(n, generator=g) < self.prob  # (T,)
        action = torch.rand(n, generator=g)  # (T,)
        random_ids = torch.randint(self.vocab_size, (n,), generator=g)  # (T,)
        selected &= ~torch.isin(ids, torch.tensor(self.special_ids, dtype=ids.dtype))
        masked = ids.clone()  # never write into the input sample
        masked[selected & (action < 0.8)] = self.mask_id
        swap = selected & (action >= 0.8) & (action < 0.9)
        masked[swap] = random_ids[swap].to(ids.dtype)
        labels = torch.where(selected, ids.long(), IGNORE_INDEX)  # (T,) int64
        return dataclasses.replace(sample, ids=masked, mlm_labels=labels)
