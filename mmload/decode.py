"""Decoding one raw webdataset sample (``{"__key__", "jpg", "txt", ...}``) into a :class:`Sample`."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from mmload.errors import ErrorKind, SampleError
from mmload.sample import IGNORE_INDEX, Modality, Sample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt",)
EMB_EXT = "emb.npy"
MAX_PIXELS = 64_000_000  # 8000 x 8000: past it, an image is treated as a decompression bomb


def decode_image(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """JPEG/PNG/WebP bytes -> uint8 ``(3, size, size)``: any mode to RGB, shorter side resized, centre crop.

    Raises ``SampleError``-free plain exceptions; the caller names the kind.
    """
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    if w * h > max_pixels:
        raise ValueError(f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}")
    if img.format == "JPEG":
        img.draft("RGB", (size, size))  # DCT-domain downscale: decodes a 640x480 JPEG ~3x faster
    img = ImageOps.fit(img.convert("RGB"), (size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # uint8 (3, H, W)


@dataclass
class Decoder:
    """Turns raw members into a Sample, raising :class:`SampleError` with a named kind on bad input."""

    tokenizer: Any = None  # a HF tokenizer; None reads images and embeddings only
    image_size: int = 224
    max_text_len: int = 512
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.max_text_len < 2:
            raise ValueError(f"max_text_len must be >= 2 (room for [CLS] and [SEP]), got {self.max_text_len}")

    def __call__(self, raw: dict[str, Any]) -> Sample:
        key, url = raw["__key__"], raw.get("__url__", "")

        def fail(kind: ErrorKind, msg: str) -> SampleError:
            return SampleError(kind, msg, url, key)

        meta = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
                assert isinstance(meta, dict), "top level is not an object"
            except Exception as e:
                raise fail(ErrorKind.BAD_METADATA, f"bad .json: {e}") from e
        label = meta.get("label", IGNORE_INDEX)
        if not isinstance(label, int) or isinstance(label, bool):
            raise fail(ErrorKind.BAD_METADATA, f"bad .json label {label!r}: not an integer")
        if "cls" in raw:
            try:
                label = int(raw["cls"].decode().strip())
            except Exception as e:
                raise fail(ErrorKind.BAD_METADATA, f"bad .cls {raw['cls'][:20]!r}") from e

        image = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
        text = next((raw[e] for e in TEXT_EXTS if e in raw), None)
        emb = raw.get(EMB_EXT)
        declared = meta.get("modality")
        if declared is not None and declared not in set(Modality):
            raise fail(ErrorKind.BAD_METADATA, f"unknown modality {declared!r}")

        if emb is not None:
            def array(ext: str, dtype: Any = None) -> torch.Tensor | None:
                if ext not in raw:
                    return None
                try:
                    data = np.load(io.BytesIO(raw[ext]), allow_pickle=False)
                except Exception as e:
                    raise fail(ErrorKind.EMB_DECODE, f"bad .{ext}: {e}") from e
                return torch.from_numpy(data if dtype is None else data.astype(dtype))

            vec = array(EMB_EXT, np.float16)
            ids = array("ids.npy", np.int64)  # per-token text embeddings keep their ids, for masked-token labels
            if ids is not None and (vec.dim() != 2 or ids.shape != vec.shape[:1]):
                raise fail(ErrorKind.EMB_DECODE, f"ids {tuple(ids.shape)} do not match emb {tuple(vec.shape)}")
            logits = array("logits.npy")  # a teacher's class logits, from `mmload precompute --teacher`
            return Sample(key, Modality(declared or Modality.IMAGE), emb=vec, ids=ids, label=label,
                          teacher_logits=logits, url=url)

        modality = Modality(declared) if declared else _infer(image is not None, text is not None)
        if modality is None:
            raise fail(ErrorKind.MISSING_PAYLOAD, f"no image, text or embedding member (has {_members(raw)})")
        if modality in (Modality.IMAGE, Modality.IMAGE_TEXT) and image is None:
            raise fail(ErrorKind.MISSING_PAYLOAD, f"{modality} sample without an image member (has {_members(raw)})")
        if modality in (Modality.TEXT, Modality.IMAGE_TEXT) and text is None:
            raise fail(ErrorKind.MISSING_PAYLOAD, f"{modality} sample without a .txt member (has {_members(raw)})")

        pixels = ids = None
        if modality != Modality.TEXT:
            try:
                pixels = decode_image(image, self.image_size, self.max_pixels)
            except Exception as e:
                kind = ErrorKind.IMAGE_TOO_LARGE if "max_pixels" in str(e) or isinstance(
                    e, Image.DecompressionBombError) else ErrorKind.IMAGE_DECODE
                raise fail(kind, f"{type(e).__name__}: {e}") from e
        if modality != Modality.IMAGE:
            ids = self._ids(text, fail)
        return Sample(key, modality, pixels=pixels, ids=ids, label=label, url=url)

    def _ids(self, data: bytes, fail: Any) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("a text sample needs a tokenizer: pass tokenizer= (a HF name or path) or read shards "
                             "made by `mmload make-shards`, which stores one beside them")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise fail(ErrorKind.TEXT_DECODE, f"not UTF-8: {e}") from e
        text = text.strip()
        if not text:
            raise fail(ErrorKind.EMPTY_TEXT, "empty text")
        # A bound on tokenizer work for huge captions: no word piece is shorter than one character.
        text = text[: self.max_text_len * 32]
        ids = self.tokenizer(text, truncation=True, max_length=self.max_text_len)["input_ids"]
        return torch.tensor(ids, dtype=torch.int64)


def _infer(has_image: bool, has_text: bool) -> Modality | None:
    if has_image and has_text:
        return Modality.IMAGE_TEXT
    if has_image:
        return Modality.IMAGE
    if has_text:
        return Modality.TEXT
    return None


def _members(raw: dict[str, Any]) -> list[str]:
    return sorted(k for k in raw if not k.startswith("__"))
