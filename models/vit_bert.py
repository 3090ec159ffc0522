"""Joint ViT-BERT: modality-specific tokenizers, one shared transformer encoder, one head per task.

After "Towards a Unified Foundation Model: Jointly Pre-Training Transformers on Unpaired Images and Text"
(Li et al., 2021): an image becomes a class token plus patch tokens, a text becomes word-piece tokens, and the
same encoder blocks process both. No modality-type embedding: the tokenizers alone tell the modalities apart.

Built bottom-up: attention, MLP, block, encoder, tokenizers, heads, output, model. Shapes use B for
sequences in a batch, T for a padded length, ``sum T`` for packed tokens, P for patches, D for d_model,
nh for heads and hs for the head size. ``(B, j, D)`` marks a jagged tensor whose ragged dim is j.

NOTE [two encoder paths]: the encoder runs either dense, ``(B, T, D)`` with an optional key-padding mask, or
packed, ``(sum T, D)`` values with ``offsets (B+1,)`` and a host ``max_len``. Linear, LayerNorm and GELU act
per token, so on packed tokens they are plain dense ops on the values (and backward-safe); only attention needs
the sequence boundaries. On CUDA with fp16/bf16 it calls ``varlen_attn`` with the offsets as cu_seqlens; elsewhere
it wraps the values as a ``torch.nested`` jagged tensor for ``scaled_dot_product_attention``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmload.layouts import (
    ImageBatch,
    ImageLayout,
    JaggedImages,
    JaggedText,
    ModelInput,
    PackedEmbeddings,
    TextBatch,
    model_input,
    packed_token_types,
    patch_mask,
    row_positions,
    token_types,
)
from mmload.sample import IGNORE_INDEX
from models.config import ModelConfig

try:  # torch >= 2.9; flash-attention over packed sequences, CUDA only
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - depends on the torch build
    varlen_attn = None

FREEZE_GROUPS = ("embeddings", "position_embeddings", "layer_norms", "heads", "encoder")


@dataclass
class Packed:
    """Sequence boundaries of packed tokens ``(sum T, D)``; ``offsets`` double as cu_seqlens."""

    offsets: torch.Tensor  # int64 (B+1,), offsets[0] == 0
    max_len: int  # on the host: no device sync to read it

    @cached_property
    def cu_seqlens(self) -> torch.Tensor:
        return self.offsets.to(torch.int32)  # (B+1,), made once per encoder call, not once per layer

    @cached_property
    def segments(self) -> list[tuple[int, int, list[int]]]:
        """The sequences cut into segments ``(first token, tokens, lengths)``: a run of two or more consecutive
        equal-length sequences (dense), or a stretch of sequences of differing lengths (jagged)."""
        runs: list[list[int]] = []  # [count, length]
        for length in self.offsets.diff().tolist():
            if runs and runs[-1][1] == length:
                runs[-1][0] += 1
            else:
                runs.append([1, length])
        out: list[tuple[int, int, list[int]]] = []
        start = 0
        for n, length in runs:
            # a lone sequence joins a preceding lone or jagged one (neighbouring runs differ in length)
            if n == 1 and out and (len(out[-1][2]) == 1 or len(set(out[-1][2])) > 1):
                first, tokens, lengths = out[-1]
                out[-1] = (first, tokens + length, [*lengths, length])
            else:
                out.append((start, n * length, [length] * n))
            start += n * length
        return out


def _use_varlen(q: torch.Tensor, dropout_p: float) -> bool:
    # varlen_attn is flash attention: CUDA, half precision, no attention dropout (falls back to SDPA otherwise)
    return varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and dropout_p == 0.0


class _FreshGrad(torch.autograd.Function):
    """Identity whose backward hands on a fresh copy of the gradient.

    NOTE [jagged gradient views]: on torch 2.13 (CPU), when the ``values()`` of a jagged SDPA output are
    concatenated with other rows, the gradient that comes back is a view at a non-zero storage offset, and the
    jagged backward reads it as if it started at offset 0: gradients come out wrong with no error (checked
    against per-sequence dense SDPA). A gradient of its own storage avoids that.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.clone()


