"""Reading webdataset tars: shard URLs expanded, members grouped into raw samples, damage detected and named.

A raw sample is ``{"__key__", "__url__", ext: bytes, ...}``; what is wrong with it (a member too large, a
duplicate) is listed under ``"__errors__"``, and a shard that cannot be read to its end raises
:class:`~mmload.errors.SampleError` of kind ``shard_read`` after the samples read before the damage.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import glob
import lzma
import os
import re
import select
import signal
import subprocess
import tarfile
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import braceexpand
import webdataset
from webdataset import utils as wds_utils
from webdataset.gopen import Pipe, rewrite_url
from webdataset.tariterators import base_plus_ext

from mmload.errors import ErrorKind, SampleError, log

MAX_MEMBER_BYTES = 64 << 20  # a tar member larger than this is skipped unread
MAX_SAMPLE_BYTES = 64 << 20  # a sample whose members add up to more is skipped, the rest of it unread
READ_TIMEOUT = 60.0  # seconds a remote shard may send nothing before it is given up (retried, then counted)
MAX_READ_TIMEOUT = 86400.0  # a day; poll() takes milliseconds as a C int
SHUFFLE_BUFFER_BYTES = 256 << 20  # the shuffle buffer passes samples on once it holds this many bytes
READ_TIMEOUT_HELP = (f"seconds a remote shard (pipe:, http:, ...) may send no byte before it is retried, then "
                     f"counted as shard_timeout while the stream goes on; 0 waits for ever (default {READ_TIMEOUT:g})")


def byte_size(text: str) -> int:
    """``1000``, ``500MB`` / ``500M`` (powers of 1000), ``256MiB`` / ``256Mi`` (powers of 1024) -> bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?", text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r}; use e.g. 268435456, 256MiB or 500MB")
    number, unit, binary = match.groups()
    return int(float(number) * (1024 if binary else 1000) ** " kmgt".index(unit or " "))


