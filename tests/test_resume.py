"""Resuming mid-epoch yields exactly the rest of the uninterrupted run, with workers, for every stage."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
from conftest import assert_exactly_once

from mmload.loader import make_loader


def batch_keys(batch) -> list[str]:
    return list(batch.keys)


def assert_resumes_exactly(make: Callable[[], object], stop_after: int) -> None:
    """The shared proof: N batches, state_dict, a fresh loader from that state == the uninterrupted run."""
    full = [batch_keys(b) for b in make()]
    assert stop_after < len(full), "stop inside the epoch"
    loader = make()
    it = iter(loader)
    head = [batch_keys(next(it)) for _ in range(stop_after)]
    state = loader.state_dict()
    del it, loader
    resumed = make()
    resumed.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*naively fast-forwarding.*")  # resume must not replay
        rest = [batch_keys(b) for b in resumed]
    assert head + rest == full


@pytest.mark.parametrize("strategy,workers,shuffle", [
    ("padded", 0, False), ("nested", 2, True), ("bucketed", 0, True), ("bucketed", 2, True),
    ("per-sample", 2, False),
])
def test_resume_mid_epoch(strategy: str, workers: int, shuffle: bool, builtin_shards: list[str]) -> None:
    def make():
        return make_loader(strategy, builtin_shards, batch_size=8, num_workers=workers, stateful=True,
                           image_size=16, max_text_len=32, shuffle=shuffle, shuffle_buffer=16, seed=7)

    assert_resumes_exactly(make, stop_after=7)


def test_resume_a_blend_with_bucketing(builtin_shards: list[str]) -> None:
    a, b = builtin_shards[:4], builtin_shards[4:]

    def make():
        return make_loader("bucketed", [f"{{{','.join(a)}}}@3", f"{{{','.join(b)}}}@1"], batch_size=8,
                           num_workers=2, stateful=True, image_size=16, max_text_len=32, shuffle=True, seed=1)

    assert_resumes_exactly(make, stop_after=5)


@pytest.mark.parametrize("strategy", ["padded", "bucketed", "nested"])
@pytest.mark.parametrize(("old", "new", "steps", "ahead"), [
    ((1, 2), (1, 0), [5], [0]),  # one rank: load_state_dict itself resumes on another worker count
    ((1, 0), (1, 3), [5], [0]),
    ((2, 2), (3, 1), [3, 5], [0, 0]),
    ((2, 2), (1, 2), [3, 2], [1, 0]),  # rank 0 is an epoch ahead of rank 1
    ((2, 2), (7, 2), [3, 2], [1, 0]),  # 14 streams for 8 shards: shards are cut by sample position
])
def test_an_elastic_resume_delivers_every_sample_of_each_finished_epoch_exactly_once(
        strategy: str, old: tuple[int, int], new: tuple[int, int], steps: list[int], ahead: list[int],
        builtin_shards: list[str]) -> None:
    """Old ranks (simulated in one process) stop mid-epoch, some a whole epoch ahead; new ranks of another count and
    worker count resume from all their states and read to the end of epoch 1: each key once in each epoch."""
    def make(rank: int, world: int, workers: int):
        return make_loader(strategy, builtin_shards, batch_size=8, num_workers=workers, stateful=True, shuffle=True,
                           seed=1, rank=rank, world_size=world, image_size=16, max_text_len=32)

    (ranks, workers), (new_ranks, new_workers) = old, new
    delivered: dict[int, list[str]] = {0: [], 1: []}
    states = []
    for rank in range(ranks):
        loader = make(rank, ranks, workers)
        if ahead[rank]:
            delivered[0] += [k for b in loader for k in b.keys]
            loader.dataset.set_epoch(1)
        it = iter(loader)
        delivered[ahead[rank]] += [k for _ in range(steps[rank]) for k in next(it).keys]
        states.append(loader.state_dict())
        del it, loader
    for rank in range(new_ranks):
        loader = make(rank, new_ranks, new_workers)
        if ranks == new_ranks == 1:
            loader.load_state_dict(states[0])
            epoch = loader.dataset.epoch
        else:
            epoch = loader.load_elastic(states)
        assert epoch == min(ahead)
        for e in range(epoch, 2):
            loader.dataset.set_epoch(e)
            delivered[e] += [k for b in loader for k in b.keys]
    every = [k for b in make(0, 1, 0) for k in b.keys]
    for e in (0, 1):
        assert_exactly_once(delivered[e], every)


def test_one_rank_of_several_cannot_resume_alone_on_another_worker_count(builtin_shards: list[str]) -> None:
    def make(workers: int, rank: int = 0):
        return make_loader("padded", builtin_shards, batch_size=8, num_workers=workers, stateful=True,
                           image_size=16, rank=rank, world_size=2)

    loader = make(2)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    del it
    with pytest.raises(ValueError, match=r"needs every rank's state, loader.load_elastic\("):
        make(1).load_state_dict(state)
    with pytest.raises(ValueError, match="needs the state of every old rank"):
        make(1).load_elastic([state])
    # The dataset refuses a stream's state read by another split, e.g. a state moved to another rank by hand.
    from mmload import ShardDataset

    ds = ShardDataset(builtin_shards, image_size=16, rank=1, world_size=2)
    ds.load_state_dict(state["_snapshot"]["_worker_snapshots"]["worker_0"]["dataset_state"])
    with pytest.raises(ValueError, match="StatefulLoader.load_elastic"):
        next(iter(ds))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_restores_the_epoch_of_the_state(workers: int, builtin_shards: list[str]) -> None:
    """A fresh loader (epoch 0) given a state saved in epoch 1 continues epoch 1, pending samples included."""
    def make(epoch: int):
        loader = make_loader("bucketed", builtin_shards, batch_size=8, num_workers=workers, stateful=True,
                             image_size=16, max_text_len=32, shuffle=True, shuffle_buffer=16, seed=3)
        loader.dataset.set_epoch(epoch)
        return loader

    full = [batch_keys(b) for b in make(1)]
    loader = make(1)
    it = iter(loader)
    head = [batch_keys(next(it)) for _ in range(9)]
    state = loader.state_dict()
    del it, loader
    resumed = make(0)  # not told the epoch: the state says it
    resumed.load_state_dict(state)
    assert head + [batch_keys(b) for b in resumed] == full


def test_resume_inside_a_damaged_shard_counts_its_damage_once(tmp_path, builtin_shards: list[str]) -> None:
    from conftest import cut_shard

    from mmload.coverage import loader_errors

    cut = cut_shard(tmp_path, builtin_shards[0])

    def make():
        return make_loader("padded", [str(cut)], batch_size=4, num_workers=0, stateful=True, image_size=16,
                           shuffle=True, shuffle_buffer=1000, seed=0)

    full = make()
    n_full = sum(1 for _ in full)
    assert loader_errors(full.state_dict()) == {"shard_read": 1}
    loader = make()
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    del it
    resumed = make()
    resumed.load_state_dict(state)
    assert 2 + sum(1 for _ in resumed) == n_full
    assert loader_errors(resumed.state_dict()) == {"shard_read": 1}


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("set_epoch", ["before", "after", "never"])
def test_an_end_of_epoch_state_starts_the_epoch_the_dataset_is_set_to(workers: int, set_epoch: str,
                                                                       builtin_shards: list[str]) -> None:
    """A state taken after the epoch ended resumes as the next iter() of the uninterrupted loader: a whole epoch,
    the one ``set_epoch`` names (the old one is not replayed), with any number of workers."""
    def make():
        return make_loader("padded", builtin_shards[:4], batch_size=16, num_workers=workers, stateful=True,
                           image_size=16, shuffle=True, shuffle_buffer=16, seed=3)

    loader = make()
    epoch0 = [k for b in loader for k in b.keys]
    state = loader.state_dict()
    loader.dataset.set_epoch(1)
    epoch1 = [k for b in loader for k in b.keys]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    resumed = make()
    if set_epoch == "before":
        resumed.dataset.set_epoch(1)
    resumed.load_state_dict(state)
    if set_epoch == "after":
        resumed.dataset.set_epoch(1)
    got = [k for b in resumed for k in b.keys]
    assert got == (epoch0 if set_epoch == "never" else epoch1)


def test_an_elastic_resume_of_an_elastic_resume_and_a_plain_resume_inside_a_plan(builtin_shards: list[str]) -> None:
    """2 x 2 stops; 3 x 1 resumes, stops again mid-plan (strided pieces, held samples and all); one of those ranks
    resumes its own state as saved (same shape), then 1 x 2 continues all three: each key once per epoch."""
    def make(rank: int, world: int, workers: int):
        return make_loader("bucketed", builtin_shards, batch_size=8, num_workers=workers, stateful=True, shuffle=True,
                           seed=2, rank=rank, world_size=world, image_size=16, max_text_len=32)

    delivered: list[str] = []
    first = []
    for rank in range(2):
        loader = make(rank, 2, 2)
        it = iter(loader)
        delivered += [k for _ in range(3) for k in next(it).keys]
        first.append(loader.state_dict())
        del it, loader
    second = []
    for rank in range(3):
        loader = make(rank, 3, 1)
        loader.load_elastic(first)
        it = iter(loader)
        delivered += [k for _ in range(2) for k in next(it).keys]
        state = loader.state_dict()
        del it, loader
        if rank == 1:  # the same shape again: an ordinary resume, inside the plan
            loader = make(rank, 3, 1)
            loader.load_state_dict(state)
            it = iter(loader)
            delivered += list(next(it).keys)
            state = loader.state_dict()
            del it, loader
        second.append(state)
    loader = make(0, 1, 2)
    loader.load_elastic(second)
    delivered += [k for b in loader for k in b.keys]
    assert_exactly_once(delivered, [k for b in make(0, 1, 0) for k in b.keys])
