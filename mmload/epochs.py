"""Batches across epochs: one loader per epoch, resumable mid-epoch.

A trainer counts optimizer steps, not epochs (unequal shares of the shards never leave one rank waiting, see
the README's reliability section), so it reads an endless stream; :class:`EpochStream` makes that stream out of
one loader per epoch, and its state out of the epoch and that loader's position.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from mmload.elastic import decode_plan, encode_plan, saved_rank
from mmload.elastic import plan as elastic_plan
from mmload.errors import NoSamples
from mmload.stages import Piece


class EpochStream:
    """Batches forever: a fresh loader per epoch from ``make(epoch)``, its dataset's ``set_epoch(epoch)`` called.

    ``state_dict()`` is the epoch plus the loader's position (a ``StatefulLoader``'s ``state_dict()``), so a
    resumed stream continues with the next unseen batch; ``load_elastic`` continues the states of every rank of a
    run saved on another number of ranks or workers (NOTE [elastic resume] in :mod:`mmload.elastic`). ``close()``
    stops the current loader's workers now.
    """

    STATE_FORMAT = 2  # version of state_dict()'s layout (2: the split and the elastic plan); another is refused

    def __init__(self, make: Callable[[int], Any]) -> None:
        self.make = make
        self.epoch = 0
        self.loader: Any = None
        self._it: Iterator[Any] | None = None
        self._fresh = True  # the current loader started at the beginning of its epoch
        self.plan: dict[int, list[list[Piece]]] = {}  # epochs an elastic resume planned
        self._split: tuple[int, int] | None = None  # (rank, world size) of the loaders' datasets

    def __iter__(self) -> EpochStream:
        return self

    def _open(self, epoch: int) -> Any:
        loader = self.make(epoch)
        dataset = getattr(loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        if self.plan and dataset is not None:
            dataset.plan = self.plan
        if hasattr(dataset, "rank"):
            self._split = (dataset.rank, dataset.world_size)
        return loader

    def _skipped(self) -> str:
        """``; skipped: image_decode 3, ...``: the bad input the loader counted, when it can tell."""
        from mmload.coverage import loader_errors

        try:
            counts = loader_errors(self.loader.state_dict())
        except Exception:  # a plain DataLoader has no state to read
            return ""
        return "; skipped: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) if counts else ""

    def __next__(self) -> Any:
        while True:
            if self.loader is None:
                # an epoch an elastic resume planned may hold nothing for this rank: not an error
                self.loader, self._fresh = self._open(self.epoch), self.epoch not in self.plan
            if self._it is None:
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                if self._fresh:
                    raise NoSamples(f"epoch {self.epoch} yielded no batch: no good sample for this process"
                                    f"{self._skipped()} (or fewer shards than processes x workers)") from None
                self.epoch, self.loader, self._it = self.epoch + 1, None, None
                continue
            self._fresh = False
            return batch

    def close(self) -> None:
        """Stop the current loader's worker processes now, not whenever the garbage collector gets to them."""
        self._it = self.loader = None
        gc.collect()

    def state_dict(self) -> dict[str, Any]:
        if self._split is None:  # nothing opened yet: the split the first loader reads
            self._open(self.epoch)
        rank, world = self._split
        return {"format": self.STATE_FORMAT, "epoch": self.epoch, "rank": rank, "world_size": world,
                "loader": None if self.loader is None else self.loader.state_dict(), "plan": encode_plan(self.plan)}

    def _check(self, state: dict[str, Any]) -> None:
        if state.get("format") != self.STATE_FORMAT:
            raise ValueError(f"this epoch-stream state has format {state.get('format')!r}, this mmload reads format "
                             f"{self.STATE_FORMAT}; resume with the mmload version that saved it, or start the run "
                             "over (a checkpoint's weights still load: --eval-only --resume, --image-teacher, "
                             "mmload precompute --encoder)")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check(state)
        self.close()
        self.epoch = int(state["epoch"])
        self.plan = decode_plan(state.get("plan"))
        self.loader = self._open(self.epoch)
        self._fresh = state["loader"] is None and self.epoch not in self.plan
        if state["loader"] is not None:
            self.loader.load_state_dict(state["loader"])

    def load_elastic(self, states: Sequence[dict[str, Any]]) -> None:
        """Continue the states of every rank of a run (in rank order) on this stream's rank and workers, however
        many the run had: from the earliest epoch any old rank was in, each planned epoch reads what the old ranks
        left of it, dealt out to the new ranks and workers (NOTE [elastic resume] in :mod:`mmload.elastic`)."""
        for state in states:
            self._check(state)
        saved = [saved_rank(s["loader"], rank=int(s["rank"]), world_size=int(s["world_size"]), epoch=int(s["epoch"]),
                            plan=s.get("plan")) for s in states]
        self.close()
        self.plan = {}
        first = self._open(min(s.epoch for s in saved))
        rank, world = self._split
        epoch, self.plan, errors = elastic_plan(first.dataset, saved, rank, world, first.num_workers)
        del first
        self.epoch = epoch
        self.loader, self._fresh = self._open(epoch), False
        self.loader.dataset.carried_errors = dict(errors)


__all__ = ["EpochStream"]
