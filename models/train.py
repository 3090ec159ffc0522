"""``python -m models.train``: joint image-classification + MLM pretraining of ViT-BERT on mixed mmload streams.

The objective is the ViT-BERT paper's "Joint" baseline,

    loss = image_loss_mean + text_loss_weight * (mlm_loss_mean + nsp_weight * nsp_loss_mean)

(the NSP term with ``--nsp`` only: sentence-order pairs from ``mmload.masking.NextSegmentPairs``), with means
taken from the summed losses and counts of ``ModelOutput`` (NOTE [loss normalization]), optional knowledge
distillation (``models.kd``) and optional iterative gradient masking (``models.gradmask``). Runs alone
or under ``torchrun`` (DistributedDataParallel, shards split by rank), checkpoints and resumes exactly (model,
optimizer, schedule, RNG, gradient mask and the loader's position), and writes ``OUT/metrics.jsonl`` and
TensorBoard scalars under ``OUT/tb``. ``--eval-only --limit-samples K`` prints one JSON line of mean losses and
accuracies on the first K samples of the stream, the same samples for every strategy.

Functions for tests and benchmarks (no subprocess needed):

* ``train(args) -> dict``: a whole run; ``args`` is an ``argparse.Namespace``, an argv list or a dict of options
  (``{"steps": 10, "preset": "tiny"}``, names as the CLI's with ``_``); returns the final metrics, the step, the
  checkpoint path and the bare ``model``.
* ``build_model(preset, vocab_size, ...) -> ViTBERT``, ``apply_freeze(model, mode) -> list[str]``.
* ``train_step(model, batches, optimizer, opts, ...) -> Tensor``: one optimizer step over ``grad_accum``
  device batches (DDP, KD and gradient masking aware); returns the summed statistics (``STAT_NAMES``).
* ``step_phases(model, batch, optimizer, text_loss_weight) -> dict``: one plain optimizer step on one device
  batch, timed per phase for the benchmark: ``forward_s`` (forward and loss), ``backward_s``, ``optimizer_s``
  (the device is synchronized before each clock read; each phase is a ``record_function`` range for the
  profiler), plus ``loss``, ``images`` and ``mlm_tokens``.
* ``evaluate(model, data, strategy, tokenizer=..., limit_samples=K) -> dict``: mean losses and accuracies.

NOTE [loss normalization]: each micro-batch's summed losses are divided by that micro-batch's counts summed over
all ranks (one tiny all-reduce, no host sync) and multiplied by ``world_size / grad_accum``. DDP averages
gradients over ranks, so one step's gradient is the exact mean over the global micro-batch, averaged over the
``grad_accum`` micro-batches (counts of later micro-batches are not known before their forward). A modality
absent from a micro-batch everywhere contributes 0 (count clamped to 1).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import record_function

from mmload.bucketing import BucketBatcher
from mmload.dataset import expand_urls, open_data, parse_data
from mmload.loader import STRATEGIES, make_collator, make_loader
from mmload.masking import Compose, MLMMasking, NextSegmentPairs
from mmload.shards import manifest_beside
from mmload.staging import PackedBatch
from models.checkpoint import NAME, load_checkpoint, model_from_state, model_state, save_checkpoint
from models.config import ModelConfig
from models.gradmask import GradientMasker, MaskSchedule
from models.hf_init import config_from_hf_bert, config_from_hf_vit, load_hf_bert, load_hf_vit
from models.kd import Distiller, ImageTeacher, ShardImageTeacher, TextTeacher, kd_loss_sum
from models.schedule import warmup_poly_scheduler
from models.vit_bert import ModelOutput, ViTBERT

FREEZE_MODES = ("full", "frozen", "scratch")
FROZEN_TRAINABLE = ("embeddings", "position_embeddings", "layer_norms", "heads")  # Frozen Pretrained Transformer
STAT_NAMES = ("image_loss_sum", "image_count", "image_correct", "mlm_loss_sum", "mlm_count", "mlm_correct",
              "nsp_loss_sum", "nsp_count", "nsp_correct")  # NSP last: the first six keep their places


# ---- command line ----

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m models.train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Joint image-classification + masked-language-model pretraining of ViT-BERT on mixed "
                    "image/text webdataset shards, with one of mmload's five batching strategies.")
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", metavar="SHARDS[@WEIGHT]",
                   help="shards: a path, brace pattern (a/{000..009}.tar) or folder of *.tar; repeat to blend "
                        "several sources by WEIGHT. Default: the cached builtin shards (made on first use)")
    g.add_argument("--strategy", default="padded", choices=STRATEGIES, help="how a list of samples becomes a batch")
    g.add_argument("--batch-size", type=int, default=32, help="samples per micro-batch and process")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes per process")
    g.add_argument("--tokenizer", metavar="NAME_OR_PATH",
                   help="HF tokenizer for the texts; default: the one saved beside the first shard")
    g.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                   help="read shards and samples in order (training shuffles by default)")
    g.add_argument("--mask-prob", type=float, default=0.15, help="MLM masking probability per token")
    g.add_argument("--nsp", action="store_true",
                   help="add next-sentence prediction: each long enough text is cut in two segments, kept in order "
                        "or swapped (ALBERT's sentence order), and a head on [CLS] tells which")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="small", choices=sorted(ModelConfig.PRESETS), help="model size")
    g.add_argument("--num-classes", type=int, help="image classes; default: from the shards' manifest, else 10")
    g.add_argument("--image-size", type=int, help="override the preset's image size (pixels, square)")
    g.add_argument("--max-text-len", type=int, help="override the preset's number of text positions")
    g.add_argument("--dropout", type=float, help="override the preset's dropout")
    g.add_argument("--emb-dim", type=int, help="width of precomputed embeddings (embeddings strategy); default: "
                                               "read from the first sample")
    g.add_argument("--freeze", default="full", choices=FREEZE_MODES,
                   help="full: train everything; frozen: train only embeddings, position embeddings, layer norms "
                        "and heads (Frozen Pretrained Transformer); scratch: random init, train everything")
    g.add_argument("--init-bert", metavar="PATH", help="initialize text tokenizer + shared encoder from a local HF "
                                                       "BERT checkpoint (encoder widths come from it)")
    g.add_argument("--init-vit", metavar="PATH", help="initialize image tokenizer + shared encoder from a local HF "
                                                      "ViT checkpoint (encoder widths come from it)")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases, norms)")
    g.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (capped at --steps)")
    g.add_argument("--power", type=float, default=1.0, help="power of the polynomial decay after warm-up")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this; 0: no clipping")
    g.add_argument("--text-loss-weight", type=float, default=1.0, help="weight of the MLM (+ NSP) mean loss")
    g.add_argument("--nsp-weight", type=float, default=1.0, help="weight of the NSP mean loss within the text term")
    g.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                   help="autocast dtype on CUDA; the CPU always runs fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights, the data order and the MLM masks")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    g = p.add_argument_group("knowledge distillation")
    g.add_argument("--kd-alpha", type=float, default=0.0,
                   help="loss = (1-alpha)*CE + alpha*T^2*KL(teacher || student); 0: no distillation")
    g.add_argument("--kd-temperature", type=float, default=1.0, help="softmax temperature T of the KD term")
    g.add_argument("--text-teacher", metavar="HF_PATH", help="HF masked LM (e.g. BertForMaskedLM) with our "
                                                             "vocabulary, for MLM distillation")
    g.add_argument("--image-teacher", metavar="PATH", help="HF image classifier folder or mmload checkpoint file, "
                                                           "for image distillation")
    g.add_argument("--teacher-logits", action="store_true",
                   help="image distillation from the teacher logits that `mmload precompute --teacher` stored in "
                        "the shards (with --strategy embeddings)")
    g = p.add_argument_group("gradient masking (ViT-BERT Algorithm 1)")
    g.add_argument("--mask-ratio", type=float, default=0.0, help="final fraction of shared-encoder entries updated "
                                                                 "by the text gradient; 0: no gradient masking")
    g.add_argument("--mask-step", type=float, default=0.1, help="first mask ratio and its increment")
    g.add_argument("--mask-interval", type=int, default=1000, help="steps between mask-ratio increments (the "
                                                                    "mask is recomputed at each)")
    g = p.add_argument_group("output, checkpoints, evaluation")
    g.add_argument("--out", metavar="DIR", help="write metrics.jsonl, tb/ and checkpoint-STEP.pt here; none if unset")
    g.add_argument("--log-every", type=int, default=10, help="steps between metric lines")
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: only the final one)")
    g.add_argument("--resume", metavar="PATH", help="continue from a checkpoint file or the latest in a folder; with "
                                                    "--eval-only: the weights to evaluate")
    g.add_argument("--eval-only", action="store_true", help="evaluate, print one JSON line and exit")
    g.add_argument("--limit-samples", type=int, default=1000, help="--eval-only: evaluate the first K samples")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _as_namespace(args: argparse.Namespace | Sequence[str] | dict[str, Any] | None) -> argparse.Namespace:
    if isinstance(args, argparse.Namespace):
        return args
    if args is None or isinstance(args, list | tuple):
        return parse_args(args)
    ns = parse_args([])
    unknown = sorted(set(args) - set(vars(ns)))
    if unknown:
        raise ValueError(f"unknown train options {unknown}; valid: {sorted(vars(ns))}")
    for key, value in args.items():
        if key == "data" and value is not None:  # one spec or a list of specs, as repeated --data
            value = [os.fspath(value)] if isinstance(value, str | os.PathLike) else [os.fspath(v) for v in value]
        setattr(ns, key, value)
    return ns


def _check_args(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "grad_accum", "log_every", "limit_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("num_workers", "save_every", "warmup", "grad_clip", "text_loss_weight", "nsp_weight",
                 "mask_ratio"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.init_bert and args.init_vit:
        raise ValueError("--init-bert and --init-vit both initialize the shared encoder (post-LN BERT vs pre-LN "
                         "ViT blocks); pick one")
    if args.freeze == "scratch" and (args.init_bert or args.init_vit):
        raise ValueError("--freeze scratch means random initialization; drop --init-bert/--init-vit or use "
                         "--freeze full|frozen")
    if args.kd_alpha > 0 and not (args.text_teacher or args.image_teacher or args.teacher_logits):
        raise ValueError(f"--kd-alpha {args.kd_alpha} needs a teacher: --text-teacher, --image-teacher or "
                         "--teacher-logits")
    if args.teacher_logits and args.image_teacher:
        raise ValueError("--teacher-logits and --image-teacher are two image teachers; pick one")
    if args.nsp and args.strategy == "embeddings":
        raise ValueError("--nsp pairs token ids, which precomputed embeddings do not have; use another --strategy")
    if args.teacher_logits and args.strategy != "embeddings":
        raise ValueError("--teacher-logits reads logits stored beside precomputed embeddings: use --strategy "
                         "embeddings on shards written by `mmload precompute --teacher`")


# ---- model, freezing, optimizer ----

def build_model(preset: str, vocab_size: int, *, num_classes: int = 10, init_bert: str | None = None,
                init_vit: str | None = None, seed: int = 0, **overrides: Any) -> ViTBERT:
    """A ViTBERT from ``preset`` (random init from ``seed``), or shaped after and loaded from a local HF BERT
    (``init_bert``: image fields from the preset) or ViT (``init_vit``: text positions from the preset).
    ``overrides`` replace ModelConfig fields (``image_size``, ``max_text_len``, ``dropout``, ``emb_dim``...)."""
    if preset not in ModelConfig.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(ModelConfig.PRESETS)}")
    base = ModelConfig.PRESETS[preset]
    fields = {"vocab_size": vocab_size, "num_classes": num_classes, **overrides}
    if init_bert and init_vit:
        raise ValueError("init_bert and init_vit both initialize the shared encoder; pick one")
    if init_bert:
        config = config_from_hf_bert(init_bert)
        if config.vocab_size != vocab_size:
            raise ValueError(f"--init-bert {init_bert} has a {config.vocab_size}-word vocabulary, our tokenizer "
                             f"{vocab_size}; tokenize with the checkpoint's tokenizer: --tokenizer {init_bert}")
        keep = {k: base[k] for k in ("image_size", "patch_size", "max_text_len") if k in base}
        config = dataclasses.replace(config, **{**keep, **fields})
    elif init_vit:
        keep = {k: base[k] for k in ("max_text_len",) if k in base}
        config = config_from_hf_vit(init_vit, **{**keep, **fields})
    else:
        config = ModelConfig.preset(preset, **fields)
    model = ViTBERT(config, seed=seed)
    if init_bert:
        load_hf_bert(model, init_bert)
    if init_vit:
        load_hf_vit(model, init_vit)
    return model


def apply_freeze(model: ViTBERT, mode: str) -> list[str]:
    """Set ``requires_grad`` for ``mode`` (see ``FREEZE_MODES``); returns the names of the trainable parameters."""
    if mode not in FREEZE_MODES:
        raise ValueError(f"unknown freeze mode {mode!r}; choose one of {FREEZE_MODES}")
    trainable = {n for n, _ in model.named_parameters()}
    if mode == "frozen":
        trainable = {n for group in FROZEN_TRAINABLE for n in model.parameter_names(group)}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return [n for n, _ in model.named_parameters() if n in trainable]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def unwrap(model: nn.Module) -> ViTBERT:
    return model.module if isinstance(model, DDP) else model


# ---- losses and one optimizer step ----

@dataclass
class LossTerms:
    image: torch.Tensor  # image term of the objective, normalized and scaled, for backward
    text: torch.Tensor  # text_loss_weight x (MLM term + nsp_weight x NSP term)
    stats: torch.Tensor  # (9,) detached sums in STAT_NAMES order (plain CE, even with KD)

    @property
    def total(self) -> torch.Tensor:
        return self.image + self.text


def loss_counts(out: ModelOutput) -> torch.Tensor:
    """(3,) float: the loss targets of ``out`` [images, masked tokens, NSP pairs], the denominators of the means."""
    return torch.stack([out.image_count(), out.mlm_count(), out.nsp_count()]).float()


def loss_terms(out: ModelOutput, text_loss_weight: float = 1.0, *, counts: torch.Tensor | None = None,
               scale: float = 1.0, teacher: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
               distiller: Distiller | None = None, nsp_weight: float = 1.0) -> LossTerms:
    """The two objective terms of ``out``: summed (KD) losses / ``counts`` (3,) (``loss_counts``) x ``scale``.

    ``counts`` defaults to ``out``'s own; a zero count divides by 1 (its sum is 0 too). No KD on NSP.
    """
    local = loss_counts(out)  # (3,)
    denom = (local if counts is None else counts).clamp(min=1)
    alpha, T = (distiller.alpha, distiller.temperature) if distiller is not None else (0.0, 1.0)
    image_sum = kd_loss_sum(out.image_logits, out.image_labels, teacher[0], alpha, T)
    mlm_sum = kd_loss_sum(out.mlm_logits, out.mlm_labels, teacher[1], alpha, T)
    nsp_sum = out.nsp_loss_sum()
    with torch.no_grad():
        image_ce = image_sum if teacher[0] is None else out.image_loss_sum()
        mlm_ce = mlm_sum if teacher[1] is None else out.mlm_loss_sum()
        stats = torch.stack([image_ce.detach(), local[0], out.image_correct().float(),
                             mlm_ce.detach(), local[1], out.mlm_correct().float(),
                             nsp_sum.detach(), local[2], out.nsp_correct().float()])  # (9,)
    text = mlm_sum / denom[1] + nsp_weight * nsp_sum / denom[2]
    return LossTerms(image=image_sum / denom[0] * scale, text=text_loss_weight * text * scale, stats=stats)


def summarize(stats: torch.Tensor | Sequence[float], text_loss_weight: float = 1.0, nsp_weight: float = 1.0, *,
              nsp: bool = False) -> dict[str, float | None]:
    """Means and accuracies from summed ``STAT_NAMES``; None where a modality had no targets. ``nsp`` (the model
    has the head) adds ``nsp_loss``, ``nsp_acc`` and ``nsp_pairs``; the first six stats alone are accepted too."""
    s = dict.fromkeys(STAT_NAMES, 0.0) | dict(zip(STAT_NAMES, [float(x) for x in stats]))

    def ratio(a: str, b: str) -> float | None:
        return s[a] / s[b] if s[b] else None

    image_loss, mlm_loss = ratio("image_loss_sum", "image_count"), ratio("mlm_loss_sum", "mlm_count")
    nsp_loss = ratio("nsp_loss_sum", "nsp_count")
    loss = (image_loss or 0.0) + text_loss_weight * ((mlm_loss or 0.0) + nsp_weight * (nsp_loss or 0.0))
    out = {"loss": loss, "image_loss": image_loss, "mlm_loss": mlm_loss,
           "image_acc": ratio("image_correct", "image_count"), "mlm_acc": ratio("mlm_correct", "mlm_count"),
           "images": int(s["image_count"]), "mlm_tokens": int(s["mlm_count"])}
    if nsp:
        out |= {"nsp_loss": nsp_loss, "nsp_acc": ratio("nsp_correct", "nsp_count"), "nsp_pairs": int(s["nsp_count"])}
    return out


@dataclass
class StepOptions:
    text_loss_weight: float = 1.0
    grad_clip: float = 0.0  # max gradient norm; 0: no clipping
    precision: str = "bf16"  # autocast dtype on CUDA (the CPU runs fp32)
    nsp_weight: float = 1.0  # within the text term; no effect without an NSP head


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def train_step(model: nn.Module, batches: Sequence[Any], optimizer: torch.optim.Optimizer,
               opts: StepOptions | None = None, *, scheduler: Any = None, masker: GradientMasker | None = None,
               distiller: Distiller | None = None, step: int = 0) -> torch.Tensor:
    """One optimizer step over ``batches`` (the micro-batches, already on the device); returns the (9,) stats.

    ``model`` is a ViTBERT or a DDP around one. With ``masker`` the text and image gradients of the shared encoder
    are taken separately and combined by the mask (see ``models.gradmask``; under DDP the masker all-reduces them,
    not DDP). ``step`` is the optimizer step index, for the mask schedule. Gradients stay in ``.grad``.
    """
    opts = opts or StepOptions()
    ddp = isinstance(model, DDP)
    world = _world() if ddp else 1
    raw = unwrap(model)
    device = raw.mlm_head.out.weight.device
    optimizer.zero_grad(set_to_none=True)
    totals = torch.zeros(len(STAT_NAMES), device=device)
    for i, batch in enumerate(batches):
        ddp_syncs = ddp and masker is None and i == len(batches) - 1  # DDP reduces on the last backward only
        with model.no_sync() if ddp and not ddp_syncs else contextlib.nullcontext():
            with _autocast(device, opts.precision):
                out = model(batch)
                teacher = distiller.teacher_logits(batch) if distiller is not None else (None, None)
            counts = loss_counts(out)  # (3,)
            if world > 1:
                dist.all_reduce(counts)
            terms = loss_terms(out, opts.text_loss_weight, counts=counts, scale=world / len(batches),
                               teacher=teacher, distiller=distiller, nsp_weight=opts.nsp_weight)
            if masker is not None:
                masker.backward(terms.text, terms.image)
            elif terms.total.requires_grad:  # False only for a batch without any target
                terms.total.backward()
        totals += terms.stats
    if masker is not None:
        masker.apply(step)
    if opts.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in raw.parameters() if p.grad is not None], opts.grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return totals


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_phases(model: nn.Module, batch: Any, optimizer: torch.optim.Optimizer, text_loss_weight: float = 1.0,
                precision: str = "bf16") -> dict[str, float]:
    """One plain optimizer step on one device batch with per-phase wall times (see the module docstring)."""
    device = unwrap(model).mlm_head.out.weight.device
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    t0 = time.perf_counter()
    with record_function("forward"), _autocast(device, precision):
        out = model(batch)
        terms = loss_terms(out, text_loss_weight)
    _sync(device)
    t1 = time.perf_counter()
    with record_function("backward"):
        if terms.total.requires_grad:  # a batch with no loss target (e.g. texts without a masked token)
            terms.total.backward()
    _sync(device)
    t2 = time.perf_counter()
    with record_function("optimizer"):
        optimizer.step()
    _sync(device)
    t3 = time.perf_counter()
    stats = terms.stats.tolist()
    return {"forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2, "loss": terms.total.item(),
            "images": int(stats[1]), "mlm_tokens": int(stats[4])}


# ---- text transforms ----

def text_transform(config: ModelConfig, tokenizer: Any, *, seed: int = 0, mask_prob: float = 0.15,
                   epoch: int = 0) -> MLMMasking | Compose:
    """The per-sample transform ``config`` trains on: MLM masking, after sentence-order pairs with ``config.nsp``."""
    masking = MLMMasking.from_tokenizer(tokenizer, seed=seed, epoch=epoch, prob=mask_prob)
    if not config.nsp:
        return masking
    pairs = NextSegmentPairs.from_tokenizer(tokenizer, seed=seed, epoch=epoch)
    if pairs.sep_id != config.sep_id:
        raise ValueError(f"the model's sep_id is {config.sep_id}, the tokenizer's [SEP] is {pairs.sep_id}; build "
                         "the model with the tokenizer's sep_token_id")
    return Compose((pairs, masking))


def read_text_len(config: ModelConfig) -> int:
    """Tokens to read a text with: a sentence-order pair adds a [SEP], so one fewer than the model's positions."""
    return config.max_text_len - 1 if config.nsp else config.max_text_len


