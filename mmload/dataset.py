"""Datasets of :class:`Sample` over webdataset shards: a shard split per rank and worker, then the stream stages.

NOTE [splitting]: the shard list is expanded and (when shuffling) permuted with a generator seeded by
``seed + epoch``, the same on every rank. Rank ``r`` of ``W`` takes shards ``r::W`` and worker ``w`` of ``K``
takes ``w::K`` of those, so each shard, and therefore each sample, is read exactly once per epoch by exactly
one worker of one rank. With fewer shards than ``W x K`` some workers get none; make more shards than that.

Each worker then runs the stages of :mod:`mmload.stages` over its shards: source (with the per-shard shuffle,
NOTE [shuffling] there), decode, transform and, with a batcher, the bucket stage. Shard order is shuffled too,
and the DataLoader interleaves workers, so batches mix shards. The tar reader is :mod:`mmload.reader`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmload.decode import Decoder
from mmload.errors import ErrorCounter, log
from mmload.layouts import PATCH_SIZE
from mmload.manifest import shard_samples
from mmload.reader import (
    MAX_MEMBER_BYTES,
    MAX_SAMPLE_BYTES,
    READ_TIMEOUT,
    SHUFFLE_BUFFER_BYTES,
    ReadLimits,
    expand_urls,
    read_shard,
)
from mmload.sample import Sample
from mmload.stages import (
    STATE_FORMAT,
    BucketStage,
    Decode,
    Piece,
    Position,
    ShardSource,
    Split,
    Transform,
    check_format,
    check_split,
)
from mmload.tokenizer import LazyDefault, lazy_default, load_tokenizer, tokenizer_beside

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork; each tokenizes single texts anyway


def _dist_rank_world() -> tuple[int, int] | None:
    """This process's (rank, world size) in torch.distributed's process group; None without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None


