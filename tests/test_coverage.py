"""Epoch coverage: every key seen once, repeats and losses reported, worker error counts gathered."""

from __future__ import annotations

from pathlib import Path

from conftest import junk_shard

from mmload.coverage import Coverage, loader_errors
from mmload.loader import make_loader


def test_repeats_and_losses_are_reported() -> None:
    cov = Coverage()
    cov.update(["a", "b", "a"])
    report = cov.report(expected=5, errors={"image_decode": 1, "shard_read": 1})
    assert report["repeats"] == 1 and report["repeated_keys"] == ["a"]
    assert report["lost"] == 5 - 2 - 1


def test_worker_error_counts_reach_the_main_process(tmp_path: Path, builtin_shards: list[str]) -> None:
    bad = junk_shard(tmp_path / "bad.tar", 3)
    tok = str(Path(builtin_shards[0]).parent)
    loader = make_loader("padded", [str(bad), *builtin_shards[:3]], batch_size=8, num_workers=2, stateful=True,
                         image_size=16, tokenizer=tok)
    n = sum(len(b.keys) for b in loader)
    assert loader_errors(loader.state_dict()) == {"image_decode": 3}
    assert n == 120
