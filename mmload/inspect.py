"""``mmload inspect``: read shards through the loader's own pipeline and report what is in them."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from mmload.dataset import ShardDataset
from mmload.reader import ReadLimits
from mmload.sample import Modality


def inspect_shards(urls: str | Sequence[str], *, tokenizer: Any = None, image_size: int = 32,
                   strict: bool = False, progress: bool = False, **read: Any) -> dict[str, Any]:
    """Count good samples by modality, bad ones by error kind, and notices (``mmload.errors.NOTICES``).

    ``image_size`` only sets the decode target: every image is still fully decoded, so a corrupt one is found.
    ``read``: the :class:`~mmload.reader.ReadLimits` keywords (``read_timeout``, ``max_sample_bytes``, ...). Keys that
    come back in a later shard are counted exactly (a loader's worker remembers a bounded number).
    """
    ds = ShardDataset(urls, tokenizer=tokenizer, image_size=image_size, strict=strict, max_consecutive_errors=None,
                      **read)
    ds._decode.keys_limit = None  # every key, for the exact count of duplicate_key_across_shards
    modalities: Counter[str] = Counter({m.value: 0 for m in Modality})
    for sample in tqdm(ds, desc="inspect", unit=" samples", disable=not progress):
        modalities[sample.modality.value] += 1
    return {"shards": len(ds.urls), "samples": sum(modalities.values()), "modalities": dict(modalities),
            "errors": dict(sorted(ds.errors.counts.items()))}


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("inspect", help="read shards through the loader and report what they hold",
                              description="Read shards through the same pipeline the loader uses; report good "
                                          "samples by modality and bad ones by error kind.")
    p.add_argument("shards", nargs="+", help="shard paths, brace patterns (shard-{000..009}.tar) or directories")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer name or path (default: the one make-shards stored beside the shards)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad sample, naming shard and key")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ReadLimits.add_arguments(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    report = inspect_shards(args.shards, tokenizer=args.tokenizer, strict=args.strict, progress=not args.json,
                            **ReadLimits.from_args(args).kwargs())
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"shards   {report['shards']}\nsamples  {report['samples']}")
    for name, n in report["modalities"].items():
        print(f"  {name:<12} {n}")
    print(f"errors   {sum(report['errors'].values())}")
    for name, n in report["errors"].items():
        print(f"  {name:<28} {n}")
    return 0
