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
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import braceexpand
import torch
import webdataset
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from mmload.decode import Decoder
from mmload.errors import ErrorCounter, ErrorKind, SampleError, log, write_trace
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


def read_shard(url: str, max_member_bytes: int = MAX_MEMBER_BYTES, retries: int = 2,
               backoff: float = 0.5) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__", "__url__", ext: bytes, ...}`` of one tar (local path, ``pipe:`` or URL).

    Members are grouped by key (everything before the first dot of the file name). A bad member (too large,
    duplicated) or a key seen earlier in the shard is listed under ``"__errors__"`` of its sample; a shard
    that cannot be opened or ends early raises :class:`SampleError` of kind ``shard_read`` after the samples
    read before the damage. A remote shard (``pipe:``, ``http:``, ...) that fails before its first sample is
    tried ``retries`` more times, ``backoff`` seconds apart, doubling; one that fails later is not re-read, since
    that would repeat samples. A local file is not retried: waiting does not mend it.
    """
    if not _is_remote(url):
        retries = 0
    for attempt in range(retries + 1):
        started = False
        try:
            for raw in _read_tar(url, max_member_bytes):
                started = True
                yield raw
            return
        except SampleError as e:
            if started or attempt == retries:
                if attempt:
                    e.args = (f"{e.args[0]} (after {attempt + 1} attempts)",)
                raise
            log.info("retrying %s after: %s", url, e)
            time.sleep(backoff * 2**attempt)


def _is_remote(url: str) -> bool:
    scheme = urlparse(url).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter is a Windows drive


def _read_tar(url: str, max_member_bytes: int) -> Iterator[dict[str, Any]]:
    try:
        stream = webdataset.gopen(url, "rb")
    except Exception as e:
        raise SampleError(ErrorKind.SHARD_READ, f"cannot open: {type(e).__name__}: {e}", url) from e
    current: dict[str, Any] | None = None
    seen: set[str] = set()
    counted = _TailReader(stream)
    done = False
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
                    if key in seen:
                        current["__errors__"] = [SampleError(ErrorKind.DUPLICATE_KEY, "key seen earlier in the "
                                                             "shard (members of one sample must be adjacent)",
                                                             url, key)]
                    seen.add(key)
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
            plain = tar.fileobj.comptype == "tar"
            if not (counted.ends_cleanly(tar.offset) if plain else _inflates_to_the_end(tar.fileobj, tar.offset)):
                raise tarfile.ReadError(f"truncated after {tar.offset} bytes: no end-of-archive block")
            if current is not None:
                yield current  # complete: the archive ends cleanly after it (a cut may have taken more members)
                current = None
        done = True
    except (tarfile.TarError, OSError, EOFError, ValueError, TypeError) as e:  # TypeError: a gzip header cut short
        raise SampleError(ErrorKind.SHARD_READ, f"unreadable or truncated tar: {type(e).__name__}: {e}", url) from e
    finally:
        try:
            stream.close()  # a pipe: reports its command's exit status here
        except Exception as e:
            # After an error, or when the reader stops early (the command then dies of SIGPIPE), the first
            # cause stands; after a complete read, a failed command still marks the shard as damaged.
            if done:
                raise SampleError(ErrorKind.SHARD_READ, f"the source failed: {type(e).__name__}: {e}", url) from e


class _TailReader:
    """A read-only stream that remembers how many bytes it gave and the last ones.

    NOTE [truncated tars]: Python's tarfile treats a header cut short anywhere but at offset 0 as the end of
    the archive, so a truncated shard would end without an error and its lost samples would go unnoticed.
    A complete uncompressed tar has a zero block where its members end; we check for it. A compressed one
    must reach the end of its compressed stream: tarfile stops quietly where compressed data stops, too. Until
    then the sample being read is not known to be whole (the cut may have taken its next member), so it is
    dropped with the shard's ``shard_read``.

    NOTE [reads past the end]: in stream mode tarfile skips the data of a member it is not asked to read by
    reading on, block by block, and goes on past the end of the data: a header whose size field says 2**80
    bytes would spin for ever. A complete read meets the end only a few times, so a stream read at its end
    more than ``READS_AT_END`` times raises instead.
    """

    KEEP = 1 << 16
    READS_AT_END = 64

    def __init__(self, raw: Any) -> None:
        self.raw, self.total, self.tail, self.at_end = raw, 0, b"", 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if not data and n:
            self.at_end += 1
            if self.at_end > self.READS_AT_END:
                raise EOFError(f"read past the end of the data after {self.total} bytes (a member's size runs "
                               "past the end)")
        self.total += len(data)
        self.tail = (self.tail + data)[-self.KEEP:]
        return data

    def ends_cleanly(self, offset: int) -> bool:
        # read the padding after the last member (tar pads to 10 KiB records), but no more than KEEP bytes
        more = True
        while more and self.total - offset <= self.KEEP:
            more = bool(self.read(1 << 14))
        after = self.total - offset
        if after > self.KEEP:
            return False  # more than padding follows what tarfile read: it stopped early
        block = self.tail[len(self.tail) - after:][:512]
        return len(block) == 512 and not any(block)


def _inflates_to_the_end(stream: Any, offset: int) -> bool:
    """Whether a compressed tar ends cleanly: tarfile read a whole block where its members end (not a header cut
    short), and its decompressing ``_Stream`` reaches the end of the compressed data (bounded like
    ``_TailReader.ends_cleanly``: at most ``KEEP`` bytes of padding after the last member)."""
    if stream.tell() != offset + 512:
        return False
    for _ in range(_TailReader.KEEP >> 14):
        if not stream.read(1 << 14):
            return getattr(stream.cmp, "eof", True)
    return False


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


Position = tuple[int, ...]  # where a sample sits in this worker's stream: (shard, raw sample) or (source, ...)


class StreamDataset(IterableDataset):
    """What ShardDataset and BlendedDataset share: the optional batcher stage and resumable state.

    NOTE [resumable state]: ``state_dict()`` describes the stream after the last item it gave out: the position
    of the next raw sample, error counts and, with a batcher, the samples it holds (``pending``, by position and
    arrival number). ``load_state_dict`` makes the next ``iter()`` re-read the pending samples, hand them back
    to a fresh batcher in their old buckets, and go on from the position, skipping finished shards unread.
    torchdata's ``StatefulDataLoader`` calls both in each worker, so a loader resumes mid-epoch with workers
    and yields exactly the rest of the uninterrupted run. A batcher resumes exactly when it takes
    ``pending=`` and ``start=`` (``BucketBatcher`` does).
    """

    batcher: Callable[..., Iterator[list[Sample]]] | None
    trace: torch.Tensor | None = None  # see NOTE [worker trace] in mmload.errors; set by the loader
    STATE_FED, STATE_PENDING, STATE_STREAM = "fed", "pending", "stream"

    def _init_state(self) -> None:
        self._resume: dict[str, Any] | None = None
        self._fed = 0
        self._pending: dict[int, tuple[Position, int]] = {}  # id(sample) -> (position, arrival number)

    def _positioned(self, resume: dict[str, Any] | None) -> Iterator[tuple[Position, Sample]]:
        raise NotImplementedError

    def _reread(self, positions: Iterable[Position]) -> dict[Position, Sample]:
        raise NotImplementedError

    def _position_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_position_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def samples(self) -> Iterator[Sample]:
        """Decoded samples of this rank and worker, in order; bad ones skipped and counted (or raised)."""
        for _, sample in self._positioned(None):
            yield sample

    def __iter__(self) -> Iterator[Sample] | Iterator[list[Sample]]:
        resume, self._resume = self._resume, None
        stream = self._positioned(None if resume is None else resume[self.STATE_STREAM])
        self._fed, self._pending = 0, {}
        if self.batcher is None:
            return (sample for _, sample in stream)
        restored: list[tuple[int, Sample]] = []
        if resume is not None:
            self._fed = resume[self.STATE_FED]
            pending = [(tuple(pos), arrival) for pos, arrival in resume[self.STATE_PENDING]]
            samples = self._reread(pos for pos, _ in pending)
            for pos, arrival in pending:
                restored.append((arrival, samples[pos]))
                self._pending[id(samples[pos])] = (pos, arrival)
        return self._batched(stream, restored)

    def _batched(self, stream: Iterator[tuple[Position, Sample]],
                 restored: list[tuple[int, Sample]]) -> Iterator[list[Sample]]:
        def feed() -> Iterator[Sample]:
            for pos, sample in stream:
                self._pending[id(sample)] = (pos, self._fed)
                self._fed += 1
                yield sample

        kwargs = {"pending": restored, "start": self._fed} if restored or self._fed else {}
        for batch in self.batcher(feed(), **kwargs):
            for sample in batch:
                self._pending.pop(id(sample), None)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {self.STATE_STREAM: self._position_state(), self.STATE_FED: self._fed,
                self.STATE_PENDING: sorted(self._pending.values(), key=lambda v: v[1])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = state
        self._load_position_state(state[self.STATE_STREAM])


class ShardDataset(StreamDataset):
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
        max_member_bytes: a tar member larger than this is skipped unread (``member_too_large``).
        retries: a shard that fails before its first sample is tried this many more times.
    """

    def __init__(self, urls: str | Sequence[str], *, tokenizer: Any = None, image_size: int = 224,
                 max_text_len: int = 512, shuffle: bool = False, shuffle_buffer: int = 1000, seed: int = 0,
                 strict: bool = False, transform: Callable[[Sample], Sample] | None = None,
                 batcher: Callable[[Iterator[Sample]], Iterator[list[Sample]]] | None = None,
                 rank: int | None = None, world_size: int | None = None, max_pixels: int | None = None,
                 max_consecutive_errors: int | None = 1000, max_member_bytes: int = MAX_MEMBER_BYTES,
                 retries: int = 2) -> None:
        self.urls = expand_urls(urls)
        if isinstance(tokenizer, str | os.PathLike):
            tokenizer = load_tokenizer(os.fspath(tokenizer), self.urls)
        elif tokenizer is None:
            try:
                tokenizer = load_tokenizer(None, [u for u in self.urls if os.path.exists(u)] or self.urls)
            except ValueError:
                tokenizer = None  # image-only shards need none; a text sample then fails with a clear message
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        if (rank is None) != (world_size is None):
            raise ValueError(f"give rank and world_size together (or neither), got rank={rank}, "
                             f"world_size={world_size}")
        if rank is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self._rank_world = None if rank is None else (rank, world_size)
        decoder_args = {} if max_pixels is None else {"max_pixels": max_pixels}
        self.decoder = Decoder(tokenizer, image_size=image_size, max_text_len=max_text_len, **decoder_args)
        self.shuffle, self.shuffle_buffer, self.seed, self.strict = shuffle, shuffle_buffer, seed, strict
        self.transform, self.batcher = transform, batcher
        if max_member_bytes < 1 or retries < 0:
            raise ValueError(f"max_member_bytes must be >= 1 and retries >= 0, got {max_member_bytes}, {retries}")
        self.max_member_bytes, self.retries = max_member_bytes, retries
        self.errors = ErrorCounter(max_consecutive_errors)
        self.epoch = 0
        self._shard = self._sample = 0
        self._where = {"worker": 0, "num_workers": 1}
        self._init_state()

    @property
    def tokenizer(self) -> Any:
        return self.decoder.tokenizer

    @property
    def rank(self) -> int:
        """This process's rank: as given, else torch.distributed's when iterating (so a dataset made before
        ``init_process_group`` still splits by rank)."""
        return (self._rank_world or _dist_rank_world())[0]

    @property
    def world_size(self) -> int:
        return (self._rank_world or _dist_rank_world())[1]

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
        damage = None
        try:
            for raw in read_shard(url, self.max_member_bytes, self.retries):
                if not self.shuffle:
                    yield raw
                    continue
                buffer.append(raw)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        except SampleError as e:
            damage = e
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))
        if damage is not None:  # counted where the shard ends for the stream, so a resume never counts it twice
            self._bad(damage)

    def _bad(self, err: SampleError) -> None:
        if self.strict:
            raise err
        self.errors.add(err)

    def _decode(self, raw: dict[str, Any]) -> Sample | None:
        """The sample of ``raw``, or None when it is bad (then counted, or raised in strict mode)."""
        if "__errors__" in raw:
            self._bad(raw["__errors__"][0])
            return None
        try:
            sample = self.decoder(raw)
        except SampleError as e:
            self._bad(e)
            return None
        self.errors.ok()
        return self.transform(sample) if self.transform is not None else sample

    def _positioned(self, resume: dict[str, Any] | None) -> Iterator[tuple[Position, Sample]]:
        worker, num_workers = self._worker()
        self._check_resume(resume, worker, num_workers)
        self._where = {"worker": worker, "num_workers": num_workers}
        start_shard, start_sample = (resume["shard"], resume["sample"]) if resume else (0, 0)
        shards = self.shards(worker, num_workers)
        if not shards and resume is None:
            log.warning("rank %d worker %d of %d has no shard to read (%d shards for %d ranks x %d workers): make "
                        "more shards, or fewer workers", self.rank, worker, num_workers, len(self.urls),
                        self.world_size, num_workers)
        self._shard, self._sample = start_shard, start_sample
        for k in range(start_shard, len(shards)):
            for j, raw in enumerate(self._raw(shards[k], self._rng(shards[k]))):
                if k == start_shard and j < start_sample:
                    continue  # resuming: finished raw samples are skipped undecoded
                self._shard, self._sample = k, j + 1
                if self.trace is not None:
                    write_trace(self.trace, worker, shards[k], raw["__key__"])
                sample = self._decode(raw)
                if sample is not None:
                    yield (k, j), sample
            self._shard, self._sample = k + 1, 0

    def _rng(self, url: str) -> random.Random:
        return random.Random(f"{self.seed}/{self.epoch}/{url}")  # string seeds hash stably across processes

    def _reread(self, positions: Iterable[Position]) -> dict[Position, Sample]:
        wanted = set(positions)
        worker, num_workers = self._worker()
        shards = self.shards(worker, num_workers)
        out: dict[Position, Sample] = {}
        for k in sorted({k for k, _ in wanted}):
            last = max(j for kk, j in wanted if kk == k)
            for j, raw in enumerate(self._raw(shards[k], self._rng(shards[k]))):
                if (k, j) in wanted:
                    out[(k, j)] = self._decode(raw)
                if j >= last:
                    break
        return out

    def _position_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "rank": self.rank, "world_size": self.world_size, **self._where,
                "shard": self._shard, "sample": self._sample, "errors": dict(self.errors.counts)}

    def _check_resume(self, resume: dict[str, Any] | None, worker: int, num_workers: int) -> None:
        if resume is None:
            return
        # NOTE [resume policy]: shards are split by rank and worker, so a position means something only for the
        # same split. Resuming on another world size or worker count would repeat or skip samples: refuse.
        were = (resume["world_size"], resume["num_workers"], resume["rank"], resume["worker"])
        now = (self.world_size, num_workers, self.rank, worker)
        if were != now:
            raise ValueError(f"cannot resume a stream saved as (world_size, num_workers, rank, worker)={were} as "
                             f"{now}: shards are split by rank and worker, so another split would repeat or skip "
                             "samples. Resume with the same number of ranks and DataLoader workers, or start the "
                             "epoch over")
        self.epoch = resume["epoch"]

    def _load_position_state(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]  # before iter(): re-reading pending samples needs this epoch's order
        self.errors.counts.clear()
        self.errors.counts.update(state["errors"])


