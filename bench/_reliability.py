"""The benchmark's reliability pass: loader only, several shuffled epochs and one mid-epoch resume.

Each epoch runs the bucketed strategy (the stage with the most state: bounded buckets that hold samples
across batches) through a ``StatefulLoader`` with workers and counts every key it delivers
(``mmload.coverage.Coverage``), the errors the workers counted, and memory: this process's RSS after each epoch
and the peak RSS of the largest finished worker. A second pass over epoch 0 stops halfway, saves the loader
state, and finishes on a fresh loader from that state: its coverage must be the uninterrupted epoch's.
"""

from __future__ import annotations

import resource
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from bench._measure import peak_rss_bytes, rss_bytes
from mmload.coverage import Coverage, loader_errors
from mmload.dataset import parse_data
from mmload.loader import make_loader
from mmload.strategy import REGISTRY

# the stage with the most state: the first strategy that groups samples in a stream stage (bounded buckets)
STRATEGY = next(s.name for s in REGISTRY.values() if s.batcher_factory is not None)


def measure(data: Sequence[str], *, epochs: int, batch_size: int, workers: int, seed: int, expected: int | None,
            progress: bool = True, **dataset_kwargs: Any) -> dict[str, Any]:
    def loader(epoch: int) -> Any:
        made = make_loader(STRATEGY, list(data), batch_size=batch_size, num_workers=workers, stateful=True,
                           shuffle=True, seed=seed, **dataset_kwargs)
        made.dataset.set_epoch(epoch)
        return made

    reports, rss, worker_peak, batches = [], [], [], 0
    for epoch in range(epochs):
        cov, made = Coverage(), loader(epoch)
        for batch in tqdm(made, desc=f"reliability epoch {epoch}", unit=" batches", disable=not progress):
            cov.add(batch)
            batches += epoch == 0
        reports.append(cov.report(expected, dict(loader_errors(made.state_dict()))))
        rss.append(rss_bytes())
        worker_peak.append(peak_rss_bytes(resource.RUSAGE_CHILDREN))

    cov, first = Coverage(), loader(0)
    it = iter(first)
    for _ in range(batches // 2):
        cov.add(next(it))
    state = first.state_dict()
    del it, first
    resumed = loader(0)
    resumed.load_state_dict(state)
    for batch in resumed:
        cov.add(batch)
    resume = cov.report(expected, dict(loader_errors(resumed.state_dict())))

    elastic = None
    if len(parse_data(list(data))) == 1:  # a blend is not resumed elastically yet (mmload.elastic)
        elastic = _elastic(loader_kwargs={"batch_size": batch_size, "seed": seed, **dataset_kwargs}, data=data,
                           expected=expected, batches=batches)

    errors: dict[str, int] = {}
    for r in reports:
        for kind, n in r["errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    return {
        "strategy": STRATEGY, "epochs": epochs, "workers": workers, "batch_size": batch_size,
        "samples_read": sum(r["samples"] for r in reports), "errors": errors,
        "repeats": sum(r["repeats"] for r in reports), "lost": sum(r.get("lost") or 0 for r in reports),
        "expected_per_epoch": expected, "per_epoch": reports,
        "resume": {"stopped_after_batches": batches // 2, **resume}, "elastic_resume": elastic,
        "rss_after_epoch_bytes": rss, "worker_peak_rss_bytes": worker_peak,
        "peak_rss_bytes": peak_rss_bytes(), "how": __doc__.split("\n\n", 1)[1].strip().replace("\n", " "),
    }


ELASTIC = ((2, 2), (3, 1))  # (ranks, workers) saved, and resumed on


def _elastic(*, loader_kwargs: dict[str, Any], data: Sequence[str], expected: int | None,
             batches: int) -> dict[str, Any]:
    """Epoch 0 on 2 ranks x 2 workers (simulated in this process: one loader per rank), each rank stopped at its own
    point, resumed on 3 ranks x 1 worker from both states (``StatefulLoader.load_elastic``) and read to the end."""
    (ranks, workers), (new_ranks, new_workers) = ELASTIC

    def loader(rank: int, world: int, num_workers: int) -> Any:
        return make_loader(STRATEGY, list(data), num_workers=num_workers, stateful=True, shuffle=True, rank=rank,
                           world_size=world, **loader_kwargs)

    cov, states, stops = Coverage(), [], []
    for rank in range(ranks):
        made = loader(rank, ranks, workers)
        it = iter(made)
        stops.append(max(1, batches // (ranks * (2 + rank))))  # unequal shares at the checkpoint
        for _ in range(stops[-1]):
            cov.add(next(it))
        states.append(made.state_dict())
        del it, made
    errors: dict[str, int] = {}
    for rank in range(new_ranks):
        made = loader(rank, new_ranks, new_workers)
        made.load_elastic(states)
        for batch in made:
            cov.add(batch)
        for kind, n in loader_errors(made.state_dict()).items():
            errors[kind] = errors.get(kind, 0) + n
    return {"from": list(ELASTIC[0]), "to": list(ELASTIC[1]), "stopped_after_batches": stops,
            **cov.report(expected, errors)}
