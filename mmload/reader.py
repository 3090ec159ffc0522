"""Reading webdataset tars: shard URLs expanded, members grouped into raw samples, damage detected and named.

A raw sample is ``{"__key__", "__url__", ext: bytes, ...}``; what is wrong with it (a member too large, a
duplicate) is listed under ``"__errors__"``, and a shard that cannot be read to its end raises
:class:`~mmload.errors.SampleError` of kind ``shard_read`` after the samples read before the damage.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator, Sequence
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
READ_TIMEOUT = 60.0  # seconds a remote shard may send nothing before it is given up (retried, then counted)
MAX_READ_TIMEOUT = 86400.0  # a day; poll() takes milliseconds as a C int
READ_TIMEOUT_HELP = (f"seconds a remote shard (pipe:, http:, ...) may send no byte before it is retried, then "
                     f"counted as shard_timeout while the stream goes on; 0 waits for ever (default {READ_TIMEOUT:g})")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace-expand (``shard-{000..009}.tar``) and list directories (every ``*.tar`` inside, sorted)."""
    if isinstance(urls, str | os.PathLike):
        urls = [os.fspath(urls)]
    out: list[str] = []
    for spec in urls:
        for url in braceexpand.braceexpand(os.fspath(spec)):
            if os.path.isdir(url):
                found = sorted(str(p) for p in Path(url).glob("*.tar"))
                if not found:
                    raise FileNotFoundError(f"no *.tar shards in directory {url}")
                out.extend(found)
            else:
                out.append(url)
    if not out:
        raise ValueError(f"no shard URLs in {urls!r}")
    return out


def read_shard(url: str, max_member_bytes: int = MAX_MEMBER_BYTES, retries: int = 2, backoff: float = 0.5,
               read_timeout: float = READ_TIMEOUT) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__", "__url__", ext: bytes, ...}`` of one tar (local path, ``pipe:`` or URL).

    Members are grouped by key (everything before the first dot of the file name). A bad member (too large,
    duplicated) or a key seen earlier in the shard is listed under ``"__errors__"`` of its sample; a shard
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
            for raw in _read_tar(url, max_member_bytes, read_timeout):
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
    try:
        if os.getpgid(stream.proc.pid) == stream.proc.pid:  # the leader of its own session (see _open)
            os.killpg(stream.proc.pid, signal.SIGKILL)
        else:
            stream.proc.kill()
    except (ProcessLookupError, PermissionError):
        pass  # it ended on its own


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


def _read_tar(url: str, max_member_bytes: int, read_timeout: float = 0) -> Iterator[dict[str, Any]]:
    try:
        stream = _open(url)
    except Exception as e:
        raise SampleError(ErrorKind.SHARD_READ, f"cannot open: {type(e).__name__}: {e}", url) from e
    current: dict[str, Any] | None = None
    seen: set[str] = set()
    counted = _TailReader(stream, read_timeout)
    done = False
    try:
        with tarfile.open(fileobj=counted, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = base_plus_ext(info.name)
                if key is None or key.startswith("__"):
                    continue
                if current is not None and key != current["__key__"]:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                    if key in seen:
                        current["__errors__"] = [SampleError(ErrorKind.DUPLICATE_KEY, "key seen earlier in the "
                                                             "shard (members of one sample must be adjacent)",
                                                             url, key)]
                    seen.add(key)
                ext = ext.lower()
                if info.size > max_member_bytes:
                    current.setdefault("__errors__", []).append(
                        SampleError(ErrorKind.MEMBER_TOO_LARGE, f"{info.name} is {info.size} bytes", url, key))
                    continue
                if ext in current:
                    current.setdefault("__errors__", []).append(
                        SampleError(ErrorKind.DUPLICATE_MEMBER, f"{info.name} appears twice", url, key))
                    continue
                current[ext] = tar.extractfile(info).read()
            plain = tar.fileobj.comptype == "tar"
            if not (counted.ends_cleanly(tar.offset) if plain else _inflates_to_the_end(tar.fileobj, tar.offset)):
                raise tarfile.ReadError(f"truncated after {tar.offset} bytes: no end-of-archive block")
            if current is not None:
                yield current  # complete: the archive ends cleanly after it (a cut may have taken more members)
                current = None
        done = True
    except (tarfile.TarError, OSError, EOFError, ValueError, TypeError) as e:  # TypeError: a gzip header cut short
        if counted.silent:  # the data stopped because the source went silent (NOTE [silent sources])
            raise SampleError(ErrorKind.SHARD_TIMEOUT, f"no byte for {read_timeout:g} s after {counted.total} "
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


class _TailReader:
    """A read-only stream that remembers how many bytes it gave and the last ones.

    NOTE [truncated tars]: Python's tarfile treats a header cut short anywhere but at offset 0 as the end of
    the archive, so a truncated shard would end without an error and its lost samples would go unnoticed.
    A complete uncompressed tar has a zero block where its members end; we check for it. A compressed one
    must reach the end of its compressed stream: tarfile stops quietly where compressed data stops, too. Until
    then the sample being read is not known to be whole (the cut may have taken its next member), so it is
    dropped with the shard's ``shard_read``.

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
        self.total, self.tail, self.at_end = 0, b"", 0

    def _read(self, n: int) -> bytes:
        """Up to ``n`` bytes (``n < 0``: all that is left). A pipe gives what it has, but its first read is filled to
        ``n`` (tarfile detects compression on it); every wait on a pipe is bounded by the read timeout, and a
        source that stays silent that long reads as ended (NOTE [silent sources])."""
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
            if not whole and self.total:  # past the first read a short read is fine: tarfile asks again
                break
        return b"".join(chunks)

    def read(self, n: int = -1) -> bytes:
        data = self._read(n)
        if not data and n:
            self.at_end += 1
            if self.at_end > self.READS_AT_END:
                raise EOFError(f"read past the end of the data after {self.total} bytes (a member's size runs "
                               "past the end)")
        self.total += len(data)
        self.tail = (self.tail + data)[-self.KEEP:]
        return data

    def ends_cleanly(self, offset: int) -> bool:
        # read the padding after the last member (tar pads to 10 KiB records), but no more than KEEP bytes
        more = True
        while more and self.total - offset <= self.KEEP:
            more = bool(self.read(1 << 14))
        after = self.total - offset
        if after > self.KEEP:
            return False  # more than padding follows what tarfile read: it stopped early
        block = self.tail[len(self.tail) - after:][:512]
        return len(block) == 512 and not any(block)


def _inflates_to_the_end(stream: Any, offset: int) -> bool:
    """Whether a compressed tar ends cleanly: tarfile read a whole block where its members end (not a header cut
    short), and its decompressing ``_Stream`` reaches the end of the compressed data (bounded like
    ``_TailReader.ends_cleanly``: at most ``KEEP`` bytes of padding after the last member)."""
    if stream.tell() != offset + 512:
        return False
    for _ in range(_TailReader.KEEP >> 14):
        if not stream.read(1 << 14):
            return getattr(stream.cmp, "eof", True)
    return False


__all__ = ["MAX_MEMBER_BYTES", "MAX_READ_TIMEOUT", "READ_TIMEOUT", "READ_TIMEOUT_HELP", "expand_urls", "read_shard"]
