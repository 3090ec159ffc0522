"""What a run writes as it goes: ``metrics.jsonl`` lines and TensorBoard scalars (rank 0), and with ``--log-keys``
the keys of every micro-batch (every rank). After a resume, lines past the resumed step are trimmed first, so
the files read as one run with no step twice."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def trim_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of ``path`` whose ``step`` is at most ``last_step`` (a run resumed from that step writes the
    rest again); rewritten atomically. A missing file is left missing."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if (record := _parsed(line)) is not None and record.get("step", 0) <= last_step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)


def _parsed(line: str) -> dict[str, Any] | None:
    """A JSON line, or None for a blank one or one a crash cut short (the run is redone from the resumed step)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class MetricsLog:
    """``metrics.jsonl`` + TensorBoard scalars under ``out``; does nothing without ``out`` or off rank 0."""

    def __init__(self, out: Path | None, enabled: bool, resumed_step: int | None = None) -> None:
        self.file = self.tb = None
        if out is not None and enabled:
            from torch.utils.tensorboard import SummaryWriter

            out.mkdir(parents=True, exist_ok=True)
            if resumed_step is not None:
                trim_jsonl(out / "metrics.jsonl", resumed_step)
            self.file = open(out / "metrics.jsonl", "a", encoding="utf-8")
            self.tb = SummaryWriter(str(out / "tb"), purge_step=None if resumed_step is None else resumed_step + 1)

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


class KeyLog:
    """``out/keys-rank{rank}.jsonl``: one line per micro-batch, ``{"step", "micro", "epoch", "keys"}`` (``step``
    1-based as in ``metrics.jsonl``), flushed, so a user can audit which samples each step saw. Every rank writes
    its own file; nothing happens unless ``enabled``. On a resume every file is trimmed to the resumed step, those of
    old ranks a resume onto fewer ranks left behind too (by rank 0), so the files read as one run."""

    def __init__(self, out: Path | None, rank: int, enabled: bool, resumed_step: int | None = None,
                 world: int = 1) -> None:
        self.file = None
        if out is not None and enabled:
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"keys-rank{rank}.jsonl"
            if resumed_step is not None:
                trim_jsonl(path, resumed_step)
                if rank == 0:
                    for old in out.glob("keys-rank*.jsonl"):
                        other = old.stem.removeprefix("keys-rank")
                        if other.isdigit() and int(other) >= world:
                            trim_jsonl(old, resumed_step)
            self.file = open(path, "a", encoding="utf-8")

    def write(self, step: int, micro: int, epoch: int, keys: list[str]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "micro": micro, "epoch": epoch, "keys": list(keys)}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


__all__ = ["KeyLog", "MetricsLog", "trim_jsonl"]
