"""Decoding one raw webdataset sample (``{"__key__", "jpg", "txt", ...}``) into a :class:`Sample`."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from mmload.errors import ErrorKind, SampleError
from mmload.layouts import PATCH_SIZE
from mmload.sample import IGNORE_INDEX, Modality, Sample
from mmload.tokenizer import LazyDefault, TextEncoder

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt",)
EMB_EXT = "emb.npy"
TEXT_EMB_EXT = "text.emb.npy"  # the text side of a precomputed image_text pair (EMB_EXT is its image side)
EMB_EXTS = (EMB_EXT, TEXT_EMB_EXT, "ids.npy", "logits.npy")  # embeddings, token ids, a teacher's logits
READ_EXTS = frozenset({*IMAGE_EXTS, *TEXT_EXTS, *EMB_EXTS, "json", "cls"})  # the members a decoder may read
IDS_KEY = "__ids__"  # token ids given by the caller instead of a text (raw samples: mmload.raw)
MAX_PIXELS = 64_000_000  # 8000 x 8000: past it, an image is treated as a decompression bomb


RESOLUTIONS = ("square", "native")


@dataclass(frozen=True)
class Native:
    """Images at native resolution (``resolution="native"``): the aspect ratio kept, scaled to at most
    ``max_patches`` patches of ``patch_size`` pixels (NOTE [native grid])."""

    max_patches: int
    patch_size: int = PATCH_SIZE
    upscale: bool = False

    def __post_init__(self) -> None:
        if self.max_patches < 1 or self.patch_size < 1:
            raise ValueError(f"max_patches and patch_size must be >= 1, got {self.max_patches}, {self.patch_size}")

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """``(rows, cols)`` of patches for an image of ``height x width`` pixels.

        NOTE [native grid]: Pix2Struct's aspect-preserving scale, ``factor = sqrt(N * p^2 / (H * W))``, rows =
        ``floor(factor * H / p)``, cols = ``floor(factor * W / p)``, each at least 1; down only unless ``upscale``
        (a small image keeps ``floor(H / p) x floor(W / p)``). ``factor * H / p = sqrt(N * H / W)``, so the
        grid is computed in integers (``isqrt``), where floats would floor 13.999... to 13. A strip so thin that
        its short side rounds to 0 gets 1 there, and its long side is capped so the grid stays within N.
        """
        if height < 1 or width < 1:
            raise ValueError(f"an image of {width}x{height} pixels has no patch")
        n, p = self.max_patches, self.patch_size
        if not self.upscale and n * p * p >= height * width:  # factor >= 1: no scaling up
            rows, cols = height // p, width // p
        else:
            rows, cols = math.isqrt(n * height // width), math.isqrt(n * width // height)
        rows, cols = max(1, rows), max(1, cols)
        if rows * cols > n:  # only where a side was raised to 1
            rows, cols = (rows, n // rows) if rows <= cols else (n // cols, cols)
        return rows, cols


def decode_image(data: bytes | Image.Image, size: int, max_pixels: int = MAX_PIXELS,
                 native: Native | None = None) -> torch.Tensor:
    """JPEG/PNG/WebP bytes (or an opened PIL image) -> uint8 ``(3, size, size)``: EXIF orientation applied, any mode
    to RGB (16-bit scaled, not clipped), shorter side resized, centre crop. With ``native``: uint8
    ``(3, rows * p, cols * p)``, the aspect ratio kept (``Native.grid``), the whole image resized, nothing cropped.

    Raises ``SampleError``-free plain exceptions; the caller names the kind.
    """
    img = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
    w, h = img.size
    if w * h > max_pixels:
        raise ValueError(f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}")
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    sideways = orientation in (5, 6, 7, 8)  # stored rotated by 90 degrees: width and height swap when applied
    if native is not None:
        rows, cols = native.grid(*((w, h) if sideways else (h, w)))
        target = (cols * native.patch_size, rows * native.patch_size)  # PIL's (width, height), as shown
        stored = target[::-1] if sideways else target
    else:
        target = stored = (size, size)
    if img.format == "JPEG" and not isinstance(data, Image.Image):
        _check_jpeg_size(data, w, h)
        img.draft("RGB", stored)  # DCT-domain downscale: decodes a 640x480 JPEG ~3x faster
    if orientation != 1:
        img = ImageOps.exif_transpose(img)  # a phone's portrait photo is stored sideways with orientation 6
    if img.mode in WIDE_GREY_MODES:  # 16-bit grey: convert("RGB") would clip every value over 255 to white
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        # mode I holds any int: 16-bit data (a PNG's, in older Pillows) or 8-bit values converted up, kept as they are
        shift = 0 if img.mode == "I" and wide.size and int(wide.max()) <= 255 else 8
        img = Image.fromarray((wide >> shift).astype(np.uint8), "L")
    img = img.convert("RGB")
    if native is not None:
        img = img.resize(target, Image.Resampling.BILINEAR) if img.size != target else img
    else:
        img = ImageOps.fit(img, target, Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # uint8 (3, H, W)


EXIF_ORIENTATION = 0x0112
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PNG's 16-bit grey opens as one of these
# start-of-frame markers of Huffman-coded JPEGs (baseline, extended, progressive, lossless; plain and
# hierarchical); arithmetic coding (0xC9-0xCB, 0xCD-0xCF) can spend less than a bit on a block
_HUFFMAN_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7})


def _check_jpeg_size(data: bytes, w: int, h: int) -> None:
    """Refuse a JPEG whose header claims more pixels than its data can hold (an inflated header, which libjpeg
    would fill with grey without an error): a Huffman-coded scan spends at least one bit on every MCU (the DC code
    of its first block), so ``w x h`` needs at least ``MCUs / 8`` bytes."""
    i = 2
    while i + 9 < len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xFF:  # a fill byte before the marker
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker not in _HUFFMAN_SOF:
                return
            components = data[i + 9] if i + 9 < len(data) else 0
            factors = data[i + 11:i + 11 + 3 * components:3]  # (H << 4 | V) of each component
            hmax = max((f >> 4 for f in factors), default=1) or 1
            vmax = max((f & 15 for f in factors), default=1) or 1
            mcus = -(-w // (8 * hmax)) * -(-h // (8 * vmax))
            if len(data) * 8 < mcus:
                raise ValueError(f"truncated: the JPEG header claims {w}x{h} pixels ({mcus} MCUs), which takes at "
                                 f"least {-(-mcus // 8)} bytes, and the file has {len(data)}")
            return
        i += 2 + length


@dataclass
class Decoder:
    """Turns raw members into a Sample, raising :class:`SampleError` with a named kind on bad input."""

    tokenizer: Any = None  # a HF tokenizer, a LazyDefault (loaded at the first text); None: no texts
    image_size: int = 224
    max_text_len: int = 512
    max_pixels: int = MAX_PIXELS
    resolution: str = "square"  # or "native": the aspect ratio kept, at most max_patches patches (NOTE [native grid])
    max_patches: int | None = None  # native: patches per image (not counting the class token); None: the square's
    patch_size: int = PATCH_SIZE  # native: the model's patch size
    upscale: bool = False  # native: scale small images up to max_patches too
    _encoder: TextEncoder | None = field(default=None, init=False, repr=False, compare=False)
    native: Native | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be 'square' or 'native', got {self.resolution!r}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.max_patches is not None and self.max_patches < 1:
            raise ValueError(f"max_patches must be >= 1, got {self.max_patches}")
        if self.resolution == "native":
            square = max(1, (self.image_size // self.patch_size) ** 2)
            self.native = Native(self.max_patches or square, self.patch_size, self.upscale)
        if self.max_text_len < 2:
            raise ValueError(f"max_text_len must be >= 2 (room for [CLS] and [SEP]), got {self.max_text_len}")

    def __call__(self, raw: dict[str, Any], notices: list[SampleError] | None = None) -> Sample:
        """The sample of ``raw``; what it holds that no field reads (``unused_member``) is appended to ``notices``."""
        key, url = raw["__key__"], raw.get("__url__", "")

        def fail(kind: ErrorKind, msg: str) -> SampleError:
            return SampleError(kind, msg, url, key)

        links = raw.get("__links__", {})
        needed = [ext for ext in links if ext in READ_EXTS]
        if needed:
            raise fail(ErrorKind.LINK_MEMBER, f"{links[needed[0]]} is a link, which a stream cannot follow: store "
                                              "the file itself in the tar (tar --dereference, or tar -h)")
        sample = self._decode(raw, fail)
        if notices is not None:
            used = _used(raw, sample)
            notices.extend(fail(ErrorKind.UNUSED_MEMBER, f"member {ext!r} is not read (a {sample.modality} sample "
                                                         f"reads {sorted(used)})")
                           for ext in [*sorted(set(_members(raw)) - used), *sorted(links)])
        return sample

    def _decode(self, raw: dict[str, Any], fail: Any) -> Sample:
        key, url = raw["__key__"], raw.get("__url__", "")
        meta = {}
        if "json" in raw:
            try:
                meta = raw["json"] if isinstance(raw["json"], dict) else json.loads(raw["json"])
                assert isinstance(meta, dict), "top level is not an object"
            except Exception as e:
                raise fail(ErrorKind.BAD_METADATA, f"bad .json: {e}") from e
        label = meta.get("label", IGNORE_INDEX)
        if not isinstance(label, int) or isinstance(label, bool):
            raise fail(ErrorKind.BAD_METADATA, f"bad .json label {label!r}: not an integer")
        if "cls" in raw:
            label = _class_label(raw["cls"], fail)

        image = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
        text = next((raw[e] for e in TEXT_EXTS if e in raw), None)
        given_ids = raw.get(IDS_KEY)  # ids a caller tokenized itself (mmload.raw), used as given
        if given_ids is not None:
            text = given_ids
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
            text_vec = array(TEXT_EMB_EXT, np.float16)  # a pair's text side
            ids = array("ids.npy", np.int64)  # per-token text embeddings keep their ids, for masked-token labels
            tokens = vec if text_vec is None else text_vec
            if ids is not None and (tokens.dim() != 2 or ids.shape != tokens.shape[:1]):
                raise fail(ErrorKind.EMB_DECODE, f"ids {tuple(ids.shape)} do not match the text embedding "
                                                 f"{tuple(tokens.shape)}")
            logits = array("logits.npy")  # a teacher's class logits, from `mmload precompute --teacher`
            modality = Modality(declared) if declared else (
                Modality.IMAGE if text_vec is None else Modality.IMAGE_TEXT)
            if (modality == Modality.IMAGE_TEXT) != (text_vec is not None):
                need = "needs" if text_vec is None else "has no use for"
                raise fail(ErrorKind.EMB_DECODE, f"an embedding sample of modality {modality} {need} .{TEXT_EMB_EXT}")
            return Sample(key, modality, emb=vec, text_emb=text_vec, ids=ids, label=label, teacher_logits=logits,
                          url=url)

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
                pixels = decode_image(image, self.image_size, self.max_pixels, self.native)
            except Exception as e:
                kind = ErrorKind.IMAGE_TOO_LARGE if "max_pixels" in str(e) or isinstance(
                    e, Image.DecompressionBombError) else ErrorKind.IMAGE_DECODE
                raise fail(kind, f"{type(e).__name__}: {e}") from e
        if modality != Modality.IMAGE:
            ids = text if given_ids is not None else self._ids(text, fail)
        return Sample(key, modality, pixels=pixels, ids=ids, label=label, url=url)

    def _ids(self, data: bytes | str, fail: Any) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("a text sample needs a tokenizer: pass tokenizer= (a HF name or path) or read shards "
                             "made by `mmload make-shards`, which stores one beside them")
        if isinstance(self.tokenizer, LazyDefault):
            self.tokenizer = self.tokenizer.load()
        if isinstance(data, str):
            text = data
        else:
            try:
                text = bytes(data).decode("utf-8")
            except UnicodeDecodeError as e:
                raise fail(ErrorKind.TEXT_DECODE, f"not UTF-8: {e}") from e
        text = text.strip()
        if not text:
            raise fail(ErrorKind.EMPTY_TEXT, "empty text")
        # A bound on tokenizer work for huge captions: no word piece is shorter than one character.
        text = text[: self.max_text_len * 32]
        encoder = self._encoder
        if encoder is None or not encoder.serves(self.tokenizer, self.max_text_len):
            encoder = self._encoder = TextEncoder(self.tokenizer, self.max_text_len)  # NOTE [text encoder]
        return torch.tensor(encoder(text), dtype=torch.int64)


def _class_label(value: Any, fail: Any) -> int:
    """A ``.cls`` member: bytes or text holding an integer, or (decoded by webdataset, or given raw) an int."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int((value.decode() if isinstance(value, bytes | bytearray) else value).strip())
    except Exception as e:
        raise fail(ErrorKind.BAD_METADATA, f"bad .cls {value[:20] if isinstance(value, bytes | str) else value!r}: "
                                           "not an integer") from e


def _used(raw: dict[str, Any], sample: Sample) -> set[str]:
    """The members of ``raw`` that went into ``sample``."""
    used = {ext for ext in ("json", "cls") if ext in raw}
    if sample.emb is not None:
        return used | {ext for ext in EMB_EXTS if ext in raw}
    if sample.modality != Modality.TEXT:
        used.add(next(e for e in IMAGE_EXTS if e in raw))
    text = next((e for e in TEXT_EXTS if e in raw), None)
    if sample.modality != Modality.IMAGE and text is not None:  # None: ids given instead (mmload.raw)
        used.add(text)
    return used


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
