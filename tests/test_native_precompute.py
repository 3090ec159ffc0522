"""``mmload precompute`` at native resolution (issue 12): each image embedded at its own size, one encoder call
per distinct size in a batch, and the embeddings strategy training on what it wrote (NOTE [native precompute])."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_exactly_once

from mmload import ShardDataset
from mmload.cli import main
from mmload.layouts import normalize_pixels
from mmload.precompute import HFFeatures, ModuleImageFeatures, precompute
from mmload.sample import Sample
from models.checkpoint import load_model, model_state, save_checkpoint
from models.config import ModelConfig, TrainConfig
from models.features import MMLoadFeatures
from models.vit_bert import ViTBERT

P = 8  # the tiny preset's and the tiny ViT's patch size
SIZE = 32  # their image size: a square grid of 4 x 4
TOL = {"atol": 2e-3, "rtol": 2e-3}  # float16 storage


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny mmload ViT-BERT over the bundled bert-base-uncased vocabulary, so it reads builtin and img2dataset
    shards alike."""
    from mmload.tokenizer import default_tokenizer

    tok = default_tokenizer()
    model = ViTBERT(ModelConfig.preset("tiny", vocab_size=len(tok)), seed=1).eval()
    return save_checkpoint(tmp_path_factory.mktemp("enc") / "encoder.pt", model_state(model, tok))


@pytest.fixture(scope="module")
def mmload_features(encoder_ckpt: Path) -> MMLoadFeatures:
    model, tok = load_model(encoder_ckpt)
    return MMLoadFeatures(model.eval(), tok)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Hugging Face ViT folder built from a config (never downloaded): 32 px, patch 8."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       image_size=SIZE, patch_size=P)
    torch.manual_seed(0)  # transformers initializes from the global generator
    path = tmp_path_factory.mktemp("vit")
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return str(path)


def _sources(urls: list[str], tokenizer: object, max_patches: int | None = None) -> dict[str, Sample]:
    """The input samples as precompute decodes them at native resolution, by key."""
    return {s.key: s for s in ShardDataset(urls, tokenizer=tokenizer, image_size=SIZE, max_text_len=64,
                                           resolution="native", max_patches=max_patches, patch_size=P)}


def _read(out: Path) -> dict[str, Sample]:
    return {s.key: s for s in ShardDataset(str(out))}


def _grid(pixels: torch.Tensor) -> tuple[int, int]:
    return pixels.shape[-2] // P, pixels.shape[-1] // P


@torch.no_grad()
def test_hf_vit_embeds_each_image_at_its_own_size(tmp_path: Path, img2dataset_shards: list[str], tiny_vit: str,
                                                  mmload_features: MMLoadFeatures) -> None:
    """img2dataset pairs of many aspect ratios: each image's tokens are the HF ViT's on that image alone with its
    position grid interpolated, (1 + rows * cols, D) long; each text side is the text encoder's on its ids."""
    from transformers import ViTModel

    out = tmp_path / "emb"
    precompute(img2dataset_shards, out, image_encoder=HFFeatures(tiny_vit), text_encoder=mmload_features,
               tokens=True, batch_size=8, progress=False, resolution="native", max_patches=12)
    src = _sources(img2dataset_shards, mmload_features.tokenizer, max_patches=12)
    got = _read(out)
    assert_exactly_once(got, src)
    grids = {_grid(s.pixels) for s in src.values()}
    assert len(grids) > 5 and all(r * c <= 12 for r, c in grids)
    vit = ViTModel.from_pretrained(tiny_vit).eval()
    text = mmload_features.model
    for key, s in got.items():
        pixels = src[key].pixels
        r, c = _grid(pixels)
        assert s.modality == "image_text" and s.emb.shape == (1 + r * c, 64)
        x = normalize_pixels(pixels[None], (0.5,) * 3, (0.5,) * 3)
        want = vit(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[0]  # (1 + r*c, 64)
        torch.testing.assert_close(s.emb.float(), want, **TOL, msg=key)
        ids = src[key].ids[None]
        want = text.encode_text(ids, torch.ones_like(ids, dtype=torch.bool))[0]
        torch.testing.assert_close(s.text_emb.float(), want, **TOL, msg=key)
        assert torch.equal(s.ids, src[key].ids)
    assert json.loads((out / "manifest.json").read_text())["resolution"] == "native"


@torch.no_grad()
@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "pooled"])
def test_mmload_features_embed_images_and_texts_at_native_resolution(tmp_path: Path, builtin_shards: list[str],
                                                                    mmload_features: MMLoadFeatures,
                                                                    tokens: bool) -> None:
    """Builtin shards (images of six grids, texts): images as the model embeds each alone (its learned positions
    resized to the image's grid), texts as before; pooled vectors stay (D,)."""
    out = tmp_path / "emb"
    precompute(builtin_shards[:2], out, image_encoder=mmload_features, text_encoder=mmload_features,
               tokens=tokens, batch_size=16, progress=False, resolution="native")
    src = _sources(builtin_shards[:2], mmload_features.tokenizer)
    got = _read(out)
    assert_exactly_once(got, src)
    model = mmload_features.model
    images = [k for k, s in got.items() if s.modality == "image"]
    assert len({_grid(src[k].pixels) for k in images}) > 3 and any(s.modality == "text" for s in got.values())
    for key, s in got.items():
        assert (s.modality, s.label) == (src[key].modality, src[key].label)
        if s.modality == "image":
            pixels = src[key].pixels
            want = model.encode_images(pixels[None])[0]  # (1 + r*c, 64)
            r, c = _grid(pixels)
            assert want.shape == (1 + r * c, 64)
        else:
            ids = src[key].ids[None]
            want = model.encode_text(ids, torch.ones_like(ids, dtype=torch.bool))[0]  # (T, 64)
        torch.testing.assert_close(s.emb.float(), want if tokens else want[0], **TOL, msg=key)


