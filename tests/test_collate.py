"""Collators: round trips, accounting, one-copy packing, validation."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_samples
from torch.utils.data import DataLoader

from mmload import (
    EmbeddingCollator,
    NestedCollator,
    PackedBatch,
    PaddedBatch,
    PaddedCollator,
    PerSampleCollator,
    Sample,
    pack,
)
from mmload.sample import IGNORE_INDEX, Modality

COLLATORS = {
    "per-sample": PerSampleCollator(),
    "padded": PaddedCollator(),
    "nested": NestedCollator(pack=False),
    "per-sample-packed": PerSampleCollator(pack=True),
    "padded-packed": PaddedCollator(pack=True),
    "nested-packed": NestedCollator(),
}


def assert_same_samples(got: list[Sample], want: list[Sample]) -> None:
    assert [s.key for s in got] == [s.key for s in want]
    for g, w in zip(got, want):
        assert g.modality == w.modality, g.key
        assert g.label == w.label
        for field in ("pixels", "ids"):
            a, b = getattr(g, field), getattr(w, field)
            assert (a is None) == (b is None), (g.key, field)
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b), (g.key, field)
        want_mlm = w.mlm_labels if w.mlm_labels is not None else (
            None if w.ids is None else torch.full_like(w.ids, IGNORE_INDEX))
        if want_mlm is not None:
            assert torch.equal(g.mlm_labels.long(), want_mlm), g.key


@pytest.mark.parametrize("name", sorted(COLLATORS))
def test_round_trip_gives_back_every_sample(name: str, samples: list[Sample]) -> None:
    before = copy.deepcopy(samples)
    batch = COLLATORS[name](samples)
    assert_same_samples(batch.unbatch(), samples)
    assert_same_samples(samples, before)  # collators never write into their input


@pytest.mark.parametrize("name", ["per-sample", "padded", "nested"])
def test_packed_buffer_gives_back_the_same_fields(name: str, samples: list[Sample]) -> None:
    batch = COLLATORS[name](samples)
    packed = pack(batch)
    assert isinstance(packed, PackedBatch) and packed.buffer.dtype == torch.uint8
    assert packed.stats().tensors == 1 and batch.stats().tensors > 1
    unpacked = packed.to("cpu")
    for a, b in zip(batch.tensors(), unpacked.tensors()):
        assert a.dtype == b.dtype and torch.equal(a, b)
        assert b.untyped_storage().data_ptr() == packed.buffer.untyped_storage().data_ptr()  # views, not copies


def test_stats_account_for_padding(samples: list[Sample]) -> None:
    texts = [s for s in samples if s.ids is not None]
    real = sum(s.num_text_tokens for s in texts)
    longest = max(s.num_text_tokens for s in texts)
    padded = PaddedCollator()(samples).stats()
    nested = NestedCollator(pack=False)(samples).stats()
    per_sample = PerSampleCollator()(samples).stats()
    assert padded.real_tokens == nested.real_tokens == per_sample.real_tokens == real
    assert padded.padded_tokens == len(texts) * longest - real > 0
    assert nested.padded_tokens == per_sample.padded_tokens == 0
    assert padded.images == nested.images == sum(s.pixels is not None for s in samples)
    assert padded.bytes == sum(t.numel() * t.element_size() for t in PaddedCollator()(samples).tensors())
    assert per_sample.tensors > padded.tensors > 1


def test_padded_layout(samples: list[Sample]) -> None:
    batch = PaddedCollator(pad_id=0, pad_to_multiple_of=8)(samples)
    assert isinstance(batch, PaddedBatch)
    assert batch.text.ids.shape[1] % 8 == 0 and batch.text.ids.dtype == torch.int32
    assert torch.equal(batch.text.mask.sum(1), torch.tensor([s.num_text_tokens for s in samples if s.ids is not None]))
    assert batch.image.pixels.dtype == torch.uint8  # pixels stay uint8 until the device
    paired = [i for i, s in enumerate(samples) if s.modality == Modality.IMAGE_TEXT]
    assert set(paired) <= set(batch.image.index.tolist()) & set(batch.text.index.tolist())


def test_nested_offsets_are_cu_seqlens(samples: list[Sample]) -> None:
    batch = NestedCollator(pack=False)(samples)
    lengths = [s.num_text_tokens for s in samples if s.ids is not None]
    assert batch.text.offsets.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert batch.text.max_len == max(lengths)
    nt = batch.text.nested()
    assert nt.is_nested and [t.numel() for t in nt.unbind()] == lengths


def test_embedding_collator_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    samples = [Sample("a", "image", emb=torch.randn(16, generator=g).half(), label=3),
               Sample("b", "text", emb=torch.randn(5, 16, generator=g).half(),
                      mlm_labels=torch.tensor([-100, 7, -100, -100, 9])),
               Sample("c", "text", emb=torch.randn(16, generator=g).half())]
    batch = EmbeddingCollator()(samples)
    assert batch.offsets.tolist() == [0, 1, 6, 7] and batch.is_text.tolist() == [False, True, True]
    assert batch.mlm_labels.tolist()[1:6] == [-100, 7, -100, -100, 9]
    back = batch.unbatch()
    assert torch.equal(back[0].emb, samples[0].emb) and torch.equal(back[1].emb, samples[1].emb)
    with pytest.raises(ValueError, match="share a width"):
        EmbeddingCollator()([samples[0], Sample("d", "image", emb=torch.zeros(8).half())])
    with pytest.raises(ValueError, match="mmload precompute"):
        EmbeddingCollator()(make_samples(2))


def test_collators_validate() -> None:
    with pytest.raises(ValueError, match="ids_dtype"):
        PaddedCollator(ids_dtype=torch.float32)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        PaddedCollator(pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="empty"):
        NestedCollator()([])
    with pytest.raises(ValueError, match=r"raw sample 0: no image, text or input_ids field \(has \['ids'\]\)"):
        PaddedCollator()([{"ids": [1, 2]}])
    with pytest.raises(TypeError, match="EmbeddingCollator takes mmload.Sample with precomputed embeddings"):
        EmbeddingCollator()([{"text": "a caption"}])
    big = Sample("big", "text", ids=torch.tensor([2, 40000, 3]))
    with pytest.raises(ValueError, match="does not fit"):
        PaddedCollator(ids_dtype=torch.int16)([big])
    mixed = make_samples(3, image_size=32) + make_samples(3, image_size=16, seed=1)
    images = PaddedCollator()(mixed).image  # several sizes (native resolution): padded, each size beside
    assert images.sizes.tolist() == [[32, 32]] * 2 + [[16, 16]] * 2 and images.pixels.shape[-2:] == (32, 32)


def test_batch_types_survive_the_dataloader_pin_thread(samples: list[Sample]) -> None:
    # On a CPU-only build pin_memory=True only warns; pin_memory() itself must not raise either.
    for collate in (PaddedCollator(), NestedCollator(), PerSampleCollator(pack=True)):
        loader = DataLoader(samples, batch_size=8, collate_fn=collate)
        for batch in loader:
            moved = batch.pin_memory().to("cpu", non_blocking=True)
            assert moved.stats().samples == 8


def test_narrow_ids_refuse_labels_that_do_not_fit() -> None:
    # After masking, a large original id lives on only in mlm_labels: it must not wrap around either.
    s = Sample("k", "text", ids=torch.tensor([2, 103, 3]), mlm_labels=torch.tensor([-100, 40000, -100]))
    for collate in (PaddedCollator(ids_dtype=torch.int16), NestedCollator(ids_dtype=torch.int16)):
        with pytest.raises(ValueError, match="does not fit"):
            collate([s])


def test_embedding_labels_must_match_their_tokens() -> None:
    s = Sample("k", "text", emb=torch.zeros(4, 8).half(), mlm_labels=torch.tensor([-100, 5, -100]))
    with pytest.raises(ValueError, match="3 MLM labels for 4 token embeddings"):
        EmbeddingCollator()([s])
