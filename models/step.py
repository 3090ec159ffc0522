"""One optimizer step of the joint objective: the loss terms, their normalization, and ``train_step``.

NOTE [loss normalization]: each micro-batch's summed losses are divided by that micro-batch's counts summed over
all ranks (one tiny all-reduce, no host sync) and multiplied by ``world_size / grad_accum``. DDP averages
gradients over ranks, so one step's gradient is the exact mean over the global micro-batch, averaged over the
``grad_accum`` micro-batches (counts of later micro-batches are not known before their forward). A modality
absent from a micro-batch everywhere contributes 0 (count clamped to 1).

NOTE [phase timing]: ``train_step(..., timer=PhaseTimer(device))`` times the step that training runs, phase by
phase (forward and loss, backward, optimizer: gradient masking, clipping, the optimizer and the schedule), with
the device synchronized before each clock read and a ``record_function`` range per phase for the profiler.
Without a timer nothing is synchronized: training pays nothing for the hook. The benchmark times this step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import record_function

from models.config import TrainConfig
from models.gradmask import GradientMasker
from models.kd import Distiller, kd_loss_sum
from models.vit_bert import ModelOutput, ViTBERT

STAT_NAMES = ("image_loss_sum", "image_count", "image_correct", "mlm_loss_sum", "mlm_count", "mlm_correct",
              "nsp_loss_sum", "nsp_count", "nsp_correct")  # NSP last: the first six keep their places
PHASES = ("forward", "backward", "optimizer")


def unwrap(model: nn.Module) -> ViTBERT:
    return model.module if isinstance(model, DDP) else model


@dataclass
class LossTerms:
    image: torch.Tensor  # image term of the objective, normalized and scaled, for backward
    text: torch.Tensor  # text_loss_weight x (MLM term + nsp_weight x NSP term)
    stats: torch.Tensor  # (9,) detached sums in STAT_NAMES order (plain CE, even with KD)

    @property
    def total(self) -> torch.Tensor:
        return self.image + self.text


def loss_counts(out: ModelOutput) -> torch.Tensor:
    """(3,) float: the loss targets of ``out`` [images, masked tokens, NSP pairs], the denominators of the means."""
    return torch.stack([out.image_count(), out.mlm_count(), out.nsp_count()]).float()


def loss_terms(out: ModelOutput, text_loss_weight: float = 1.0, *, counts: torch.Tensor | None = None,
               scale: float = 1.0, teacher: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
               distiller: Distiller | None = None, nsp_weight: float = 1.0) -> LossTerms:
    """The two objective terms of ``out``: summed (KD) losses / ``counts`` (3,) (``loss_counts``) x ``scale``.

    ``counts`` defaults to ``out``'s own; a zero count divides by 1 (its sum is 0 too). No KD on NSP.
    """
    local = loss_counts(out)  # (3,)
    denom = (local if counts is None else counts).clamp(min=1)
    alpha, T = (distiller.alpha, distiller.temperature) if distiller is not None else (0.0, 1.0)
    image_sum = kd_loss_sum(out.image_logits, out.image_labels, teacher[0], alpha, T)
    mlm_sum = kd_loss_sum(out.mlm_logits, out.mlm_labels, teacher[1], alpha, T)
    nsp_sum = out.nsp_loss_sum()
    with torch.no_grad():
        image_ce = image_sum if teacher[0] is None else out.image_loss_sum()
        mlm_ce = mlm_sum if teacher[1] is None else out.mlm_loss_sum()
        stats = torch.stack([image_ce.detach(), local[0], out.image_correct().float(),
                             mlm_ce.detach(), local[1], out.mlm_correct().float(),
                             nsp_sum.detach(), local[2], out.nsp_correct().float()])  # (9,)
    text = mlm_sum / denom[1] + nsp_weight * nsp_sum / denom[2]
    return LossTerms(image=image_sum / denom[0] * scale, text=text_loss_weight * text * scale, stats=stats)


def summarize(stats: torch.Tensor | Sequence[float], text_loss_weight: float = 1.0, nsp_weight: float = 1.0, *,
              nsp: bool = False) -> dict[str, float | None]:
    """Means and accuracies from summed ``STAT_NAMES``; None where a modality had no targets. ``nsp`` (the model
    has the head) adds ``nsp_loss``, ``nsp_acc`` and ``nsp_pairs``; the first six stats alone are accepted too."""
    s = dict.fromkeys(STAT_NAMES, 0.0) | dict(zip(STAT_NAMES, [float(x) for x in stats]))

    def ratio(a: str, b: str) -> float | None:
        return s[a] / s[b] if s[b] else None

    image_loss, mlm_loss = ratio("image_loss_sum", "image_count"), ratio("mlm_loss_sum", "mlm_count")
    nsp_loss = ratio("nsp_loss_sum", "nsp_count")
    loss = (image_loss or 0.0) + text_loss_weight * ((mlm_loss or 0.0) + nsp_weight * (nsp_loss or 0.0))
    out = {"loss": loss, "image_loss": image_loss, "mlm_loss": mlm_loss,
           "image_acc": ratio("image_correct", "image_count"), "mlm_acc": ratio("mlm_correct", "mlm_count"),
           "images": int(s["image_count"]), "mlm_tokens": int(s["mlm_count"])}
    if nsp:
        out |= {"nsp_loss": nsp_loss, "nsp_acc": ratio("nsp_correct", "nsp_count"), "nsp_pairs": int(s["nsp_count"])}
    return out


@dataclass
class StepOptions:
    text_loss_weight: float = 1.0
    grad_clip: float = 0.0  # max gradient norm; 0: no clipping
    precision: str = "bf16"  # autocast dtype on CUDA (the CPU runs fp32)
    nsp_weight: float = 1.0  # within the text term; no effect without an NSP head

    @classmethod
    def from_config(cls, config: TrainConfig) -> StepOptions:
        return cls(config.text_loss_weight, config.grad_clip, config.precision, config.nsp_weight)


@dataclass
class PhaseTimer:
    """Seconds per phase of ``train_step`` (NOTE [phase timing]), summed over the steps it timed."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = self._clock()
        with record_function(name):
            yield
        self.seconds[name] += self._clock() - t0


