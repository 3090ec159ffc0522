"""Knowledge distillation: the KD loss and the teachers that give logits row for row with ``ModelOutput``.

    loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

summed over labelled rows, like every loss of ``ModelOutput``, so the trainer divides by the same counts. With
``alpha = 0`` the KL term is multiplied by an exact zero: the loss and its gradient equal plain CE bit for bit.

Teachers see the same inputs as the student: the text teacher (a Hugging Face masked LM, e.g. BertForMaskedLM)
gets the masked ids and gives logits at the masked positions; the image teacher (a Hugging Face image classifier
or an mmload checkpoint) gets the uint8 pixels. Rows come out in ``ModelOutput`` order: images by sample index,
MLM positions by (sample index, position). Precomputed embedding batches carry neither ids nor pixels, so they
cannot be distilled from a live teacher; ``mmload precompute --teacher`` stores an image teacher's logits beside
the embeddings instead, and ``ShardImageTeacher`` reads them back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmload.layouts import ModelInput, model_input, pad_images
from mmload.sample import IGNORE_INDEX


def kd_loss_sum(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                alpha: float, temperature: float) -> torch.Tensor:
    """Summed KD objective over the rows whose label is not ``IGNORE_INDEX``; plain CE without a teacher."""
    ce = F.cross_entropy(student_logits.float(), labels, reduction="sum", ignore_index=IGNORE_INDEX)
    if teacher_logits is None:
        return ce
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match student logits "
                         f"{tuple(student_logits.shape)}; the teacher needs the same classes / vocabulary")
    keep = labels != IGNORE_INDEX  # (N,)
    T = temperature
    kl = F.kl_div(F.log_softmax(student_logits[keep].float() / T, dim=-1),
                  F.log_softmax(teacher_logits[keep].float() / T, dim=-1), reduction="sum", log_target=True)
    return (1.0 - alpha) * ce + alpha * T * T * kl


# ---- the rows of a batch, in ModelOutput order ----

def _leaves(batch: Any) -> tuple[ModelInput, ...]:
    """The batch's model inputs (one, or the per-sample parts); indices are those of the whole batch."""
    leaves = model_input(batch).leaves()
    if any(leaf.embeddings is not None for leaf in leaves):
        raise ValueError("precomputed-embedding batches carry no pixels or ids for a teacher; distill with the "
                         "padded, bucketed, per-sample or nested strategy")
    return leaves


def image_rows(batch: Any) -> list[torch.Tensor] | torch.Tensor | None:
    """uint8 pixels (Ni, 3, H, W) of every image of ``batch``, by ascending sample index; None without images.
    Images of several sizes (native resolution) come as a list of (3, h, w), each without its padding."""
    images = [leaf.image for leaf in _leaves(batch) if leaf.image is not None]
    if not images:
        return None
    order = torch.cat([im.index.long() for im in images]).argsort().tolist()
    dense = all(not im.packed and im.sizes is None for im in images)
    if dense and len({im.pixels.shape[-2:] for im in images}) == 1:
        return torch.cat([im.pixels for im in images])[order]  # (Ni, 3, H, W)
    every = [pixels for im in images for pixels in im.images()]  # each without padding, patch sequences made whole
    return [every[i] for i in order]


