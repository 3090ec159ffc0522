"""Exactly once under every worker start method: the placement is settled in the main process.

A ``spawn`` or ``forkserver`` worker is a fresh interpreter with no process group; a dataset that asked
``torch.distributed`` for its rank there would take itself for rank 0 of 1. Here the main process plays rank r of 2
(``_dist_rank_world`` patched, as ``init_process_group`` would make it answer), which a fresh worker cannot see.
"""

from __future__ import annotations

import multiprocessing

import pytest
from conftest import assert_exactly_once

import mmload.dataset
from mmload import ShardDataset
from mmload.loader import make_loader

METHODS = [m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_with_workers_split_the_epoch_under_every_start_method(method: str, builtin_shards: list[str],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    want = [s.key for s in ShardDataset(builtin_shards, image_size=16, rank=0, world_size=1)]
    seen = []
    for rank in range(2):
        monkeypatch.setattr(mmload.dataset, "_dist_rank_world", lambda rank=rank: (rank, 2))
        loader = make_loader("padded", builtin_shards, batch_size=16, num_workers=2, image_size=16,
                             multiprocessing_context=method)
        seen.append([k for b in loader for k in b.keys])
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert_exactly_once(seen[0] + seen[1], want)


def test_a_copy_made_before_the_process_group_exists_is_not_settled(builtin_shards: list[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import copy

    ds = ShardDataset(builtin_shards, image_size=16)
    copies = copy.copy(ds), copy.deepcopy(ds)  # no process group yet: nothing to settle
    monkeypatch.setattr(mmload.dataset, "_dist_rank_world", lambda: (1, 2))  # init_process_group, later
    assert [(d.rank, d.world_size) for d in (ds, *copies)] == [(1, 2)] * 3


def test_dataloader_keywords_go_to_the_loader_the_rest_to_the_dataset(builtin_shards: list[str]) -> None:
    loader = make_loader("nested", builtin_shards[:2], batch_size=8, num_workers=1, timeout=30,
                         persistent_workers=True, multiprocessing_context="spawn", image_size=16)
    assert (loader.timeout, loader.persistent_workers) == (30, True)
    assert loader.multiprocessing_context.get_start_method() == "spawn"
    assert loader.dataset.decoder.image_size == 16
    with pytest.raises(ValueError, match="stateful=True"):
        make_loader("padded", builtin_shards[:2], snapshot_every_n_steps=2)