class BlendedDataset(StreamDataset):
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
        self._rng = random.Random(f"{seed}/0/0")
        self._live = list(range(len(self.sources)))
        self._init_state()

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

    def _positioned(self, resume: dict[str, Any] | None) -> Iterator[tuple[Position, Sample]]:
        info = get_worker_info()
        self._rng = random.Random(f"{self.seed}/{self.epoch}/{0 if info is None else info.id}")
        self._live = list(range(len(self.sources)))
        subs: list[dict[str, Any] | None] = [None] * len(self.sources)
        if resume is not None:
            self._rng.setstate(_as_tuple(resume["rng"]))
            self._live, subs = list(resume["live"]), resume["sources"]
        for src in self.sources:
            src.trace = self.trace
        streams = [src._positioned(sub) for src, sub in zip(self.sources, subs)]
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
            out.update({(i, *p): smp for p, smp in src._reread(mine).items()})
        return out

    def _position_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "rng": self._rng.getstate(), "live": list(self._live),
                "sources": [src._position_state() for src in self.sources]}

    def _load_position_state(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        for src, sub in zip(self.sources, state["sources"]):
            src._load_position_state(sub)


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
    rest = [ShardDataset(u, seed=seed, tokenizer=first.tokenizer, **kwargs) for u, _ in parsed[1:]]
    return BlendedDataset([first, *rest], [w for _, w in parsed], seed=seed, batcher=batcher)

