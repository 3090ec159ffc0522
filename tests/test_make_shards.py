"""make-shards: builtin data, folder and text import, the writer, the cache and the CLI; tars read with tarfile."""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmload import make_shards as ms
from mmload.shards import (
    CLASS_NAMES,
    builtin_records,
    folder_classes,
    folder_records,
    read_manifest,
    text_records,
    write_shards,
)


def read_tar(path: str | Path) -> dict[str, dict[str, bytes]]:
    """``{key: {ext: bytes}}`` of one shard, in tar order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def read_all(out: str | Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in read_manifest(out)["shards"]:
        samples.update(read_tar(Path(out) / shard["name"]))
    return samples


def meta(sample: dict[str, bytes]) -> dict:
    return json.loads(sample["json"])


def write_image(path: Path, fmt: str, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path, format=fmt)


# -- builtin -----------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    kw = {"samples": 60, "maxcount": 25, "vocab_size": 500, "progress": False}
    ms.make_shards(tmp_path / "a", seed=3, **kw)
    ms.make_shards(tmp_path / "b", seed=3, **kw)
    ms.make_shards(tmp_path / "c", seed=4, **kw)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["classes.json", "manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar",
                     "tokenizer.json", "tokenizer_config.json"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes(), name


def test_builtin_counts_members_and_manifest(builtin_shards: list[str]) -> None:
    out = Path(builtin_shards[0]).parent
    manifest = read_manifest(out)
    samples = read_all(out)
    modalities = Counter(meta(s)["modality"] for s in samples.values())
    assert modalities == {"image": 267, "text": 33}  # 300 samples at 8 images : 1 text
    assert manifest["samples"] == {"total": 300, "image": 267, "text": 33, "image_text": 0}
    assert manifest["source"] == "builtin" and manifest["seed"] == 0 and manifest["args"]["maxcount"] == 40
    assert manifest["num_classes"] == 10 and json.loads((out / "classes.json").read_text()) == list(CLASS_NAMES)
    assert list(samples) == sorted(samples) == [f"{i:09d}" for i in range(300)]
    for s in samples.values():
        if meta(s)["modality"] == "image":
            assert set(s) == {"jpg", "json", "cls"} and int(s["cls"]) == CLASS_NAMES.index(meta(s)["class_name"])
        else:
            assert set(s) == {"txt", "json"}
    counts = [shard["samples"] for shard in manifest["shards"]]
    assert counts == [40] * 7 + [20]  # maxcount respected, only the last shard short
    for shard, url in zip(manifest["shards"], builtin_shards):
        assert len(read_tar(url)) == shard["samples"] and Path(url).stat().st_size == shard["bytes"]


@pytest.mark.parametrize(("ratio", "texts"), [(8.0, 10), (2.0, 30), (0.0, 90), (float("inf"), 0)])
def test_builtin_ratio(ratio: float, texts: int) -> None:
    records = list(builtin_records(90, seed=1, image_text_ratio=ratio, max_side=96))
    assert sum(r["json"]["modality"] == "text" for r in records) == texts
    assert len(records) == 90


def test_builtin_image_sizes_vary_and_class_survives_32px(builtin_shards: list[str]) -> None:
    images = [s for url in builtin_shards for s in read_tar(url).values() if "jpg" in s]
    sizes, labels, hues = [], [], []
    for s in images:
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and list(img.size) == [meta(s)["width"], meta(s)["height"]]
        sizes.append(img.size)
        labels.append(int(s["cls"]))
        hsv = np.asarray(img.convert("RGB").resize((32, 32)).convert("HSV"), dtype=np.float64)
        vivid = hsv[..., 1] >= np.percentile(hsv[..., 1], 90)  # the shape's pixels, not the grey background
        angle = hsv[..., 0][vivid] / 256 * 2 * np.pi
        hues.append(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean()) / (2 * np.pi) % 1.0)
    w, h = np.array(sizes).T
    assert min(w.min(), h.min()) >= 64 and max(w.max(), h.max()) <= 800
    assert min(w.min(), h.min()) < 128 and max(w.max(), h.max()) > 500  # spans the range
    assert len(set(sizes)) > 0.9 * len(sizes) and np.mean(w != h) > 0.9  # varied, mostly not square
    assert set(labels) == set(range(10))
    # the class decides the hue: reading it back from a 32 px thumbnail recovers the class
    assert np.mean(np.round(np.array(hues) * 10).astype(int) % 10 == np.array(labels)) > 0.9


def test_builtin_text_lengths_heavy_tailed() -> None:
    texts = [r for r in builtin_records(500, seed=0, image_text_ratio=0.0)]
    words = np.array([len(r["txt"].split()) for r in texts])
    assert all(r["json"]["num_words"] == n for r, n in zip(texts, words))
    assert words.min() >= 5 and words.max() <= 512
    assert 35 <= np.median(words) <= 65
    assert words.max() > 250 and np.percentile(words, 95) > 3 * np.median(words)  # a long tail
    assert words.min() <= 12
    assert len({r["txt"] for r in texts}) == 500


@pytest.mark.parametrize("kw", [{"samples": 0}, {"seed": -1}, {"image_text_ratio": -1.0},
                                {"image_text_ratio": float("nan")}, {"min_side": 900}, {"text_len_median": 0}])
def test_builtin_bad_args(kw: dict) -> None:
    args = {"samples": 10, "seed": 0, **kw}
    with pytest.raises(ValueError, match=next(iter(kw))):
        builtin_records(**args)


# -- writer --------------------------------------------------------------------------------------------------------


def test_writer_maxsize_rolls_over(tmp_path: Path) -> None:
    records = list(builtin_records(30, seed=0, image_text_ratio=float("inf"), min_side=128, max_side=256))
    manifest = write_shards(records, tmp_path, maxcount=1000, maxsize=20_000)
    assert len(manifest["shards"]) > 3 and sum(s["samples"] for s in manifest["shards"]) == 30
    biggest = max(len(r["jpg"]) + len(json.dumps(r["json"])) + 8 for r in records)
    for shard in manifest["shards"]:
        payload = sum(len(v) for s in read_tar(tmp_path / shard["name"]).values() for v in s.values())
        assert payload < 20_000 + biggest  # closes once it reaches maxsize: over by one sample at most


@pytest.mark.parametrize(("records", "match"), [
    ([{"__key__": "a", "txt": "x", "json": {}}], "modality"),
    ([{"__key__": "a", "txt": "x", "json": {"modality": "sound"}}], "sound"),
    ([{"__key__": "a.b", "txt": "x", "json": {"modality": "text"}}], "key"),
    ([{"__key__": "a", "json": {"modality": "text"}}], "payload"),
    ([{"__key__": "a", "jpg": b"x", "json": {"modality": "text"}}], "does not match"),
    ([{"__key__": "a", "txt": "x", "cls": 1, "json": {"modality": "text"}}], "cls"),
    ([{"__key__": "a", "txt": "x", "json": {"modality": "text"}}] * 2, "not unique"),
    ([], "no records"),
])
def test_writer_rejects_bad_records(tmp_path: Path, records: list[dict], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_shards(records, tmp_path)
    assert not (tmp_path / "manifest.json").exists()
    if not records:
        assert list(tmp_path.iterdir()) == []  # no empty shard left behind


# -- folder and text import ------------------------------------------------------------------------------------------


def test_folder_images_with_sidecars(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_image(src / "b.png", "PNG")
    write_image(src / "a.jpg", "JPEG", (70, 50))
    (src / "a.txt").write_text("a red box on a table\n", encoding="utf-8")
    write_image(src / "c.webp", "WEBP")
    (src / "c.json").write_text('{"url": "http://example.com/c", "modality": "ignored"}', encoding="utf-8")
    write_image(src / "d.JPEG", "JPEG")
    (src / "notes.md").write_text("not an image", encoding="utf-8")
    (src / ".hidden.jpg").write_bytes(b"junk")
    manifest = ms.make_shards(tmp_path / "out", "folder", src, vocab_size=300, progress=False)
    assert manifest["samples"] == {"total": 4, "image": 3, "image_text": 1, "text": 0}
    assert manifest["tokenizer"]["trained_on"] == "texts+pydoc" and manifest["num_classes"] == 0
    assert not (tmp_path / "out" / "classes.json").exists()
    samples = list(read_all(tmp_path / "out").values())
    assert [meta(s)["source_path"] for s in samples] == ["a.jpg", "b.png", "c.webp", "d.JPEG"]
    assert [sorted(s) for s in samples] == [["jpg", "json", "txt"], ["json", "png"], ["json", "webp"],
                                            ["jpg", "json"]]
    assert samples[0]["txt"] == b"a red box on a table" and meta(samples[0])["modality"] == "image_text"
    assert (meta(samples[0])["width"], meta(samples[0])["height"]) == (70, 50)
    assert samples[1]["png"] == (src / "b.png").read_bytes()  # kept as is
    assert meta(samples[2]) | {"url": "http://example.com/c", "modality": "image"} == meta(samples[2])


def test_folder_class_subfolders(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in ("dog/2.jpg", "dog/1.png", "cat/x.jpg", "bird/y.jpg"):
        write_image(src / name, "PNG" if name.endswith("png") else "JPEG")
    (src / "empty").mkdir()
    assert folder_classes(src) == ["bird", "cat", "dog"]
    ms.make_shards(tmp_path / "out", "folder", src, progress=False)
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["bird", "cat", "dog"]
    samples = list(read_all(tmp_path / "out").values())
    assert [(meta(s)["source_path"], int(s["cls"]), meta(s)["class_name"]) for s in samples] == [
        ("bird/y.jpg", 0, "bird"), ("cat/x.jpg", 1, "cat"), ("dog/1.png", 2, "dog"), ("dog/2.jpg", 2, "dog")]


def test_text_import_file_and_folder(tmp_path: Path) -> None:
    lines = tmp_path / "lines.txt"
    lines.write_text("first text\n\n  second text  \n\nthird\n", encoding="utf-8")
    assert [(r["txt"], r["json"]["source_path"]) for r in text_records(lines)] == [
        ("first text", "lines.txt:1"), ("second text", "lines.txt:3"), ("third", "lines.txt:5")]
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("Bee text.", encoding="utf-8")
    (folder / "sub" / "a.txt").write_text("Ay\ntext with two lines", encoding="utf-8")
    (folder / "empty.txt").write_text("\n", encoding="utf-8")
    (folder / ".git").mkdir()
    (folder / ".git" / "x.txt").write_text("hidden", encoding="utf-8")
    manifest = ms.make_shards(tmp_path / "out", "text", folder, progress=False)
    assert manifest["samples"] == {"total": 2, "image": 0, "image_text": 0, "text": 2}
    assert [(s["txt"], meta(s)["source_path"]) for s in read_all(tmp_path / "out").values()] == [
        (b"Bee text.", "b.txt"), (b"Ay\ntext with two lines", "sub/a.txt")]


def test_import_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        folder_records(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        text_records(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        folder_records(tmp_path / "empty")
    with pytest.raises(ValueError, match="no non-empty texts"):
        text_records(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    write_image(mixed / "a.jpg", "JPEG")
    write_image(mixed / "cls" / "b.jpg", "JPEG")
    with pytest.raises(ValueError, match="one layout"):
        folder_records(mixed)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot read image"):
        list(folder_records(broken))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="no images"):
        ms.make_shards(tmp_path / "out", "folder", tmp_path / "empty", progress=False)
    assert not (tmp_path / "out").exists()  # checked before OUT is made


# -- make_shards arguments, overwrite, cache ------------------------------------------------------------------------


@pytest.mark.parametrize(("kw", "match"), [
    ({"source": "web"}, "source"),
    ({"path": "x"}, "no path"),
    ({"source": "folder"}, "needs a PATH"),
    ({"samples": 0}, "samples"),
    ({"image_text_ratio": -2.0}, "image_text_ratio"),
    ({"maxcount": 0}, "maxcount"),
    ({"maxsize": 0}, "maxsize"),
    ({"vocab_size": 3}, "vocab_size"),
])
def test_make_shards_bad_args(tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ms.make_shards(tmp_path / "out", **{"samples": 5, "progress": False, **kw})
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_make_shards_refuses_non_empty_out_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ms.make_shards(out, samples=12, maxcount=4, vocab_size=200, progress=False)
    (out / "README").write_text("mine", encoding="utf-8")
    with pytest.raises(FileExistsError, match="--overwrite"):
        ms.make_shards(out, samples=12, progress=False)
    manifest = ms.make_shards(out, samples=12, maxcount=100, vocab_size=200, overwrite=True, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"] == [s["name"] for s in manifest["shards"]]
    assert (out / "README").read_text(encoding="utf-8") == "mine"  # not ours: kept
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(FileExistsError, match="is a file"):
        ms.make_shards(tmp_path / "file", samples=5, progress=False)


def test_cached_builtin_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMLOAD_CACHE", str(tmp_path / "cache"))
    urls = ms.cached_builtin_shards(samples=20, maxcount=8, vocab_size=200, progress=False)
    folder = tmp_path / "cache" / "builtin-20-0-8"
    assert urls == [str(folder / f"shard-00000{i}.tar") for i in range(3)]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["builtin-20-0-8"]  # no temp folder left
    keys = {key for url in urls for key in read_tar(url)}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("cache hit expected")

    monkeypatch.setattr(ms, "make_shards", refuse)
    assert ms.cached_builtin_shards(samples=20, maxcount=8, vocab_size=200) == urls
    monkeypatch.undo()
    # other arguments, same folder: rebuilt in place
    urls = ms.cached_builtin_shards(folder, samples=20, maxcount=100, vocab_size=200, progress=False)
    assert urls == [str(folder / "shard-000000.tar")] and read_manifest(folder)["args"]["maxcount"] == 100
    assert set(read_tar(urls[0])) == keys  # same data, other sharding
    Path(urls[0]).write_bytes(b"truncated")  # a damaged cache is rebuilt
    assert Path(ms.cached_builtin_shards(folder, samples=20, maxcount=100, vocab_size=200,
                                         progress=False)[0]).stat().st_size > 1000
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(FileExistsError, match="not mmload builtin shards"):
        ms.cached_builtin_shards(mine, samples=20)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


# -- CLI ---------------------------------------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmload")
    ms.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["make-shards", *argv])


def test_cli_parses_source_path_both_ways(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    texts = tmp_path / "t.txt"
    texts.write_text("one\ntwo\n", encoding="utf-8")
    for i, argv in enumerate([("--source", "text", str(texts)), ("--source", "text", "--path", str(texts))]):
        args = parse(str(tmp_path / f"out{i}"), *argv, "--max-shard-bytes", "1MiB", "--vocab-size", "300")
        assert (args.source, args.maxsize, args.func) == ("text", 2**20, ms.run)
        args.quiet = True
        assert args.func(args) is None
        assert "wrote 2 samples (text 2) in 1 shards" in capsys.readouterr().out
    args = parse(str(tmp_path / "out"))
    assert (args.source, args.source_path, args.path, args.samples, args.maxcount) == (
        "builtin", None, None, None, 1000)
    assert parse("o", "--max-shard-bytes", "500MB").maxsize == 500_000_000


@pytest.mark.parametrize("argv", [("--source", "web"), ("--source", "text", "a", "b"), ("--max-shard-bytes", "lots")])
def test_cli_rejects_at_parse_time(argv: tuple[str, ...], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        parse("out", *argv)
    assert exc.value.code == 2 and "make-shards" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "match"), [
    (("--source", "folder"), "needs a PATH"),
    (("--source", "builtin", "somewhere"), "takes no path"),
    (("--source", "text", "a.txt", "--path", "b.txt"), "two paths"),
    (("--source", "text", "a.txt", "--seed", "3"), "--seed: options of --source builtin"),
    (("--source", "text", "missing.txt"), "does not exist"),
    (("--samples", "0"), "samples must be >= 1"),
])
def test_cli_reports_bad_arguments(tmp_path: Path, argv: tuple[str, ...], match: str,
                                   capsys: pytest.CaptureFixture) -> None:
    from mmload.cli import main

    assert main(["make-shards", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmload make-shards: error:") and match in err and len(err.splitlines()) == 1


# -- atomic outputs ---------------------------------------------------------------------------------------------------


def enospc(after: int):
    """A ``TarWriter.write`` that fills the disk after ``after`` records."""
    import errno

    from webdataset import TarWriter

    real, calls = TarWriter.write, [0]

    def write(self, obj):
        calls[0] += 1
        if calls[0] > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, obj)

    return write


def test_a_full_disk_leaves_whole_shards_no_partial_one_and_no_manifest(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from unittest import mock

    from mmload.cli import main

    out = tmp_path / "out"
    argv = ["make-shards", str(out), "--samples", "50", "--max-samples-per-shard", "20"]
    with mock.patch("webdataset.TarWriter.write", enospc(after=30)):
        assert main(["-q", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mmload make-shards: error: [Errno 28] No space left on device"]
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]  # whole; the one being written is gone
    assert len(read_tar(out / "shard-000000.tar")) == 20
    assert main(["-q", *argv]) == 2  # the rerun names what it found
    assert "holds a partial earlier run (shards but no manifest.json)" in capsys.readouterr().err
    assert main(["-q", *argv, "--overwrite"]) == 0
    assert read_manifest(out)["samples"]["total"] == 50 and not list(out.glob("*.partial"))


def test_the_manifest_is_written_last_and_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed after the shards (here: in the tokenizer's save) leaves no manifest that lacks the tokenizer;
    a manifest write that fails leaves the old file whole."""
    from mmload.manifest import write_json

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ms, "save_tokenizer", killed)
        with pytest.raises(KeyboardInterrupt):
            ms.make_shards(tmp_path / "a", samples=20, progress=False)
    assert list((tmp_path / "a").glob("shard-*.tar")) and not (tmp_path / "a" / "manifest.json").exists()
    with pytest.raises(FileExistsError, match="partial earlier run"):
        ms.make_shards(tmp_path / "a", samples=20, progress=False)

    path = tmp_path / "m.json"
    write_json(path, {"old": 1})
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        write_json(path, {"new": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": 1} and [p.name for p in tmp_path.glob("*m.json*")] == ["m.json"]


def test_a_record_that_fails_mid_shard_leaves_no_partial_shard(tmp_path: Path) -> None:
    def records():
        yield from builtin_records(5, seed=0)
        raise RuntimeError("the source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        write_shards(records(), tmp_path, maxcount=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]
    with pytest.raises(FileExistsError, match="partial earlier run"):
        from mmload.shards.writer import prepare_out

        prepare_out(tmp_path, False, ("shard-*.tar",))
    (tmp_path / "shard-000001.tar.partial").write_bytes(b"cut")
    with pytest.raises(FileExistsError, match=r"1 partial files \(shard-000001.tar.partial"):
        prepare_out(tmp_path, False, ("shard-*.tar",))
    prepare_out(tmp_path, True, ("shard-*.tar",))
    assert list(tmp_path.iterdir()) == []
