"""Per-sample text transforms: BERT masked-language-model masking, and sentence-order pairs for NSP.

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

from mmload.sample import IGNORE_INDEX, Modality, Sample


def keyed_generator(*parts: Any) -> torch.Generator:
    """A generator seeded by a stable hash of ``parts`` (not Python's ``hash``, which changes per process)."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))

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
        return keyed_generator(self.seed, self.epoch, key)

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


@dataclass
class NextSegmentPairs:
    """``NextSegmentPairs(cls_id, sep_id)(sample) -> new Sample``: a text cut into two segments, in order or swapped.

    A text sample ``[CLS] body [SEP]`` with at least ``min_tokens`` body tokens is cut at ``c`` (``2 <= c <=
    len(body) - 2``) into ``A = body[:c]`` and ``B = body[c:]``. With probability 1/2 it becomes ``[CLS] A [SEP] B
    [SEP]`` with ``label`` 1 (B follows A), else ``[CLS] B [SEP] A [SEP]`` with ``label`` 0. Cut and coin come from
    a generator seeded by (seed, epoch, key), as NOTE [masking per sample] says. The result is one token longer
    than the input: read texts with ``max_text_len`` one short of the model's.

    NOTE [sentence order, not next sentence]: BERT's NSP pairs a segment with one from another document for its
    negatives; a per-sample transform sees a single document, so this is ALBERT's sentence-order prediction
    (Lan et al., 2019): a negative is the same two segments swapped. Only ``Modality.TEXT`` samples are
    paired: the ``label`` of an image_text sample is its image's class, and ``label`` is where the pair's target
    goes. Other samples, and texts that are too short, pass through unchanged (their ``label`` stays
    ``IGNORE_INDEX``). Run it before ``MLMMasking`` (see ``Compose``); masking never touches the [SEP]s.
    """

    cls_id: int
    sep_id: int
    seed: int = 0
    epoch: int = 0
    min_tokens: int = 8  # body tokens, [CLS] and [SEP] not counted

    def __post_init__(self) -> None:
        for name in ("cls_id", "sep_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a token id (int >= 0), got {value!r}; use the tokenizer's")
        if self.cls_id == self.sep_id:
            raise ValueError(f"cls_id and sep_id must differ, both are {self.cls_id}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 4:
            raise ValueError(f"min_tokens must be an int >= 4 (two tokens per segment), got {self.min_tokens!r}")
        if not isinstance(self.seed, int) or not isinstance(self.epoch, int) or self.epoch < 0:
            raise ValueError(f"seed and epoch must be ints (epoch >= 0), got seed={self.seed!r}, "
                             f"epoch={self.epoch!r}")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, seed: int = 0, epoch: int = 0, min_tokens: int = 8) -> NextSegmentPairs:
        """From a Hugging Face tokenizer: its ``[CLS]`` and ``[SEP]`` ids."""
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no [CLS]/[SEP] tokens; sentence pairs need both "
                             "(e.g. a BERT tokenizer)")
        return cls(int(tokenizer.cls_token_id), int(tokenizer.sep_token_id), seed=seed, epoch=epoch,
                   min_tokens=min_tokens)

    def for_epoch(self, epoch: int) -> NextSegmentPairs:
        return dataclasses.replace(self, epoch=epoch)

    def generator(self, key: str) -> torch.Generator:
        # not MLMMasking's stream: the cut must not correlate with the masks of the same (seed, epoch, key)
        return keyed_generator("nsp", self.seed, self.epoch, key)

    def __call__(self, sample: Sample) -> Sample:
        ids = sample.ids
        if (sample.modality != Modality.TEXT or ids is None or ids.numel() < self.min_tokens + 2
                or int(ids[0]) != self.cls_id or int(ids[-1]) != self.sep_id):
            return sample
        body = ids[1:-1]  # (T-2,)
        g = self.generator(sample.key)
        cut = int(torch.randint(2, body.numel() - 1, (), generator=g))  # 2 <= cut <= len(body) - 2
        in_order = bool(torch.rand((), generator=g) < 0.5)
        a, b = body[:cut], body[cut:]
        first, second = (a, b) if in_order else (b, a)
        cls, sep = ids[:1], ids[-1:]
        pair = torch.cat([cls, first, sep, second, sep])  # (T+1,), a new tensor: the input stays as it was
        return dataclasses.replace(sample, ids=pair, mlm_labels=None, label=int(in_order))


@dataclass
class Compose:
    """Per-sample transforms applied in order, e.g. ``Compose((NextSegmentPairs(...), MLMMasking(...)))``.

    Picklable; ``for_epoch`` hands the epoch on to every transform that has one.
    """

    transforms: tuple[Any, ...]

    def __post_init__(self) -> None:
        self.transforms = tuple(self.transforms)
        bad = [t for t in self.transforms if not callable(t)]
        if bad:
            raise ValueError(f"Compose takes callables Sample -> Sample, got {bad!r}")

    def for_epoch(self, epoch: int) -> Compose:
        return Compose(tuple(t.for_epoch(epoch) if hasattr(t, "for_epoch") else t for t in self.transforms))

    def __call__(self, sample: Sample) -> Sample:
        for transform in self.transforms:
            sample = transform(sample)
        return sample
