"""Drop-in for anyone's data: raw samples into every collator, the bundled tokenizer, Hugging Face models out."""

from __future__ import annotations

import io
import itertools
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_exactly_once
from PIL import Image
from torch.utils.data import DataLoader

from mmload import (
    BucketBatcher,
    EmbeddingCollator,
    ModalityBucketBatchSampler,
    NestedCollator,
    PaddedCollator,
    PerSampleCollator,
    Sample,
)
from mmload.decode import Decoder, decode_image
from mmload.layouts import IMAGENET_MEAN, IMAGENET_STD
from mmload.masking import MLMMasking
from mmload.raw import RawInput
from mmload.tokenizer import LazyDefault, default_tokenizer

SIZE = 32
README = Path(__file__).parent.parent / "README.md"


def picture(w: int = 64, h: int = 48, seed: int = 0, mode: str = "RGB") -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    rgb = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
    return rgb.convert(mode)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def mixed_raw() -> list[Any]:
    """One of every accepted form: dicts (ours and webdataset's names), tuples, a Sample."""
    return [
        {"image": picture(64, 48, 0), "text": "A car parked on the street.", "label": 3, "key": "dict-pair"},
        {"text": "a red house under a blue sky"},
        {"jpg": picture(30, 90, 1), "cls": 7, "__key__": "wds-image", "__url__": "x.tar"},
        {"txt": "two people on the beach", "json": {"label": 2}, "__key__": "wds-text"},
        (torch.rand(3, 40, 40), "noise, as floats"),
        (np.asarray(picture(50, 20, 2)), 5),
        {"input_ids": [101, 1037, 2482, 102], "key": "ids"},
        Sample("already", "image", pixels=torch.zeros(3, SIZE, SIZE, dtype=torch.uint8), label=1),
    ]


def fields(s: Sample) -> tuple:
    return (s.key, s.modality, None if s.pixels is None else s.pixels.tolist(),
            None if s.ids is None else s.ids.tolist(), s.label)


# ---- raw samples in ----

@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_every_image_form_decodes_as_the_reader_decodes_the_file(mode: str) -> None:
    img = picture(64, 40, 3, mode)
    want = decode_image(png(img), SIZE)  # the reader's path for the same image stored in a shard
    arr = np.array(img)
    chw = torch.from_numpy(arr if arr.ndim == 3 else arr[:, :, None]).permute(2, 0, 1)
    forms = [{"image": img}, {"png": img}, {"image": png(img)}, {"image": arr}, {"image": chw},
             {"image": chw.float() / 255}, (img, "a caption"), (img, 4)]
    raw = RawInput(image_size=SIZE)
    for i, form in enumerate(forms):
        assert torch.equal(raw.to_sample(form, i).pixels, want), (i, type(form))


def test_texts_are_tokenized_as_the_reader_tokenizes_a_txt_member() -> None:
    tok = default_tokenizer()
    reader = Decoder(tok, max_text_len=8)
    text = "The quick brown fox jumps over the lazy dog"
    want = reader({"__key__": "k", "txt": text.encode()}).ids
    raw = RawInput(max_text_len=8)
    for form in ({"text": text}, {"txt": text}, {"txt": text.encode()}, (picture(), text)):
        assert torch.equal(raw.to_sample(form).ids, want) and len(want) == 8
    assert raw.to_sample({"input_ids": torch.tensor([101, 7, 8, 9, 102])}).ids.tolist() == [101, 7, 8, 9, 102]
    assert raw.to_sample({"input_ids": np.arange(3, 20)}).ids.numel() == 17  # given ids are never truncated


def test_labels_keys_and_generated_keys() -> None:
    raw = RawInput(image_size=SIZE)
    img = picture()
    for form, label in (({"image": img, "label": 3}, 3), ({"jpg": img, "cls": "4"}, 4), ({"jpg": img, "cls": b"5"}, 5),
                        ({"jpg": img, "json": {"label": 6}}, 6), ({"jpg": img, "json": b'{"label": 7}'}, 7),
                        ({"image": img, "label": np.int64(8)}, 8), ((img, 9), 9), ({"image": img}, -100)):
        assert raw.to_sample(form).label == label, form
    assert raw.to_sample({"image": img, "key": "mine"}).key == "mine"
    assert raw.to_sample({"image": img, "__key__": 12}).key == "12"
    generated = raw.to_sample({"image": img}).key
    assert re.fullmatch(r"raw-[0-9a-f]{16}", generated)
    assert RawInput(image_size=SIZE).to_sample((img, 0), 5).key != generated  # the label is part of the content
    assert RawInput(image_size=SIZE).to_sample({"image": img}, 9).key == generated  # content, not position
    assert raw.to_sample({"image": picture(seed=1)}).key != generated


