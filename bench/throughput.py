"""``python bench/throughput.py``: the five batching strategies through one joint ViT-BERT training step.

For each strategy, in one run (so ratios hold on a noisy machine), in a fixed order, same data, same seed:

* loader alone: samples/s and text tokens/s with N workers; collate time per batch on pre-decoded samples;
* padding: real and padded text tokens (``batch.stats()``);
* transfer: bytes and host-to-device copies per batch, packed vs unpacked, pinned vs pageable, timed with CUDA
  events beside the machine's own pinned memcpy bandwidth (on the CPU: host memcpy, said so);
* the training step (the trainer's ``models.step.train_step``, timed per phase by its ``PhaseTimer``): data wait,
  transfer, forward, backward, optimizer;
* end to end: samples/s, real tokens/s, data-wait share, peak device memory (CPU: peak RSS), RSS over the run;

plus a synthetic baseline (the same step on fixed batches already on the device, measured before and after
the strategies: the upper bound, and its drift a measure of machine noise) and ``frozen`` vs ``full`` training
time with the padded strategy. Writes ``OUT/<device>-<preset>-<date>.{json,csv,png}`` and refreshes
``OUT/README.md``. ``--quick`` runs in seconds (tiny preset, tiny data) for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import _data, _measure, _peer, _reliability, _report
from mmload.commands import Parser, add_verbose, run_command
from mmload.dataset import expand_urls, parse_data
from mmload.epochs import EpochStream
from mmload.loader import make_loader
from mmload.masking import MLMMasking
from mmload.reader import ReadLimits
from mmload.staging import pack
from mmload.strategy import REFERENCE, STRATEGIES, DataKind, Strategy, get_strategy
from mmload.tokenizer import load_tokenizer
from models.build import apply_freeze, build_model, make_optimizer, make_scheduler
from models.config import ModelConfig, TrainConfig
from models.step import StepOptions

REPO = Path(__file__).resolve().parents[1]
PAPER_FREEZE = {"source": "Cross Modality Pre-training and the Intrinsic Values of Data Modality",
                "frozen_s_per_epoch": 4.9, "full_s_per_epoch": 8.1, "ratio": 0.61}
# (steps, warmup) when not given: a default CPU run takes about 5 minutes on a 2-core machine
DEFAULT_STEPS = {"cpu": (50, 5), "cuda": (100, 10)}
DEFAULTS = {"maxcount": _data.DEFAULT_MAXCOUNT, "image_text_ratio": 8.0, "batch_size": 32,
            "reliability_epochs": 2}
# --quick: options not given on the command line take these values
QUICK = {"preset": "tiny", "samples": 96, "maxcount": 24, "image_text_ratio": 2.0, "batch_size": 8, "steps": 3,
         "warmup": 1, "per_sample_steps": 2, "freeze_steps": 2, "workers": 1, "collate_batches": 3}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python bench/throughput.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[1],
        epilog="Example: python bench/throughput.py --data 'my-img2dataset/{00000..00009}.tar' --strategies "
               "padded,nested --steps 50. View --profile traces with: tensorboard --logdir results/tb")
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", metavar="SHARDS[@WEIGHT]",
                   help="webdataset shards (path, brace pattern or folder of *.tar, e.g. img2dataset output); "
                        "repeat to blend sources by WEIGHT. Default: the builtin shards, made once and cached")
    g.add_argument("--samples", type=int, help="builtin data: number of samples (default: 2000, or more when "
                   "warm-up + measured steps need more, so that one epoch covers the timed steps)")
    g.add_argument("--image-text-ratio", type=float, metavar="R",
                   help="builtin data: images per text (default 8)")
    g.add_argument("--text-len", default="48,0.9", metavar="MEDIAN,SIGMA",
                   help="builtin data: text lengths are lognormal with this median (words) and sigma (log "
                        "space), clipped to [5, 512] words (default 48,0.9)")
    g.add_argument("--tokenizer", metavar="NAME_OR_PATH",
                   help="HF tokenizer for the texts (default: the one saved beside the first shard, as make-shards "
                        "does, else the bundled bert-base-uncased WordPiece, for img2dataset output)")
    g.add_argument("--emb", choices=("tokens", "pooled"), default="tokens",
                   help="embeddings strategy: precompute every token's embedding (same tokens as the other "
                        "strategies, MLM works) or one pooled vector per sample (no MLM) (default tokens)")
    ReadLimits.add_arguments(g)
    g.add_argument("--cache-dir", metavar="DIR",
                   help="where builtin and embedding shards are cached (default $MMLOAD_CACHE or ~/.cache/mmload)")
    g = p.add_argument_group("what to run")
    g.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma-separated, run in this order (default {','.join(STRATEGIES)})")
    g.add_argument("--preset", choices=sorted(ModelConfig.PRESETS),
                   help="model size (default: base on CUDA, small on the CPU)")
    g.add_argument("--batch-size", type=int, help="samples per batch (default 32)")
    g.add_argument("--max-tokens", type=int, metavar="N",
                   help="token-budget batches instead for padded, bucketed and nested: as many samples as fit N "
                        "tokens (text, padded where the layout pads, plus patches and class token per image); "
                        "per-sample and embeddings keep --batch-size")
    g.add_argument("--workers", type=int, help="DataLoader workers (default: min(8, CPU count))")
    g.add_argument("--steps", type=int, help="measured steps per strategy (default 50 on the CPU, 100 on CUDA)")
    g.add_argument("--warmup", type=int, help="unmeasured steps first (default 5 on the CPU, 10 on CUDA)")
    g.add_argument("--per-sample-steps", type=int,
                   help="measured steps of per-sample, slow by design (default max(3, steps // 3)); its rates are "
                        "per sample and per batch, so it compares")
    g.add_argument("--freeze-steps", type=int,
                   help="measured steps of each of frozen and full training (padded); 0 skips (default: --steps)")
    g.add_argument("--reliability-epochs", type=int, default=None,
                   help="epochs of the loader-only reliability pass (coverage, errors, repeats, lost samples, "
                        "memory per epoch, a mid-epoch resume); 0 skips (default 2; --quick: 2)")
    g.add_argument("--device", default="auto", help="auto (cuda when present), cuda, cuda:N or cpu")
    g.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="autocast dtype on CUDA (the CPU runs fp32) (default bf16)")
    g.add_argument("--threads", type=int,
                   help="torch intra-op threads (default on the CPU: cores minus workers, at least 1: spinning "
                        "OpenMP threads on busy cores turn timings into noise; on CUDA: torch's default)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    g.add_argument("--seed", type=int, default=0, help="seed of data, masks and weights (default 0)")
    g.add_argument("--profile", action="store_true",
                   help="also record torch.profiler traces (ranges data_wait, h2d, forward, backward, optimizer) "
                        "of 5 steps per strategy into OUT/tb/<run>/ (view: tensorboard --logdir OUT/tb)")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", default=str(REPO / "results"),
                   help="results folder: <device>-<preset>-<date>.json/.csv/.png and README.md (default results/)")
    g.add_argument("--quick", action="store_true",
                   help="seconds, for tests: tiny preset, 96 builtin samples, batch 8, 3 steps, 1 worker")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_verbose(p)
    return p


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run's settings, every default resolved (``parse_args`` fills it; nothing changes it after)."""

    data: tuple[str, ...] | None
    samples: int
    image_text_ratio: float
    text_len: tuple[float, float]
    tokenizer: str | None
    read_timeout: float
    max_sample_bytes: int
    shuffle_buffer_bytes: int
    emb: str
    cache_dir: str | None
    strategies: tuple[str, ...]
    preset: str
    batch_size: int
    max_tokens: int | None
    workers: int
    steps: int
    warmup: int
    per_sample_steps: int
    freeze_steps: int
    reliability_epochs: int
    device: str
    precision: str
    threads: int | None
    lr: float
    seed: int
    profile: bool
    out: str
    quick: bool
    progress: bool
    maxcount: int
    collate_batches: int
    argv: tuple[str, ...] | None = None  # the command line, as given to main() (None: sys.argv)
    verbose: bool = False  # -v: an error's traceback instead of its one line

    @property
    def read_limits(self) -> ReadLimits:
        return ReadLimits(self.read_timeout, self.max_sample_bytes, self.shuffle_buffer_bytes)


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    """The command line as a BenchConfig: defaults resolved for the device and ``--quick``, values checked."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    args.device = device
    try:
        torch.device(device)
    except RuntimeError:
        parser.error(f"--device {device!r} is not a device; give auto, cpu, cuda or cuda:N")
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available here; use --device cpu (or auto)")
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in args.strategies if s not in STRATEGIES]
    if bad or not args.strategies:
        parser.error(f"--strategies: unknown {bad or args.strategies}; choose from {','.join(STRATEGIES)}")
    try:
        median, sigma = (float(x) for x in args.text_len.split(","))
    except ValueError:
        parser.error(f"--text-len takes MEDIAN,SIGMA (e.g. 48,0.9), got {args.text_len!r}")
    args.text_len = (median, sigma)
    args.maxcount = args.collate_batches = None
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    steps, warmup = DEFAULT_STEPS[kind]
    args.preset = args.preset or ("base" if kind == "cuda" else "small")
    args.steps = steps if args.steps is None else args.steps
    args.warmup = warmup if args.warmup is None else args.warmup
    if args.samples is None:  # enough for warm-up and measured steps in one epoch: no worker restart mid-timing
        args.samples = max(2000, -(-(args.warmup + args.steps) * args.batch_size // 1000) * 1000)
    args.per_sample_steps = args.per_sample_steps or max(3, args.steps // 3)
    args.freeze_steps = args.steps if args.freeze_steps is None else args.freeze_steps
    args.workers = min(8, os.cpu_count() or 1) if args.workers is None else args.workers
    args.collate_batches = args.collate_batches or min(args.steps, 16)
    if args.threads is None and kind == "cpu":
        args.threads = max(1, (os.cpu_count() or 1) - args.workers)
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    for name in ("batch_size", "steps", "per_sample_steps", "samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        ReadLimits.from_args(args)
    except ValueError as e:
        parser.error(str(e))
    for name in ("warmup", "workers", "freeze_steps", "reliability_epochs"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    values = vars(args) | {"data": None if args.data is None else tuple(args.data),
                           "strategies": tuple(args.strategies), "argv": None if argv is None else tuple(argv)}
    return BenchConfig(**values)


# ---- provenance ----

def git_state(repo: Path = REPO) -> dict[str, Any]:
    """The commit of the working tree and whether it differs from it (None where git cannot tell)."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        dirty = bool(git("status", "--porcelain", "--", ".", ":(exclude)results"))  # untracked code counts
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return {"commit": commit, "dirty": dirty}


