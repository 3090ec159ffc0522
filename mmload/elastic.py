"""Elastic resume: a mid-epoch state saved on R ranks x W workers, continued on R' x W' (any values).

NOTE [elastic resume]: every stream (one DataLoader worker of one rank) saves what it reads as pieces of shards
(:class:`~mmload.stages.Piece`) and how far it got, and the bucket stage saves the positions it held. From the
states of *all* old ranks, :func:`plan` works out, for every epoch some old rank had not finished, what is left:

- an old rank past epoch ``e`` left nothing of it;
- an old rank in epoch ``e`` left the rest of each of its streams' pieces (from where the stream stopped) and the
  samples its bucket stage held but had not delivered;
- an old rank not yet in epoch ``e`` left its whole share of it (its plan's, if it had one).

What is left of each epoch is dealt out round-robin to the R' x W' new streams; where there are fewer unfinished
shards than new streams, each is cut by sample position into strided pieces (``every``/``phase``), so no stream
idles. The new cluster resumes in the earliest epoch any old rank was in; every stream reads its planned pieces
in each planned epoch and its ordinary share (NOTE [splitting] in :mod:`mmload.dataset`) after them.

Guarantee: per epoch, each sample (each position of each shard) is delivered at most once across all ranks, and
exactly once in every epoch all ranks finish. The order after an elastic resume differs from the uninterrupted
run's; the set does not. Cost: a strided piece reads its whole shard to deliver 1/``every`` of it, and a held
sample is read again. The error counts of the old streams are carried over to the new rank 0's worker 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mmload.stages import Piece, Split, check_format

PLAN_FORMAT = 1  # the layout of a plan as saved in a state (lists of Piece.as_list())


@dataclass(frozen=True)
class SavedRank:
    """What one old rank left: the epoch its stream was in, its split, its workers' dataset states (None: at the
    start of ``epoch``, nothing read) and its own plan for later epochs."""

    epoch: int
    rank: int
    world_size: int
    workers: tuple[Mapping[str, Any], ...] | None
    plan: Mapping[int, list[list[Piece]]]


def worker_states(loader_state: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The dataset state of every worker in a ``StatefulLoader`` state (one for a loader without workers)."""
    snapshot = loader_state.get("_snapshot")
    if snapshot is None:
        return [loader_state["dataset_state"]]
    if loader_state.get("_steps_since_snapshot", 0):
        raise ValueError("this loader state was saved with snapshot_every_n_steps > 1: its workers' states lag behind "
                         "what it delivered, so it cannot be resumed on another number of ranks or workers")
    workers = snapshot["_worker_snapshots"]
    return [workers[f"worker_{i}"]["dataset_state"] for i in range(len(workers))]


def encode_plan(plan: Mapping[int, list[list[Piece]]] | None) -> dict[str, Any] | None:
    if not plan:
        return None
    return {"format": PLAN_FORMAT, "epochs": {int(e): [[p.as_list() for p in w] for w in ws] for e, ws in plan.items()}}


def decode_plan(saved: Mapping[str, Any] | None) -> dict[int, list[list[Piece]]]:
    if not saved:
        return {}
    if saved.get("format") != PLAN_FORMAT:
        raise ValueError(f"this elastic plan has format {saved.get('format')!r}, this mmload reads {PLAN_FORMAT}; "
                         "resume with the mmload version that saved it, or start the epoch over")
    return {int(e): [[Piece.of(p) for p in w] for w in ws] for e, ws in saved["epochs"].items()}


def saved_rank(loader_state: Mapping[str, Any] | None, *, rank: int | None = None, world_size: int | None = None,
               epoch: int = 0, plan: Mapping[str, Any] | None = None) -> SavedRank:
    """A :class:`SavedRank` from one rank's ``StatefulLoader`` state (None: between epochs, at the start of
    ``epoch``), its split (None: the one its streams were saved with) and its saved plan (``encode_plan``). A state
    taken after its epoch ended is at the start of the next epoch (NOTE [end of epoch] in :mod:`mmload.loader`)."""
    workers = None
    if loader_state:
        states = tuple(worker_states(loader_state))
        for state in states:
            check_format(state, "dataset")
            if "sources" in state["stream"]:
                raise ValueError("an elastic resume (another number of ranks or workers) of a blend of several "
                                 "--data sources is not supported yet; resume with the ranks and workers it was "
                                 "saved with, or start the epoch over")
            split = state["stream"]["split"]
            if rank is None:
                rank, world_size = split["rank"], split["world_size"]
            if (split["rank"], split["world_size"]) != (rank, world_size):
                raise ValueError(f"the loader state of rank {rank} of {world_size} holds a stream of rank "
                                 f"{split['rank']} of {split['world_size']}: give the states in rank order")
        epoch = int(states[0]["stream"]["epoch"])
        if loader_state.get("_iterator_finished"):
            epoch += 1
        else:
            workers = states
    return SavedRank(epoch, rank, world_size, workers, decode_plan(plan))