def test_every_collator_but_embeddings_takes_raw_samples_and_all_agree() -> None:
    data = mixed_raw()
    want = [fields(s) for s in RawInput(image_size=SIZE).to_samples(data)]
    assert [w[0] for w in want][:2] == ["dict-pair", want[1][0]] and want[1][0].startswith("raw-")
    assert [str(w[1]) for w in want] == ["image_text", "text", "image", "text", "image_text", "image", "text",
                                         "image"]
    for collate in (PaddedCollator(image_size=SIZE), PaddedCollator(image_size=SIZE, pack=True),
                    NestedCollator(image_size=SIZE), NestedCollator(image_size=SIZE, pack=False),
                    PerSampleCollator(image_size=SIZE), PerSampleCollator(image_size=SIZE, pack=True)):
        assert [fields(s) for s in collate(data).unbatch()] == want, collate
    with pytest.raises(TypeError, match="EmbeddingCollator takes mmload.Sample with precomputed embeddings"):
        EmbeddingCollator()(data)


def test_the_default_tokenizer_loads_only_for_texts() -> None:
    collate = PaddedCollator(image_size=SIZE)
    collate([{"image": picture()}, {"input_ids": [1, 2, 3]}])
    assert isinstance(collate._decoder().tokenizer, LazyDefault)
    collate([{"text": "now a text"}])
    assert collate._decoder().tokenizer is default_tokenizer()


@pytest.mark.parametrize(("sample", "error", "message"), [
    ({"image": "cat.jpg"}, TypeError, r"raw sample 1: field 'image': expected a PIL image"),
    ({"image": torch.rand(3, 8, 8) * 2}, ValueError, r"raw sample 1: field 'image': .*in \[0, 1\], got \[0"),
    ({"image": torch.zeros(8, 8, 3, dtype=torch.uint8)}, ValueError, r"field 'image': an image tensor must be CHW"),
    ({"image": np.zeros((3, 8, 8), np.uint8)}, ValueError, r"field 'image': .*it looks CHW"),
    ({"image": np.zeros((8, 8, 3), np.float32)}, ValueError, r"field 'image': an image array must be HWC .*uint8"),
    ({"image": torch.zeros(3, 8, 8, dtype=torch.int32)}, ValueError, r"field 'image': .*uint8 or float"),
    ({"jpg": b"not a jpeg"}, ValueError, r"raw sample 1: field 'jpg': UnidentifiedImageError"),
    ({"text": "   "}, ValueError, r"raw sample 1: field 'text': empty text"),
    ({"txt": b"\xff\xfe"}, ValueError, r"raw sample 1: field 'txt': not UTF-8"),
    ({"text": 42}, TypeError, r"raw sample 1: field 'text': expected a str, got int"),
    ({"input_ids": [1.5, 2]}, TypeError, r"field 'input_ids': expected a list or tensor of ints"),
    ({"input_ids": torch.tensor([1.0])}, ValueError, r"field 'input_ids': token ids must be integers"),
    ({"input_ids": []}, ValueError, r"field 'input_ids': token ids must be a non-empty 1-D"),
    ({"input_ids": [-1, 3]}, ValueError, r"field 'input_ids': token ids must be in \[0, 2\*\*31\), got -1"),
    ({"text": "a", "input_ids": [1]}, ValueError, r"raw sample 1: .*keep one"),
    ({"image": picture(), "png": picture()}, ValueError, r"fields 'image' and 'png' both give"),
    ({"text": "a", "label": "cat"}, TypeError, r"field 'label': a label must be an int"),
    ({"text": "a", "cls": "cat"}, ValueError, r"raw sample 1: field 'cls': bad .cls"),
    ({"text": "a", "json": b"{oops"}, ValueError, r"raw sample 1: field 'json': bad .json"),
    ({"caption": "a", "img": 1}, ValueError, r"raw sample 1: no image, text or input_ids field \(has \['caption', "),
    ((picture(), "a", 3), TypeError, r"raw sample 1: a tuple must be \(image, text\) or \(image, label\), got 3"),
    ((picture(), 1.5), TypeError, r"raw sample 1: a tuple .* its second item is float"),
    ("a bare string", TypeError, r"raw sample 1: expected an mmload.Sample, a dict"),
])
def test_a_bad_raw_sample_names_its_index_and_field(sample: Any, error: type, message: str) -> None:
    for collate in (PaddedCollator(image_size=SIZE), NestedCollator(image_size=SIZE),
                    PerSampleCollator(image_size=SIZE)):
        with pytest.raises(error, match=message):
            collate([{"text": "a good one first"}, sample])