# ---- evaluation ----

def _chunks(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


@torch.no_grad()
def evaluate(model: nn.Module, data: str | Sequence[str], strategy: str = "padded", *, tokenizer: Any,
             limit_samples: int = 1000, batch_size: int = 32, seed: int = 0, text_loss_weight: float = 1.0,
             mask_prob: float = 0.15, precision: str = "bf16", nsp_weight: float = 1.0) -> dict[str, Any]:
    """Mean losses and accuracies on the first ``limit_samples`` samples of ``data``, in shard order.

    No shuffling, one process, masks (and NSP pairs, for a model with the head) from ``seed`` only: every
    strategy sees the same samples with the same masks (batches are built in-process, no DataLoader workers, so
    the sample set does not depend on worker count).
    """
    raw = unwrap(model)
    config, device = raw.config, raw.mlm_head.out.weight.device
    transform = text_transform(config, tokenizer, seed=seed, mask_prob=mask_prob)
    dataset = open_data(data, seed=seed, tokenizer=tokenizer, shuffle=False, transform=transform, rank=0,
                        world_size=1, image_size=config.image_size, max_text_len=read_text_len(config))
    samples = islice(dataset.samples(), limit_samples)
    groups = BucketBatcher(batch_size)(samples) if strategy == "bucketed" else _chunks(samples, batch_size)
    collate = make_collator(strategy)
    was_training = model.training
    model.eval()
    totals = torch.zeros(len(STAT_NAMES), device=device)
    n = 0
    for group in groups:
        n += len(group)
        with _autocast(device, precision):
            out = raw(collate(group).to(device))
        totals += loss_terms(out, text_loss_weight, nsp_weight=nsp_weight).stats
    model.train(was_training)
    return {"strategy": strategy, "samples": n, **summarize(totals, text_loss_weight, nsp_weight, nsp=config.nsp)}


# ---- data across epochs ----

class EpochStream:
    """Batches forever: a fresh ``StatefulDataLoader`` per epoch from ``make(epoch)``.

    ``state_dict()`` is the epoch plus the loader's position, so a resumed run continues with the next unseen batch.
    A position is only meaningful for the worker count it was saved with (``num_workers``, checked on load).
    """

    def __init__(self, make: Callable[[int], Any], num_workers: int) -> None:
        self.make, self.num_workers = make, num_workers
        self.epoch = 0
        self.loader: Any = None
        self.it: Iterator[Any] | None = None
        self.fresh = True  # the current loader started at the beginning of its epoch

    def __iter__(self) -> EpochStream:
        return self

    def __next__(self) -> Any:
        while True:
            if self.loader is None:
                self.loader, self.fresh = self.make(self.epoch), True
            if self.it is None:
                self.it = iter(self.loader)
            try:
                batch = next(self.it)
            except StopIteration:
                if self.fresh:
                    raise RuntimeError(f"epoch {self.epoch} yielded no batch: no data for this process (fewer "
                                       "shards than processes x workers?)") from None
                self.epoch, self.loader, self.it = self.epoch + 1, None, None
                continue
            self.fresh = False
            return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "num_workers": self.num_workers,
                "loader": None if self.loader is None else self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_workers"] != self.num_workers:
            raise ValueError(f"the checkpoint's loader position was saved with --num-workers {state['num_workers']}, "
                             f"this run has {self.num_workers}; resume with the same worker count")
        self.epoch, self.it = int(state["epoch"]), None
        self.loader = self.make(self.epoch)
        self.fresh = state["loader"] is None
        if state["loader"] is not None:
            self.loader.load_state_dict(state["loader"])


# ---- processes and devices ----

@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run initialized the process group and destroys it at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group that ``torchrun`` describes (nccl on CUDA, gloo on the CPU), or run alone."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo()
    if dist.is_available() and dist.is_initialized():
        info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    elif world > 1:
        backend = "nccl" if device_arg.startswith("cuda") else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
        info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)
    device = torch.device(device_arg)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return info, device


