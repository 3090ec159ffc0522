"""What an epoch delivered: every key seen how often, and the errors the workers counted."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mmload.errors import NOTICES


@dataclass
class Coverage:
    """Counts each sample key a consumer received; ``report()`` says what was seen how often.

    ``expected`` is how many samples the shards hold (e.g. a manifest's total); samples neither delivered nor
    counted as bad are reported as ``lost``, which a correct loader keeps at zero.
    """

    counts: Counter[str] = field(default_factory=Counter)

    def add(self, batch: Any) -> None:
        """Count the keys of one batch of any strategy (packed or not) or a list of samples."""
        keys = batch.keys if hasattr(batch, "keys") and not isinstance(batch, dict) else [s.key for s in batch]
        self.counts.update(keys)

    def update(self, keys: Iterable[str]) -> None:
        self.counts.update(keys)

    def report(self, expected: int | None = None, errors: dict[str, int] | None = None) -> dict[str, Any]:
        seen = sum(self.counts.values())
        repeated = {k: n for k, n in self.counts.items() if n > 1}
        out: dict[str, Any] = {"samples": seen, "unique": len(self.counts), "repeats": seen - len(self.counts),
                               "repeated_keys": sorted(repeated)[:10], "errors": dict(errors or {})}
        if expected is not None:
            bad_samples = sum(n for kind, n in (errors or {}).items() if kind != "shard_read" and kind not in NOTICES)
            out["expected"] = expected
            out["lost"] = expected - len(self.counts) - bad_samples
        return out


def loader_errors(state: dict[str, Any]) -> Counter[str]:
    """Error counts by kind, summed over every worker (and blended source), from a ``StatefulLoader`` state.

    Workers count bad input in their own processes; their states travel to the main process with every
    batch, so the loader's ``state_dict()`` is where the counts of a whole run meet.
    """
    total: Counter[str] = Counter()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("stage") == "decode":  # a decode stage's state (mmload.stages.Decode)
                total.update(node["errors"])
                return
            for v in node.values():
                walk(v)
        elif isinstance(node, list | tuple):
            for v in node:
                walk(v)

    walk(state)
    return total