def test_fields_nobody_reads_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="mmload"):
        PaddedCollator(image_size=SIZE)([{"image": picture(), "caption": "lost?", "id": 1}] * 3)
    said = [r.getMessage() for r in caplog.records if "are not read" in r.getMessage()]
    assert len(said) == 1 and "['caption', 'id']" in said[0]


def test_a_map_style_dataset_of_dicts_through_dataloader_workers() -> None:
    data = [{"image": picture(40 + i, 30, i), "label": i % 3} if i % 3 else {"text": f"caption number {i}"}
            for i in range(24)]
    keys = [s.key for s in RawInput(image_size=SIZE).to_samples(data)]
    for collate in (PaddedCollator(image_size=SIZE), NestedCollator(image_size=SIZE)):
        loader = DataLoader(data, batch_size=5, num_workers=2, collate_fn=collate)
        assert_exactly_once(loader, keys)


def test_modality_bucket_sampler_from_a_dataset_of_raw_samples() -> None:
    words = "one two three four five six seven eight nine ten eleven twelve".split()
    data = [{"text": " ".join([str(i), *words[:i % 12]])} if i % 2 else (picture(seed=i), i % 4) for i in range(40)]
    sampler = ModalityBucketBatchSampler.from_dataset(data, 4, pool_batches=2, shuffle=True, seed=1)
    collate = PaddedCollator(image_size=SIZE)
    batches = list(DataLoader(data, batch_sampler=sampler, collate_fn=collate))
    keys = [s.key for s in RawInput(image_size=SIZE).to_samples(data)]
    assert_exactly_once(batches, keys)
    assert sum(len(b.keys) < 4 for b in batches) <= 2  # full, but the last of each modality
    for b in batches:
        assert (b.image is None) != (b.text is None)  # one modality per batch
        if b.text is not None:  # of a length-sorted pool of 2 batches: the shorter or the longer half
            lengths = b.text.mask.sum(1)
            assert int(lengths.max() - lengths.min()) <= 11
    assert len(sampler) == len(batches)


