"""ViTBERT on every batch type: the strategies agree on losses and gradients for the same samples and weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import MIXED, make_samples

from mmload.batch import PaddedBatch, TextBatch
from mmload.collate import EmbeddingCollator, NestedCollator, PaddedCollator, PerSampleCollator
from mmload.masking import Compose, MLMMasking, NextSegmentPairs
from mmload.sample import IGNORE_INDEX, Modality, Sample
from models import FREEZE_GROUPS, ModelConfig, ModelOutput, ViTBERT
from models.vit_bert import packed_token_types, token_types

VOCAB, MASK_ID, SPECIAL = 100, 4, (0, 1, 2, 3, 4)  # 0 PAD, 2 CLS, 3 SEP, 4 MASK
EMB_DIM = 24


def make_mixed(n: int = 18, seed: int = 0, size: int = 32, nsp: bool = False) -> list[Sample]:
    """Images, texts of varied lengths and image_text pairs in turn, MLM-masked; one unlabelled image. ``nsp``: texts
    become sentence-order pairs first, their label the pair's (IGNORE_INDEX when too short to cut)."""
    masking = MLMMasking(vocab_size=VOCAB, mask_id=MASK_ID, special_ids=SPECIAL, prob=0.3, seed=seed)
    if nsp:
        masking = Compose((NextSegmentPairs(cls_id=2, sep_id=3, seed=seed), masking))
    return make_samples(n, seed, image_size=size, vocab=VOCAB, kinds=MIXED, unlabelled=(3,), masking=masking,
                        key="k{:03d}")


def tiny(**overrides: object) -> ModelConfig:
    return ModelConfig.preset("tiny", vocab_size=VOCAB, **overrides)


