"""The training loop of ``python -m models.train``: data, model, optimizer, steps, metrics, checkpoints, resume.

``train(TrainConfig(...)) -> dict`` runs what the CLI runs (or ``eval_only`` evaluation) and returns the final
metrics, the step, the checkpoint path and the bare ``model``. One step is ``models.step.train_step``; the data
is an endless ``mmload.epochs.EpochStream`` of this rank's share; processes and devices come from
``models.distributed``; metrics go to ``models.metrics_log``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mmload.dataset import expand_urls, open_data, parse_data
from mmload.epochs import EpochStream
from mmload.loader import make_loader
from mmload.manifest import manifest_beside
from mmload.strategy import get_strategy
from models.build import apply_freeze, build_model, make_optimizer, make_scheduler
from models.checkpoint import (
    NAME,
    drop_checkpoints_after,
    load_checkpoint,
    model_from_state,
    model_state,
    prune_checkpoints,
    remove_partial_saves,
    save_checkpoint,
)
from models.config import ModelConfig, TrainConfig
from models.distributed import DistInfo, gather, init_distributed, rng_state, seed_rng, set_rng_state
from models.evaluate import evaluate
from models.gradmask import GradientMasker, MaskSchedule
from models.kd import Distiller, ImageTeacher, ShardImageTeacher, TextTeacher
from models.metrics_log import KeyLog, MetricsLog
from models.step import STAT_NAMES, StepOptions, summarize, train_step
from models.transforms import read_text_len, text_transform
from models.vit_bert import ViTBERT


def _first_urls(data: Sequence[str]) -> list[str]:
    return expand_urls(parse_data(data)[0][0])


def _manifest_classes(urls: Sequence[str]) -> int | None:
    manifest = manifest_beside(urls[0]) or {}
    return int(manifest.get("num_classes") or 0) or None


def _infer_emb_dim(data: Sequence[str], tokenizer: Any, read: dict[str, Any]) -> int:
    dataset = open_data(data, tokenizer=tokenizer, rank=0, world_size=1, **read)
    sample = next(iter(dataset.samples()), None)
    if sample is None or sample.emb is None:
        raise ValueError("the embeddings strategy needs shards written by `mmload precompute` (KEY.emb.npy); "
                         "the first sample of --data has no embedding")
    return int(sample.emb.shape[-1])


def _model_overrides(cfg: TrainConfig) -> dict[str, Any]:
    names = ("image_size", "max_text_len", "dropout", "emb_dim")
    return {n: getattr(cfg, n) for n in names if getattr(cfg, n) is not None}


def _load_or_build_model(cfg: TrainConfig, resume: dict[str, Any] | None, data: Sequence[str],
                         tokenizer: Any) -> ViTBERT:
    """The checkpoint's model when resuming (its config wins over the CLI's), else ``build_model`` from the CLI."""
    if resume is not None:
        model = model_from_state(resume)
        if model.config.vocab_size != len(tokenizer):
            raise ValueError(f"checkpoint vocab_size {model.config.vocab_size} != tokenizer's {len(tokenizer)}; "
                             "resume with the tokenizer the run was made with (--tokenizer)")
        if cfg.nsp and not model.config.nsp:
            raise ValueError(f"--nsp, but the checkpoint {cfg.resume} has no NSP head; drop --nsp to resume it")
        return model
    overrides = _model_overrides(cfg)
    if cfg.nsp:
        overrides |= {"nsp": True, "sep_id": int(tokenizer.sep_token_id)}
    if not get_strategy(cfg.strategy).has_raw_inputs and "emb_dim" not in overrides:
        overrides["emb_dim"] = _infer_emb_dim(data, tokenizer, cfg.read_limits.kwargs())
    num_classes = cfg.num_classes or _manifest_classes(_first_urls(data)) or 10
    return build_model(cfg.preset, len(tokenizer), num_classes=num_classes, init_bert=cfg.init_bert,
                       init_vit=cfg.init_vit, seed=cfg.seed, **overrides)


def _make_masker(cfg: TrainConfig, model: ViTBERT) -> GradientMasker | None:
    if cfg.mask_ratio == 0:
        return None
    shared = [p for p in model.shared_encoder_parameters() if p.requires_grad]
    shared_ids = {id(p) for p in shared}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in shared_ids]
    schedule = MaskSchedule(min(cfg.mask_step, cfg.mask_ratio), cfg.mask_interval, cfg.mask_ratio)
    return GradientMasker(shared, schedule, others)


def _make_distiller(cfg: TrainConfig, config: ModelConfig, device: torch.device) -> Distiller:
    distiller = Distiller(cfg.kd_alpha, cfg.kd_temperature)
    if cfg.kd_alpha > 0:  # alpha 0 is plain CE: no teacher is loaded or run
        distiller.text = TextTeacher(cfg.text_teacher, config.vocab_size) if cfg.text_teacher else None
        distiller.image = ImageTeacher(cfg.image_teacher, config.num_classes) if cfg.image_teacher else None
        if cfg.teacher_logits:
            distiller.image = ShardImageTeacher(config.num_classes)
    return distiller.to(device)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training (or ``eval_only`` evaluation) as the CLI does; returns a summary dict with the ``model``."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig, got {type(cfg).__name__}; build one with "
                        "TrainConfig(steps=..., ...) or models.train.parse_config(argv)")
    info, device = init_distributed(cfg.device)
    try:
        return _run(cfg, info, device)
    finally:
        if info.owns_group:
            dist.destroy_process_group()


def _run(cfg: TrainConfig, info: DistInfo, device: torch.device) -> dict[str, Any]:
    from mmload.tokenizer import load_tokenizer

    torch.manual_seed(cfg.seed + info.rank)  # dropout differs per rank; weights come from their own generator
    random.seed(cfg.seed + info.rank)
    data = list(cfg.data or ())
    if not data:
        from mmload.make_shards import cached_builtin_shards

        data = [os.path.dirname(cached_builtin_shards(progress=info.is_main)[0])]
    tokenizer = load_tokenizer(cfg.tokenizer, _first_urls(data))
    resume = load_checkpoint(cfg.resume) if cfg.resume else None
    model = _load_or_build_model(cfg, resume, data, tokenizer)
    model.to(device)
    config = model.config

    if cfg.eval_only:
        result = evaluate(model, data, cfg.strategy, tokenizer=tokenizer, limit_samples=cfg.limit_samples,
                          batch_size=cfg.batch_size, seed=cfg.seed, text_loss_weight=cfg.text_loss_weight,
                          mask_prob=cfg.mask_prob, precision=cfg.precision, nsp_weight=cfg.nsp_weight,
                          **cfg.image_kwargs, **cfg.read_limits.kwargs())
        if info.is_main:
            print(json.dumps(result), flush=True)
        return {**result, "model": model}

    trainable = apply_freeze(model, cfg.freeze)
    if cfg.compile:
        model.compile()
    ddp_model: nn.Module = model
    if info.world > 1:
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                        find_unused_parameters=True)  # a batch may hold one modality: the other's params idle
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg)
    masker = _make_masker(cfg, model)
    distiller = _make_distiller(cfg, config, device)
    transform = text_transform(config, tokenizer, seed=cfg.seed, mask_prob=cfg.mask_prob)

    def make_epoch_loader(epoch: int) -> Any:
        size = {"max_tokens": cfg.max_tokens} if cfg.max_tokens else {"batch_size": cfg.batch_size}
        return make_loader(cfg.strategy, data, **size, patch_size=config.patch_size, **cfg.image_kwargs,
                           num_workers=cfg.num_workers, stateful=True,
                           transform=transform.for_epoch(epoch), seed=cfg.seed, tokenizer=tokenizer,
                           shuffle=cfg.shuffle, image_size=config.image_size, max_text_len=read_text_len(config),
                           **cfg.read_limits.kwargs())

    stream = EpochStream(make_epoch_loader)
    step = 0
    if resume is not None:
        if "optimizer" not in resume:
            raise ValueError(f"{cfg.resume} holds weights only (no optimizer or loader state): evaluate it with "
                             "--eval-only or distill from it with --image-teacher")
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if masker is not None and resume.get("gradmask") is not None:
            masker.load_state_dict(resume["gradmask"])
        step = int(resume["step"])
        was = (int(resume.get("world_size", 1)), int(resume["args"]["num_workers"]))
        if was == (info.world, cfg.num_workers):
            stream.load_state_dict(resume["loader"][info.rank])
            set_rng_state(resume["rng"][info.rank], device)
        else:  # another cluster shape: continue every old rank's epoch here (NOTE [elastic resume])
            stream.load_elastic(resume["loader"])
            seed_rng(cfg.seed, info.rank, step)
            size, unit = (cfg.max_tokens, "tokens") if cfg.max_tokens else (cfg.batch_size, "samples")
            per = f"{size} {unit}" if cfg.max_tokens else str(size)
            if info.is_main:
                print(f"python -m models.train: elastic resume at step {step} from {was[0]} ranks x {was[1]} workers "
                      f"onto {info.world} x {cfg.num_workers}: the global batch is now {info.world} x "
                      f"{per} x {cfg.grad_accum} = {info.world * size * cfg.grad_accum} {unit} "
                      f"(was {was[0] * size * cfg.grad_accum}); random state re-derived from (seed, rank, "
                      "step)", file=sys.stderr, flush=True)

    out = Path(cfg.out) if cfg.out else None
    resumed_step = step if resume is not None else None
    log = MetricsLog(out, info.is_main, resumed_step)
    keys = KeyLog(out, info.rank, cfg.log_keys, resumed_step, info.world)
    if info.is_main and out is not None:
        remove_partial_saves(out)
        if resumed_step is not None and (dropped := drop_checkpoints_after(out, resumed_step)):
            print(f"python -m models.train: resumed from step {resumed_step} into {out}: removed the later "
                  f"checkpoints of the run it continues differently: {', '.join(p.name for p in dropped)}",
                  file=sys.stderr, flush=True)
    opts = StepOptions.from_config(cfg)
    if info.is_main and out is not None:
        (out / "args.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    def checkpoint() -> Path | None:
        loaders, rngs = gather(stream.state_dict(), info), gather(rng_state(device), info)
        if not info.is_main or out is None:
            return None
        state = {**model_state(model, tokenizer), "step": step, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "gradmask": masker.state_dict() if masker else None,
                 "loader": loaders, "rng": rngs, "world_size": info.world, "args": cfg.to_dict()}
        path = save_checkpoint(out / NAME.format(step=step), state)
        prune_checkpoints(out, cfg.keep_checkpoints)
        return path

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, unit="step", disable=not (info.is_main and cfg.progress),
               dynamic_ncols=True)
    window = torch.zeros(len(STAT_NAMES), device=device)
    window_samples, window_start, record, saved = 0, time.perf_counter(), {}, None
    model.train()
    try:
        while step < cfg.steps:
            host = []
            for micro in range(cfg.grad_accum):
                host.append(next(stream))
                keys.write(step + 1, micro, stream.epoch, host[-1].keys)
            window_samples += sum(len(b.keys) for b in host)
            batches = [b.to(device, non_blocking=True) for b in host]
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses; the scheduler moves it afterwards
            window += train_step(ddp_model, batches, optimizer, opts, scheduler=scheduler, masker=masker,
                                 distiller=distiller, step=step)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                counts = torch.cat([window, torch.tensor([float(window_samples)], device=device)])
                if info.world > 1:
                    dist.all_reduce(counts)
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "epoch": stream.epoch, "lr": lr,
                          **summarize(counts[:-1].tolist(), cfg.text_loss_weight, cfg.nsp_weight, nsp=config.nsp),
                          "samples_per_s": float(counts[-1]) / max(elapsed, 1e-9)}
                if masker is not None:
                    record["mask_ratio"] = masker.ratio
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{record['samples_per_s']:.0f}")
                window.zero_()
                window_samples, window_start = 0, time.perf_counter()
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                saved = checkpoint() or saved
    finally:
        stream.close()
        bar.close()
        log.close()
        keys.close()
    summary = {"step": step, "epoch": stream.epoch, "checkpoint": None if saved is None else str(saved),
               "trainable": len(trainable), **{k: v for k, v in record.items() if k not in ("step", "epoch")}}
    if info.is_main:
        print(json.dumps(summary), flush=True)
    return {**summary, "model": model}


__all__ = ["train"]
