"""Reading webdataset shards into a stream of :class:`Sample`: split, shuffle, decode, count what is bad.

NOTE [splitting]: the shard list is expanded and (when shuffling) permuted with a generator seeded by
``seed + epoch``, the same on every rank. Rank ``r`` of ``W`` takes shards ``r::W`` and worker ``w`` of ``K``
takes ``w::K`` of those, so each shard, and therefore each sample, is read exactly once per epoch by exactly
one worker of one rank. With fewer shards than ``W x K`` some workers get none; make more shards than that.

NOTE [shuffling]: samples are shuffled inside each shard through a bounded buffer of raw (undecoded) samples
that is drained at the end of each shard. Shard order is shuffled too, and the DataLoader interleaves workers,
so batches mix shards. Keeping the shuffle inside a shard makes the position ``(shard, sample)`` a complete
description of progress: resuming skips finished shards without reading them.
"""

from __future__ import annotations

import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import braceexpand
import torch
import webdataset
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from mmload.decode import Decoder
from mmload.errors import ErrorCounter, ErrorKind, SampleError
from mmload.sample import Sample
from mmload.tokenizer import load_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork; each tokenizes single texts anyway

MAX_MEMBER_BYTES = 64 << 20  # a tar member larger than this is skipped unread


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace-expand (``shard-{000..009}.tar``) and list directories (every ``*.tar`` inside, sorted)."""
    if isinstance(urls, str | os.PathLike):
        urls = [os.fspath(urls)]
    out: list[str] = []
    for spec in urls:
        for url in braceexpand.braceexpand(os.fspath(spec)):
            if os.path.isdir(url):
                found = sorted(str(p) for p in Path(url).glob("*.tar"))
                if not found:
                    raise FileNotFoundError(f"no *.tar shards in directory {url}")
                out.extend(found)
            else:
                out.append(url)
    if not out:
        raise ValueError(f"no shard URLs in {urls!r}")
    return out


def read_shard(url: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__", "__url__", ext: bytes, ...}`` of one tar (local path, ``pipe:`` or URL).

    Members are grouped by key (everything before the first dot of the file name). A bad member (too large,
    duplicated) is listed under ``"__errors__"`` of its sample; a shard that cannot be opened or ends early
    raises :class:`SampleError` of kind ``shard_read`` after the samples read before the damage.
    """
    try:
        stream = webdataset.gopen(url, "rb")
    except Exception as e:
        raise SampleError(ErrorKind.SHARD_READ, f"cannot open: {type(e).__name__}: {e}", url) from e
    current: dict[str, Any] | None = None
    counted = _TailReader(stream)
    try:
        with tarfile.open(fileobj=counted, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = base_plus_ext(info.name)
                if key is None or key.startswith("__"):
                    continue
                if current is not None and key != current["__key__"]:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                ext = ext.lower()
                if info.size > max_member_bytes:
                    current.setdefault("__errors__", []).append(
                        SampleError(ErrorKind.MEMBER_TOO_LARGE, f"{info.name} is {info.size} bytes", url, key))
                    continue
                if ext in current:
                    current.setdefault("__errors__", []).append(
                        SampleError(ErrorKind.DUPLICATE_MEMBER, f"{info.name} appears twice", url, key))
                    continue
                current[ext] = tar.extractfile(info).read()
            if current is not None:
                yield current  # complete: its last member was read whole
                current = None
            if tar.fileobj.comptype == "tar" and not counted.ends_cleanly(tar.offset):
                raise tarfile.ReadError(f"truncated after {tar.offset} bytes: no end-of-archive block")
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise SampleError(ErrorKind.SHARD_READ, f"unreadable or truncated tar: {type(e).__name__}: {e}", url) from e
    finally:
        stream.close()


class _TailReader:
    """A read-only stream that remembers how many bytes it gave and the last ones.

    NOTE [truncated tars]: Python's tarfile treats a header cut short anywhere but at offset 0 as the end of
    the archive, so a truncated shard would end without an error and its lost samples would go unnoticed.
    A complete uncompressed tar has a zero block where its members end; we check for it. (Compressed
    streams report truncation themselves.)
    """

    KEEP = 1 << 16

    def __init__(self, raw: Any) -> None:
        self.raw, self.total, self.tail = raw, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.total += len(data)
        self.tail = (self.tail + data)[-self.KEEP:]
        return data

    def ends_cleanly(self, offset: int) -> bool:
        while len(self.read(1 << 14)) and self.total - offset <= self.KEEP:
            pass  # read the padding after the last member (tar pads to 10 KiB records)
        after = self.total - offset
        if after > self.KEEP:
            return False  # more than padding follows what tarfile read: it stopped early
        block = self.tail[len(self.tail) - after:][:512]
        return len(block) == 512 and not any(block)


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataset(IterableDataset):
    """An ``IterableDataset`` of :class:`Sample` over webdataset shards.

    Args:
        urls: shard paths, brace patterns, directories of ``*.tar`` or ``pipe:`` URLs.
        tokenizer: a HF tokenizer, a name or local path for ``AutoTokenizer``, or ``None`` to load the one
            ``mmload make-shards`` stored beside the shards.
        image_size: images are decoded to uint8 ``(3, image_size, image_size)``.
        max_text_len: texts are truncated to this many tokens, ``[CLS]`` and ``[SEP]`` included.
        shuffle: shuffle shard order and, through a ``shuffle_buffer`` of raw samples, samples in each shard.
        seed: seed of every shuffle; ``set_epoch`` changes the order from epoch to epoch.
        strict: raise on the first bad sample or shard (the message names the URL and key) instead of
            skipping and counting it.
        transform: a picklable ``Sample -> Sample`` applied after decoding (e.g. ``MLMMasking``).
        batcher: a picklable stage ``Iterator[Sample] -> Iterator[list[Sample]]`` run in the workers
            (e.g. ``BucketBatcher``); use ``DataLoader(batch_size=None)`` with it.
        rank, world_size: this process's share; default from ``torch.distributed`` when initialised.
        max_pixels: images with more pixels are skipped as ``image_too_large``.
        max_consecutive_errors: stop with ``TooManyErrors`` after this many bad samples in a row.
    """

    def __init__(self, urls: str | Sequence[str], *, tokenizer: Any = None, image_size: int = 224,
                 max_text_len: int = 512, shuffle: bool = False, shuffle_buffer: int = 1000, seed: int = 0,
                 strict: bool = False, transform: Callable[[Sample], Sample] | None = None,
                 batcher: Callable[[Iterator[Sample]], Iterator[list[Sample]]] | None = None,
                 rank: int | None = None, world_size: int | None = None, max_pixels: int | None = None,
                 max_consecutive_errors: int | None = 1000) -> None:
        self.urls = expand_urls(urls)
        if isinstance(tokenizer, str | os.PathLike):
            tokenizer = load_tokenizer(os.fspath(tokenizer), self.urls)
        elif tokenizer is None:
            try:
                tokenizer = load_tokenizer(None, self.urls)
            except ValueError:
                tokenizer = None  # image-only shards need none; a text sample then fails with a clear message
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        dist_rank, dist_world = _dist_rank_world()
        self.rank = dist_rank if rank is None else rank
        self.world_size = dist_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        decoder_args = {} if max_pixels is None else {"max_pixels": max_pixels}
        self.decoder = Decoder(tokenizer, image_size=image_size, max_text_len=max_text_len, **decoder_args)
        self.shuffle, self.shuffle_buffer, self.seed, self.strict = shuffle, shuffle_buffer, seed, strict
        self.transform, self.batcher = transform, batcher
        self.errors = ErrorCounter(max_consecutive_errors)
        self.epoch = 0

    @property
    def tokenizer(self) -> Any:
        return self.decoder.tokenizer

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shards this rank's ``worker`` reads this epoch (see NOTE [splitting])."""
        order = list(self.urls)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
        return order[self.rank::self.world_size][worker::num_workers]

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _raw(self, url: str, rng: random.Random) -> Iterator[dict[str, Any]]:
        """Raw samples of one shard, buffer-shuffled when shuffling; a shard error ends the shard."""
        buffer: list[dict[str, Any]] = []
        try:
            for raw in read_shard(url):
                if not self.shuffle:
                    yield raw
                    continue
                buffer.append(raw)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        except SampleError as e:
            self._bad(e)
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))

    def _bad(self, err: SampleError) -> None:
        if self.strict:
            raise err
        self.errors.add(err)

    def samples(self) -> Iterator[Sample]:
        """Decoded samples of this rank and worker, in order; bad ones skipped and counted (or raised)."""
        worker, num_workers = self._worker()
        for url in self.shards(worker, num_workers):
            rng = random.Random(f"{self.seed}/{self.epoch}/{url}")  # string seeds hash stably across processes
            for raw in self._raw(url, rng):
                if "__errors__" in raw:
                    self._bad(raw["__errors__"][0])
                    continue
                try:
                    sample = self.decoder(raw)
                except SampleError as e:
                    self._bad(e)
                    continue
                self.errors.ok()
                yield self.transform(sample) if self.transform is not None else sample

    def __iter__(self) -> Iterator[Sample] | Iterator[list[Sample]]:
        stream = self.samples()
        return self.batcher(stream) if self.batcher is not None else stream