def run(model: ViTBERT, batches: list) -> tuple[ModelOutput, dict[str, torch.Tensor], dict[str, float]]:
    """Forward + backward of the summed losses over ``batches``; returns the last output, grads and loss sums
    (``image``, ``mlm``, ``nsp``: 0 without the head)."""
    model.zero_grad(set_to_none=True)
    sums = dict.fromkeys(("image", "mlm", "nsp"), 0.0)
    out = None
    for batch in batches:
        out = model(batch)
        losses = {"image": out.image_loss_sum(), "mlm": out.mlm_loss_sum(), "nsp": out.nsp_loss_sum()}
        sum(losses.values()).backward()
        sums = {k: sums[k] + v.item() for k, v in losses.items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads, sums


def strategies(samples: list[Sample], patch_size: int | None = None) -> dict[str, list]:
    by_kind: dict[Modality, list[Sample]] = {}
    for s in samples:
        by_kind.setdefault(s.modality, []).append(s)
    return {
        "per_sample": [PerSampleCollator()(samples)],
        "padded": [PaddedCollator()(samples)],
        "padded_int16_multiple_of_16": [PaddedCollator(ids_dtype=torch.int16, pad_to_multiple_of=16)(samples)],
        # bucketing as mmload.bucketing does it: images, texts and pairs in separate batches
        "bucketed": [PaddedCollator()(group) for group in by_kind.values()],
        "nested": [NestedCollator(pack=False, patch_size=patch_size)(samples)],
        # one buffer, views on the "device"
        "nested_packed": [NestedCollator(pack=True, patch_size=patch_size)(samples).to("cpu")],
    }


@pytest.mark.parametrize("nsp", [False, True])
def test_strategies_agree_on_losses_and_gradients(nsp: bool) -> None:
    samples = make_mixed(nsp=nsp)
    model = ViTBERT(tiny(nsp=nsp))
    results = {name: run(model, batches) for name, batches in strategies(samples).items()}
    ref_out, ref_grads, ref_sums = results["per_sample"]
    assert ref_out.image_logits.shape == (12, 10) and ref_out.image_count() == 11
    n_masked = sum(int((s.mlm_labels != IGNORE_INDEX).sum()) for s in samples if s.has_text)
    assert ref_out.mlm_logits.shape == (n_masked, VOCAB) and n_masked > 20  # only masked positions get logits
    if nsp:  # a row per text; targets on the pure texts long enough to cut, never on an image_text pair
        nsp_labels = [s.label for s in samples if s.modality == Modality.TEXT and s.label != IGNORE_INDEX]
        assert ref_out.nsp_logits.shape == (12, 2) and int(ref_out.nsp_count()) == len(nsp_labels) >= 4
        assert set(nsp_labels) == {0, 1} and ref_grads["nsp_head.out.weight"].abs().sum() > 0
    else:
        assert ref_out.nsp_logits.shape == (0, 2) and ref_sums["nsp"] == 0 and model.nsp_head is None
    for name, (out, grads, sums) in results.items():
        assert sums == pytest.approx(ref_sums, rel=1e-5), name
        assert grads.keys() == ref_grads.keys(), name
        for param, g in grads.items():
            torch.testing.assert_close(g, ref_grads[param], rtol=1e-4, atol=1e-6, msg=f"{name}: {param}")
        if name != "bucketed":  # one batch over the same sample list: same rows in the same order
            for task in ("image", "mlm", "nsp"):
                torch.testing.assert_close(getattr(out, f"{task}_logits"), getattr(ref_out, f"{task}_logits"),
                                           rtol=1e-4, atol=1e-5)
                assert torch.equal(getattr(out, f"{task}_index"), getattr(ref_out, f"{task}_index")), task
                assert torch.equal(getattr(out, f"{task}_labels"), getattr(ref_out, f"{task}_labels")), task


def reference_types(ids: list[int], sep: int = 3) -> list[int]:
    first = ids.index(sep) if sep in ids else len(ids)
    return [int(i > first) for i in range(len(ids))]


def test_segment_ids_are_one_exactly_after_the_first_sep() -> None:
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 8, (int(torch.randint(1, 12, (), generator=g)),), generator=g) for _ in range(40)]
    rows += [torch.tensor([3]), torch.tensor([5, 6]), torch.tensor([3, 3, 5])]  # lone [SEP], no [SEP], two in a row
    expected = [reference_types(r.tolist()) for r in rows]
    dense = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0)  # (B, T)
    got = token_types(dense, 3)  # (B, T)
    assert [got[i, :len(r)].tolist() for i, r in enumerate(rows)] == expected
    offsets = torch.tensor([0, *map(len, rows)]).cumsum(0)  # (B+1,)
    row = torch.repeat_interleave(torch.arange(len(rows)), offsets.diff())  # (sum T,)
    assert packed_token_types(torch.cat(rows), offsets, row, 3).tolist() == sum(expected, [])

    # the model feeds them to the segment embedding on both paths, and only with nsp
    samples = make_mixed(9, nsp=True)
    want = [reference_types(s.ids.tolist()) for s in samples if s.has_text]
    for nsp in (False, True):
        model, seen = ViTBERT(tiny(nsp=nsp)).eval(), []
        model.text.wtt.register_forward_hook(lambda m, args, out, seen=seen: seen.append(args[0]))
        with torch.no_grad():
            model(PaddedCollator()(samples))
            model(NestedCollator(pack=False)(samples))
        if not nsp:
            assert seen == []  # segment 0 everywhere, as BERT's single-segment input (HF parity)
            continue
        padded, packed = seen
        lengths = [len(w) for w in want]
        assert [padded[i, :n].tolist() for i, n in enumerate(lengths)] == want
        assert packed.tolist() == sum(want, []) and max(sum(want, [])) == 1