def _jagged_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, max_len: int,
                 p: float) -> torch.Tensor:
    """SDPA over packed ``(sum T, nh, hs)`` q, k, v as ``torch.nested`` jagged tensors ``(B, nh, j, hs)``."""
    def nest(t: torch.Tensor) -> torch.Tensor:
        return torch.nested.nested_tensor_from_jagged(t, offsets, max_seqlen=max_len).transpose(1, 2)

    y = F.scaled_dot_product_attention(nest(q), nest(k), nest(v), dropout_p=p)  # (B, nh, j, hs)
    return _FreshGrad.apply(y.transpose(1, 2).values())  # (sum T, nh, hs)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_head = config.n_head
        # three projections, not one fused qkv: jagged SDPA on the CPU needs contiguous q, k, v (NOTE [two
        # encoder paths]; with a fused qkv, chunk() gives non-contiguous views and SDPA finds no viable backend)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, packed: Packed | None = None) -> torch.Tensor:
        p = self.attn_dropout if self.training else 0.0
        y = self._packed(x, packed, p) if packed is not None else self._dense(x, mask, p)
        return self.resid_dropout(self.proj(y))

    def _dense(self, x: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(x).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v(x).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, T), True = attend to this key
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)

    def _packed(self, x: torch.Tensor, packed: Packed, p: float) -> torch.Tensor:
        N, D = x.shape
        q = self.q(x).view(N, self.n_head, -1)  # (sum T, nh, hs), contiguous
        k = self.k(x).view(N, self.n_head, -1)  # (sum T, nh, hs)
        v = self.v(x).view(N, self.n_head, -1)  # (sum T, nh, hs)
        if _use_varlen(q, p):
            L = packed.max_len
            y = varlen_attn(q, k, v, packed.cu_seqlens, packed.cu_seqlens, L, L)  # (sum T, nh, hs)
        elif not q.is_cuda:
            # NOTE [equal-length runs]: on the CPU, SDPA on jagged tensors takes a slow math path (12x slower
            # than dense for the images of a nested batch, forward and backward). A run of equal-length sequences
            # is one dense SDPA; the sequences of differing lengths between runs stay jagged.
            ys = []
            for first, tokens, lengths in packed.segments:
                part = slice(first, first + tokens)
                if len(set(lengths)) == 1:
                    n, L = len(lengths), lengths[0]
                    qr, kr, vr = (t[part].view(n, L, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
                    y = F.scaled_dot_product_attention(qr, kr, vr, dropout_p=p)  # (n, nh, L, hs)
                    ys.append(y.transpose(1, 2).reshape(tokens, self.n_head, -1))  # (n*L, nh, hs)
                else:
                    offsets = torch.tensor([0, *lengths], device=q.device).cumsum(0)  # (n+1,)
                    ys.append(_jagged_sdpa(q[part], k[part], v[part], offsets, max(lengths), p))
            y = torch.cat(ys)  # (sum T, nh, hs)
        else:
            y = _jagged_sdpa(q, k, v, packed.offsets, packed.max_len, p)  # (sum T, nh, hs)
        return y.reshape(N, D)  # (sum T, D)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_mlp)
        self.proj = nn.Linear(config.d_mlp, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))  # (..., D)


class Block(nn.Module):
    """Pre-LN (``norm_first``, ViT) or post-LN (BERT) transformer block; works on (B, T, D) and (sum T, D)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm_first = config.norm_first
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, packed: Packed | None = None) -> torch.Tensor:
        if self.norm_first:
            x = x + self.attn(self.ln_1(x), mask, packed)
            x = x + self.mlp(self.ln_2(x))
        else:
            x = self.ln_1(x + self.attn(x, mask, packed))
            x = self.ln_2(x + self.mlp(x))
        return x


class Encoder(nn.Module):
    """The shared part: every modality goes through the same blocks."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        # pre-LN residual streams are unnormalized at the top; post-LN blocks already end in a LayerNorm
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.norm_first else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, packed: Packed | None = None) -> torch.Tensor:
        """``x`` (B, T, D) with ``mask`` (B, T) bool (True = real token), or (sum T, D) with ``packed``."""
        for block in self.blocks:
            x = block(x, mask, packed)
        return self.ln_f(x)


Grids = list[tuple[int, int]] | tuple[tuple[int, int], ...] | torch.Tensor  # each image's (rows, cols)


def host_grids(grids: Grids) -> list[tuple[int, int]]:
    """Grids as host ``(rows, cols)`` tuples; an (N, 2) tensor is read once (a sync on CUDA)."""
    rows = grids.tolist() if isinstance(grids, torch.Tensor) else grids
    return [(int(r), int(c)) for r, c in rows]


