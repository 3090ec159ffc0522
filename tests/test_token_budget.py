"""Token-budget batching (``max_tokens``) through the loader, the trainer and the benchmark, and image tokens in
``stats()``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_exactly_once, make_samples

from mmload import NestedCollator, PaddedCollator, ShardDataset
from mmload.bucketing import Budget, TokenBatcher
from mmload.loader import make_loader
from mmload.strategy import get_strategy

SIZE, PATCH = 32, 8
IMAGE_TOKENS = (SIZE // PATCH) ** 2 + 1  # 16 patches and the class token


def test_stats_count_image_tokens_at_the_patch_size() -> None:
    samples = make_samples(12, image_size=SIZE, paired_every=4)
    images = sum(s.pixels is not None for s in samples)
    for collate in (PaddedCollator(), PaddedCollator(pack=True), NestedCollator(), NestedCollator(pack=False)):
        stats = collate(samples).stats(PATCH)
        assert (stats.image_tokens, stats.padded_image_tokens) == (images * IMAGE_TOKENS, 0)
        assert collate(samples).stats().image_tokens == images * ((SIZE // 16) ** 2 + 1)  # ViT-B/16 by default


@pytest.mark.parametrize("strategy", ["padded", "bucketed", "nested"])
def test_max_tokens_through_the_loader_never_past_the_budget(builtin_shards: list[str], strategy: str) -> None:
    budget = Budget(max_tokens=300, image_tokens=IMAGE_TOKENS, padded=get_strategy(strategy).token_layout == "padded")
    loader = make_loader(strategy, builtin_shards, max_tokens=300, patch_size=PATCH, image_size=SIZE,
                         num_workers=2, max_text_len=64)
    batches = list(loader)
    keys = [s.key for s in ShardDataset(builtin_shards, image_size=SIZE)]
    assert_exactly_once(batches, keys)
    costs = []
    for b in batches:
        samples = b.unbatch()
        cost = budget.cost(samples)
        assert cost <= 300 or len(samples) == 1, (strategy, cost, len(samples))
        s = b.stats(PATCH)
        text = s.real_tokens + s.padded_tokens
        assert text + s.image_tokens == cost  # stats() counts what the budget counts
        costs.append(cost)
    full = sorted(costs)[4:]  # all but the smallest few: each worker's last, each modality's last when bucketed
    # bucketing also keeps every batch within 15% padding: samples that wait too long leave in counted, part-full
    # batches (NOTE [pooled buckets])
    assert sum(full) / len(full) >= (0.7 if strategy == "bucketed" else 0.85) * 300, costs


def test_max_tokens_is_refused_where_it_does_not_apply() -> None:
    for name in ("per-sample", "embeddings"):
        with pytest.raises(ValueError, match=f"the {name} strategy takes no token budget"):
            get_strategy(name).batcher(max_tokens=100)
    with pytest.raises(ValueError, match="give batch_size or max_tokens, not both"):
        get_strategy("padded").batcher(8, max_tokens=100)
    with pytest.raises(ValueError, match="give batch_size or max_tokens, not both"):
        make_loader("nested", "nowhere", batch_size=8, max_tokens=100)
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1"):
        TokenBatcher(max_tokens=0)


def test_a_sample_larger_than_the_budget_is_a_batch_of_one_counted() -> None:
    samples = make_samples(30, image_size=SIZE, max_len=40, kinds=("text",))
    big = make_samples(1, image_size=SIZE, max_len=300, seed=9, kinds=("text",), key="big{}")[0]
    big.ids = torch.arange(200) + 5
    stream = [*samples[:10], big, *samples[10:]]
    held = TokenBatcher(max_tokens=100, image_tokens=IMAGE_TOKENS).holder()
    out = [[s for s, _ in b] for x in stream for b in held.add(x)] + [[s for s, _ in b] for b in held.drain()]
    assert_exactly_once([s.key for b in out for s in b], [s.key for s in stream])
    assert [b for b in out if big in b] == [[big]] and held.flushes["oversized"] == 1
    assert [s.key for b in out for s in b] == [s.key for s in stream]  # consecutive: the stream's order


def test_the_trainer_takes_max_tokens(builtin_shards: list[str], tmp_path: Path) -> None:
    from models.config import TrainConfig
    from models.train import main, train

    result = train(TrainConfig(data=(str(Path(builtin_shards[0]).parent),), strategy="nested", preset="tiny",
                               steps=3, max_tokens=400, num_workers=0, progress=False, device="cpu"))
    assert result["step"] == 3 and result["loss"] > 0
    assert main(["--batch-size", "8", "--max-tokens", "400"]) == 2
    with pytest.raises(ValueError, match="per-sample strategy takes no token budget"):
        TrainConfig(strategy="per-sample", max_tokens=400)


def test_the_benchmark_reports_fill_against_what_was_asked(tmp_path: Path) -> None:
    from bench.throughput import main

    result = main(["--quick", "--max-tokens", "300", "--out", str(tmp_path / "out"), "--cache-dir",
                   str(tmp_path / "cache"), "--no-progress", "--reliability-epochs", "0", "--text-len", "12,0.8"])
    for name, r in result["strategies"].items():
        fill = r["fill"]
        if get_strategy(name).token_layout is None:
            assert fill["by"] == "samples" and fill["asked"]["batch_size"] == result["config"]["batch_size"]
        else:
            assert fill["by"] == "tokens" and fill["asked"] == {"batch_size": None, "max_tokens": 300}
            assert 0 < fill["fill"] <= 1 and fill["tokens"]["max"] <= 300
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "fill (asked)" in readme and "(300 tokens)" in readme
