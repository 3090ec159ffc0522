"""``mmload make-shards``: write webdataset shards plus a tokenizer, from builtin data, your images or your texts.

OUT gets ``shard-000000.tar ...``, ``manifest.json`` (see ``mmload.shards.writer``), ``tokenizer.json`` +
``tokenizer_config.json`` (a WordPiece trained for these shards; ``load_tokenizer`` finds it) and, when the
images have classes, ``classes.json`` (class names, index = class id).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mmload.reader import byte_size
from mmload.shards import (
    CLASS_NAMES,
    GENERATOR_VERSION,
    MANIFEST,
    builtin_records,
    folder_classes,
    folder_records,
    pydoc_corpus,
    read_manifest,
    text_records,
    write_json,
    write_shards,
)
from mmload.shards.writer import OUTPUTS, prepare_out
from mmload.tokenizer import MIN_VOCAB_SIZE, TOKENIZER_FILE, save_tokenizer, train_wordpiece

SOURCES = ("builtin", "folder", "text")
TEXT_LEN = (48.0, 0.9)  # builtin texts: lognormal word counts, (median, sigma in log space)
BUILTIN_MAXCOUNT = 125  # the cached default: 2000 samples in 16 shards, so up to 16 ranks x workers all read
DEFAULT_MAXSIZE = 256 * 2**20
CLASSES_FILE = "classes.json"
MIN_TOKENIZER_TEXTS = 1000  # fewer texts than this: train the tokenizer on them plus the pydoc corpus
_OUTPUTS = (*OUTPUTS, CLASSES_FILE)


def make_shards(
    out: str | Path,
    source: str = "builtin",
    path: str | Path | None = None,
    samples: int = 2000,
    seed: int = 0,
    image_text_ratio: float = 8.0,
    maxcount: int = 1000,
    maxsize: int = DEFAULT_MAXSIZE,
    vocab_size: int = 8192,
    overwrite: bool = False,
    progress: bool = True,
    text_len: tuple[float, float] = TEXT_LEN,
) -> dict[str, Any]:
    """Write shards, manifest and tokenizer into ``out``; return the manifest.

    ``source``: ``builtin`` (``samples`` synthetic images and pydoc texts, ``image_text_ratio`` images per text,
    shuffled by ``seed``), ``folder`` (the images under ``path``, see ``mmload.shards.folder``) or ``text`` (the
    texts in ``path``); ``samples``, ``seed`` and ``image_text_ratio`` apply to ``builtin`` only. Shards hold at
    most ``maxcount`` samples and close once they reach ``maxsize`` bytes. ``out`` must be empty or missing
    unless ``overwrite``, which replaces the files make-shards writes and leaves any others alone.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "builtin" and path is not None:
        raise ValueError(f"--source builtin takes no path, got {str(path)!r}; use --source folder PATH or "
                         "--source text PATH for your own data")
    if source != "builtin" and path is None:
        raise ValueError(f"--source {source} needs a PATH: --source {source} PATH (or --path PATH)")
    if vocab_size < MIN_VOCAB_SIZE:  # checked again by train_wordpiece, but before the shards, not after them
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE}, got {vocab_size}")
    args = _creation_args(source, path, samples, seed, image_text_ratio, maxcount, maxsize, vocab_size, text_len)
    if source == "builtin":
        records: Iterable[dict] = builtin_records(samples, seed, image_text_ratio, text_len_median=text_len[0],
                                                  text_len_sigma=text_len[1])  # validates its arguments
        classes: list[str] = list(CLASS_NAMES)
    elif source == "folder":
        records, classes = folder_records(path), folder_classes(path)
    else:
        records, classes = text_records(path), []
    out = Path(out)
    prepare_out(out, overwrite, _OUTPUTS)
    texts: list[str] = []
    with tqdm(records if source == "builtin" else _collect_texts(records, texts), desc=f"make-shards {source}",
              total=samples if source == "builtin" else None, unit="sample", disable=not progress) as bar:
        manifest = write_shards(bar, out, maxcount=maxcount, maxsize=maxsize, write_manifest=False,
                                info={"source": source, "path": args["path"], "seed": args.get("seed"),
                                      "args": args})
    if classes:
        write_json(out / CLASSES_FILE, classes)
    if source == "builtin" or not texts:
        corpus, trained_on = list(pydoc_corpus()), "pydoc"
    elif len(texts) < MIN_TOKENIZER_TEXTS:
        corpus, trained_on = texts + list(pydoc_corpus()), "texts+pydoc"
    else:
        corpus, trained_on = texts, "texts"
    tokenizer = train_wordpiece(corpus, vocab_size)
    save_tokenizer(tokenizer, out)
    manifest["tokenizer"] = {"file": TOKENIZER_FILE, "vocab_size": len(tokenizer), "trained_on": trained_on}
    manifest["num_classes"] = len(classes)
    write_json(out / MANIFEST, manifest)  # written last: its presence means done (NOTE [atomic outputs])
    return manifest