def device_info(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        label = "cuda-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    else:
        name = _cpu_name()
        label = device.type
    return {"device": str(device), "label": label, "name": name, "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "platform": platform.platform()}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ---- the run ----

class Bench:
    """Everything one run shares: data, tokenizer, masking, model shape, and how to build loaders and models."""

    def __init__(self, args: BenchConfig) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.cache = Path(args.cache_dir or os.environ.get("MMLOAD_CACHE") or "~/.cache/mmload").expanduser()
        if args.data:
            self.data = list(args.data)
        else:
            urls = _data.builtin_shards(self.cache, args.samples, args.seed, args.image_text_ratio, args.text_len,
                                        args.maxcount, progress=args.progress)
            self.data = [str(Path(urls[0]).parent)]
        self.urls = expand_urls(parse_data(self.data)[0][0])
        self.tokenizer = load_tokenizer(args.tokenizer, self.urls)
        self.masking = MLMMasking.from_tokenizer(self.tokenizer, seed=args.seed)
        self.shape = ModelConfig.preset(args.preset, vocab_size=len(self.tokenizer))
        # the trainer's own configuration of a run like this one: its step options and optimizer are the bench's
        self.train_config = TrainConfig(preset=args.preset, batch_size=args.batch_size, num_workers=args.workers,
                                        lr=args.lr, precision=args.precision, seed=args.seed, device=args.device,
                                        steps=args.warmup + args.steps, warmup=args.warmup)
        self.opts = StepOptions.from_config(self.train_config)
        self.skipped: dict[str, str] = {}
        self.emb_data: list[str] | None = None
        if any(not get_strategy(s).has_raw_inputs for s in args.strategies):
            try:
                self.emb_data = _data.embedding_data(
                    self.data, self.cache, preset=args.preset, seed=args.seed, vocab_size=len(self.tokenizer),
                    tokens=args.emb == "tokens", device=self.device, progress=args.progress,
                    tokenizer=self.tokenizer, **args.read_limits.kwargs())
            except ValueError as e:  # e.g. shards with nothing precompute can embed
                self.skipped.update({s: f"precompute failed: {e}" for s in args.strategies
                                     if not get_strategy(s).has_raw_inputs})
        self.data_of = {DataKind.RAW: self.data, DataKind.PRECOMPUTED: self.emb_data}
        n = args.collate_batches * args.batch_size
        # pre-decoded samples of each kind of data, for the collate and copy timings
        self.samples = {kind: self.first_samples(data, n) for kind, data in self.data_of.items() if data is not None}
        self.num_classes = _data.num_classes(self.urls, self.samples[DataKind.RAW])

    def data_for(self, strategy: Strategy) -> list[str]:
        return self.data_of[strategy.data]

    @property
    def dataset_kwargs(self) -> dict[str, Any]:
        """How every dataset of the run reads and decodes: the same tokenizer, sizes and read bounds."""
        return {"tokenizer": self.tokenizer, "image_size": self.shape.image_size,
                "max_text_len": self.shape.max_text_len, **self.args.read_limits.kwargs()}

    def first_samples(self, data: list[str], n: int) -> list:
        return _data.first_samples(data, n, seed=self.args.seed, transform=self.masking, **self.dataset_kwargs)

    def size_of(self, strategy: Strategy) -> dict[str, Any]:
        """What one batch of ``strategy`` is asked to be: ``--max-tokens`` where the strategy takes a token budget,
        else ``--batch-size``."""
        if self.args.max_tokens and strategy.token_layout is not None:
            return {"batch_size": None, "max_tokens": self.args.max_tokens}
        return {"batch_size": self.args.batch_size, "max_tokens": None}

    def groups(self, strategy: Strategy, n: int) -> list[list]:
        """Up to ``n`` lists of pre-decoded samples, grouped as the strategy's loader groups them."""
        size = self.size_of(strategy)
        image_tokens = (self.shape.image_size // self.shape.patch_size) ** 2 + 1 if size["max_tokens"] else None
        return list(strategy.group(self.samples[strategy.data], **size, image_tokens=image_tokens))[:n]

    def stream(self, strategy: Strategy) -> EpochStream:
        a = self.args

        def make(epoch: int) -> Any:
            return make_loader(strategy, self.data_for(strategy), **self.size_of(strategy),
                               patch_size=self.shape.patch_size, num_workers=a.workers, seed=a.seed,
                               transform=self.masking, **self.dataset_kwargs)

        return EpochStream(make)

    def model(self, strategy: Strategy, freeze: str = "full") -> _measure.Trainee:
        """A fresh model for ``strategy`` with the trainer's optimizer, schedule and step options."""
        extra = {} if strategy.has_raw_inputs else {"emb_dim": self.shape.d_model}
        model = build_model(self.args.preset, len(self.tokenizer), num_classes=self.num_classes, seed=self.args.seed,
                            **extra)
        apply_freeze(model, freeze)
        model.to(self.device).train()
        cfg = self.train_config
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        return _measure.Trainee(model, optimizer, make_scheduler(optimizer, cfg), self.opts)

    def step_kwargs(self, desc: str) -> dict[str, Any]:
        return {"desc": desc, "progress": self.args.progress}


def measure_strategy(bench: Bench, strategy: Strategy, reference: dict[str, Any]) -> dict[str, Any]:
    a, device = bench.args, bench.device
    steps = a.per_sample_steps if strategy.one_call_per_sample else a.steps
    collate = strategy.collator()
    packs = bool(getattr(collate, "pack", False))
    groups = bench.groups(strategy, min(steps, a.collate_batches))
    collate_fig = _measure.time_collate(collate, groups)
    unpacked = [strategy.collator(pack=False)(g) for g in groups]
    copies = _measure.time_copies(unpacked, device)
    form = "packed" if packs else "unpacked"
    loaded_variant = f"{form}_pinned" if f"{form}_pinned" in copies else f"{form}_pageable"  # what the loader hands

    stream = bench.stream(strategy)
    try:
        loader = _measure.time_loader(stream, a.warmup, steps, f"{strategy.name} loader", a.progress)
    finally:
        stream.close()
    trainee = bench.model(strategy)
    stream = bench.stream(strategy)
    try:
        e2e = _measure.train_steps(stream, trainee, device, warmup=a.warmup, steps=steps,
                                   **bench.step_kwargs(f"{strategy.name} train"))
    finally:
        stream.close()
    per_step, memory = e2e.pop("per_step"), e2e.pop("memory")
    stats, moved = e2e.pop("stats"), e2e.pop("moved")
    copy_loaded = copies[loaded_variant]
    return {
        "status": "ok", "data": bench.data_for(strategy), "steps": steps, "warmup": a.warmup,
        "loader": {**loader, "workers": a.workers},
        "collate": {**collate_fig, "packs": packs},
        "padding": {k: stats[k] for k in ("real_tokens", "padded_tokens", "padding_fraction")},
        "fill": _measure.fill(per_step, **bench.size_of(strategy)),
        "transfer": {
            "as_loaded": {"packed": packs, "bytes_per_batch": stats["bytes_per_batch"],
                          "copies_per_batch": stats["copies_per_batch"]},
            "moved": moved,  # counted by the copy itself, to check stats() against
            "unpacked": _pick(_measure.batch_stats(unpacked), "bytes_per_batch", "copies_per_batch"),
            "packed": _pick(_measure.batch_stats([pack(b) for b in unpacked]), "bytes_per_batch",
                            "copies_per_batch"),
            "copy_time": copies, "loaded_variant": loaded_variant,
            "ms_per_batch": copy_loaded["ms_per_batch"], "GBps": copy_loaded["GBps"],
            "fraction_of_reference": copy_loaded["GBps"] / copies["same_size_reference"]["GBps"]
            if "same_size_reference" in copies else None,
            "fraction_of_peak": copy_loaded["GBps"] / reference["GBps"] if device.type == "cuda" else None,
        },
        "step_ms": e2e["phases_ms"], "step_ms_median": e2e["phases_ms_median"],
        "e2e": {k: e2e[k] for k in ("samples_per_s", "real_tokens_per_s", "batches_per_s", "ms_per_batch",
                                    "ms_per_sample", "data_wait_share", "seconds", "samples", "steps", "load1_mean")},
        "stats": stats, "memory": memory, "per_step": per_step,
    }


PEER_ROUNDS = 3


def measure_peer(bench: Bench) -> dict[str, Any]:
    """The webdataset peer (``bench/_peer.py``) and mmload's padded loader, loader alone, on the first source's
    shards with the same workers, batch size, image size and tokenizer, and no masking on either: ``PEER_ROUNDS``
    rounds of one after the other, so that the machine's drift falls on both; the ratio is the median over rounds."""
    a = bench.args
    steps, urls = min(a.steps, 20), list(bench.urls)
    size = {"image_size": bench.shape.image_size, "max_text_len": bench.shape.max_text_len}
    rounds = []
    for r in range(PEER_ROUNDS):
        peer = _peer.endless(lambda: _peer.loader(urls, bench.tokenizer, batch_size=a.batch_size, workers=a.workers,
                                                  **size))
        try:
            theirs = _measure.time_loader(peer, a.warmup, steps, f"webdataset peer, round {r + 1}", a.progress)
        finally:
            peer.close()
        ours_stream = EpochStream(lambda epoch: make_loader(REFERENCE, urls, batch_size=a.batch_size,
                                                            num_workers=a.workers, seed=a.seed,
                                                            **bench.dataset_kwargs))
        try:
            ours = _measure.time_loader(ours_stream, a.warmup, steps, f"mmload {REFERENCE}, round {r + 1}",
                                        a.progress)
        finally:
            ours_stream.close()
        rounds.append({"peer_samples_per_s": theirs["samples_per_s"], "mmload_samples_per_s": ours["samples_per_s"],
                       "ratio": ours["samples_per_s"] / theirs["samples_per_s"]})
    ratios = [r["ratio"] for r in rounds]
    median = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]  # the round whose ratio is the median
    return {"rounds": rounds, "steps": steps, "warmup": a.warmup, "batch_size": a.batch_size, "workers": a.workers,
            "strategy": REFERENCE, "data": urls, "peer_samples_per_s": median["peer_samples_per_s"],
            "mmload_samples_per_s": median["mmload_samples_per_s"], "ratio": median["ratio"],
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def _pick(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: d[k] for k in keys}


def synthetic_batches(bench: Bench) -> list[Any]:
    """The exact batches the padded loader yields for warm-up and measured steps, moved to the device once."""
    a = bench.args
    stream = bench.stream(get_strategy(REFERENCE))
    try:
        return [_measure.to_device(next(stream), bench.device, non_blocking=False)
                for _ in range(a.warmup + a.steps)]
    finally:
        stream.close()


def measure_synthetic(bench: Bench, batches: list[Any], desc: str) -> dict[str, Any]:
    a = bench.args
    out = _measure.synthetic_steps(bench.model(get_strategy(REFERENCE)), batches, bench.device, warmup=a.warmup,
                                   steps=a.steps,
                                   **bench.step_kwargs(desc))
    return {k: out[k] for k in ("samples_per_s", "real_tokens_per_s", "ms_per_batch", "ms_per_sample", "phases_ms",
                                "phases_ms_median", "seconds", "samples", "steps")}


def measure_freeze(bench: Bench, batches: list[Any], epoch_samples: int | None) -> dict[str, Any]:
    """``full`` vs ``frozen`` (trainer's ``apply_freeze``) on padded's device batches, interleaved step by step."""
    a = bench.args
    runs = {mode: bench.model(get_strategy(REFERENCE), freeze=mode) for mode in ("full", "frozen")}
    timed = _measure.interleaved_steps(runs, batches, bench.device, warmup=a.warmup, steps=a.freeze_steps,
                                       **bench.step_kwargs("frozen vs full"))
    out: dict[str, Any] = {"strategy": REFERENCE, "steps": a.freeze_steps, "paper": PAPER_FREEZE,
                           "how": "compute only (forward, backward, optimizer) on padded's loader batches already on "
                                  "the device, the two modes interleaved step by step; the loader's share of an "
                                  "epoch is the same for both"}
    for mode, r in timed.items():
        per_sample = r["seconds"] / r["samples"]
        out[mode] = {"seconds": r["seconds"], "samples": r["samples"], "s_per_1000_samples": 1000 * per_sample,
                     "s_per_epoch": per_sample * epoch_samples if epoch_samples else None,
                     "epoch_samples": epoch_samples, "phases_ms": r["phases_ms"],
                     "trainable_params": sum(p.numel() for p in runs[mode].model.parameters() if p.requires_grad)}
    out["ratio"] = out["frozen"]["s_per_1000_samples"] / out["full"]["s_per_1000_samples"]
    return out


def run(args: BenchConfig) -> dict[str, Any]:
    started, load_start = time.perf_counter(), os.getloadavg()
    date = datetime.now(UTC)
    bench = Bench(args)
    device = bench.device
    info = device_info(device)
    reference = _measure.reference_bandwidth(device)
    strategies: dict[str, Any] = {}
    batches = synthetic_batches(bench)
    synthetic = {"batches": "the padded loader's own batches for the warm-up and measured steps, moved to the "
                            "device once before timing",
                 "before": measure_synthetic(bench, batches, "synthetic (before)")}
    for name in args.strategies:
        if name in bench.skipped:
            strategies[name] = {"status": f"skipped: {bench.skipped[name]}"}
            continue
        strategies[name] = measure_strategy(bench, get_strategy(name), reference)
    peer = measure_peer(bench) if REFERENCE in args.strategies and REFERENCE not in bench.skipped else None
    freeze = measure_freeze(bench, batches, _data.dataset_size(bench.data)) if args.freeze_steps else None
    synthetic["after"] = measure_synthetic(bench, batches, "synthetic (after)")
    reliability = None
    if args.reliability_epochs:
        reliability = _reliability.measure(
            bench.data, epochs=args.reliability_epochs, batch_size=args.batch_size, workers=args.workers,
            seed=args.seed, expected=_data.dataset_size(bench.data), progress=args.progress, **bench.dataset_kwargs)
    del batches
    before, after = synthetic["before"], synthetic["after"]
    for key in ("samples_per_s", "real_tokens_per_s", "ms_per_batch"):
        synthetic[key] = (before[key] + after[key]) / 2
    synthetic["phases_ms"] = {p: (before["phases_ms"][p] + after["phases_ms"][p]) / 2 for p in before["phases_ms"]}
    synthetic["drift"] = abs(after["samples_per_s"] - before["samples_per_s"]) / max(after["samples_per_s"],
                                                                                     before["samples_per_s"])
    run_name = f"{info['label']}-{args.preset}-{date.strftime('%Y%m%d-%H%M%S')}"
    profile_dir = None
    if args.profile:
        profile_dir = str(Path(args.out) / "tb" / run_name)
        for name, r in strategies.items():
            if r["status"] != "ok":
                continue
            trainee = bench.model(get_strategy(name))
            stream = bench.stream(get_strategy(name))
            try:
                _measure.profiled_steps(stream, trainee, device, profile_dir, name)
            finally:
                stream.close()
    config = dataclasses.asdict(args)
    config.update(data=bench.data, embedding_data=bench.emb_data, model=vars(bench.shape) | {"num_classes":
                  bench.num_classes}, tokenizer_vocab=len(bench.tokenizer), cache_dir=str(bench.cache),
                  step_options=vars(bench.opts))
    result = {
        "run": run_name, "date": date.isoformat(timespec="seconds"), "git": git_state(), "machine": info,
        "threads": torch.get_num_threads(), "config": config, "argv": sys.argv[1:] if args.argv is None else
        list(args.argv), "reference_bandwidth": reference, "synthetic": synthetic, "strategies": strategies,
        "freeze": freeze, "reliability": reliability, "profile_dir": profile_dir, "peer": peer,
        "load_average": {"start": load_start, "end": os.getloadavg(), "note": "1, 5, 15-minute load averages of "
                         "the machine; above the core count, other processes competed for the CPU"},
    }
    result["ratios"] = _report.ratios(result)
    result["targets"] = _report.targets(result)
    result["duration_s"] = time.perf_counter() - started
    return result


@contextlib.contextmanager
def _quiet_known_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        # torch's jagged tensors are a prototype and say so on every call
        warnings.filterwarnings("ignore", message=".*nested tensors is in prototype.*")
        yield


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; write the result files into ``--out``; return the result dict (also for tests)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        with _quiet_known_warnings():
            result = run(args)
    finally:
        torch.set_num_threads(threads)
    paths = _report.write(result, Path(args.out))
    print(_report.table_text(result))
    print(f"\nwrote {', '.join(paths.values())} in {result['duration_s']:.0f} s")
    return result


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line's exit status: 0, 2 for a mistake on the command line, 1 for bad data or a failed write
    (NOTE [one-line errors] in :mod:`mmload.commands`)."""
    verbose = bool({"-v", "--verbose"} & set(sys.argv[1:] if argv is None else argv))
    return run_command("python bench/throughput.py", lambda: main(argv) and None, verbose)


if __name__ == "__main__":
    sys.exit(cli())


__all__ = ["BenchConfig", "build_parser", "cli", "main", "parse_args", "run"]
