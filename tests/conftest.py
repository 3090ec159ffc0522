"""Shared test helpers: synthetic samples, and builtin shards made once per session."""

from __future__ import annotations

import pytest
import torch

from mmload.sample import IGNORE_INDEX, Modality, Sample


def make_samples(n: int = 24, seed: int = 0, image_size: int = 32, vocab: int = 100, paired_every: int = 0,
                 max_len: int = 40) -> list[Sample]:
    """A mixed list of samples: about one text in three, ids starting with 2 ([CLS]-like) and ending with 3."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        key = f"{i:06d}"
        if paired_every and i % paired_every == paired_every - 1:
            kind = Modality.IMAGE_TEXT
        else:
            kind = Modality.TEXT if i % 3 == 2 else Modality.IMAGE
        pixels = ids = mlm = None
        label = IGNORE_INDEX
        if kind != Modality.TEXT:
            pixels = torch.randint(0, 256, (3, image_size, image_size), generator=g, dtype=torch.uint8)
            label = int(torch.randint(0, 10, (1,), generator=g))
        if kind != Modality.IMAGE:
            length = int(torch.randint(3, max_len, (1,), generator=g))
            ids = torch.randint(5, vocab, (length,), generator=g)
            ids[0], ids[-1] = 2, 3
            mlm = torch.where(torch.rand(length, generator=g) < 0.3, ids, torch.full_like(ids, IGNORE_INDEX))
        out.append(Sample(key, kind, pixels=pixels, ids=ids, mlm_labels=mlm, label=label))
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA: skip them cleanly elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def samples() -> list[Sample]:
    return make_samples(24, paired_every=7)


@pytest.fixture(scope="session")
def builtin_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Builtin shards (300 samples, several shards) made once for the whole test session."""
    from mmload.make_shards import make_shards

    out = tmp_path_factory.mktemp("builtin")
    manifest = make_shards(out, source="builtin", samples=300, seed=0, maxcount=40, progress=False)
    return [str(out / shard["name"]) for shard in manifest["shards"]]
