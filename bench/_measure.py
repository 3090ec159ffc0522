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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from mmload.staging import pack
from mmload.tensors import can_pin_memory
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

def time_loader(stream: Iterator[Any], warmup: int, steps: int, desc: str, progress: bool) -> dict[str, Any]:
    """Batches per second of the loader alone (no model, no copy), after ``warmup`` batches."""
    for _ in tqdm(range(warmup), desc=f"{desc} warm-up", leave=False, disable=not progress):
        next(stream)
    samples = tokens = 0
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, leave=False, disable=not progress):
        s = next(stream).stats()
        samples, tokens = samples + s.samples, tokens + s.real_tokens
    seconds = time.perf_counter() - t0
    return {"batches": steps, "samples": samples, "seconds": seconds, "samples_per_s": samples / seconds,
            "real_tokens_per_s": tokens / seconds, "batches_per_s": steps / seconds}


def train_steps(stream: Iterator[Any], trainee: Trainee, device: torch.device, *, warmup: int, steps: int,
                desc: str, progress: bool) -> dict[str, Any]:
    """Loader -> copy -> trainer step, ``warmup + steps`` times; per-phase times of the last ``steps``."""
    clock = Clock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows: list[dict[str, Any]] = []
    start = rss_start = None
    for i in tqdm(range(warmup + steps), desc=desc, leave=False, disable=not progress):
        t0 = clock()
        if i == warmup:
            start, rss_start = t0, rss_bytes()
        host = next(stream)
        t1 = clock()
        batch = to_device(host, device)
        t2 = clock()
        phases = trainee.step(batch)
        copies, nbytes = copies_issued(host) if i >= warmup else (0, 0)
        if i >= warmup:
            s = host.stats(trainee.model.config.patch_size)
            rows.append({"data_wait_s": t1 - t0, "transfer_s": t2 - t1,
                         **{k: phases[k] for k in ("forward_s", "backward_s", "optimizer_s")},
                         **{f: getattr(s, f) for f in STAT_FIELDS}, "moved_bytes": nbytes, "moved_copies": copies,
                         "loss": phases["loss"], "rss_bytes": rss_bytes(), "load1": os.getloadavg()[0]})
    seconds = clock() - start
    out = summarize_steps(rows, seconds)
    out["load1_mean"] = statistics.mean(r["load1"] for r in rows)
    out["memory"] = {"rss_start_bytes": rss_start, "rss_end_bytes": rows[-1]["rss_bytes"],
                     "rss_peak_sampled_bytes": max(r["rss_bytes"] for r in rows),
                     "peak_rss_bytes": peak_rss_bytes(), "peak_rss_children_bytes": peak_rss_bytes(
                         resource.RUSAGE_CHILDREN),
                     "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    out["per_step"] = rows
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


def synthetic_steps(trainee: Trainee, batches: Sequence[Any], device: torch.device, *, warmup: int, steps: int,
                    desc: str, progress: bool) -> dict[str, Any]:
    """The trainer step on fixed batches already on the device, cycled: no loader, no copy (the upper bound)."""
    clock = Clock(device)
    stats = [b.stats() for b in batches]
    rows = []
    start = None
    for i in tqdm(range(warmup + steps), desc=desc, leave=False, disable=not progress):
        if i == warmup:
            start = clock()
        phases = trainee.step(batches[i % len(batches)])
        if i >= warmup:
            rows.append({**{k: phases[k] for k in ("forward_s", "backward_s", "optimizer_s")},
                         **{f: getattr(stats[i % len(batches)], f) for f in STAT_FIELDS}})
    out = summarize_steps(rows, clock() - start)
    del out["moved"]
    return out


def interleaved_steps(runs: dict[str, Trainee], batches: Sequence[Any], device: torch.device, *, warmup: int,
                      steps: int, desc: str, progress: bool) -> dict[str, dict[str, Any]]:
    """Each trainee of ``runs`` steps on the same device batch in turn, the order alternating per step.

    Interleaving puts every run under the same machine load, so their ratio holds on a busy machine.
    """
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    names = list(runs)
    for i in tqdm(range(warmup + steps), desc=desc, leave=False, disable=not progress):
        batch = batches[i % len(batches)]
        for name in names if i % 2 == 0 else names[::-1]:
            phases = runs[name].step(batch)
            if i >= warmup:
                s = batch.stats()
                rows[name].append({**{k: phases[k] for k in ("forward_s", "backward_s", "optimizer_s")},
                                   **{f: getattr(s, f) for f in STAT_FIELDS}})
    out = {}
    for name, r in rows.items():
        out[name] = summarize_steps(r, sum(x["forward_s"] + x["backward_s"] + x["optimizer_s"] for x in r))
        del out[name]["moved"]
    return out


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
