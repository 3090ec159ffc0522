"""The stream stages a dataset runs in each DataLoader worker, each a small unit with explicit state.

    ShardSource  this worker's shards in order; raw samples, each shard shuffled by ``shuffle_shard``
      -> Decode        raw sample -> Sample; bad input skipped and counted (or raised, strict)
      -> Transform     a per-sample ``Sample -> Sample`` (e.g. MLM masking), seeded by key: no state
      -> BucketStage   optional: a batcher (``BucketBatcher``) that holds samples until their batch is due

Every item carries its **position**, ``(shard, offset)``: the shard's id (its index in the dataset's expanded
URL list, so a shard listed twice is two shards) and the number of the raw sample in that shard's (shuffled)
order. NOTE [stage state]: ``state_dict()`` of each stage describes the stream after the last
item it handed on. The source's is per piece of a shard (:class:`Piece`: the pieces it reads, those it finished,
the one it is in and how far), not per rank/worker split, so that an elastic resume (``mmload.elastic``) can hand
what is left to another split; the decoder's is its
error counts; the bucket stage's is the positions of the samples it holds, which a resume re-reads from the
source (a shard's shuffled order is a pure function of ``(seed, epoch, url)``) and hands back to it, and the
batches it has made but not handed on yet, in order. The
shuffle and the transform are pure functions of their seeds and so have nothing to save. A dataset's state
gathers its stages' states with a ``format`` version and the ``split`` it was saved under; ``check_split`` is
the one place that decides whether a saved split can be resumed.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from mmload.decode import Decoder
from mmload.errors import ErrorCounter, ErrorKind, SampleError, log, write_trace
from mmload.sample import Sample

STATE_FORMAT = 3  # 1: positions per split (shard index, sample); 2: per shard; 3: per piece of a shard
Position = tuple[Any, ...]  # (shard id, offset) from one source; a blend prefixes its source's index


@dataclass(frozen=True)
class Split:
    """Which share of the shards this stream reads: ``rank`` of ``world_size``, ``worker`` of ``num_workers``."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def check_split(saved: Mapping[str, int], now: Mapping[str, int]) -> None:
    """The one resume check: a position means something only for the split it was saved under.

    NOTE [resume policy]: shards are split by rank and worker, so a stream's state read by another split would
    repeat or skip samples; it is refused with this message. Another cluster shape resumes through
    ``mmload.elastic``, from every rank's state at once. ``now`` may name only some fields: those are compared.
    """
    keys = [k for k in ("world_size", "num_workers", "rank", "worker") if k in now]
    if any(saved.get(k) != now[k] for k in keys):
        were = ", ".join(f"{k}={saved.get(k)}" for k in keys)
        are = ", ".join(f"{k}={now[k]}" for k in keys)
        raise ValueError(f"cannot resume a stream saved with {were} as one with {are}: a stream's state resumes the "
                         "split it was saved under. To resume on another number of ranks or workers, give every "
                         "rank's loader state to StatefulLoader.load_elastic (python -m models.train --resume does "
                         "it), or start the epoch over")


def check_format(state: Mapping[str, Any], what: str) -> None:
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"this {what} state has format {state.get('format')!r}, this mmload reads format "
                         f"{STATE_FORMAT}; resume it with the mmload version that saved it, or start the epoch over "
                         "(a trainer checkpoint's weights still load: --eval-only --resume, --image-teacher, "
                         "mmload precompute --encoder)")


def raw_bytes(raw: Mapping[str, Any]) -> int:
    """The payload bytes of a raw sample (its members' data)."""
    return sum(len(v) for k, v in raw.items() if not k.startswith("__") and isinstance(v, bytes | bytearray))


def shuffle_shard(raws: Iterable[dict[str, Any]], rng: random.Random | None, buffer: int,
                  buffer_bytes: int | None = None) -> Iterator[dict[str, Any]]:
    """The shuffle stage: raw samples of one shard through a buffer of at most ``buffer`` samples and
    ``buffer_bytes`` bytes (``rng`` None: in order).

    NOTE [shuffling]: the buffer is drained at the end of each shard, so the order of a shard is a pure function of
    its rng (seeded by ``(seed, epoch, url)``), its samples' sizes and the two bounds, and a position
    ``(shard, offset)`` says exactly what was read. A sample larger than ``buffer_bytes`` passes through alone.
    """
    if rng is None:
        yield from raws
        return
    held: list[dict[str, Any]] = []
    sizes: list[int] = []
    total = 0  # bytes held
    for raw in raws:
        held.append(raw)
        sizes.append(raw_bytes(raw) if buffer_bytes is not None else 0)
        total += sizes[-1]
        while held and (len(held) >= buffer or (buffer_bytes is not None and total > buffer_bytes)):
            i = rng.randrange(len(held))
            total -= sizes.pop(i)
            yield held.pop(i)
    while held:
        yield held.pop(rng.randrange(len(held)))


