"""The batching strategies (``mmload.strategy``) as ready DataLoaders over the same shards and sample schema."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.stateful_dataloader import _ITERATOR_FINISHED

from mmload.dataset import ShardDataset, StreamDataset, open_data
from mmload.elastic import decode_plan, encode_plan, saved_rank
from mmload.elastic import plan as elastic_plan
from mmload.errors import WorkerDied, new_trace, read_trace
from mmload.layouts import PATCH_SIZE
from mmload.sample import Sample
from mmload.stages import Split
from mmload.strategy import STRATEGIES, Strategy, get_strategy


def make_collator(strategy: str | Strategy, *, pack: bool | None = None, ids_dtype: torch.dtype = torch.int32,
                  patch_size: int | None = None) -> Callable:
    """The collator of ``strategy``; ``pack=None`` keeps each collator's default (only nested packs). Give
    ``patch_size`` (the model's) for images at native resolution: nested cuts images of several sizes into it."""
    return get_strategy(strategy).collator(pack=pack, ids_dtype=ids_dtype, patch_size=patch_size)


def image_cost(max_tokens: int | None, image_size: int, patch_size: int, resolution: str = "square") -> dict[str, Any]:
    """How a token budget counts images (``Strategy.batcher``'s ``image_tokens`` and ``patch_size``): a square
    image at the square grid, a native one at its own grid (and, padded, its batch's largest); without
    ``max_tokens``, only the patch size native grids are at (bucketing bounds image padding at it)."""
    if resolution == "native":
        return {"image_tokens": None, "patch_size": patch_size}
    return {"image_tokens": (image_size // patch_size) ** 2 + 1 if max_tokens else None, "patch_size": None}


# DataLoader keywords make_loader hands on as they are (the rest go to the dataset); the loader sets the others
LOADER_KEYWORDS = ("timeout", "persistent_workers", "multiprocessing_context", "worker_init_fn", "in_order",
                   "pin_memory_device", "snapshot_every_n_steps")


def make_loader(strategy: str | Strategy, data: str | Sequence[str], *, batch_size: int | None = None,
                max_tokens: int | None = None, patch_size: int = PATCH_SIZE, num_workers: int = 2,
                pin_memory: bool | None = None, pack: bool | None = None, stateful: bool = False,
                transform: Callable[[Sample], Sample] | None = None, seed: int = 0,
                prefetch_factor: int | None = None, **kwargs: Any) -> DataLoader:
    """A DataLoader that yields batches of ``strategy`` from ``data`` (``--data`` specs, see ``open_data``).

    A batch is ``batch_size`` samples (32 when neither is given) or, with ``max_tokens`` instead (padded, bucketed
    and nested), as many samples as fit that many tokens: text tokens (the padded size, for padded layouts) plus
    each image's patches and class token at ``patch_size`` (give the model's; 16 is ViT-B/16's, and
    ``resolution="native"`` decodes to its grid).

    ``strategy`` is a name or a :class:`~mmload.strategy.Strategy` of the registry; ``embeddings`` (a strategy whose
    ``data`` is precomputed) expects shards written by ``mmload precompute``. ``stateful=True`` returns a
    :class:`StatefulLoader` (torchdata's ``StatefulDataLoader``: the same arguments, plus ``state_dict()`` and
    ``load_state_dict()`` to resume mid-epoch). The DataLoader keywords of ``LOADER_KEYWORDS`` (``timeout``,
    ``persistent_workers``, ``multiprocessing_context``, ...) go to the loader; every other keyword goes to
    :class:`~mmload.ShardDataset` (``image_size``, ``tokenizer``, ``shuffle``, ...).
    """
    strategy = get_strategy(strategy)
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    collate = strategy.collator(pack=pack, patch_size=patch_size)
    if batch_size is None and max_tokens is None:
        batch_size = 32
    image_size = kwargs.get("image_size", 224)
    batcher = strategy.batcher(batch_size, max_tokens=max_tokens,
                               **image_cost(max_tokens, image_size, patch_size, kwargs.get("resolution", "square")))
    loader_kwargs = {k: kwargs.pop(k) for k in LOADER_KEYWORDS if k in kwargs}
    if "snapshot_every_n_steps" in loader_kwargs and not stateful:
        raise ValueError("snapshot_every_n_steps is a StatefulDataLoader keyword; pass stateful=True with it")
    dataset = open_data(data, seed=seed, batcher=batcher, transform=transform, patch_size=patch_size, **kwargs)
    if pin_memory is None:
        pin_memory = torch.accelerator.is_available()
    loader_cls: type[DataLoader] = StatefulLoader if stateful else Loader
    if num_workers > 0 and prefetch_factor is not None:
        loader_kwargs["prefetch_factor"] = prefetch_factor
    return loader_cls(dataset, batch_size=None if batcher else batch_size, collate_fn=collate,
                      num_workers=num_workers, pin_memory=pin_memory, **loader_kwargs)


PLAN_KEY = "mmload_elastic_plan"  # where a StatefulLoader state keeps its elastic plan


def saved_num_workers(state: dict[str, Any]) -> int:
    """The worker count a ``StatefulDataLoader`` state was saved with (0: the main process)."""
    snapshot = state.get("_snapshot")
    return 0 if snapshot is None else int(snapshot["_main_snapshot"]["_num_workers"])



class _ReportsDeadWorkers:
    """DataLoader mixin: when a worker process dies, say which shard and key each worker was reading."""

    def __iter__(self) -> Iterator[Any]:
        dataset = self.dataset
        if self.num_workers > 0 and isinstance(dataset, StreamDataset):
            dataset.trace = new_trace(self.num_workers)  # set before super() starts (and pickles to) the workers
        batches = super().__iter__()
        if self.num_workers > 0 and getattr(dataset, "carried_errors", None):
            dataset.carried_errors = None  # the workers have their copies; worker 0 counts them, once
        return _reporting(batches, getattr(dataset, "trace", None))

    def __len__(self) -> int:
        """Batches an epoch yields, when that is known in advance: a fixed ``batch_size`` (every worker yields its own
        last, partial batch) over a dataset whose sample counts are known. Bucketed batches vary: ``TypeError``."""
        dataset = self.dataset
        if not isinstance(dataset, StreamDataset):
            return super().__len__()
        if self.batch_size is None:
            raise TypeError("len() of a bucketed or token-budget loader is not known in advance (its batches vary in "
                            "size); len(loader.dataset) gives the samples of this rank")
        rank, world, workers = dataset.rank, dataset.world_size, max(self.num_workers, 1)
        per_worker = [dataset.samples_of(Split(rank, world, w, workers)) for w in range(workers)]
        return sum(-(-n // self.batch_size) if not self.drop_last else n // self.batch_size for n in per_worker)


def _reporting(batches: Iterator[Any], trace: torch.Tensor | None) -> Iterator[Any]:
    try:
        yield from batches
    except RuntimeError as e:
        # "Caught X in DataLoader worker": an exception the worker raised, handed on as it is (a SampleError or
        # TooManyErrors among them); a worker that died or went silent is what the trace is for
        died = "DataLoader worker" in str(e) or "DataLoader timed out" in str(e)
        if trace is None or not died or str(e).startswith("Caught "):
            raise
        where = "; ".join(f"worker {i}: {w or 'not started'}" for i, w in enumerate(read_trace(trace)))
        raise WorkerDied(f"{e} The workers were decoding: {where}") from e


class Loader(_ReportsDeadWorkers, DataLoader):
    """``torch.utils.data.DataLoader`` that names the shard and key of a worker that died."""


class StatefulLoader(_ReportsDeadWorkers, StatefulDataLoader):
    """torchdata's ``StatefulDataLoader``, with a clear refusal to resume on another worker count
    (``mmload.stages.check_split``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch 2.13
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            super().__init__(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        plan = encode_plan(getattr(self.dataset, "plan", None))
        if plan is not None:
            state[PLAN_KEY] = plan  # the epochs an elastic resume planned (NOTE [elastic resume] in mmload.elastic)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from ``state_dict``; a state saved with another number of workers resumes elastically
        (:meth:`load_elastic`) when it was saved without ranks.

        NOTE [end of epoch]: a state taken after the loader's epoch ended (its iterator raised ``StopIteration``)
        has nothing left to resume: the next ``iter()`` reads a whole epoch, the one the dataset is set to
        (``set_epoch``, before or after this call), as the uninterrupted loader's next ``iter()`` would, with any
        number of workers (torchdata would restore the finished epoch's number into a 0-worker dataset and replay
        that epoch)."""
        state_dict = dict(state_dict)
        plan = state_dict.pop(PLAN_KEY, None)
        if plan is not None and isinstance(self.dataset, StreamDataset):
            self.dataset.plan = decode_plan(plan)
        if state_dict and state_dict.get(_ITERATOR_FINISHED):
            state_dict = {}
        if state_dict and saved_num_workers(state_dict) != self.num_workers:
            world = saved_rank(state_dict).world_size  # a blend's state is refused here, with why
            if world != 1:
                raise ValueError(f"this state was saved by one of {world} ranks with {saved_num_workers(state_dict)} "
                                 f"workers: resuming it with {self.num_workers} needs every rank's state, "
                                 "loader.load_elastic([state of rank 0, state of rank 1, ...])")
            self.load_elastic([{**state_dict, **({PLAN_KEY: plan} if plan else {})}])
            return
        super().load_state_dict(state_dict)

    def load_elastic(self, states: Sequence[dict[str, Any]]) -> int:
        """Resume from the states of every rank of a run saved on any number of ranks and workers, with this
        loader's rank and workers (NOTE [elastic resume] in :mod:`mmload.elastic`); iterate from the epoch it
        returns, the earliest any old rank was in. The order differs from the uninterrupted run's; the samples
        delivered per epoch, over all ranks, do not."""
        dataset = self.dataset
        if not isinstance(dataset, ShardDataset):
            raise ValueError(f"an elastic resume needs a ShardDataset, got {type(dataset).__name__}")
        saved = [saved_rank(state, plan=state.get(PLAN_KEY)) for state in states]
        epoch, plan, errors = elastic_plan(dataset, saved, dataset.rank, dataset.world_size, self.num_workers)
        dataset.plan, dataset.carried_errors = plan, dict(errors)
        dataset.set_epoch(epoch)
        super().load_state_dict({})
        return epoch


__all__ = ["LOADER_KEYWORDS", "STRATEGIES", "Loader", "StatefulLoader", "image_cost", "make_collator", "make_loader",
           "saved_num_workers"]
