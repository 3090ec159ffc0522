"""Samples a user already has, into :class:`~mmload.Sample`: dicts, tuples and a ``webdataset`` pipeline's output.

NOTE [raw samples]: a raw sample is turned into the members a shard would hold (an image, a text or ids, a label,
a key) and handed to the reader's own :class:`~mmload.decode.Decoder`, so a PIL image from a user's dataset and
a JPEG from a shard go through the same EXIF, mode, resize and crop code, and a caption through the same
tokenizer call. Accepted:

* ``Sample`` objects, unchanged;
* dicts with any of ``image`` (a PIL image, an HWC uint8 array, a CHW uint8 tensor or a CHW float tensor in
  [0, 1]), ``text`` (a str) or ``input_ids`` (a list, array or tensor of ints, used as given, special tokens
  included), ``label`` (an int) and ``key`` (a str);
* the names a ``webdataset`` pipeline yields after ``.decode("pil")``: ``jpg``/``jpeg``/``png``/``webp``,
  ``txt``, ``cls``, ``json`` (its ``label`` and ``modality`` are read, as in a shard) and ``__key__`` (undecoded
  bytes work too);
* ``(image, text)`` and ``(image, int label)`` tuples.

A sample without a key gets ``raw-`` and 16 hex digits of a hash of its decoded content (pixels, ids, label): the
same sample gets the same key in every worker and run. Fields no one reads are logged once per set of names.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import numbers
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmload.decode import IDS_KEY, IMAGE_EXTS, Decoder, _infer
from mmload.errors import ErrorKind, SampleError
from mmload.layouts import PATCH_SIZE
from mmload.sample import Modality, Sample
from mmload.tokenizer import LazyDefault, load_tokenizer

log = logging.getLogger("mmload")

IMAGE_FIELDS = ("image", *IMAGE_EXTS)
TEXT_FIELDS = ("text", "txt")
LABEL_FIELDS = ("label", "cls")
KEY_FIELDS = ("key", "__key__")
READ_FIELDS = frozenset({*IMAGE_FIELDS, *TEXT_FIELDS, "input_ids", *LABEL_FIELDS, *KEY_FIELDS, "json", "__url__"})
MAX_TOKEN_ID = 2**31 - 1  # what the collators' int32 ids hold
_WHAT = {"jpg": "image", "txt": "text", IDS_KEY: "text", "cls": "label", "__key__": "key", "json": "json",
         "__url__": "url"}
# the member whose field a decoder error names
_MEMBER_OF_KIND = {ErrorKind.IMAGE_DECODE: "jpg", ErrorKind.IMAGE_TOO_LARGE: "jpg", ErrorKind.TEXT_DECODE: "txt",
                   ErrorKind.EMPTY_TEXT: "txt", ErrorKind.BAD_METADATA: "json"}


@dataclass(kw_only=True)
class RawInput:
    """What a collator or stage needs to take raw samples as well as ``Sample``s (NOTE [raw samples]).

    Args:
        tokenizer: for texts given as strings: a Hugging Face tokenizer, a hub name or local path, or ``None`` for
            the bundled bert-base-uncased WordPiece (:func:`mmload.tokenizer.default_tokenizer`), loaded on the
            first text, once per process.
        image_size: images are resized (shorter side) and centre-cropped to ``image_size`` squares, as the reader
            does.
        max_text_len: texts are truncated to this many tokens, ``[CLS]`` and ``[SEP]`` included; given
            ``input_ids`` are used as they are.
        resolution, max_patches, patch_size, upscale: ``resolution="native"`` keeps each image's aspect ratio, at
            most ``max_patches`` patches of ``patch_size`` (default 16; NOTE [native grid] in :mod:`mmload.decode`).
            A batcher with ``max_tokens`` and no ``image_tokens`` counts each image's own grid at ``patch_size``.
    """

    tokenizer: Any = None
    image_size: int = 224
    max_text_len: int = 512
    resolution: str = "square"
    max_patches: int | None = None
    patch_size: int | None = None  # None: 16 (ViT-B/16's) for the native grid; a batcher's token budget needs one
    upscale: bool = False

    def _settings(self) -> dict[str, Any]:
        patch = PATCH_SIZE if self.patch_size is None else self.patch_size
        return {"image_size": self.image_size, "max_text_len": self.max_text_len, "resolution": self.resolution,
                "max_patches": self.max_patches, "patch_size": patch, "upscale": self.upscale}

    def __post_init__(self) -> None:
        self._decoder()  # checks image_size and max_text_len, loads a tokenizer given by name

    def _decoder(self) -> Decoder:
        """The decoder of the current settings (made again when a field was set since)."""
        made = self.__dict__.get("_made")
        if made is None or made[0] is not self.tokenizer or made[1] != self._settings():
            tokenizer = self.tokenizer
            if tokenizer is None:  # loaded at the first text, once per process
                tokenizer = LazyDefault("no tokenizer given for raw samples")
            elif isinstance(tokenizer, str | os.PathLike):
                tokenizer = load_tokenizer(os.fspath(tokenizer))
            decoder = Decoder(tokenizer, **self._settings())
            made = self.__dict__["_made"] = (self.tokenizer, self._settings(), decoder)
        return made[2]

    def to_samples(self, samples: Sequence[Any]) -> Sequence[Sample]:
        """``samples`` as ``Sample``s (the same list when they already are); a bad one raises, naming its index."""
        if len(samples) == 0:
            raise ValueError("cannot collate an empty list of samples")
        if all(isinstance(s, Sample) for s in samples):
            return samples
        return [self.to_sample(s, i) for i, s in enumerate(samples)]

    def to_sample(self, raw: Any, index: int = 0) -> Sample:
        """One raw sample (``index``: its position, for the error message) as a ``Sample``."""
        if isinstance(raw, Sample):
            return raw
        members, fields = _members(raw, index)
        sample = self._decode(members, fields, index)
        return sample if fields.get("__key__") else dataclasses.replace(sample, key=content_key(sample))

    def describe(self, raw: Any, index: int = 0) -> tuple[Modality, int]:
        """The modality and token count of a raw sample, without decoding its image (for bucketing samplers)."""
        if isinstance(raw, Sample):
            return raw.modality, raw.num_text_tokens
        members, fields = _members(raw, index)
        meta = {k: members[k] for k in ("__key__", "json", "cls") if k in members}
        text = {k: members[k] for k in (IDS_KEY, "txt") if k in members}
        tokens = 0
        if text:  # the text alone, decoded as a text sample
            tokens = self._decode({**meta, "json": {"modality": "text"}, **text}, fields, index).num_text_tokens
        declared = members.get("json", {}).get("modality") if isinstance(members.get("json"), dict) else None
        return Modality(declared) if declared else _infer("jpg" in members, bool(text)), tokens

    def _decode(self, members: dict[str, Any], fields: dict[str, str], index: int) -> Sample:
        try:
            return self._decoder()(members)
        except SampleError as e:
            member = _MEMBER_OF_KIND.get(e.kind)
            if e.kind == ErrorKind.BAD_METADATA and "cls" in fields and ".cls" in e.detail:
                member = "cls"
            where = f"field {fields[member]!r}" if member in fields else f"fields {sorted(fields.values())}"
            raise ValueError(f"raw sample {index}: {where}: {e.detail}") from None


def as_samples(stage: RawInput, samples: Iterable[Any]) -> Iterator[Sample]:
    """``samples`` as ``Sample``s, one at a time (a stream stage's input): the index in errors counts arrivals."""
    for i, raw in enumerate(samples):
        yield stage.to_sample(raw, i)


def content_key(sample: Sample) -> str:
    """``raw-`` + 16 hex digits of a hash of the sample's pixels, ids and label: stable across processes."""
    h = hashlib.blake2b(digest_size=8)
    for t in (sample.pixels, sample.ids):
        h.update(b"-" if t is None else t.contiguous().numpy().tobytes())
    h.update(str(sample.label).encode())
    return f"raw-{h.hexdigest()}"


def _members(raw: Any, index: int) -> tuple[dict[str, Any], dict[str, str]]:
    """The reader's members of a raw sample (``jpg``, ``txt``, ``cls``, ``json``, ``__key__``, ids), each field's
    value checked and converted, and which user field each member came from."""
    if isinstance(raw, tuple | list):
        raw = _from_pair(raw, index)
    if not isinstance(raw, Mapping):
        raise TypeError(f"raw sample {index}: expected an mmload.Sample, a dict (image/text/input_ids/label/key, or "
                        f"webdataset's jpg/png/webp/txt/cls/json/__key__) or an (image, text) or (image, label) "
                        f"tuple, got {type(raw).__name__}")
    members: dict[str, Any] = {}
    fields: dict[str, str] = {}

    def put(member: str, field: str, value: Any) -> None:
        if member in members:
            raise ValueError(f"raw sample {index}: fields {fields[member]!r} and {field!r} both give the "
                             f"{_WHAT[member]}; keep one")
        members[member], fields[member] = value, field

    for field, value in raw.items():
        if value is None:  # a column this row does not fill (Hugging Face datasets): as if absent
            continue
        if field in IMAGE_FIELDS:
            put("jpg", field, _image(value, index, field))
        elif field in TEXT_FIELDS:
            put("txt", field, _text(value, index, field))
        elif field == "input_ids":
            put(IDS_KEY, field, _ids(value, index, field))
        elif field in LABEL_FIELDS:
            put("cls", field, _label(value, index, field))
        elif field in KEY_FIELDS:
            put("__key__", field, str(value))
        elif field in ("json", "__url__"):
            put(field, field, value)
    if "txt" in members and IDS_KEY in members:
        raise ValueError(f"raw sample {index}: fields {fields['txt']!r} and {fields[IDS_KEY]!r} both give the text; "
                         "keep one")
    if not any(m in members for m in ("jpg", "txt", IDS_KEY)):
        raise ValueError(f"raw sample {index}: no image, text or input_ids field (has {sorted(map(str, raw))}); "
                         f"mmload reads {sorted(f for f in READ_FIELDS if not f.startswith('__'))} and __key__")
    unread = frozenset(str(f) for f, v in raw.items()
                       if f not in READ_FIELDS and not str(f).startswith("__") and v is not None)
    if unread:
        _log_unread_once(unread)
    members.setdefault("__key__", f"raw sample {index}")  # for the decoder's messages; replaced by content_key
    return members, fields


def _from_pair(raw: Sequence[Any], index: int) -> dict[str, Any]:
    if raw and all(_is_int(x) for x in raw):
        raise TypeError(f"raw sample {index}: a list of ints is not a sample; give token ids as "
                        "{'input_ids': [...]}")
    if len(raw) != 2:
        raise TypeError(f"raw sample {index}: a tuple must be (image, text) or (image, label), got {len(raw)} items")
    image, second = raw
    if isinstance(second, torch.Tensor | np.ndarray) and second.ndim == 0:
        second = second.item()
    if isinstance(second, str | bytes):
        return {"image": image, "text": second}
    if _is_int(second):
        return {"image": image, "label": second}
    raise TypeError(f"raw sample {index}: a tuple must be (image, text) or (image, int label); its second item is "
                    f"{type(second).__name__}")


@functools.cache
def _log_unread_once(fields: frozenset[str]) -> None:
    log.warning("raw samples: fields %s are not read (mmload reads image, text or input_ids, label, key, and "
                "webdataset's jpg/png/webp, txt, cls, json, __key__)", sorted(fields))


def _image(value: Any, index: int, field: str) -> Image.Image | bytes:
    """A PIL image (or encoded bytes, decoded by the reader's code) from any accepted image value."""
    if isinstance(value, Image.Image | bytes | bytearray):
        return value
    where = f"raw sample {index}: field {field!r}"
    if isinstance(value, torch.Tensor):
        if value.dim() != 3 or value.shape[0] not in (1, 3, 4):
            hint = "; it looks HWC: use .permute(2, 0, 1)" if value.dim() == 3 and value.shape[2] in (1, 3, 4) else ""
            raise ValueError(f"{where}: an image tensor must be CHW with 1, 3 or 4 channels, got shape "
                             f"{tuple(value.shape)}{hint}")
        if value.is_floating_point():
            if not bool(torch.isfinite(value).all()) or float(value.min()) < 0 or float(value.max()) > 1:
                raise ValueError(f"{where}: a float image tensor must hold values in [0, 1], got "
                                 f"[{float(value.min()):g}, {float(value.max()):g}]; scale it, or pass uint8")
            value = (value.detach().cpu().float() * 255).round().to(torch.uint8)
        elif value.dtype != torch.uint8:
            raise ValueError(f"{where}: an image tensor must be uint8 or float in [0, 1], got {value.dtype}")
        value = value.detach().cpu().permute(1, 2, 0).numpy()  # HWC
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim not in (2, 3) or (value.ndim == 3 and value.shape[2] not in (1, 3, 4)):
            hint = "; it looks CHW: use .transpose(1, 2, 0) or a tensor" if (
                value.ndim == 3 and value.shape[0] in (1, 3, 4)) else ""
            raise ValueError(f"{where}: an image array must be HWC (or HW) uint8 with 1, 3 or 4 channels, got "
                             f"{value.dtype} {value.shape}{hint}")
        return Image.fromarray(value[:, :, 0] if value.ndim == 3 and value.shape[2] == 1 else value)
    raise TypeError(f"{where}: expected a PIL image, an HWC uint8 array, a CHW tensor or encoded bytes, got "
                    f"{type(value).__name__}")


def _text(value: Any, index: int, field: str) -> str | bytes:
    if isinstance(value, str | bytes):
        return value
    raise TypeError(f"raw sample {index}: field {field!r}: expected a str, got {type(value).__name__}")


def _ids(value: Any, index: int, field: str) -> torch.Tensor:
    where = f"raw sample {index}: field {field!r}"
    if isinstance(value, torch.Tensor | np.ndarray):
        ids = torch.as_tensor(value).detach().cpu()
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{where}: token ids must be integers, got {ids.dtype}")
    elif isinstance(value, list | tuple) and all(_is_int(v) for v in value):
        ids = torch.tensor([int(v) for v in value], dtype=torch.int64)
    else:
        raise TypeError(f"{where}: expected a list or tensor of ints, got {type(value).__name__}")
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"{where}: token ids must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) > MAX_TOKEN_ID:  # no vocabulary comes near 2**31 pieces
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"{where}: token ids must be in [0, 2**31), got {bad}")
    return ids.to(torch.int64)


def _label(value: Any, index: int, field: str) -> Any:
    if isinstance(value, torch.Tensor | np.ndarray) and value.ndim == 0:
        value = value.item()
    if _is_int(value) or (field == "cls" and isinstance(value, str | bytes)):  # the decoder parses .cls text
        return int(value) if _is_int(value) else value
    raise TypeError(f"raw sample {index}: field {field!r}: a label must be an int, got {type(value).__name__}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
