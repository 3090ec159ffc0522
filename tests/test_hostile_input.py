"""Hostile input: hypothesis writes shards with planted damage; the loader never hangs, never crashes by default,
and counts exactly what was planted.

Every generated shard is a list of planted samples (adjacent members sharing a key), each with the outcome the
loader owes it: a modality for a good sample, an error kind for a bad one. A shard may then be damaged as a
whole: cut at a byte offset (plain or gzipped), or replaced by bytes that are no tar at all.

NOTE [where a truncated tar ends]: a sample is complete only once the reader has seen what follows its last
member: a whole header of another sample, or the end-of-archive block. A cut anywhere before that (in a header,
a body, the padding or the end block) may have removed more members of the same key, so that sample is lost
with the shard's one ``shard_read``; every sample whose successor's header is whole before the cut is delivered.
A gzipped shard may be cut in its compressed bytes: the same rule applies to what those bytes decompress to,
and the shard is complete only when the deflate stream is; or a cut tar may have been gzipped whole.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import json
import signal
import struct
import tarfile
import tempfile
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmload import SampleError, ShardDataset, TooManyErrors
from mmload.dataset import read_shard
from mmload.errors import ErrorKind
from mmload.sample import Modality

IMAGE_SIZE = 16
MAX_PIXELS = 1_000_000  # passed to ShardDataset: the bombs below all declare more
MAX_MEMBER_BYTES = 1_200_000  # above a huge caption, below an oversized member
HUGE_CAPTION_CHARS = 1_000_000
HANG_SECONDS = 30  # one example is a few shards of a few samples: far below this unless something spins
WORDS = ("the", "a", "dog", "cat", "runs", "over", "green", "field", "under", "bright", "sky", "photo", "of",
         "two", "people", "walking", "café", "naïve", "日本", "straße", "x-ray", "re-entry", "42", "3.14")
GOOD = {m.value for m in Modality}


@dataclass(frozen=True)
class Planted:
    """Adjacent tar members sharing a key, and what the loader must make of them."""

    key: str
    members: tuple[tuple[str, bytes], ...]  # (extension, payload), in tar order
    outcome: str  # a Modality value for a good sample, an ErrorKind value for a bad one
    huge: str | None = None  # the text of a huge caption, to check its truncation
    unused: int = 0  # members of a good sample that no field reads: unused_member notices


@dataclass(frozen=True)
class PlannedShard:
    samples: tuple[Planted, ...]
    damage: str  # none | truncate | gzip | truncate_gz (cut the .tar.gz) | gzip_truncated (gzip a cut tar) | not_tar
    cut: tuple[str, int, int] = ("any", 0, 0)  # (where, member, offset), resolved against the written layout
    junk: bytes = b""  # the whole file when damage == "not_tar"


# ---- payloads ---------------------------------------------------------------------------------------------------

@functools.cache
def image_bytes(fmt: str, seed: int) -> bytes:
    """A 40x30 noise image: noise keeps the entropy-coded body long, so a cut body is a real cut."""
    pixels = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def truncated_image(fmt: str, seed: int, offset: int) -> bytes:
    """A JPEG or PNG whose header is whole and whose pixel data is cut short."""
    data = image_bytes(fmt, seed)
    if fmt == "JPEG":
        sos = data.index(b"\xff\xda")
        start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")  # first byte of the scan
        stop = len(data) - 2  # keep at least the end-of-image marker off
    else:
        assert data.count(b"IDAT") == 1
        start = data.index(b"IDAT") + 4
        stop = start + int.from_bytes(data[start - 8:start - 4], "big") - 8  # the zlib stream misses its end
    return data[:start + offset % (stop - start)]


def _png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


@functools.cache
def bomb_png(mode: str, width: int, height: int) -> bytes:
    """A valid all-black PNG (``1``: 1-bit grey, ``P``: 8-bit palette) that is small on disk and huge decoded."""
    bits, color_type = (1, 0) if mode == "1" else (8, 3)
    row = bytes(1 + (width * bits + 7) // 8)  # filter byte + packed pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bits, color_type, 0, 0, 0))
    if mode == "P":
        png += _png_chunk(b"PLTE", bytes(3))
    png += _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    assert len(png) < 64 << 10 and width * height > MAX_PIXELS
    return png


LINK = b"<a symlink>"  # a member written as a symbolic link, not as data
MAX_SAMPLE_BYTES = 2_500_000  # above a huge caption beside an image, below three members of a million bytes


@functools.cache
def png16(value: int) -> bytes:
    """A 16-bit grey PNG (mode I;16) of one value."""
    buf = io.BytesIO()
    Image.fromarray(np.full((30, 40), value, dtype=np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


@functools.cache
def exif_jpeg(orientation: int) -> bytes:
    """A 40x20 JPEG, left half blue and right half red, with an EXIF orientation tag."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


