"""Encoders for ``mmload precompute`` made from models: an mmload ViT-BERT, or whatever a path on the command line
names (an mmload checkpoint file or a Hugging Face model folder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmload.precompute import FeatureEncoder, HFFeatures
from models.checkpoint import load_model


@dataclass
class MMLoadFeatures:
    """The image and text towers of an mmload ViT-BERT, as a :class:`~mmload.precompute.FeatureEncoder`."""

    model: nn.Module
    tokenizer: Any = None
    name: str = "mmload"

    takes_text: bool = True

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def patch_size(self) -> int:
        return self.model.config.patch_size

    @property
    def max_text_len(self) -> int:
        return self.model.config.max_text_len

    def images(self, pixels: torch.Tensor) -> torch.Tensor:
        # any grid of whole patches: the learned positions are resized to it (NOTE [native positions])
        return self.model.encode_images(pixels)  # (N, 1+P, D)

    def texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids, mask)  # (B, T, D)


def load_encoder(spec: str, device: torch.device | str = "cpu") -> FeatureEncoder:
    """An encoder from a path: an mmload checkpoint file (``.pt``) or a Hugging Face model directory."""
    path = Path(spec)
    if path.is_file():
        model, tokenizer = load_model(path, map_location=device)
        return MMLoadFeatures(model.eval(), tokenizer, name=str(path))
    enc = HFFeatures(spec)
    enc.model.to(device).eval()
    return enc


__all__ = ["MMLoadFeatures", "load_encoder"]
