"""The model's one input contract: every batch type turns into a :class:`ModelInput` made of layouts.

NOTE [layouts]: a batch type says how samples were grouped and moved; a layout says how the model reads one
modality side. There are five layouts, each a dataclass of tensors:

* :class:`ImageBatch`: dense images, uint8 ``(N, 3, H, W)``;
* :class:`JaggedImages`: images as patch sequences end to end, uint8 ``(sum P, 3 * p * p)`` with ``offsets``;
* :class:`TextBatch`: dense text, ids padded to ``(N, T)`` with a mask;
* :class:`JaggedText`: packed text, ids ``(sum T,)`` with ``offsets (N+1,)`` (= ``cu_seqlens``);
* :class:`PackedEmbeddings`: precomputed embeddings ``(sum L, E)`` with offsets; each row an image or a text side.

A :class:`ModelInput` holds at most one layout per side, or ``parts``: inputs to run one after another (the
per-sample strategy). The model branches on these layouts only (``image.packed``, ``text.packed``, ``parts``, ...),
never on the batch class or strategy name, so a new batch type only needs a ``model_input()`` method. Every layout
row keeps its ``index``: the position of its sample in the list given to the collator (NOTE [index fields] in
:mod:`mmload.batch`); inside ``parts`` the indices are those of the whole batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from mmload.sample import IGNORE_INDEX
from mmload.tensors import TensorBatch

PATCH_SIZE = 16  # ViT-B/16's, the base preset's: what stats() counts image tokens with unless told the model's
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 (3, h, w) images -> ``(pixels, sizes)``: one (N, 3, H, W) tensor, each image in the top-left of the
    largest, and each one's ``(height, width)`` (None when they share one size: stacked as they are)."""
    if len({tuple(im.shape) for im in images}) == 1:
        return torch.stack(list(images)), None  # (N, 3, H, W)
    sizes = torch.tensor([im.shape[-2:] for im in images], dtype=torch.int64)  # (N, 2)
    height, width = sizes.max(dim=0).values.tolist()
    pixels = images[0].new_zeros(len(images), 3, height, width)  # (N, 3, H, W)
    for row, im in enumerate(images):
        pixels[row, :, :im.shape[-2], :im.shape[-1]] = im
    return pixels, sizes


def image_grids(pixels: torch.Tensor, sizes: torch.Tensor | None, patch_size: int) -> torch.Tensor:
    """int64 (N, 2): the ``(rows, cols)`` patch grid of each image of ``pixels`` (N, 3, H, W), whose own
    ``(height, width)`` are ``sizes`` (N, 2) (None: all of H x W)."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if sizes is None:
        h, w = pixels.shape[-2:]
        return torch.tensor([[h // patch_size, w // patch_size]], device=pixels.device).expand(len(pixels), 2)
    return sizes // patch_size


def _top_left(extents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """bool (N, h, w): True inside each row's ``(height, width)`` of ``extents`` (N, 2), from the top-left."""
    rows = torch.arange(h, device=extents.device)[None, :, None] < extents[:, None, None, 0]  # (N, h, 1)
    cols = torch.arange(w, device=extents.device)[None, None, :] < extents[:, None, None, 1]  # (N, 1, w)
    return rows & cols