def test_batch_composition_does_not_change_an_image_embedding(tmp_path: Path, img2dataset_shards: list[str],
                                                              tiny_vit: str, mmload_features: MMLoadFeatures) -> None:
    """Alone (batch size 1) or among others of several sizes (8): the same embedding, padding never enters."""
    runs = {}
    for n in (1, 8):
        precompute(img2dataset_shards, tmp_path / str(n), image_encoder=HFFeatures(tiny_vit),
                   text_encoder=mmload_features, tokens=True, batch_size=n, progress=False, resolution="native")
        runs[n] = _read(tmp_path / str(n))
    assert runs[1].keys() == runs[8].keys()
    for key, s in runs[8].items():
        torch.testing.assert_close(s.emb, runs[1][key].emb, **TOL, msg=key)
        torch.testing.assert_close(s.text_emb, runs[1][key].text_emb, **TOL, msg=key)


def test_an_encoder_of_one_size_fails_with_one_line_that_names_the_way_out(tmp_path: Path, builtin_shards: list[str],
                                                                          tiny_vit: str,
                                                                          mmload_features: MMLoadFeatures) -> None:
    flat = ModuleImageFeatures(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 16)),
                               image_size=SIZE, patch_size=P, name="flat")
    with pytest.raises(ValueError, match=r"'flat' takes images of 32x32 pixels only.*decode at the square size") as e:
        precompute(builtin_shards[:1], tmp_path / "a", image_encoder=flat, text_encoder=mmload_features,
                   progress=False, resolution="native")
    assert "\n" not in str(e.value)
    assert list((tmp_path / "a").iterdir()) == []  # no partial shard left to block a rerun
    fixed = HFFeatures(tiny_vit)
    fixed.interpolates = False  # a HF vision model whose forward takes no interpolate_pos_encoding
    with pytest.raises(ValueError, match="no interpolate_pos_encoding.*decode at the square size"):
        precompute(builtin_shards[:1], tmp_path / "b", image_encoder=fixed, text_encoder=mmload_features,
                   progress=False, resolution="native")
    # the way out works: the same module at the square size
    precompute(builtin_shards[:1], tmp_path / "c", image_encoder=flat, text_encoder=mmload_features,
               progress=False)
    assert {s.emb.shape for s in _read(tmp_path / "c").values() if s.modality == "image"} == {(16,)}
    with pytest.raises(ValueError, match="max_patches=12 sets the native grid"):
        precompute(builtin_shards[:1], tmp_path / "d", image_encoder=flat, max_patches=12, progress=False)


