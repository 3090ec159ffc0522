"""Nested batches at native resolution carry only real patches (issue 12): images of several sizes are cut into
patches on the host and packed end to end (``JaggedImages``: values + offsets), moved in one copy with no pixel of
padding, embedded by the conv's weights as a linear map, and give back every image as it came."""

from __future__ import annotations

import pytest
import torch
from test_model import tiny
from test_native import GRIDS, P, mixed  # noqa: F401 (a fixture)

from mmload import NestedCollator, PaddedCollator, make_loader
from mmload.layouts import ImageBatch, JaggedImages, ModelInput, patchify, unpatchify
from mmload.sample import Modality, Sample
from models import ViTBERT
from models.kd import image_rows


def images_of(grids: list[tuple[int, int]], seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    return [Sample(f"im{i}", Modality.IMAGE, label=i % 10,
                   pixels=torch.randint(0, 256, (3, r * P, c * P), generator=g, dtype=torch.uint8))
            for i, (r, c) in enumerate(grids)]


def test_patches_are_row_major_and_flattened_as_the_conv_weight_reads_them() -> None:
    image = torch.arange(3 * 2 * P * 3 * P, dtype=torch.int64).view(3, 2 * P, 3 * P)
    patches = patchify(image, P)  # (6, 3*P*P)
    assert patches.shape == (6, 3 * P * P)
    assert torch.equal(patches[4].view(3, P, P), image[:, P:2 * P, P:2 * P])  # row 1, column 1
    assert torch.equal(unpatchify(patches, 2, 3, P), image)
    conv = torch.nn.Conv2d(3, 5, P, stride=P)
    x = torch.randn(1, 3, 2 * P, 3 * P)
    want = conv(x).flatten(2).transpose(1, 2)[0]  # (6, 5)
    got = torch.nn.functional.linear(patchify(x[0], P), conv.weight.flatten(1), conv.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_nested_images_of_several_sizes_travel_as_their_real_pixels_only(mixed: list[Sample]) -> None:  # noqa: F811
    images = [s for s in mixed if s.pixels is not None]
    batch = NestedCollator(pack=False, patch_size=P)(mixed)
    jagged = batch.image
    assert isinstance(jagged, JaggedImages) and jagged.patch_size == P
    assert jagged.grid == tuple((s.pixels.shape[-2] // P, s.pixels.shape[-1] // P) for s in images)
    assert jagged.patches.dtype == torch.uint8
    assert jagged.patches.numel() == sum(s.pixels.numel() for s in images)  # not a pixel of padding
    assert jagged.offsets.tolist()[-1] == len(jagged.patches) and jagged.max_len == max(r * c for r, c in GRIDS) + 1
    assert torch.equal(jagged.cu_seqlens().diff(), torch.tensor([r * c + 1 for r, c in jagged.grid]))
    padded = PaddedCollator(pack=False)(mixed).image
    assert jagged.nbytes() < padded.nbytes() / 2  # what the dense tensor pays for the padding
    stats = NestedCollator(patch_size=P)(mixed).stats(P)  # packed: one copy
    assert (stats.tensors, stats.padded_image_tokens) == (1, 0)
    assert stats.image_tokens == jagged.tokens(P) == padded.tokens(P)
    assert jagged.tokens(2 * P) == padded.tokens(2 * P)  # counted at another patch size too, as ImageBatch does


def test_images_of_one_size_stay_one_dense_tensor() -> None:
    batch = NestedCollator(pack=False, patch_size=P)(images_of([(2, 3)] * 4))
    assert isinstance(batch.image, ImageBatch) and batch.image.sizes is None


def test_jagged_images_give_every_image_back_dense_and_to_a_teacher(mixed: list[Sample]) -> None:  # noqa: F811
    want = [s.pixels for s in mixed if s.pixels is not None]
    batch = NestedCollator(patch_size=P)(mixed).to("cpu")  # one buffer, views on the "device"
    jagged = batch.image
    assert all(torch.equal(a, b) for a, b in zip(jagged.images(), want, strict=True))
    assert all(torch.equal(jagged.image(row), b) for row, b in enumerate(want))
    dense = jagged.dense()
    padded = PaddedCollator()(mixed).image
    assert torch.equal(dense.pixels, padded.pixels) and torch.equal(dense.sizes, padded.sizes)
    assert torch.equal(jagged.hf_inputs()["pixel_mask"], padded.hf_inputs()["pixel_mask"])
    rows = image_rows(batch)  # what an image teacher gets: each image at its own size
    assert isinstance(rows, list) and all(torch.equal(a, b) for a, b in zip(rows, want, strict=True))


def test_the_model_embeds_patch_sequences_as_each_image_alone() -> None:
    """Every image's tokens from the packed patches equal those of the image run by itself through the conv."""
    model = ViTBERT(tiny()).eval()
    samples = images_of([(4, 4), (2, 7), (7, 2), (1, 1), (2, 7)])
    jagged = NestedCollator(pack=False, patch_size=P)(samples).image
    tokens, offsets = model.image.patches(jagged)
    assert torch.equal(offsets, jagged.cu_seqlens())
    for row, s in enumerate(samples):
        alone = model.image(s.pixels[None])[0]  # (1+P, D), its own grid's positions
        torch.testing.assert_close(tokens[offsets[row]:offsets[row + 1]], alone, rtol=1e-5, atol=1e-5)
    hidden = model.encode_patches(jagged)
    for row, s in enumerate(samples):
        torch.testing.assert_close(hidden[offsets[row]:offsets[row + 1]], model.encode_images(s.pixels[None])[0],
                                   rtol=1e-4, atol=1e-5)


def test_patches_of_another_size_than_the_models_are_refused() -> None:
    model = ViTBERT(tiny())  # patch 8
    batch = NestedCollator(patch_size=2 * P)(images_of([(2, 2), (4, 2)]))
    with pytest.raises(ValueError, match=r"cut into patches of 16 but the model's patch_size is 8.*patch_size=8"):
        model(batch)


def test_images_that_are_not_whole_patches_are_refused_when_collated() -> None:
    odd = [Sample("a", Modality.IMAGE, pixels=torch.zeros(3, 20, 16, dtype=torch.uint8), label=0),
           Sample("b", Modality.IMAGE, pixels=torch.zeros(3, 16, 16, dtype=torch.uint8), label=0)]
    with pytest.raises(ValueError, match=r"sample 'a': an image of 20x16 pixels is not whole patches of 8; "):
        NestedCollator(patch_size=P)(odd)
    with pytest.raises(ValueError, match=r"of 16 \(the default: give NestedCollator\(patch_size=...\) the model's\)"):
        NestedCollator()(images_of([(1, 2), (2, 1)]))  # whole patches of 8, the default cuts 16


def test_make_collator_takes_the_models_patch_size() -> None:
    from mmload import make_collator

    batch = make_collator("nested", patch_size=P)(images_of([(1, 2), (2, 1)]))
    assert batch.unpack().image.patch_size == P
    assert make_collator("padded", patch_size=P).patch_size == P  # raw samples decode to the model's grid


def test_the_jagged_path_reads_nothing_from_the_device() -> None:
    """On the meta device any read of a value (``.tolist()``, ``.item()``, a boolean index) raises: the patch
    embedding, its positions and the offsets come from the host grid and device ops only (no CUDA sync)."""
    model = ViTBERT(tiny()).to("meta")
    jagged = NestedCollator(pack=False, patch_size=P)(images_of([(4, 4), (2, 7), (1, 1), (2, 7)])).image
    tokens, offsets = model.image.patches(jagged.to("meta"))
    assert tokens.shape == (16 + 14 + 1 + 14 + 4, 64) and offsets.shape == (5,)
    assert tokens.device.type == "meta"


def test_grids_given_as_a_tensor_place_the_same_positions() -> None:
    model = ViTBERT(tiny())
    listed = model.image.positions(4, 4, [(4, 4), (2, 3)])
    assert torch.equal(model.image.positions(4, 4, torch.tensor([[4, 4], [2, 3]])), listed)
    assert listed[1, 1:].view(4, 4, -1)[:2, :3].abs().sum() > 0


def test_a_layout_of_patch_sequences_makes_the_encoder_call_packed() -> None:
    jagged = NestedCollator(pack=False, patch_size=P)(images_of([(1, 2), (2, 1)])).image
    assert ModelInput(image=jagged).packed and not ModelInput(image=jagged.dense()).packed
    out = ViTBERT(tiny())(ModelInput(image=jagged))  # a user's own input, no joint flag: still one packed call
    assert out.image_logits.shape == (2, 10)


def test_make_loader_cuts_nested_images_into_the_models_patches(img2dataset_shards: list[str]) -> None:
    loader = make_loader("nested", img2dataset_shards, batch_size=8, patch_size=P, num_workers=0, image_size=32,
                         resolution="native", max_patches=16)
    batches = list(loader)
    layouts = [b.unpack().image for b in batches if b.unpack().image is not None]
    assert layouts and all(isinstance(im, JaggedImages) and im.patch_size == P for im in layouts)
    model = ViTBERT(tiny()).eval()  # the images only: the tiny vocabulary is not the shards' tokenizer's
    for im in layouts:  # the same logits as the images padded to the largest and masked
        torch.testing.assert_close(model(ModelInput(image=im)).image_logits,
                                   model(ModelInput(image=im.dense())).image_logits, rtol=1e-4, atol=1e-5)
