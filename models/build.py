"""Building what a run trains: the model (from a preset or a local HF checkpoint), its freeze mode, the optimizer."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from models.config import FREEZE_MODES, ModelConfig, TrainConfig
from models.hf_init import config_from_hf_bert, config_from_hf_vit, load_hf_bert, load_hf_vit
from models.schedule import warmup_poly_scheduler
from models.vit_bert import ViTBERT

FROZEN_TRAINABLE = ("embeddings", "position_embeddings", "layer_norms", "heads")  # Frozen Pretrained Transformer


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


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """The run's learning-rate schedule: linear warm-up (capped at the run's steps), then polynomial decay."""
    return warmup_poly_scheduler(optimizer, min(cfg.warmup, cfg.steps), cfg.steps, cfg.power)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8)


__all__ = ["FREEZE_MODES", "FROZEN_TRAINABLE", "apply_freeze", "build_model", "make_optimizer", "make_scheduler"]
