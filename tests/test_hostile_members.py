"""Members the reader does not use, images that decode wrong unless handled, and memory bounded by bytes: each with
its smallest case (the hypothesis suite in test_hostile_input mixes them with every other kind of damage)."""

from __future__ import annotations

import gzip
import io
import random
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmload import SampleError, ShardDataset
from mmload.decode import decode_image
from mmload.inspect import inspect_shards
from mmload.reader import read_shard
from mmload.stages import KeySet, shuffle_shard
from tests.test_hostile_input import LINK, Planted, exif_jpeg, image_bytes, inflated_jpeg, png16, tar_bytes

JPG = image_bytes("JPEG", 0)


def shard(path: Path, *samples: Planted) -> str:
    path.write_bytes(tar_bytes(samples)[0])
    return str(path)


def read(url: str | list[str], tokenizer: object = None, **kwargs: object) -> tuple[list[tuple[str, str]], dict]:
    ds = ShardDataset(url, tokenizer=tokenizer, image_size=16, **kwargs)
    got = [(s.key, s.modality.value) for s in ds]
    return got, dict(ds.errors.counts)


@pytest.fixture(scope="module")
def tokenizer(builtin_shards: list[str]) -> object:
    return ShardDataset(builtin_shards).tokenizer


@pytest.mark.parametrize("link_type", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_a_pair_whose_image_is_a_link_is_skipped_whole_not_delivered_as_text(tmp_path: Path, link_type: bytes,
                                                                             tokenizer: object) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("a.jpg", JPG), ("a.txt", b"a dog")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("p.jpg")
        link.type, link.linkname = link_type, "a.jpg"
        tar.addfile(link)
        info = tarfile.TarInfo("p.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"a cat"))
    (tmp_path / "s.tar").write_bytes(buf.getvalue())
    got, errors = read(str(tmp_path / "s.tar"), tokenizer)
    assert got == [("a", "image_text")] and errors == {"link_member": 1}
    with pytest.raises(SampleError, match="p.jpg -> a.jpg is a link") as info:
        list(ShardDataset(str(tmp_path / "s.tar"), tokenizer=tokenizer, image_size=16, strict=True))
    assert (info.value.kind, info.value.key) == ("link_member", "p")


def test_a_lone_link_and_a_member_with_no_extension_are_counted(tmp_path: Path) -> None:
    url = shard(tmp_path / "s.tar", Planted("a", (("jpg", LINK),), "link_member"),
                Planted("b", (("", b"no extension"),), "missing_payload"),
                Planted("c", (("jpg", JPG),), "image"))
    assert read(url) == ([("c", "image")], {"link_member": 1, "missing_payload": 1})


def test_members_no_field_reads_are_counted_beside_a_delivered_sample(tmp_path: Path) -> None:
    url = shard(tmp_path / "s.tar", Planted("a", (("jpg", JPG), ("", b"x"), ("xyz", b"y"), ("png", png16(0))), "image"),
                Planted("b", (("jpg", JPG), ("foo", LINK)), "image"))
    got, errors = read(url)
    assert got == [("a", "image"), ("b", "image")] and errors == {"unused_member": 4}  # '', xyz, the 2nd image, foo
    # notices are no bad samples: strict does not raise, and they neither make nor break a run of bad samples
    assert len(list(ShardDataset(url, tokenizer=None, image_size=16, strict=True))) == 2
    ds = ShardDataset(url, tokenizer=None, image_size=16, max_consecutive_errors=1)
    assert len(list(ds)) == 2 and ds.errors.skipped() == 0


def test_a_16_bit_png_is_scaled_not_clipped_to_white() -> None:
    assert Image.open(io.BytesIO(png16(32768))).mode == "I;16"
    for value, want in ((0, 0), (32768, 128), (65535, 255)):
        assert decode_image(png16(value), 8).unique().tolist() == [want]


@pytest.mark.parametrize(("orientation", "top", "bottom"), [(1, None, None), (6, "blue", "red"), (8, "red", "blue")])
def test_exif_orientation_is_applied(orientation: int, top: str | None, bottom: str | None) -> None:
    """The stored image is 40x20, left half blue; orientation 6 shows it turned 90 degrees clockwise (left half on
    top), 8 counter-clockwise (left half at the bottom)."""
    pixels = decode_image(exif_jpeg(orientation), 16).float()
    colour = {"blue": (0, 0, 255), "red": (255, 0, 0)}
    if top is None:  # landscape: centre-cropped to its middle, where blue meets red
        assert pixels[:, :, 0].argmax(0).tolist() != pixels[:, :, -1].argmax(0).tolist()
        return
    for row, name in ((0, top), (-1, bottom)):
        got = pixels[:, row].mean(1).numpy()
        assert np.allclose(got, colour[name], atol=40), (orientation, row, got.tolist())


def test_a_jpeg_whose_header_claims_more_pixels_than_its_data_is_an_image_decode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="claims 7999x7999 pixels"):
        decode_image(inflated_jpeg(7999, 7999), 16)
    url = shard(tmp_path / "s.tar", Planted("a", (("jpg", inflated_jpeg(7999, 7999)),), "image_decode"))
    assert read(url) == ([], {"image_decode": 1})


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_large_flat_jpegs_are_not_taken_for_inflated_ones(mode: str, progressive: bool) -> None:
    """The bound is one bit an MCU: a uniform 4000x3000 image, the smallest real JPEG of its size, passes."""
    buf = io.BytesIO()
    Image.new(mode, (4000, 3000), 128 if mode == "L" else (128, 128, 128)).save(
        buf, format="JPEG", quality=1, progressive=progressive, optimize=True)
    assert decode_image(buf.getvalue(), 8).float().mean().round() == 128


def test_keys_repeated_across_shards_are_delivered_and_counted(tmp_path: Path) -> None:
    one = [Planted(f"k{i}", (("jpg", JPG),), "image") for i in range(3)]
    urls = [shard(tmp_path / "a.tar", *one), shard(tmp_path / "b.tar", *one[:2])]
    got, errors = read(urls)
    assert len(got) == 5 and errors == {"duplicate_key_across_shards": 2}
    report = inspect_shards(urls)
    assert report["samples"] == 5 and report["errors"] == {"duplicate_key_across_shards": 2}


def test_the_key_set_is_exact_below_its_limit_and_stops_remembering_at_it(caplog: pytest.LogCaptureFixture) -> None:
    keys = KeySet(limit=None)
    keys.MERGE = 7  # merged into the sorted array many times
    assert [keys.add(f"k{i}") for i in range(100)] == [False] * 100
    assert all(keys.add(f"k{i}") for i in range(100)) and len(keys) == 100
    bounded = KeySet(limit=10)
    assert not any(bounded.add(f"k{i}") for i in range(20)) and len(bounded) == 10
    assert bounded.add("k3") and not bounded.add("k15")  # remembered / never remembered
    assert sum("remembering no more keys after 10" in r.message for r in caplog.records) == 1


def test_a_sample_over_max_sample_bytes_is_skipped_and_not_held(tmp_path: Path) -> None:
    """24 members of 1 MiB, each under max_member_bytes: the sample is refused at the 5th, the rest streamed past."""
    big = Planted("b", tuple((f"m{i}.txt", bytes(1 << 20)) for i in range(24)), "sample_too_large")
    url = shard(tmp_path / "s.tar", Planted("a", (("jpg", JPG),), "image"), big, Planted("c", (("jpg", JPG),), "image"))
    tracemalloc.start()
    try:
        raws = list(read_shard(url, max_sample_bytes=4 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["__key__"] for r in raws] == ["a", "b", "c"] and peak < 8 << 20
    assert [e.kind for e in raws[1]["__errors__"]] == ["sample_too_large"]
    assert read(url, max_sample_bytes=4 << 20) == ([("a", "image"), ("c", "image")], {"sample_too_large": 1})
    with pytest.raises(ValueError, match="max_sample_bytes must be >= 1"):
        ShardDataset(url, tokenizer=None, max_sample_bytes=0)


def test_the_shuffle_buffer_holds_at_most_its_bytes(tmp_path: Path) -> None:
    sizes = [1 << 20] * 16 + [10] * 40 + [9 << 20] + [10] * 5  # 1 MiB texts, small ones, one larger than the bound
    held, most = 0, 0

    def raws():
        nonlocal held, most
        for i, n in enumerate(sizes):
            held += n
            most = max(most, held)
            yield {"__key__": f"k{i}", "txt": bytes(n)}

    out = []
    for raw in shuffle_shard(raws(), random.Random(0), buffer=1000, buffer_bytes=4 << 20):
        out.append(raw["__key__"])
        held -= len(raw["txt"])
    assert sorted(out) == sorted(f"k{i}" for i in range(len(sizes))) and out != sorted(out)
    assert most <= (4 << 20) + (9 << 20)  # the bound, plus the one sample that arrived over it
    with pytest.raises(ValueError, match="shuffle_buffer_bytes must be >= 1"):
        ShardDataset(shard(tmp_path / "s.tar", Planted("a", (("jpg", JPG),), "image")), tokenizer=None,
                     shuffle_buffer_bytes=0)


def test_skipping_a_huge_member_of_a_gzipped_shard_inflates_in_bounded_steps(tmp_path: Path) -> None:
    """tarfile's own gzip stream holds the whole output of each 10 KiB of compressed input (10 MiB for zeros) and
    slices it on every read; the reader's inflater returns at most what is asked."""
    data = tar_bytes((Planted("a", (("jpg", bytes(64 << 20)),), "member_too_large"),
                      Planted("b", (("jpg", JPG),), "image")))[0]
    path = tmp_path / "s.tar.gz"
    path.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    del data
    tracemalloc.start()
    try:
        raws = list(read_shard(str(path), max_member_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["__key__"] for r in raws] == ["a", "b"] and "jpg" in raws[1] and peak < 4 << 20


def test_a_gzip_shard_with_a_corrupt_deflate_stream_is_a_shard_read(tmp_path: Path) -> None:
    path = tmp_path / "s.tar.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 64)  # an invalid block type
    assert read(str(path), retries=0) == ([], {"shard_read": 1})


def test_a_plain_tar_is_not_taken_for_a_compressed_one_by_its_first_name(tmp_path: Path) -> None:
    """tarfile's own signatures: a member named like bzip2's or gzip's magic starts a plain tar."""
    for name in ("BZh91AY", "\x1f\x8bx"):
        url = shard(tmp_path / "s.tar", Planted(name, (("jpg", JPG),), "image"))
        assert read(url) == ([(name, "image")], {}), name


def test_a_resume_with_other_order_settings_is_refused(tmp_path: Path) -> None:
    url = shard(tmp_path / "s.tar", *(Planted(f"k{i}", (("jpg", JPG),), "image") for i in range(6)))
    ds = ShardDataset(url, tokenizer=None, image_size=16, shuffle=True, shuffle_buffer=4)
    it = iter(ds)
    next(it)
    state = ds.state_dict()
    again = ShardDataset(url, tokenizer=None, image_size=16, shuffle=True, shuffle_buffer=4,
                         shuffle_buffer_bytes=5000)
    again.load_state_dict(state)
    with pytest.raises(ValueError, match=r"shuffle_buffer_bytes=268435456 -> 5000"):
        next(iter(again))


def test_a_gzip_shard_with_a_file_name_in_its_header_is_read(tmp_path: Path) -> None:
    """``tar czf`` and ``gzip`` store the file name (FNAME) in the header: the inflater skips it."""
    data = tar_bytes((Planted("a", (("jpg", JPG),), "image"), Planted("b", (("jpg", JPG),), "image")))[0]
    path = tmp_path / "named.tar.gz"
    with path.open("wb") as f, gzip.GzipFile(filename="named.tar", fileobj=f, mode="wb", mtime=0) as out:
        out.write(data)
    assert path.read_bytes()[3] & 8  # FNAME is set
    assert read(str(path)) == ([("a", "image"), ("b", "image")], {})