def _gather(obj: Any, info: DistInfo) -> list[Any]:
    if info.world == 1:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def _rng_state(device: torch.device) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# ---- logging ----

class MetricsLog:
    """``metrics.jsonl`` + TensorBoard scalars under ``out``; does nothing without ``out`` or off rank 0."""

    def __init__(self, out: Path | None, enabled: bool) -> None:
        self.file = self.tb = None
        if out is not None and enabled:
            from torch.utils.tensorboard import SummaryWriter

            out.mkdir(parents=True, exist_ok=True)
            self.file = open(out / "metrics.jsonl", "a", encoding="utf-8")
            self.tb = SummaryWriter(str(out / "tb"))

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.tb.close()


# ---- the run ----

def _num_samples(batch: Any) -> int:
    return len((batch.template if isinstance(batch, PackedBatch) else batch).keys)


def _first_urls(data: Sequence[str]) -> list[str]:
    return expand_urls(parse_data(data)[0][0])


def _manifest_classes(urls: Sequence[str]) -> int | None:
    manifest = manifest_beside(urls[0]) or {}
    return int(manifest.get("num_classes") or 0) or None


def _infer_emb_dim(data: Sequence[str], tokenizer: Any) -> int:
    sample = next(iter(open_data(data, tokenizer=tokenizer, rank=0, world_size=1).samples()), None)
    if sample is None or sample.emb is None:
        raise ValueError("the embeddings strategy needs shards written by `mmload precompute` (KEY.emb.npy); "
                         "the first sample of --data has no embedding")
    return int(sample.emb.shape[-1])