def resize_positions(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Class + square-grid positions (1, 1 + g*g, D) -> (1, 1 + h*w, D), the grid resized bicubically (as ViT/DINO)."""
    cls_pos, grid_pos = pos[:, :1], pos[:, 1:]  # (1, 1, D), (1, g*g, D)
    D, g = pos.shape[-1], round(grid_pos.shape[1] ** 0.5)
    grid_pos = grid_pos.reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid_pos = F.interpolate(grid_pos.float(), size=(h, w), mode="bicubic", align_corners=False)  # (1, D, h, w)
    grid_pos = grid_pos.to(pos.dtype).flatten(2).transpose(1, 2)  # (1, h*w, D)
    return torch.cat([cls_pos, grid_pos], dim=1)  # (1, 1 + h*w, D)


class ImageTokenizer(nn.Module):
    """uint8 pixels -> class token + patch tokens with learned 2-D positions.

    NOTE [native positions]: an image of any grid (native resolution, ``resolution="native"``) gets the learned
    grid resized to its own ``rows x cols`` (bicubic, as ViT-BERT fine-tunes at 384 and DeiT and DINO do), not
    factorized row and column embeddings (NaViT): a Hugging Face ViT checkpoint's grid loads as it is, an image
    of the trained size gets exactly the trained positions, and nothing new is learned; the cost is one resize
    per distinct grid of a batch, and native grids repeat.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.d_model
        self.grid = config.image_size // config.patch_size
        self.register_buffer("mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)
        self.patch = nn.Conv2d(3, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, d))
        self.dropout = nn.Dropout(config.dropout)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float (N, 3, H, W); done here so pixels travel as uint8 (4x fewer bytes)."""
        if pixels.dtype != torch.uint8 or pixels.dim() != 4:
            raise TypeError(f"pixels must be uint8 (N, 3, H, W), got {pixels.dtype} {tuple(pixels.shape)}; "
                            f"the model normalizes on the device, so do not normalize in the loader")
        x = pixels.to(self.patch.weight.dtype) / 255.0  # (N, 3, H, W)
        return (x - self.mean) / self.std  # (N, 3, H, W)

    def position_embeddings(self, h: int, w: int) -> torch.Tensor:
        """(1, 1 + h*w, D): the learned grid, bicubically resized when the patch grid is not the trained one."""
        if (h, w) == (self.grid, self.grid):
            return self.pos
        return resize_positions(self.pos, h, w)

    def forward(self, pixels: torch.Tensor, grids: Grids | None = None) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> (N, 1+P, D). ``grids``: each image's own ``(rows, cols)`` (a list, or an (N, 2)
        tensor: read once) in the top-left of the batch's grid (images of several sizes, zero-padded); its patches
        get the positions of its own grid, the padding's are zero (the encoder masks them:
        ``ImageBatch.patch_mask``)."""
        p = self.patch.kernel_size[0]
        if pixels.shape[-1] % p or pixels.shape[-2] % p:
            raise ValueError(f"images of {pixels.shape[-2]}x{pixels.shape[-1]} pixels are not whole patches of the "
                             f"model's patch_size {p}: decode at a multiple of it (native resolution: "
                             f"patch_size={p} on the dataset or make_loader)")
        x = self.patch(self.normalize(pixels))  # (N, D, h, w)
        N, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (N, P, D), P = h*w
        x = torch.cat([self.cls.expand(N, -1, -1), x], dim=1)  # (N, 1+P, D)
        return self.dropout(x + self.positions(h, w, grids))  # (N, 1+P, D)

    def positions(self, h: int, w: int, grids: Grids | None = None) -> torch.Tensor:
        """(1, 1+h*w, D), or with ``grids`` (N, 1+h*w, D): each image's own grid's positions (NOTE [native
        positions]) placed in the top-left of the batch's ``h x w`` grid, zero on padding."""
        if grids is None:
            return self.position_embeddings(h, w)
        grids = host_grids(grids)
        out = self.pos.new_zeros(len(grids), h, w, self.pos.shape[-1])  # (N, h, w, D)
        for grid, pos in self._grid_positions(grids).items():  # few distinct grids per batch
            r, c = grid
            rows = [i for i, g in enumerate(grids) if g == grid]
            out[rows, :r, :c] = pos.view(r, c, -1)
        cls = self.pos[:, :1].expand(len(grids), 1, -1)  # (N, 1, D)
        return torch.cat([cls, out.flatten(1, 2)], dim=1)  # (N, 1+h*w, D)

    def _grid_positions(self, grids: list[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor]:
        """Each distinct grid's patch positions (r*c, D), resized once per batch."""
        return {(r, c): self.position_embeddings(r, c)[0, 1:] for r, c in dict.fromkeys(grids)}

    def patches(self, images: JaggedImages) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch sequences end to end -> tokens (sum (1+P), D), each image's class token first, and the encoder's
        offsets (N+1,). The patch embedding is the conv's weights as a linear map: a ``p x p`` convolution with
        stride ``p`` is exactly that, on each patch flattened as (channel, row, column) (``patchify``)."""
        p = self.patch.kernel_size[0]
        if images.patch_size != p:
            raise ValueError(f"the images were cut into patches of {images.patch_size} but the model's patch_size is "
                             f"{p}: collate with patch_size={p} (make_loader(patch_size=...) or NestedCollator)")
        x = self.normalize(images.patches.view(-1, 3, p, p)).flatten(1)  # (sum P, 3*p*p), each patch an image
        x = F.linear(x, self.patch.weight.flatten(1), self.patch.bias)  # (sum P, D)
        pos = self._grid_positions(list(images.grid))
        x = x + torch.cat([pos[grid] for grid in images.grid])  # (sum P, D)
        N, P, D = len(images), x.shape[0], x.shape[1]
        offsets = images.cu_seqlens()  # (N+1,)
        # every patch moves down by one per class token before it: its image's row + 1
        row = torch.repeat_interleave(torch.arange(N, device=x.device), images.offsets.diff(), output_size=P)  # (P,)
        at = torch.arange(P, device=x.device) + row + 1  # (sum P,)
        cls = (self.cls[0] + self.pos[0, :1]).expand(N, D)  # (N, D)
        tokens = x.new_zeros(P + N, D).index_put((at,), x).index_put((offsets[:-1],), cls)  # (sum (1+P), D)
        return self.dropout(tokens), offsets


class TextTokenizer(nn.Module):
    """BERT embeddings: word + position + segment, then LayerNorm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.max_text_len, config.d_model)
        self.wtt = nn.Embedding(config.type_vocab_size, config.d_model)
        self.ln = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        """``ids``, ``positions`` and ``types`` long, same shape: (B, T) or (sum T,) -> (..., D)."""
        # no types: one segment per sample, type 0 everywhere, so add its row instead of looking up zeros
        segment = self.wtt.weight[0] if types is None else self.wtt(types)  # (D,) or (..., D)
        x = self.wte(ids) + self.wpe(positions) + segment  # (..., D)
        return self.dropout(self.ln(x))


class EmbeddingInput(nn.Module):
    """Precomputed (frozen-encoder) token embeddings -> encoder tokens; replaces the tokenizers."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(config.emb_dim, config.d_model)
        self.mask_emb = nn.Parameter(torch.zeros(config.d_model))
        self.ln = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, values: torch.Tensor, masked: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """``values`` (sum L, E) float16, ``masked`` (sum L,) bool, ``pos_emb`` (sum L, D) -> (sum L, D)."""
        x = self.proj(values.to(self.proj.weight.dtype))  # (sum L, D)
        # Embeddings were made offline, before this epoch's masking: a masked token's embedding still encodes
        # the answer, so it is replaced (not added to) by the learned mask embedding.
        x = torch.where(masked[:, None], self.mask_emb.to(x.dtype), x)  # (sum L, D)
        return self.dropout(self.ln(x + pos_emb))


class Head(nn.Module):
    """Linear d->d, GELU, optional LayerNorm, Linear d->out."""

    def __init__(self, config: ModelConfig, out: int) -> None:
        super().__init__()
        d = config.d_model
        self.fc = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.head_norm else nn.Identity()
        self.out = nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(F.gelu(self.fc(x))))  # (N, out)


@dataclass
class ModelOutput:
    """Logits of one batch, rows in ascending sample index (MLM rows: sample index, then token position).

    Loss methods return sums, not means, so that strategies that split a batch differently add up to the same
    number; divide by the counts (summed over a step, or all-reduced) to get means.
    """

    image_logits: torch.Tensor  # (Ni, C)
    image_labels: torch.Tensor  # int64 (Ni,), IGNORE_INDEX when unlabelled
    mlm_logits: torch.Tensor  # (M, V), masked positions only
    mlm_labels: torch.Tensor  # int64 (M,)
    image_index: torch.Tensor  # int64 (Ni,), sample index of each image row
    mlm_index: torch.Tensor  # int64 (M,), sample index of each MLM row
    nsp_logits: torch.Tensor  # (Nt, 2), one row per text; (0, 2) without ``config.nsp``
    nsp_labels: torch.Tensor  # int64 (Nt,), 1: in order, 0: swapped, IGNORE_INDEX: no pair (short, or paired)
    nsp_index: torch.Tensor  # int64 (Nt,), sample index of each NSP row

    def image_loss_sum(self) -> torch.Tensor:
        return F.cross_entropy(self.image_logits.float(), self.image_labels, reduction="sum",
                               ignore_index=IGNORE_INDEX)

    def mlm_loss_sum(self) -> torch.Tensor:
        return F.cross_entropy(self.mlm_logits.float(), self.mlm_labels, reduction="sum", ignore_index=IGNORE_INDEX)

    def nsp_loss_sum(self) -> torch.Tensor:
        return F.cross_entropy(self.nsp_logits.float(), self.nsp_labels, reduction="sum", ignore_index=IGNORE_INDEX)

    def image_count(self) -> torch.Tensor:
        return (self.image_labels != IGNORE_INDEX).sum()

    def mlm_count(self) -> torch.Tensor:
        return (self.mlm_labels != IGNORE_INDEX).sum()

    def nsp_count(self) -> torch.Tensor:
        return (self.nsp_labels != IGNORE_INDEX).sum()

    def image_correct(self) -> torch.Tensor:
        return ((self.image_logits.argmax(-1) == self.image_labels) & (self.image_labels != IGNORE_INDEX)).sum()

    def mlm_correct(self) -> torch.Tensor:
        return ((self.mlm_logits.argmax(-1) == self.mlm_labels) & (self.mlm_labels != IGNORE_INDEX)).sum()

    def nsp_correct(self) -> torch.Tensor:
        return ((self.nsp_logits.argmax(-1) == self.nsp_labels) & (self.nsp_labels != IGNORE_INDEX)).sum()

    @staticmethod
    def cat(parts: list[ModelOutput]) -> ModelOutput:
        """Concatenate the outputs of inputs run one after another (indices already those of the whole batch)."""
        fields = {}
        for task in ("image", "mlm", "nsp"):
            for what in ("logits", "labels", "index"):
                fields[f"{task}_{what}"] = torch.cat([getattr(p, f"{task}_{what}") for p in parts])
        return ModelOutput(**fields)


Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (logits, labels, sample index) of one task


def _image_index(inp: ModelInput) -> torch.Tensor:
    """Sample indices (Ni,) of the input's images: a text at one of them is the text of an image_text pair."""
    if inp.image is not None:
        return inp.image.index
    return inp.text.index[:0] if inp.text is not None else torch.zeros(0, dtype=torch.long)


@dataclass
class _Stretch:
    """One side's tokens in a packed encoder call: ``x`` (n, D) and its sequences' lengths' ``offsets``; for
    packed text and embeddings also each token's row and position and the MLM labels, made once for both the
    embedding and the heads."""

    x: torch.Tensor  # (n, D)
    offsets: torch.Tensor  # int64 (S+1,), offsets[0] == 0
    max_len: int
    row: torch.Tensor | None = None  # (n,)
    pos: torch.Tensor | None = None  # (n,)
    labels: torch.Tensor | None = None  # int64 (n,), IGNORE_INDEX where no MLM loss


class ViTBERT(nn.Module):
    """``model(batch) -> ModelOutput`` for every batch type of :mod:`mmload.batch`."""

    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.image = ImageTokenizer(config)
        self.text = TextTokenizer(config)
        self.emb_in = EmbeddingInput(config) if config.emb_dim is not None else None
        self.encoder = Encoder(config)
        self.image_head = Head(config, config.num_classes)
        self.mlm_head = Head(config, config.vocab_size)
        self.nsp_head = Head(config, 2) if config.nsp else None
        self.reset_parameters(torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """BERT/ViT initialization (normal, std 0.02; LayerNorm 1, 0) from ``generator``, not global state."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.image.cls, std=0.02, generator=generator)
        nn.init.trunc_normal_(self.image.pos, std=0.02, generator=generator)
        if self.emb_in is not None:
            nn.init.normal_(self.emb_in.mask_emb, std=0.02, generator=generator)

    # ---- parameter groups for the trainer ----

    def shared_encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the shared encoder (its blocks and, pre-LN, its final LayerNorm)."""
        return self.encoder.parameters()

    def parameter_names(self, group: str) -> list[str]:
        """Names (as in ``named_parameters()``) of one of ``FREEZE_GROUPS``; groups may overlap."""
        if group not in FREEZE_GROUPS:
            raise ValueError(f"unknown parameter group {group!r}; choose one of {FREEZE_GROUPS}")
        if group == "layer_norms":
            return [f"{m}.{p}" for m, mod in self.named_modules() if isinstance(mod, nn.LayerNorm)
                    for p, _ in mod.named_parameters(recurse=False)]
        if group == "position_embeddings":
            return ["image.pos", "text.wpe.weight"]
        prefixes = {"embeddings": ("image.", "text.", "emb_in."), "heads": ("image_head.", "mlm_head.", "nsp_head."),
                    "encoder": ("encoder.",)}[group]
        return [n for n, _ in self.named_parameters() if n.startswith(prefixes)]

    # ---- encoders: final hidden states, no heads ----

    def encode_images(self, pixels: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> (N, 1+P, D); token 0 is the class token. ``sizes`` (N, 2): each image's own
        ``(height, width)`` (``ImageBatch.sizes``; the rest is padding, masked): rows of padding come out too,
        and mean nothing."""
        if sizes is None:
            return self.encoder(self.image(pixels))
        p = self.config.patch_size
        return self.encoder(self.image(pixels, self._grids(sizes)), mask=patch_mask(pixels, sizes, p))

    def encode_patches(self, images: JaggedImages) -> torch.Tensor:
        """Patch sequences end to end -> (sum (1+P), D), no padding; image ``i``'s tokens (class token first) are
        rows ``images.cu_seqlens()[i]:images.cu_seqlens()[i + 1]``."""
        x, offsets = self.image.patches(images)  # (sum (1+P), D), (N+1,)
        return self.encoder(x, packed=Packed(offsets, images.max_len))

    def _grids(self, sizes: torch.Tensor) -> list[tuple[int, int]]:
        """Each image's patch grid, on the host (one read of ``sizes``: a sync on CUDA); an image not made of
        whole patches is an error, not floored."""
        p = self.config.patch_size
        host = sizes.tolist()
        if any(h % p or w % p for h, w in host):
            raise ValueError(f"image sizes {host} are not whole patches of the model's patch_size {p}: "
                             f"decode native-resolution images with patch_size={p} (dataset or make_loader)")
        return [(h // p, w // p) for h, w in host]

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) with ``mask`` (B, T) bool, True on real tokens -> (B, T, D)."""
        B, T = ids.shape
        self._check_text_len(T)
        ids = ids.long()
        pos = torch.arange(T, device=ids.device).expand(B, T)  # (B, T)
        types = token_types(ids, self.config.sep_id) if self.config.nsp else None  # (B, T)
        return self.encoder(self.text(ids, pos, types), mask=mask)  # (B, T, D)

    def encode_text_packed(self, ids: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
        """Packed ids (sum T,) with ``offsets`` (B+1,) and host ``max_len`` -> (sum T, D), no padding."""
        x, _, _ = self._embed_text_packed(ids, offsets, max_len)  # (sum T, D)
        return self.encoder(x, packed=Packed(offsets, max_len))

    def _embed_text_packed(self, ids: torch.Tensor, offsets: torch.Tensor,
                           max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Text tokens (sum T, D), plus each token's row and position (sum T,)."""
        self._check_text_len(max_len)
        ids = ids.long()
        row, pos = row_positions(offsets, ids.shape[0])  # (sum T,), (sum T,)
        types = packed_token_types(ids, offsets, row, self.config.sep_id) if self.config.nsp else None  # (sum T,)
        return self.text(ids, pos, types), row, pos

    # ---- forward: one input contract, branches on layouts ----

    def forward(self, batch: Any) -> ModelOutput:
        """``batch``: any mmload batch (packed or not) or a :class:`~mmload.layouts.ModelInput`."""
        inp = model_input(batch)
        if inp.parts:  # run one after another: the per-sample baseline, slow by design
            return ModelOutput.cat([self._forward_input(part) for part in inp.parts])
        return self._forward_input(inp)

    def _forward_input(self, inp: ModelInput) -> ModelOutput:
        """Dense sides get one dense encoder call each. When any side is packed (packed text, embeddings), dense
        images join it: image patch sequences and the packed sequences go through one packed encoder call."""
        if inp.image is None and inp.text is None and inp.embeddings is None:
            raise ValueError("the batch has neither images nor texts nor embeddings")
        if inp.image is not None and inp.embeddings is not None:
            raise ValueError("an input with both pixels and precomputed embeddings would give two sets of image rows; "
                             "give images one layout")
        where, here = next(t.device for t in inp.tensors()), self.mlm_head.out.weight.device
        if where != here:
            raise ValueError(f"the batch is on {where}, the model on {here}: move it with batch.to(device) first "
                             "(a PackedBatch moves in one copy)")
        images = mlm = nsp = None
        stretches: list[tuple[str, _Stretch]] = []
        if inp.image is not None:
            if inp.packed:
                stretches.append(("image", self._image_stretch(inp.image)))
            else:
                images = self._images_dense(inp.image)
        if inp.text is not None:
            if inp.text.packed:
                stretches.append(("text", self._text_stretch(inp.text)))
            else:
                mlm, nsp = self._text_dense(inp.text, _image_index(inp))
        if inp.embeddings is not None:
            stretches.append(("embeddings", self._embedding_stretch(inp.embeddings)))
        if stretches:
            for (side, st), h in zip(stretches, self._encode_packed([st for _, st in stretches])):
                if side == "image":
                    images = self._images_packed(h, st, inp.image)
                elif side == "text":
                    mlm, nsp = self._text_packed(h, st, inp.text, _image_index(inp))
                else:
                    images, mlm = self._embeddings_packed(h, st, inp.embeddings)
        return self._output(images, mlm, nsp)

    def _encode_packed(self, stretches: list[_Stretch]) -> list[torch.Tensor]:
        """One packed encoder call over every stretch's sequences; the hidden states split back per stretch."""
        offsets, base = [stretches[0].offsets[:1]], 0
        for st in stretches:
            offsets.append(st.offsets[1:] + base)
            base += st.x.shape[0]
        packed = Packed(torch.cat(offsets), max(st.max_len for st in stretches))  # offsets (S+1,)
        x = self.encoder(torch.cat([st.x for st in stretches]), packed=packed)  # (sum n, D)
        return list(x.split([st.x.shape[0] for st in stretches]))

    def _image_stretch(self, images: ImageLayout) -> _Stretch:
        """Every image's patch sequence (class token first) for the packed encoder call; images of several sizes
        give sequences of their own lengths, their padding left out (patch sequences carry none)."""
        if images.packed:
            x, offsets = self.image.patches(images)  # (sum (1+P), D), (N+1,)
            return _Stretch(x, offsets, images.max_len)
        p = self.config.patch_size
        if images.sizes is None:
            xi = self.image(images.pixels)  # (Ni, L, D), L = 1+P
            Ni, L, D = xi.shape
            offsets = torch.arange(0, Ni * L + 1, L, device=xi.device)  # (Ni+1,)
            return _Stretch(xi.reshape(Ni * L, D), offsets, L)
        grids = self._grids(images.sizes)  # the one device read
        xi = self.image(images.pixels, grids)  # (Ni, 1+P, D), P the batch's grid
        lengths = images.grids(p).prod(dim=1) + 1  # (Ni,), on the device: no copy from the host
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])  # (Ni+1,)
        total = sum(r * c + 1 for r, c in grids)
        keep = torch.nonzero_static(images.patch_mask(p).flatten(), size=total).squeeze(1)  # (sum L,), no sync
        return _Stretch(xi.flatten(0, 1)[keep], offsets, max(r * c for r, c in grids) + 1)  # (sum L, D)

    def _images_packed(self, h: torch.Tensor, st: _Stretch, images: ImageLayout) -> Rows:
        return self._classify(self.image_head, h[st.offsets[:-1]], images.labels, images.index)  # class tokens

    def _text_stretch(self, text: JaggedText) -> _Stretch:
        x, row, pos = self._embed_text_packed(text.values, text.offsets, text.max_len)  # (sum T, D), (sum T,) x2
        return _Stretch(x, text.offsets, text.max_len, row, pos, text.mlm_labels.long())

    def _text_packed(self, h: torch.Tensor, st: _Stretch, text: JaggedText,
                     image_index: torch.Tensor) -> tuple[Rows, Rows | None]:
        sample = text.index.long()[st.row]  # (sum T,)
        mlm = self._mlm(h, st.labels, sample, st.pos, stride=text.max_len)
        nsp = None
        if self.nsp_head is not None:
            nsp = self._nsp(h[text.offsets[:-1]], text.labels, text.index, image_index)  # [CLS] (Nt, D)
        return mlm, nsp

    def _embedding_stretch(self, emb: PackedEmbeddings) -> _Stretch:
        """Precomputed embeddings projected, with the mask embedding at MLM positions."""
        if self.emb_in is None:
            raise ValueError("precomputed embeddings need a projection: build the model with "
                             "ModelConfig(emb_dim=<width of the precomputed embeddings>)")
        if emb.values.shape[-1] != self.config.emb_dim:
            raise ValueError(f"embeddings are {emb.values.shape[-1]} wide but config.emb_dim is "
                             f"{self.config.emb_dim}; set emb_dim to the width of the precomputed embeddings")
        self._check_text_len(emb.max_len)  # embedding rows take the text tokenizer's positions
        row, pos = emb.row_positions()  # (sum L,), (sum L,)
        labels = torch.where(emb.is_text[row], emb.mlm_labels.long(), IGNORE_INDEX)  # (sum L,), text rows only
        x = self.emb_in(emb.values, labels != IGNORE_INDEX, self.text.wpe(pos))  # (sum L, D)
        return _Stretch(x, emb.offsets, emb.max_len, row, pos, labels)

    def _embeddings_packed(self, h: torch.Tensor, st: _Stretch, emb: PackedEmbeddings) -> tuple[Rows | None, Rows]:
        image_rows = (~emb.is_text).nonzero().squeeze(1)  # (Ni,)
        images = None
        if image_rows.numel():
            images = self._classify(self.image_head, h[emb.offsets[image_rows]], emb.labels[image_rows],
                                    emb.index[image_rows])
        mlm = self._mlm(h, st.labels, emb.index.long()[st.row], st.pos, stride=emb.max_len)
        return images, mlm

    # ---- pieces shared by the paths ----

    def _images_dense(self, images: ImageBatch) -> Rows:
        x = self.encode_images(images.pixels, images.sizes)  # (Ni, 1+P, D)
        return self._classify(self.image_head, x[:, 0], images.labels, images.index)

    def _text_dense(self, text: TextBatch, image_index: torch.Tensor) -> tuple[Rows, Rows | None]:
        """MLM rows, and NSP rows when the model has the head."""
        B, T = text.ids.shape
        x = self.encode_text(text.ids, text.mask)  # (B, T, D)
        pos = torch.arange(T, device=x.device).expand(B, T)  # (B, T)
        labels = torch.where(text.mask, text.mlm_labels.long(), IGNORE_INDEX)  # (B, T), never a loss on padding
        sample = text.index.long()[:, None].expand(B, T)  # (B, T)
        mlm = self._mlm(x.reshape(B * T, -1), labels.reshape(-1), sample.reshape(-1), pos.reshape(-1), stride=T)
        nsp = self._nsp(x[:, 0], text.labels, text.index, image_index) if self.nsp_head is not None else None
        return mlm, nsp

    def _classify(self, head: nn.Module, cls: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> Rows:
        """Class tokens (N, D) -> ``head`` logits in ascending sample index."""
        order = index.argsort()  # (N,)
        return head(cls[order]), labels.long()[order], index.long()[order]

    def _nsp(self, cls: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, image_index: torch.Tensor) -> Rows:
        """Text [CLS] tokens (Nt, D) -> NSP rows. A paired sample's ``label`` is its image's class, not an NSP
        target (``NextSegmentPairs`` pairs texts only), so its row is ignored."""
        labels = torch.where(torch.isin(index, image_index), IGNORE_INDEX, labels.long())  # (Nt,)
        return self._classify(self.nsp_head, cls, labels, index)

    def _mlm(self, h: torch.Tensor, labels: torch.Tensor, sample: torch.Tensor, pos: torch.Tensor,
             stride: int) -> Rows:
        """Flat tokens h (N, D) -> MLM logits at labelled positions only, in (sample index, position) order.

        Gathering the M << N masked rows before the vocab projection saves (N - M) * D * V multiply-adds.
        """
        sel = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # (M,)
        sel = sel[(sample[sel] * stride + pos[sel]).argsort()]  # (M,), stride > every position
        return self.mlm_head(h[sel]), labels[sel], sample[sel]

    def _check_text_len(self, length: int) -> None:
        if length > self.config.max_text_len:
            raise ValueError(f"a sequence of {length} tokens exceeds max_text_len={self.config.max_text_len}; "
                             f"truncate in the tokenizer or raise max_text_len")

    def _output(self, images: Rows | None, mlm: Rows | None, nsp: Rows | None = None) -> ModelOutput:
        w = self.mlm_head.out.weight
        none = w.new_zeros(0, dtype=torch.long)  # (0,): labels and indices of an absent modality or task
        images = images or (w.new_zeros(0, self.config.num_classes), none, none)
        mlm = mlm or (w.new_zeros(0, self.config.vocab_size), none, none)
        nsp = nsp or (w.new_zeros(0, 2), none, none)
        return ModelOutput(image_logits=images[0], image_labels=images[1], image_index=images[2],
                           mlm_logits=mlm[0], mlm_labels=mlm[1], mlm_index=mlm[2],
                           nsp_logits=nsp[0], nsp_labels=nsp[1], nsp_index=nsp[2])
