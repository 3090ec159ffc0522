"""Same-modality bucketing: every batch holds one modality, texts of similar lengths, and is full.

Two forms of one idea: :class:`BucketBatcher`, a stream stage for iterable datasets (it runs inside the
DataLoader workers and yields lists of samples), and :class:`ModalityBucketBatchSampler`, a ``batch_sampler``
for map-style datasets (cf. LLaVA's modality-grouped sampler). Both feed :class:`~mmload.PaddedCollator`.

NOTE [pooled buckets]: fixed length buckets (8 tokens apart, then wider) cut a stream into some thirty buckets,
most of them rare, and a stream stage cannot wait for each to fill: it flushed them half empty (on the builtin
data 55 of 123 batches were full, mean 16.3 of 32). Instead each modality has one pool, and a pool gives a batch
when, of its samples sorted by text length, a run of consecutive ones makes a full batch that pads at most
``max_padding`` (15%): the run that wastes least (a megabatch sorted and cut, as LLaVA's length-grouped sampler and
fairseq's ``batch_by_size`` do, one batch at a time, so the long tail waits for its like instead of padding the
middle). The length groups adapt to the data. A pool looks for such a batch when it holds ``pool_batches``
batches' worth, and when its oldest sample has waited half of ``max_wait`` arrivals (then the batch must hold that
sample). At ``max_wait`` the oldest sample must leave: with the samples nearest its length, as many as keep the
padding within bounds, a partial batch counted in ``flushes["age"]`` (``"memory"`` when more than
``max_buffered`` is held). The end of the stream cuts each pool in length order, each batch as big as the padding
bound allows (its partial batches counted as ``"end"``), and a sample larger than ``max_tokens`` alone is a batch of
one (``"oversized"``). So:
padding stays within ``max_padding``; batches are full where the data has enough samples of like length within
``max_wait``; what is not full is counted. A rare modality with spread-out lengths (texts 1 in 9, lognormal) fills
a share of its batches that grows with ``max_wait``; a token budget (``max_tokens``) fills them whatever the
lengths, since a batch of long texts holds fewer of them. Every sample comes out exactly once.

Images of several sizes (native resolution) share the image pool too, and the same windows apply with image
padding as the measure: a batch's images pad to its largest rows and its largest columns (``n * (R * C + 1)``
tokens, class tokens included, less each image's own: what ``ImageBatch.padded_tokens`` counts), at the batcher's
``patch_size``. Padding is not a function of one sorted key (a 2x98 and a 98x2 image have one patch count and pad
98% together), so the pool is ordered by grid (rows, then columns up and down by turns: ``_snake``) and a run's
padding is taken from its running maxima of rows and columns (``_ImageRuns``). Exact-size pools were tried first
and fragmented into batches of a few images when grids are many (337 grids of 6000 images gave 4 a batch); a
sorted pool lets neighbouring grids share a batch within ``max_padding``. Images all of one size (square images)
have nothing to sort: their pool gives the oldest batch as soon as it holds one, as it always did. On the builtin
data at native resolution (3000 samples, batches of 32) image padding fell from 50% to 6% at 64 patches of 8 (13
grids), image batches 97% full on average (99% before); with many grids (196 patches of 16: 138 grids) from 63% to
11%, but fewer images find their like within ``max_wait`` (image batches 45% full; 74% with ``max_wait`` at 64
batches' worth). Pairs are grouped by text length alone: their images pad to the batch's largest grid, counted in
``stats()``. A pool that found no batch is searched again, at its next sample, only where a batch holds that
sample or ends just before it (``Held.tried``): any other batch is one it had, and had refused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from mmload.layouts import PATCH_SIZE
from mmload.raw import RawInput, as_samples
from mmload.sample import Modality, Sample

POOL_BATCHES = 8  # batches' worth a pool holds before it gives one (NOTE [pooled buckets])


@dataclass(frozen=True)
class Budget:
    """How big one batch is: ``batch_size`` samples, or as many samples as fit ``max_tokens`` tokens.

    Tokens are text tokens plus, per image, ``image_tokens`` (its patches and class token) or, with ``patch_size``
    instead, its own grid's (``(H / p) x (W / p)`` patches and the class token: images at native resolution); with
    ``padded`` (the padded and bucketed layouts) the texts of a batch cost its longest text each and its images
    the grid of its largest rows and columns each, as the dense tensors hold them.
    """

    batch_size: int | None = None
    max_tokens: int | None = None
    image_tokens: int | None = None
    padded: bool = True
    patch_size: int | None = None  # with max_tokens and no image_tokens: each image costs its own grid

    def __post_init__(self) -> None:
        if (self.batch_size is None) == (self.max_tokens is None):
            raise ValueError(f"give batch_size or max_tokens, not both nor neither (got batch_size="
                             f"{self.batch_size}, max_tokens={self.max_tokens})")
        for name in ("batch_size", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_tokens is not None and self.image_tokens is None and self.patch_size is None:
            raise ValueError("give image_tokens (the tokens an image costs: patches + class token, e.g. "
                             "(image_size // patch_size) ** 2 + 1) with max_tokens, or patch_size (each image "
                             "costs its own grid: images at native resolution)")
        if self.patch_size is not None and self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.image_tokens is None and self.patch_size is None:
            object.__setattr__(self, "image_tokens", 0)  # a batch_size budget counts no tokens
        if self.image_tokens is not None and self.image_tokens < 0:
            raise ValueError(f"image_tokens must be >= 0, got {self.image_tokens}")

    def grid(self, sample: Sample) -> tuple[int, int]:
        """``(rows, cols)`` of ``sample``'s image at ``patch_size``."""
        h, w = sample.pixels.shape[-2:]
        return h // self.patch_size, w // self.patch_size

    def image_cost(self, sample: Sample) -> int:
        """The tokens ``sample``'s own image takes (0 without one)."""
        if sample.pixels is None:
            return 0
        if self.image_tokens is not None:
            return self.image_tokens
        rows, cols = self.grid(sample)
        return rows * cols + 1

    def cost(self, samples: Iterable[Sample]) -> int:
        """The tokens of ``samples`` as one batch."""
        tally = _Tally(self)
        for s in samples:
            tally.add(s)
        return tally.tokens()

    def take(self, samples: Sequence[Any], start: int = 0) -> tuple[int, bool]:
        """How many of ``samples`` (``Sample``s, or held ``(sample, ...)`` tuples), from ``start`` on, make one batch,
        and whether it is full (the next would not fit). A first sample larger than ``max_tokens`` alone is a full
        batch of one."""
        left = len(samples) - start
        if self.batch_size is not None:
            n = min(self.batch_size, left)
            return n, n == self.batch_size
        tally = _Tally(self)
        for i in range(start, len(samples)):
            tally.add(samples[i] if isinstance(samples[i], Sample) else samples[i][0])
            if tally.tokens() > self.max_tokens:
                return max(i - start, 1), True
        return left, False

    def oversized(self, sample: Sample) -> bool:
        return self.max_tokens is not None and self.cost([sample]) > self.max_tokens

    def size(self, samples: Iterable[Sample]) -> int:
        """What ``max_buffered`` counts: samples (with ``batch_size``), or their own tokens (with ``max_tokens``)."""
        if self.batch_size is not None:
            return sum(1 for _ in samples)
        return sum(s.num_text_tokens + self.image_cost(s) for s in samples)

    @property
    def batch_samples(self) -> int:
        """About how many samples a batch holds, for default bounds (a token budget taken as 16 tokens a sample: a
        short caption, or an image at a small patch grid)."""
        return self.batch_size if self.batch_size is not None else max(1, self.max_tokens // 16)


class _Tally:
    """A batch's tokens as :class:`Budget` counts them, one sample at a time."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.texts = self.longest = self.total = 0
        self.images = self.own = self.rows = self.cols = 0

    def add(self, s: Sample) -> None:
        n = s.num_text_tokens
        self.texts += s.ids is not None
        self.longest, self.total = max(self.longest, n), self.total + n
        if s.pixels is not None:
            self.images += 1
            if self.budget.image_tokens is None:
                rows, cols = self.budget.grid(s)
                self.own += rows * cols + 1
                self.rows, self.cols = max(self.rows, rows), max(self.cols, cols)
            else:
                self.own += self.budget.image_tokens

    def tokens(self) -> int:
        b = self.budget
        text = self.texts * self.longest if b.padded else self.total
        if b.image_tokens is not None or not b.padded:
            return text + self.own
        return text + self.images * (self.rows * self.cols + 1)  # images padded to the batch's largest grid


@dataclass
class BucketBatcher(RawInput):
    """Stream stage: ``samples -> lists of samples`` of one modality, texts of similar lengths, images of similar
    grids, full batches (NOTE [pooled buckets]).

    Use as ``ShardDataset(..., batcher=BucketBatcher(32))`` and
    ``DataLoader(ds, batch_size=None, collate_fn=PaddedCollator())``; on a ``webdataset`` pipeline, as
    ``.compose(BucketBatcher(32))``. It takes raw samples too (NOTE [raw samples] in :mod:`mmload.raw`), decoded
    with its ``tokenizer``, ``image_size`` and ``max_text_len`` keywords.

    Args:
        batch_size: samples per batch; or give ``max_tokens`` instead: as many samples as fit that many tokens
            (text tokens padded to the batch's longest, plus ``image_tokens`` per image).
        pool_batches: batches' worth a pool holds before it gives a batch (images all of one size: one): more pads
            less and holds more (8 batches of 32 224-px pairs are 38 MB a worker).
        max_buffered: the most held, in samples (with ``max_tokens``: in tokens); default: the pools of every
            modality full, ``(2 * pool_batches + 1)`` batches' worth.
        max_wait: arrivals (of every modality) the oldest held sample may wait; default 16 batches' worth. Longer
            waits fill more batches (a rare modality gathers more of its like), shorter ones mix modalities more
            evenly along the stream.
        max_padding: the most padding (as a share of a batch's text tokens; of an image batch's image tokens, at
            ``patch_size``) a batch may carry; a sample that must leave by age goes with the samples nearest its
            size, as many as keep within it (a partial batch, counted).
        patch_size: the model's patch size, which image grids (and their padding) are counted at; default 16.
            ``make_loader`` passes its own at native resolution.
    """

    batch_size: int | None = None
    max_tokens: int | None = None
    image_tokens: int | None = None  # with max_tokens: what an image costs (patches + class token)
    pool_batches: int = POOL_BATCHES
    max_buffered: int | None = None
    max_wait: int | None = None
    max_padding: float = 0.15

    def __post_init__(self) -> None:
        super().__post_init__()
        self.budget = Budget(self.batch_size, self.max_tokens, self.image_tokens, padded=True,
                             patch_size=self.patch_size if self.max_tokens is not None else None)
        if not isinstance(self.pool_batches, int) or self.pool_batches < 1:
            raise ValueError(f"pool_batches must be an int >= 1, got {self.pool_batches!r}")
        per_batch = self.batch_size if self.batch_size is not None else self.max_tokens
        if self.max_buffered is None:
            self.max_buffered = (2 * self.pool_batches + 1) * per_batch
        if self.max_wait is None:
            self.max_wait = 16 * self.budget.batch_samples
        if not 0 <= self.max_padding <= 1:
            raise ValueError(f"max_padding must be in [0, 1], got {self.max_padding!r}")
        if self.max_buffered < per_batch:
            raise ValueError(f"max_buffered must be >= one batch ({per_batch}), got {self.max_buffered}")
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
        """The pools of one stream, empty; ``arrivals`` numbers the first sample to come. It takes ``Sample``s
        (what mmload's own stages hold); calling the batcher converts raw samples first."""
        return Held(self, arrivals)


@dataclass
class TokenBatcher(RawInput):
    """Stream stage for the strategies that do not bucket, with a token budget: consecutive samples, as many as fit
    ``max_tokens`` (:class:`Budget`: text tokens, padded to the batch's longest with ``padded``, plus
    ``image_tokens`` per image). A sample larger than the budget alone is a batch of one, counted (``oversized``).
    Resumable as :class:`BucketBatcher` is (its ``holder()``)."""

    max_tokens: int = 0
    image_tokens: int | None = None  # what an image costs (patches + class token)
    padded: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.budget = Budget(max_tokens=self.max_tokens, image_tokens=self.image_tokens, padded=self.padded,
                             patch_size=self.patch_size)

    __call__ = BucketBatcher.__call__  # the same stage over its own holder

    def holder(self, arrivals: int = 0) -> Run:
        return Run(self, arrivals)


class Run:
    """What a :class:`TokenBatcher` holds: the batch being filled, in arrival order (the same API as :class:`Held`)."""

    def __init__(self, batcher: TokenBatcher, arrivals: int = 0) -> None:
        self.batcher = batcher
        self.arrivals = arrivals
        self.run: list[HeldItem] = []
        self.flushes: Counter[str] = Counter()

    def put(self, sample: Sample, tag: Any = None, arrival: int | None = None) -> None:
        if arrival is None:
            arrival, self.arrivals = self.arrivals, self.arrivals + 1
        self.run.append((sample, tag, arrival))
        if len(self.run) > 1 and self.run[-2][2] > arrival:  # restored out of order: keep arrival order
            self.run.sort(key=lambda item: item[2])

    def add(self, sample: Sample, tag: Any = None) -> list[list[tuple[Sample, Any]]]:
        self.put(sample, tag)
        out = []
        while True:
            n, full = self.batcher.budget.take(self.run)
            if not full:
                return out
            out.append(self._emit(n))

    def drain(self) -> list[list[tuple[Sample, Any]]]:
        out = []
        while self.run:
            n, full = self.batcher.budget.take(self.run)
            if not full:
                self.flushes["end"] += 1
            out.append(self._emit(n))
        return out

    def held(self) -> list[tuple[Any, int]]:
        return [(tag, n) for _, tag, n in self.run]

    def _emit(self, n: int) -> list[tuple[Sample, Any]]:
        batch, self.run = self.run[:n], self.run[n:]
        if n == 1 and self.batcher.budget.oversized(batch[0][0]):
            self.flushes["oversized"] += 1
        return [(s, tag) for s, tag, _ in batch]


HeldItem = tuple[Sample, Any, int]  # (sample, the caller's tag, arrival number)


def pool_key(sample: Sample) -> str:
    """The pool a sample waits in: its modality (texts and pairs are grouped by text length within, images by
    grid: NOTE [pooled buckets]). Images of several sizes share one pool: exact-size pools fragment into batches of
    a few images when grids are many (337 grids of 6000 images with sides of 64-640 px gave 4 a batch)."""
    return Modality(sample.modality).value


class Held:
    """What a :class:`BucketBatcher` holds for one stream: a pool per modality of samples, each with a tag of the
    caller's (a stream position, say) and its arrival number. ``add`` puts one sample in and returns the batches
    (``(sample, tag)`` lists) that are now due; ``drain`` cuts every pool to the end; ``held()`` lists what is held,
    so a stage that owns it can save and restore it; ``flushes`` counts the partial batches by reason (NOTE
    [pooled buckets])."""

    def __init__(self, batcher: BucketBatcher, arrivals: int = 0) -> None:
        self.batcher = batcher
        self.arrivals = arrivals  # arrival number of the next sample
        self.pools: dict[str, list[HeldItem]] = {}  # modality -> held, in arrival order
        self.flushes: Counter[str] = Counter()
        self.sizes: Counter[str] = Counter()  # what max_buffered counts (samples or tokens), per pool
        # pool -> arrival number of its newest sample when it last had no batch to give (unchanged since but for
        # samples added): a batch it has now holds one of those, or ends just before one
        self.tried: dict[str, int] = {}

    def put(self, sample: Sample, tag: Any = None, arrival: int | None = None) -> str:
        """Hold ``sample`` (arrival: its number when restoring what was held, else the next one)."""
        if arrival is None:
            arrival, self.arrivals = self.arrivals, self.arrivals + 1
        key = pool_key(sample)
        pool = self.pools.setdefault(key, [])
        pool.append((sample, tag, arrival))
        if len(pool) > 1 and pool[-2][2] > arrival:  # restored out of order: keep arrival order
            pool.sort(key=lambda item: item[2])
        self.sizes[key] += self.batcher.budget.size([sample])
        return key

    def add(self, sample: Sample, tag: Any = None) -> list[list[tuple[Sample, Any]]]:
        """Hold one more sample; the batches now due: one from its pool when the pool is ready, then one from each
        pool whose oldest sample waited ``max_wait`` arrivals (holding that sample; half as long: any full batch),
        then from the largest pool while more than ``max_buffered`` is held."""
        b = self.batcher
        now = self.arrivals
        key = self.put(sample, tag)
        out = []
        if self._ready(key):
            out += self._cut(key, reason=None)
        for k in sorted(self.pools):
            pool = self.pools[k]
            if not pool:
                continue
            waited = now - pool[0][2]
            if waited >= b.max_wait:
                out += self._cut(k, reason="age")
            elif waited >= b.max_wait // 2 and k == key:  # half way: a full batch holding it, if one is there now
                out += self._cut(k, reason="soon")  # (only a pool that just grew can have one it had not)
        while self.sizes.total() > b.max_buffered:
            out += self._cut(max(self.pools, key=lambda k: len(self.pools[k])), reason="memory")
        return out

    def drain(self) -> list[list[tuple[Sample, Any]]]:
        """Every pool cut to the end, the one with the oldest sample first: the end of the stream."""
        out = []
        for k in sorted((k for k in self.pools if self.pools[k]), key=lambda k: self.pools[k][0][2]):
            out += self._cut(k, reason="end")
        return out

    def held(self) -> list[tuple[Any, int]]:
        """``(tag, arrival)`` of every held sample, in arrival order."""
        return sorted(((tag, n) for pool in self.pools.values() for _, tag, n in pool), key=lambda x: x[1])

    def _ready(self, key: str) -> bool:
        """A pool gives a batch when it holds ``pool_batches`` batches' worth (images all of one size: one, as
        sorting them finds no better batch than the oldest)."""
        budget, pool = self.batcher.budget, self.pools[key]
        if budget.oversized(pool[-1][0]):
            return True
        k = self.batcher.pool_batches
        if key == Modality.IMAGE.value and all(item[0].pixels.shape == pool[0][0].pixels.shape for item in pool):
            k = 1
        return self.sizes[key] >= k * (budget.batch_size or budget.max_tokens)

    def _cut(self, key: str, reason: str | None) -> list[list[tuple[Sample, Any]]]:
        """One batch from the pool: the full run of similar sizes that wastes least, if it pads no more than
        ``max_padding`` (with ``reason``, one holding the oldest sample; when no such full one exists, the oldest
        sample leaves with the samples nearest its size in a partial batch, counted under ``reason``); at the
        ``"end"`` of the stream, the whole pool cut in order of size."""
        b = self.batcher
        budget, pool = b.budget, self.pools[key]
        runs = _ImageRuns(pool, b.patch_size or PATCH_SIZE) if key == Modality.IMAGE.value else _TextRuns(pool)
        by_size = runs.items
        if reason == "end":
            batches = []
            for batch, full in _in_order(budget, runs, b.max_padding):
                batches.append(batch)
                self.flushes["end"] += not full
        else:
            at = None if reason is None else next(i for i, item in enumerate(by_size) if item[2] == pool[0][2])
            touching = None
            if reason is None and len(pool) > 1 and self.tried.get(key) == pool[-2][2]:  # one sample since then
                touching = next(i for i, item in enumerate(by_size) if item[2] == pool[-1][2])
            window = _best_window(budget, runs, must_hold=at, max_padding=b.max_padding, touching=touching)
            if window is not None:
                batches = [by_size[window[0]:window[1]]]
            elif reason in (None, "soon"):  # no full batch that pads little yet: wait for more
                if reason is None:
                    self.tried[key] = pool[-1][2]
                return []
            else:  # the oldest must go: with its nearest sizes, as many as pad little, counted
                self.flushes[reason] += 1
                lo, hi = _around(budget, runs, at, b.max_padding)
                batches = [by_size[lo:hi]]
        leaving = {id(item) for batch in batches for item in batch}
        self.pools[key] = [item for item in pool if id(item) not in leaving]
        self.tried.pop(key, None)
        for batch in batches:
            if len(batch) == 1 and budget.oversized(batch[0][0]):
                self.flushes["oversized"] += 1
        self.sizes[key] -= budget.size(s for batch in batches for s, _, _ in batch)
        return [[(s, tag) for s, tag, _ in batch] for batch in batches]


class _TextRuns:
    """A text (or pair) pool sorted by text length, and the padding of its runs: a run pads its texts to its last
    (NOTE [pooled buckets])."""

    def __init__(self, pool: list[HeldItem]) -> None:
        self.items = sorted(pool, key=lambda item: (item[0].num_text_tokens, item[2]))
        self.lengths = [s.num_text_tokens for s, _, _ in self.items]
        self.prefix = [0]  # text tokens before each position
        for n in self.lengths:
            self.prefix.append(self.prefix[-1] + n)
        self.own: list[int] | None = None  # _own's

    def padding(self, start: int, stop: int) -> float:
        """The share of the text tokens of ``items[start:stop]`` as one batch that is padding."""
        padded = (stop - start) * self.lengths[stop - 1]
        return (padded - self.prefix[stop] + self.prefix[start]) / padded if padded else 0.0

    def left_first(self, at: int, lo: int, hi: int) -> bool:
        """Whether a run grown from ``at`` takes ``items[lo]`` before ``items[hi]``: the nearer length."""
        return self.lengths[at] - self.lengths[lo] <= self.lengths[hi] - self.lengths[at]

    def take(self, budget: Budget, start: int) -> tuple[int, bool]:
        return budget.take(self.items, start)


class _ImageRuns:
    """The image pool sorted by grid, and the padding of its runs: a run's images pad to its largest rows and its
    largest columns, which need not be one image's, so the padding is taken from both maxima, not from one sorted
    key (NOTE [pooled buckets])."""

    def __init__(self, pool: list[HeldItem], patch_size: int) -> None:
        grids = [(h // patch_size, w // patch_size) for h, w in (s.pixels.shape[-2:] for s, _, _ in pool)]
        order = sorted(range(len(pool)), key=lambda i: (*_snake(*grids[i]), pool[i][2]))
        self.items = [pool[i] for i in order]
        self.rows, self.cols = [grids[i][0] for i in order], [grids[i][1] for i in order]
        self.prefix = [0]  # image tokens (patches and class token) before each position
        for r, c in zip(self.rows, self.cols):
            self.prefix.append(self.prefix[-1] + r * c + 1)
        self.own: list[int] | None = None  # _own's

    def padding(self, start: int, stop: int) -> float:
        """The share of the image tokens of ``items[start:stop]`` as one padded batch that is padding."""
        padded = (stop - start) * (max(self.rows[start:stop]) * max(self.cols[start:stop]) + 1)
        return (padded - self.prefix[stop] + self.prefix[start]) / padded

    def left_first(self, at: int, lo: int, hi: int) -> bool:
        """Whether a run grown from ``at`` to ``items[lo:hi]`` takes ``items[lo]`` first: the side that pads less."""
        return self.padding(lo, hi) <= self.padding(lo + 1, hi + 1)

    def take(self, budget: Budget, start: int) -> tuple[int, bool]:
        """``budget.take(items, start)``, found by doubling and bisection: a run's tokens are its count, its own
        tokens and its largest rows and columns, each read off in one step, and grow with the run."""
        left = len(self.items) - start
        if budget.batch_size is not None:
            return budget.take(self.items, start)
        own = _own(budget, self)

        def fits(n: int) -> bool:
            tally = _Tally(budget)
            tally.images, tally.own = n, own[start + n] - own[start]
            tally.rows, tally.cols = max(self.rows[start:start + n]), max(self.cols[start:start + n])
            return tally.tokens() <= budget.max_tokens

        lo, hi = 1, 2  # doubled until it does not fit (read off short runs only), then halved
        while hi <= left and fits(hi):
            lo, hi = hi, 2 * hi
        if hi > left:
            if fits(left):
                return left, False
            hi = left
        while hi - lo > 1:  # fits(lo) or lo == 1; not fits(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo, True


def _own(budget: Budget, runs: _TextRuns | _ImageRuns) -> list[int]:
    """The real tokens (text and image, as ``budget`` counts each sample's own) before each position of ``runs``,
    made once per cut."""
    if runs.own is None:
        runs.own = [0]
        for s, _, _ in runs.items:
            runs.own.append(runs.own[-1] + s.num_text_tokens + budget.image_cost(s))
    return runs.own


def _snake(rows: int, cols: int) -> tuple[int, int]:
    """Where a grid goes in the image pool's order: by rows, and by columns up in odd rows and down in even ones,
    so that the end of one row block meets the next at like columns (measured: it fills more batches within the
    padding bound than by rows then columns, by aspect ratio then patch count, or by patch count then aspect)."""
    return rows, cols if rows % 2 else -cols


def _around(budget: Budget, runs: _TextRuns | _ImageRuns, at: int, max_padding: float) -> tuple[int, int]:
    """The run of sorted samples around ``at``, grown one neighbour at a time (the nearer size first) while it is
    not full and pads at most ``max_padding`` of its tokens."""
    items, lo, hi = runs.items, at, at + 1

    def fits(a: int, b: int) -> bool:
        n, full = budget.take(items[a:b])
        return n == b - a and runs.padding(a, b) <= max_padding

    while not budget.take(items[lo:hi])[1]:
        left = lo > 0 and fits(lo - 1, hi)
        right = hi < len(items) and fits(lo, hi + 1)
        if left and right:
            left = runs.left_first(at, lo - 1, hi)
            right = not left
        if left:
            lo -= 1
        elif right:
            hi += 1
        else:
            break
    return lo, hi


def _in_order(budget: Budget, runs: _TextRuns | _ImageRuns,
              max_padding: float) -> Iterator[tuple[list[HeldItem], bool]]:
    """The sorted samples cut in order into batches, each as big as the budget allows while it pads at most
    ``max_padding``, with whether each is full."""
    items, i = runs.items, 0
    while i < len(items):
        n, full = budget.take(items, i)
        m = n
        while m > 1 and runs.padding(i, i + m) > max_padding:
            m -= 1  # a run of one pads nothing
        yield items[i:i + m], full and m == n
        i += m


def _best_window(budget: Budget, runs: _TextRuns | _ImageRuns, must_hold: int | None = None,
                 max_padding: float = 1.0, touching: int | None = None) -> tuple[int, int] | None:
    """``(start, stop)`` of the full batch of consecutive sorted samples that pads at most ``max_padding`` of its
    tokens and wastes the least, among those that hold position ``must_hold`` (when given; ``touching``: that hold
    it or end just before it); None if there is none. Waste is the padding's share (``batch_size``), or the share of
    ``max_tokens`` not spent on real tokens (padding, or room left over)."""
    own = _own(budget, runs) if budget.batch_size is None else []
    best, least = None, 2.0
    for start, stop in _full_windows(budget, runs, must_hold, touching):
        padding = runs.padding(start, stop)
        if padding > max_padding:
            continue
        waste = padding if budget.batch_size is not None else 1 - (own[stop] - own[start]) / budget.max_tokens
        if waste < least:
            best, least = (start, stop), waste
    return best


def _full_windows(budget: Budget, runs: _TextRuns | _ImageRuns, must_hold: int | None = None,
                  touching: int | None = None) -> list[tuple[int, int]]:
    """``(start, stop)`` of the full batch that starts at each position, in order: all of them, or those holding
    ``must_hold``, or those holding ``touching`` or ending just before it (the new sample of a pool that had no
    batch: a batch that does not reach it is one the pool had)."""
    items = runs.items

    def window(start: int) -> tuple[int, bool]:
        if budget.batch_size is not None:
            return min(budget.batch_size, len(items) - start), start + budget.batch_size <= len(items)
        return runs.take(budget, start)

    out = []
    if must_hold is None and touching is None:
        for start in range(len(items)):
            n, full = window(start)
            if not full:
                break  # later starts have fewer samples left: none of them is full either
            out.append((start, start + n))
        return out
    at, reach = (must_hold, must_hold + 1) if must_hold is not None else (touching, touching)
    for start in range(at, -1, -1):  # a batch that starts earlier stops no later: walk down until one falls short
        n, full = window(start)
        if start + n < reach:
            break
        if full:
            out.append((start, start + n))
    return out[::-1]


class ModalityBucketBatchSampler(Sampler[list[int]]):
    """``batch_sampler`` for map-style datasets: index batches of one modality, texts of similar lengths.

    Each modality's indices (shuffled) are cut into megabatches of ``pool_batches`` batches, each sorted by length
    and cut into batches (NOTE [pooled buckets]): every batch is full but the last of each modality.

    Args:
        modalities: the modality of each dataset index.
        lengths: the token count of each index (ignored for images).
        shuffle: shuffle indices and the order of batches, seeded by ``seed`` and :meth:`set_epoch`.
        drop_last: drop each modality's last partial batch (default keeps it, so nothing is lost).
        rank, world_size: this process's share of the batches (every ``world_size``-th, from ``rank``); default
            from ``torch.distributed`` when initialised. Ranks may get one batch fewer than others, as with shards.
    """

    def __init__(self, modalities: Sequence[Modality | str], lengths: Sequence[int], batch_size: int,
                 pool_batches: int = POOL_BATCHES, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None) -> None:
        if len(modalities) != len(lengths):
            raise ValueError(f"modalities ({len(modalities)}) and lengths ({len(lengths)}) must have one entry "
                             "per dataset index")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if pool_batches < 1:
            raise ValueError(f"pool_batches must be >= 1, got {pool_batches}")
        self.batch_size, self.pool_batches = batch_size, pool_batches
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        if rank is None and world_size is None and torch.distributed.is_available() and \
                torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.rank, self.world_size = rank or 0, world_size or 1
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        self.epoch = 0
        self.lengths = [int(n) for n in lengths]
        self.modalities: dict[str, list[int]] = {}
        for i, m in enumerate(modalities):
            self.modalities.setdefault(Modality(m).value, []).append(i)

    @classmethod
    def from_dataset(cls, dataset: Sequence[Any], batch_size: int, *, tokenizer: Any = None,
                     max_text_len: int = 512, progress: bool = True, **kwargs: Any) -> ModalityBucketBatchSampler:
        """The sampler of a map-style ``dataset`` of ``Sample``s or raw samples (dicts, tuples: NOTE [raw samples]
        in :mod:`mmload.raw`): reads every item once for its modality and token count (texts are tokenized as
        the collator will, with ``tokenizer`` and ``max_text_len``; images are not decoded). ``kwargs`` go to the
        sampler (``pool_batches``, ``shuffle``, ``seed``, ...); pair it with ``PaddedCollator(tokenizer=...)``."""
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
        B, batches = self.batch_size, []
        for key in sorted(self.modalities):
            idx = self.modalities[key]
            if self.shuffle:
                idx = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
            mega = self.pool_batches * B
            for lo in range(0, len(idx), mega):
                group = sorted(idx[lo:lo + mega], key=lambda i: self.lengths[i])  # stable: ties keep their order
                for start in range(0, len(group), B):
                    chunk = group[start:start + B]
                    if len(chunk) == B or not self.drop_last:
                        batches.append(chunk)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches[self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        per = [divmod(len(v), self.batch_size) for v in self.modalities.values()]
        total = sum(full + (0 if self.drop_last or not rem else 1) for full, rem in per)
        return len(range(self.rank, total, self.world_size))
