"""Data for the throughput benchmark: builtin shards and cached embedding shards.

NOTE [embedding shards]: the ``embeddings`` strategy reads shards written by ``mmload.precompute`` with a frozen,
randomly initialised ViT-BERT of the benchmark's preset; precompute truncates texts to the encoder's
``max_text_len``, as the decoder does for the other strategies, so every strategy trains on the same tokens. The
cache is keyed by preset, seed, the embedding form and the input shards (path, size, mtime).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmload.dataset import expand_urls, open_data, parse_data
from mmload.make_shards import BUILTIN_MAXCOUNT, TEXT_LEN
from mmload.manifest import manifest_beside, shard_samples
from mmload.sample import Sample

DEFAULT_TEXT_LEN = TEXT_LEN  # builtin texts' word counts: (median, sigma)
DEFAULT_MAXCOUNT = BUILTIN_MAXCOUNT  # shards of the cached default data: enough for 16 loader workers
_KEY_FILE = "bench-key.json"
EMBEDDING_CACHE_FORMAT = 3  # 3: image_text pairs keep both sides; 2: texts truncated to the encoder's max_text_len


def builtin_shards(root: Path, samples: int, seed: int, image_text_ratio: float,
                   text_len: tuple[float, float] = DEFAULT_TEXT_LEN, maxcount: int = DEFAULT_MAXCOUNT,
                   progress: bool = True) -> list[str]:
    """Paths of builtin shards in ``root``, made on first use (``mmload.make_shards.cached_builtin_shards``)."""
    from mmload.make_shards import cached_builtin_shards

    name = f"builtin-{samples}-{seed}-{image_text_ratio:g}" + ("" if maxcount == DEFAULT_MAXCOUNT else f"-{maxcount}")
    if tuple(text_len) != DEFAULT_TEXT_LEN:
        name += f"-text{text_len[0]:g},{text_len[1]:g}"
    return cached_builtin_shards(root / name, samples=samples, seed=seed, image_text_ratio=image_text_ratio,
                                 maxcount=maxcount, progress=progress, text_len=tuple(text_len))


def _cached(folder: Path, key: dict[str, Any], build: Callable[[Path], None]) -> list[str]:
    """Shards of ``folder`` if it was built for ``key``; else ``build`` them into a temporary sibling, renamed in."""
    marker = folder / _KEY_FILE
    key = json.loads(json.dumps(key, sort_keys=True))  # as it reads back: tuples become lists
    if not (marker.is_file() and json.loads(marker.read_text()) == key):
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex}")
        try:
            build(tmp)
            (tmp / _KEY_FILE).write_text(json.dumps(key, sort_keys=True))  # written last: its presence means done
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [str(p) for p in sorted(folder.glob("*.tar"))]


def _inputs(urls: Sequence[str]) -> list[tuple[str, int, int]]:
    out = []
    for url in urls:
        p = Path(url)
        st = p.stat() if p.is_file() else None
        out.append((str(p.resolve()) if st else url, st.st_size if st else -1, st.st_mtime_ns if st else -1))
    return out


def _samples_per_shard(urls: Sequence[str]) -> int:
    """The source's shard size (from its manifest or img2dataset's stats), so embedding shards split over workers
    the same way."""
    counts = shard_samples(list(urls))
    return max(counts) if counts else DEFAULT_MAXCOUNT


def embedding_data(data: Sequence[str], root: Path, *, preset: str, seed: int, vocab_size: int, tokens: bool,
                   device: torch.device, progress: bool = True, tokenizer: Any = None, resolution: str = "square",
                   max_patches: int | None = None, **read: Any) -> list[str]:
    """``--data`` specs of embedding shards for ``data`` (one cached folder per spec, weights kept), texts
    tokenized with ``tokenizer`` (the run's), images decoded as ``resolution`` and ``max_patches`` say (native:
    each embedded at its own grid)."""
    from mmload.precompute import precompute
    from models.build import build_model
    from models.features import MMLoadFeatures

    out = []
    for spec, weight in parse_data(data):
        urls = expand_urls(spec)
        key = {"format": EMBEDDING_CACHE_FORMAT, "preset": preset, "seed": seed, "vocab_size": vocab_size,
               "tokens": tokens, "inputs": _inputs(urls), "tokenizer": getattr(tokenizer, "name_or_path", None),
               "resolution": resolution, "max_patches": max_patches}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        folder = root / f"emb-{preset}-{seed}-{'tokens' if tokens else 'pooled'}-{resolution}-{digest}"

        def build(tmp: Path, urls: list[str] = urls) -> None:
            encoder = build_model(preset, vocab_size, seed=seed)
            encoder.to(device).eval().requires_grad_(False)
            features = MMLoadFeatures(encoder, name=f"mmload-{preset}-random-seed{seed}")
            precompute(urls, tmp, image_encoder=features, text_encoder=features, tokens=tokens, device=device,
                       maxcount=_samples_per_shard(urls), progress=progress, tokenizer=tokenizer,
                       resolution=resolution, max_patches=max_patches, **read)

        _cached(folder, key, build)
        out.append(f"{folder}@{weight:g}")  # a folder spec reads every *.tar in it
    return out


def first_samples(data: Sequence[str], n: int, **dataset_kwargs: Any) -> list[Sample]:
    """The first ``n`` decoded samples of ``data`` in shard order, in this process (no workers)."""
    dataset = open_data(list(data), rank=0, world_size=1, **dataset_kwargs)
    out = []
    for sample in dataset.samples():
        out.append(sample)
        if len(out) == n:
            break
    return out


def num_classes(urls: Sequence[str], samples: Sequence[Sample]) -> int:
    """Classes from the shards' manifest (10 without one), raised to cover every label seen."""
    manifest = int((manifest_beside(urls[0]) or {}).get("num_classes") or 0)
    seen = max((s.label for s in samples), default=-1) + 1
    return max(manifest or 10, seen)


def dataset_size(data: Sequence[str]) -> int | None:
    """Samples in one epoch of ``data`` from the manifests beside the shards; None when any is missing."""
    total = 0
    for spec, _ in parse_data(data):
        urls = expand_urls(spec)
        manifest = manifest_beside(urls[0])
        if manifest is None:
            return None
        names = {Path(u).name for u in urls}
        total += sum(int(s["samples"]) for s in manifest.get("shards", []) if s["name"] in names)
    return total or None


__all__ = ["builtin_shards", "dataset_size", "embedding_data", "first_samples",
           "num_classes"]