def _wds_shard(path: Path, n: int = 20) -> tuple[str, list[str]]:
    """A shard as a webdataset user has it: jpg/png + txt + cls + json members; every third sample a text."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            key = f"s{i:04d}"
            keys.append(key)
            members = [("txt", f"caption {i} " * (1 + i % 5)), ("json", json.dumps({"source": "web"}))]
            if i % 3:
                img = picture(48, 36, i)
                members += [("png", png(img)) if i % 2 else ("jpg", _jpeg(img)), ("cls", str(i % 4))]
            for ext, data in members:
                data = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path), keys


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_a_webdataset_pipeline_decoded_to_pil_into_collators_and_the_bucket_stage(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    from mmload import ShardDataset

    url, keys = _wds_shard(tmp_path / "w.tar")
    # image_size 40 of 48 px sources: the reader's JPEG draft does not reduce, so PIL-decoded pixels agree exactly
    reader = {s.key: fields(s) for s in ShardDataset(url, image_size=40, tokenizer=default_tokenizer())}
    pipeline = wds.WebDataset(url, shardshuffle=False).decode("pil")
    got = {s.key: fields(s) for b in pipeline.batched(6, collation_fn=NestedCollator(image_size=40))
           for s in b.unbatch()}
    assert got == reader
    stage = wds.WebDataset(url, shardshuffle=False).decode("pil").compose(BucketBatcher(4, image_size=40))
    batches = list(DataLoader(stage.map(PaddedCollator()), batch_size=None, num_workers=1))
    assert_exactly_once(batches, keys)
    assert all((b.image is None) or (b.text is None) or len(b.image) == len(b.text) for b in batches)


# ---- the README's three raw-data examples ----

def readme_block(marker: str) -> str:
    blocks = README.read_text().split("```python\n")[1:]
    found = [b.split("```", 1)[0] for b in blocks if marker in b.split("\n", 1)[0]]
    assert len(found) == 1, f"README has {len(found)} python blocks starting with {marker!r}"
    return found[0]


def test_readme_map_style_example_runs(capsys: pytest.CaptureFixture) -> None:
    exec(compile(readme_block("# a map-style dataset of dicts"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.count("PaddedBatch(") == 2, out


def test_readme_webdataset_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("webdataset")
    urls = [_wds_shard(tmp_path / f"{i:05d}.tar")[0] for i in range(4)]  # a shard for each of the 4 workers
    code = readme_block("# a webdataset pipeline")
    code, n = re.subn(r'^urls = .*$', f"urls = {urls!r}", code, count=1, flags=re.M)
    assert n == 1
    code = code.replace("for batch in loader:", "for batch in itertools.islice(loader, 2):")
    exec(compile(code, "README.md", "exec"), {"itertools": itertools})
    assert capsys.readouterr().out.count("PackedBatch(") == 2


def test_readme_pairs_example_runs(capsys: pytest.CaptureFixture) -> None:
    exec(compile(readme_block("# a list of (image, text) pairs"), "README.md", "exec"), {})
    assert "NestedBatch(" in capsys.readouterr().out


# ---- Hugging Face models out ----

SENTENCES = ["A dog runs across the beach.", "Hi",
             "The quick brown fox jumps over the lazy dog while the cat watches from a sunny window sill.",
             "Unified foundation models share one encoder between pixels and word pieces."]


@torch.no_grad()
def test_a_padded_batch_feeds_a_transformers_bert_model(minilm: str) -> None:
    """Hidden states of texts collated by mmload (mixed with images, in another order, padded to a multiple of 8)
    equal those of the same texts tokenized and padded by HF, to 1e-5."""
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel.from_pretrained(minilm).eval()
    theirs = transformers.AutoTokenizer.from_pretrained(minilm)(SENTENCES, padding=True, return_tensors="pt")
    want = model(**theirs).last_hidden_state  # (4, T, D)
    data = [{"image": picture()}, {"text": SENTENCES[2]}, {"text": SENTENCES[0]}, (picture(seed=1), SENTENCES[3]),
            {"text": SENTENCES[1]}]
    order = [2, 0, 3, 1]  # the sentence each text row of `data` holds, in row order
    for collate in (PaddedCollator(image_size=SIZE, pad_to_multiple_of=8), PaddedCollator(image_size=SIZE, pack=True),
                    NestedCollator(image_size=SIZE)):
        batch = collate(data)
        batch = batch.to("cpu") if hasattr(batch, "buffer") else batch  # a packed batch: what .to(device) gives
        text = batch.text.padded()
        inputs = text.hf_inputs()
        assert set(inputs) == {"input_ids", "attention_mask"} and inputs["input_ids"].dtype == torch.int64
        got = model(**inputs).last_hidden_state
        assert text.index.tolist() == [1, 2, 3, 4]  # rows map back to positions in `data`
        for row, sentence in enumerate(order):
            n = int(theirs["attention_mask"][sentence].sum())
            assert torch.equal(inputs["input_ids"][row, :n], theirs["input_ids"][sentence, :n])
            torch.testing.assert_close(got[row, :n], want[sentence, :n], atol=1e-5, rtol=1e-5)


def test_nested_hf_inputs_are_the_flattened_form_of_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    tok = default_tokenizer()
    batch = NestedCollator(pack=False)([{"text": s} for s in SENTENCES])
    ours = batch.text.hf_inputs()
    theirs = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": tok(s)["input_ids"]} for s in SENTENCES])
    assert set(ours) == {"input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                         "max_length_k"}
    for name in ours:
        a, b = ours[name], theirs[name]
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), name
        else:
            assert a == b, name


def test_labels_when_masking_ran_and_token_types_for_pairs() -> None:
    tok = default_tokenizer()
    masking = MLMMasking.from_tokenizer(tok, seed=0, prob=0.3)
    raw = RawInput()
    samples = [masking(raw.to_sample({"text": s, "key": str(i)})) for i, s in enumerate(SENTENCES)]
    padded, nested = PaddedCollator()(samples), NestedCollator(pack=False)(samples)
    for inputs in (padded.text.hf_inputs(), nested.text.hf_inputs()):
        labels = inputs["labels"].reshape(-1)
        assert labels.dtype == torch.int64 and int((labels != -100).sum()) == sum(
            int((s.mlm_labels != -100).sum()) for s in samples)
    assert bool((padded.text.hf_inputs()["labels"][~padded.text.mask] == -100).all())  # no loss on padding
    assert "labels" not in PaddedCollator()([raw.to_sample({"text": "unmasked"})]).text.hf_inputs()
    pairs = [tok(a, b)["input_ids"] for a, b in [("a dog", "runs fast"), ("hi", "there you are")]]
    types = [tok(a, b, return_token_type_ids=True)["token_type_ids"] for a, b in [("a dog", "runs fast"),
                                                                                 ("hi", "there you are")]]
    batch = PaddedCollator()([{"input_ids": p} for p in pairs])
    got = batch.text.hf_inputs(sep_id=tok.sep_token_id)["token_type_ids"]
    assert [got[r, :len(t)].tolist() for r, t in enumerate(types)] == types
    assert int(got[~batch.text.mask].sum()) == 0
    flat = NestedCollator(pack=False)([{"input_ids": p} for p in pairs]).text.hf_inputs(sep_id=tok.sep_token_id)
    assert flat["token_type_ids"].tolist() == [sum(types, [])]


def test_image_hf_inputs_match_a_transformers_image_processor() -> None:
    transformers = pytest.importorskip("transformers")
    batch = PaddedCollator(image_size=SIZE)([{"image": picture(seed=i)} for i in range(3)])
    ours = batch.image.hf_inputs()["pixel_values"]
    processor = transformers.ViTImageProcessor(do_resize=False, image_mean=list(IMAGENET_MEAN),
                                               image_std=list(IMAGENET_STD))
    theirs = processor([p.permute(1, 2, 0).numpy() for p in batch.image.pixels], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    half = batch.image.hf_inputs(mean=(0.5,) * 3, std=(0.5,) * 3, dtype=torch.float64)["pixel_values"]
    assert half.dtype == torch.float64 and float(half.min()) >= -1 and float(half.max()) <= 1
    packed = PaddedCollator(image_size=SIZE, pack=True)([{"image": picture(seed=i)} for i in range(3)])
    assert torch.equal(packed.to("cpu").image.hf_inputs()["pixel_values"], ours)
    assert torch.equal(packed.unpack().image.hf_inputs()["pixel_values"], ours)


@torch.no_grad()
def test_readme_hf_example_runs(minilm: str) -> None:
    """The README's BERT example, with the offline MiniLM (bert-base-uncased's vocabulary) for the hub model."""
    code = readme_block("# Hugging Face BERT on a mixed batch")
    code, n = re.subn(r'BertModel\.from_pretrained\("bert-base-uncased"\)', f"BertModel.from_pretrained({minilm!r})",
                      code)
    assert n == 1
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert sorted(scope["by_sample"]) == [1, 2] and scope["hidden"].shape[:2] == (2, 7)


# ---- what a reviewer's hands found ----

def test_threads_sharing_the_default_tokenizer_keep_their_own_truncation() -> None:
    from concurrent.futures import ThreadPoolExecutor

    long = [{"text": "word " * 200}] * 4
    short, wide = PaddedCollator(max_text_len=16), PaddedCollator(max_text_len=128)
    with ThreadPoolExecutor(8) as pool:
        widths = list(pool.map(lambda i: ((short if i % 2 else wide)(long).text.ids.shape[1], i % 2), range(80)))
    assert {w for w, odd in widths if odd} == {16} and {w for w, odd in widths if not odd} == {128}


def test_first_use_from_many_threads_loads_once_and_logs_once() -> None:
    import subprocess
    import sys

    code = ("from concurrent.futures import ThreadPoolExecutor\n"
            "from mmload import PaddedCollator\n"
            "cols = [PaddedCollator() for _ in range(6)]\n"
            "with ThreadPoolExecutor(6) as ex:\n"
            "    got = list(ex.map(lambda c: c([{'text': 'hi'}]).text.ids.tolist(), cols))\n"
            "assert got == [[[101, 7632, 102]]] * 6, got\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("bundled bert-base-uncased") == 1, proc.stderr


def test_image_only_shards_never_load_the_default_tokenizer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from mmload import ShardDataset

    shard = tmp_path / "img.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            data = png(picture(seed=i))
            info = tarfile.TarInfo(f"k{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with caplog.at_level("WARNING", logger="mmload"):
        ds = ShardDataset(str(shard), image_size=SIZE)
        assert len(list(ds)) == 3 and isinstance(ds.decoder.tokenizer, LazyDefault)
    assert not caplog.records
    assert ds.tokenizer is default_tokenizer()  # asking for it loads it


def test_the_sampler_reads_lengths_without_decoding_images(monkeypatch: pytest.MonkeyPatch) -> None:
    import mmload.decode

    calls = []
    real = mmload.decode.decode_image
    monkeypatch.setattr(mmload.decode, "decode_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = [{"image": picture(seed=i)} for i in range(5)] + [(picture(), "a caption"), {"text": "words"}]
    sampler = ModalityBucketBatchSampler.from_dataset(data, 2, shuffle=False)
    assert calls == [] and len(sampler) == 5  # images 2+2+1, the pair, the text
    r = {"image": picture(), "text": "hi", "json": {"modality": "text"}}
    raw = RawInput(image_size=SIZE)
    assert raw.describe(r)[0] == raw.to_sample(r).modality == "text"  # a declared modality, both ways


def test_fields_set_after_construction_take_effect() -> None:
    collate = PaddedCollator(image_size=SIZE)
    collate([{"text": "load the default"}])
    collate.image_size, collate.max_text_len = 16, 3
    batch = collate([{"image": picture()}, {"text": "three tokens at most"}])
    assert batch.image.pixels.shape[-1] == 16 and batch.text.ids.shape[1] == 3
    tok = default_tokenizer()
    collate.tokenizer = RawTok(tok)
    assert collate([{"text": "anything"}]).text.ids.tolist() == [[101, 7, 102]]


class RawTok:
    """A tokenizer that gives the same ids for every text."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        return {"input_ids": [101, 7, 102]}


