"""Metrics of a run: ``metrics.jsonl`` lines and TensorBoard scalars, written by rank 0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """``metrics.jsonl`` + TensorBoard scalars under ``out``; does nothing without ``out`` or off rank 0."""

    def __init__(self, out: Path | None, enabled: bool) -> None:
        self.file = self.tb = None
        if out is not None and enabled:
            from torch.utils.tensorboard import SummaryWriter

            out.mkdir(parents=True, exist_ok=True)
            self.file = open(out / "metrics.jsonl", "a", encoding="utf-8")
            self.tb = SummaryWriter(str(out / "tb"))

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.tb.close()


__all__ = ["MetricsLog"]
