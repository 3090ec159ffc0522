"""Configuration: the joint ViT-BERT model's (``ModelConfig``, with named presets) and a training run's
(``TrainConfig``), each one validated dataclass."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from mmload.decode import RESOLUTIONS
from mmload.layouts import IMAGENET_MEAN, IMAGENET_STD
from mmload.reader import MAX_SAMPLE_BYTES, READ_TIMEOUT, SHUFFLE_BUFFER_BYTES, ReadLimits
from mmload.strategy import get_strategy


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


FREEZE_MODES = ("full", "frozen", "scratch")
PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one run of ``python -m models.train`` is told: the CLI fills it, tests and the benchmark build it.

    Frozen: nothing changes a config once it is made (``dataclasses.replace`` makes another). ``__post_init__``
    checks every field and says how to fix a bad one. Names are the CLI's options with ``_`` for ``-``.
    """

    # data
    data: tuple[str, ...] | None = None  # shard specs (SHARDS[@WEIGHT]); None: the cached builtin shards
    strategy: str = "padded"
    batch_size: int = 32
    max_tokens: int | None = None  # token-budget micro-batches instead of batch_size (padded, bucketed, nested)
    num_workers: int = 2
    tokenizer: str | None = None
    shuffle: bool = True
    mask_prob: float = 0.15
    nsp: bool = False
    read_timeout: float = READ_TIMEOUT
    max_sample_bytes: int = MAX_SAMPLE_BYTES
    shuffle_buffer_bytes: int = SHUFFLE_BUFFER_BYTES
    resolution: str = "square"  # or "native": each image's aspect ratio, at most max_patches patches
    max_patches: int | None = None  # native: patches per image; None: the square's grid, (image_size / patch) ** 2
    # model
    preset: str = "small"
    num_classes: int | None = None
    image_size: int | None = None
    max_text_len: int | None = None
    dropout: float | None = None
    emb_dim: int | None = None
    freeze: str = "full"
    init_bert: str | None = None
    init_vit: str | None = None
    # optimization
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 100
    power: float = 1.0
    grad_accum: int = 1
    grad_clip: float = 1.0
    text_loss_weight: float = 1.0
    nsp_weight: float = 1.0
    precision: str = "bf16"
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    # knowledge distillation
    kd_alpha: float = 0.0
    kd_temperature: float = 1.0
    text_teacher: str | None = None
    image_teacher: str | None = None
    teacher_logits: bool = False
    # gradient masking
    mask_ratio: float = 0.0
    mask_step: float = 0.1
    mask_interval: int = 1000
    # output, checkpoints, evaluation
    out: str | None = None
    log_every: int = 10
    log_keys: bool = False
    save_every: int = 0
    keep_checkpoints: int = 0
    resume: str | None = None
    eval_only: bool = False
    limit_samples: int = 1000
    progress: bool = True

    @property
    def image_kwargs(self) -> dict[str, Any]:
        """How the run decodes images, as ``ShardDataset`` keywords (``resolution``, ``max_patches``)."""
        return {"resolution": self.resolution, "max_patches": self.max_patches}

    @property
    def read_limits(self) -> ReadLimits:
        """The read bounds every dataset of the run is made with (``ShardDataset`` keywords)."""
        return ReadLimits(self.read_timeout, self.max_sample_bytes, self.shuffle_buffer_bytes)

    def __post_init__(self) -> None:
        if self.data is not None:
            data = (self.data,) if isinstance(self.data, str | os.PathLike) else self.data
            object.__setattr__(self, "data", tuple(os.fspath(d) for d in data) or None)
        strategy = get_strategy(self.strategy)
        for name, choices in (("preset", tuple(ModelConfig.PRESETS)), ("freeze", FREEZE_MODES),
                              ("precision", PRECISIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "limit_samples", "mask_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "save_every", "warmup", "grad_clip", "text_loss_weight", "nsp_weight",
                     "mask_ratio", "weight_decay", "kd_alpha", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"--resolution must be one of {', '.join(RESOLUTIONS)}, got {self.resolution!r}")
        if self.max_patches is not None and self.max_patches < 1:
            raise ValueError(f"--max-patches must be >= 1, got {self.max_patches}")
        if self.max_patches is not None and self.resolution != "native":
            raise ValueError("--max-patches sets the native grid; give it with --resolution native")
        if self.max_tokens is not None:
            if self.max_tokens < 1:
                raise ValueError(f"--max-tokens must be >= 1, got {self.max_tokens}")
            strategy.batcher(max_tokens=self.max_tokens, image_tokens=1)  # says so if the strategy takes none
        self.read_limits  # noqa: B018 -- checks --read-timeout, --max-sample-bytes, --shuffle-buffer-bytes
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"--mask-prob must be in [0, 1], got {self.mask_prob}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.log_keys and not self.out:
            raise ValueError("--log-keys writes OUT/keys-rank{RANK}.jsonl; give --out DIR")
        if self.init_bert and self.init_vit:
            raise ValueError("--init-bert and --init-vit both initialize the shared encoder (post-LN BERT vs pre-LN "
                             "ViT blocks); pick one")
        if self.freeze == "scratch" and (self.init_bert or self.init_vit):
            raise ValueError("--freeze scratch means random initialization; drop --init-bert/--init-vit or use "
                             "--freeze full|frozen")
        if self.kd_alpha > 0 and not (self.text_teacher or self.image_teacher or self.teacher_logits):
            raise ValueError(f"--kd-alpha {self.kd_alpha} needs a teacher: --text-teacher, --image-teacher or "
                             "--teacher-logits")
        if self.teacher_logits and self.image_teacher:
            raise ValueError("--teacher-logits and --image-teacher are two image teachers; pick one")
        if self.nsp and not strategy.has_raw_inputs:
            raise ValueError(f"--nsp pairs token ids, which the {strategy.name} strategy's batches do not have; use "
                             "another --strategy")
        if self.teacher_logits and strategy.has_raw_inputs:
            raise ValueError("--teacher-logits reads logits stored beside precomputed embeddings: use a strategy "
                             "over shards written by `mmload precompute --teacher` (--strategy embeddings)")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists for tuples), for ``args.json`` and checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _flag(name: str) -> str:
    return name.replace("_", "-")