def test_output_rows_follow_sample_index_not_row_order() -> None:
    """A batch whose rows are stored in another order gives the same outputs, in sample-index order."""
    model = ViTBERT(tiny()).eval()
    batch = PaddedCollator()(make_mixed(9))
    flip = lambda t: t.flip(0)  # noqa: E731
    text = TextBatch(*(flip(getattr(batch.text, f.name)) for f in dataclasses.fields(TextBatch) if f.name != "masked"))
    image = dataclasses.replace(batch.image, pixels=flip(batch.image.pixels), labels=flip(batch.image.labels),
                                index=flip(batch.image.index))
    with torch.no_grad():
        a, b = model(batch), model(PaddedBatch(image, text, batch.keys))
    assert torch.equal(a.image_index, b.image_index) and bool((a.image_index.diff() > 0).all())
    assert torch.equal(a.mlm_labels, b.mlm_labels) and bool((a.mlm_index.diff() >= 0).all())
    torch.testing.assert_close(a.mlm_logits, b.mlm_logits)
    torch.testing.assert_close(a.image_logits, b.image_logits)


def make_embedding_samples(seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(7):
        if i % 2:  # text: per-token embeddings with MLM labels
            length = int(torch.randint(2, 12, (), generator=g))
            labels = torch.where(torch.rand(length, generator=g) < 0.4,
                                 torch.randint(5, VOCAB, (length,), generator=g), IGNORE_INDEX)
            emb = torch.randn(length, EMB_DIM, generator=g).half()
            out.append(Sample(f"t{i}", Modality.TEXT, emb=emb, mlm_labels=labels))
        else:  # image: pooled (D,) or per-token (1+P, D)
            shape = (EMB_DIM,) if i % 4 == 0 else (17, EMB_DIM)
            out.append(Sample(f"i{i}", Modality.IMAGE, emb=torch.randn(shape, generator=g).half(), label=i))
    return out


def test_embedding_batch_forward_backward() -> None:
    samples = make_embedding_samples()
    model = ViTBERT(tiny(emb_dim=EMB_DIM))
    batch = EmbeddingCollator()(samples)
    assert batch.values.dtype == torch.float16
    out, grads, sums = run(model, [batch])
    n_masked = sum(int((s.mlm_labels != IGNORE_INDEX).sum()) for s in samples if s.mlm_labels is not None)
    assert out.image_logits.shape == (4, 10) and out.mlm_logits.shape == (n_masked, VOCAB) and n_masked > 0
    assert out.image_index.tolist() == [0, 2, 4, 6]
    assert torch.isfinite(torch.tensor([sums["image"], sums["mlm"]])).all() and out.nsp_logits.shape == (0, 2)
    assert grads["emb_in.proj.weight"].abs().sum() > 0 and grads["emb_in.mask_emb"].abs().sum() > 0
    assert "image.patch.weight" not in grads  # the tokenizers are bypassed
    # packed rows do not see each other: one sample alone gives the same logits
    with torch.no_grad():
        full = model(batch)
        for i in (1, 2):
            alone = model(EmbeddingCollator()([samples[i]]))
            rows = full.mlm_index == i if i % 2 else full.image_index == i
            got = full.mlm_logits[rows] if i % 2 else full.image_logits[rows]
            torch.testing.assert_close(got, alone.mlm_logits if i % 2 else alone.image_logits,
                                       rtol=1e-4, atol=1e-5)


def test_embedding_batch_needs_emb_dim() -> None:
    with pytest.raises(ValueError, match="emb_dim"):
        ViTBERT(tiny())(EmbeddingCollator()(make_embedding_samples()))


def test_positions_interpolate_for_another_image_size() -> None:
    model = ViTBERT(tiny()).eval()
    assert model.image.position_embeddings(4, 4) is model.image.pos
    grid = model.image.position_embeddings(6, 5)  # (1, 1 + 30, D)
    assert grid.shape == (1, 31, 64) and torch.equal(grid[:, 0], model.image.pos[:, 0])
    with torch.no_grad():
        out = model(PaddedCollator()(make_mixed(6, size=48)))
        assert out.image_logits.shape == (4, 10) and torch.isfinite(out.image_logits).all()
        assert model.encode_images(torch.zeros(2, 3, 48, 40, dtype=torch.uint8)).shape == (2, 1 + 6 * 5, 64)


def test_pixels_stay_uint8_until_the_model_normalizes_them() -> None:
    model = ViTBERT(tiny())
    batch = PaddedCollator(pack=True)(make_mixed(6)).to("cpu")  # the one-buffer transfer path
    assert batch.image.pixels.dtype == torch.uint8
    before = batch.image.pixels.clone()
    seen = []
    model.image.patch.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model(batch)
    assert torch.equal(batch.image.pixels, before) and batch.image.pixels.dtype == torch.uint8
    x = seen[0]  # what the patch embedding saw: normalized floats
    assert x.dtype == torch.float32 and x.min() < -1.5 and x.max() > 2.0
    with pytest.raises(TypeError, match="uint8"):
        model.encode_images(before.float())


def test_dropout_training_mode_runs_on_both_paths() -> None:
    torch.manual_seed(0)  # dropout draws from the global generator; this test owns it
    model = ViTBERT(tiny(dropout=0.1)).train()
    samples = make_mixed(6)
    for batch in (PaddedCollator()(samples), NestedCollator(pack=False)(samples)):
        out = model(batch)
        (out.image_loss_sum() + out.mlm_loss_sum()).backward()
        assert torch.isfinite(model.encoder.blocks[0].attn.q.weight.grad).all()


def test_metrics_and_text_length_check() -> None:
    model = ViTBERT(tiny()).eval()
    with torch.no_grad():
        out = model(NestedCollator(pack=False)(make_mixed(6)))
    assert int(out.image_count()) == out.image_labels.numel() - 1 and int(out.mlm_count()) == out.mlm_labels.numel()
    for task in ("image", "mlm"):  # logits that name the label are all correct; logits that name another, none
        labels, width = getattr(out, f"{task}_labels"), getattr(out, f"{task}_logits").shape[1]
        right = torch.nn.functional.one_hot(labels.clamp(min=0), width).float()  # (N, C)
        wrong = torch.nn.functional.one_hot((labels.clamp(min=0) + 1) % width, width).float()  # (N, C)
        count = int(getattr(out, f"{task}_count")())
        assert int(getattr(dataclasses.replace(out, **{f"{task}_logits": right}), f"{task}_correct")()) == count
        assert int(getattr(dataclasses.replace(out, **{f"{task}_logits": wrong}), f"{task}_correct")()) == 0
    long = Sample("long", Modality.TEXT, ids=torch.full((65,), 7))
    with pytest.raises(ValueError, match="max_text_len"):
        model(NestedCollator(pack=False)([long]))


def test_parameter_groups() -> None:
    model = ViTBERT(tiny(emb_dim=EMB_DIM))
    names = dict(model.named_parameters())
    encoder = {id(p) for p in model.shared_encoder_parameters()}
    assert encoder == {id(names[n]) for n in model.parameter_names("encoder")}
    groups = {g: model.parameter_names(g) for g in FREEZE_GROUPS}
    assert all(set(group) <= names.keys() and group for group in groups.values())
    assert set(groups["position_embeddings"]) == {"image.pos", "text.wpe.weight"}
    assert "encoder.blocks.1.ln_2.weight" in groups["layer_norms"] and "text.ln.bias" in groups["layer_norms"]
    assert not set(groups["heads"]) & set(groups["encoder"]) and "emb_in.mask_emb" in groups["embeddings"]
    assert "nsp_head.out.weight" in ViTBERT(tiny(nsp=True)).parameter_names("heads")
    with pytest.raises(ValueError, match="unknown parameter group"):
        model.parameter_names("pooler")


def test_init_is_seeded_not_global() -> None:
    torch.manual_seed(1)
    a = ViTBERT(tiny(), seed=3)
    torch.manual_seed(2)
    b = ViTBERT(tiny(), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(ViTBERT(tiny(), seed=4).text.wte.weight, a.text.wte.weight)


@pytest.mark.parametrize("bad, match", [
    (dict(d_model=30, n_head=4), "divisible"),
    (dict(image_size=30), "multiple of patch_size"),
    (dict(dropout=1.0), "dropout"),
    (dict(n_layer=0), "n_layer"),
    (dict(pad_id=100), "pad_id"),
    (dict(emb_dim=0), "emb_dim"),
    (dict(sep_id=100), "sep_id"),
])
def test_config_validation(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny(**bad)


def test_presets() -> None:
    base = ModelConfig.preset("base")
    assert (base.n_layer, base.d_model, base.n_head, base.d_mlp, base.patch_size, base.image_size) == \
        (12, 768, 12, 3072, 16, 224)
    assert (base.vocab_size, base.max_text_len, base.num_classes) == (30522, 512, 10)
    assert ModelConfig.preset("small", vocab_size=123).vocab_size == 123
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.preset("tiny", widht=3)


def test_varlen_branch_plumbing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA varlen_attn branch, run on the CPU with a reference kernel: same results as the jagged SDPA path."""
    import models.vit_bert as vb

    calls = []

    def fake_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k):  # (sum T, nh, hs) each, cu int32 (B+1,)
        assert q.shape == k.shape == v.shape and q.dim() == 3 and q.is_contiguous()
        assert cu_q.dtype == torch.int32 and cu_q is cu_k and max_q == max_k == int(cu_q.diff().max())
        calls.append(max_q)
        bounds = cu_q.tolist()
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(
            *(t[lo:hi].transpose(0, 1) for t in (q, k, v))).transpose(0, 1) for lo, hi in zip(bounds, bounds[1:])])

    model = ViTBERT(tiny()).eval()
    batch = NestedCollator(pack=False)(make_mixed(9))
    with torch.no_grad():
        expected = model(batch)
        monkeypatch.setattr(vb, "varlen_attn", fake_varlen_attn)
        monkeypatch.setattr(vb, "_use_varlen", lambda q, p: True)
        got = model(batch)
    assert len(calls) == model.config.n_layer
    torch.testing.assert_close(got.mlm_logits, expected.mlm_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.image_logits, expected.image_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_nested_matches_padded() -> None:
    """On CUDA under bf16 autocast the nested path (varlen_attn where available) agrees with the padded one."""
    model = ViTBERT(tiny()).cuda()
    samples = make_mixed()
    sums = []
    for batch in (PaddedCollator()(samples), NestedCollator()(samples)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch.to("cuda"))
        sums.append((out.image_loss_sum().item(), out.mlm_loss_sum().item()))
    assert sums[1] == pytest.approx(sums[0], rel=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_nested_patch_sequences_match_padded() -> None:
    """Images of several grids on CUDA under bf16: nested's patch sequences (varlen attention where available)
    against padded's masked dense call."""
    from test_native import native_samples

    model = ViTBERT(tiny()).cuda()
    samples = native_samples(make_mixed())
    sums = []
    for batch in (PaddedCollator()(samples), NestedCollator(patch_size=8)(samples)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch.to("cuda"))
        sums.append((out.image_loss_sum().item(), out.mlm_loss_sum().item()))
    assert sums[1] == pytest.approx(sums[0], rel=2e-2)


def test_packed_segments_make_equal_length_runs_dense_and_keep_the_rest_jagged() -> None:
    from models.vit_bert import Packed

    lengths = [17, 17, 17, 30, 55, 12, 90, 12, 12]
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    assert Packed(offsets, 90).segments == [(0, 51, [17, 17, 17]), (51, 187, [30, 55, 12, 90]), (238, 24, [12, 12])]
    assert Packed(torch.tensor([0, 5]), 5).segments == [(0, 5, [5])]
