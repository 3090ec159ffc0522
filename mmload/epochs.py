"""Batches across epochs: one loader per epoch, resumable mid-epoch.

A trainer counts optimizer steps, not epochs (unequal shares of the shards never leave one rank waiting, see
the README's reliability section), so it reads an endless stream; :class:`EpochStream` makes that stream out of
one loader per epoch, and its state out of the epoch and that loader's position.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import Any


class EpochStream:
    """Batches forever: a fresh loader per epoch from ``make(epoch)``, its dataset's ``set_epoch(epoch)`` called.

    ``state_dict()`` is the epoch plus the loader's position (a ``StatefulLoader``'s ``state_dict()``), so a
    resumed stream continues with the next unseen batch. ``close()`` stops the current loader's workers now.
    """

    STATE_FORMAT = 1  # version of state_dict()'s layout; a state of another version is refused

    def __init__(self, make: Callable[[int], Any]) -> None:
        self.make = make
        self.epoch = 0
        self.loader: Any = None
        self._it: Iterator[Any] | None = None
        self._fresh = True  # the current loader started at the beginning of its epoch

    def __iter__(self) -> EpochStream:
        return self

    def _open(self, epoch: int) -> Any:
        loader = self.make(epoch)
        dataset = getattr(loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        return loader

    def __next__(self) -> Any:
        while True:
            if self.loader is None:
                self.loader, self._fresh = self._open(self.epoch), True
            if self._it is None:
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                if self._fresh:
                    raise RuntimeError(f"epoch {self.epoch} yielded no batch: no data for this process (fewer "
                                       "shards than processes x workers?)") from None
                self.epoch, self.loader, self._it = self.epoch + 1, None, None
                continue
            self._fresh = False
            return batch

    def close(self) -> None:
        """Stop the current loader's worker processes now, not whenever the garbage collector gets to them."""
        self._it = self.loader = None
        gc.collect()

    def state_dict(self) -> dict[str, Any]:
        return {"format": self.STATE_FORMAT, "epoch": self.epoch,
                "loader": None if self.loader is None else self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != self.STATE_FORMAT:
            raise ValueError(f"this epoch-stream state has format {state.get('format')!r}, this mmload reads format "
                             f"{self.STATE_FORMAT}; resume with the mmload version that saved it, or start the run "
                             "over (a checkpoint's weights still load: --eval-only --resume, --image-teacher, "
                             "mmload precompute --encoder)")
        self.close()
        self.epoch = int(state["epoch"])
        self.loader = self._open(self.epoch)
        self._fresh = state["loader"] is None
        if state["loader"] is not None:
            self.loader.load_state_dict(state["loader"])


__all__ = ["EpochStream"]