def _model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("image_size", "max_text_len", "dropout", "emb_dim")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _load_or_build_model(args: argparse.Namespace, resume: dict[str, Any] | None, data: Sequence[str],
                         tokenizer: Any) -> ViTBERT:
    """The checkpoint's model when resuming (its config wins over the CLI's), else ``build_model`` from the CLI."""
    if resume is not None:
        model = model_from_state(resume)
        if model.config.vocab_size != len(tokenizer):
            raise ValueError(f"checkpoint vocab_size {model.config.vocab_size} != tokenizer's {len(tokenizer)}; "
                             "resume with the tokenizer the run was made with (--tokenizer)")
        if args.nsp and not model.config.nsp:
            raise ValueError(f"--nsp, but the checkpoint {args.resume} has no NSP head; drop --nsp to resume it")
        return model
    overrides = _model_overrides(args)
    if args.nsp:
        overrides |= {"nsp": True, "sep_id": int(tokenizer.sep_token_id)}
    if args.strategy == "embeddings" and "emb_dim" not in overrides:
        overrides["emb_dim"] = _infer_emb_dim(data, tokenizer)
    num_classes = args.num_classes or _manifest_classes(_first_urls(data)) or 10
    return build_model(args.preset, len(tokenizer), num_classes=num_classes, init_bert=args.init_bert,
                       init_vit=args.init_vit, seed=args.seed, **overrides)