def patch_mask(pixels: torch.Tensor, sizes: torch.Tensor | None, patch_size: int) -> torch.Tensor | None:
    """bool (N, 1 + P): True on each image's class token and own patches, row-major over the batch's
    ``(H / p) x (W / p)`` grid; None without ``sizes`` (no image padded)."""
    if sizes is None:
        return None
    h, w = (d // patch_size for d in pixels.shape[-2:])
    inside = _top_left(image_grids(pixels, sizes, patch_size), h, w)  # (N, h, w)
    cls = torch.ones(len(pixels), 1, dtype=torch.bool, device=inside.device)  # (N, 1)
    return torch.cat([cls, inside.flatten(1)], dim=1)  # (N, 1 + h*w)


def grid_tokens(grids: torch.Tensor) -> int:
    """Encoder positions of images of these ``(rows, cols)`` grids (N, 2): their patches and a class token each."""
    return int((grids[:, 0] * grids[:, 1]).sum()) + len(grids)


@dataclass(repr=False)  # TensorBatch.__repr__: shapes, not values
class ImageBatch(TensorBatch):
    """Dense images; of several sizes (native resolution), each in the top-left of the batch's largest, ``sizes``
    giving each one's own (the rest is zero padding, masked by the model: ``patch_mask``)."""

    packed: ClassVar[bool] = False

    pixels: torch.Tensor  # uint8 (N, 3, H, W), normalized on the device by the model
    labels: torch.Tensor  # int64 (N,), IGNORE_INDEX when unlabelled
    index: torch.Tensor  # int64 (N,), see NOTE [index fields]
    sizes: torch.Tensor | None = None  # int64 (N, 2): each image's (height, width); None: every image is H x W

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def grids(self, patch_size: int = PATCH_SIZE) -> torch.Tensor:
        """int64 (N, 2): each image's patch grid, ``(rows, cols)``."""
        return image_grids(self.pixels, self.sizes, patch_size)

    def tokens(self, patch_size: int = PATCH_SIZE) -> int:
        """Encoder positions that carry data: each image's ``rows x cols`` patches and its class token."""
        return grid_tokens(self.grids(patch_size))

    def padded_tokens(self, patch_size: int = PATCH_SIZE) -> int:
        """Encoder positions of padding: the batch's grid, ``(H / p) x (W / p)`` per image, less each image's own."""
        h, w = self.pixels.shape[-2:]
        return len(self) * ((h // patch_size) * (w // patch_size) + 1) - self.tokens(patch_size)

    def patch_mask(self, patch_size: int = PATCH_SIZE) -> torch.Tensor | None:
        """bool (N, 1 + P), True on the class token and each image's own patches (row-major over the batch's
        grid); None when no image is padded."""
        return patch_mask(self.pixels, self.sizes, patch_size)

    def image(self, row: int) -> torch.Tensor:
        """uint8 (3, h, w): image ``row`` without its padding."""
        if self.sizes is None:
            return self.pixels[row]
        h, w = self.sizes[row].tolist()
        return self.pixels[row, :, :h, :w]

    def images(self) -> list[torch.Tensor]:
        """Every image as uint8 (3, h, w), without its padding (one host read of ``sizes``)."""
        if self.sizes is None:
            return list(self.pixels)
        return [self.pixels[row, :, :h, :w] for row, (h, w) in enumerate(self.sizes.tolist())]

    def hf_inputs(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """``{"pixel_values": (N, 3, H, W)}``, normalized (``(x / 255 - mean) / std``, ImageNet's by default) on
        the device the pixels are on, for a Hugging Face vision model (``ViTModel(**batch.image.hf_inputs())``);
        pass the model's ``image_processor.image_mean``/``image_std`` (0.5 for Google's ViTs). Rows are in the
        order of ``index``. Images of several sizes add ``pixel_mask`` (N, H, W) int64, 1 on each image's own
        pixels, as Hugging Face's padding image processors (DETR's) give it: only models that read a pixel mask
        use it; a ViT would attend to the padding, so give it one image at a time (``image(row)``) or resized."""
        out = {"pixel_values": normalize_pixels(self.pixels, mean, std, dtype)}
        if self.sizes is not None:
            out["pixel_mask"] = _top_left(self.sizes, *self.pixels.shape[-2:]).long()  # (N, H, W)
        return out


def patchify(image: torch.Tensor, patch_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (3, r * p, c * p) -> (r * c, 3 * p * p): the image's patches row-major, each flattened as
    (channel, row, column), the order of a ``Conv2d(3, D, p, stride=p)`` weight's ``(D, 3, p, p)`` flattened;
    written into ``out`` when given (one copy)."""
    C, H, W = image.shape
    p = patch_size
    if H % p or W % p or not H or not W:
        raise ValueError(f"an image of {H}x{W} pixels is not whole patches of {p}: give the collator the model's "
                         f"patch_size (make_loader(patch_size=...), NestedCollator(patch_size=...)) and decode with "
                         f"resolution='native' at it, or resize the image")
    r, c = H // p, W // p
    patches = image.reshape(C, r, p, c, p).permute(1, 3, 0, 2, 4)  # (r, c, 3, p, p), a view
    if out is None:
        return patches.reshape(r * c, C * p * p)  # (r*c, 3*p*p)
    out.view(r, c, C, p, p).copy_(patches)
    return out


def unpatchify(patches: torch.Tensor, rows: int, cols: int, patch_size: int) -> torch.Tensor:
    """``patchify``'s inverse: (r * c, 3 * p * p) -> uint8 (3, r * p, c * p), a view where it can be."""
    p = patch_size
    return patches.reshape(rows, cols, -1, p, p).permute(2, 0, 3, 1, 4).reshape(-1, rows * p, cols * p)


@dataclass(repr=False)  # TensorBatch.__repr__: shapes, not values
class JaggedImages(TensorBatch):
    """Images of several sizes as patch sequences end to end, no padding (NaViT's patch n' pack): what the nested
    strategy carries at native resolution. Only real patches are moved and embedded.

    ``patches`` holds image ``i``'s ``rows x cols`` patches (row-major) at ``offsets[i]:offsets[i + 1]``; in the
    encoder each image is its class token and its patches, so the encoder's ``cu_seqlens`` are ``cu_seqlens()``:
    ``offsets`` plus one per image before. ``grid`` is kept on the host (as ``JaggedText.max_len``): the model
    places each image's positions without reading the device.
    """

    packed: ClassVar[bool] = True

    patches: torch.Tensor  # uint8 (sum P, 3 * p * p), normalized on the device by the model
    offsets: torch.Tensor  # int64 (N+1,), offsets[0] == 0: each image's patches
    labels: torch.Tensor  # int64 (N,), IGNORE_INDEX when unlabelled
    index: torch.Tensor  # int64 (N,), see NOTE [index fields]
    grid: tuple[tuple[int, int], ...]  # each image's (rows, cols) of patches, on the host
    patch_size: int

    @classmethod
    def from_images(cls, images: Sequence[torch.Tensor], labels: torch.Tensor, index: torch.Tensor,
                    patch_size: int) -> JaggedImages:
        """uint8 (3, r * p, c * p) images (each whole patches of ``patch_size``) packed end to end."""
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        grid = tuple((im.shape[-2] // patch_size, im.shape[-1] // patch_size) for im in images)
        bounds = _bounds(grid)
        patches = images[0].new_empty(bounds[-1], 3 * patch_size * patch_size)  # (sum P, 3*p*p)
        for im, lo, hi in zip(images, bounds, bounds[1:]):
            patchify(im, patch_size, out=patches[lo:hi])
        return cls(patches=patches, offsets=torch.tensor(bounds, dtype=torch.int64), labels=labels, index=index,
                   grid=grid, patch_size=patch_size)

    def __len__(self) -> int:
        return len(self.grid)

    @property
    def max_len(self) -> int:
        """The longest image sequence in the encoder: its patches and class token (host, no device read)."""
        return max(r * c for r, c in self.grid) + 1

    def cu_seqlens(self) -> torch.Tensor:
        """int64 (N+1,): the encoder's sequence offsets, a class token before each image's patches."""
        return self.offsets + torch.arange(len(self) + 1, device=self.offsets.device)

    def grids(self, patch_size: int | None = None) -> torch.Tensor:
        """int64 (N, 2) on the host: each image's patch grid, ``(rows, cols)``, at ``patch_size`` (default its own)."""
        grids = torch.tensor(self.grid, dtype=torch.int64).view(-1, 2)  # (N, 2)
        return grids if patch_size in (None, self.patch_size) else grids * self.patch_size // patch_size

    def tokens(self, patch_size: int | None = None) -> int:
        """Encoder positions that carry data: each image's ``rows x cols`` patches and its class token."""
        return grid_tokens(self.grids(patch_size))

    def padded_tokens(self, patch_size: int | None = None) -> int:
        """None: only real patches are carried."""
        return 0

    def image(self, row: int) -> torch.Tensor:
        """uint8 (3, h, w): image ``row``."""
        return self.images()[row]

    def images(self) -> list[torch.Tensor]:
        """Every image as uint8 (3, h, w), views where they can be (the bounds from ``grid``: no device read)."""
        bounds = _bounds(self.grid)
        return [unpatchify(self.patches[lo:hi], r, c, self.patch_size)
                for lo, hi, (r, c) in zip(bounds, bounds[1:], self.grid)]

    def dense(self) -> ImageBatch:
        """The same images as an :class:`ImageBatch`, each in the top-left of the largest, with ``sizes``."""
        pixels, sizes = pad_images(self.images())  # (N, 3, H, W), (N, 2) or None
        return ImageBatch(pixels=pixels, sizes=None if sizes is None else sizes.to(pixels.device),
                          labels=self.labels, index=self.index)

    def hf_inputs(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """:meth:`ImageBatch.hf_inputs` of :meth:`dense`: ``pixel_values`` and ``pixel_mask``."""
        return self.dense().hf_inputs(mean, std, dtype)


ImageLayout = ImageBatch | JaggedImages


def _bounds(grid: Sequence[tuple[int, int]]) -> list[int]:
    """Patch offsets (N+1) of images of these ``(rows, cols)`` grids, end to end."""
    return [0, *itertools.accumulate(r * c for r, c in grid)]


@dataclass(repr=False)  # TensorBatch.__repr__: shapes, not values
class TextBatch(TensorBatch):
    """Dense text: ids padded to the longest member."""

    packed: ClassVar[bool] = False

    ids: torch.Tensor  # int (N, T), pad_id past each length
    mask: torch.Tensor  # bool (N, T), True on real tokens
    mlm_labels: torch.Tensor  # int (N, T), ids' dtype, IGNORE_INDEX where no MLM loss is taken
    labels: torch.Tensor  # int64 (N,)
    index: torch.Tensor  # int64 (N,)
    masked: bool = False  # a masking stage ran (some sample came with mlm_labels): hf_inputs() gives labels

    def __len__(self) -> int:
        return self.ids.shape[0]

    def padded(self) -> TextBatch:
        return self

    def hf_inputs(self, sep_id: int | None = None) -> dict[str, torch.Tensor]:
        """The keyword arguments of a Hugging Face text model: ``BertModel(**batch.text.hf_inputs())``.

        ``input_ids`` and ``attention_mask`` ``(N, T)`` as int64, on the device the batch is on; ``labels`` (MLM
        targets, -100 where no loss is taken) when masking ran; ``token_type_ids`` (1 after each row's first
        ``[SEP]``, BERT's sentence B) when ``sep_id`` is given, for texts made into pairs (``NextSegmentPairs``).
        Rows are in the order of ``index``: row ``r`` is sample ``index[r]`` of the collated list.
        """
        out = {"input_ids": self.ids.long(), "attention_mask": self.mask.long()}
        if sep_id is not None:
            out["token_type_ids"] = token_types(self.ids, sep_id) * self.mask
        if self.masked:
            out["labels"] = self.mlm_labels.long()
        return out


@dataclass(repr=False)  # TensorBatch.__repr__: shapes, not values
class JaggedText(TensorBatch):
    """Packed text: ids end to end, no padding; ``offsets`` double as ``cu_seqlens`` for varlen attention."""

    packed: ClassVar[bool] = True

    values: torch.Tensor  # int (sum T,)
    offsets: torch.Tensor  # int64 (N+1,), offsets[0] == 0
    mlm_labels: torch.Tensor  # int (sum T,), ids' dtype
    labels: torch.Tensor  # int64 (N,)
    index: torch.Tensor  # int64 (N,)
    max_len: int  # kept on the host so kernels need no device sync to read it
    masked: bool = False  # a masking stage ran (some sample came with mlm_labels): hf_inputs() gives labels

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def hf_inputs(self, sep_id: int | None = None) -> dict[str, Any]:
        """The texts in Hugging Face's packed form, that of ``DataCollatorWithFlattening(return_flash_attn_kwargs=
        True)``: ``input_ids`` and ``position_ids`` ``(1, sum T)`` int64 (positions restart at 0 in each text),
        ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32, ``N + 1``) and ``max_length_q``/``max_length_k`` (ints); plus
        ``labels`` ``(1, sum T)`` when masking ran and ``token_type_ids`` when ``sep_id`` is given, as
        :meth:`TextBatch.hf_inputs`.

        Correct only with a varlen attention implementation (``attn_implementation="flash_attention_2"`` and
        its kin), which reads ``cu_seq_lens``: a model running eager or SDPA attention lets every text attend to
        all the others. For those, use ``batch.text.padded().hf_inputs()``. Texts are in the order of ``index``.
        """
        row, pos = self.row_positions()  # (sum T,), (sum T,)
        cu = self.offsets.to(torch.int32)  # (N+1,)
        out: dict[str, Any] = {"input_ids": self.values.long()[None], "position_ids": pos[None],
                               "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                               "max_length_q": self.max_len, "max_length_k": self.max_len}
        if sep_id is not None:
            out["token_type_ids"] = packed_token_types(self.values, self.offsets, row, sep_id)[None]
        if self.masked:
            out["labels"] = self.mlm_labels.long()[None]
        return out

    def nested(self) -> torch.Tensor:
        """The ids as a ``torch.nested`` jagged tensor ``(N, j)``."""
        return torch.nested.nested_tensor_from_jagged(self.values, self.offsets)

    def row_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The row (N,) each token belongs to and its position inside that row, both ``(sum T,)``."""
        return row_positions(self.offsets, self.values.shape[0])

    def padded(self, pad_id: int = 0) -> TextBatch:
        """The same texts as a dense :class:`TextBatch` (for consumers that need ``(N, T)``, e.g. an HF teacher)."""
        row, pos = self.row_positions()  # (sum T,), (sum T,)
        n, T = len(self), self.max_len
        ids = self.values.new_full((n, T), pad_id)  # (N, T)
        ids[row, pos] = self.values
        mlm = self.mlm_labels.new_full((n, T), IGNORE_INDEX)  # (N, T)
        mlm[row, pos] = self.mlm_labels
        mask = torch.zeros(n, T, dtype=torch.bool, device=ids.device)  # (N, T)
        mask[row, pos] = True
        return TextBatch(ids=ids, mask=mask, mlm_labels=mlm, labels=self.labels, index=self.index,
                         masked=self.masked)


@dataclass(repr=False)  # TensorBatch.__repr__: shapes, not values
class PackedEmbeddings(TensorBatch):
    """Precomputed embeddings, jagged: a pooled vector is a sequence of length 1. A row is an image side or a
    text side (``is_text``); the two sides of a pair are two rows with the same ``index``."""

    values: torch.Tensor  # float (sum L, E)
    offsets: torch.Tensor  # int64 (N+1,)
    is_text: torch.Tensor  # bool (N,)
    labels: torch.Tensor  # int64 (N,), the sample's label (an image's class; IGNORE_INDEX when unlabelled)
    mlm_labels: torch.Tensor  # int64 (sum L,), IGNORE_INDEX where no MLM loss (always, for pooled vectors)
    index: torch.Tensor  # int64 (N,)
    max_len: int
    teacher_logits: torch.Tensor | None = None  # (N, C) stored by `mmload precompute --teacher`; 0 on text rows

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def row_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        return row_positions(self.offsets, self.values.shape[0])


TextLayout = TextBatch | JaggedText


@dataclass(repr=False)  # TensorBatch.__repr__: shapes, not values
class ModelInput(TensorBatch):
    """What the model reads: one layout per modality side, or ``parts`` run one after another."""

    image: ImageLayout | None = None
    text: TextLayout | None = None
    embeddings: PackedEmbeddings | None = None
    parts: tuple[ModelInput, ...] = ()
    joint: bool = False  # every side in one packed encoder call even when none is packed (the nested layout)

    def model_input(self) -> ModelInput:
        return self

    @property
    def packed(self) -> bool:
        """Whether the sides share one packed encoder call: when asked (``joint``) or when any side is packed;
        dense images then join it as sequences of equal length (of their own lengths, with ``sizes``)."""
        return (self.joint or any(side is not None and side.packed for side in (self.image, self.text))
                or self.embeddings is not None)

    def leaves(self) -> tuple[ModelInput, ...]:
        """The inputs that run as encoder calls: ``parts``, or this input itself."""
        return self.parts or (self,)


def model_input(batch: Any) -> ModelInput:
    """``batch.model_input()``, with an error that says what is accepted."""
    to_input = getattr(batch, "model_input", None)
    if to_input is None:
        raise TypeError(f"expected an mmload batch (anything with model_input(): the collators' batches, a "
                        f"PackedBatch, a ModelInput), got {type(batch).__name__}")
    return to_input()


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> ``(x / 255 - mean) / std`` in ``dtype``, on the pixels' device."""
    m = torch.tensor(mean, dtype=dtype, device=pixels.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels.to(dtype) / 255 - m) / s  # (N, 3, H, W)


def token_types(ids: torch.Tensor, sep_id: int) -> torch.Tensor:
    """Segment ids of dense ``ids`` (B, T): 1 on the tokens after a row's first [SEP], else 0 (BERT's A and B)."""
    is_sep = (ids == sep_id).long()  # (B, T)
    return ((is_sep.cumsum(1) - is_sep) > 0).long()  # (B, T), [SEP]s strictly before each token


def packed_token_types(ids: torch.Tensor, offsets: torch.Tensor, row: torch.Tensor, sep_id: int) -> torch.Tensor:
    """``token_types`` of packed ``ids`` (sum T,) with ``offsets`` (B+1,) and each token's ``row`` (sum T,)."""
    is_sep = (ids == sep_id).long()  # (sum T,)
    before = F.pad(is_sep.cumsum(0), (1, 0))  # (sum T+1,), [SEP]s before each token of the whole pack
    return ((before[:-1] - before[offsets[:-1]][row]) > 0).long()  # (sum T,), minus those of earlier rows


def row_positions(offsets: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed tokens: the row each token belongs to and its position inside that row, both ``(sum T,)``."""
    lengths = offsets.diff()  # (B,)
    rows = torch.arange(lengths.shape[0], device=offsets.device)  # (B,)
    row = torch.repeat_interleave(rows, lengths, output_size=total)  # (sum T,); output_size: no device sync
    pos = torch.arange(total, device=offsets.device) - offsets[row]  # (sum T,)
    return row, pos


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PATCH_SIZE", "ImageBatch", "ImageLayout", "JaggedImages", "JaggedText",
           "ModelInput", "PackedEmbeddings", "TextBatch", "TextLayout", "model_input", "normalize_pixels",
           "packed_token_types", "patchify", "row_positions", "token_types", "unpatchify"]
