"""Same-modality bucketing: every batch holds one modality and, for text, one length bucket.

Two forms of one idea: :class:`BucketBatcher`, a stream stage for iterable datasets (it runs inside the
DataLoader workers and yields lists of samples), and :class:`ModalityBucketBatchSampler`, a ``batch_sampler``
for map-style datasets (cf. LLaVA's modality-grouped sampler). Both feed :class:`~mmload.PaddedCollator`.

NOTE [bounded buckets]: a stream stage cannot wait for a bucket to fill: with 1% text, a text bucket may wait
thousands of samples, and a dead modality would hold memory forever. So the stage keeps at most
``max_buffered`` samples in all buckets together (flushing the fullest when full) and flushes any bucket whose
oldest sample has waited ``max_wait`` arrivals. Every sample comes out exactly once; the end of the stream
flushes what is left.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from mmload.raw import RawInput, as_samples
from mmload.sample import Modality, Sample

# Bucket upper bounds in tokens: 8 apart up to 64, then about 12-25% apart, so that padding within a
# bucket stays small on heavy-tailed text lengths.
DEFAULT_BOUNDARIES: tuple[int, ...] = (*range(8, 65, 8), 72, 80, 96, 112, 128, 144, 160, 192, 224, 256, 320, 384,
                                       448, 512)

BucketKey = tuple[str, int]


def bucket_key(modality: Modality | str, num_tokens: int, boundaries: Sequence[int]) -> BucketKey:
    """Images share one bucket; texts (and paired samples) are bucketed by token count."""
    if modality == Modality.IMAGE:
        return (Modality.IMAGE.value, 0)
    return (Modality(modality).value, bisect.bisect_left(boundaries, num_tokens))


def _check_boundaries(boundaries: Sequence[int]) -> None:
    if not boundaries or any(b <= a for a, b in zip(boundaries, boundaries[1:])) or boundaries[0] < 1:
        raise ValueError(f"boundaries must be strictly increasing positive token counts, got {tuple(boundaries)}")


@dataclass
class BucketBatcher(RawInput):
    """Stream stage: ``samples -> lists of samples`` of one modality and length bucket.

    Use as ``ShardDataset(..., batcher=BucketBatcher(32))`` and
    ``DataLoader(ds, batch_size=None, collate_fn=PaddedCollator())``; on a ``webdataset`` pipeline, as
    ``.compose(BucketBatcher(32))``. It takes raw samples too (NOTE [raw samples] in :mod:`mmload.raw`), decoded
    with its ``tokenizer``, ``image_size`` and ``max_text_len`` keywords.
    """

    batch_size: int
    boundaries: Sequence[int] = DEFAULT_BOUNDARIES
    max_buffered: int | None = None  # default: 4 full batches
    max_wait: int | None = None  # default: 16 batches' worth of arrivals

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        _check_boundaries(self.boundaries)
        self.boundaries = tuple(self.boundaries)
        if self.max_buffered is None:
            self.max_buffered = 4 * self.batch_size
        if self.max_wait is None:
            self.max_wait = 16 * self.batch_size
        if self.max_buffered < self.batch_size:
            raise ValueError(f"max_buffered must be >= batch_size ({self.batch_size}), got {self.max_buffered}")
        if self.max_wait < 1:
            raise ValueError(f"max_wait must be >= 1, got {self.max_wait}")

    def __call__(self, samples: Iterable[Any]) -> Iterator[list[Sample]]:
        """Batches from ``samples``, each as soon as it is due (``holder()`` does the same, one ``Sample`` at a
        time)."""
        held = self.holder()
        for sample in as_samples(self, samples):
            for batch in held.add(sample):
                yield [s for s, _ in batch]
        for batch in held.drain():
            yield [s for s, _ in batch]

    def holder(self, arrivals: int = 0) -> Held:
        """The buckets of one stream, empty; ``arrivals`` numbers the first sample to come. It takes ``Sample``s
        (what mmload's own stages hold); calling the batcher converts raw samples first."""
        return Held(self, arrivals)


class Held:
    """What a :class:`BucketBatcher` holds for one stream: each sample with a tag of the caller's (a stream
    position, say) and its arrival number. ``add`` puts one sample in and returns the batches it completes;
    ``drain`` empties every bucket, oldest first. ``held()`` lists what is held, so a stage that owns it can save
    and restore it (NOTE [bounded buckets] says when buckets flush)."""

    def __init__(self, batcher: BucketBatcher, arrivals: int = 0) -> None:
        self.batcher = batcher
        self.arrivals = arrivals  # arrival number of the next sample
        self.buckets: dict[BucketKey, list[tuple[Sample, Any, int]]] = {}  # (sample, tag, arrival)
        self.count = 0

    def put(self, sample: Sample, tag: Any = None, arrival: int | None = None) -> BucketKey:
        """Hold ``sample`` (arrival: its number when restoring what was held, else the next one)."""
        if arrival is None:
            arrival, self.arrivals = self.arrivals, self.arrivals + 1
        key = bucket_key(sample.modality, sample.num_text_tokens, self.batcher.boundaries)
        self.buckets.setdefault(key, []).append((sample, tag, arrival))
        self.count += 1
        return key

    def _pop(self, key: BucketKey) -> list[tuple[Sample, Any]]:
        bucket = self.buckets.pop(key)
        self.count -= len(bucket)
        return [(s, tag) for s, tag, _ in bucket]

    def add(self, sample: Sample, tag: Any = None) -> list[list[tuple[Sample, Any]]]:
        """Hold one more sample; the batches (``(sample, tag)`` lists) that are now due: its bucket if full, then
        buckets whose oldest sample waited ``max_wait`` arrivals, then the fullest if more than ``max_buffered``
        are held."""
        b = self.batcher
        n = self.arrivals
        key = self.put(sample, tag)
        out = []
        if len(self.buckets[key]) == b.batch_size:
            out.append(self._pop(key))
        stale = [k for k, bucket in self.buckets.items() if n - bucket[0][2] >= b.max_wait]
        if self.count > b.max_buffered:
            stale.append(max(self.buckets, key=lambda k: len(self.buckets[k])))
        for k in dict.fromkeys(stale):
            if k in self.buckets:
                out.append(self._pop(k))
        return out

    def drain(self) -> list[list[tuple[Sample, Any]]]:
        """Every bucket, oldest first: the end of the stream."""
        return [self._pop(k) for k in sorted(self.buckets, key=lambda k: self.buckets[k][0][2])]

    def held(self) -> list[tuple[Any, int]]:
        """``(tag, arrival)`` of every held sample, in arrival order."""
        return sorted(((tag, n) for bucket in self.buckets.values() for _, tag, n in bucket), key=lambda x: x[1])


class ModalityBucketBatchSampler(Sampler[list[int]]):
    """``batch_sampler`` for map-style datasets: index batches of one modality and length bucket.

    Args:
        modalities: the modality of each dataset index.
        lengths: the token count of each index (ignored for images).
        shuffle: shuffle within buckets and the order of batches, seeded by ``seed`` and :meth:`set_epoch`.
        drop_last: drop each bucket's last partial batch (default keeps it, so nothing is lost).
        rank, world_size: this process's share of the batches (every ``world_size``-th, from ``rank``); default
            from ``torch.distributed`` when initialised. Ranks may get one batch fewer than others, as with shards.
    """

    def __init__(self, modalities: Sequence[Modality | str], lengths: Sequence[int], batch_size: int,
                 boundaries: Sequence[int] = DEFAULT_BOUNDARIES, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int | None = None, world_size: int | None = None) -> None:
        if len(modalities) != len(lengths):
            raise ValueError(f"modalities ({len(modalities)}) and lengths ({len(lengths)}) must have one entry "
                             "per dataset index")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_boundaries(boundaries)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        if rank is None and world_size is None and torch.distributed.is_available() and \
                torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.rank, self.world_size = rank or 0, world_size or 1
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        self.epoch = 0
        self.buckets: dict[BucketKey, list[int]] = {}
        for i, (m, n) in enumerate(zip(modalities, lengths)):
            self.buckets.setdefault(bucket_key(m, n, boundaries), []).append(i)

    @classmethod
    def from_dataset(cls, dataset: Sequence[Any], batch_size: int, *, tokenizer: Any = None,
                     max_text_len: int = 512, progress: bool = True, **kwargs: Any) -> ModalityBucketBatchSampler:
        """The sampler of a map-style ``dataset`` of ``Sample``s or raw samples (dicts, tuples: NOTE [raw samples]
        in :mod:`mmload.raw`): reads every item once for its modality and token count (texts are tokenized as
        the collator will, with ``tokenizer`` and ``max_text_len``; images are not decoded). ``kwargs`` go to the
        sampler (``boundaries``, ``shuffle``, ``seed``, ...); pair it with ``PaddedCollator(tokenizer=...)``."""
        from tqdm.auto import tqdm

        describe = RawInput(tokenizer=tokenizer, max_text_len=max_text_len).describe
        items = tqdm(range(len(dataset)), desc="bucketing: reading lengths", unit="sample",
                     disable=not progress or len(dataset) < 10_000)
        modalities, lengths = zip(*(describe(dataset[i], i) for i in items)) if len(dataset) else ((), ())
        return cls(modalities, lengths, batch_size, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for key in sorted(self.buckets):
            idx = self.buckets[key]
            if self.shuffle:
                idx = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
            for lo in range(0, len(idx), self.batch_size):
                chunk = idx[lo:lo + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches[self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        full, rem = zip(*(divmod(len(v), self.batch_size) for v in self.buckets.values())) if self.buckets else ((), ())
        total = sum(full) + (0 if self.drop_last else sum(1 for r in rem if r))
        return len(range(self.rank, total, self.world_size))