def _make_masker(args: argparse.Namespace, model: ViTBERT) -> GradientMasker | None:
    if args.mask_ratio == 0:
        return None
    shared = [p for p in model.shared_encoder_parameters() if p.requires_grad]
    shared_ids = {id(p) for p in shared}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in shared_ids]
    schedule = MaskSchedule(min(args.mask_step, args.mask_ratio), args.mask_interval, args.mask_ratio)
    return GradientMasker(shared, schedule, others)


def _make_distiller(args: argparse.Namespace, config: ModelConfig, device: torch.device) -> Distiller:
    distiller = Distiller(args.kd_alpha, args.kd_temperature)
    if args.kd_alpha > 0:  # alpha 0 is plain CE: no teacher is loaded or run
        distiller.text = TextTeacher(args.text_teacher, config.vocab_size) if args.text_teacher else None
        distiller.image = ImageTeacher(args.image_teacher, config.num_classes) if args.image_teacher else None
        if args.teacher_logits:
            distiller.image = ShardImageTeacher(config.num_classes)
    return distiller.to(device)


def train(args: argparse.Namespace | Sequence[str] | dict[str, Any] | None = None) -> dict[str, Any]:
    """Run training (or ``--eval-only`` evaluation) as the CLI does; returns a summary dict with the ``model``."""
    args = _as_namespace(args)
    _check_args(args)
    info, device = init_distributed(args.device)
    try:
        return _run(args, info, device)
    finally:
        if info.owns_group:
            dist.destroy_process_group()


