"""Write records to webdataset shards in the img2dataset layout, plus ``manifest.json``.

A record is a dict in webdataset's sample form, one entry per tar member::

    {"__key__": "000000123",              # unique within the write
     "jpg" | "png" | "webp": bytes,        # encoded image, written as is
     "txt": str,                           # UTF-8 caption or text
     "json": {"modality": "image" | "text" | "image_text", ...},
     "cls": int,                           # class label, images only
     "emb.npy": bytes, ...}                # any other member: bytes, written as is

NOTE [deterministic shards]: webdataset's TarWriter stamps every member with ``time.time()`` unless given
``mtime``; we pass ``mtime=0`` and encode every member to bytes ourselves (json with sorted keys), so the same
records give byte-identical tars.

NOTE [maxsize]: webdataset's ShardWriter starts a new shard once the payload bytes of the current one reach
``maxsize``; the check runs before each record, so a shard may exceed ``maxsize`` by one record plus the tar
headers (512 bytes a member). ``maxcount`` is exact.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import webdataset as wds

from mmload.manifest import MANIFEST, write_json
from mmload.sample import Modality
from mmload.tokenizer import TOKENIZER_FILE

SHARD_PATTERN = "shard-%06d.tar"
MANIFEST_FORMAT = "mmload-shards/1"
IMAGE_EXTS = ("jpg", "png", "webp")


def mmload_version() -> str:
    """The installed mmload version, or ``0+unknown`` when running from a source tree without metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmload")
    except PackageNotFoundError:
        import mmload

        return getattr(mmload, "__version__", "0+unknown")