def test_none_values_are_absent_fields_as_hugging_face_datasets_give_them() -> None:
    raw = RawInput(image_size=SIZE)
    assert raw.to_sample({"image": None, "text": "hi", "label": None}).modality == "text"
    assert raw.to_sample({"image": picture(), "text": None, "key": None}).key.startswith("raw-")
    with pytest.raises(ValueError, match="no image, text or input_ids field"):
        raw.to_sample({"image": None, "text": None})


def test_more_errors_that_say_what_to_do() -> None:
    raw = RawInput(image_size=SIZE)
    with pytest.raises(TypeError, match=r"a list of ints is not a sample; give token ids as \{'input_ids'"):
        raw.to_sample([101, 102])
    with pytest.raises(ValueError, match="fields 'image' and 'jpg' both give the image"):
        raw.to_sample({"image": picture(), "jpg": picture()})
    with pytest.raises(ValueError, match="fields 'label' and 'cls' both give the label"):
        raw.to_sample({"image": picture(), "label": 1, "cls": 2})
    with pytest.raises(ValueError, match=r"it looks HWC: use \.permute\(2, 0, 1\)"):
        raw.to_sample({"image": torch.zeros(8, 8, 3, dtype=torch.uint8)})
    assert raw.to_sample((picture(), torch.tensor(3))).label == 3
    with pytest.raises(ValueError, match=r"field 'input_ids': token ids must be in \[0, 2\*\*31\), got 99999999999"):
        PaddedCollator()([{"input_ids": [101, 99999999999, 102]}])  # int32 ids would wrap it silently


def test_an_eight_bit_image_in_mode_i_keeps_its_values() -> None:
    grey = Image.new("L", (8, 8), 200)
    assert int(RawInput(image_size=8).to_sample({"image": grey.convert("I")}).pixels.float().mean()) == 200
    wide = Image.fromarray(np.full((8, 8), 51200, dtype=np.int32), "I")  # 16-bit data: 51200 >> 8 == 200
    assert int(RawInput(image_size=8).to_sample({"image": wide}).pixels.float().mean()) == 200