@functools.cache
def inflated_jpeg(width: int, height: int) -> bytes:
    """A 16x16 grey JPEG (a few hundred bytes) whose frame header claims ``width x height``: libjpeg fills the rest
    with grey, no error."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


BOMBS = (("1", 20000, 20000), ("1", 1001, 1000), ("P", 3000, 3000), ("P", 40000, 30), ("1", 8, 200_000))


@functools.cache
def huge_caption(seed: int) -> str:
    """About a megabyte of ordinary words."""
    words = np.random.default_rng(seed).choice(len(WORDS), HUGE_CAPTION_CHARS // 5)
    return " ".join(WORDS[i] for i in words)[:HUGE_CAPTION_CHARS].rsplit(" ", 1)[0]


def meta(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# ---- strategies -------------------------------------------------------------------------------------------------

captions = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)
INVALID_UTF8 = (b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80")
SAMPLE_KINDS = ("image", "text", "image_text", "huge_caption", "corrupt_image", "truncated_image", "empty_image",
                "empty_text", "bomb", "invalid_utf8", "no_payload", "duplicate_member", "member_too_large",
                "link_payload", "unused_member", "wide_or_rotated", "inflated_header", "sample_too_large")


@st.composite
def planted_samples(draw: st.DrawFn, key: str) -> Planted:
    """One sample of a random kind; a bad one may carry good members too, which must not rescue it."""
    kind = draw(st.sampled_from(SAMPLE_KINDS))
    seed = draw(st.integers(0, 3))
    jpg = ("jpg", image_bytes("JPEG", seed))
    txt = ("txt", draw(captions).encode())
    image = draw(st.sampled_from([jpg, ("png", image_bytes("PNG", seed))]))
    extra: list[tuple[str, bytes]] = []  # good members that keep the sample's outcome
    huge, unused = None, 0
    if kind == "image":
        members, outcome = [image], "image"
        extra = draw(st.sampled_from([[], [("cls", str(seed).encode())], [("json", meta(modality="image"))]]))
    elif kind == "text":
        members, outcome = [txt], "text"
    elif kind == "image_text":
        members, outcome = [image, txt], "image_text"
        extra = draw(st.sampled_from([[], [("json", meta(modality="image_text", label=seed))]]))
    elif kind == "huge_caption":
        huge = huge_caption(seed % 2)
        members = [("txt", huge.encode())]
        outcome = draw(st.sampled_from(["text", "image_text"]))
        if outcome == "image_text":
            members.append(image)
    elif kind == "member_too_large":
        members, outcome = [(draw(st.sampled_from(["jpg", "txt"])), bytes(MAX_MEMBER_BYTES + 1))], "member_too_large"
        extra = draw(st.sampled_from([[], [("json", meta(label=1))]]))
    elif kind == "link_payload":  # a link where the image or the caption should be: the whole sample is skipped
        members = [(draw(st.sampled_from(["jpg", "png", "txt", "json"])), LINK)]
        outcome = "link_member"
        extra = draw(st.sampled_from([[], [image], [txt], [image, txt]]))
    elif kind == "unused_member":  # beside a good sample: counted, the sample delivered
        members = [image, (draw(st.sampled_from(["", "xyz", "url.txt", "ZIP"])), draw(st.sampled_from([b"x", LINK])))]
        members += draw(st.sampled_from([[], [txt]]))
        outcome, unused = ("image_text" if len(members) == 3 else "image"), 1
    elif kind == "wide_or_rotated":
        members = [draw(st.sampled_from([("png", png16(32768)), ("png", png16(65535)), ("jpg", exif_jpeg(6)),
                                         ("jpg", exif_jpeg(3))]))]
        outcome = "image"
    elif kind == "inflated_header":
        size = draw(st.sampled_from([(1000, 1000), (1250, 800)]))  # under MAX_PIXELS
        members, outcome = [("jpg", inflated_jpeg(*size))], "image_decode"
        extra = draw(st.sampled_from([[], [txt]]))
    elif kind == "sample_too_large":  # every member under max_member_bytes, together over max_sample_bytes
        members = [("jpg", bytes(1_000_000)), ("txt", b"a" * 1_000_000), ("cls", b"1" * 600_000)]
        outcome = "sample_too_large"
    elif kind == "no_payload":
        members = [("json", draw(st.sampled_from([meta(), meta(label=3), meta(modality="image")])))]
        outcome = "missing_payload"
    elif kind == "duplicate_member":
        twice = draw(st.sampled_from([image, txt]))
        members, outcome = [twice, twice, image if twice is txt else txt], "duplicate_member"
    elif kind in ("invalid_utf8", "empty_text"):
        if kind == "invalid_utf8":
            text = draw(captions).encode("ascii", "replace")  # ASCII: any byte offset is a character boundary
            at = draw(st.integers(0, len(text)))
            members = [("txt", text[:at] + draw(st.sampled_from(INVALID_UTF8)) + text[at:])]
            outcome = "text_decode"
        else:
            members, outcome = [("txt", draw(st.sampled_from([b"", b"  \n\t ", "\u3000".encode()])))], "empty_text"
        extra = draw(st.sampled_from([[], [image]]))  # the image decodes fine, then the text fails
    else:  # a bad image; a good caption beside it does not make the sample good
        if kind == "corrupt_image":
            members = [("jpg", b"\x00corrupt" + draw(st.binary(max_size=300)))]
        elif kind == "truncated_image":
            fmt = draw(st.sampled_from(["JPEG", "PNG"]))
            members = [("jpg" if fmt == "JPEG" else "png", truncated_image(fmt, seed, draw(st.integers(0, 1 << 16))))]
        elif kind == "empty_image":
            members = [("jpg", b"")]
        else:
            members = [("png", bomb_png(*draw(st.sampled_from(BOMBS))))]
        outcome = "image_too_large" if kind == "bomb" else "image_decode"
        extra = draw(st.sampled_from([[], [txt]]))
    order = draw(st.permutations(members + extra))
    return Planted(key, tuple(order), outcome, huge, unused)


COMPRESSED_MAGIC = (b"\x1f\x8b", b"\x1f\x8b\x08", b"\x1f\x8b\x08\x04", b"\x1f\x8b\x08\x1f", b"BZh", b"BZh9",
                    b"\xfd7zXZ\x00")
junk_files = st.one_of(
    st.binary(max_size=2000),  # anything, nothing included; 512 zero bytes and more are an empty archive
    st.binary(max_size=2000).map(lambda b: b"not a tar " + b),
    st.tuples(st.sampled_from(COMPRESSED_MAGIC), st.binary(max_size=600)).map(b"".join),  # cut header, bad body
    st.sampled_from([image_bytes("JPEG", 0), gzip.compress(b"plain text, gzipped", mtime=0), gzip.compress(b"")]),
)


@st.composite
def planned_shards(draw: st.DrawFn) -> PlannedShard:
    n = draw(st.integers(0, 7))
    samples = draw(st.permutations([draw(planted_samples(f"k{i:02d}")) for i in range(n)]))
    samples = list(samples)
    for _ in range(draw(st.integers(0, 2))):  # a key that comes back later in the shard
        if not samples:
            break
        key = samples[draw(st.integers(0, len(samples) - 1))].key
        first = next(i for i, s in enumerate(samples) if s.key == key)
        slots = [p for p in range(first + 1, len(samples) + 1)
                 if samples[p - 1].key != key and (p == len(samples) or samples[p].key != key)]
        if slots:  # not right after itself, where it would merge into the same sample
            samples.insert(draw(st.sampled_from(slots)), Planted(key, (("jpg", image_bytes("JPEG", 1)),),
                                                                 "duplicate_key"))
    damage = draw(st.sampled_from(["none", "truncate", "truncate", "gzip", "truncate_gz", "gzip_truncated",
                                   "not_tar"]))
    cut = (draw(st.sampled_from(["header", "body", "end", "any"])), draw(st.integers(0, 99)),
           draw(st.integers(0, 1 << 20)))
    junk = draw(junk_files) if damage == "not_tar" else b""
    return PlannedShard(tuple(samples), damage, cut, junk)


# ---- writing shards and what the loader owes us ------------------------------------------------------------------

@dataclass(frozen=True)
class Expected:
    url: str
    key: str  # "" for a shard-level error
    outcome: str  # a Modality value or an ErrorKind value
    unused: int = 0  # unused_member notices a good sample owes

    @property
    def good(self) -> bool:
        return self.outcome in GOOD


def tar_bytes(samples: tuple[Planted, ...]) -> tuple[bytes, list[int], list[tuple[int, int]], int]:
    """The tar, the offset of each sample's first header, (header offset, size) of each member, and where the
    end-of-archive block starts."""
    buf = io.BytesIO()
    starts, members = [], []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:  # 512-byte headers only
        for s in samples:
            starts.append(tar.offset)
            for ext, data in s.members:
                info = tarfile.TarInfo(f"{s.key}.{ext}" if ext else s.key)  # no extension: the key alone
                if data is LINK:
                    info.type, info.linkname = tarfile.SYMTYPE, f"elsewhere/{s.key}.{ext}"
                    data = b""
                info.size = len(data)
                members.append((tar.offset, len(data)))
                tar.addfile(info, io.BytesIO(data))
        end = tar.offset
    return buf.getvalue(), starts, members, end


def resolve_cut(cut: tuple[str, int, int], members: list[tuple[int, int]], end: int, total: int) -> int:
    where, i, offset = cut
    if where == "header" and members:
        return members[i % len(members)][0] + offset % 512
    if where == "body" and members:
        header, size = members[i % len(members)]
        return header + 512 + offset % max(size, 1)
    if where == "end":
        return end + offset % 1024
    return offset % total


def write_shard(path: Path, plan: PlannedShard) -> list[Expected]:
    """Write one planned shard; return the events the loader owes it, in stream order (see NOTE above)."""
    url = str(path)
    if plan.damage == "not_tar":
        path.write_bytes(plan.junk)
        empty_tar = len(plan.junk) >= 512 and not any(plan.junk[:512])  # an end-of-archive block first
        return [] if empty_tar else [Expected(url, "", ErrorKind.SHARD_READ.value)]
    data, starts, members, end = tar_bytes(plan.samples)
    complete = len(plan.samples)  # samples read whole, and known to be whole
    if plan.damage in ("truncate", "gzip_truncated"):
        cut = resolve_cut(plan.cut, members, end, len(data))
        data, truncated, available = data[:cut], cut < end + 512, cut
        if plan.damage == "gzip_truncated":
            data = gzip.compress(data, mtime=0)
    elif plan.damage in ("gzip", "truncate_gz"):
        data = gzip.compress(data, mtime=0)  # 10-byte header, raw deflate, 8-byte trailer
        cut = len(data) if plan.damage == "gzip" else plan.cut[2] % len(data)
        data = data[:cut]
        inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        available = len(inflate.decompress(data[10:])) if cut > 10 else 0
        truncated = not inflate.eof
    else:
        truncated = False
    if truncated:
        complete = sum(1 for nxt in starts[1:] if nxt + 512 <= available)
    path.write_bytes(data)
    events = [Expected(url, s.key, s.outcome, s.unused) for s in plan.samples[:complete]]
    return events + [Expected(url, "", ErrorKind.SHARD_READ.value)] if truncated else events


def write_shards(folder: Path, plans: list[PlannedShard]) -> tuple[list[str], list[Expected]]:
    urls, events = [], []
    for i, plan in enumerate(plans):
        path = folder / f"shard-{i:03d}.tar{'.gz' if 'gz' in plan.damage else ''}"
        events += write_shard(path, plan)
        urls.append(str(path))
    return urls, events


def expected_counts(events: list[Expected]) -> Counter[str]:
    """What ``ShardDataset.errors`` owes the events of one stream: every bad outcome, and a
    ``duplicate_key_across_shards`` notice for each good sample whose key an earlier shard delivered (within a shard
    a repeated key is a ``duplicate_key``, not delivered)."""
    counts = Counter(e.outcome for e in events if not e.good)
    counts[ErrorKind.UNUSED_MEMBER.value] += sum(e.unused for e in events if e.good)
    repeats = sum(n - 1 for n in Counter(e.key for e in events if e.good).values())
    counts[ErrorKind.DUPLICATE_KEY_ACROSS_SHARDS.value] = repeats
    return +counts  # without the zero counts


class SpyTokenizer:
    """A real tokenizer that remembers the longest text it was asked to tokenize."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **kwargs)