def cached_builtin_shards(
    cache_dir: str | Path | None = None,
    samples: int = 2000,
    seed: int = 0,
    image_text_ratio: float = 8.0,
    maxcount: int = BUILTIN_MAXCOUNT,
    maxsize: int = DEFAULT_MAXSIZE,
    vocab_size: int = 8192,
    progress: bool = True,
    text_len: tuple[float, float] = TEXT_LEN,
) -> list[str]:
    """Paths of builtin shards, made once into ``cache_dir`` and reused while its manifest matches the arguments.

    ``cache_dir`` defaults to ``$MMLOAD_CACHE/builtin-<samples>-<seed>-<ratio>`` (``MMLOAD_CACHE`` defaults to
    ``~/.cache/mmload``). Shards are written to a temporary sibling folder and renamed into place, so concurrent
    callers never see half-written shards; the tokenizer is saved beside them. A stale cache (other arguments,
    a missing or damaged file) is replaced; a folder that is not a builtin cache is never touched.
    """
    if cache_dir is None:
        root = Path(os.environ.get("MMLOAD_CACHE") or "~/.cache/mmload").expanduser()
        cache_dir = root / f"builtin-{samples}-{seed}-{image_text_ratio:g}"
        if tuple(text_len) != TEXT_LEN:
            cache_dir = cache_dir.with_name(f"{cache_dir.name}-text{text_len[0]:g},{text_len[1]:g}")
    target = Path(cache_dir)
    want = _creation_args("builtin", None, samples, seed, image_text_ratio, maxcount, maxsize, vocab_size, text_len)
    if (urls := _cached_urls(target, want)) is not None:
        return urls
    occupied = target.exists() and (not target.is_dir() or any(target.iterdir()))
    if occupied and not _is_builtin_cache(target):
        raise FileExistsError(f"cache_dir {target} holds files that are not mmload builtin shards; give an empty "
                              "or new folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    try:
        make_shards(tmp, "builtin", None, samples, seed, image_text_ratio, maxcount, maxsize, vocab_size,
                    progress=progress, text_len=text_len)
        try:
            tmp.rename(target)  # atomic; fails when target exists and is not empty
        except OSError:
            if (urls := _cached_urls(target, want)) is not None:  # a concurrent caller finished first
                return urls
            stale = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex}")
            target.rename(stale)
            tmp.rename(target)
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    urls = _cached_urls(target, want)
    if urls is None:
        raise RuntimeError(f"cached builtin shards in {target} do not match {want} right after writing them")
    return urls


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``make-shards`` on an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "make-shards",
        help="write webdataset shards (builtin demo data, your images or your texts) plus a tokenizer",
        description="Write webdataset shards in the img2dataset layout (KEY.jpg|png|webp, KEY.txt, KEY.json, "
                    "KEY.cls) into OUT, with manifest.json and a WordPiece tokenizer trained for them "
                    "(tokenizer.json), which the loader picks up when no --tokenizer is given.",
    )
    parser.add_argument("out", metavar="OUT", help="output folder; created if missing, must be empty unless "
                                                   "--overwrite")
    parser.add_argument("--source", nargs="+", action=_SourceAction, metavar=("{builtin,folder,text}", "PATH"),
                        default="builtin",
                        help="builtin: synthetic class-labelled JPEGs (64..800 px) mixed with English texts from "
                             "Python's docs; folder PATH: a folder of images (NAME.jpg with optional NAME.txt "
                             "caption and NAME.json metadata) or of class subfolders (CLASS/NAME.jpg); text PATH: "
                             "a .txt file (one text per line) or a folder of .txt files (default: builtin)")
    parser.add_argument("--path", help="the folder or file for --source folder|text (same as the value after "
                                       "--source)")
    parser.add_argument("--samples", type=int, help="number of samples (builtin only) (default: 2000)")
    parser.add_argument("--seed", type=int, help="seed of the builtin data: images, texts and their order "
                                                 "(builtin only) (default: 0)")
    parser.add_argument("--image-text-ratio", type=float, metavar="R",
                        help="images per text in the builtin data; 0 for texts only, inf for images only "
                             "(builtin only) (default: 8)")
    parser.add_argument("--max-samples-per-shard", type=int, default=1000, metavar="N", dest="maxcount",
                        help="start a new shard after N samples (default: %(default)s)")
    parser.add_argument("--max-shard-bytes", type=byte_size, default=DEFAULT_MAXSIZE, metavar="B", dest="maxsize",
                        help="start a new shard once one holds B bytes (a shard may pass B by one sample); accepts "
                             "suffixes: 500MB, 256MiB, 1G (default: 256MiB)")
    parser.add_argument("--vocab-size", type=int, default=8192, metavar="V",
                        help="largest vocabulary of the WordPiece tokenizer trained for the shards "
                             "(default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards, manifest and tokenizer already in OUT (other files are kept)")
    parser.set_defaults(func=run, source_path=None)
    return parser


