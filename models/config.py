"""The joint ViT-BERT model's configuration: one validated dataclass plus named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    """Widths and sizes of :class:`models.vit_bert.ViTBERT`.

    ``norm_first=True`` gives pre-LN blocks with a final LayerNorm (ViT); ``False`` gives post-LN blocks and no
    final norm (BERT checkpoints). ``emb_dim`` is the width of precomputed embeddings fed by an
    ``EmbeddingBatch``; ``None`` builds no projection for them. ``vocab_size`` is set from the tokenizer.
``nsp=False`` keeps every text in segment 0 and builds no NSP head.
    """

    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_mlp: int = 3072
    dropout: float = 0.0
    image_size: int = 224  # square; other input sizes interpolate the position embeddings
    patch_size: int = 16
    num_classes: int = 10
    vocab_size: int = 30522
    max_text_len: int = 512  # number of learned text positions
    type_vocab_size: int = 2
    norm_first: bool = True
    layer_norm_eps: float = 1e-6
    emb_dim: int | None = None
    pad_id: int = 0
    head_norm: bool = True  # LayerNorm between the two layers of each head (as BERT's MLM transform)
    nsp: bool = False  # a next-sentence (sentence-order) head on the text [CLS] token, segment ids from [SEP]
    sep_id: int = 3  # [SEP]: with ``nsp``, tokens after a sequence's first [SEP] are segment 1
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "base": dict(n_layer=12, n_head=12, d_model=768, d_mlp=3072, image_size=224, patch_size=16),
        # ~3.2M encoder parameters, 17 image tokens: a few steps/s at batch 32 on a 2-core CPU
        "small": dict(n_layer=4, n_head=4, d_model=256, d_mlp=1024, image_size=64, patch_size=16,
                      max_text_len=128),
        # for tests: milliseconds per step
        "tiny": dict(n_layer=2, n_head=2, d_model=64, d_mlp=128, image_size=32, patch_size=8, max_text_len=64),
    }

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "d_model", "d_mlp", "image_size", "patch_size", "num_classes",
                     "vocab_size", "max_text_len", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}); "
                             f"pick n_head from the divisors of d_model")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if self.emb_dim is not None and (not isinstance(self.emb_dim, int) or self.emb_dim < 1):
            raise ValueError(f"emb_dim must be a positive int or None (no embedding input), got {self.emb_dim!r}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id must be a token id in [0, vocab_size={self.vocab_size}), got {self.pad_id!r}")
        if not 0 <= self.sep_id < self.vocab_size:
            raise ValueError(f"sep_id must be a token id in [0, vocab_size={self.vocab_size}), got {self.sep_id!r}; "
                             f"use the tokenizer's sep_token_id")
        if self.nsp and self.type_vocab_size < 2:
            raise ValueError(f"nsp needs two segment types, got type_vocab_size={self.type_vocab_size}")
        self.image_mean = tuple(float(m) for m in self.image_mean)
        self.image_std = tuple(float(s) for s in self.image_std)
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"image_mean and image_std need 3 values each, std > 0; got {self.image_mean!r}, "
                             f"{self.image_std!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def num_patches(self) -> int:
        """Patch tokens of an ``image_size`` image (the class token not counted)."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """``ModelConfig.preset("small", vocab_size=len(tokenizer))``: a named preset with fields replaced."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; valid fields are {sorted(known)}")
        return cls(**{**cls.PRESETS[name], **overrides})