def _run(args: argparse.Namespace, info: DistInfo, device: torch.device) -> dict[str, Any]:
    from mmload.tokenizer import load_tokenizer

    torch.manual_seed(args.seed + info.rank)  # dropout differs per rank; weights come from their own generator
    random.seed(args.seed + info.rank)
    if not args.data:
        from mmload.make_shards import cached_builtin_shards

        args.data = [os.path.dirname(cached_builtin_shards(progress=info.is_main)[0])]
    data = list(args.data)
    tokenizer = load_tokenizer(args.tokenizer, _first_urls(data))
    resume = load_checkpoint(args.resume) if args.resume else None
    model = _load_or_build_model(args, resume, data, tokenizer)
    model.to(device)
    config = model.config

    if args.eval_only:
        result = evaluate(model, data, args.strategy, tokenizer=tokenizer, limit_samples=args.limit_samples,
                          batch_size=args.batch_size, seed=args.seed, text_loss_weight=args.text_loss_weight,
                          mask_prob=args.mask_prob, precision=args.precision, nsp_weight=args.nsp_weight)
        if info.is_main:
            print(json.dumps(result), flush=True)
        return {**result, "model": model}

    trainable = apply_freeze(model, args.freeze)
    if args.compile:
        model.compile()
    ddp_model: nn.Module = model
    if info.world > 1:
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                        find_unused_parameters=True)  # a batch may hold one modality: the other's params idle
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scheduler = warmup_poly_scheduler(optimizer, min(args.warmup, args.steps), args.steps, args.power)
    masker = _make_masker(args, model)
    distiller = _make_distiller(args, config, device)
    transform = text_transform(config, tokenizer, seed=args.seed, mask_prob=args.mask_prob)

    def make_epoch_loader(epoch: int) -> Any:
        with warnings.catch_warnings():  # torchdata 0.11 calls the deprecated torch.set_vital
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            loader = make_loader(args.strategy, data, batch_size=args.batch_size, num_workers=args.num_workers,
                                 stateful=True, transform=transform.for_epoch(epoch), seed=args.seed,
                                 tokenizer=tokenizer, shuffle=args.shuffle, image_size=config.image_size,
                                 max_text_len=read_text_len(config))
        loader.dataset.set_epoch(epoch)
        return loader

    stream = EpochStream(make_epoch_loader, args.num_workers)
    step = 0
    if resume is not None:
        if resume.get("world_size", 1) != info.world:
            raise ValueError(f"checkpoint was made by {resume.get('world_size')} processes, this run has "
                             f"{info.world}; the loader positions are per process: resume with the same count")
        if "optimizer" not in resume:
            raise ValueError(f"{args.resume} holds weights only (no optimizer or loader state): evaluate it with "
                             "--eval-only or distill from it with --image-teacher")
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if masker is not None and resume.get("gradmask") is not None:
            masker.load_state_dict(resume["gradmask"])
        stream.load_state_dict(resume["loader"][info.rank])
        _set_rng_state(resume["rng"][info.rank], device)
        step = int(resume["step"])

    out = Path(args.out) if args.out else None
    log = MetricsLog(out, info.is_main)
    opts = StepOptions(args.text_loss_weight, args.grad_clip, args.precision, args.nsp_weight)
    if info.is_main and out is not None:
        (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")

    def checkpoint() -> Path | None:
        loaders, rngs = _gather(stream.state_dict(), info), _gather(_rng_state(device), info)
        if not info.is_main or out is None:
            return None
        state = {**model_state(model, tokenizer), "step": step, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "gradmask": masker.state_dict() if masker else None,
                 "loader": loaders, "rng": rngs, "world_size": info.world,
                 "args": json.loads(json.dumps(vars(args), default=str))}
        return save_checkpoint(out / NAME.format(step=step), state)

    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=step, unit="step", disable=not (info.is_main and args.progress),
               dynamic_ncols=True)
    window = torch.zeros(len(STAT_NAMES), device=device)
    window_samples, window_start, record, saved = 0, time.perf_counter(), {}, None
    model.train()
    while step < args.steps:
        host = [next(stream) for _ in range(args.grad_accum)]
        window_samples += sum(_num_samples(b) for b in host)
        batches = [b.to(device, non_blocking=True) for b in host]
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses; the scheduler moves it afterwards
        window += train_step(ddp_model, batches, optimizer, opts, scheduler=scheduler, masker=masker,
                             distiller=distiller, step=step)
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            counts = torch.cat([window, torch.tensor([float(window_samples)], device=device)])
            if info.world > 1:
                dist.all_reduce(counts)
            elapsed = time.perf_counter() - window_start
            record = {"step": step, "epoch": stream.epoch, "lr": lr,
                      **summarize(counts[:-1].tolist(), args.text_loss_weight, args.nsp_weight, nsp=config.nsp),
                      "samples_per_s": float(counts[-1]) / max(elapsed, 1e-9)}
            if masker is not None:
                record["mask_ratio"] = masker.ratio
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{record['samples_per_s']:.0f}")
            window.zero_()
            window_samples, window_start = 0, time.perf_counter()
        if (args.save_every and step % args.save_every == 0) or step == args.steps:
            saved = checkpoint() or saved
    bar.close()
    log.close()
    summary = {"step": step, "epoch": stream.epoch, "checkpoint": None if saved is None else str(saved),
               "trainable": len(trainable), **{k: v for k, v in record.items() if k not in ("step", "epoch")}}
    if info.is_main:
        print(json.dumps(summary), flush=True)
    return {**summary, "model": model}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        train(parse_args(argv))
    except (ValueError, FileNotFoundError) as exn:
        print(f"python -m models.train: error: {exn}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["FREEZE_MODES", "STAT_NAMES", "EpochStream", "LossTerms", "StepOptions", "apply_freeze", "build_model",
           "build_parser", "evaluate", "loss_counts", "loss_terms", "make_optimizer", "parse_args", "read_text_len",
           "step_phases", "summarize", "text_transform", "train", "train_step", "unwrap"]