def _phase(timer: PhaseTimer | None, name: str) -> contextlib.AbstractContextManager:
    return timer.phase(name) if timer is not None else contextlib.nullcontext()


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def train_step(model: nn.Module, batches: Sequence[Any], optimizer: torch.optim.Optimizer,
               opts: StepOptions | None = None, *, scheduler: Any = None, masker: GradientMasker | None = None,
               distiller: Distiller | None = None, step: int = 0, timer: PhaseTimer | None = None) -> torch.Tensor:
    """One optimizer step over ``batches`` (the micro-batches, already on the device); returns the (9,) stats.

    ``model`` is a ViTBERT or a DDP around one. With ``masker`` the text and image gradients of the shared encoder
    are taken separately and combined by the mask (see ``models.gradmask``; under DDP the masker all-reduces them,
    not DDP). ``step`` is the optimizer step index, for the mask schedule. Gradients stay in ``.grad``. ``timer``
    times each phase (NOTE [phase timing]).
    """
    opts = opts or StepOptions()
    ddp = isinstance(model, DDP)
    world = _world() if ddp else 1
    raw = unwrap(model)
    device = raw.mlm_head.out.weight.device
    optimizer.zero_grad(set_to_none=True)
    totals = torch.zeros(len(STAT_NAMES), device=device)
    for i, batch in enumerate(batches):
        ddp_syncs = ddp and masker is None and i == len(batches) - 1  # DDP reduces on the last backward only
        with model.no_sync() if ddp and not ddp_syncs else contextlib.nullcontext():
            with _phase(timer, "forward"):
                with autocast(device, opts.precision):
                    out = model(batch)
                    teacher = distiller.teacher_logits(batch) if distiller is not None else (None, None)
                counts = loss_counts(out)  # (3,)
                if world > 1:
                    dist.all_reduce(counts)
                terms = loss_terms(out, opts.text_loss_weight, counts=counts, scale=world / len(batches),
                                   teacher=teacher, distiller=distiller, nsp_weight=opts.nsp_weight)
            with _phase(timer, "backward"):
                if masker is not None:
                    masker.backward(terms.text, terms.image)
                elif terms.total.requires_grad:  # False only for a batch without any target
                    terms.total.backward()
        totals += terms.stats
    with _phase(timer, "optimizer"):
        if masker is not None:
            masker.apply(step)
        if opts.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in raw.parameters() if p.grad is not None], opts.grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return totals


__all__ = ["PHASES", "STAT_NAMES", "LossTerms", "PhaseTimer", "StepOptions", "autocast", "loss_counts", "loss_terms",
           "summarize", "train_step", "unwrap"]