def text_rows(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Padded ``ids`` (B, T), ``mask`` (B, T) and ``mlm_labels`` (B, T) (IGNORE_INDEX on padding), rows by
    ascending sample index; None without texts. Packed text is padded here: an HF teacher reads (B, T)."""
    texts = [leaf.text.padded() for leaf in _leaves(batch) if leaf.text is not None]
    if not texts:
        return None
    T = max(t.ids.shape[1] for t in texts)
    ids = torch.cat([F.pad(t.ids.long(), (0, T - t.ids.shape[1])) for t in texts])  # (B, T)
    mask = torch.cat([F.pad(t.mask, (0, T - t.mask.shape[1])) for t in texts])  # (B, T)
    labels = torch.cat([F.pad(t.mlm_labels.long(), (0, T - t.mlm_labels.shape[1]), value=IGNORE_INDEX)
                        for t in texts])  # (B, T)
    order = torch.cat([t.index.long() for t in texts]).argsort()  # (B,)
    labels = torch.where(mask, labels, IGNORE_INDEX)  # as the model: never a loss on padding
    return ids[order], mask[order], labels[order]


# ---- teachers ----

class TextTeacher(nn.Module):
    """A Hugging Face masked LM (``AutoModelForMaskedLM``) giving MLM logits (M, V) at the masked positions."""

    def __init__(self, path: str | Path, vocab_size: int) -> None:
        super().__init__()
        from transformers import AutoModelForMaskedLM

        self.model = AutoModelForMaskedLM.from_pretrained(path).eval().requires_grad_(False)
        theirs = self.model.config.vocab_size
        if theirs != vocab_size:
            raise ValueError(f"text teacher {path} has vocab_size {theirs} but our tokenizer has {vocab_size}: "
                             "the teacher must read the same word-piece ids; tokenize the shards with the "
                             f"teacher's tokenizer (--tokenizer {path}) or pick a teacher with our vocabulary")

    @torch.no_grad()
    def forward(self, batch: Any) -> torch.Tensor | None:
        rows = text_rows(batch)
        if rows is None:
            return None
        ids, mask, labels = rows
        sel = labels != IGNORE_INDEX  # (B, T); row-major order = (sample index, position) order
        if hasattr(self.model, "bert") and hasattr(self.model, "cls"):  # BertForMaskedLM: head on masked rows only
            h = self.model.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, T, D)
            return self.model.cls(h[sel])  # (M, V)
        return self.model(input_ids=ids, attention_mask=mask.long()).logits[sel]  # (M, V)


class ImageTeacher(nn.Module):
    """Image logits (Ni, C): a Hugging Face image classifier folder or an mmload checkpoint file."""

    def __init__(self, path: str | Path, num_classes: int | None = None) -> None:
        super().__init__()
        path = Path(path)
        if path.is_file():
            from models.checkpoint import load_model

            self.model, _ = load_model(path)
            self.hf = False
            theirs = self.model.config.num_classes
        else:
            from transformers import AutoModelForImageClassification

            self.model = AutoModelForImageClassification.from_pretrained(path)
            self.hf = True
            theirs = self.model.config.num_labels
            self.size = self.model.config.image_size
            pre = path / "preprocessor_config.json"
            stats = json.loads(pre.read_text()) if pre.is_file() else {}
            self.register_buffer("mean", torch.tensor(stats.get("image_mean", [0.5] * 3)).view(1, 3, 1, 1), False)
            self.register_buffer("std", torch.tensor(stats.get("image_std", [0.5] * 3)).view(1, 3, 1, 1), False)
        self.model.eval().requires_grad_(False)
        if num_classes is not None and theirs != num_classes:
            raise ValueError(f"image teacher {path} has {theirs} classes, the student {num_classes}; KD needs the "
                             "same classes in the same order")

    @torch.no_grad()
    def forward(self, batch: Any) -> torch.Tensor | None:
        pixels = image_rows(batch)
        if pixels is None:
            return None
        if not self.hf:  # a checkpoint: the student's images, cut to whole patches of the teacher's patch size
            q = self.model.config.patch_size
            if isinstance(pixels, list):  # native: each image on its own grid, padded into one call
                pixels, sizes = pad_images([p[:, :p.shape[-2] // q * q, :p.shape[-1] // q * q] for p in pixels])
            else:
                pixels, sizes = pixels[..., :pixels.shape[-2] // q * q, :pixels.shape[-1] // q * q], None
            return self.model.image_head(self.model.encode_images(pixels, sizes)[:, 0])  # (Ni, C)
        # a fixed-size teacher: every image resized to its size here, on the device, for the teacher only
        if isinstance(pixels, list):
            x = torch.cat([self._sized(p[None].float() / 255.0) for p in pixels])  # (Ni, 3, S, S)
        else:
            x = self._sized(pixels.float() / 255.0)  # (Ni, 3, S, S)
        return self.model(pixel_values=(x - self.mean) / self.std).logits  # (Ni, C)

    def _sized(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x


class ShardImageTeacher(nn.Module):
    """Image logits stored in the shards by ``mmload precompute --teacher`` (embedding batches), by row order."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, batch: Any) -> torch.Tensor | None:
        emb = model_input(batch).embeddings
        if emb is None or emb.teacher_logits is None:
            raise ValueError("--teacher-logits reads the logits that `mmload precompute --teacher` stored beside the "
                             "embeddings: train with --strategy embeddings on such shards")
        rows = (~emb.is_text).nonzero().squeeze(1)  # (Ni,)
        if rows.numel() == 0:
            return None
        rows = rows[emb.index[rows].argsort()]  # ModelOutput's image order: ascending sample index
        logits = emb.teacher_logits[rows]  # (Ni, C)
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"the shards' teacher logits have {logits.shape[1]} classes, the student "
                             f"{self.num_classes}; KD needs the same classes in the same order")
        return logits


@dataclass
class Distiller:
    """The KD settings and teachers of a run; ``teacher_logits(batch)`` -> (image logits, MLM logits) or Nones."""

    alpha: float = 0.0
    temperature: float = 1.0
    text: TextTeacher | None = None
    image: ImageTeacher | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"kd alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"kd temperature must be > 0, got {self.temperature}")

    @property
    def active(self) -> bool:
        return self.alpha > 0 and (self.text is not None or self.image is not None)

    def teacher_logits(self, batch: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.active:
            return None, None
        image = self.image(batch) if self.image is not None else None
        text = self.text(batch) if self.text is not None else None
        return image, text

    def to(self, device: torch.device | str) -> Distiller:
        for teacher in (self.text, self.image):
            if teacher is not None:
                teacher.to(device)
        return self