def test_module_features_take_any_size(tmp_path: Path, builtin_shards: list[str],
                                       mmload_features: MMLoadFeatures) -> None:
    """Any torch module that takes any size (a conv net, globally pooled) gets each image as it is."""
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten()).eval()
    enc = ModuleImageFeatures(conv, image_size=SIZE, patch_size=P)
    precompute(builtin_shards[:1], tmp_path / "emb", image_encoder=enc, text_encoder=mmload_features,
               batch_size=16, progress=False, resolution="native")
    src = _sources(builtin_shards[:1], mmload_features.tokenizer)
    with torch.no_grad():
        for key, s in _read(tmp_path / "emb").items():
            if s.modality == "image":
                want = conv(normalize_pixels(src[key].pixels[None], enc.mean, enc.std))[0]
                torch.testing.assert_close(s.emb.float(), want, **TOL, msg=key)


def test_cli_native_with_a_teacher_then_the_embeddings_strategy_trains(tmp_path: Path, builtin_shards: list[str],
                                                                       encoder_ckpt: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``mmload precompute --resolution native --max-patches N --tokens --teacher``: each image its own length
    and its teacher's logits (the teacher took it without padding); the trainer's embeddings strategy, with KD
    from the stored logits, trains on rows of many lengths."""
    from models.train import train

    out = tmp_path / "emb"
    assert main(["-q", "precompute", *builtin_shards[:2], str(out), "--encoder", str(encoder_ckpt), "--tokens",
                 "--teacher", str(encoder_ckpt), "--resolution", "native", "--max-patches", "12",
                 "--batch-size", "16"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"]["total"] == 80
    model, tok = load_model(encoder_ckpt)
    model.eval()
    src = _sources(builtin_shards[:2], tok, max_patches=12)
    got = _read(out)
    assert_exactly_once(got, src)
    lengths = set()
    with torch.no_grad():
        for key, s in got.items():
            if s.modality != "image":
                continue
            pixels = src[key].pixels[None]
            r, c = _grid(pixels)
            assert r * c <= 12 and s.emb.shape == (1 + r * c, 64)
            lengths.add(s.emb.shape[0])
            feats = model.encode_images(pixels)  # (1, 1 + r*c, 64)
            torch.testing.assert_close(s.emb.float(), feats[0], **TOL, msg=key)
            torch.testing.assert_close(s.teacher_logits.float(), model.image_head(feats[:, 0])[0], **TOL, msg=key)
    assert len(lengths) > 1  # without --max-patches 12 grids of 15 and 16 patches would be there too
    assert json.loads((out / "manifest.json").read_text())["max_patches"] == 12
    result = train(TrainConfig(data=[str(out)], strategy="embeddings", preset="tiny", steps=3, batch_size=8,
                               num_workers=0, kd_alpha=0.5, teacher_logits=True, progress=False, device="cpu",
                               warmup=1))
    assert result["step"] == 3 and torch.isfinite(torch.tensor(result["loss"]))
    capsys.readouterr()
    assert main(["-q", "precompute", *builtin_shards[:1], str(tmp_path / "x"), "--encoder", str(encoder_ckpt),
                 "--max-patches", "12"]) == 2
    assert "--max-patches sets the native grid; give it with --resolution native" in capsys.readouterr().err


def test_a_fixed_size_hf_teacher_lines_up_with_native_images(tmp_path: Path, builtin_shards: list[str],
                                                            mmload_features: MMLoadFeatures) -> None:
    """A HF classifier of one size: each native image resized for it alone; the logits stored beside an image are
    the teacher's on that image, whatever else its batch held."""
    from transformers import ViTConfig, ViTForImageClassification

    from mmload import PaddedCollator
    from models.kd import ImageTeacher

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=SIZE, patch_size=P, num_labels=10)
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(tmp_path / "teacher")
    teacher = ImageTeacher(tmp_path / "teacher")
    precompute(builtin_shards[:1], tmp_path / "emb", image_encoder=mmload_features, text_encoder=mmload_features,
               teacher=teacher, batch_size=16, progress=False, resolution="native")
    src = _sources(builtin_shards[:1], mmload_features.tokenizer)
    images = [(k, s) for k, s in _read(tmp_path / "emb").items() if s.modality == "image"]
    assert len({_grid(src[k].pixels) for k, _ in images}) > 3
    for key, s in images:
        want = teacher(PaddedCollator()([src[key]]))[0]  # (10,): the teacher on this image alone
        torch.testing.assert_close(s.teacher_logits.float(), want, **TOL, msg=key)