@dataclass(frozen=True)
class Piece:
    """What one stream reads of one shard: the raw samples at offsets ``j`` (in the shard's shuffled order) with
    ``start <= j < stop`` and ``j % every == phase``, and those listed in ``also``. A whole shard is
    ``Piece(id, url)``; a blend's balanced split (``ShardDataset.balanced_pieces``) gives a stream a range
    (``start``, ``stop``), and an elastic resume (``mmload.elastic``) cuts shards into pieces: the rest of a shard
    from where a stream stopped (``start``), one of several streams that share it (``every``, ``phase``), the
    samples a bucket held (``also``, ``start=None``).

    NOTE [damage once]: a damaged shard is counted by the one piece that reads its range to the end
    (``stop=None``) at phase 0; the pieces of one shard share it out so that exactly one such piece is left
    whenever the damage is still to be reported.
    """

    shard: int
    url: str
    every: int = 1
    phase: int = 0
    start: int | None = 0  # None: only the offsets in ``also``
    also: tuple[int, ...] = ()
    stop: int | None = None  # None: to the end of the shard

    def wants(self, j: int) -> bool:
        in_range = self.start is not None and self.start <= j and (self.stop is None or j < self.stop)
        return (in_range and j % self.every == self.phase) or j in self.also

    def done_after(self, j: int) -> bool:
        """No offset after ``j`` is wanted."""
        if self.start is not None and self.stop is None:
            return False
        last = max(self.also, default=-1) if self.start is None else max(self.stop - 1, *self.also, -1)
        return j >= last

    @property
    def reports_damage(self) -> bool:
        return self.start is not None and self.stop is None and self.phase == 0

    def as_list(self) -> list[Any]:
        return [self.shard, self.url, self.every, self.phase, self.start, list(self.also), self.stop]

    @classmethod
    def of(cls, item: Any) -> Piece:
        """A piece from its ``as_list()``, or a whole shard from ``(id, url)``."""
        if isinstance(item, Piece):
            return item
        if len(item) == 2:
            return cls(int(item[0]), item[1])
        shard, url, every, phase, start, also, stop = item
        return cls(int(shard), url, int(every), int(phase), None if start is None else int(start),
                   tuple(sorted(int(j) for j in also)), None if stop is None else int(stop))


