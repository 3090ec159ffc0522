"""Iterative gradient masking for the shared encoder (ViT-BERT paper, Li et al. 2021, Algorithm 1).

Joint training lets the two losses fight over the shared weights. Gradient masking splits the shared entries
between them: a binary mask ``M`` over the shared parameters picks the top-k entries by text-gradient magnitude
(``k = ratio x number of shared entries``); the text gradient updates only ``M``, the image gradient only ``~M``:

    g_shared = where(M, g_text, g_image)

Parameters outside the shared encoder (tokenizers, heads) keep the plain sum of both gradients: each of them gets
only its own modality's gradient anyway. The ratio starts at ``step``, grows by ``step`` every ``interval``
optimizer steps up to ``final``, and the mask is recomputed from the current text gradient at each growth.

NOTE [masking under DDP]: the mask must be the same on every rank and each modality's gradient must be averaged
before it is masked. The trainer runs forward and both backward passes under ``no_sync()``; then
:meth:`GradientMasker.apply` all-reduces the text and image gradients (and the other parameters' gradients)
itself, recomputes the mask when due (broadcasting it from rank 0, so that ties in top-k cannot split the
ranks) and writes ``where(M, g_text, g_image)`` into ``.grad``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class MaskSchedule:
    """Mask ratio at each optimizer step: ``min(final, step * (1 + i // interval))``."""

    step: float  # first ratio, and the increment at each growth
    interval: int  # optimizer steps between growths
    final: float  # the ratio stops growing here

    def __post_init__(self) -> None:
        if not 0.0 < self.final <= 1.0:
            raise ValueError(f"final mask ratio must be in (0, 1], got {self.final}")
        if not 0.0 < self.step <= self.final:
            raise ValueError(f"mask step must be in (0, final ratio={self.final}], got {self.step}")
        if self.interval < 1:
            raise ValueError(f"mask interval must be >= 1 step, got {self.interval}")

    def ratio(self, i: int) -> float:
        return min(self.final, self.step * (1 + i // self.interval))


def modality_grads(text_loss: torch.Tensor, image_loss: torch.Tensor, params: Sequence[torch.Tensor]
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of each loss w.r.t. ``params`` (two backward passes over one graph); zeros where unused."""

    def grads(loss: torch.Tensor, retain: bool) -> list[torch.Tensor]:
        if not loss.requires_grad:  # e.g. a bucketed batch with no text at all
            return [torch.zeros_like(p) for p in params]
        found = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found)]

    return grads(text_loss, retain=True), grads(image_loss, retain=False)


def _all_reduce_mean(tensors: Sequence[torch.Tensor]) -> None:
    """Average ``tensors`` in place over all ranks with one all-reduce."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


class GradientMasker:
    """Algorithm 1 over ``params`` (the shared-encoder parameters); ``others`` are the trainable rest.

    Per optimizer step: :meth:`backward` once per micro-batch, then :meth:`apply` (average over ranks, grow and
    recompute the mask when due, write ``.grad``), then ``optimizer.step()``.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], schedule: MaskSchedule,
                 others: Sequence[torch.nn.Parameter] = ()) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("gradient masking needs at least one shared parameter that requires grad")
        self.others = list(others)
        self.schedule = schedule
        self.numel = sum(p.numel() for p in self.params)
        self.ratio = 0.0  # ratio of the current mask; 0 = no mask yet
        self.masks: list[torch.Tensor] | None = None  # bool, one per param, True = text gradient
        self._text: list[torch.Tensor] | None = None  # this step's text gradients of params, summed
        self._image: list[torch.Tensor] | None = None

    def backward(self, text_loss: torch.Tensor, image_loss: torch.Tensor) -> None:
        """Accumulate one micro-batch: each loss's shared gradient apart, the sum of both into ``others``' .grad."""
        n = len(self.params)
        g_text, g_image = modality_grads(text_loss, image_loss, self.params + self.others)
        if self._text is None:
            self._text, self._image = g_text[:n], g_image[:n]
        else:
            for acc, g in zip(self._text + self._image, g_text[:n] + g_image[:n]):
                acc.add_(g)
        for p, a, b in zip(self.others, g_text[n:], g_image[n:]):
            p.grad = a + b if p.grad is None else p.grad.add_(a).add_(b)

    @torch.no_grad()
    def apply(self, i: int) -> None:
        """After the micro-batches of optimizer step ``i``: set every ``.grad`` (see NOTE [masking under DDP])."""
        if self._text is None or self._image is None:
            raise RuntimeError("apply() before any backward(); call backward(text_loss, image_loss) first")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            _all_reduce_mean(self._text + self._image + [p.grad for p in self.others])
        self.update(i, self._text)
        for p, g in zip(self.params, self.combine(self._text, self._image)):
            p.grad = g
        self._text = self._image = None

    def due(self, i: int) -> bool:
        """Whether the mask must be (re)computed at optimizer step ``i``."""
        return self.masks is None or self.schedule.ratio(i) != self.ratio

    @torch.no_grad()
    def update(self, i: int, text_grads: Sequence[torch.Tensor]) -> bool:
        """Recompute the mask from ``text_grads`` if step ``i`` is due; returns whether it did."""
        if not self.due(i):
            return False
        ratio = self.schedule.ratio(i)
        k = min(self.numel, max(1, math.floor(ratio * self.numel + 0.5)))
        flat = torch.cat([g.detach().abs().reshape(-1).float() for g in text_grads])  # (numel,)
        mask = torch.zeros(self.numel, dtype=torch.bool, device=flat.device)
        mask[torch.topk(flat, k, sorted=False).indices] = True
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            as_bytes = mask.to(torch.uint8)
            dist.broadcast(as_bytes, src=0)  # one mask everywhere, whatever ties top-k broke differently
            mask = as_bytes.bool()
        self.masks = [m.view_as(p) for m, p in zip(mask.split([p.numel() for p in self.params]), self.params)]
        self.ratio = ratio
        return True

    @torch.no_grad()
    def combine(self, text_grads: Sequence[torch.Tensor], image_grads: Sequence[torch.Tensor]
                ) -> list[torch.Tensor]:
        """``where(M, g_text, g_image)`` per parameter; call :meth:`update` first."""
        if self.masks is None:
            raise RuntimeError("no gradient mask yet; call update(step, text_grads) before combine()")
        return [torch.where(m, t, g) for m, t, g in zip(self.masks, text_grads, image_grads)]

    def masked_fraction(self) -> float:
        """Fraction of shared entries the text gradient updates (the realised ratio)."""
        return 0.0 if self.masks is None else sum(int(m.sum()) for m in self.masks) / self.numel

    def state_dict(self) -> dict[str, Any]:
        masks = None if self.masks is None else [m.cpu() for m in self.masks]
        return {"ratio": self.ratio, "masks": masks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = state["masks"]
        if masks is not None:
            shapes = [tuple(p.shape) for p in self.params]
            if [tuple(m.shape) for m in masks] != shapes:
                raise ValueError("gradient mask shapes do not match the shared parameters; was the checkpoint made "
                                 "with another model or freeze mode?")
            masks = [m.to(device=p.device, dtype=torch.bool) for m, p in zip(masks, self.params)]
        self.masks, self.ratio = masks, float(state["ratio"])
