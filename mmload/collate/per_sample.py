"""Per-sample processing: a batch is a list of one-sample batches, run one by one until fusion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mmload.batch import PerSampleBatch
from mmload.collate.padded import PaddedCollator
from mmload.raw import RawInput
from mmload.staging import PackedBatch, pack


@dataclass
class PerSampleCollator(RawInput):
    """``collate_fn`` for the per-sample strategy. A one-sample padded batch has no padding.

    ``pack=True`` packs the whole list into one buffer: it shows how much of per-sample's cost is the
    many small copies rather than the one-at-a-time compute.
    """

    single: PaddedCollator = field(default_factory=PaddedCollator)
    pack: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.single.pack:
            raise ValueError("PerSampleCollator packs the whole batch; give it single=PaddedCollator(pack=False)")

    def __call__(self, samples: Sequence[Any]) -> PerSampleBatch | PackedBatch:
        samples = self.to_samples(samples)
        batch = PerSampleBatch(items=[self.single([s]) for s in samples], keys=[s.key for s in samples])
        return pack(batch) if self.pack else batch