def encode_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Check one record against the layout and encode its members to bytes (see the module docstring)."""
    key = record.get("__key__")
    if not isinstance(key, str) or not key.rpartition("/")[2] or "." in key.rpartition("/")[2]:
        raise ValueError(f"record key must be a non-empty str with no '.' after its last '/' (webdataset splits "
                         f"member names at the first dot), got {key!r}")
    meta = record.get("json")
    if not isinstance(meta, Mapping) or "modality" not in meta:
        raise ValueError(f"record {key!r}: 'json' must be a dict with a 'modality', got {meta!r}")
    modality = Modality(meta["modality"])
    images = [ext for ext in IMAGE_EXTS if ext in record]
    if len(images) > 1:
        raise ValueError(f"record {key!r}: one image member per record, got {images}")
    if (images and modality == Modality.TEXT) or ("txt" in record and modality == Modality.IMAGE):
        raise ValueError(f"record {key!r}: modality {modality.value!r} does not match its members {sorted(record)}")
    if "cls" in record and modality == Modality.TEXT:
        raise ValueError(f"record {key!r}: 'cls' is an image label, got it on a text record")
    out: dict[str, Any] = {"__key__": key}
    for ext, value in record.items():
        if ext.startswith("_"):  # __key__, and webdataset's metadata (__url__, ...), which is not written
            continue
        if ext == "json":
            value = json.dumps(dict(meta), sort_keys=True)
        elif ext == "cls":
            value = str(int(value))
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, bytes | bytearray | memoryview):
            raise ValueError(f"record {key!r}: member {ext!r} must be bytes (or str), got {type(value).__name__}")
        out[ext] = value
    if len(out) < 3:
        raise ValueError(f"record {key!r} has no payload beside its json; give an image, a txt or an emb.npy")
    return out


def write_shards(
    records: Iterable[Mapping[str, Any]],
    out: str | Path,
    *,
    maxcount: int = 1000,
    maxsize: int = 256 * 2**20,
    info: Mapping[str, Any] | None = None,
    write_manifest: bool = True,
    pattern: str = SHARD_PATTERN,
    allow_empty: bool = False,
) -> dict[str, Any]:
    """Write ``records`` to ``out/shard-%06d.tar`` (or another ``pattern``: one ``%06d``) and (``write_manifest``)
    ``out/manifest.json``; return the manifest. No records is an error unless ``allow_empty`` (one rank's share
    of a small input, say): then no shard is written.

    The manifest holds ``info`` (source, seed, creation args: whatever the caller passes), the mmload version,
    the sample counts (``total`` and per modality) and the shard list ``[{"name", "samples", "bytes"}]`` with
    names relative to ``out``, which is created if missing.

    NOTE [atomic outputs]: a shard is written as ``shard-%06d.tar.partial`` and renamed when it is closed, so a
    ``*.tar`` in ``out`` is always whole; an error (a bad record, a full disk) removes the partial one, and the
    manifest is written last (by the caller, when it adds to it: ``write_manifest=False``), so its presence means
    the folder is complete. ``prepare_out`` tells a folder with a partial earlier run from an empty one.
    """
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    if maxsize < 1:
        raise ValueError(f"maxsize must be >= 1 byte, got {maxsize}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {m.value: 0 for m in Modality}
    per_shard: dict[str, int] = {}
    seen: set[str] = set()
    if not pattern.startswith("shard-") or not pattern.endswith(".tar"):
        raise ValueError(f"pattern must be shard-*.tar (what overwrite replaces), got {pattern!r}")
    path = str(out).replace("%", "%%") + os.sep + pattern + PARTIAL  # '%' in the folder must not format
    sink = wds.ShardWriter(path, maxcount=maxcount, maxsize=maxsize, verbose=0, encoder=False, mtime=0,
                           post=_finish_shard)
    try:
        for record in records:
            sample = encode_record(record)
            if sample["__key__"] in seen:
                raise ValueError(f"record key {sample['__key__']!r} is not unique")
            seen.add(sample["__key__"])
            sink.write(sample)
            per_shard[sink.fname] = per_shard.get(sink.fname, 0) + 1
            counts[Modality(record["json"]["modality"]).value] += 1
        if not per_shard and not allow_empty:
            raise ValueError(f"no records to write to {out}")
        sink.close()  # renames the last shard
        if not per_shard:
            Path(sink.fname.removesuffix(PARTIAL)).unlink(missing_ok=True)  # the empty shard the writer opened
    except BaseException:
        with contextlib.suppress(Exception):  # a full disk may fail this close too
            if getattr(sink, "tarstream", None) is not None:
                sink.tarstream.close()
        Path(sink.fname).unlink(missing_ok=True)  # the shard being written is not whole
        raise
    names = [f.removesuffix(PARTIAL) for f in per_shard]
    shards = [{"name": Path(f).name, "samples": n, "bytes": Path(f).stat().st_size}
              for f, n in zip(names, per_shard.values())]
    manifest = {
        "format": MANIFEST_FORMAT,
        **(info or {}),
        "mmload_version": mmload_version(),
        "samples": {"total": sum(counts.values()), **counts},
        "shards": shards,
    }
    if write_manifest:
        write_json(out / MANIFEST, manifest)
    return manifest


PARTIAL = ".partial"  # the suffix of a shard being written
# what a folder of shards holds beside its shards: what overwrite=True replaces (with the partial files)
OUTPUTS = ("shard-*.tar", MANIFEST, TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")


def _finish_shard(fname: str) -> None:
    os.replace(fname, fname.removesuffix(PARTIAL))


def prepare_out(out: Path, overwrite: bool, outputs: Iterable[str]) -> None:
    """Make ``out`` ready for a write: refuse a file, or a non-empty folder (naming a partial earlier run, shards
    without a manifest or ``*.partial`` files, as such) unless ``overwrite``, which removes our earlier ``outputs``
    (glob patterns) and partial files and keeps any other file."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"OUT {out} is a file; give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        partial = sorted(p.name for p in out.glob(f"*{PARTIAL}"))
        if partial or (any(out.glob("*.tar")) and not (out / MANIFEST).exists()):
            what = f"{len(partial)} partial files ({partial[0]}, ...)" if partial else "shards but no manifest.json"
            raise FileExistsError(f"OUT {out} holds a partial earlier run ({what}): an earlier write stopped before "
                                  "it ended; pass --overwrite (overwrite=True) to replace it, or give another folder")
        raise FileExistsError(f"OUT {out} is not empty; pass --overwrite (overwrite=True) to replace the shards "
                              "there, or give an empty or new folder")
    for pattern in (*outputs, f"*{PARTIAL}", f".*{PARTIAL}"):
        for old in out.glob(pattern):
            old.unlink()


__all__ = ["IMAGE_EXTS", "MANIFEST", "MANIFEST_FORMAT", "OUTPUTS", "PARTIAL", "SHARD_PATTERN", "encode_record",
           "mmload_version", "prepare_out", "write_shards"]