class BlendedDataset(IterableDataset):
    """Several shard sets blended by weight into one stream, deterministically per seed.

    At each step a source is drawn with probability proportional to its weight among those not yet
    exhausted, so every sample of every source is still read exactly once per epoch (``stop="all"``);
    ``stop="first"`` ends the epoch when the first source runs out (the rest of the others is not read).
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
        self.epoch = 0

    @property
    def tokenizer(self) -> Any:
        return self.sources[0].tokenizer

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

    def samples(self) -> Iterator[Sample]:
        info = get_worker_info()
        rng = random.Random(f"{self.seed}/{self.epoch}/{0 if info is None else info.id}")
        streams = [s.samples() for s in self.sources]
        weights = list(self.weights)
        live = list(range(len(streams)))
        while live:
            i = rng.choices(live, weights=[weights[j] for j in live])[0]
            try:
                yield next(streams[i])
            except StopIteration:
                if self.stop == "first":
                    return
                live.remove(i)

    def __iter__(self) -> Iterator[Sample] | Iterator[list[Sample]]:
        stream = self.samples()
        return self.batcher(stream) if self.batcher is not None else stream


def parse_data(specs: str | Sequence[str]) -> list[tuple[str, float]]:
    """``--data`` values: ``SHARDS`` or ``SHARDS@WEIGHT`` (e.g. ``images/{000..009}.tar@8``)."""
    out = []
    for spec in [specs] if isinstance(specs, str) else specs:
        urls, sep, weight = spec.rpartition("@")
        if sep and _is_number(weight):
            out.append((urls, float(weight)))
        else:
            out.append((spec, 1.0))
    return out


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
    rest = [ShardDataset(u, seed=seed, tokenizer=first.tokenizer, **kwargs) for u, _ in parsed[1:]]
    return BlendedDataset([first, *rest], [w for _, w in parsed], seed=seed, batcher=batcher)

