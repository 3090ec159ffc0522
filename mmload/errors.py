"""Named kinds of bad input, and the counting that keeps skipped input from going unnoticed."""

from __future__ import annotations

import ast
import logging
import re
from collections import Counter
from enum import StrEnum

import torch

log = logging.getLogger("mmload")


class ErrorKind(StrEnum):
    IMAGE_DECODE = "image_decode"  # not an image PIL can read, or truncated
    IMAGE_TOO_LARGE = "image_too_large"  # more pixels than max_pixels (decompression bomb guard)
    TEXT_DECODE = "text_decode"  # not UTF-8
    EMPTY_TEXT = "empty_text"  # caption or text with nothing but whitespace
    MISSING_PAYLOAD = "missing_payload"  # no image/text/embedding member, or metadata names one that is absent
    BAD_METADATA = "bad_metadata"  # .json or .cls that does not parse
    EMB_DECODE = "emb_decode"  # .emb.npy that numpy cannot read
    MEMBER_TOO_LARGE = "member_too_large"  # a tar member larger than max_member_bytes
    DUPLICATE_MEMBER = "duplicate_member"  # two members with the same key and extension
    DUPLICATE_KEY = "duplicate_key"  # a key that comes back later in the same shard
    SHARD_READ = "shard_read"  # a shard that cannot be opened or ends early (truncated, not a tar)
    SHARD_TIMEOUT = "shard_timeout"  # a remote shard that sent no byte for read_timeout seconds
    LINK_MEMBER = "link_member"  # a member the sample needs is a symlink or hardlink: a stream cannot follow it
    SAMPLE_TOO_LARGE = "sample_too_large"  # members adding up to more than max_sample_bytes (the rest unread)
    # notices: counted, the sample is delivered (NOTICES)
    UNUSED_MEMBER = "unused_member"  # a member no decoder reads (unknown or no extension, a second image, a link)
    DUPLICATE_KEY_ACROSS_SHARDS = "duplicate_key_across_shards"  # a key an earlier shard of the stream had too


NOTICES = frozenset({ErrorKind.UNUSED_MEMBER, ErrorKind.DUPLICATE_KEY_ACROSS_SHARDS})
"""Kinds counted without skipping anything: the sample is delivered, ``strict`` does not raise and
``max_consecutive_errors`` does not count them (nor does a notice end a run of bad samples)."""


_KINDS = frozenset(k.value for k in ErrorKind)


class SampleError(Exception):
    """A bad sample or shard: ``kind`` names what went wrong, the message names the shard and the key.

    NOTE [errors from workers]: a DataLoader worker hands its exception to the main process as its type and one
    message (the worker's traceback included), and the main process re-raises ``type(message)``. ``SampleError``
    made from that one message reads its kind, shard and key back out of it, so ``strict`` mode raises the same
    error, with the same fields, with workers as without.
    """

    # the original's own line in a worker's message: "...SampleError: [kind] URL key 'KEY': message"; the url may
    # hold anything, so with a key it runs to the last " key <literal>: " (without a key, to the first ": ")
    _LINE = re.compile(r"SampleError: \[(?P<kind>[a-z_]+)\] (?P<rest>.*)")
    _KEYED = re.compile(r"(?P<url>.*) key (?P<key>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"): ")

    def __init__(self, kind: ErrorKind | str, message: str | None = None, url: str = "", key: str = "") -> None:
        if message is None:  # re-raised from a worker: one message that names the rest (NOTE above)
            text = str(kind)
            lines = [m for m in map(self._LINE.search, text.splitlines()) if m and m["kind"] in _KINDS]
            self.kind, self.url, self.key = ErrorKind.SHARD_READ, "", ""
            if lines:
                line = lines[-1]
                self.kind = ErrorKind(line["kind"])
                keyed = self._KEYED.match(line["rest"])
                if keyed:
                    self.url, self.key = keyed["url"], ast.literal_eval(keyed["key"])
                else:
                    self.url = line["rest"].partition(": ")[0]
            self.detail = text
            super().__init__(text)
            return
        self.kind, self.url, self.key, self.detail = ErrorKind(kind), url, key, message
        where = f"{url}" + (f" key {key!r}" if key else "")
        super().__init__(f"[{self.kind}] {where}: {message}")


class TooManyErrors(RuntimeError):
    """Raised after ``max_consecutive_errors`` bad samples in a row: a dead source should not spin forever."""


class NoSamples(RuntimeError):
    """An epoch of a process delivered no batch: every sample of its share was bad, or it got no share."""


class ErrorCounter:
    """Counts skipped input by kind and logs it: the first few of each kind in full, then every 1000th."""

    LOG_FIRST = 5

    def __init__(self, max_consecutive: int | None = None) -> None:
        if max_consecutive is not None and max_consecutive < 1:
            raise ValueError(f"max_consecutive_errors must be >= 1 or None, got {max_consecutive}")
        self.counts: Counter[str] = Counter()
        self.max_consecutive = max_consecutive
        self.consecutive = 0

    def add(self, err: SampleError) -> None:
        self.counts[err.kind.value] += 1
        n = self.counts[err.kind.value]
        if n <= self.LOG_FIRST or n % 1000 == 0:
            log.warning("skipped bad input (%s #%d): %s", err.kind.value, n, err)
        self.consecutive += 1
        if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
            raise TooManyErrors(f"{self.consecutive} bad samples in a row, the last: {err}. Check the shard URLs "
                                "and data, or raise max_consecutive_errors") from err

    def note(self, err: SampleError) -> None:
        """Count a notice (``NOTICES``): input not used, or worth knowing, beside a sample that is delivered."""
        self.counts[err.kind.value] += 1
        n = self.counts[err.kind.value]
        if n <= self.LOG_FIRST or n % 1000 == 0:
            log.warning("noticed (%s #%d): %s", err.kind.value, n, err)

    def ok(self) -> None:
        self.consecutive = 0

    def skipped(self) -> int:
        """Bad samples and shards skipped: every count but the notices'."""
        return sum(n for kind, n in self.counts.items() if kind not in NOTICES)

    def total(self) -> int:
        return sum(self.counts.values())


class WorkerDied(RuntimeError):
    """A DataLoader worker process died; the message names the shard and key each worker was reading."""


TRACE_BYTES = 512


def new_trace(num_workers: int) -> torch.Tensor:
    """One shared-memory row per worker, where each worker writes the shard and key it is about to decode.

    NOTE [worker trace]: a worker that segfaults in a decoder or is killed for memory runs no Python on its
    way out, so it cannot say where it was. A shared tensor (inherited on fork, passed by handle on spawn)
    costs one small copy per sample and survives the worker.
    """
    return torch.zeros(max(num_workers, 1), TRACE_BYTES, dtype=torch.uint8).share_memory_()


def write_trace(trace: torch.Tensor, worker: int, url: str, key: str) -> None:
    data = f"{url} key {key!r}".encode()[: TRACE_BYTES - 1]
    row = trace[worker]
    row[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    row[len(data)] = 0


def read_trace(trace: torch.Tensor) -> list[str]:
    rows = []
    for row in trace:
        data = bytes(row.tolist())
        rows.append(data[: data.index(0)].decode(errors="replace") if 0 in data else data.decode(errors="replace"))
    return rows
