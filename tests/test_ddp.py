"""DistributedDataParallel on the CPU: two gloo processes train on different shards and end with identical weights,
with plain DDP gradient averaging and with gradient masking (whose per-loss gradients the trainer all-reduces)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
RUNS = {"plain": {}, "gradmask": {"mask_ratio": 0.5, "mask_step": 0.25, "mask_interval": 2}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two processes share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from models.config import TrainConfig
        from models.train import train

        for name, extra in RUNS.items():
            result = train(TrainConfig(data=data, preset="tiny", steps=6, batch_size=8, lr=3e-3, warmup=2,
                                       num_workers=0, progress=False, device="cpu", log_every=3,
                                       out=f"{out}/{name}", **extra))
            torch.save(result["model"].state_dict(), f"{out}/{name}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_end_with_identical_weights(builtin_shards: list[str], tmp_path: Path) -> None:
    data = os.path.dirname(builtin_shards[0])
    mp.spawn(worker, args=(free_port(), data, str(tmp_path)), nprocs=WORLD, join=True)
    for name in RUNS:
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in range(WORLD)]
        assert ranks[0].keys() == ranks[1].keys()
        for key in ranks[0]:
            assert torch.equal(ranks[0][key], ranks[1][key]), f"{name}: {key} differs between ranks"
        assert (tmp_path / name / "checkpoint-0000006.pt").is_file()  # rank 0 saved, with both loader states
        assert len((tmp_path / name / "metrics.jsonl").read_text().splitlines()) == 2
    ckpt = torch.load(tmp_path / "gradmask" / "checkpoint-0000006.pt", weights_only=True)
    assert len(ckpt["loader"]) == WORLD and ckpt["gradmask"]["ratio"] == 0.5