@dataclass(frozen=True)
class ReadLimits:
    """What bounds a read, as every command that reads shards takes it (``--read-timeout``, ``--max-sample-bytes``,
    ``--shuffle-buffer-bytes``) and :class:`~mmload.ShardDataset` takes its fields as keywords.

    ``read_timeout``: seconds a remote shard may send nothing (0: no limit). ``max_sample_bytes``: a sample whose
    members add up to more is skipped as ``sample_too_large``, the rest of it unread. ``shuffle_buffer_bytes``: the
    shuffle buffer passes samples on once it holds more. The two byte bounds keep a worker's memory bounded by
    bytes, whatever the samples hold.
    """

    read_timeout: float = READ_TIMEOUT
    max_sample_bytes: int = MAX_SAMPLE_BYTES
    shuffle_buffer_bytes: int = SHUFFLE_BUFFER_BYTES

    def __post_init__(self) -> None:
        if not 0 <= self.read_timeout <= MAX_READ_TIMEOUT:
            raise ValueError(f"read_timeout must be a number of seconds in [0, {MAX_READ_TIMEOUT:g}] (0: no limit; "
                             f"--read-timeout), got {self.read_timeout}")
        for name in ("max_sample_bytes", "shuffle_buffer_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 byte (--{name.replace('_', '-')}), got {getattr(self, name)}")

    def kwargs(self) -> dict[str, Any]:
        """The fields as keywords of ``ShardDataset`` (and of every function that makes one)."""
        return asdict(self)

    @staticmethod
    def add_arguments(parser: Any) -> None:
        """``--read-timeout``, ``--max-sample-bytes``, ``--shuffle-buffer-bytes`` on an argparse parser or group."""
        parser.add_argument("--read-timeout", type=float, default=READ_TIMEOUT, metavar="SECONDS",
                            help=READ_TIMEOUT_HELP)
        parser.add_argument("--max-sample-bytes", type=byte_size, default=MAX_SAMPLE_BYTES, metavar="B",
                            help="skip a sample whose members add up to more than B bytes (counted as "
                                 "sample_too_large; the rest of it is not read); accepts 64MiB, 1G, ... "
                                 "(default: 64MiB)")
        parser.add_argument("--shuffle-buffer-bytes", type=byte_size, default=SHUFFLE_BUFFER_BYTES, metavar="B",
                            help="the shuffle buffer passes samples on once it holds more than B bytes, so a "
                                 "worker's memory stays bounded however large the samples (default: 256MiB)")

    @classmethod
    def from_args(cls, args: Any) -> ReadLimits:
        return cls(args.read_timeout, args.max_sample_bytes, args.shuffle_buffer_bytes)


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace-expand (``shard-{000..009}.tar``), glob local patterns (``data/*.tar``, also when a shell did not) and
    list directories (every ``*.tar`` inside, sorted).

    A pattern (braces, a glob) that matches no existing file, or a list in which no local path exists (a typo), is a
    ``FileNotFoundError``, not an epoch of zero samples; one missing shard among existing ones is read, and counted,
    as unreadable.
    """
    if isinstance(urls, str | os.PathLike):
        urls = [os.fspath(urls)]
    out: list[str] = []
    for spec in urls:
        found: list[str] = []
        for url in braceexpand.braceexpand(os.fspath(spec)):  # UnbalancedBracesError is a ValueError
            if _is_remote(url):
                found.append(url)
            elif os.path.isdir(url):
                shards = sorted(str(p) for p in Path(url).glob("*.tar"))
                if not shards:
                    raise FileNotFoundError(f"no *.tar shards in directory {url}")
                found.extend(shards)
            elif glob.has_magic(url):
                found.extend(sorted(glob.glob(os.path.expanduser(url))))
            else:
                found.append(url)
        pattern = found != [os.fspath(spec)]
        if not found or (pattern and _none_exist(found)):
            raise FileNotFoundError(_no_match(spec))
        out.extend(found)
    if not out:
        raise ValueError(f"no shard URLs in {urls!r}")
    if _none_exist(out):
        raise FileNotFoundError(_no_match(urls[0] if len(urls) == 1 else ", ".join(map(os.fspath, urls))))
    return out


def _none_exist(urls: list[str]) -> bool:
    """All of ``urls`` are local paths, and none exists."""
    return not any(_is_remote(u) or os.path.exists(_local_path(u)) for u in urls)


def _no_match(spec: Any) -> str:
    return (f"no shard matches {os.fspath(spec)!r}: check the path (a brace pattern shard-{{000..009}}.tar, a glob "
            "data/*.tar or a folder of *.tar)")


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else os.path.expanduser(url)


def read_shard(url: str, max_member_bytes: int = MAX_MEMBER_BYTES, retries: int = 2, backoff: float = 0.5,
               read_timeout: float = READ_TIMEOUT, max_sample_bytes: int = MAX_SAMPLE_BYTES
               ) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__", "__url__", ext: bytes, ...}`` of one tar (local path, ``pipe:`` or URL; plain,
    gzip, bzip2 or xz).

    Members are grouped by key (everything before the first dot of the file name; a name with no dot is a key
    with the extension ``""``). A bad member (over ``max_member_bytes``, duplicated), a sample whose members add up
    to more than ``max_sample_bytes`` (the rest of it is skipped unread) or a key seen earlier in the shard is
    listed under ``"__errors__"`` of its sample; a link member is listed under ``"__links__"`` (``{ext: name}``:
    a stream cannot follow it; the decoder decides what it costs the sample). A shard
    that cannot be opened or ends early raises :class:`SampleError` of kind ``shard_read`` after the samples
    read before the damage. A remote shard (``pipe:``, ``http:``, ...) that fails before its first sample is
    tried ``retries`` more times, ``backoff`` seconds apart, doubling; one that fails later is not re-read, since
    that would repeat samples. A local file is not retried: waiting does not mend it. A remote shard that sends
    no byte for ``read_timeout`` seconds (0: wait for ever) fails as ``shard_timeout`` and is retried the same way.
    """
    if not _is_remote(url):
        retries = 0
    for attempt in range(retries + 1):
        started = False
        try:
            for raw in _read_tar(url, max_member_bytes, read_timeout, max_sample_bytes):
                started = True
                yield raw
            return
        except SampleError as e:
            if started or attempt == retries:
                if attempt:
                    e.args = (f"{e.args[0]} (after {attempt + 1} attempts)",)
                raise
            log.info("retrying %s after: %s", url, e)
            time.sleep(backoff * 2**attempt)


def _is_remote(url: str) -> bool:
    scheme = urlparse(url).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter is a Windows drive


def _open(url: str) -> Any:
    """A binary stream of ``url``: webdataset's ``gopen``, except that a ``pipe:`` command runs in a session of its
    own, so that a silent one can be stopped with every process it started (``_stop``)."""
    url = rewrite_url(url)  # GOPEN_REWRITE, as gopen applies it
    if url.startswith("pipe:"):
        if wds_utils.enforce_security:  # as gopen_pipe: pipe: URLs only where unsafe opening is allowed
            raise ValueError("unsafe_gopen is False, cannot open pipe URLs")
        # as webdataset's gopen_pipe, plus the session; 141: the command died of SIGPIPE because we stopped reading
        return Pipe(url[5:], mode="rb", shell=True, bufsize=8192, ignore_status=[141], start_new_session=True)
    return webdataset.gopen(url, "rb")


def _stop(stream: Any) -> None:
    """Stop a source's command, with every process it started when it has a session of its own (a shell does not
    always exec): one that went silent, or one this reader no longer reads (an error, a stop, Ctrl-C)."""
    if not isinstance(stream, Pipe):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):  # it ended on its own
        if os.getpgid(stream.proc.pid) == stream.proc.pid:  # the leader of its own session (see _open)
            os.killpg(stream.proc.pid, signal.SIGKILL)
        else:
            stream.proc.kill()


def _finish(stream: Any, complete: bool, read_timeout: float) -> None:
    """Before ``close()``, which waits for a command to exit: a command this reader stopped reading early (an
    error, a stop, Ctrl-C) is stopped now; one that sent a whole archive gets ``read_timeout`` seconds to exit
    (0: as long as it takes) and is then stopped, its data complete and its exit status unknown."""
    if not isinstance(stream, Pipe) or stream.proc.poll() is not None:
        return
    if complete:
        try:
            stream.proc.wait(timeout=read_timeout or None)
            return
        except subprocess.TimeoutExpired:
            stream.ignore_errors = True  # stopped by us: its status says nothing about the data
    _stop(stream)


def _read_tar(url: str, max_member_bytes: int, read_timeout: float = 0,
              max_sample_bytes: int = MAX_SAMPLE_BYTES) -> Iterator[dict[str, Any]]:
    try:
        stream = _open(url)
    except Exception as e:
        raise SampleError(ErrorKind.SHARD_READ, f"cannot open: {type(e).__name__}: {e}", url) from e
    current: dict[str, Any] | None = None
    size, too_large = 0, False  # bytes of ``current``'s members so far, read or not; past max_sample_bytes
    seen: set[str] = set()
    source = _TailReader(stream, read_timeout)
    done = False

    def flag(kind: ErrorKind, message: str) -> None:
        current.setdefault("__errors__", []).append(SampleError(kind, message, url, current["__key__"]))

    try:
        inflated = _decompressed(source)  # NOTE [compressed shards]
        tar_bytes = source
        if inflated is not source:  # the decompressor reads its source at the end, and raises when cut short
            source.reads_at_end, tar_bytes = None, _TailReader(inflated)
        with tarfile.open(fileobj=tar_bytes, mode="r|") as tar:
            for info in tar:
                link = info.issym() or info.islnk()
                if not (info.isreg() or link):
                    continue  # a folder, a device, a fifo, a type tarfile does not know: no member of a sample
                key, ext = base_plus_ext(info.name)
                if key is None:  # no dot in the name: a key of its own, with no extension
                    key, ext = info.name, ""
                if key.startswith("__"):
                    continue
                if current is not None and key != current["__key__"]:
                    yield current
                    current = None
                if current is None:
                    current, size, too_large = {"__key__": key, "__url__": url}, 0, False
                    if key in seen:
                        flag(ErrorKind.DUPLICATE_KEY, "key seen earlier in the shard (members of one sample must "
                                                      "be adjacent)")
                    seen.add(key)
                ext = ext.lower()
                if link:
                    current.setdefault("__links__", {})[ext] = f"{info.name} -> {info.linkname}"
                    continue
                size += info.size
                if too_large:
                    continue  # the rest of it is not read
                if info.size > max_member_bytes:
                    flag(ErrorKind.MEMBER_TOO_LARGE, f"{info.name} is {info.size} bytes (max_member_bytes="
                                                     f"{max_member_bytes})")
                    continue
                if size > max_sample_bytes:
                    too_large = True
                    for name in [k for k in current if not k.startswith("__")]:
                        del current[name]  # not kept while the rest of it is skipped
                    flag(ErrorKind.SAMPLE_TOO_LARGE, f"its members add up to more than max_sample_bytes="
                                                     f"{max_sample_bytes} at {info.name}")
                    continue
                if ext in current:
                    flag(ErrorKind.DUPLICATE_MEMBER, f"{info.name} appears twice")
                    continue
                current[ext] = tar.extractfile(info).read()
            if not tar_bytes.ends_cleanly(tar.offset):
                raise tarfile.ReadError(f"truncated after {tar.offset} bytes: no end-of-archive block")
            if current is not None:
                yield current  # complete: the archive ends cleanly after it (a cut may have taken more members)
                current = None
        done = True
    except (tarfile.TarError, OSError, EOFError, ValueError, TypeError, lzma.LZMAError, zlib.error) as e:
        if source.silent:  # the data stopped because the source went silent (NOTE [silent sources])
            raise SampleError(ErrorKind.SHARD_TIMEOUT, f"no byte for {read_timeout:g} s after {source.total} "
                              f"bytes (--read-timeout): {type(e).__name__}: {e}", url) from e
        raise SampleError(ErrorKind.SHARD_READ, f"unreadable or truncated tar: {type(e).__name__}: {e}", url) from e
    finally:
        _finish(stream, done, read_timeout)
        try:
            stream.close()  # a pipe: reports its command's exit status here
        except Exception as e:
            # After an error, or when the reader stops early (the command then dies of SIGPIPE), the first
            # cause stands; after a complete read, a failed command still marks the shard as damaged.
            if done:
                raise SampleError(ErrorKind.SHARD_READ, f"the source failed: {type(e).__name__}: {e}", url) from e


class _Gunzip:
    """A gzip stream inflated in bounded steps, read as tarfile's own ``"r|gz"`` reads it: the header parsed, the
    deflate stream inflated, which is complete where it ends (the trailer's checksum is not checked, and a second
    member is not read); data that stops before that end raises ``EOFError``."""

    def __init__(self, source: _TailReader) -> None:
        self.source = source
        head = self._exactly(10)
        if head[:2] != b"\x1f\x8b" or head[2] != 8:
            raise OSError(f"not a gzip stream (header {head!r})")
        flags = head[3]
        if flags & 4:  # FEXTRA
            self._exactly(int.from_bytes(self._exactly(2), "little"))
        for flag in (8, 16):  # FNAME, FCOMMENT: NUL-terminated
            if flags & flag:
                self._through_nul()
        if flags & 2:  # FHCRC
            self._exactly(2)
        self.inflate = zlib.decompressobj(-zlib.MAX_WBITS)

    def _through_nul(self) -> None:
        """Skip a NUL-terminated header field, its NUL included."""
        byte = self._exactly(1)
        while byte != b"\0":
            byte = self._exactly(1)

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = self.source.read(n - len(data))
            if not more:
                raise EOFError(f"gzip header cut short after {len(data)} of {n} bytes")
            data += more
        return data

    def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(1 << 16), b""))
        while not self.inflate.eof:
            data = self.inflate.unconsumed_tail or self.source.read(1 << 16)
            if not data:
                raise EOFError("the compressed stream ends before its end marker")
            out = self.inflate.decompress(data, n)
            if out:
                return out
        return b""


def _is_bzip2(head: bytes) -> bool:
    return head[:3] == b"BZh" and head[3:4] in b"123456789" and len(head) >= 10 and head[4:10] == b"1AY&SY"


# the signatures of the compressed tars tarfile's "r|*" reads (its own tests), and readers that inflate them
_COMPRESSED = ((lambda h: h.startswith(b"\x1f\x8b\x08"), _Gunzip), (_is_bzip2, bz2.BZ2File),
               (lambda h: h.startswith(b"\xfd7zXZ\x00"), lzma.LZMAFile),
               (lambda h: h.startswith(b"\x5d\x00\x00\x80"), lzma.LZMAFile))


def _decompressed(source: _TailReader) -> Any:
    """``source`` as tar bytes: itself, or a reader that inflates it (NOTE [compressed shards]).

    NOTE [compressed shards]: tarfile's own stream decompression (mode ``"r|*"``) slices its whole buffer on every
    10 KiB read, so skipping a highly compressed member costs time quadratic in its size (minutes for a few GiB of
    zeros). ``_Gunzip`` and the stdlib's ``bz2``/``lzma`` readers inflate in bounded steps; tarfile reads their
    output as a plain tar, and a compressed stream cut short raises ``EOFError`` where it stops."""
    head = source.peek(10)
    for matches, reader in _COMPRESSED:
        if matches(head):
            return reader(source)
    return source


class _TailReader:
    """A read-only stream that remembers how many bytes it gave and the last ones.

    NOTE [truncated tars]: Python's tarfile treats a header cut short anywhere but at offset 0 as the end of
    the archive, so a truncated shard would end without an error and its lost samples would go unnoticed.
    A complete tar has a zero block where its members end; we check for it (in the inflated bytes of a compressed
    one, whose reader raises ``EOFError`` where its compressed stream stops short, and which must end within
    ``KEEP`` bytes of that block). Until then the sample being read is not known to be whole (the cut may have
    taken its next member), so it is dropped with the shard's ``shard_read``.

    NOTE [reads past the end]: in stream mode tarfile skips the data of a member it is not asked to read by
    reading on, block by block, and goes on past the end of the data: a header whose size field says 2**80
    bytes would spin for ever. A complete read meets the end only a few times, so a stream read at its end
    more than ``READS_AT_END`` times raises instead.

    NOTE [silent sources]: a remote source that sends nothing for ``read_timeout`` seconds reads as ended. An
    archive that had arrived whole (its command lingering after it) then ends cleanly and loses nothing; one cut
    short fails as truncated, and the reader counts it as ``shard_timeout``, not ``shard_read``.

    NOTE [failed pipes]: webdataset's ``Pipe.read`` polls its command after every read and raises as soon as the
    command has exited non-zero, dropping the bytes that read returned and leaving the rest of the output unread,
    so a command that sent a whole shard and then failed lost its last samples. We read the command's output
    directly and let ``close()`` report the exit status (the reader then counts the shard as damaged, after
    every sample that arrived whole).
    """

    KEEP = 1 << 16
    READS_AT_END = 64

    def __init__(self, raw: Any, read_timeout: float = 0) -> None:
        # a Pipe's own output, unbuffered, not its status-polling read (NOTE [failed pipes]); close() still reports
        # the status. Unbuffered, so that poll() sees every byte not read yet.
        self.pipe = isinstance(raw, Pipe)
        self.raw = raw.stream.raw if self.pipe else raw
        self.poll: select.poll | None = None
        if self.pipe and read_timeout > 0:
            self.poll = select.poll()  # not select(): it fails on descriptors numbered 1024 and up
            self.poll.register(self.raw.fileno(), select.POLLIN)
        self.timeout_ms = int(read_timeout * 1000)
        self.silent = False  # the source sent nothing for the read timeout: its data ends here
        self.total, self.at_end = 0, 0
        self.recent: deque[bytes] = deque()  # the last chunks read, at least KEEP bytes of them when there are
        self.recent_bytes = 0
        self.pending = b""  # peeked, not read yet
        self.reads_at_end: int | None = self.READS_AT_END  # None: no limit (NOTE [reads past the end])

    def _read(self, n: int, fill: bool = False) -> bytes:
        """Up to ``n`` bytes (``n < 0``: all that is left). A pipe gives what it has (``fill``: ``n`` bytes unless it
        ends first); every wait on a pipe is bounded by the read timeout, and a source that stays silent that long
        reads as ended (NOTE [silent sources])."""
        if not self.pipe:
            return self.raw.read(n)
        chunks, got, whole = [], 0, n is None or n < 0
        while not self.silent and (whole or got < n):
            if self.poll is not None and not self.poll.poll(self.timeout_ms):
                self.silent = True
                break
            chunk = self.raw.read(1 << 16 if whole else n - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
            if not (whole or fill):  # a short read is fine: its reader asks again
                break
        return b"".join(chunks)

    def peek(self, n: int) -> bytes:
        """The first ``n`` bytes (fewer if the data ends first), left to be read again."""
        if len(self.pending) < n:
            self.pending += self._read(n - len(self.pending), fill=True)
        return self.pending[:n]

    def read(self, n: int = -1) -> bytes:
        if self.pending:
            data, self.pending = (self.pending, b"") if n is None or n < 0 else (self.pending[:n], self.pending[n:])
            if n is None or n < 0:
                data += self._read(n)
        else:
            data = self._read(n)
        if not data and n:
            self.at_end += 1
            if self.reads_at_end is not None and self.at_end > self.reads_at_end:
                raise EOFError(f"read past the end of the data after {self.total} bytes (a member's size runs "
                               "past the end)")
        self.total += len(data)
        if data:  # O(1) a read: tarfile skips a member's data 10 KiB at a time
            self.recent.append(data)
            self.recent_bytes += len(data)
            while self.recent_bytes - len(self.recent[0]) >= self.KEEP:
                self.recent_bytes -= len(self.recent.popleft())
        return data

    def ends_cleanly(self, offset: int) -> bool:
        # read the padding after the last member (tar pads to 10 KiB records), but no more than KEEP bytes
        more = True
        while more and self.total - offset <= self.KEEP:
            more = bool(self.read(1 << 14))
        after = self.total - offset
        if after > self.KEEP:
            return False  # more than padding follows what tarfile read: it stopped early
        tail = b"".join(self.recent)
        block = tail[len(tail) - after:][:512]
        return len(block) == 512 and not any(block)


__all__ = ["MAX_MEMBER_BYTES", "MAX_READ_TIMEOUT", "MAX_SAMPLE_BYTES", "READ_TIMEOUT", "READ_TIMEOUT_HELP",
           "SHUFFLE_BUFFER_BYTES", "ReadLimits", "byte_size", "expand_urls", "read_shard"]