def run(args: argparse.Namespace) -> None:
    """The ``make-shards`` command: check the arguments, write the shards, print a summary (a bad argument
    raises ValueError and the like: ``mmload.cli.main`` makes it one line)."""
    path = args.path or args.source_path
    if args.path and args.source_path and args.path != args.source_path:
        raise ValueError(f"two paths given: --source {args.source} {args.source_path} and --path {args.path}; "
                         "give one")
    builtin_only = {name: getattr(args, name) for name in ("samples", "seed", "image_text_ratio")}
    given = {name: value for name, value in builtin_only.items() if value is not None}  # others: defaults
    if args.source != "builtin" and given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{flags}: options of --source builtin, not of --source {args.source}")
    start = time.perf_counter()
    manifest = make_shards(args.out, args.source, path, maxcount=args.maxcount, maxsize=args.maxsize,
                           vocab_size=args.vocab_size, overwrite=args.overwrite,
                           progress=not getattr(args, "quiet", False), **given)
    seconds = time.perf_counter() - start
    counts = ", ".join(f"{k} {v}" for k, v in manifest["samples"].items() if k != "total" and v)
    size = sum(s["bytes"] for s in manifest["shards"]) / 1e6
    print(f"wrote {manifest['samples']['total']} samples ({counts}) in {len(manifest['shards'])} shards, "
          f"{size:.1f} MB, to {args.out} in {seconds:.1f} s; tokenizer: "
          f"{manifest['tokenizer']['vocab_size']} word pieces ({manifest['tokenizer']['trained_on']})")


class _SourceAction(argparse.Action):
    """``--source builtin`` | ``--source folder PATH`` | ``--source text PATH`` (PATH may also come as --path)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if values[0] not in SOURCES or len(values) > 2:
            parser.error(f"--source takes one of {', '.join(SOURCES)} and at most one PATH, got {' '.join(values)}")
        namespace.source = values[0]
        namespace.source_path = values[1] if len(values) == 2 else None


def _creation_args(source: str, path: str | Path | None, samples: int, seed: int, image_text_ratio: float,
                   maxcount: int, maxsize: int, vocab_size: int,
                   text_len: tuple[float, float] | None = None) -> dict[str, Any]:
    """The arguments that decide what make-shards writes, as saved in the manifest (``args``)."""
    args: dict[str, Any] = {"source": source, "path": None if path is None else str(Path(path).resolve()),
                            "maxcount": maxcount, "maxsize": maxsize, "vocab_size": vocab_size}
    if source == "builtin":
        args.update(samples=samples, seed=seed, image_text_ratio=float(image_text_ratio),
                    generator_version=GENERATOR_VERSION)
        if text_len is not None and tuple(text_len) != TEXT_LEN:  # default caches keep their old key
            args.update(text_len_median=float(text_len[0]), text_len_sigma=float(text_len[1]))
    return args


def _collect_texts(records: Iterable[dict], texts: list[str]) -> Iterator[dict]:
    """Pass ``records`` through, appending their texts to ``texts`` (to train the tokenizer on them)."""
    for record in records:
        if "txt" in record:
            texts.append(record["txt"])
        yield record


def _is_builtin_cache(folder: Path) -> bool:
    try:
        return read_manifest(folder).get("source") == "builtin"
    except (FileNotFoundError, ValueError):
        return False


def _cached_urls(folder: Path, want: dict[str, Any]) -> list[str] | None:
    """The shard paths in ``folder`` if its manifest was made with ``want`` and every file is there, else None."""
    try:
        manifest = read_manifest(folder)
    except (FileNotFoundError, ValueError):
        return None
    shards = [folder / s["name"] for s in manifest.get("shards", [])]
    complete = (folder / TOKENIZER_FILE).is_file() and all(
        p.is_file() and p.stat().st_size == s["bytes"] for p, s in zip(shards, manifest["shards"]))
    if manifest.get("args") != want or not shards or not complete:
        return None
    return [str(p.resolve()) for p in shards]
