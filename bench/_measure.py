"""Timing pieces of the throughput benchmark: clocks, copies, loader-only and training-step loops.

NOTE [honest clocks]: on CUDA every wall-clock read is preceded by ``torch.cuda.synchronize()`` (``Clock``) and
copies are timed with CUDA events; warm-up steps run but are not recorded. The model step is the trainer's own
``models.step.train_step`` with the trainer's step options, timed per phase by its ``PhaseTimer`` hook (forward +
loss, backward, optimizer: clipping, the optimizer and the schedule, each timed after a device sync), so the
benchmark times exactly what training runs. On the CPU there is no host-to-device copy: ``batch.to("cpu")``
returns the same tensors, so the transfer phase is near zero and copies are timed as host memcpy instead.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from mmload.staging import pack
from mmload.tensors import BatchStats, can_pin_memory
from models.step import PhaseTimer, StepOptions, summarize, train_step

PHASES = ("data_wait", "transfer", "forward", "backward", "optimizer")
STAT_FIELDS = ("samples", "images", "texts", "real_tokens", "padded_tokens", "bytes", "tensors", "image_tokens",
               "padded_image_tokens")
REFERENCE_BYTES = {"cuda": 256 << 20, "cpu": 64 << 20}


class Clock:
    """``clock()`` -> seconds, after waiting for the device's queued work (CUDA) so the read is honest."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def cuda_ms(fn: Callable[[], Any], device: torch.device | None = None) -> float:
    """Device time of ``fn`` in ms between two CUDA events on ``device``'s current stream."""
    with torch.cuda.device(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def host_ms(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# ---- memory ----

def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss_bytes()


def peak_rss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    """Peak RSS over the process's life (RUSAGE_CHILDREN: the largest finished child, e.g. a loader worker)."""
    peak = resource.getrusage(who).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


# ---- copies ----

class _CountCopies(TorchFunctionMode):
    """Counts the copies (``Tensor.to``, ``.cuda``, ``.copy_``) made inside it, and their bytes."""

    COPIES = (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.copy_)

    def __init__(self) -> None:
        super().__init__()
        self.copies = self.bytes = 0

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        if func in self.COPIES:
            source = args[1] if func is torch.Tensor.copy_ else args[0]
            self.copies += 1
            self.bytes += source.numel() * source.element_size()
        return func(*args, **(kwargs or {}))


def copies_issued(batch: Any) -> tuple[int, int]:
    """The copies and bytes ``batch.to(device)`` issues, counted as they happen (not taken from ``stats()``) on a
    dry run to the CPU, which takes the same code path and moves nothing: the timed transfer pays no counting."""
    with _CountCopies() as counted:
        batch.to("cpu")
    return counted.copies, counted.bytes


def to_device(batch: Any, device: torch.device, non_blocking: bool = True) -> Any:
    return batch.to(device, non_blocking=non_blocking)


@dataclass
class Trainee:
    """A model and the trainer's optimizer and schedule for it: what ``train_step`` steps."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    opts: StepOptions

    def resident_bytes(self) -> int:
        """Bytes of the model's weights and gradients and of the optimizer's state: what it holds between steps."""
        tensors = [p for p in self.model.parameters()] + [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def step(self, batch: Any) -> dict[str, float]:
        """One ``train_step`` on one device batch, timed per phase: ``forward_s``, ``backward_s``, ``optimizer_s``,
        plus the step's ``loss``, ``images`` and ``mlm_tokens``."""
        timer = PhaseTimer(next(self.model.parameters()).device)
        stats = train_step(self.model, [batch], self.optimizer, self.opts, scheduler=self.scheduler, timer=timer)
        summary = summarize(stats.tolist(), self.opts.text_loss_weight, self.opts.nsp_weight)
        return {**{f"{p}_s": s for p, s in timer.seconds.items()}, "loss": summary["loss"],
                "images": summary["images"], "mlm_tokens": summary["mlm_tokens"]}


def pinned_copy_ms(n: int, device: torch.device, repeats: int) -> list[float]:
    """Times (ms, CUDA events) of ``repeats`` pinned host-to-device copies of ``n`` bytes, after one warm-up."""
    src = torch.empty(n, dtype=torch.uint8).pin_memory()
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    return [cuda_ms(lambda: dst.copy_(src, non_blocking=True), device) for _ in range(repeats + 1)][1:]


def reference_bandwidth(device: torch.device) -> dict[str, Any]:
    """The machine's own copy bandwidth: a large pinned buffer host-to-device (CUDA), else a host memcpy."""
    n = REFERENCE_BYTES["cuda" if device.type == "cuda" else "cpu"]
    if device.type == "cuda":
        times = pinned_copy_ms(n, device, repeats=5)
        kind = "pinned host-to-device memcpy"
    else:
        src, dst = torch.ones(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
        times = [host_ms(lambda: dst.copy_(src)) for _ in range(6)][1:]
        kind = "host memcpy (no accelerator: nothing crosses a bus)"
    ms = statistics.median(times)
    return {"kind": kind, "bytes": n, "ms": ms, "GBps": n / ms / 1e6}


def time_copies(batches: Sequence[Any], device: torch.device) -> dict[str, Any]:
    """Per-batch copy time of ``batches`` (unpacked) as many tensors vs one packed buffer, pageable vs pinned.

    CUDA: host-to-device with CUDA events around the copies alone (a packed batch: its one buffer; unpacking
    into views is host work outside the window), beside a pinned memcpy of the same number of bytes, since small
    copies cannot reach the large-copy peak. CPU: the same bytes and tensor count cloned in host memory (a
    stand-in for per-copy overhead; no transfer happens on the CPU), and no pinned variant (pinning needs an
    accelerator).
    """
    packed = [pack(b) for b in batches]
    variants: dict[str, list[Any]] = {"unpacked_pageable": list(batches), "packed_pageable": packed}
    if can_pin_memory() and device.type != "cpu":
        variants["unpacked_pinned"] = [b.pin_memory() for b in batches]
        variants["packed_pinned"] = [p.pin_memory() for p in packed]
    out: dict[str, Any] = {"kind": "host-to-device (CUDA events)" if device.type == "cuda" else
                           "host memcpy stand-in (CPU: no host-to-device copy exists)"}
    for name, items in variants.items():
        # the copies alone: every tensor a batch moves (a packed batch's one buffer; its unpacking into views is
        # host work outside the window)
        if device.type == "cuda":
            def copy(b: Any) -> None:
                for t in b.tensors():
                    t.to(device, non_blocking=True)

            def timer(fn: Callable[[], Any]) -> float:
                return cuda_ms(fn, device)
        else:
            def copy(b: Any) -> None:
                for t in b.tensors():
                    t.clone()
            timer = host_ms
        copy(items[0])  # warm-up: allocator, first-touch
        ms = [timer(lambda b=b: copy(b)) for b in items]
        nbytes = [b.stats().bytes for b in items]
        copies = [b.stats().tensors for b in items]
        out[name] = {"ms_per_batch": statistics.median(ms), "bytes_per_batch": statistics.mean(nbytes),
                     "copies_per_batch": statistics.mean(copies),
                     "GBps": sum(nbytes) / max(sum(ms), 1e-9) / 1e6}
    if device.type == "cuda" and can_pin_memory():
        n = int(statistics.mean(p.buffer.numel() for p in packed))
        ms = statistics.median(pinned_copy_ms(n, device, repeats=10))
        out["same_size_reference"] = {"bytes": n, "ms": ms, "GBps": n / ms / 1e6}
    return out


def loaded_variant(copies: dict[str, Any], packs: bool) -> str:
    """The variant of :func:`time_copies` that a strategy's loader hands the copy: packed where its collator packs,
    pinned where the device can pin."""
    form = "packed" if packs else "unpacked"
    return f"{form}_pinned" if f"{form}_pinned" in copies else f"{form}_pageable"


# ---- the transfer sweep ----

SWEEP_SIZES = (8, 16, 32, 64, 128, 256, 512)


def transfer_sweep(strategy: Any, samples: Sequence[Any], sizes: Sequence[int], device: torch.device,
                   repeats: int = 3, patch_size: int | None = None) -> list[dict[str, Any]]:
    """Moving one batch of ``strategy`` per batch size: bytes, copies and time, in the form its loader hands it
    (packed where it packs; pinned where the device can pin), as :func:`time_copies` times it. A size past the
    samples given is left out; a batch is the strategy's own grouping (bucketed: one modality), so it may hold
    fewer samples than asked, and per-sample figures divide by what it holds."""
    packs = bool(getattr(strategy.collator(), "pack", False))
    out = []
    for size in sizes:
        if size > len(samples):
            break
        groups = list(strategy.group(samples, batch_size=size))
        groups = sorted(groups, key=len, reverse=True)[:repeats]  # the fullest batches the grouping makes
        batches = [strategy.collator(pack=False, patch_size=patch_size)(g) for g in groups]
        timed = time_copies(batches, device)
        variant = loaded_variant(timed, packs)
        held = statistics.mean(len(g) for g in groups)
        figure = timed[variant]
        out.append({"batch_size": size, "samples_per_batch": held, "variant": variant,
                    "bytes_per_batch": figure["bytes_per_batch"], "copies_per_batch": figure["copies_per_batch"],
                    "ms_per_batch": figure["ms_per_batch"], "us_per_sample": 1e3 * figure["ms_per_batch"] / held,
                    "GBps": figure["GBps"]})
    return out


# ---- collation ----

def time_collate(collate: Callable[[list], Any], groups: Sequence[list]) -> dict[str, Any]:
    """Time ``collate`` on each pre-decoded group of samples (after one warm-up call)."""
    collate(groups[0])
    times = []
    for group in groups:
        t0 = time.perf_counter()
        collate(group)
        times.append(time.perf_counter() - t0)
    samples = sum(len(g) for g in groups)
    return {"batches": len(groups), "samples": samples, "ms_per_batch": 1e3 * statistics.mean(times),
            "ms_per_batch_median": 1e3 * statistics.median(times), "us_per_sample": 1e6 * sum(times) / samples}


def batch_stats(batches: Sequence[Any]) -> dict[str, Any]:
    """Totals and per-batch means of ``stats()`` over ``batches``."""
    stats = [b.stats() for b in batches]
    total = {f: sum(getattr(s, f) for s in stats) for f in STAT_FIELDS}
    tokens = total["real_tokens"] + total["padded_tokens"]
    return {**total, "batches": len(stats), "padding_fraction": total["padded_tokens"] / tokens if tokens else 0.0,
            "bytes_per_batch": total["bytes"] / len(stats), "copies_per_batch": total["tensors"] / len(stats)}


# ---- loops ----

# NOTE [rounds]: strategies run in rounds, each a few steps of every strategy in an order rotated by one per round,
# so that the machine's drift falls on all of them; a ratio is the median of its per-round ratios, with their
# spread. Every loader of a run stays open between its turns: an idle DataLoader's workers stop once its prefetch
# queue holds ``prefetch_factor`` (2) batches per worker, so it takes no core from the one being measured. After a
# turn, the loader just read refills that queue; the next turn starts only once every worker process is idle
# (``settle``: no CPU time used for a while), so that no turn is timed while another loader works, and it starts by
# discarding the batches its own loader had ready (``skip``), so that no turn is timed on another's idle time.

PREFETCH = 2  # DataLoader's default prefetch_factor: the batches per worker an idle loader holds ready
SPREAD_LIMIT = 0.10  # a ratio whose rounds spread wider than this (max - min, over the median) is flagged


def idle_batches(workers: int) -> int:
    """Batches an idle loader of ``workers`` workers has ready: the ones a turn discards first."""
    return PREFETCH * workers


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the relative spread ``(max - min) / median`` of per-round values; ``flagged`` when the
    spread exceeds ``SPREAD_LIMIT``."""
    median = statistics.median(values)
    width = (max(values) - min(values)) / median if median else float("inf")
    return {"median": median, "min": min(values), "max": max(values), "spread": width, "rounds": list(values),
            "flagged": width > SPREAD_LIMIT}


def per_round_ratio(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """``spread`` of ``a[r] / b[r]``: two runs measured in the same rounds."""
    return spread([x / y for x, y in zip(a, b, strict=True)])


def interleave(runs: dict[str, Any], rounds: int, steps: dict[str, int], desc: str, progress: bool,
               wait: Callable[[], Any] | None = None) -> None:
    """``rounds`` rounds of ``runs[name].turn(steps[name])`` for every name, the order rotated by one per round,
    ``wait()`` before each turn (NOTE [rounds]; default :func:`settle`)."""
    names = list(runs)
    wait = wait or settle
    with tqdm(total=rounds * len(names), desc=desc, leave=False, disable=not progress) as bar:
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                bar.set_postfix_str(f"round {r + 1}: {name}")
                wait()
                runs[name].turn(steps[name])
                bar.update()


def _children_cpu_ticks() -> int | None:
    """CPU clock ticks (user + system) used so far by this process's child processes that run now (DataLoader
    workers); None where /proc cannot tell."""
    me, total = os.getpid(), 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it ended meanwhile
        if int(fields[1]) == me:  # ppid
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def settle(quiet_s: float = 0.06, timeout_s: float = 10.0) -> float:
    """Wait until no child process (a loader's worker) has used CPU time for ``quiet_s`` (at most ``timeout_s``);
    the seconds waited. Without /proc (not Linux), waits ``quiet_s``."""
    start = time.perf_counter()
    last = _children_cpu_ticks()
    if last is None:
        time.sleep(quiet_s)
        return quiet_s
    while time.perf_counter() - start < timeout_s:
        time.sleep(quiet_s)
        now = _children_cpu_ticks()
        if now == last:
            break
        last = now
    return time.perf_counter() - start


@dataclass
class Chunk:
    """``batch_size`` decoded samples, uncollated: what the ceiling hands on, with the ``stats()`` a timing reads."""

    samples: list[Any]

    def stats(self) -> BatchStats:
        texts = [s.ids for s in self.samples if s.ids is not None]
        return BatchStats(samples=len(self.samples), images=sum(s.pixels is not None for s in self.samples),
                          texts=len(texts), real_tokens=sum(len(t) for t in texts), padded_tokens=0, bytes=0,
                          tensors=0)


def ceiling_stream(make: Callable[[], Iterable[Any]], batch_size: int) -> Iterator[Chunk]:
    """The one-core ceiling: ``make()``'s samples (a dataset, read and decoded in this process, no DataLoader) in
    chunks of ``batch_size``, epoch after epoch."""
    chunk: list[Any] = []
    while True:
        for sample in make():  # a chunk goes on over an epoch's end, so none is charged for two
            chunk.append(sample)
            if len(chunk) == batch_size:
                yield Chunk(chunk)
                chunk = []


def time_pinning(batches: Sequence[Any]) -> float | None:
    """Median ms to pin one of ``batches`` (what a loader's pin thread does per batch); None where nothing pins."""
    if not can_pin_memory():
        return None
    batches[0].pin_memory()
    return statistics.median(host_ms(lambda b=b: b.pin_memory()) for b in batches)


def per_turn_rates(turns: Sequence[dict[str, float]]) -> list[float]:
    """Samples per second of each turn of a run: the per-round figures its ratios are taken from."""
    return [t["samples"] / t["seconds"] for t in turns]


def discard(stream: Iterator[Any], n: int) -> None:
    """Take ``n`` batches from ``stream`` and drop them (warm-up, or what an idle loader had ready)."""
    for _ in range(n):
        next(stream)


class LoaderRun:
    """The loader alone (no model, no copy): batches, samples and text tokens per second, per turn."""

    def __init__(self, stream: Iterator[Any], skip: int = 0) -> None:
        self.stream, self.skip = stream, skip
        self.turns: list[dict[str, float]] = []

    def warm(self, n: int) -> None:
        discard(self.stream, n)

    def turn(self, steps: int) -> None:
        discard(self.stream, self.skip)
        samples = tokens = 0
        t0 = time.perf_counter()
        for _ in range(steps):
            s = next(self.stream).stats()
            samples, tokens = samples + s.samples, tokens + s.real_tokens
        self.turns.append({"batches": steps, "samples": samples, "tokens": tokens, "seconds": time.perf_counter() - t0})

    def close(self) -> None:
        close = getattr(self.stream, "close", None)
        if close is not None:
            close()

    def result(self) -> dict[str, Any]:
        t = {k: sum(x[k] for x in self.turns) for k in ("batches", "samples", "tokens", "seconds")}
        return {"batches": t["batches"], "samples": t["samples"], "seconds": t["seconds"],
                "samples_per_s": t["samples"] / t["seconds"], "real_tokens_per_s": t["tokens"] / t["seconds"],
                "batches_per_s": t["batches"] / t["seconds"], "skipped_per_turn": self.skip,
                "rounds_samples_per_s": per_turn_rates(self.turns)}


class TrainRun:
    """Loader -> copy -> trainer step, per turn: per-phase times and ``stats()`` of every timed step.

    A turn discards the batches its idle loader had ready (``skip``) and takes one untimed step while the loader
    refills, then times ``steps`` steps: the steady state a run of this strategy alone would be in.
    """

    def __init__(self, stream: Iterator[Any], trainee: Trainee, device: torch.device, skip: int = 0) -> None:
        self.stream, self.trainee, self.device, self.skip = stream, trainee, device, skip
        self.clock = Clock(device)
        self.rows: list[dict[str, Any]] = []
        self.turns: list[dict[str, float]] = []
        self.rss_start: int | None = None

    def warm(self, n: int) -> None:
        for _ in range(n):
            self.trainee.step(to_device(next(self.stream), self.device))

    def turn(self, steps: int) -> None:
        discard(self.stream, self.skip)
        if self.skip:
            self.warm(1)
        if self.rss_start is None:
            self.rss_start = rss_bytes()
        cuda = self.device.type == "cuda"
        if cuda:  # the step's own memory: every strategy's model is resident, so count above what is there
            torch.cuda.reset_peak_memory_stats(self.device)
            resident = torch.cuda.memory_allocated(self.device)
        start, first = self.clock(), len(self.rows)
        for _ in range(steps):
            t0 = self.clock()
            host = next(self.stream)
            t1 = self.clock()
            batch = to_device(host, self.device)
            t2 = self.clock()
            phases = self.trainee.step(batch)
            copies, nbytes = copies_issued(host)
            s = host.stats(self.trainee.model.config.patch_size)
            self.rows.append({"data_wait_s": t1 - t0, "transfer_s": t2 - t1,
                              **{k: phases[k] for k in ("forward_s", "backward_s", "optimizer_s")},
                              **{f: getattr(s, f) for f in STAT_FIELDS}, "moved_bytes": nbytes, "moved_copies": copies,
                              "loss": phases["loss"], "rss_bytes": rss_bytes(), "load1": os.getloadavg()[0]})
        seconds = self.clock() - start
        turn = {"seconds": seconds, "samples": sum(r["samples"] for r in self.rows[first:])}
        if cuda:
            turn["step_device_bytes"] = torch.cuda.max_memory_allocated(self.device) - resident
        self.turns.append(turn)

    def close(self) -> None:
        self.stream.close()

    def result(self) -> dict[str, Any]:
        rows = self.rows
        out = summarize_steps(rows, sum(t["seconds"] for t in self.turns))
        out["load1_mean"] = statistics.mean(r["load1"] for r in rows)
        out["rounds_samples_per_s"] = per_turn_rates(self.turns)
        out["memory"] = {"rss_start_bytes": self.rss_start, "rss_end_bytes": rows[-1]["rss_bytes"],
                         "rss_peak_sampled_bytes": max(r["rss_bytes"] for r in rows),
                         "peak_rss_bytes": peak_rss_bytes(), "peak_rss_children_bytes": peak_rss_bytes(
                             resource.RUSAGE_CHILDREN),
                         "peak_device_bytes": max(t["step_device_bytes"] for t in self.turns) +
                         self.trainee.resident_bytes() if self.device.type == "cuda" else None,
                         "how": "RSS: the whole process (every strategy's loader and model are open at once); "
                                "device: the most a turn's steps allocated above what was resident, plus this "
                                "strategy's own weights, gradients and optimizer state"}
        out["per_step"] = rows
        return out


class SyntheticRun:
    """The trainer step on fixed batches already on the device, cycled: no loader, no copy (the upper bound).

    Given the first batches of the stream a :class:`TrainRun` of the same strategy reads and the same ``skip``, each
    turn passes over the batches that run discards and steps untimed (``skip + 1``), so the two time the same
    batches in every round and their per-round ratio is not one of different data.
    """

    def __init__(self, trainee: Trainee, batches: Sequence[Any], device: torch.device, skip: int = 0) -> None:
        self.trainee, self.batches, self.clock, self.skip = trainee, batches, Clock(device), skip
        self.stats = [b.stats() for b in batches]
        self.i = 0
        self.rows: list[dict[str, Any]] = []
        self.turns: list[dict[str, float]] = []

    def warm(self, n: int) -> None:
        for _ in range(n):
            self.trainee.step(self.batches[self.i % len(self.batches)])
            self.i += 1

    def turn(self, steps: int) -> None:
        self.i += self.skip + 1 if self.skip else 0
        start, first = self.clock(), len(self.rows)
        for _ in range(steps):
            k = self.i % len(self.batches)
            phases = self.trainee.step(self.batches[k])
            self.i += 1
            self.rows.append({**{p: phases[p] for p in ("forward_s", "backward_s", "optimizer_s")},
                              **{f: getattr(self.stats[k], f) for f in STAT_FIELDS}})
        self.turns.append({"seconds": self.clock() - start, "samples": sum(r["samples"] for r in self.rows[first:])})

    def close(self) -> None:
        """Nothing to stop: the batches are already on the device."""

    def result(self) -> dict[str, Any]:
        out = summarize_steps(self.rows, sum(t["seconds"] for t in self.turns))
        del out["moved"]
        out["rounds_samples_per_s"] = per_turn_rates(self.turns)
        out["per_step"] = self.rows
        return out


def fill(rows: Sequence[dict[str, Any]], *, batch_size: int | None, max_tokens: int | None) -> dict[str, Any]:
    """How full the measured batches were: samples and tokens (text, padded text, image) per batch, mean, min and
    max, and ``fill``: the mean against what was asked (``batch_size`` samples, or ``max_tokens`` tokens)."""
    samples = [r["samples"] for r in rows]
    tokens = [r["real_tokens"] + r["padded_tokens"] + r["image_tokens"] + r["padded_image_tokens"] for r in rows]

    def spread(values: Sequence[int]) -> dict[str, float]:
        return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}

    asked = {"batch_size": batch_size, "max_tokens": max_tokens}
    value = statistics.mean(samples) / batch_size if batch_size else statistics.mean(tokens) / max_tokens
    return {"asked": asked, "by": "samples" if batch_size else "tokens", "fill": value,
            "samples": spread(samples), "tokens": spread(tokens)}


def summarize_steps(rows: Sequence[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Means per batch (ms), rates, data-wait share and stats totals of measured step ``rows``."""
    n = len(rows)
    total = {f: sum(r.get(f, 0) for r in rows) for f in STAT_FIELDS}
    phase_s = {p: sum(r.get(f"{p}_s", 0.0) for r in rows) for p in PHASES}
    step_s = sum(phase_s.values())
    tokens = total["real_tokens"] + total["padded_tokens"]
    return {
        "steps": n, "seconds": seconds, "samples": total["samples"],
        "samples_per_s": total["samples"] / seconds, "real_tokens_per_s": total["real_tokens"] / seconds,
        "batches_per_s": n / seconds, "ms_per_batch": 1e3 * seconds / n,
        "ms_per_sample": 1e3 * seconds / max(total["samples"], 1),
        "phases_ms": {p: 1e3 * phase_s[p] / n for p in PHASES},
        "phases_ms_median": {p: 1e3 * statistics.median(r.get(f"{p}_s", 0.0) for r in rows) for p in PHASES},
        "data_wait_share": phase_s["data_wait"] / step_s if step_s else 0.0,
        "stats": {**total, "padding_fraction": total["padded_tokens"] / tokens if tokens else 0.0,
                  "bytes_per_batch": total["bytes"] / n, "copies_per_batch": total["tensors"] / n},
        "moved": {"bytes_per_batch": sum(r.get("moved_bytes", 0) for r in rows) / n,
                  "copies_per_batch": sum(r.get("moved_copies", 0) for r in rows) / n},
    }


def profiled_steps(stream: Iterator[Any], trainee: Trainee, device: torch.device, trace_dir: str, name: str) -> None:
    """Five steps under ``torch.profiler`` (1 wait, 1 warm-up, 3 recorded) with one range per phase
    (``train_step``'s ``PhaseTimer`` names forward, backward and optimizer; data_wait and h2d are named here)."""
    from torch.profiler import ProfilerActivity, profile, record_function, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                 on_trace_ready=tensorboard_trace_handler(trace_dir, worker_name=name), profile_memory=True) as prof:
        for _ in range(5):
            with record_function("data_wait"):
                host = next(stream)
            with record_function("h2d"):
                batch = to_device(host, device)
            trainee.step(batch)
            prof.step()
