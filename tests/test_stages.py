"""The stream stages, one by one: each saves what it needs and nothing else, and resumes from it."""

from __future__ import annotations

import random

import pytest
from conftest import assert_exactly_once, cut_shard, make_samples

from mmload import BucketBatcher, ShardDataset
from mmload.elastic import deal
from mmload.errors import ErrorCounter, ErrorKind, SampleError
from mmload.loader import make_loader
from mmload.stages import STATE_FORMAT, BucketStage, Decode, Piece, ShardSource, check_split, shuffle_shard


def fake_shards(n_shards: int = 3, per_shard: int = 7, damaged: str | None = None):
    """``read(url)`` over made-up shards ``s0``..: raw samples with keys ``s0-0``...; ``damaged`` ends early."""
    def read(url: str):
        for j in range(per_shard):
            if url == damaged and j == 4:
                raise SampleError(ErrorKind.SHARD_READ, "cut here", url)
            yield {"__key__": f"{url}-{j}", "__url__": url}

    return list(enumerate(f"s{i}" for i in range(n_shards))), read


def seeded(url: str) -> random.Random:
    return random.Random(f"1/0/{url}")


def test_shuffle_is_a_pure_function_of_its_rng() -> None:
    raws = [{"__key__": str(i)} for i in range(50)]
    a = [r["__key__"] for r in shuffle_shard(raws, random.Random(3), 8)]
    assert a == [r["__key__"] for r in shuffle_shard(raws, random.Random(3), 8)] and a != sorted(a, key=int)
    assert sorted(a, key=int) == [str(i) for i in range(50)]
    assert [r["__key__"] for r in shuffle_shard(raws, None, 8)] == [str(i) for i in range(50)]


def test_the_source_keeps_its_position_per_shard_and_resumes_from_it() -> None:
    shards, read = fake_shards()
    damage = []
    keys = {pos: raw["__key__"] for pos, raw in ShardSource(shards, read, rng=seeded, buffer=3,
                                                            on_damage=damage.append)}
    full = list(keys)
    assert len(full) == 21 and {shard for shard, _ in full} == {0, 1, 2}
    source = ShardSource(shards, read, rng=seeded, buffer=3, on_damage=damage.append)
    it = iter(source)
    head = [next(it)[0] for _ in range(10)]
    state = source.state_dict()
    assert {k: state[k] for k in ("finished", "current", "offset")} == {"finished": [0], "current": 1, "offset": 3}
    assert state["pieces"] == [[i, url, 1, 0, 0, [], None] for i, url in shards]  # per piece of a shard, not per split
    again = ShardSource(shards, read, rng=seeded, buffer=3, on_damage=damage.append)
    again.load_state_dict(state)
    assert head + [pos for pos, _ in again] == full
    raws = again.reread([head[-1], full[-1]])  # the same shuffled order: a position names one raw sample
    assert {p: raw["__key__"] for p, raw in raws.items()} == {p: keys[p] for p in (head[-1], full[-1])}


def test_pieces_of_a_shard_share_it_out_and_its_damage_once() -> None:
    """A shard dealt to more streams than there are shards is cut by sample position: the strided pieces deliver
    every raw sample once between them, and only the phase-0 piece reports the shard's damage."""
    shards, read = fake_shards(n_shards=2, per_shard=7, damaged="s1")
    whole = [Piece(i, url) for i, url in shards]
    dealt = deal(whole, 5)
    assert [len(d) for d in dealt] == [2, 1, 1, 1, 1] and all(p.every == 3 for d in dealt for p in d)
    got, damage = [], []
    for pieces in dealt:
        got += [pos for pos, _ in ShardSource(pieces, read, rng=seeded, buffer=3, on_damage=damage.append)]
    want = [pos for pos, _ in ShardSource(shards, read, rng=seeded, buffer=3, on_damage=lambda e: None)]
    assert sorted(got) == sorted(want) and len(got) == len(set(got))
    assert [e.url for e in damage] == ["s1"]
    held = Piece(0, "s0", start=None, also=(1, 4))  # only held samples: the shard is read no further than them
    assert [j for (_, j), _ in ShardSource([held], read, rng=lambda u: None, buffer=1,
                                           on_damage=damage.append)] == [1, 4]
    assert Piece.of(held.as_list()) == held and Piece.of((3, "s3")) == Piece(3, "s3")


def test_shard_damage_is_reported_once_where_the_shard_ends() -> None:
    shards, read = fake_shards(damaged="s1")
    damage: list[SampleError] = []
    source = ShardSource(shards, read, rng=lambda url: None, buffer=1, on_damage=damage.append)
    it = iter(source)
    head = [next(it)[0] for _ in range(9)]  # into s1, before its damage
    assert head[-1] == (1, 1) and damage == []
    again = ShardSource(shards, read, rng=lambda url: None, buffer=1, on_damage=damage.append)
    again.load_state_dict(source.state_dict())
    rest = [pos for pos, _ in again]
    assert len(damage) == 1 and damage[0].kind == ErrorKind.SHARD_READ
    assert head + rest == [(i, j) for i in range(3) for j in range(4 if i == 1 else 7)]
    # the samples a shuffled shard buffered before its damage are re-read too
    mixed = ShardSource(shards, read, rng=seeded, buffer=100, on_damage=damage.append)
    positions = [pos for pos, _ in mixed if pos[0] == 1]
    assert len(positions) == 4 and set(mixed.reread(positions)) == set(positions)


