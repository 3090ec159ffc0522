"""The per-sample transforms the model trains and evaluates on (MLM masking, sentence-order pairs)."""

from __future__ import annotations

from typing import Any

from mmload.masking import Compose, MLMMasking, NextSegmentPairs
from models.config import ModelConfig


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


__all__ = ["read_text_len", "text_transform"]
