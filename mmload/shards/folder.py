"""Import your own images and texts as writer records (see ``mmload.shards.writer``).

Two image layouts, told apart by where the images are:

- flat: ``PATH/NAME.jpg`` with optional sidecars ``PATH/NAME.txt`` (a caption: the sample becomes ``image_text``)
  and ``PATH/NAME.json`` (metadata, merged into the sample's json);
- class subfolders: ``PATH/<class_name>/NAME.jpg`` (sidecars work there too); class ids follow the sorted class
  names, see ``folder_classes``.

Texts: a plain text file (one text per non-empty line) or a folder of ``.txt`` files (one text per file).
Everything is imported in sorted order, so the same folder gives the same shards. Keys are the record's index
(``000000000``, ...); the original file name is kept as ``source_path`` in the json.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
PIL_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # images are kept as bytes, never re-encoded


def folder_classes(path: str | Path) -> list[str]:
    """The class names of a class-subfolder layout (index = class id), or ``[]`` for a flat folder."""
    return list(_scan_images(Path(path))[1])


def folder_records(path: str | Path) -> Iterator[dict]:
    """Records for the images under ``path`` (flat or class subfolders); errors come at call time."""
    files, classes = _scan_images(Path(path))
    return _image_records(Path(path), files, classes)


def text_records(path: str | Path) -> Iterator[dict]:
    """Records for a text file (one text per non-empty line) or a folder of ``.txt`` files (one per file)."""
    path = Path(path)
    if path.is_file():
        texts = [(line.strip(), f"{path.name}:{n}") for n, line in enumerate(_read_text(path).splitlines(), 1)]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.suffix.lower() == ".txt" and p.is_file() and not _hidden(p, path))
        texts = [(_read_text(p).strip(), p.relative_to(path).as_posix()) for p in files]
    else:
        raise FileNotFoundError(f"text source {path} does not exist; pass a .txt file (one text per line) or a "
                                "folder of .txt files")
    texts = [(text, source) for text, source in texts if text]
    if not texts:
        raise ValueError(f"no non-empty texts in {path}; give a .txt file with one text per line or a folder of "
                         "non-empty .txt files")
    return ({"__key__": f"{i:09d}", "txt": text, "json": {"modality": "text", "source_path": source}}
            for i, (text, source) in enumerate(texts))


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()


def _scan_images(root: Path) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    """``[(image, class id or -1)]`` in sorted order and the class names; raises on a missing/empty/mixed folder."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; pass a folder of images (NAME.jpg with "
                                "optional NAME.txt captions) or of class subfolders (CLASS/NAME.jpg)")
    top = sorted(p for p in root.iterdir() if _is_image(p) and not p.name.startswith("."))
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    by_class = {d.name: sorted(p for p in d.iterdir() if _is_image(p) and not p.name.startswith(".")) for d in subdirs}
    by_class = {name: files for name, files in by_class.items() if files}
    if top and by_class:
        raise ValueError(f"{root} holds both images and class subfolders with images ({sorted(by_class)}); use one "
                         "layout: all images directly in the folder, or all inside class subfolders")
    if top:
        return [(p, -1) for p in top], ()
    if by_class:
        classes = tuple(sorted(by_class))
        return [(p, label) for label, name in enumerate(classes) for p in by_class[name]], classes
    raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root} or its class subfolders; put images "
                     "there, or use --source text for text files")


def _image_records(root: Path, files: list[tuple[Path, int]], classes: tuple[str, ...]) -> Iterator[dict]:
    for i, (image_path, label) in enumerate(files):
        try:
            with Image.open(image_path) as img:
                fmt, (w, h) = img.format, img.size
        except (UnidentifiedImageError, OSError) as exn:
            raise ValueError(f"cannot read image {image_path}: {exn}; remove or fix the file") from exn
        if fmt not in PIL_FORMAT_EXT:
            raise ValueError(f"image {image_path} is {fmt}, not one of {sorted(PIL_FORMAT_EXT)}; convert it to JPEG "
                             "or PNG")
        meta = {}
        meta_path = image_path.with_suffix(".json")
        if meta_path.is_file():
            try:
                meta = json.loads(_read_text(meta_path))
            except json.JSONDecodeError as exn:
                raise ValueError(f"metadata {meta_path} is not valid JSON: {exn}") from exn
            if not isinstance(meta, dict):
                raise ValueError(f"metadata {meta_path} must hold a JSON object, got {type(meta).__name__}")
        caption_path = image_path.with_suffix(".txt")
        caption = _read_text(caption_path).strip() if caption_path.is_file() else ""
        meta.update(modality="image_text" if caption else "image", width=w, height=h,
                    source_path=image_path.relative_to(root).as_posix())
        record = {"__key__": f"{i:09d}", PIL_FORMAT_EXT[fmt]: image_path.read_bytes(), "json": meta}
        if caption:
            record["txt"] = caption
        if label >= 0:
            record["cls"] = label
            meta["class_name"] = classes[label]
        yield record


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exn:
        raise ValueError(f"{path} is not UTF-8 text ({exn}); re-save it as UTF-8") from exn