def test_decode_counts_bad_input_and_its_state_is_the_counts() -> None:
    def decoder(raw, notices=None):
        if raw["__key__"].endswith("3"):
            raise SampleError(ErrorKind.IMAGE_DECODE, "bad", raw["__url__"], raw["__key__"])
        return make_samples(1, key=raw["__key__"])[0]

    shards, read = fake_shards()
    decode = Decode(decoder, ErrorCounter())
    out = list(decode(ShardSource(shards, read, rng=lambda url: None, buffer=1, on_damage=decode.bad)))
    assert len(out) == 18 and decode.state_dict() == {"stage": "decode", "errors": {"image_decode": 3}}
    fresh = Decode(decoder, ErrorCounter())
    fresh.load_state_dict(decode.state_dict())
    assert fresh.errors.counts == {"image_decode": 3}
    with pytest.raises(SampleError, match="bad"):
        list(Decode(decoder, ErrorCounter(), strict=True)((p, r) for p, r in
                                                          ShardSource(shards, read, rng=lambda u: None, buffer=1,
                                                                      on_damage=print)))


def test_the_bucket_stage_owns_what_it_holds_at_every_stop() -> None:
    """Stopped after any batch, saved and restored, the stage gives exactly the rest: held samples and batches
    made but not yet handed on (a sample can complete several: its own bucket and stale ones) included."""
    samples = make_samples(60, seed=2, max_len=100)
    items = [((0, i), s) for i, s in enumerate(samples)]
    for batcher in (BucketBatcher(4), BucketBatcher(2, max_wait=2)):
        full = [[s.key for s in b] for b in BucketStage(batcher)(iter(items))]
        assert_exactly_once([k for b in full for k in b], [s.key for s in samples])
        for stop in range(len(full)):
            stage = BucketStage(batcher)
            consumed: list = []
            it = stage(consumed.append(item) or item for item in items)  # records what the stage took
            head = [[s.key for s in next(it)] for _ in range(stop)]
            state = stage.state_dict()
            positions: list = []
            again = BucketStage(batcher)
            again.restore(state, lambda asked, seen=positions: seen.extend(asked) or {p: samples[p[1]] for p in asked})
            assert all(p[0] == 0 for p in positions)  # positions, not the samples themselves
            rest = [[s.key for s in b] for b in again(iter(items[len(consumed):]))]
            assert head + rest == full, (batcher, stop)


def test_a_plain_batcher_runs_but_does_not_resume_mid_epoch() -> None:
    def pairs(samples):
        samples = list(samples)
        for i in range(0, len(samples), 2):
            yield samples[i:i + 2]

    samples = make_samples(7)
    stage = BucketStage(pairs)
    assert [len(b) for b in stage(((0, i), s) for i, s in enumerate(samples))] == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="keeps no state to resume from"):
        BucketStage(pairs).restore(stage.state_dict(), lambda asked: {})


def test_states_carry_a_format_and_an_old_one_is_refused(builtin_shards: list[str]) -> None:
    ds = ShardDataset(builtin_shards, image_size=16)
    state = ds.state_dict()
    assert state["format"] == STATE_FORMAT and state["stream"]["split"] == {"rank": 0, "world_size": 1, "worker": 0,
                                                                             "num_workers": 1}
    for old in (1, 2):  # 2: positions per shard, before pieces
        with pytest.raises(ValueError, match=f"format {old}, this mmload reads format {STATE_FORMAT}; resume it"):
            ds.load_state_dict({**state, "format": old})
    from mmload.epochs import EpochStream

    with pytest.raises(ValueError, match="epoch-stream state has format 1, this mmload reads format 2"):
        EpochStream(lambda epoch: None).load_state_dict({"format": 1, "epoch": 0, "loader": None})
    with pytest.raises(ValueError, match="saved with world_size=1, rank=0 as one with world_size=2, rank=1"):
        check_split({"rank": 0, "world_size": 1}, {"world_size": 2, "rank": 1})


def test_bucketed_resume_with_a_damaged_shuffled_shard_at_every_stop(tmp_path, builtin_shards: list[str]) -> None:
    cut = cut_shard(tmp_path, builtin_shards[0])

    def make():
        return make_loader("bucketed", [str(cut), *builtin_shards[1:3]], batch_size=4, num_workers=0, stateful=True,
                           image_size=16, max_text_len=32, shuffle=True, shuffle_buffer=1000, seed=0,
                           tokenizer=str(tmp_path))

    full = [list(b.keys) for b in make()]
    for stop in range(0, len(full), 3):
        loader = make()
        it = iter(loader)
        head = [list(next(it).keys) for _ in range(stop)]
        state = loader.state_dict()
        del it
        resumed = make()
        resumed.load_state_dict(state)
        assert head + [list(b.keys) for b in resumed] == full, stop


def test_a_shard_listed_twice_is_two_shards_on_resume(builtin_shards: list[str]) -> None:
    twice = [builtin_shards[0], builtin_shards[0]]

    def make():
        return make_loader("padded", twice, batch_size=8, num_workers=0, stateful=True, image_size=16)

    full = [list(b.keys) for b in make()]
    assert sum(map(len, full)) == 80
    loader = make()
    it = iter(loader)
    head = [list(next(it).keys) for _ in range(6)]
    state = loader.state_dict()
    del it
    resumed = make()
    resumed.load_state_dict(state)
    assert head + [list(b.keys) for b in resumed] == full


def test_a_state_saved_before_every_worker_delivered_resumes(builtin_shards: list[str]) -> None:
    """A worker that has not started yet reports its real place in the split, so its state loads back."""
    def make():
        return make_loader("padded", builtin_shards, batch_size=8, num_workers=2, stateful=True, image_size=16)

    full = [list(b.keys) for b in make()]
    loader = make()
    it = iter(loader)
    head = [list(next(it).keys)]  # worker 0 delivered; worker 1 may not have
    state = loader.state_dict()
    del it, loader
    resumed = make()
    resumed.load_state_dict(state)
    assert head + [list(b.keys) for b in resumed] == full
