"""The ``manifest.json`` beside a folder of shards: reading it, finding it from a shard URL, writing JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

MANIFEST = "manifest.json"


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The ``manifest.json`` of a shard folder; FileNotFoundError or ValueError (bad JSON) otherwise."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {folder}; make the shards with `mmload make-shards`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exn:
        raise ValueError(f"{path} is not valid JSON ({exn}); make the shards again with `mmload make-shards`") from exn


def manifest_beside(url: str) -> dict[str, Any] | None:
    """The manifest in the folder of a local shard ``url`` (path, ``file:`` URL); None for remote or unmanifested
    shards, or a manifest that does not parse."""
    folder = local_folder(url)
    if folder is None:
        return None
    try:
        return read_manifest(folder)
    except (FileNotFoundError, ValueError, OSError):
        return None


def shard_samples(urls: list[str]) -> list[int] | None:
    """The number of samples in each of ``urls`` (local shards), from the ``manifest.json`` beside them (mmload's)
    or each shard's ``*_stats.json`` (img2dataset's ``successes``); None when any count is unknown."""
    counts, manifests = [], {}
    for url in urls:
        folder = local_folder(url)
        if folder is None:
            return None
        if folder not in manifests:
            manifest = manifest_beside(url) or {}
            manifests[folder] = {s["name"]: int(s["samples"]) for s in manifest.get("shards", ())}
        n = manifests[folder].get(Path(url).name)
        if n is None:
            try:
                stats = json.loads((folder / (Path(url).name.split(".")[0] + "_stats.json")).read_text())
                n = int(stats["successes"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
        counts.append(n)
    return counts


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as stable, readable JSON (sorted keys, trailing newline), atomically: to a temporary name
    beside ``path``, then renamed, so a reader never sees half a file (a kill or a full disk leaves the old one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def local_folder(url: str) -> Path | None:
    """The folder of a local shard url (plain path, ``file:`` url, or a brace pattern); None for remote urls."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(parsed.path).parent
    if parsed.scheme and len(parsed.scheme) > 1:  # pipe:, http:, s3:, ...; one letter is a Windows drive
        return None
    return Path(os.path.expanduser(url)).parent


__all__ = ["MANIFEST", "local_folder", "manifest_beside", "read_manifest", "shard_samples", "write_json"]