class StreamDataset(IterableDataset):
    """What ShardDataset and BlendedDataset share: the bucket stage and the resumable state.

    NOTE [resumable state]: ``state_dict()`` describes the stream after the last item it gave out: its stages'
    states (NOTE [stage state] in :mod:`mmload.stages`) under a ``format`` version. ``load_state_dict`` makes the
    next ``iter()`` go on from there: finished shards are skipped unread, the samples the bucket stage held are
    re-read and put back in their buckets. torchdata's ``StatefulDataLoader`` calls both in each worker, so a
    loader resumes mid-epoch with workers and yields exactly the rest of the uninterrupted run.
    """

    batcher: Any
    trace: torch.Tensor | None = None  # see NOTE [worker trace] in mmload.errors; set by the loader

    def _init_state(self) -> None:
        self._resume: dict[str, Any] | None = None
        self._bucket: BucketStage | None = None

    def _items(self, resume: dict[str, Any] | None) -> Iterator[tuple[Position, Sample]]:
        """The decoded, transformed samples of this rank and worker with their positions; the stages are set up
        (and, given ``resume``, restored) before this returns."""
        raise NotImplementedError

    def _reread(self, positions: Iterable[Position]) -> dict[Position, Sample]:
        raise NotImplementedError

    def _items_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_items_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def samples_of(self, split: Split) -> int:
        """How many raw samples ``split`` reads this epoch, from the shards' sample counts; ``TypeError`` when they
        are not known (see ``__len__``)."""
        raise NotImplementedError

    def __len__(self) -> int:
        """The samples this rank reads this epoch (all its workers), as its shards' ``manifest.json`` (or
        img2dataset's ``*_stats.json``) counts them, bad ones included: bad samples skipped on the way make an
        epoch shorter. ``TypeError`` when the counts are not known, as for any iterable without a length."""
        rank, world = self.rank, self.world_size
        return self.samples_of(Split(rank, world, 0, 1))

    def samples(self) -> Iterator[Sample]:
        """Decoded samples of this rank and worker, in order; bad ones skipped and counted (or raised)."""
        for _, sample in self._items(None):
            yield sample

    def __iter__(self) -> Iterator[Sample] | Iterator[list[Sample]]:
        resume, self._resume = self._resume, None
        items = self._items(None if resume is None else resume["stream"])
        self._bucket = None
        if self.batcher is None:
            return (sample for _, sample in items)
        self._bucket = BucketStage(self.batcher)
        if resume is not None and resume["bucket"] != {"fresh": True}:  # the stage had started
            self._bucket.restore(resume["bucket"], self._reread)
        return self._bucket(items)

    def state_dict(self) -> dict[str, Any]:
        if self._resume is not None:  # loaded, not iterated yet: the stream is where the state says
            return self._resume
        return {"format": STATE_FORMAT, "stream": self._items_state(),
                "bucket": {"fresh": True} if self._bucket is None else self._bucket.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_format(state, type(self).__name__)
        self._resume = state
        self._load_items_state(state["stream"])


class ShardDataset(StreamDataset):
    """An ``IterableDataset`` of :class:`Sample` over webdataset shards.

    Args:
        urls: shard paths, brace patterns, directories of ``*.tar`` or ``pipe:`` URLs.
        tokenizer: a HF tokenizer, a name or local path for ``AutoTokenizer``, or ``None`` for the one
            ``mmload make-shards`` stored beside the shards, else the bundled bert-base-uncased WordPiece
            (:func:`mmload.tokenizer.default_tokenizer`, logged once).
        image_size: images are decoded to uint8 ``(3, image_size, image_size)``.
        resolution: ``"square"`` (the default: shorter side resized to ``image_size``, centre crop) or ``"native"``:
            the aspect ratio kept and the whole image resized to ``(rows * patch_size, cols * patch_size)`` with at
            most ``max_patches`` patches (Pix2Struct's scale, NOTE [native grid] in :mod:`mmload.decode`); down only
            unless ``upscale``. ``max_patches`` defaults to the square's grid, ``(image_size / patch_size) ** 2``;
            ``patch_size`` should be the model's.
        max_text_len: texts are truncated to this many tokens, ``[CLS]`` and ``[SEP]`` included.
        shuffle: shuffle shard order and, through a ``shuffle_buffer`` of raw samples, samples in each shard.
        seed: seed of every shuffle; ``set_epoch`` changes the order from epoch to epoch.
        strict: raise on the first bad sample or shard (the message names the URL and key) instead of
            skipping and counting it.
        transform: a picklable ``Sample -> Sample`` applied after decoding (e.g. ``MLMMasking``).
        batcher: a picklable batcher run in the workers as the bucket stage: a ``BucketBatcher`` (or anything
            with its ``holder()``); use ``DataLoader(batch_size=None)`` with it.
        rank, world_size: this process's share; default from ``torch.distributed`` when initialised.
        max_pixels: images with more pixels are skipped as ``image_too_large``.
        max_consecutive_errors: stop with ``TooManyErrors`` after this many bad samples in a row.
        max_member_bytes: a tar member larger than this is skipped unread (``member_too_large``).
        retries: a shard that fails before its first sample is tried this many more times.
        read_timeout: seconds a remote shard may send nothing before it fails as ``shard_timeout`` (retried, then
            counted, and the stream goes on); 0 waits for ever.
        max_sample_bytes: a sample whose members add up to more is skipped (``sample_too_large``), the rest of it
            unread.
        shuffle_buffer_bytes: the shuffle buffer passes samples on once it holds more than this (besides holding at
            most ``shuffle_buffer`` samples), so memory stays bounded by bytes.

    Besides the bad samples it skips, ``errors`` counts notices about samples it delivers
    (``mmload.errors.NOTICES``): members no field reads (``unused_member``) and keys that an earlier shard of the
    same stream delivered too (``duplicate_key_across_shards``; a worker remembers up to ``KeySet.limit`` keys,
    ``mmload inspect`` all of them).
    """

    def __init__(self, urls: str | Sequence[str], *, tokenizer: Any = None, image_size: int = 224,
                 max_text_len: int = 512, shuffle: bool = False, shuffle_buffer: int = 1000, seed: int = 0,
                 strict: bool = False, transform: Callable[[Sample], Sample] | None = None,
                 batcher: Callable[[Iterator[Sample]], Iterator[list[Sample]]] | None = None,
                 rank: int | None = None, world_size: int | None = None, max_pixels: int | None = None,
                 max_consecutive_errors: int | None = 1000, max_member_bytes: int = MAX_MEMBER_BYTES,
                 retries: int = 2, read_timeout: float = READ_TIMEOUT, max_sample_bytes: int = MAX_SAMPLE_BYTES,
                 shuffle_buffer_bytes: int = SHUFFLE_BUFFER_BYTES, resolution: str = "square",
                 max_patches: int | None = None, patch_size: int = PATCH_SIZE, upscale: bool = False) -> None:
        self.urls = expand_urls(urls)
        if isinstance(tokenizer, str | os.PathLike):
            tokenizer = load_tokenizer(os.fspath(tokenizer), self.urls)
        elif tokenizer is None:  # the one beside the shards, else the default when a text needs it
            local = [u for u in self.urls if os.path.exists(u)] or self.urls
            tokenizer = tokenizer_beside(local) or lazy_default(local)
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        if (rank is None) != (world_size is None):
            raise ValueError(f"give rank and world_size together (or neither), got rank={rank}, "
                             f"world_size={world_size}")
        if rank is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self._rank_world = None if rank is None else (rank, world_size)
        decoder_args = {} if max_pixels is None else {"max_pixels": max_pixels}
        self.decoder = Decoder(tokenizer, image_size=image_size, max_text_len=max_text_len, resolution=resolution,
                               max_patches=max_patches, patch_size=patch_size, upscale=upscale, **decoder_args)
        self.shuffle, self.shuffle_buffer, self.seed, self.strict = shuffle, shuffle_buffer, seed, strict
        self.transform, self.batcher = transform, batcher
        if max_member_bytes < 1 or retries < 0:
            raise ValueError(f"max_member_bytes must be >= 1 and retries >= 0, got {max_member_bytes}, {retries}")
        self.limits = ReadLimits(read_timeout, max_sample_bytes, shuffle_buffer_bytes)  # checks them
        self.max_member_bytes, self.retries, self.read_timeout = max_member_bytes, retries, read_timeout
        self.errors = ErrorCounter(max_consecutive_errors)
        self._decode = Decode(self.decoder, self.errors, strict)
        self.epoch = 0
        self._stages: tuple[Split, ShardSource] | None = None
        self.plan: dict[int, list[list[Piece]]] | None = None  # epoch -> pieces per worker (mmload.elastic)
        self.carried_errors: dict[str, int] | None = None  # an elastic resume's old counts, for rank 0's worker 0
        self.balanced = False  # equal shares per stream (set on a blend's sources)
        self.shard_counts: list[int] | None = None  # samples per shard, when balanced
        self._init_state()

    @property
    def tokenizer(self) -> Any:
        if isinstance(self.decoder.tokenizer, LazyDefault):
            self.decoder.tokenizer = self.decoder.tokenizer.load()
        return self.decoder.tokenizer

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for a ``spawn`` or ``forkserver`` DataLoader worker: the placement is settled here, in the main
        process, where ``torch.distributed`` knows this rank (a fresh worker process has no process group and
        would take itself for rank 0 of 1, so every rank would read every shard)."""
        state = self.__dict__.copy()
        if state["_rank_world"] is None:  # a copy made before init_process_group stays unsettled
            state["_rank_world"] = _dist_rank_world()
        return state

    @property
    def rank(self) -> int:
        """This process's rank: as given, else torch.distributed's when iterating (so a dataset made before
        ``init_process_group`` still splits by rank)."""
        return self._placement()[0]

    @property
    def world_size(self) -> int:
        return self._placement()[1]

    def _placement(self) -> tuple[int, int]:
        return self._rank_world or _dist_rank_world() or (0, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def split(self) -> Split:
        """This stream's share: the rank's, and the DataLoader worker's it runs in (0 of 1 outside workers)."""
        info = get_worker_info()
        rank, world = self._placement()
        return Split(rank, world, *((0, 1) if info is None else (info.id, info.num_workers)))

    def _read(self, url: str) -> Iterator[dict[str, Any]]:
        return read_shard(url, self.max_member_bytes, self.retries, read_timeout=self.read_timeout,
                          max_sample_bytes=self.limits.max_sample_bytes)

    def _rng(self, url: str) -> random.Random | None:
        # string seeds hash stably across processes
        return random.Random(f"{self.seed}/{self.epoch}/{url}") if self.shuffle else None

    def shards(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shards this rank's ``worker`` reads this epoch without an elastic plan (see NOTE [splitting])."""
        rank, world = self._placement()
        return [p.url for p in self.default_pieces(self.epoch, Split(rank, world, worker, num_workers))]

    def default_pieces(self, epoch: int, split: Split) -> list[Piece]:
        """What ``split`` reads in ``epoch`` without an elastic plan: whole shards (see NOTE [splitting])."""
        ids = list(range(len(self.urls)))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            ids = [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()]
        mine = ids[split.rank::split.world_size][split.worker::split.num_workers]
        return [Piece(i, self.urls[i]) for i in mine]

    def balanced_pieces(self, epoch: int, split: Split) -> list[Piece] | None:
        """What ``split`` reads in ``epoch`` when every stream must get an equal share (a blend's sources, NOTE
        [blend mix] in ``BlendedDataset``): the ``k``-th of ``S`` equal ranges of the epoch's samples, shard after
        shard in the epoch's shard order, from the per-shard counts (``shard_counts``); None without counts."""
        if self.shard_counts is None:
            return None
        order = [p.shard for p in self.default_pieces(epoch, Split())]
        streams = split.world_size * split.num_workers
        k = split.rank * split.num_workers + split.worker
        total = sum(self.shard_counts[i] for i in order)
        lo, hi = total * k // streams, total * (k + 1) // streams
        pieces, at = [], 0
        for i in order:
            n = self.shard_counts[i]
            start, stop = max(lo, at) - at, min(hi, at + n) - at
            if start < stop:  # the range that reaches a shard's end reads to its real end, whatever the count said
                pieces.append(Piece(i, self.urls[i], start=start, stop=None if stop == n else stop))
            at += n
        return pieces

    def samples_of(self, split: Split) -> int:
        if self.plan:
            raise TypeError("len() of a ShardDataset resumed elastically is not known in advance: its epochs hold "
                            "what the old ranks left")
        counts = self.shard_counts if self.shard_counts is not None else shard_samples(self.urls)
        if counts is None:
            raise TypeError(f"len() of a ShardDataset needs each shard's sample count, from the manifest.json beside "
                            f"the shards (mmload make-shards writes it) or img2dataset's *_stats.json; {self.urls[0]} "
                            "has none")
        self.shard_counts = counts
        return sum((counts[p.shard] if p.stop is None else p.stop) - p.start for p in self._pieces(split))

    def _pieces(self, split: Split) -> list[Piece]:
        """What ``split`` reads this epoch: its elastic plan's pieces, else its balanced share (a blend's source with
        sample counts), else its whole shards."""
        plan = (self.plan or {}).get(self.epoch)
        if plan is not None:
            return plan[split.worker]
        balanced = self.balanced_pieces(self.epoch, split) if self.balanced else None
        return balanced if balanced is not None else self.default_pieces(self.epoch, split)

    def _source(self, split: Split) -> ShardSource:
        return ShardSource(self._pieces(split), self._read, rng=self._rng,
                           buffer=self.shuffle_buffer, on_damage=self._decode.bad, trace=self.trace,
                           worker=split.worker, buffer_bytes=self.limits.shuffle_buffer_bytes)

    def _items(self, resume: dict[str, Any] | None) -> Iterator[tuple[Position, Sample]]:
        split = self.split()
        if resume is not None:
            check_split(resume["split"], split.as_dict())
            self.check_order(resume["order"])
            self.epoch = resume["epoch"]
        source = self._source(split)
        if self.carried_errors and resume is None and split.rank == split.worker == 0:
            self.errors.counts.update(self.carried_errors)
            self.carried_errors = None
        if not source.shards and resume is None and not (self.plan or {}).get(self.epoch):
            log.warning("rank %d worker %d of %d has no shard to read (%d shards for %d ranks x %d workers): make "
                        "more shards, or fewer workers", split.rank, split.worker, split.num_workers, len(self.urls),
                        split.world_size, split.num_workers)
        if resume is not None:
            source.load_state_dict(resume["source"])
        self._stages = (split, source)
        self._decode.reset_keys()
        return Transform(self.transform)(self._decode(source))

    def _reread(self, positions: Iterable[Position]) -> dict[Position, Sample]:
        raws = self._stages[1].reread(positions)
        fn = self.transform or (lambda s: s)
        return {pos: fn(self.decoder(raw)) for pos, raw in raws.items()}  # held samples decoded fine before

    def _items_state(self) -> dict[str, Any]:
        if self._stages is None:  # not iterated yet: the split it will read, from its start
            split = self.split()
            self._stages = (split, self._source(split))
        split, source = self._stages
        return {"epoch": self.epoch, "split": split.as_dict(), "source": source.state_dict(),
                "decode": self._decode.state_dict(), "order": self.order()}

    def order(self) -> dict[str, Any]:
        """What decides which raw sample a position ``(shard, offset)`` names: the shuffle and its bounds (a
        sample's size, with what ``max_*_bytes`` left out of it, moves the byte-bounded buffer)."""
        return {"shuffle": self.shuffle, "seed": self.seed, "shuffle_buffer": self.shuffle_buffer,
                "shuffle_buffer_bytes": self.limits.shuffle_buffer_bytes,
                "max_sample_bytes": self.limits.max_sample_bytes, "max_member_bytes": self.max_member_bytes}

    def check_order(self, saved: dict[str, Any]) -> None:
        """Refuse a state whose positions name other samples here (another seed, shuffle or byte bound)."""
        now = self.order()
        changed = [f"{k}={saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]
        if changed:
            raise ValueError(f"cannot resume: the state was saved with other settings that decide the order of the "
                             f"samples ({', '.join(changed)}), so its positions would name other samples; resume with "
                             "the settings it was saved with, or start the epoch over")

    def _load_items_state(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]  # before iter(): re-reading held samples needs this epoch's order
        self._decode.load_state_dict(state["decode"])


class BlendedDataset(StreamDataset):
    """Several shard sets blended by weight into one stream, deterministically per seed.

    At each step a source is drawn with probability proportional to its weight among those not yet
    exhausted, so every sample of every source is still read exactly once per epoch (``stop="all"``);
    ``stop="first"`` ends the epoch when the first source runs out (the rest of the others is not read).

    NOTE [blend mix]: each stream (a worker of a rank) blends its own share of every source, and the DataLoader
    takes a batch from each worker in turn, so the whole loader's mix matches the weights only if every stream
    has an equal share of every source: else a stream with less of a source runs out of it early, and leans to
    the others from then on. A blend's sources are therefore split by samples, not shards: stream ``k`` of ``S``
    reads the ``k``-th ``1/S`` of each source's samples (counted by its manifest, or img2dataset's
    ``*_stats.json``), shard after shard; a shard on a boundary is read by two streams, each delivering its part.
    Without counts the split is by whole shards, and a warning says when that cannot be even.
    """

    def __init__(self, sources: Sequence[ShardDataset], weights: Sequence[float], *, seed: int = 0,
                 stop: str = "all", batcher: Callable[[Iterator[Sample]], Iterator[list[Sample]]] | None = None
                 ) -> None:
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"need one weight per source, got {len(sources)} sources and {len(weights)} weights")
        if any(w <= 0 for w in weights):
            raise ValueError(f"weights must be > 0, got {list(weights)}")
        if stop not in ("all", "first"):
            raise ValueError(f"stop must be 'all' or 'first', got {stop!r}")
        self.sources, self.weights = list(sources), list(weights)
        self.seed, self.stop, self.batcher = seed, stop, batcher
        for src in self.sources:  # NOTE [blend mix]
            src.balanced, src.shard_counts = True, shard_samples(src.urls)
        self.epoch = 0
        self._rng = random.Random(f"{seed}/0/0")
        self._live = list(range(len(self.sources)))
        self._init_state()

    @property
    def tokenizer(self) -> Any:
        return self.sources[0].tokenizer

    @property
    def rank(self) -> int:
        return self.sources[0].rank

    @property
    def world_size(self) -> int:
        return self.sources[0].world_size

    @property
    def errors(self) -> ErrorCounter:
        merged = ErrorCounter()
        for s in self.sources:
            merged.counts.update(s.errors.counts)
        return merged

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for s in self.sources:
            s.set_epoch(epoch)

    def samples_of(self, split: Split) -> int:
        if self.stop == "first":
            raise TypeError("len() of a blend with stop='first' is not known in advance: it ends when a source does")
        return sum(src.samples_of(split) for src in self.sources)

    def _items(self, resume: dict[str, Any] | None) -> Iterator[tuple[Position, Sample]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        self._rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
        if resume is None and self.rank == 0 and worker == 0:
            self._warn_unbalanced(self.world_size * num_workers)
        self._live = list(range(len(self.sources)))
        subs: list[dict[str, Any] | None] = [None] * len(self.sources)
        if resume is not None:
            self._rng.setstate(_as_tuple(resume["rng"]))
            self._live, subs = list(resume["live"]), resume["sources"]
        for src in self.sources:
            src.trace = self.trace
        streams = [src._items(sub) for src, sub in zip(self.sources, subs)]
        return self._blend(streams)

    def _warn_unbalanced(self, streams: int) -> None:
        for i, src in enumerate(self.sources):
            if src.shard_counts is None and len(src.urls) % streams:
                log.warning("blend source %d (%s, ...) has %d shards and no per-shard sample counts (manifest.json or "
                            "img2dataset *_stats.json) for %d streams (ranks x workers): %s, so the delivered mix "
                            "leans away from its weight; give its shards a manifest, or a multiple of %d shards", i,
                            src.urls[0], len(src.urls), streams, "some streams read none of it" if
                            len(src.urls) < streams else "streams get unequal shares of it", streams)

    def _blend(self, streams: list[Iterator[tuple[Position, Sample]]]) -> Iterator[tuple[Position, Sample]]:
        while self._live:
            i = self._rng.choices(self._live, weights=[self.weights[j] for j in self._live])[0]
            try:
                pos, sample = next(streams[i])
            except StopIteration:
                if self.stop == "first":
                    return
                self._live.remove(i)
                continue
            yield (i, *pos), sample

    def _reread(self, positions: Iterable[Position]) -> dict[Position, Sample]:
        positions = list(positions)
        out: dict[Position, Sample] = {}
        for i, src in enumerate(self.sources):
            mine = [p[1:] for p in positions if p[0] == i]
            if mine:
                out.update({(i, *p): smp for p, smp in src._reread(mine).items()})
        return out

    def _items_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "rng": self._rng.getstate(), "live": list(self._live),
                "sources": [src._items_state() for src in self.sources]}

    def _load_items_state(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        for src, sub in zip(self.sources, state["sources"]):
            src._load_items_state(sub)


def _as_tuple(x: Any) -> Any:
    """``random.Random.getstate()`` after a round trip through JSON-like containers (lists) again."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def parse_data(specs: str | Sequence[str]) -> list[tuple[list[str], float]]:
    """``--data`` values: ``SHARDS`` or ``SHARDS@WEIGHT`` (e.g. ``images/{000..009}.tar@8``).

    Without any ``@WEIGHT`` the values are one shard set (their union); with weights, each value is a set of
    its own (a value without a weight weighs 1) and the sets are blended.
    """
    specs = [os.fspath(specs)] if isinstance(specs, str | os.PathLike) else [os.fspath(x) for x in specs]
    parsed = []
    for spec in specs:
        urls, sep, weight = spec.rpartition("@")
        if sep and _is_number(weight) and not 0 < float(weight) < float("inf"):
            raise ValueError(f"--data {spec!r}: a weight must be a number > 0, got {weight}")
        parsed.append(([urls], float(weight)) if sep and _is_number(weight) else ([spec], None))
    if all(w is None for _, w in parsed):
        return [([u for urls, _ in parsed for u in urls], 1.0)]
    return [(urls, 1.0 if w is None else w) for urls, w in parsed]


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def open_data(specs: str | Sequence[str], *, seed: int = 0,
              batcher: Callable[[Iterator[Sample]], Iterator[list[Sample]]] | None = None,
              **kwargs: Any) -> ShardDataset | BlendedDataset:
    """One ``--data`` spec gives a ShardDataset; several are blended by their ``@WEIGHT``."""
    parsed = parse_data(specs)
    if len(parsed) == 1:
        return ShardDataset(parsed[0][0], seed=seed, batcher=batcher, **kwargs)
    tokenizer = kwargs.pop("tokenizer", None)
    first = ShardDataset(parsed[0][0], seed=seed, tokenizer=tokenizer, **kwargs)
    shared = first.decoder.tokenizer  # not first.tokenizer: a lazy default stays lazy
    rest = [ShardDataset(u, seed=seed, tokenizer=shared, **kwargs) for u, _ in parsed[1:]]
    return BlendedDataset([first, *rest], [w for _, w in parsed], seed=seed, batcher=batcher)


__all__ = ["BlendedDataset", "ShardDataset", "StreamDataset", "expand_urls", "open_data", "parse_data", "read_shard"]
