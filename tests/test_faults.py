"""Faults: a dead worker is named with its shard and key; unreachable shards are retried, then counted."""

from __future__ import annotations

import os
import signal

import pytest

from mmload import ShardDataset, reader
from mmload.errors import WorkerDied, new_trace, read_trace, write_trace
from mmload.loader import make_loader
from mmload.sample import Sample


class DieOn:
    """A transform that kills its worker process when it meets one key (as a segfaulting decoder would)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, sample: Sample) -> Sample:
        if sample.key == self.key:
            os.kill(os.getpid(), signal.SIGKILL)
        return sample


def test_a_dead_worker_is_reported_with_its_shard_and_key(builtin_shards: list[str]) -> None:
    victim = [s.key for s in ShardDataset(builtin_shards[1], image_size=16)][3]
    loader = make_loader("padded", builtin_shards, batch_size=4, num_workers=2, image_size=16,
                         transform=DieOn(victim))
    with pytest.raises(WorkerDied, match=rf"shard-000001\.tar key '{victim}'"):
        for _ in loader:
            pass


def test_trace_round_trip() -> None:
    trace = new_trace(2)
    write_trace(trace, 1, "a/shard.tar", "k1")
    write_trace(trace, 1, "b.tar", "k")  # shorter text overwrites the longer one cleanly
    assert read_trace(trace) == ["", "b.tar key 'k'"]


def test_unreachable_shard_is_retried_a_bounded_number_of_times_then_counted(monkeypatch, tmp_path,
                                                                            builtin_shards: list[str]) -> None:
    calls = []
    real = reader._open

    def counting(url, *args, **kwargs):
        calls.append(url)
        return real(url, *args, **kwargs)

    monkeypatch.setattr(reader, "_open", counting)
    monkeypatch.setattr("time.sleep", lambda s: None)
    missing = f"pipe:cat {tmp_path / 'gone.tar'}"  # a remote source that answers nothing
    local = str(tmp_path / "gone-too.tar")
    ds = ShardDataset([missing, local, builtin_shards[0]], image_size=16)
    n = sum(1 for _ in ds)
    assert calls.count(missing) == 3  # first try + 2 retries
    assert calls.count(local) == 1  # a missing local file does not come back by waiting
    assert ds.errors.counts == {"shard_read": 2}
    assert n == sum(1 for _ in ShardDataset(builtin_shards[0], image_size=16))


@pytest.mark.parametrize("workers", [0, 2])
def test_errors_raised_in_workers_reach_the_main_process_as_themselves(workers: int, tmp_path,
                                                                       builtin_shards: list[str]) -> None:
    """strict mode and max_consecutive_errors raise SampleError / TooManyErrors with the shard and key, whatever
    the worker count (NOTE [errors from workers] in mmload.errors); a dead worker stays WorkerDied (above)."""
    from pathlib import Path

    from conftest import junk_shard

    from mmload import SampleError, TooManyErrors

    bad = junk_shard(tmp_path / "bad.tar", 4)
    tok = str(Path(builtin_shards[0]).parent)
    shards = [str(bad), *builtin_shards[:3]]
    with pytest.raises(SampleError, match="x0") as raised:
        for _ in make_loader("padded", shards, batch_size=4, num_workers=workers, image_size=16, tokenizer=tok,
                             strict=True):
            pass
    assert (raised.value.kind, raised.value.key, raised.value.url) == ("image_decode", "x0", str(bad))
    with pytest.raises(TooManyErrors, match="3 bad samples in a row"):
        for _ in make_loader("padded", shards, batch_size=4, num_workers=workers, image_size=16, tokenizer=tok,
                             max_consecutive_errors=3):
            pass


def test_a_failing_pipe_delivers_every_sample_it_sent_whole(tmp_path, builtin_shards: list[str]) -> None:
    """``pipe:`` commands that fail after sending a shard lose nothing they sent (NOTE [failed pipes] in
    mmload.reader); the failure is counted once. One that fails halfway delivers what arrived whole before."""
    from pathlib import Path

    shard = builtin_shards[0]
    tok = str(Path(shard).parent)
    whole = [s.key for s in ShardDataset(shard, image_size=16)]
    for _ in range(3):  # the race this guards against varied run to run
        ds = ShardDataset([f"pipe:sh -c 'cat {shard}; exit 1'"], image_size=16, tokenizer=tok)
        assert [s.key for s in ds] == whole and ds.errors.counts == {"shard_read": 1}
    half = Path(shard).stat().st_size // 2
    ds = ShardDataset([f"pipe:sh -c 'head -c {half} {shard}; exit 1'"], image_size=16, tokenizer=tok)
    got = [s.key for s in ds]
    assert got == whole[:len(got)] and 0 < len(got) < len(whole) and ds.errors.counts == {"shard_read": 1}


def test_no_read_blocks_forever(monkeypatch, tmp_path, builtin_shards: list[str]) -> None:
    """A remote shard that sends nothing, or stalls after sending part, fails after read_timeout seconds as
    shard_timeout (retried first, like other remote failures), its command is stopped, and the stream goes on."""
    import time
    from pathlib import Path

    monkeypatch.setattr("mmload.reader.time.sleep", lambda s: None)  # no backoff between the retries
    shard = builtin_shards[0]
    tok = str(Path(shard).parent)
    keys = [s.key for s in ShardDataset(shard, image_size=16)]
    part = Path(shard).stat().st_size // 2
    silent, stalls = "pipe:sleep 1234", f"pipe:sh -c 'head -c {part} {shard}; sleep 1234'"
    started = time.perf_counter()
    ds = ShardDataset([silent, stalls, builtin_shards[1]], image_size=16, tokenizer=tok, read_timeout=0.5, retries=1)
    got = [s.key for s in ds]
    assert time.perf_counter() - started < 30
    assert ds.errors.counts == {"shard_timeout": 2}
    tail = [s.key for s in ShardDataset(builtin_shards[1], image_size=16)]
    assert got[-len(tail):] == tail and 0 < len(got) - len(tail) < len(keys)  # the stalled one: what came whole
    assert got[:len(got) - len(tail)] == keys[:len(got) - len(tail)]
    import subprocess

    monkeypatch.undo()  # time.sleep again
    for _ in range(20):  # the silent commands were stopped, with the processes their shells started
        if subprocess.run(["pgrep", "-f", "sleep 1234"], capture_output=True).returncode == 1:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a silent pipe: command is still running")


class StopOn:
    """A transform that stops its worker process (SIGSTOP) at one key, writing its pid first."""

    def __init__(self, key: str, pid_file: str) -> None:
        self.key, self.pid_file = key, pid_file

    def __call__(self, sample: Sample) -> Sample:
        if sample.key == self.key:
            with open(self.pid_file, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)
        return sample


def test_a_worker_silent_past_the_loader_timeout_is_reported_like_a_dead_one(tmp_path,
                                                                            builtin_shards: list[str]) -> None:
    victim = [s.key for s in ShardDataset(builtin_shards[0], image_size=16)][2]
    pid_file = tmp_path / "pid"
    loader = make_loader("padded", builtin_shards[:2], batch_size=4, num_workers=1, image_size=16, timeout=3,
                         transform=StopOn(victim, str(pid_file)))
    try:
        with pytest.raises(WorkerDied, match=rf"timed out.*shard-000000\.tar key '{victim}'"):
            for _ in loader:
                pass
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)  # a stopped process takes no other signal


def test_pipes_read_whole_through_short_reads_many_descriptors_and_early_stops(tmp_path,
                                                                              builtin_shards: list[str]) -> None:
    """The pipe reader fills each read (a gzip'ed tar whose first two bytes come alone is still a gzip'ed tar),
    waits with poll() (descriptors numbered past 1024 work), stops the command of a shard it stops reading, and
    takes a complete archive from a command that lingers after it."""
    import gzip
    import resource
    import subprocess
    import time
    from pathlib import Path

    from mmload.reader import read_shard

    shard = builtin_shards[0]
    keys = [s.key for s in ShardDataset(shard, image_size=16)]
    gz = tmp_path / "s.tar.gz"
    gz.write_bytes(gzip.compress(Path(shard).read_bytes()))
    trickle = f"pipe:sh -c 'head -c 2 {gz}; sleep 0.3; tail -c +3 {gz}'"
    assert [r["__key__"] for r in read_shard(trickle, read_timeout=5)] == keys

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
        held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        try:
            assert [r["__key__"] for r in read_shard(f"pipe:cat {shard}", read_timeout=5)] == keys
        finally:
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    lingers = f"pipe:sh -c 'cat {shard}; sleep 1236'"
    assert [r["__key__"] for r in read_shard(lingers, read_timeout=0.5)] == keys  # whole, and no error raised
    stream = read_shard(f"pipe:sh -c 'cat {shard}; sleep 1235'", read_timeout=5)
    started = time.perf_counter()
    assert [next(stream)["__key__"] for _ in range(3)] == keys[:3]
    stream.close()  # the consumer stops early (an error upstream, a stop, Ctrl-C)
    assert time.perf_counter() - started < 10
    for _ in range(20):
        if subprocess.run(["pgrep", "-f", "sleep 123[56]"], capture_output=True).returncode == 1:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a pipe: command outlived the reader")
    for bad in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="read_timeout must be"):
            ShardDataset(shard, read_timeout=bad)


def test_a_sample_error_rebuilt_from_a_worker_message_keeps_its_fields() -> None:
    from mmload import ErrorKind, SampleError

    for url, key in (("pipe:curl -H 'Authorization: Bearer x' http://h/a.tar", "it's"), ("/d/s.tar", "k 1: 2")):
        original = SampleError(ErrorKind.IMAGE_DECODE, "UnidentifiedImageError: no: image", url, key)
        rebuilt = SampleError(f"Caught SampleError in DataLoader worker process 1.\nOriginal Traceback (most "
                              f"recent call last):\n  File \"x.py\", line 1\nmmload.errors.SampleError: {original}")
        assert (rebuilt.kind, rebuilt.url, rebuilt.key) == (ErrorKind.IMAGE_DECODE, url, key)
    shard_level = SampleError(ErrorKind.SHARD_READ, "cannot open: OSError: gone", "/d/s.tar")
    rebuilt = SampleError(f"Caught SampleError.\nmmload.errors.SampleError: {shard_level}")
    assert (rebuilt.kind, rebuilt.url, rebuilt.key) == (ErrorKind.SHARD_READ, "/d/s.tar", "")