def _left_by(dataset: Any, saved: SavedRank, epoch: int) -> tuple[list[Piece], Counter[str]]:
    """The pieces of ``epoch`` that ``saved`` left unread (and the errors it counted, in its current epoch)."""
    if epoch < saved.epoch:
        return [], Counter()
    if epoch > saved.epoch or saved.workers is None:
        if epoch in saved.plan:
            return [p for worker in saved.plan[epoch] for p in worker], Counter()
        return dataset.default_pieces(epoch, Split(saved.rank, saved.world_size, 0, 1)), Counter()
    left, errors = [], Counter()
    for state in saved.workers:
        stream, bucket = state["stream"], state["bucket"]
        dataset.check_order(stream["order"])
        source = stream["source"]
        errors.update(stream["decode"]["errors"])
        pieces = [Piece.of(p) for p in source["pieces"]]
        finished, current, offset = set(source["finished"]), source["current"], int(source["offset"])
        for k, piece in enumerate(pieces):
            if k in finished:
                continue
            if k == current:
                start = None if piece.start is None else max(piece.start, offset)
                piece = replace(piece, start=start, also=tuple(j for j in piece.also if j >= offset))
            if piece.start is not None or piece.also:
                left.append(piece)
        if bucket is None:
            raise ValueError("this stream's batcher keeps no state (it has no holder()); it cannot be resumed")
        held: dict[int, set[int]] = {}
        for pos in [p for p, _ in bucket.get("held", ())] + [p for batch in bucket.get("due", ()) for p in batch]:
            held.setdefault(int(pos[0]), set()).add(int(pos[1]))
        urls = {p.shard: p.url for p in pieces}
        left += [Piece(shard, urls[shard], start=None, also=tuple(sorted(js))) for shard, js in sorted(held.items())]
    return left, errors


def deal(pieces: Sequence[Piece], streams: int) -> list[list[Piece]]:
    """``pieces`` dealt out round-robin to ``streams`` streams; with fewer pieces that read a range than streams,
    each is first cut by sample position into strided pieces, so every stream gets one."""
    ranged = sorted((p for p in pieces if p.start is not None), key=lambda p: (p.shard, p.every, p.phase))
    held = sorted((p for p in pieces if p.start is None), key=lambda p: (p.shard, p.also))
    if ranged and len(ranged) < streams:
        m = -(-streams // len(ranged))
        ranged = [replace(p, every=p.every * m, phase=p.phase + p.every * i, also=p.also if i == 0 else ())
                  for p in ranged for i in range(m)]
    out: list[list[Piece]] = [[] for _ in range(streams)]
    for i, piece in enumerate(ranged + held):
        out[i % streams].append(piece)
    return out


def plan(dataset: Any, saved: Sequence[SavedRank], rank: int, world_size: int,
         num_workers: int) -> tuple[int, dict[int, list[list[Piece]]], Counter[str]]:
    """The epoch to resume in, the pieces each of this rank's ``num_workers`` workers (one when 0) reads in every
    epoch some old rank had not finished, and the error counts the old streams had made (see NOTE above).

    ``dataset`` is the new run's :class:`~mmload.ShardDataset` (same shards, seed and shuffle as the old run): it
    gives the old ranks' ordinary shares of the epochs they had not reached.
    """
    if not saved:
        raise ValueError("an elastic resume needs the state of every old rank, got none")
    if sorted(s.rank for s in saved) != list(range(saved[0].world_size)) or len({s.world_size for s in saved}) > 1:
        raise ValueError(f"an elastic resume needs the state of every old rank: got ranks {[s.rank for s in saved]} of "
                         f"{saved[0].world_size}")
    first = min(s.epoch for s in saved)
    last = max([s.epoch for s in saved] + [e for s in saved for e in s.plan])
    workers = max(num_workers, 1)
    errors: Counter[str] = Counter()
    out: dict[int, list[list[Piece]]] = {}
    for epoch in range(first, last + 1):
        left = []
        for s in saved:
            pieces, counted = _left_by(dataset, s, epoch)
            left += pieces
            errors.update(counted)
        dealt = deal(left, world_size * workers)
        out[epoch] = dealt[rank * workers:(rank + 1) * workers]
    return first, out, errors


__all__ = ["PLAN_FORMAT", "SavedRank", "deal", "decode_plan", "encode_plan", "plan", "saved_rank", "worker_states"]
