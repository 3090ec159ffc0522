"""The five batching strategies as first-class objects, in one registry.

A :class:`Strategy` is everything that differs between strategies: how it groups samples into batches (a
stream stage, or none: consecutive samples), its collator, the data it reads (raw shards, or the output of
``mmload precompute``), whether it runs one encoder call per sample, and the benchmark targets it promises.
Loaders, the trainer, evaluation and the benchmark all ask the registry (:func:`get_strategy`); nothing
else compares a strategy's name. The model reads a batch's layouts (:mod:`mmload.layouts`), never its strategy.

A new strategy is one more :class:`Strategy` in ``REGISTRY`` (and, if it makes a new batch type, that type's
``model_input()``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from itertools import islice
from typing import Any

import torch

from mmload.bucketing import BucketBatcher, TokenBatcher
from mmload.collate import EmbeddingCollator, NestedCollator, PaddedCollator, PerSampleCollator
from mmload.raw import RawInput
from mmload.sample import Sample


class DataKind(StrEnum):
    RAW = "raw"  # images and texts, decoded and tokenized by the loader
    PRECOMPUTED = "precomputed"  # KEY.emb.npy written by `mmload precompute`: no pixels, no ids


@dataclass(frozen=True)
class Target:
    """A claim the benchmark checks for one strategy: ``metric op bound`` (see ``bench/_report.py`` for the
    metrics it can read). ``versus`` names the strategy a ratio is taken against; ``device``, ``preset`` and
    ``batching`` (``"tokens"``: batches by ``--max-tokens``) the setting the claim is made for (None: any)."""

    name: str
    metric: str
    op: str  # "<=", ">=" or "=="
    bound: float
    versus: str | None = None
    device: str | None = None
    preset: str | None = None
    batching: str | None = None  # "samples" (--batch-size) or "tokens" (--max-tokens)

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">=", "=="):
            raise ValueError(f"Target op must be '<=', '>=' or '==', got {self.op!r}")

    def met(self, value: float) -> bool:
        """Whether ``value`` keeps the claim (never for NaN, which a report uses for figures that disagree)."""
        return {"<=": value <= self.bound, ">=": value >= self.bound, "==": value == self.bound}[self.op]


def _per_sample(pack: bool | None, ids_dtype: torch.dtype) -> PerSampleCollator:
    return PerSampleCollator(single=PaddedCollator(ids_dtype=ids_dtype), **_pack(pack))


def _padded(pack: bool | None, ids_dtype: torch.dtype) -> PaddedCollator:
    return PaddedCollator(ids_dtype=ids_dtype, **_pack(pack))


def _embeddings(pack: bool | None, ids_dtype: torch.dtype) -> EmbeddingCollator:
    return EmbeddingCollator(**_pack(pack))  # embeddings carry no ids


def _nested(pack: bool | None, ids_dtype: torch.dtype) -> NestedCollator:
    return NestedCollator(ids_dtype=ids_dtype, **_pack(pack))


def _chunks(it: Iterator[Sample], n: int) -> Iterator[list[Sample]]:
    while chunk := list(islice(it, n)):
        yield chunk


def _pack(pack: bool | None) -> dict[str, bool]:
    return {} if pack is None else {"pack": pack}


@dataclass(frozen=True)
class Strategy:
    """One batching strategy: what a batch is, how samples are grouped and collated, what data it needs."""

    name: str
    summary: str  # what a batch is, and what the strategy pays
    collator_factory: Callable[[bool | None, torch.dtype], Callable[[list[Sample]], Any]]
    # the stream stage that groups samples (called with batch_size, or with max_tokens= and image_tokens=), or None:
    # consecutive samples
    batcher_factory: Callable[..., Callable[[Iterable[Sample]], Iterator[list[Sample]]]] | None = None
    data: DataKind = DataKind.RAW
    one_call_per_sample: bool = False  # slow by design: the benchmark runs fewer steps of it
    targets: tuple[Target, ...] = ()
    # how a token budget (max_tokens) counts text: "padded" (the batch's longest, per text), "packed" (each its
    # own), or None: the strategy takes no token budget
    token_layout: str | None = None

    def collator(self, *, pack: bool | None = None, ids_dtype: torch.dtype = torch.int32,
                 patch_size: int | None = None) -> Callable:
        """The collate_fn; ``pack=None`` keeps the collator's default (only nested packs). ``patch_size`` (the
        model's) goes to a collator that takes raw samples: the native grid they decode to, and the patches the
        nested collator cuts images of several sizes into."""
        collate = self.collator_factory(pack, ids_dtype)
        if patch_size is not None and isinstance(collate, RawInput):
            collate.patch_size = patch_size
        return collate

    def batcher(self, batch_size: int | None = None, *, max_tokens: int | None = None,
                image_tokens: int | None = None,
                patch_size: int | None = None) -> Callable[[Iterable[Sample]], Iterator[list[Sample]]] | None:
        """The stream stage that groups samples into batches (in the loader's workers), or None: the DataLoader
        batches ``batch_size`` consecutive samples. With ``max_tokens`` instead of ``batch_size``, a batch holds as
        many samples as fit that many tokens (text tokens as ``token_layout`` counts them, plus ``image_tokens`` per
        image: its patches and class token; or, with ``patch_size`` instead, each image's own grid: native
        resolution). With ``batch_size``, ``patch_size`` is the grid a grouping stage bounds image padding at."""
        if (batch_size is None) == (max_tokens is None):
            raise ValueError(f"give batch_size or max_tokens, not both nor neither (got batch_size={batch_size}, "
                             f"max_tokens={max_tokens})")
        if max_tokens is not None:
            if self.token_layout is None:
                raise ValueError(f"the {self.name} strategy takes no token budget (max_tokens): its batches are "
                                 f"{'one encoder call per sample' if self.one_call_per_sample else 'precomputed'}"
                                 "; give batch_size")
            budget = {"max_tokens": max_tokens, "image_tokens": image_tokens, "patch_size": patch_size}
            if self.batcher_factory is not None:  # a grouping stage of its own takes the budget
                return self.batcher_factory(**budget)
            return TokenBatcher(**budget, padded=self.token_layout == "padded")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.batcher_factory is None:
            return None
        # patch_size: the grids a grouping stage measures image padding at (native resolution)
        return self.batcher_factory(batch_size, **({} if patch_size is None else {"patch_size": patch_size}))

    def group(self, samples: Iterable[Sample], batch_size: int | None = None, *, max_tokens: int | None = None,
              image_tokens: int | None = None, patch_size: int | None = None) -> Iterator[list[Sample]]:
        """Lists of samples as this strategy's loader groups them, in this process (evaluation, benchmarks)."""
        batcher = self.batcher(batch_size, max_tokens=max_tokens, image_tokens=image_tokens, patch_size=patch_size)
        return batcher(samples) if batcher is not None else _chunks(iter(samples), batch_size)

    @property
    def has_raw_inputs(self) -> bool:
        """Batches carry pixels and token ids (a live teacher, NSP pairs and the MLM of the model need them)."""
        return self.data == DataKind.RAW


REGISTRY: dict[str, Strategy] = {s.name: s for s in (
    Strategy("per-sample", "a list of one-sample batches, one encoder call each; pays launch overhead and no "
             "parallelism", _per_sample, one_call_per_sample=True),
    Strategy("padded", "one dense sub-batch per modality, texts padded to the longest; pays padding FLOPs and bytes",
             _padded, token_layout="padded",
             targets=(Target("mmload's loader >= 3x the webdataset peer (loader alone)", "vs_peer", ">=", 3.0),
                      Target("the 1-worker loader >= 90% of the one-core ceiling", "ceiling_share", ">=", 0.9))),
    Strategy("bucketed", "one modality (and one text length bucket) per batch; pays batch-to-batch variance and "
             "bounded buffers", _padded, batcher_factory=BucketBatcher, token_layout="padded",
             targets=(Target("bucketed padding <= 15% of text tokens", "padding_fraction", "<=", 0.15),
                      Target("bucketed batches >= 95% full", "fill", ">=", 0.95))),
    Strategy("embeddings", "fixed-size vectors (or per-token embeddings) made offline by a frozen encoder, jagged; "
             "pays an offline pass and a frozen encoder", _embeddings, data=DataKind.PRECOMPUTED),
    Strategy("nested", "texts packed as one jagged tensor (values + offsets = cu_seqlens), images dense, joined into "
             "one packed encoder call; needs varlen-aware model code", _nested, token_layout="packed",
             targets=(
                 Target("nested has zero padded tokens", "padded_tokens", "<=", 0),
                 Target("nested: one host-to-device copy per batch", "copies_per_batch", "==", 1),
                 Target("nested: transfer >= 90% of pinned memcpy bandwidth", "transfer_fraction", ">=", 0.9,
                        device="cuda"),
                 Target("GPU, base: data wait <= 2% of step (nested)", "data_wait_share", "<=", 0.02, device="cuda",
                        preset="base"),
                 Target("CPU, --max-tokens: nested >= padded samples/s end to end", "speedup", ">=", 1.0,
                        versus="padded", device="cpu", batching="tokens"),
                 Target("GPU, base: nested >= 1.3x padded samples/s", "speedup", ">=", 1.3, versus="padded",
                        device="cuda", preset="base"),
                 Target("GPU, base: nested >= 10x per-sample samples/s", "speedup", ">=", 10.0, versus="per-sample",
                        device="cuda", preset="base"),
             )),
)}

STRATEGIES: tuple[str, ...] = tuple(REGISTRY)
# the strategy every user starts from: the benchmark's synthetic baseline and frozen-vs-full timing run on it
REFERENCE = "padded"
BASELINES: tuple[str, ...] = (REFERENCE, "per-sample")  # the benchmark reports every strategy's speed against these


def get_strategy(strategy: str | Strategy) -> Strategy:
    """The registered strategy of that name (a Strategy is returned as is)."""
    if isinstance(strategy, Strategy):
        return strategy
    try:
        return REGISTRY[strategy]
    except (KeyError, TypeError):
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}") from None


__all__ = ["BASELINES", "REFERENCE", "REGISTRY", "STRATEGIES", "DataKind", "Strategy", "Target", "get_strategy"]
