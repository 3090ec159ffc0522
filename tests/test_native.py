"""Images at native resolution (issue 12, first part): the grid arithmetic, the decode, batches of mixed grids
through every raw-sample collator, and the model agreeing across strategies on them."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_model import run, strategies, tiny

from mmload import NestedCollator, PaddedCollator, PerSampleCollator, ShardDataset, pack
from mmload.decode import Decoder, Native, decode_image
from mmload.layouts import JaggedImages, ModelInput
from mmload.sample import Sample
from models import ViTBERT
from models.kd import image_rows

P = 8  # the tiny preset's patch size


# ---- the grid (NOTE [native grid]) ----

@pytest.mark.parametrize(("height", "width", "n", "upscale", "want"), [
    (224, 224, 196, False, (14, 14)),  # the square path's grid at its own size
    (320, 320, 196, False, (14, 14)),  # sqrt(0.49) * 20 is 13.999... in floats
    (448, 224, 196, False, (19, 9)),  # 2:1 kept: floor(sqrt(392)), floor(sqrt(98))
    (900, 1600, 256, False, (12, 21)),
    (32, 900, 196, False, (2, 56)),  # fewer pixels than 196 patches hold: not scaled up
    (32, 900, 16, False, (1, 16)),  # a strip: its short side raised to 1, its long side capped at N
    (900, 32, 16, False, (16, 1)),
    (10, 5000, 196, False, (1, 196)),
    (1, 1, 196, False, (1, 1)),  # smaller than a patch: one patch, scaled up to it
    (1, 1, 196, True, (14, 14)),
    (100, 100, 196, True, (14, 14)),  # upscale: to N whatever the size
    (100, 100, 1, False, (1, 1)),
])
def test_the_grid_keeps_the_aspect_ratio_within_max_patches(height: int, width: int, n: int, upscale: bool,
                                                            want: tuple[int, int]) -> None:
    assert Native(n, 16, upscale).grid(height, width) == want


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 1024), st.sampled_from([8, 14, 16, 32]),
       st.booleans())
def test_every_grid_fits_max_patches_and_follows_pix2struct(height: int, width: int, n: int, p: int,
                                                            upscale: bool) -> None:
    rows, cols = Native(n, p, upscale).grid(height, width)
    assert 1 <= rows and 1 <= cols and rows * cols <= n
    factor = math.sqrt(n * p * p / (height * width))
    if not upscale:
        factor = min(factor, 1.0)
    exact = (factor * height / p, factor * width / p)
    if min(exact) >= 1:  # nothing clamped: Pix2Struct's floors (exact in integers, so compare with a margin)
        assert abs(rows - math.floor(exact[0])) <= 1 and abs(cols - math.floor(exact[1])) <= 1
        assert rows <= exact[0] + 1e-9 and cols <= exact[1] + 1e-9


def test_a_bad_native_setting_is_an_error() -> None:
    with pytest.raises(ValueError, match="resolution must be 'square' or 'native'"):
        Decoder(resolution="big")
    with pytest.raises(ValueError, match="max_patches must be >= 1"):
        Decoder(resolution="native", max_patches=0)
    with pytest.raises(ValueError, match="patch_size must be >= 1"):
        Decoder(resolution="native", patch_size=0)
    with pytest.raises(ValueError, match="no patch"):
        Native(16).grid(0, 10)


# ---- the decode ----

def _encoded(width: int, height: int, fmt: str = "JPEG", orientation: int = 1) -> bytes:
    """Left half red, right half blue, ``width x height`` as stored; ``orientation`` in its EXIF."""
    img = Image.new("RGB", (width, height), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, width // 2, height))
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_native_image_keeps_its_shape_and_all_of_its_content(fmt: str) -> None:
    native = Native(64, P)
    pixels = decode_image(_encoded(400, 100, fmt), 32, native=native)
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (3, 4 * P, 16 * P)  # 4:1, 64 patches
    left, right = pixels[:, :, :8].float().mean(dim=(1, 2)), pixels[:, :, -8:].float().mean(dim=(1, 2))
    assert left[0] > 200 > left[2] and right[2] > 200 > right[0]  # nothing cropped: both halves are there
    square = decode_image(_encoded(400, 100, fmt), 32)
    assert tuple(square.shape) == (3, 32, 32)  # the default is unchanged


def test_the_grid_is_taken_from_the_image_as_shown_after_its_exif_rotation() -> None:
    stored = _encoded(400, 100, orientation=6)  # a phone's portrait: stored sideways
    assert tuple(decode_image(stored, 32, native=Native(64, P)).shape) == (3, 16 * P, 4 * P)


def test_strips_both_ways_survive_the_reader(tmp_path: Path) -> None:
    import tarfile

    path = tmp_path / "strips.tar"
    with tarfile.open(path, "w") as tar:
        for key, (w, h) in {"wide": (900, 32), "tall": (32, 900), "small": (5, 7)}.items():
            data = _encoded(w, h)
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = ShardDataset(str(path), image_size=32, resolution="native", max_patches=16, patch_size=P, strict=True)
    shapes = {s.key: tuple(s.pixels.shape) for s in ds}
    assert shapes == {"wide": (3, P, 16 * P), "tall": (3, 16 * P, P), "small": (3, P, P)}


def test_img2dataset_shards_decode_to_their_own_grids(img2dataset_shards: list[str]) -> None:
    ds = ShardDataset(img2dataset_shards, image_size=32, resolution="native", patch_size=P, strict=True)
    grids = {(s.pixels.shape[-2] // P, s.pixels.shape[-1] // P) for s in ds}
    assert len(grids) > 5 and all(r * c <= (32 // P) ** 2 for r, c in grids)  # default N: the square's 16
    for s in ds:
        assert s.pixels.shape[-2] % P == 0 and s.pixels.shape[-1] % P == 0


# ---- batches of mixed grids ----

GRIDS = [(4, 4), (2, 7), (7, 2), (3, 5), (1, 1), (4, 4)]


def native_samples(samples: list[Sample], seed: int = 0) -> list[Sample]:
    """``samples`` with every image redrawn on a grid of ``GRIDS`` in turn (patch size ``P``)."""
    g = torch.Generator().manual_seed(seed)
    out, k = [], 0
    for s in samples:
        if s.pixels is not None:
            r, c = GRIDS[k % len(GRIDS)]
            k += 1
            s = Sample(s.key, s.modality, pixels=torch.randint(0, 256, (3, r * P, c * P), generator=g,
                                                               dtype=torch.uint8),
                       ids=s.ids, mlm_labels=s.mlm_labels, label=s.label)
        out.append(s)
    return out


@pytest.fixture
def mixed() -> list[Sample]:
    from test_model import make_mixed

    return native_samples(make_mixed())


@pytest.mark.parametrize("collate", [PaddedCollator(), NestedCollator(pack=False, patch_size=P), PerSampleCollator()],
                         ids=["padded", "nested", "per-sample"])
def test_every_collator_gives_each_image_back_as_it_came(collate: object, mixed: list[Sample]) -> None:
    for batch in (collate(mixed), pack(collate(mixed)).to("cpu")):
        back = batch.unbatch()
        assert [s.key for s in back] == [s.key for s in mixed]
        for got, want in zip(back, mixed, strict=True):
            assert (got.pixels is None) == (want.pixels is None)
            if want.pixels is not None:
                assert torch.equal(got.pixels, want.pixels), want.key


def test_stats_count_real_and_padded_image_tokens(mixed: list[Sample]) -> None:
    images = [s for s in mixed if s.pixels is not None]
    real = sum((s.pixels.shape[-2] // P) * (s.pixels.shape[-1] // P) + 1 for s in images)
    rows, cols = max(r for r, _ in GRIDS), max(c for _, c in GRIDS)
    padded = PaddedCollator()(mixed)
    assert tuple(padded.image.pixels.shape[-2:]) == (rows * P, cols * P)
    stats = padded.stats(P)
    assert stats.image_tokens == real and stats.padded_image_tokens == len(images) * (rows * cols + 1) - real
    nested = NestedCollator(patch_size=P)(mixed).stats(P)  # patch sequences: no padding
    assert nested.image_tokens == real and nested.padded_image_tokens == 0
    per_sample = PerSampleCollator()(mixed).stats(P)
    assert per_sample.image_tokens == real and per_sample.padded_image_tokens == 0
    mask = padded.image.patch_mask(P)
    assert int(mask.sum()) == real and mask[:, 0].all()
    square = PaddedCollator()([s for s in mixed if s.pixels is None or s.pixels.shape[-2:] == (4 * P, 4 * P)])
    assert square.image.sizes is None and square.stats(P).padded_image_tokens == 0  # one size: as before


def test_the_strategies_agree_on_losses_and_gradients_at_native_resolution(mixed: list[Sample]) -> None:
    """Mixed grids through per-sample (each image alone), padded (a patch mask), bucketed, nested (patch sequences,
    no padding anywhere) and padded pixels in the packed call (padding left out there): the square path's
    tolerances."""
    model = ViTBERT(tiny())
    ways = strategies(mixed, patch_size=P)
    assert isinstance(ways["nested"][0].image, JaggedImages)
    nested = ways["nested"][0]
    ways["packed_call_padded_pixels"] = [ModelInput(image=PaddedCollator()(mixed).image, text=nested.text, joint=True)]
    results = {name: run(model, batches) for name, batches in ways.items()}
    _, ref_grads, ref_sums = results["per_sample"]
    assert ref_sums["image"] > 0 and ref_grads["image.pos"].abs().sum() > 0
    for name, (_, grads, sums) in results.items():
        assert sums == pytest.approx(ref_sums, rel=1e-5), name
        for param, g in grads.items():
            torch.testing.assert_close(g, ref_grads[param], rtol=1e-4, atol=1e-6, msg=f"{name}: {param}")


def test_an_image_on_the_trained_grid_gets_the_trained_positions() -> None:
    model = ViTBERT(tiny())
    pos = model.image.positions(4, 4, [(4, 4), (2, 3)])
    assert torch.equal(pos[0], model.image.pos[0])  # 32 px at patch 8: the trained 4 x 4 grid, as learned
    grid = pos[1, 1:].view(4, 4, -1)
    assert grid[2:].abs().sum() == 0 and grid[:, 3:].abs().sum() == 0  # padding gets none


def test_a_teacher_gets_each_image_without_its_padding(mixed: list[Sample]) -> None:
    batch = PaddedCollator()(mixed)
    images = image_rows(batch)
    want = [s.pixels for s in mixed if s.pixels is not None]
    assert isinstance(images, list) and all(torch.equal(a, b) for a, b in zip(images, want, strict=True))


def test_hf_inputs_of_mixed_sizes_carry_a_pixel_mask(mixed: list[Sample]) -> None:
    images = PaddedCollator()(mixed).image
    inputs = images.hf_inputs()
    mask = inputs["pixel_mask"]
    assert mask.dtype == torch.int64 and mask.shape == (len(images), *images.pixels.shape[-2:])
    assert mask.sum(dim=(1, 2)).tolist() == [h * w for h, w in images.sizes.tolist()]
    one_size = PaddedCollator()([s for s in mixed if s.pixels is None][:1] + mixed[:1]).image
    assert "pixel_mask" not in one_size.hf_inputs()


def test_images_not_made_of_the_models_patches_are_an_error_not_floored() -> None:
    model = ViTBERT(tiny())  # patch 8
    with pytest.raises(ValueError, match="not whole patches of the model's patch_size 8"):
        model.encode_images(torch.zeros(1, 3, 36, 32, dtype=torch.uint8))  # per-sample: one image decoded at p=12
    with pytest.raises(ValueError, match=r"image sizes \[\[16, 16\], \[12, 16\]\] are not whole patches"):
        model.encode_images(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), torch.tensor([[16, 16], [12, 16]]))


@pytest.mark.parametrize("strategy", ["padded", "bucketed", "nested"])
def test_token_budgets_count_each_image_at_its_own_grid(strategy: str, img2dataset_shards: list[str]) -> None:
    """Images at native resolution cost their own grids (padded layouts: the batch's largest rows and columns,
    as the dense tensor holds them); every batch fits the budget and stats() counts what the budget counts."""
    from mmload import make_loader
    from mmload.bucketing import Budget

    budget = 160
    loader = make_loader(strategy, img2dataset_shards, max_tokens=budget, patch_size=P, num_workers=0,
                         image_size=32, resolution="native", max_patches=16)
    counter = Budget(max_tokens=budget, patch_size=P, padded=strategy != "nested")
    seen = 0
    for batch in loader:
        stats = batch.stats(P)
        tokens = stats.real_tokens + stats.padded_tokens + stats.image_tokens + stats.padded_image_tokens
        samples = batch.unbatch()
        assert tokens == counter.cost(samples)
        assert tokens <= budget or len(samples) == 1
        seen += len(samples)
    assert seen == 24


def test_bucketed_image_batches_pad_to_their_largest_grid(builtin_shards: list[str]) -> None:
    """At native resolution the image pool holds every size; a batch pads to its largest grid, counted, and
    every sample comes out once through a 2-worker loader."""
    from conftest import assert_exactly_once

    from mmload import make_loader

    loader = make_loader("bucketed", builtin_shards, batch_size=8, num_workers=2, image_size=32,
                         resolution="native", max_patches=16, patch_size=P)
    batches = list(loader)
    image_batches = [b for b in batches if b.image is not None and b.text is None]
    assert any(b.image.sizes is not None for b in image_batches)
    for b in image_batches:
        stats = b.stats(P)
        assert stats.image_tokens == b.image.tokens(P) and stats.padded_image_tokens == b.image.padded_tokens(P)
    assert_exactly_once(batches, [s.key for s in ShardDataset(builtin_shards, image_size=32)])


def test_a_checkpoint_teacher_of_another_patch_size_takes_the_students_images(mixed: list[Sample],
                                                                              tmp_path: Path) -> None:
    """A teacher at patch 16 and a student at 8: each image is cut to whole patches of the teacher's (as a square
    teacher always floored), square and native alike."""
    from models.checkpoint import model_state, save_checkpoint
    from models.config import ModelConfig
    from models.kd import ImageTeacher

    teacher = ViTBERT(ModelConfig.preset("small", vocab_size=100, num_classes=10))
    path = save_checkpoint(tmp_path / "teacher.pt", model_state(teacher))
    logits = ImageTeacher(path, num_classes=10)(PaddedCollator()([s for s in mixed if s.pixels is not None
                                                                  and min(s.pixels.shape[-2:]) >= 16]))
    assert logits.shape[1] == 10 and torch.isfinite(logits).all()
    square = PaddedCollator()([Sample("a", "image", pixels=torch.zeros(3, 40, 40, dtype=torch.uint8), label=1)])
    assert ImageTeacher(path, num_classes=10)(square).shape == (1, 10)  # 40 px: two whole patches of 16 a side
