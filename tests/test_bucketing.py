"""Same-modality bucketing: one modality per batch, full batches, bounded buffers, nothing lost, exact sampler
length, token budgets."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_exactly_once, make_samples

from mmload import BucketBatcher, ModalityBucketBatchSampler, PaddedCollator, Sample
from mmload.bucketing import Budget
from mmload.sample import Modality


def text(key: str, n: int) -> Sample:
    return Sample(key, Modality.TEXT, ids=torch.arange(n) + 5)


def image(key: str) -> Sample:
    return Sample(key, Modality.IMAGE, pixels=torch.zeros(3, 4, 4, dtype=torch.uint8))


def test_every_batch_is_full_or_counted_of_one_modality_and_every_sample_comes_out_once() -> None:
    samples = make_samples(600, seed=3, paired_every=11, max_len=120)
    held = BucketBatcher(8).holder()
    during = [b for s in samples for b in held.add(s)]
    end = held.drain()
    assert_exactly_once([s.key for b in during + end for s, _ in b], [s.key for s in samples])
    partial = sum(len(b) < 8 for b in during)
    assert partial == held.flushes["age"] + held.flushes["memory"]  # nothing partial goes uncounted
    assert sum(len(b) < 8 for b in end) == held.flushes["end"]  # the end's partial batches: counted too
    for b in during + end:
        assert len({s.modality for s, _ in b}) == 1
    texts = [PaddedCollator()([s for s, _ in b]).stats() for b in during if b[0][0].ids is not None]
    assert all(t.padding_fraction <= 0.15 for t in texts)  # within max_padding, full or not


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
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        BucketBatcher(0)
    with pytest.raises(ValueError, match="give batch_size or max_tokens, not both"):
        BucketBatcher(4, max_tokens=100)
    with pytest.raises(ValueError, match="give batch_size or max_tokens"):
        BucketBatcher()
    with pytest.raises(ValueError, match="pool_batches"):
        BucketBatcher(4, pool_batches=0)
    with pytest.raises(ValueError, match="max_buffered"):
        BucketBatcher(8, max_buffered=4)


def test_batch_sampler_groups_by_modality_and_length_with_exact_length() -> None:
    samples = make_samples(150, seed=5, max_len=200)
    mods = [s.modality for s in samples]
    lens = [s.num_text_tokens for s in samples]
    sampler = ModalityBucketBatchSampler(mods, lens, batch_size=8, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(150))
    assert sum(len(b) < 8 for b in batches) <= len(set(mods))  # one partial batch per modality at most
    for b in batches:
        assert len({mods[i] for i in b}) == 1
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


def test_a_token_budget_fills_batches_to_it_and_never_past_it() -> None:
    g = torch.Generator().manual_seed(1)
    lengths = torch.exp(torch.randn(2000, generator=g) * 0.8 + 3.5).clamp(3, 300).long().tolist()
    stream = [text(f"t{i}", n) if i % 3 else image(f"i{i}") for i, n in enumerate(lengths)]
    stream.append(text("huge", 900))  # larger than the budget alone: a batch of one, counted
    budget = Budget(max_tokens=512, image_tokens=17)
    held = BucketBatcher(max_tokens=512, image_tokens=17).holder()
    during = [[s for s, _ in b] for x in stream for b in held.add(x)]
    end = [[s for s, _ in b] for b in held.drain()]
    assert_exactly_once([s.key for b in during + end for s in b], [s.key for s in stream])
    assert held.flushes["oversized"] == 1 and [s.key for b in during + end for s in b if len(b) == 1].count("huge") == 1
    costs = [budget.cost(b) for b in during]
    assert all(c <= 512 for b, c in zip(during, costs) if [s.key for s in b] != ["huge"])
    assert sum(costs) / len(costs) >= 0.85 * 512  # full but the counted age flushes (the next would not fit)
    padded = [PaddedCollator()(b).stats() for b in during if b[0].ids is not None]
    assert sum(s.padded_tokens for s in padded) / sum(s.padded_tokens + s.real_tokens for s in padded) <= 0.15


def test_pools_fill_more_batches_than_fixed_buckets_did_within_the_padding_bound() -> None:
    """The builtin-like mix (8 images per text, lognormal lengths): fixed length buckets filled 45% of their batches;
    pools keep every batch within 15% padding, fill more of them the longer texts may wait, and fill every one by
    tokens."""
    g = torch.Generator().manual_seed(2)
    lengths = torch.exp(torch.randn(3000, generator=g) * 0.9 + 4.0).clamp(5, 512).long().tolist()
    stream = [text(f"t{i}", lengths[i % 3000]) if i % 9 == 0 else image(f"i{i}") for i in range(20000)]

    def run(**kw: object) -> tuple[float, float]:
        held = BucketBatcher(**kw).holder()
        during = [[s for s, _ in b] for x in stream for b in held.add(x)]
        texts = [PaddedCollator()(b).stats() for b in during if b[0].ids is not None]
        padding = sum(s.padded_tokens for s in texts) / sum(s.padded_tokens + s.real_tokens for s in texts)
        budget = held.batcher.budget
        fill = (sum(len(b) for b in during) / (32 * len(during)) if budget.batch_size else
                sum(budget.cost(b) for b in during) / (budget.max_tokens * len(during)))
        return fill, padding

    short, long = run(batch_size=32), run(batch_size=32, max_wait=64 * 32)
    assert short[1] <= 0.15 and long[1] <= 0.15
    assert 0.6 <= short[0] < long[0]
    by_tokens = run(max_tokens=2048, image_tokens=65)
    assert by_tokens[0] >= 0.9 and by_tokens[1] <= 0.15


def pair(key: str, n: int) -> Sample:
    return Sample(key, Modality.IMAGE_TEXT, pixels=torch.zeros(3, 4, 4, dtype=torch.uint8), ids=torch.arange(n) + 5)


def test_the_padding_bound_holds_for_pairs_under_a_token_budget_and_at_the_end() -> None:
    g = torch.Generator().manual_seed(4)
    lengths = torch.exp(torch.randn(3000, generator=g) * 0.9 + 3.5).clamp(2, 200).long().tolist()
    stream = [pair(f"p{i}", n) for i, n in enumerate(lengths)]
    for batcher in (BucketBatcher(max_tokens=2048, image_tokens=197), BucketBatcher(16)):
        held = batcher.holder()
        out = [[s for s, _ in b] for x in stream for b in held.add(x)] + [[s for s, _ in b] for b in held.drain()]
        assert_exactly_once([s.key for b in out for s in b], [s.key for s in stream])
        worst = max(PaddedCollator()(b).stats().padding_fraction for b in out)
        assert worst <= 0.15, (batcher, worst)


def test_full_token_batches_are_not_counted_as_flushes_and_tiny_waits_work() -> None:
    held = BucketBatcher(max_tokens=256, image_tokens=17).holder()
    out = [b for i in range(400) for b in held.add(text(f"t{i}", 100))] + held.drain()
    assert all(len(b) == 2 for b in out) and held.flushes["memory"] == 0 and held.flushes["age"] == 0
    for kw in ({"batch_size": 2, "max_wait": 1}, {"batch_size": 2, "max_wait": 1, "pool_batches": 1}):
        stream = [image(f"i{i}") if i % 2 else text(f"t{i}", 5 + i % 7) for i in range(40)]
        got = [s.key for b in BucketBatcher(**kw)(iter(stream)) for s in b]
        assert_exactly_once(got, [s.key for s in stream])


def test_a_token_budget_needs_the_tokens_of_an_image() -> None:
    with pytest.raises(ValueError, match="give image_tokens"):
        BucketBatcher(max_tokens=512)
    from mmload.strategy import get_strategy

    with pytest.raises(ValueError, match="give image_tokens"):
        get_strategy("padded").group([image("a")], max_tokens=64)