class Hung(BaseException):
    """Not an Exception (nor a TimeoutError, an OSError): no ``except`` in the loader may swallow it."""


@contextmanager
def no_hang(seconds: int = HANG_SECONDS) -> Iterator[None]:
    """Fail, instead of hanging the suite, when the body runs longer than ``seconds``."""
    def expire(signum: int, frame: Any) -> None:
        raise Hung(f"the loader ran for more than {seconds} s on a few tiny shards: it hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        with mock.patch("mmload.reader.time.sleep"):  # time.sleep itself: retried shards wait no backoff
            yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def tokenizer(builtin_shards: list[str]) -> Any:
    return ShardDataset(builtin_shards).tokenizer


def hostile_dataset(urls: list[str], tokenizer: Any, **kwargs: Any) -> ShardDataset:
    return ShardDataset(urls, tokenizer=tokenizer, image_size=IMAGE_SIZE, max_pixels=MAX_PIXELS,
                        max_member_bytes=MAX_MEMBER_BYTES, max_sample_bytes=MAX_SAMPLE_BYTES, **kwargs)


# ---- the properties ---------------------------------------------------------------------------------------------

def test_planted_payloads_are_what_they_claim() -> None:
    """The generator's own assumptions, checked once: otherwise an exact count could be exactly wrong."""
    for bad in INVALID_UTF8:  # each breaks any ASCII text it is put into
        with pytest.raises(UnicodeDecodeError):
            (b"a" + bad + b"a").decode("utf-8")
    for mode, width, height in BOMBS:  # small files that open as huge images (PIL itself refuses the largest)
        with mock.patch.object(Image, "MAX_IMAGE_PIXELS", None):
            assert Image.open(io.BytesIO(bomb_png(mode, width, height))).size == (width, height)
    for fmt in ("JPEG", "PNG"):  # whole headers, cut bodies: the first and the last cut both fail to decode
        span = len(image_bytes(fmt, 0))
        for offset in (0, span - 1):
            img = Image.open(io.BytesIO(truncated_image(fmt, 0, offset)))
            with pytest.raises(OSError, match="truncated|broken"):
                img.load()


@settings(max_examples=200, deadline=None)
@given(plans=st.lists(planned_shards(), min_size=1, max_size=3), max_text_len=st.sampled_from([2, 16, 64]),
       shuffle=st.booleans(), buffer_bytes=st.sampled_from([1 << 28, 1_500_000, 1]))
def test_planted_damage_is_skipped_and_counted_exactly(tokenizer: Any, plans: list[PlannedShard],
                                                       max_text_len: int, shuffle: bool, buffer_bytes: int) -> None:
    spy = SpyTokenizer(tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        urls, events = write_shards(Path(tmp), plans)
        for plan in plans:  # --hypothesis-show-statistics shows what was planted
            event(f"damage {plan.damage}")
        for e in events:
            event(f"outcome {e.outcome}")
        ds = hostile_dataset(urls, spy, max_text_len=max_text_len, shuffle=shuffle, shuffle_buffer=3,
                             shuffle_buffer_bytes=buffer_bytes, max_consecutive_errors=None)
        with no_hang():
            samples = list(ds)

    got = [(s.url, s.key, s.modality.value) for s in samples]
    want = [(e.url, e.key, e.outcome) for e in events if e.good]
    assert (sorted(got) if shuffle else got) == (sorted(want) if shuffle else want)
    assert ds.errors.counts == expected_counts(events)

    huge = {(url, s.key): s.huge for url, p in zip(urls, plans) for s in p.samples if s.huge is not None}
    for s in samples:
        if s.modality != Modality.TEXT:
            assert s.pixels.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        if s.modality != Modality.IMAGE:
            assert s.ids[0] == tokenizer.cls_token_id and s.ids[-1] == tokenizer.sep_token_id
            assert 2 <= len(s.ids) <= max_text_len
        text = huge.get((s.url, s.key))
        if text is not None:  # accepted and truncated like the whole caption would be
            head = " ".join(text.split(" ", 4 * max_text_len)[:4 * max_text_len])
            assert s.ids.tolist() == tokenizer(head, truncation=True, max_length=max_text_len)["input_ids"]
            assert len(s.ids) == max_text_len
    # "Not slow": tokenizer work is bounded by max_text_len, never by the size of the caption.
    assert spy.longest <= 64 * max_text_len


@settings(max_examples=100, deadline=None)
@given(plans=st.lists(planned_shards(), min_size=1, max_size=3))
def test_strict_mode_raises_on_the_first_planted_error(tokenizer: Any, plans: list[PlannedShard]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        urls, events = write_shards(Path(tmp), plans)
        ds = hostile_dataset(urls, tokenizer, max_text_len=16, strict=True)
        first = next((i for i, e in enumerate(events) if not e.good), None)
        got = []
        with no_hang():
            if first is None:
                got = [(s.url, s.key) for s in ds]
            else:
                with pytest.raises(SampleError) as info:
                    for s in ds:
                        got.append((s.url, s.key))
    assert got == [(e.url, e.key) for e in events[:first]]
    if first is not None:
        bad = events[first]
        err = info.value
        assert (err.kind, err.url, err.key) == (bad.outcome, bad.url, bad.key)
        assert bad.url in str(err) and (not bad.key or f"key {bad.key!r}" in str(err))


@settings(max_examples=100, deadline=None)
@given(stream=st.lists(st.sampled_from(["good", "bad", "junk_shard"]), max_size=30), n=st.integers(1, 6))
@example(stream=["bad"] * 9, n=5)  # an all-bad stream stops after exactly n
@example(stream=["junk_shard"] * 3 + ["bad"] * 3, n=4)  # unreadable shards count as bad samples in a row
@example(stream=["bad", "bad", "good"] * 12, n=3)  # interleaved with good ones: never stops
def test_max_consecutive_errors_stops_after_exactly_n_in_a_row(stream: list[str], n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plans: list[list[str] | None] = []  # None: a shard that is no tar; a list: a tar of good or bad images
        current: list[str] = []
        for item in stream:
            if item == "junk_shard":
                plans += [current, None] if current else [None]
                current = []
            else:
                current.append(item)
        if current or not plans:
            plans.append(current)
        urls, reads = [], []  # reads: (url, key, good) for each sample or unreadable shard, in stream order
        for i, plan in enumerate(plans):
            path = Path(tmp) / f"shard-{i:03d}.tar"
            urls.append(str(path))
            if plan is None:
                path.write_bytes(b"not a tar")
                reads.append((str(path), "", False))
                continue
            members = tuple(Planted(f"k{j:02d}", (("jpg", image_bytes("JPEG", 0) if item == "good" else b"bad"),),
                                    item) for j, item in enumerate(plan))
            path.write_bytes(tar_bytes(members)[0])
            reads += [(str(path), m.key, m.outcome == "good") for m in members]
        run, bad, want, stops = 0, 0, [], False
        for url, key, good in reads:
            if good:
                run = 0
                want.append((url, key))
                continue
            run, bad = run + 1, bad + 1
            if run >= n:
                stops = True
                break
        ds = ShardDataset(urls, tokenizer=None, image_size=IMAGE_SIZE, max_consecutive_errors=n)
        got = []
        with no_hang():
            if stops:
                with pytest.raises(TooManyErrors, match=f"^{n} bad samples in a row"):
                    for s in ds:
                        got.append((s.url, s.key))
            else:
                got = [(s.url, s.key) for s in ds]
    assert got == want
    assert ds.errors.skipped() == bad


# name, mode, uid, gid, size, mtime, checksum, type, link name, magic, version, user, group, devices, prefix
HEADER_OFFSETS = st.one_of(st.sampled_from([0, 100, 108, 116, 124, 136, 148, 156, 157, 257, 263, 265, 297, 329, 337,
                                            345]), st.integers(0, 511))


@settings(max_examples=100, deadline=None)
@given(plan=planned_shards(), hits=st.lists(st.tuples(st.integers(0, 1 << 20), HEADER_OFFSETS, st.binary(
    min_size=1, max_size=12)), min_size=1, max_size=6), in_headers=st.booleans(), fix_checksums=st.booleans(),
       gzipped=st.booleans())
def test_bytes_overwritten_anywhere_never_crash_or_hang(tokenizer: Any, plan: PlannedShard,
                                                         hits: list[tuple[int, int, bytes]], in_headers: bool,
                                                         fix_checksums: bool, gzipped: bool) -> None:
    """No exact count here: a rewritten header can rename, resize or retype a member. Only calm is required."""
    data, _, members, _ = tar_bytes(plan.samples)
    buf, touched = bytearray(data), set()
    for where, offset, value in hits:
        if in_headers and members:
            header = members[where % len(members)][0]
            at = header + offset
            touched.add(header)
        else:
            at = where % len(buf)
        buf[at:at + len(value)] = value[:max(0, len(buf) - at)]
    if fix_checksums:  # hostile fields behind a valid checksum reach tarfile's field parsers
        for header in touched:
            buf[header + 148:header + 156] = b" " * 8
            buf[header + 148:header + 156] = b"%06o\0 " % sum(buf[header:header + 512])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("shard.tar.gz" if gzipped else "shard.tar")
        path.write_bytes(gzip.compress(bytes(buf), mtime=0) if gzipped else bytes(buf))
        ds = hostile_dataset([str(path)], tokenizer, max_consecutive_errors=None)
        with no_hang():
            samples = list(ds)
            with pytest.raises(SampleError) if ds.errors.skipped() else contextlib.nullcontext():
                list(hostile_dataset([str(path)], tokenizer, strict=True))
    assert set(ds.errors.counts) <= {kind.value for kind in ErrorKind} and ds.errors.counts["shard_read"] <= 1
    assert len(samples) + ds.errors.skipped() - ds.errors.counts["shard_read"] <= len(members)


def test_a_member_over_max_member_bytes_is_skipped_unread(tmp_path: Path) -> None:
    big = 16 << 20
    shard = tmp_path / "big.tar"
    members = (Planted("a", (("jpg", image_bytes("JPEG", 0)),), "image"),
               Planted("b", (("jpg", bytes(big)), ("cls", b"1")), "member_too_large"),
               Planted("c", (("jpg", image_bytes("JPEG", 1)),), "image"))
    shard.write_bytes(tar_bytes(members)[0])
    tracemalloc.start()
    try:
        raws = list(read_shard(str(shard), max_member_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["__key__"] for r in raws] == ["a", "b", "c"]
    assert "jpg" not in raws[1] and raws[1]["cls"] == b"1"
    assert [e.kind for e in raws[1]["__errors__"]] == [ErrorKind.MEMBER_TOO_LARGE]
    assert peak < 4 << 20  # the 16 MiB member was streamed past, never held

    ds = ShardDataset(str(shard), tokenizer=None, image_size=IMAGE_SIZE, max_member_bytes=1 << 20)
    assert [s.key for s in ds] == ["a", "c"] and ds.errors.counts == {"member_too_large": 1}
    ds = ShardDataset(str(shard), tokenizer=None, image_size=IMAGE_SIZE, max_member_bytes=big)
    assert [s.key for s in ds] == ["a", "c"] and ds.errors.counts == {"image_decode": 1}  # read, then not an image
    with pytest.raises(ValueError, match="max_member_bytes"):
        ShardDataset(str(shard), tokenizer=None, max_member_bytes=0)


def test_a_sample_cut_between_its_members_is_not_delivered_in_part(tmp_path: Path, tokenizer: Any) -> None:
    pair = Planted("p", (("jpg", image_bytes("JPEG", 0)), ("txt", b"a photo of a dog")), "image_text")
    data, _, members, _ = tar_bytes((Planted("a", (("jpg", image_bytes("JPEG", 1)),), "image"), pair))
    shard = tmp_path / "cut.tar"
    shard.write_bytes(data[:members[2][0] + 100])  # inside the header of p.txt: p.jpg is whole, p.txt is lost
    ds = ShardDataset(str(shard), tokenizer=tokenizer, image_size=IMAGE_SIZE)
    assert [(s.key, s.modality.value) for s in ds] == [("a", "image")]  # not ("p", "image")
    assert ds.errors.counts == {"shard_read": 1}


@pytest.mark.parametrize("into_header", [0, 100, 300])
def test_a_truncated_gzipped_shard_is_counted_not_silently_shorter(tmp_path: Path, into_header: int) -> None:
    samples = tuple(Planted(f"k{i}", (("jpg", image_bytes("JPEG", i)),), "image") for i in range(4))
    data, starts, _, _ = tar_bytes(samples)
    gz = gzip.compress(data, mtime=0)
    inflate, available = zlib.decompressobj(-zlib.MAX_WBITS), 0
    for cut in range(11, len(gz)):
        available += len(inflate.decompress(gz[cut - 1:cut]))  # what gz[:cut] inflates to
        if available > starts[2] + into_header:
            break
    assert available < starts[2] + 512  # k0 and k1 whole, then part of k2's header
    shard = tmp_path / "cut.tar.gz"
    shard.write_bytes(gz[:cut])
    ds = ShardDataset(str(shard), tokenizer=None, image_size=IMAGE_SIZE, retries=0)
    assert [s.key for s in ds] == ["k0"] and ds.errors.counts == {"shard_read": 1}


def hostile_header(name: str, size_field: bytes, type_flag: bytes = tarfile.REGTYPE) -> bytes:
    """A ustar header with any size field (12 bytes) and a valid checksum."""
    header = bytearray(tarfile.TarInfo(name).tobuf(tarfile.USTAR_FORMAT))
    header[124:136], header[156:157] = size_field, type_flag
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


@pytest.mark.parametrize("size_field", [b"\x80" + (1 << 80).to_bytes(11, "big"), b"77777777777\0"])
@pytest.mark.parametrize(("type_flag", "want"), [(tarfile.REGTYPE, ["a"]), (b"Z", [])])
def test_a_member_size_past_the_end_of_the_shard_does_not_hang(tmp_path: Path, size_field: bytes, type_flag: bytes,
                                                                want: list[str]) -> None:
    """Z is a type tarfile does not know: it skips its data like a file's, but it is no member of a sample, so it
    does not show that ``a`` was whole."""
    good, _, _, end = tar_bytes((Planted("a", (("jpg", image_bytes("JPEG", 0)),), "image"),))
    shard = tmp_path / "huge.tar"
    shard.write_bytes(good[:end] + hostile_header("b.jpg", size_field, type_flag) + bytes(4096))
    ds = ShardDataset(str(shard), tokenizer=None, image_size=IMAGE_SIZE)
    with no_hang(10):
        keys = [s.key for s in ds]
    assert keys == want and ds.errors.counts == {"shard_read": 1}


@pytest.mark.parametrize("head", [b"\x1f\x8b\x08", b"\x1f\x8b\x08\x04\0\0\0\0\0\xff",
                                  b"\x1f\x8b\x08\x04\0\0\0\0\0\xff\x07"])
def test_a_gzip_header_cut_short_is_a_shard_read_not_a_crash(tmp_path: Path, head: bytes) -> None:
    shard = tmp_path / "cut.tar.gz"
    shard.write_bytes(head)
    ds = ShardDataset(str(shard), tokenizer=None, image_size=IMAGE_SIZE, retries=0)
    assert list(ds) == [] and ds.errors.counts == {"shard_read": 1}