class ShardSource:
    """The source stage: raw samples of ``pieces`` (:class:`Piece`, or ``(shard id, url)`` for whole shards) in
    order, each shard through ``shuffle_shard``, with positions ``(shard id, offset)``.

    ``read(url)`` yields a shard's raw samples and raises :class:`SampleError` where it is damaged; the damage is
    reported to ``on_damage`` where the shard ends for the stream (after its buffered samples), so a resume never
    reports it twice (NOTE [damage once] for shards cut in pieces). ``trace``: see NOTE [worker trace] in
    :mod:`mmload.errors`.
    """

    def __init__(self, pieces: Sequence[Piece | tuple[int, str]], read: Callable[[str], Iterator[dict[str, Any]]],
                 *, rng: Callable[[str], random.Random | None], buffer: int,
                 on_damage: Callable[[SampleError], None], trace: torch.Tensor | None = None, worker: int = 0,
                 buffer_bytes: int | None = None) -> None:
        self.pieces = [Piece.of(p) for p in pieces]
        self.read, self.rng, self.buffer, self.buffer_bytes = read, rng, buffer, buffer_bytes
        self.on_damage, self.trace, self.worker = on_damage, trace, worker
        self.finished: list[int] = []  # indices (in ``pieces``) of the pieces read to their end
        self.current: int | None = None  # index of the piece being read
        self.offset = 0  # the next offset of ``current`` to consider

    @property
    def shards(self) -> list[tuple[int, str]]:
        """``(shard id, url)`` of every shard this source reads (some, in part)."""
        return list(dict.fromkeys((p.shard, p.url) for p in self.pieces))

    def _shuffled(self, url: str) -> tuple[Iterator[dict[str, Any]], list[SampleError]]:
        """The shard's raw samples in their shuffled order, and (filled once they are all out) its damage: every
        sample read whole before the damage comes out, buffered ones included."""
        damage: list[SampleError] = []

        def read() -> Iterator[dict[str, Any]]:
            try:
                yield from self.read(url)
            except SampleError as e:
                damage.append(e)

        return shuffle_shard(read(), self.rng(url), self.buffer, self.buffer_bytes), damage

    def __iter__(self) -> Iterator[tuple[Position, dict[str, Any]]]:
        done = set(self.finished)
        for k, piece in enumerate(self.pieces):
            if k in done:
                continue  # resuming: a finished piece is not read again
            start = self.offset if k == self.current else 0
            self.current, self.offset = k, start
            raws, damage = self._shuffled(piece.url)
            for j, raw in enumerate(raws):
                if j < start or not piece.wants(j):
                    if piece.done_after(j):
                        break  # a piece of held samples only: the rest of the shard is not read
                    continue  # resuming, or another stream's sample: skipped undecoded
                self.offset = j + 1
                if self.trace is not None:
                    write_trace(self.trace, self.worker, piece.url, raw["__key__"])
                yield (piece.shard, j), raw
            if piece.reports_damage:
                for err in damage:
                    self.on_damage(err)
            raws.close()
            self.finished.append(k)
            self.current, self.offset = None, 0

    def reread(self, positions: Iterable[Position]) -> dict[Position, dict[str, Any]]:
        """The raw samples at ``positions`` (``(shard id, offset)``), read again; damage is not reported again."""
        urls = dict(self.shards)
        wanted: dict[int, set[int]] = {}
        for shard, j in positions:
            wanted.setdefault(int(shard), set()).add(int(j))
        out: dict[Position, dict[str, Any]] = {}
        for shard, offsets in wanted.items():
            last = max(offsets)
            raws, _ = self._shuffled(urls[shard])
            for j, raw in enumerate(raws):
                if j in offsets:
                    out[(shard, j)] = raw
                if j >= last:
                    break
            raws.close()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"pieces": [p.as_list() for p in self.pieces], "finished": list(self.finished),
                "current": self.current, "offset": self.offset}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pieces = [Piece.of(p) for p in state["pieces"]]
        self.finished, self.current, self.offset = list(state["finished"]), state["current"], int(state["offset"])


class KeySet:
    """The keys a stream has delivered, to count a key that an earlier shard had too, in bounded memory: each key
    is a 64-bit hash (8 bytes in a sorted array, plus a small set of recent ones; a false match takes about 2**32
    keys), and past ``limit`` keys no new one is remembered (``None``: no limit)."""

    MERGE = 1 << 16  # recent hashes are merged into the sorted array this many at a time

    def __init__(self, limit: int | None = 1 << 22) -> None:
        self.limit = limit
        self.sorted = np.empty(0, dtype=np.uint64)
        self.recent: set[int] = set()
        self.full = False  # the limit was reached (and warned about)

    def __len__(self) -> int:
        return len(self.sorted) + len(self.recent)

    def add(self, key: str) -> bool:
        """Remember ``key``; whether it was there already."""
        h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
        if h in self.recent:
            return True
        i = int(np.searchsorted(self.sorted, np.uint64(h)))
        if i < len(self.sorted) and int(self.sorted[i]) == h:
            return True
        if self.limit is not None and len(self) >= self.limit:
            if not self.full:
                log.warning("remembering no more keys after %d: a key that comes back in a later shard is no longer "
                            "counted (mmload inspect counts them all)", self.limit)
                self.full = True
            return False
        self.recent.add(h)
        if len(self.recent) >= self.MERGE:
            self.sorted = np.union1d(self.sorted, np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent)))
            self.recent.clear()
        return False


