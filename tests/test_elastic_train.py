"""The trainer resumes onto another cluster shape: a run of 2 gloo ranks x 2 workers, checkpointed mid-epoch, goes on
as 3 ranks x 1 worker and as 1 rank x 2 workers; the ``--log-keys`` logs of every rank prove that each key was
trained on once in every epoch all ranks finished, and at most once in the others."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_ddp import free_port

from mmload import ShardDataset

STEPS = 4  # the first run's steps, checkpointed at the end
OPTIONS = {"preset": "tiny", "batch_size": 16, "lr": 1e-3, "warmup": 1, "progress": False, "device": "cpu",
           "log_every": 2, "log_keys": True, "save_every": STEPS}


def rank_main(rank: int, world: int, port: int, options: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from models.config import TrainConfig
        from models.train import train

        train(TrainConfig(**options))
    finally:
        dist.destroy_process_group()


def launch(world: int, **options: object) -> None:
    if world == 1:
        from models.config import TrainConfig
        from models.train import train

        train(TrainConfig(**{**OPTIONS, **options}))
        return
    mp.spawn(rank_main, args=(world, free_port(), {**OPTIONS, **options}), nprocs=world, join=True)


def trained_keys(out: Path, world: int) -> tuple[dict[int, Counter[str]], set[int]]:
    """Keys trained on per epoch over every rank's log (old ranks' included), and the epochs every rank of the last
    run (``world`` ranks) got past."""
    per_epoch: dict[int, Counter[str]] = defaultdict(Counter)
    last_epoch = {}
    for log in sorted(out.glob("keys-rank*.jsonl")):
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        assert [(x["step"], x["micro"]) for x in lines] == sorted((x["step"], x["micro"]) for x in lines)
        for line in lines:
            per_epoch[line["epoch"]].update(line["keys"])
        last_epoch[log.name] = max(x["epoch"] for x in lines)
    finished = set(range(min(last_epoch[f"keys-rank{r}.jsonl"] for r in range(world))))
    return per_epoch, finished


@pytest.fixture(scope="module")
def first_run(builtin_shards: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """2 ranks x 2 workers for STEPS steps, checkpointed at the end: the run both resumes continue."""
    data, first = os.path.dirname(builtin_shards[0]), tmp_path_factory.mktemp("first")
    launch(2, data=data, steps=STEPS, num_workers=2, out=str(first))
    return data, first


@pytest.mark.slow
@pytest.mark.parametrize(("world", "workers", "steps"), [(3, 1, 14), (1, 2, 16)])
def test_resume_onto_another_number_of_ranks_and_workers(first_run: tuple[str, Path], builtin_shards: list[str],
                                                         tmp_path: Path, world: int,
                                                         workers: int, steps: int,
                                                         capfd: pytest.CaptureFixture) -> None:
    data, first = first_run
    checkpoint = first / f"checkpoint-{STEPS:07d}.pt"
    assert len(torch.load(checkpoint, weights_only=False)["loader"]) == 2  # every rank's loader state
    out = tmp_path / "resumed"
    shutil.copytree(first, out)
    capfd.readouterr()
    launch(world, data=data, steps=steps, num_workers=workers, out=str(out), resume=str(out / checkpoint.name))
    assert f"elastic resume at step {STEPS} from 2 ranks x 2 workers onto {world} x {workers}" in capfd.readouterr().err

    every = [s.key for s in ShardDataset(builtin_shards, image_size=16)]
    per_epoch, finished = trained_keys(out, world)
    assert 0 in finished, "the run should get every rank past epoch 0"
    for epoch, counts in per_epoch.items():
        assert set(counts) <= set(every) and max(counts.values()) == 1, f"epoch {epoch}: a key trained on twice"
        if epoch in finished:
            assert set(counts) == set(every), f"epoch {epoch}: {len(set(every) - set(counts))} keys never trained on"
    metrics = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(2, steps + 1, 2))
