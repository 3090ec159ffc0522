"""Learning-rate schedule: linear warm-up, then polynomial decay (BERT's schedule, ``power=1`` is linear)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR


@dataclass
class WarmupPolyDecay:
    """``factor(step)`` multiplying the peak learning rate.

    Steps ``0 .. warmup-1`` ramp linearly up to 1 (step 0 already moves: ``1 / warmup``); from ``warmup`` on the
    factor is ``(1 - progress) ** power`` with ``progress`` going from 0 at ``warmup`` to 1 at
    ``total``. A dataclass, not a lambda, so that ``LambdaLR.state_dict()`` saves it and checkpoints resume it.
    """

    warmup: int
    total: int
    power: float = 1.0

    def __post_init__(self) -> None:
        if self.total < 1:
            raise ValueError(f"total steps must be >= 1, got {self.total}")
        if not 0 <= self.warmup <= self.total:
            raise ValueError(f"warmup must be in [0, total={self.total}], got {self.warmup}")
        if self.power <= 0:
            raise ValueError(f"power must be > 0 (1 = linear decay), got {self.power}")

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.total == self.warmup:
            return 1.0
        progress = min(1.0, (step - self.warmup) / (self.total - self.warmup))
        return (1.0 - progress) ** self.power


def warmup_poly_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, power: float = 1.0
                          ) -> LambdaLR:
    """A ``LambdaLR`` over :class:`WarmupPolyDecay`; call ``scheduler.step()`` after each ``optimizer.step()``."""
    return LambdaLR(optimizer, WarmupPolyDecay(warmup, total, power))