class Decode:
    """The decode stage: raw samples to :class:`Sample`; a bad one is skipped and counted by kind in ``errors`` (or
    raised with ``strict``), so a stream of ``(position, raw)`` becomes one of ``(position, Sample)``. Notices
    (``mmload.errors.NOTICES``: members no field reads, a key an earlier shard of this stream delivered too, which
    is delivered again) are counted beside the sample, never raised.

    ``keys`` remembers the keys delivered since ``reset_keys()`` (the start of each pass over the shards): a resume
    remembers those delivered after it only.
    """

    def __init__(self, decoder: Decoder, errors: ErrorCounter, strict: bool = False,
                 keys_limit: int | None = 1 << 22) -> None:
        self.decoder, self.errors, self.strict = decoder, errors, strict
        self.keys_limit = keys_limit
        self.keys = KeySet(keys_limit)

    def reset_keys(self) -> None:
        self.keys = KeySet(self.keys_limit)

    def bad(self, err: SampleError) -> None:
        if self.strict:
            raise err
        self.errors.add(err)

    def one(self, raw: dict[str, Any]) -> Sample | None:
        if "__errors__" in raw:
            self.bad(raw["__errors__"][0])
            return None
        notices: list[SampleError] = []
        try:
            sample = self.decoder(raw, notices)
        except SampleError as e:
            self.bad(e)
            return None
        self.errors.ok()
        if self.keys.add(sample.key):
            notices.append(SampleError(ErrorKind.DUPLICATE_KEY_ACROSS_SHARDS, "an earlier shard of this stream "
                                       "delivered this key too; both are delivered", sample.url, sample.key))
        for notice in notices:
            self.errors.note(notice)
        return sample

    def __call__(self, items: Iterable[tuple[Position, dict[str, Any]]]) -> Iterator[tuple[Position, Sample]]:
        for pos, raw in items:
            sample = self.one(raw)
            if sample is not None:
                yield pos, sample

    def state_dict(self) -> dict[str, Any]:
        return {"stage": "decode", "errors": dict(self.errors.counts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.errors.counts.clear()
        self.errors.counts.update(state["errors"])


class Transform:
    """The transform stage: ``fn`` on every sample. Seeded by each sample's key, it has no state to save."""

    def __init__(self, fn: Callable[[Sample], Sample] | None) -> None:
        self.fn = fn

    def __call__(self, items: Iterable[tuple[Position, Sample]]) -> Iterator[tuple[Position, Sample]]:
        if self.fn is None:
            yield from items
            return
        for pos, sample in items:
            yield pos, self.fn(sample)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore: the transform is a pure function of each sample (see ``state_dict``)."""


class BucketStage:
    """The bucketing stage: samples in, lists of samples out, through a batcher.

    A ``BucketBatcher`` (anything with its ``holder()``) makes the stage resumable: the stage owns what it holds,
    every held sample with its position, and the batches that are due but not handed on yet (one sample can
    complete several), so ``state_dict()`` lists the positions to re-read and ``restore`` puts those samples back
    where they were. Any other batcher (``Iterator[Sample] -> Iterator[list[Sample]]``) runs as it is, but its
    stream cannot be resumed mid-epoch: it keeps no state the stage can save.
    """

    def __init__(self, batcher: Any) -> None:
        self.batcher = batcher
        self.held = batcher.holder() if hasattr(batcher, "holder") else None
        self.due: deque[list[tuple[Sample, Position]]] = deque()  # made, not handed on yet

    def __call__(self, items: Iterable[tuple[Position, Sample]]) -> Iterator[list[Sample]]:
        if self.held is None:
            yield from self.batcher(sample for _, sample in items)
            return
        for pos, sample in items:
            self.due.extend(self.held.add(sample, pos))
            yield from self._hand_on()
        self.due.extend(self.held.drain())
        yield from self._hand_on()

    def _hand_on(self) -> Iterator[list[Sample]]:
        while self.due:  # one at a time: a state taken between two of them lists the rest
            yield [s for s, _ in self.due.popleft()]

    def state_dict(self) -> dict[str, Any] | None:
        if self.held is None:
            return None
        return {"held": [[list(pos), arrival] for pos, arrival in self.held.held()],
                "due": [[list(pos) for _, pos in batch] for batch in self.due], "arrivals": self.held.arrivals,
                "flushes": dict(getattr(self.held, "flushes", {}))}

    def restore(self, state: Mapping[str, Any] | None,
                reread: Callable[[list[Position]], Mapping[Position, Sample]]) -> None:
        """Hold again what ``state`` held; ``reread(positions)`` gives those samples back, decoded."""
        if state is None or self.held is None:
            raise ValueError(f"the batcher {type(self.batcher).__name__} keeps no state to resume from mid-epoch; give "
                             "it a holder() as BucketBatcher has, or start the epoch over")
        samples = reread([tuple(pos) for pos, _ in state["held"]] +
                         [tuple(pos) for batch in state["due"] for pos in batch])
        for pos, arrival in state["held"]:
            self.held.put(samples[tuple(pos)], tuple(pos), arrival=arrival)
        self.due.extend([(samples[tuple(pos)], tuple(pos)) for pos in batch] for batch in state["due"])
        self.held.arrivals = int(state["arrivals"])
        if hasattr(self.held, "flushes"):
            self.held.flushes.update(state.get("flushes", {}))


__all__ = ["STATE_FORMAT", "BucketStage", "Decode", "KeySet", "Piece", "Position", "ShardSource", "Split", "Transform",
           "check_format", "check_split", "raw_bytes", "shuffle_shard"]
