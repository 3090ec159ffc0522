"""Same-modality bucketing: one modality per batch, bounded buffers, nothing lost, exact sampler length."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_exactly_once, make_samples

from mmload import BucketBatcher, ModalityBucketBatchSampler, PaddedCollator, Sample
from mmload.bucketing import DEFAULT_BOUNDARIES, bucket_key
from mmload.sample import Modality


def text(key: str, n: int) -> Sample:
    return Sample(key, Modality.TEXT, ids=torch.arange(n) + 5)


def image(key: str) -> Sample:
    return Sample(key, Modality.IMAGE, pixels=torch.zeros(3, 4, 4, dtype=torch.uint8))


def test_every_batch_holds_one_bucket_and_every_sample_comes_out_once() -> None:
    samples = make_samples(200, seed=3, paired_every=11, max_len=120)
    batches = list(BucketBatcher(8)(iter(samples)))
    assert_exactly_once([s.key for b in batches for s in b], [s.key for s in samples])
    for b in batches:
        assert 1 <= len(b) <= 8
        assert len({bucket_key(s.modality, s.num_text_tokens, DEFAULT_BOUNDARIES) for s in b}) == 1
        batch = PaddedCollator()(b)
        assert (batch.image is None) or (batch.text is None) or all(s.modality == "image_text" for s in b)


def test_rare_modality_is_flushed_within_max_wait_and_buffer_is_capped() -> None:
    # 99% images, 1% text: the text bucket never fills, so it must leave by age.
    stream = [text(f"t{i}", 10) if i % 100 == 50 else image(f"i{i}") for i in range(2000)]
    batcher = BucketBatcher(4, max_buffered=8, max_wait=40)
    arrivals: dict[str, int] = {}

    def counting():
        for n, s in enumerate(stream):
            arrivals[s.key] = n
            yield s

    out_at = {}  # the arrival count at the moment each sample left the stage
    for batch in batcher(counting()):
        for s in batch:
            out_at[s.key] = len(arrivals) - 1
    assert_exactly_once(out_at, [s.key for s in stream])
    waits = [out_at[k] - arrivals[k] for k in out_at if k.startswith("t")]
    assert max(waits) <= 40
    in_buffer = [sum(1 for k in out_at if arrivals[k] <= n < out_at[k]) for n in range(0, 2000, 37)]
    assert max(in_buffer) <= 8


def test_batcher_validates() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatcher(0)
    with pytest.raises(ValueError, match="strictly increasing"):
        BucketBatcher(4, boundaries=(8, 8, 16))
    with pytest.raises(ValueError, match="max_buffered"):
        BucketBatcher(8, max_buffered=4)


def test_batch_sampler_groups_by_bucket_with_exact_length() -> None:
    samples = make_samples(150, seed=5, max_len=200)
    mods = [s.modality for s in samples]
    lens = [s.num_text_tokens for s in samples]
    sampler = ModalityBucketBatchSampler(mods, lens, batch_size=8, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(150))
    for b in batches:
        assert len({bucket_key(mods[i], lens[i], DEFAULT_BOUNDARIES) for i in b}) == 1
    assert list(sampler) == batches  # same seed and epoch, same batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    dropped = ModalityBucketBatchSampler(mods, lens, batch_size=8, drop_last=True)
    assert len(list(dropped)) == len(dropped) and all(len(b) == 8 for b in dropped)


def test_bucketed_padding_is_small_on_heavy_tailed_lengths() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.exp(torch.randn(3000, generator=g) * 0.9 + 4.0).clamp(5, 512).long().tolist()
    stream = [text(f"t{i}", n) for i, n in enumerate(lengths)]
    collate = PaddedCollator()
    stats = [collate(b).stats() for b in BucketBatcher(16)(iter(stream))]
    padded = sum(s.padded_tokens for s in stats)
    real = sum(s.real_tokens for s in stats)
    naive = [collate(stream[i:i + 16]).stats() for i in range(0, len(stream), 16)]
    naive_frac = sum(s.padded_tokens for s in naive) / sum(s.padded_tokens + s.real_tokens for s in naive)
    assert padded / (padded + real) < naive_frac / 3


def test_batch_sampler_splits_batches_between_ranks() -> None:
    samples = make_samples(100, seed=2, max_len=200)
    mods, lens = [s.modality for s in samples], [s.num_text_tokens for s in samples]
    whole = list(ModalityBucketBatchSampler(mods, lens, batch_size=8, seed=4))
    parts = [ModalityBucketBatchSampler(mods, lens, batch_size=8, seed=4, rank=r, world_size=3) for r in range(3)]
    assert [len(p) for p in parts] == [len(list(p)) for p in parts]
    got = [b for p in parts for b in p]
    assert sorted(map(tuple, got)) == sorted(map(tuple, whole))  # every batch on exactly one rank
