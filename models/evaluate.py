"""Evaluation: mean losses and accuracies on the first samples of a stream, the same for every strategy."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from typing import Any

import torch
from torch import nn

from mmload.dataset import open_data
from mmload.strategy import Strategy, get_strategy
from models.step import STAT_NAMES, autocast, loss_terms, summarize, unwrap
from models.transforms import read_text_len, text_transform


@torch.no_grad()
def evaluate(model: nn.Module, data: str | Sequence[str], strategy: str | Strategy = "padded", *, tokenizer: Any,
             limit_samples: int = 1000, batch_size: int = 32, seed: int = 0, text_loss_weight: float = 1.0,
             mask_prob: float = 0.15, precision: str = "bf16", nsp_weight: float = 1.0,
             **read: Any) -> dict[str, Any]:
    """Mean losses and accuracies on the first ``limit_samples`` samples of ``data``, in shard order.

    No shuffling, one process, masks (and NSP pairs, for a model with the head) from ``seed`` only: every
    strategy sees the same samples with the same masks (batches are built in-process, no DataLoader workers, so
    the sample set does not depend on worker count). ``read``: the :class:`~mmload.reader.ReadLimits` keywords
    and how images decode (``resolution``, ``max_patches``).
    """
    raw = unwrap(model)
    config, device = raw.config, raw.mlm_head.out.weight.device
    transform = text_transform(config, tokenizer, seed=seed, mask_prob=mask_prob)
    dataset = open_data(data, seed=seed, tokenizer=tokenizer, shuffle=False, transform=transform, rank=0,
                        world_size=1, image_size=config.image_size, max_text_len=read_text_len(config),
                        patch_size=config.patch_size, **read)
    strategy = get_strategy(strategy)
    groups = strategy.group(islice(dataset.samples(), limit_samples), batch_size)
    collate = strategy.collator(patch_size=config.patch_size)
    was_training = model.training
    model.eval()
    totals = torch.zeros(len(STAT_NAMES), device=device)
    n = 0
    for group in groups:
        n += len(group)
        with autocast(device, precision):
            out = raw(collate(group).to(device))
        totals += loss_terms(out, text_loss_weight, nsp_weight=nsp_weight).stats
    model.train(was_training)
    return {"strategy": strategy.name, "samples": n, **summarize(totals, text_loss_weight, nsp_weight, nsp=config.nsp)}


__all__ = ["evaluate"]
