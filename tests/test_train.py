"""The trainer: it learns, masks gradients as Algorithm 1 says, freezes what it names, distills, resumes exactly."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_exactly_once, make_samples

from mmload.collate import NestedCollator, PaddedCollator, PerSampleCollator
from mmload.dataset import open_data
from mmload.masking import MLMMasking, NextSegmentPairs
from mmload.sample import IGNORE_INDEX, Modality, Sample
from mmload.tokenizer import load_tokenizer
from models.build import FREEZE_MODES, FROZEN_TRAINABLE, apply_freeze, build_model, make_optimizer
from models.checkpoint import load_checkpoint, model_state, save_checkpoint
from models.config import TrainConfig
from models.evaluate import evaluate
from models.gradmask import GradientMasker, MaskSchedule, modality_grads
from models.kd import Distiller, ImageTeacher, TextTeacher, kd_loss_sum
from models.step import PhaseTimer, StepOptions, loss_terms, summarize, train_step
from models.train import build_parser, parse_config, train

VOCAB = 100  # make_samples draws ids below 100


def tiny_model(seed: int = 0):
    return build_model("tiny", VOCAB, seed=seed)


def batches(seed: int = 0):
    """A mixed padded batch (images, texts, pairs) and its text-only and image-only halves."""
    samples = make_samples(24, seed=seed, paired_every=7)
    collate = PaddedCollator()
    texts = [s for s in samples if s.modality == Modality.TEXT]
    images = [s for s in samples if s.modality == Modality.IMAGE]
    return collate(samples), collate(texts), collate(images)


def run(options: dict) -> dict:
    """``train`` with a TrainConfig of ``options`` (the CLI's option names, with ``_``)."""
    return train(TrainConfig(**options))


def data_dir(shards: list[str]) -> str:
    return os.path.dirname(shards[0])


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning threads slow a run
    down tenfold; one thread keeps the timings steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- learning ----

@pytest.fixture(scope="module")
def learn_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Training shards with two texts per image (MLM needs text) and held-out shards from another seed."""
    from mmload.make_shards import make_shards

    root = tmp_path_factory.mktemp("learn")
    make_shards(root / "train", samples=600, seed=0, image_text_ratio=0.5, maxcount=50, progress=False)
    make_shards(root / "eval", samples=200, seed=1, image_text_ratio=1.0, maxcount=50, progress=False)
    return str(root / "train"), str(root / "eval")


def masked_tokens(data: str, tokenizer) -> collections.Counter:
    ds = open_data(data, tokenizer=tokenizer, transform=MLMMasking.from_tokenizer(tokenizer), image_size=32,
                   max_text_len=64)
    counts: collections.Counter = collections.Counter()
    for sample in ds.samples():
        if sample.mlm_labels is not None:
            counts.update(t for t in sample.mlm_labels.tolist() if t != IGNORE_INDEX)
    return counts


def unigram_cross_entropy(train: collections.Counter, held_out: collections.Counter, vocab: int) -> float:
    """What a context-free predictor learnt from the training stream's masked tokens scores on held-out ones
    (add-alpha smoothing, the best of three alphas: the baseline is given every advantage)."""
    n, m = sum(train.values()), sum(held_out.values())
    return min(-sum(c * math.log((train[t] + a) / (n + a * vocab)) for t, c in held_out.items()) / m
               for a in (0.01, 0.1, 1.0))


def test_joint_training_learns_both_tasks(learn_data: tuple[str, str], tmp_path: Path) -> None:
    train_dir, eval_dir = learn_data
    result = run({"data": train_dir, "preset": "tiny", "steps": 160, "batch_size": 32, "lr": 5e-3, "warmup": 10,
                    "num_workers": 0, "progress": False, "log_every": 40, "out": str(tmp_path)})
    tokenizer = load_tokenizer(None, [str(next(Path(train_dir).glob("*.tar")))])
    metrics = evaluate(result["model"], eval_dir, "padded", tokenizer=tokenizer, limit_samples=200)
    baseline = unigram_cross_entropy(masked_tokens(train_dir, tokenizer), masked_tokens(eval_dir, tokenizer),
                                     len(tokenizer))
    print(f"held-out: image acc {metrics['image_acc']:.3f}, MLM {metrics['mlm_loss']:.3f} nats "
          f"(unigram {baseline:.3f}), MLM acc {metrics['mlm_acc']:.3f}")
    assert metrics["images"] == 100 and metrics["mlm_tokens"] > 500
    assert metrics["image_acc"] > 0.5  # chance is 0.1
    assert metrics["mlm_loss"] < baseline - 0.1
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and any((tmp_path / "tb").iterdir())


def test_training_at_native_resolution_learns_the_images(learn_data: tuple[str, str], tmp_path: Path) -> None:
    """Each image on its own grid (aspect ratios 1:2 to 2:1, at most 16 patches), nested batches (jagged patch
    sequences in one packed call); held out, padded and nested agree and are well above chance (0.1)."""
    train_dir, eval_dir = learn_data
    result = run({"data": train_dir, "preset": "tiny", "steps": 120, "batch_size": 32, "lr": 5e-3, "warmup": 10,
                  "num_workers": 0, "progress": False, "strategy": "nested", "resolution": "native",
                  "max_patches": 16, "text_loss_weight": 0.0})
    tokenizer = load_tokenizer(None, [str(next(Path(train_dir).glob("*.tar")))])
    got = {strategy: evaluate(result["model"], eval_dir, strategy, tokenizer=tokenizer, limit_samples=200,
                              resolution="native", max_patches=16) for strategy in ("padded", "nested")}
    print(f"held-out at native resolution: image acc {got['padded']['image_acc']:.3f}")
    assert got["padded"]["images"] == 100 and got["padded"]["image_acc"] > 0.5
    assert got["nested"]["image_acc"] == pytest.approx(got["padded"]["image_acc"], abs=1e-6)


def sorted_texts(n: int, seed: int) -> list[Sample]:
    """Texts whose body is sorted ids, as sentence-order pairs: a learnable order (the first segment's first token
    is the smallest exactly when the pair is in order)."""
    g = torch.Generator().manual_seed(seed)
    pairs = NextSegmentPairs(cls_id=2, sep_id=3, seed=seed)
    out = []
    for i in range(n):
        body = torch.randint(5, VOCAB, (int(torch.randint(10, 30, (), generator=g)),), generator=g).sort().values
        ids = torch.cat([torch.tensor([2]), body, torch.tensor([3])])  # [CLS] body [SEP]
        out.append(pairs(Sample(f"{seed}-{i}", Modality.TEXT, ids=ids)))
    return out


def test_nsp_head_learns_sentence_order() -> None:
    """On the builtin shards (random word windows, cut anywhere) a tiny model stays at chance within seconds of
    training: measured 0.49-0.53 held-out accuracy after 300 steps. Sorted texts make the order learnable."""
    model = build_model("tiny", VOCAB, nsp=True, sep_id=3)
    optimizer = make_optimizer(model, 3e-3)
    train_set, held_out = sorted_texts(512, seed=0), NestedCollator()(sorted_texts(256, seed=1)).to("cpu")
    for step in range(60):
        part = train_set[step % 16 * 32:][:32]
        train_step(model, [NestedCollator()(part).to("cpu")], optimizer, StepOptions(grad_clip=1.0))
    with torch.no_grad():
        metrics = summarize(loss_terms(model.eval()(held_out)).stats, nsp=True)
    print(f"held-out NSP: acc {metrics['nsp_acc']:.3f}, loss {metrics['nsp_loss']:.3f}")
    assert metrics["nsp_pairs"] == 256 and metrics["nsp_acc"] > 0.8 and metrics["nsp_loss"] < 0.5  # chance: 0.693


def test_nsp_weight_sits_inside_the_text_term() -> None:
    pairs = NextSegmentPairs(cls_id=2, sep_id=3)
    batch = PaddedCollator()([pairs(s) for s in make_samples(24, paired_every=7, max_len=60)])
    out = build_model("tiny", VOCAB, nsp=True, sep_id=3)(batch)
    terms = loss_terms(out, 0.5, nsp_weight=2.0)
    assert int(out.nsp_count()) > 2
    mean = lambda task: getattr(out, f"{task}_loss_sum")() / getattr(out, f"{task}_count")()  # noqa: E731
    torch.testing.assert_close(terms.image, mean("image"))
    torch.testing.assert_close(terms.text, 0.5 * (mean("mlm") + 2.0 * mean("nsp")))
    stats = terms.stats.tolist()
    assert len(stats) == 9 and summarize(stats, 0.5, 2.0, nsp=True)["loss"] == pytest.approx(terms.total.item())
    assert summarize(stats[:6]).keys() == summarize(stats).keys()  # six-stat callers still work, no NSP keys
    assert "nsp_acc" not in summarize(stats) and summarize(stats, nsp=True)["nsp_pairs"] == int(out.nsp_count())


def test_nsp_run_reports_nsp_metrics(builtin_shards: list[str], tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    data = data_dir(builtin_shards)
    result = run({"data": data, "preset": "tiny", "nsp": True, "nsp_weight": 0.5, "steps": 6, "batch_size": 16,
                    "log_every": 3, "num_workers": 0, "progress": False, "out": str(tmp_path)})
    tokenizer = load_tokenizer(None, builtin_shards)
    config = result["model"].config
    assert config.nsp and config.sep_id == tokenizer.sep_token_id and result["model"].nsp_head is not None
    assert result["nsp_pairs"] > 0 and math.isfinite(result["nsp_loss"])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all('"nsp_loss"' in line and '"image_loss"' in line for line in lines)
    last = json.loads(lines[-1])  # the result is the last window's record: correct pairs / pairs, a count ratio
    assert (last["nsp_acc"], last["nsp_pairs"]) == (result["nsp_acc"], result["nsp_pairs"])
    correct = result["nsp_acc"] * result["nsp_pairs"]
    assert correct == pytest.approx(round(correct), abs=1e-6) and 0 <= round(correct) <= result["nsp_pairs"]
    capsys.readouterr()
    evaluated = run({"data": data, "eval_only": True, "limit_samples": 60, "resume": result["checkpoint"]})
    assert evaluated["nsp_pairs"] > 0 and evaluated["nsp_acc"] is not None  # the checkpoint's config says nsp
    with pytest.raises(ValueError, match="--nsp pairs token ids"):
        run({"data": data, "nsp": True, "strategy": "embeddings", "steps": 1})


# ---- gradient masking ----

def test_mask_ratio_grows_on_schedule_and_the_mask_is_recomputed_only_then() -> None:
    schedule = MaskSchedule(step=0.1, interval=3, final=0.25)
    assert [schedule.ratio(i) for i in range(9)] == pytest.approx([0.1] * 3 + [0.2] * 3 + [0.25] * 3)
    params = [torch.nn.Parameter(torch.zeros(40, 5)), torch.nn.Parameter(torch.zeros(100))]
    masker = GradientMasker(params, schedule)
    updated = []
    for i in range(9):
        g = torch.Generator().manual_seed(i)
        grads = [torch.randn(p.shape, generator=g) for p in params]  # no ties
        if masker.update(i, grads):
            updated.append(i)
            flat = torch.cat([g.abs().flatten() for g in grads])
            top = flat >= flat.kthvalue(flat.numel() - round(masker.ratio * flat.numel()) + 1).values
            assert torch.equal(torch.cat([m.flatten() for m in masker.masks]), top)  # top-k by |text grad|
        assert masker.masked_fraction() == pytest.approx(schedule.ratio(i))
    assert updated == [0, 3, 6]


def test_text_gradient_updates_masked_shared_entries_image_gradient_the_rest() -> None:
    model = tiny_model()
    optimizer = make_optimizer(model, lr=1e-3)
    shared = list(model.shared_encoder_parameters())
    others = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    masker = GradientMasker(shared, MaskSchedule(step=0.3, interval=100, final=0.6), others)
    mixed, texts, images = batches()
    train_step(model, [mixed], optimizer, masker=masker, step=0)
    assert masker.ratio == pytest.approx(0.3) and masker.masked_fraction() == pytest.approx(0.3, abs=1e-4)
    masks = [m.clone() for m in masker.masks]

    # a mixed batch: shared grads are where(M, text grad, image grad); both sides nonzero
    terms = loss_terms(model(mixed))
    g_text, g_image = modality_grads(terms.text, terms.image, shared)
    train_step(model, [mixed], optimizer, masker=masker, step=1)
    for p, m, gt, gi in zip(shared, masks, g_text, g_image):
        torch.testing.assert_close(p.grad, torch.where(m, gt, gi), rtol=1e-5, atol=1e-8)

    # text only: the shared gradient lives inside the mask; image only: outside it
    for batch, inside in ((texts, True), (images, False)):
        train_step(model, [batch], optimizer, masker=masker, step=1)
        assert all(torch.equal(a, b) for a, b in zip(masks, masker.masks)), "mask must not change between growths"
        touched_inside = sum(int((p.grad[m] != 0).sum()) for p, m in zip(shared, masks))
        touched_outside = sum(int((p.grad[~m] != 0).sum()) for p, m in zip(shared, masks))
        assert (touched_inside > 0, touched_outside > 0) == (inside, not inside)
    # non-shared parameters get their own modality's gradient: the image-only step leaves the MLM head alone
    assert all(p.grad.abs().sum() == 0 for p in model.mlm_head.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.image_head.parameters())


# ---- freezing and distillation ----

@pytest.mark.parametrize("mode", FREEZE_MODES)
def test_freeze_modes_train_exactly_the_parameters_they_name(mode: str) -> None:
    model = tiny_model()
    trainable = set(apply_freeze(model, mode))
    all_names = {n for n, _ in model.named_parameters()}
    if mode == "frozen":
        assert trainable == {n for g in FROZEN_TRAINABLE for n in model.parameter_names(g)}
        assert "encoder.blocks.0.ln_1.weight" in trainable and "encoder.blocks.0.attn.q.weight" not in trainable
        assert {"image.pos", "text.wpe.weight", "text.wte.weight", "image_head.out.weight"} <= trainable
    else:
        assert trainable == all_names
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, [batches()[0]], make_optimizer(model, lr=1e-2))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_scratch_refuses_pretrained_init() -> None:
    with pytest.raises(ValueError, match="scratch"):
        run({"freeze": "scratch", "init_bert": "/nonexistent"})


def test_kd_with_alpha_zero_is_plain_cross_entropy_exactly() -> None:
    model = tiny_model()
    out = model(batches()[0])
    g = torch.Generator().manual_seed(0)
    teacher = (torch.randn(out.image_logits.shape, generator=g), torch.randn(out.mlm_logits.shape, generator=g))
    plain = loss_terms(out)
    kd0 = loss_terms(out, teacher=teacher, distiller=Distiller(alpha=0.0, temperature=3.0))
    assert torch.equal(kd0.total, plain.total)
    params = list(model.parameters())
    grads_plain = torch.autograd.grad(plain.total, params, retain_graph=True, allow_unused=True)
    grads_kd0 = torch.autograd.grad(kd0.total, params, retain_graph=True, allow_unused=True)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads_plain, grads_kd0))

    # alpha > 0: the formula, row by row, over labelled rows only
    alpha, T = 0.3, 2.0
    s, t, y = out.image_logits, teacher[0], out.image_labels
    keep = y != IGNORE_INDEX
    p_t = torch.softmax(t[keep] / T, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s[keep] / T, -1))).sum()
    ce = torch.nn.functional.cross_entropy(s, y, reduction="sum", ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(kd_loss_sum(s, y, t, alpha, T), (1 - alpha) * ce + alpha * T * T * kl)


@pytest.fixture(scope="module")
def bert_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    path = tmp_path_factory.mktemp("bert_teacher")
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(path)
    return path


def test_teachers_give_logits_row_for_row_with_the_student(bert_teacher: Path, tmp_path: Path) -> None:
    samples = make_samples(18, seed=3, paired_every=5)
    ways = [PaddedCollator()(samples), NestedCollator()(samples).to("cpu"), PerSampleCollator()(samples)]
    model = tiny_model().eval()
    text_teacher = TextTeacher(bert_teacher, VOCAB)
    logits = [text_teacher(b) for b in ways]
    assert logits[0].shape == model(ways[0]).mlm_logits.shape
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="vocab_size 100 but our tokenizer has 5000"):
        TextTeacher(bert_teacher, 5000)

    # a teacher that is the student itself: same logits in the same rows, so the KL term vanishes
    path = save_checkpoint(tmp_path / "teacher.pt", model_state(model))
    image_teacher = ImageTeacher(path, num_classes=10)
    for batch in ways:
        out = model(batch)
        torch.testing.assert_close(image_teacher(batch), out.image_logits, rtol=1e-5, atol=1e-5)


# ---- resume, evaluation, CLI ----

@pytest.mark.parametrize("num_workers,strategy,mask_ratio", [(0, "nested", 0.5), (2, "bucketed", 0.0)])
def test_resume_gives_the_same_weights_as_a_straight_run(builtin_shards: list[str], tmp_path: Path,
                                                          num_workers: int, strategy: str, mask_ratio: float) -> None:
    # 24 steps of 16 cross the first epoch's end (300 samples); the mask grows at steps 0, 5, 10 (ratio 0.5)
    opts = {"data": data_dir(builtin_shards), "preset": "tiny", "steps": 24, "batch_size": 16, "lr": 3e-3,
            "warmup": 4, "num_workers": num_workers, "strategy": strategy, "mask_ratio": mask_ratio,
            "mask_step": 0.2, "mask_interval": 5, "progress": False, "save_every": 12, "log_every": 6}
    straight = run({**opts, "out": str(tmp_path / "straight")})
    half = tmp_path / "straight" / "checkpoint-0000012.pt"
    assert load_checkpoint(half)["step"] == 12
    resumed = run({**opts, "out": str(tmp_path / "resumed"), "resume": str(half)})
    assert resumed["step"] == straight["step"] == 24
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("resolution", ["square", "native"])
def test_eval_only_gives_every_strategy_the_same_samples(builtin_shards: list[str], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture, resolution: str) -> None:
    """Native resolution too: the builtin images' sizes and aspect ratios vary, so batches mix grids (trained with
    2 loader workers: the image sizes travel through the DataLoader)."""
    data = data_dir(builtin_shards)
    ckpt = run({"data": data, "preset": "tiny", "steps": 3, "batch_size": 8, "num_workers": 2, "progress": False,
                "out": str(tmp_path), "resolution": resolution})["checkpoint"]
    capsys.readouterr()
    results = {}
    for strategy in ("padded", "per-sample", "nested", "bucketed"):
        results[strategy] = run({"data": data, "strategy": strategy, "eval_only": True, "limit_samples": 60,
                                 "batch_size": 16, "resume": ckpt, "resolution": resolution})
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 1 and '"image_acc"' in lines[0] and '"mlm_acc"' in lines[0]
    ref = results["padded"]
    assert ref["samples"] == 60 and ref["images"] > 0 and ref["mlm_tokens"] > 0
    for r in results.values():
        assert (r["images"], r["mlm_tokens"]) == (ref["images"], ref["mlm_tokens"])
        for key in ("image_loss", "mlm_loss", "image_acc", "mlm_acc"):
            assert r[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (r["strategy"], key)


def test_phase_timer_times_the_training_step_without_changing_it() -> None:
    """The benchmark's timing hook: every phase of the real train_step is timed, and the step is the same."""
    timed, plain = tiny_model(), tiny_model()
    timer = PhaseTimer(torch.device("cpu"))
    opts = StepOptions(text_loss_weight=0.5, grad_clip=1.0)
    stats = train_step(timed, [batches()[0]], make_optimizer(timed, 1e-3), opts, timer=timer)
    assert set(timer.seconds) == {"forward", "backward", "optimizer"} and all(timer.seconds.values())
    assert torch.equal(stats, train_step(plain, [batches()[0]], make_optimizer(plain, 1e-3), opts))
    for a, b in zip(timed.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    before = dict(timer.seconds)
    train_step(timed, [batches()[0], batches()[0]], make_optimizer(timed, 1e-3), opts, timer=timer)
    assert all(timer.seconds[p] > before[p] for p in before)  # phases add up over steps and micro-batches


def test_grad_accumulation_of_identical_halves_equals_one_step() -> None:
    mixed = batches()[0]
    models = [tiny_model(), tiny_model()]
    opts = [make_optimizer(m, 1e-3) for m in models]
    train_step(models[0], [mixed], opts[0], StepOptions(grad_clip=1.0))
    train_step(models[1], [mixed, mixed], opts[1], StepOptions(grad_clip=1.0))
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_help_explains_every_option() -> None:
    parser = build_parser()
    assert all(action.help for action in parser._actions), "every CLI option needs a help text"
    text = parser.format_help()
    for option in ("--data", "--strategy", "--preset", "--steps", "--batch-size", "--lr", "--out", "--kd-alpha",
                   "--mask-ratio", "--freeze", "--resume", "--eval-only", "--limit-samples", "--grad-accum",
                   "--nsp", "--nsp-weight"):
        assert option in text


def test_hf_vit_initializes_the_model_and_teaches_it(builtin_shards: list[str], tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                       image_size=32, patch_size=8, num_labels=10)
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    vit = str(tmp_path / "vit")
    result = run({"data": data_dir(builtin_shards), "preset": "tiny", "init_vit": vit, "freeze": "frozen",
                    "kd_alpha": 0.5, "kd_temperature": 2.0, "image_teacher": vit, "steps": 2, "batch_size": 8,
                    "num_workers": 0, "progress": False})
    model = result["model"]
    sd = ViTForImageClassification.from_pretrained(vit).vit.state_dict()
    key = next(k for k in sd if k.endswith(("layers.1.attention.q_proj.weight",  # transformers 5, then 4
                                            "layer.1.attention.attention.query.weight")))
    assert torch.equal(model.get_parameter("encoder.blocks.1.attn.q.weight"), sd[key])  # frozen: the checkpoint's
    assert result["step"] == 2 and result["image_loss"] is not None


def test_the_cli_fills_one_frozen_validated_config() -> None:
    assert parse_config([]) == TrainConfig()  # the CLI's defaults are TrainConfig's
    cfg = parse_config(["--strategy", "nested", "--data", "a/{0..3}.tar", "--data", "b@2", "--steps", "5"])
    assert (cfg.strategy, cfg.data, cfg.steps) == ("nested", ("a/{0..3}.tar", "b@2"), 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 6
    for bad, match in (({"steps": 0}, "--steps must be >= 1, got 0"), ({"strategy": "bogus"}, "unknown strategy"),
                       ({"mask_prob": 1.5}, "--mask-prob"), ({"teacher_logits": True}, "--teacher-logits")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)
    with pytest.raises(TypeError, match="TrainConfig"):
        train({"steps": 1})


def test_log_keys_trimmed_metrics_and_pruned_checkpoints_read_as_one_run(builtin_shards: list[str],
                                                                          tmp_path: Path) -> None:
    """--log-keys writes every micro-batch's keys; a resume into the same --out trims both files back to the
    resumed step, so each step appears once and the keys are the straight run's; --keep-checkpoints prunes; a
    killed save's temporary file is cleaned up."""
    opts = {"data": data_dir(builtin_shards), "preset": "tiny", "steps": 6, "batch_size": 8, "grad_accum": 2,
            "num_workers": 0, "progress": False, "log_every": 1, "save_every": 2, "log_keys": True}
    run({**opts, "out": str(tmp_path / "straight")})
    straight = [json.loads(x) for x in (tmp_path / "straight" / "keys-rank0.jsonl").read_text().splitlines()]
    assert [(r["step"], r["micro"]) for r in straight] == [(s, m) for s in range(1, 7) for m in range(2)]
    assert all(len(r["keys"]) == 8 and r["epoch"] == 0 for r in straight)
    assert_exactly_once([k for r in straight for k in r["keys"]], {k for r in straight for k in r["keys"]})

    out = tmp_path / "resumed"
    run({**opts, "out": str(out), "keep_checkpoints": 2})
    assert [p.name for p in sorted(out.glob("checkpoint-*.pt"))] == ["checkpoint-0000004.pt", "checkpoint-0000006.pt"]
    (out / ".checkpoint-0000005.pt.tmp-123").write_bytes(b"half a save")  # as a save killed mid-write leaves it
    run({**opts, "out": str(out), "keep_checkpoints": 2, "resume": str(out / "checkpoint-0000004.pt")})
    resumed = [json.loads(x) for x in (out / "keys-rank0.jsonl").read_text().splitlines()]
    assert resumed == straight
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not list(out.glob(".checkpoint-*")) and len(list(out.glob("checkpoint-*.pt"))) == 2
    with pytest.raises(ValueError, match="--log-keys writes"):
        TrainConfig(log_keys=True)

    # a resume from an older checkpoint drops the later ones it makes obsolete, and a line a crash cut short
    with (out / "keys-rank0.jsonl").open("a") as f:
        f.write('{"step": 7, "micro": 0, "epoch": 0, "keys": ["a", "b')
    again = run({**opts, "out": str(out), "steps": 5, "keep_checkpoints": 1, "save_every": 1,
                 "resume": str(out / "checkpoint-0000004.pt")})
    assert [p.name for p in out.glob("checkpoint-*.pt")] == ["checkpoint-0000005.pt"]
    assert Path(again["checkpoint"]).name == "checkpoint-0000005.pt"
    assert [json.loads(x)["step"] for x in (out / "keys-rank0.jsonl").read_text().splitlines()] == \
        [s for s in range(1, 6) for _ in range(2)]
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match=r"read_timeout must be .*--read-timeout"):
            TrainConfig(read_timeout=bad)


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(builtin_shards: list[str], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from models import checkpoint
    from models.train import main

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    argv = ["--data", data_dir(builtin_shards), "--preset", "tiny", "--steps", "1", "--batch-size", "4",
            "--num-workers", "0", "--out", str(tmp_path), "--save-every", "1", "--device", "cpu"]
    assert main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1:] == [
        "python -m models.train: error: [Errno 28] No space left on device"]
    assert not [p.name for p in tmp_path.glob("*.pt*")]  # no checkpoint, whole or partial
