"""``python bench/throughput.py``: the five batching strategies through one joint ViT-BERT training step.

For each strategy, in one run, same data, same seed, measured in rounds (a few steps of every strategy per round,
in a rotating order, so that ratios hold on a noisy machine: each is the median of its per-round ratios, with its
spread, and flagged when the rounds spread over 10%):

* loader alone: samples/s and text tokens/s with N workers; collate time per batch on pre-decoded samples;
* padding and fill: real and padded text tokens (``batch.stats()``), samples and tokens per batch against what
  was asked (``--batch-size`` or ``--max-tokens``);
* transfer: bytes and host-to-device copies per batch, packed vs unpacked, pinned vs pageable, timed with CUDA
  events beside the machine's own pinned memcpy bandwidth (on the CPU: host memcpy, said so); and a transfer-only
  sweep over batch sizes 8 to 512 (the paper's Fig. 1, measured);
* the training step (the trainer's ``models.step.train_step``, timed per phase by its ``PhaseTimer``): data wait,
  transfer, forward, backward, optimizer;
* end to end: samples/s, real tokens/s, data-wait share, peak device memory (CPU: peak RSS), RSS over the run;

plus a synthetic baseline in the same rounds (the same step on fixed batches already on the device: the upper
bound, and its spread over rounds a measure of machine noise), the loader a user writes with webdataset alone
(the peer) against mmload's, the one-core ceiling of mmload's decode path with the 1-worker loader's share of it,
and ``frozen`` vs ``full`` training time with the padded strategy. Writes
``OUT/<device>-<preset>-<date>.{json,csv,png}`` and ``...-transfer.png``, and refreshes ``OUT/README.md``.
``--quick`` runs in seconds (tiny preset, tiny data) for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import statistics
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
from mmload.dataset import expand_urls, open_data, parse_data
from mmload.decode import RESOLUTIONS
from mmload.epochs import EpochStream
from mmload.loader import image_cost, make_loader
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
            "reliability_epochs": 2, "rounds": 5, "native_rounds": 2,
            "sweep_sizes": ",".join(map(str, _measure.SWEEP_SIZES))}
# --quick: options not given on the command line take these values
QUICK = {"preset": "tiny", "samples": 96, "maxcount": 24, "image_text_ratio": 2.0, "batch_size": 8, "steps": 3,
         "warmup": 1, "per_sample_steps": 2, "freeze_steps": 2, "workers": 1, "collate_batches": 3, "rounds": 2,
         "native_rounds": 0, "sweep_sizes": "4,8"}


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
    g.add_argument("--resolution", choices=RESOLUTIONS, default="square",
                   help="square: images resized and centre-cropped to the preset's size; native: each image's "
                        "aspect ratio kept, at most --max-patches patches (padded batches pad to their largest "
                        "grid, bucketed groups images by grid within its padding bound, nested carries only real "
                        "patches, embeddings are precomputed per image; the webdataset peer is skipped) (default "
                        "square; a square run adds a native-resolution section: --native-rounds)")
    g.add_argument("--max-patches", type=int, metavar="N",
                   help="--resolution native: patches per image (default: the preset's square grid)")
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
                   help="measured steps of each of frozen and full training (padded); 0 skips (default: half of "
                        "--steps)")
    g.add_argument("--rounds", type=int,
                   help="strategies are measured in this many rounds of a few steps each, in a rotating order, so "
                        "that the machine's drift falls on all of them; a ratio is the median over rounds, and one "
                        "whose rounds spread over 10%% is flagged (default 5; --quick: 2)")
    g.add_argument("--sweep-sizes", metavar="N,N,...",
                   help="batch sizes of the transfer-only sweep (bytes, copies and time to move one batch per "
                        "strategy); 'none' skips it (default 8,16,32,64,128,256,512; --quick: 4,8)")
    g.add_argument("--native-rounds", type=int, metavar="R",
                   help="a square run adds a section at native resolution (the same data, each image on its own "
                        "grid of at most the square grid's patches): image and text padding, bytes per batch and "
                        "samples/s x padded per strategy, from a quarter of --steps in R rounds; 0 skips it "
                        "(default 2; --quick: 0)")
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
    resolution: str
    max_patches: int | None
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
    rounds: int
    native_rounds: int
    sweep_sizes: tuple[int, ...]
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
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    try:
        sizes = () if args.sweep_sizes.strip().lower() == "none" else tuple(
            int(x) for x in args.sweep_sizes.split(",") if x.strip())
    except ValueError:
        parser.error(f"--sweep-sizes takes batch sizes like 8,16,32 (or none), got {args.sweep_sizes!r}")
    if any(n < 1 for n in sizes):
        parser.error(f"--sweep-sizes must be >= 1, got {args.sweep_sizes!r}")
    args.sweep_sizes = sizes
    args.workers = min(8, os.cpu_count() or 1) if args.workers is None else args.workers
    if args.samples is None:  # one epoch covers what a loader-alone stream takes: no worker restart mid-timing
        turn = per_turn(args.steps, args.rounds)
        batches = args.warmup + args.rounds * (2 * turn + 2 * args.workers)  # NOTE [rounds]: turns + skipped
        args.samples = max(2000, -(-batches * args.batch_size // 1000) * 1000)
    args.per_sample_steps = args.per_sample_steps or max(3, args.steps // 3)
    args.freeze_steps = max(1, args.steps // 2) if args.freeze_steps is None else args.freeze_steps
    args.collate_batches = args.collate_batches or min(args.steps, 16)
    if args.threads is None and kind == "cpu":
        args.threads = max(1, (os.cpu_count() or 1) - args.workers)
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.max_patches is not None and (args.max_patches < 1 or args.resolution != "native"):
        parser.error(f"--max-patches takes N >= 1 with --resolution native, got {args.max_patches}"
                     + ("" if args.resolution == "native" else " without it"))
    for name in ("batch_size", "steps", "per_sample_steps", "samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        ReadLimits.from_args(args)
    except ValueError as e:
        parser.error(str(e))
    for name in ("warmup", "workers", "freeze_steps", "reliability_epochs", "native_rounds"):
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
        if any(not get_strategy(s).has_raw_inputs and s not in self.skipped for s in args.strategies):
            try:
                self.emb_data = _data.embedding_data(
                    self.data, self.cache, preset=args.preset, seed=args.seed, vocab_size=len(self.tokenizer),
                    tokens=args.emb == "tokens", device=self.device, progress=args.progress,
                    tokenizer=self.tokenizer, resolution=args.resolution, max_patches=args.max_patches,
                    **args.read_limits.kwargs())
            except ValueError as e:  # e.g. shards with nothing precompute can embed
                self.skipped.update({s: f"precompute failed: {e}" for s in args.strategies
                                     if not get_strategy(s).has_raw_inputs})
        self.data_of = {DataKind.RAW: self.data, DataKind.PRECOMPUTED: self.emb_data}
        n = max([args.collate_batches * args.batch_size, *args.sweep_sizes])
        # pre-decoded samples of each kind of data, for the collate and copy timings
        self.samples = {kind: self.first_samples(data, n) for kind, data in self.data_of.items() if data is not None}
        self.num_classes = _data.num_classes(self.urls, self.samples[DataKind.RAW])

    def data_for(self, strategy: Strategy) -> list[str]:
        return self.data_of[strategy.data]

    @property
    def dataset_kwargs(self) -> dict[str, Any]:
        """How every dataset of the run reads and decodes: the same tokenizer, sizes and read bounds."""
        return {"tokenizer": self.tokenizer, "image_size": self.shape.image_size,
                "max_text_len": self.shape.max_text_len, "patch_size": self.shape.patch_size,
                "resolution": self.args.resolution, "max_patches": self.args.max_patches,
                **self.args.read_limits.kwargs()}

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
        cost = image_cost(size["max_tokens"], self.shape.image_size, self.shape.patch_size, self.args.resolution)
        return list(strategy.group(self.samples[strategy.data], **size, **cost))[:n]

    def stream(self, strategy: Strategy) -> EpochStream:
        a = self.args

        def make(epoch: int) -> Any:
            return make_loader(strategy, self.data_for(strategy), **self.size_of(strategy), num_workers=a.workers,
                               seed=a.seed, transform=self.masking, **self.dataset_kwargs)

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



def measure_static(bench: Bench, strategy: Strategy, reference: dict[str, Any]) -> dict[str, Any]:
    """What needs no loader: collate time on pre-decoded samples, and bytes, copies and copy times per batch."""
    a, device = bench.args, bench.device
    patch = bench.shape.patch_size
    collate = strategy.collator(patch_size=patch)
    packs = bool(getattr(collate, "pack", False))
    groups = bench.groups(strategy, a.collate_batches)
    collate_fig = _measure.time_collate(collate, groups)
    unpacked = [strategy.collator(pack=False, patch_size=patch)(g) for g in groups]
    copies = _measure.time_copies(unpacked, device)
    loaded_variant = _measure.loaded_variant(copies, packs)  # what the loader hands the copy
    packed = [pack(b) for b in unpacked]
    return {"collate": {**collate_fig, "packs": packs}, "copies": copies, "loaded_variant": loaded_variant,
            "unpacked": _pick(_measure.batch_stats(unpacked), "bytes_per_batch", "copies_per_batch"),
            "packed": _pick(_measure.batch_stats(packed), "bytes_per_batch", "copies_per_batch")}


def assemble(bench: Bench, strategy: Strategy, static: dict[str, Any], loader: dict[str, Any],
             e2e: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """One strategy's entry of the result: its static figures, its loader alone and its training steps."""
    a, device = bench.args, bench.device
    per_step, memory = e2e.pop("per_step"), e2e.pop("memory")
    stats, moved = e2e.pop("stats"), e2e.pop("moved")
    copies, variant = static["copies"], static["loaded_variant"]
    copy_loaded = copies[variant]
    return {
        "status": "ok", "data": bench.data_for(strategy), "steps": len(per_step), "warmup": a.warmup,
        "rounds": a.rounds, "loader": {**loader, "workers": a.workers},
        "collate": static["collate"],
        "padding": {**{k: stats[k] for k in ("real_tokens", "padded_tokens", "padding_fraction", "image_tokens",
                                             "padded_image_tokens")},
                    "image_padding_fraction": stats["padded_image_tokens"] / max(
                        stats["image_tokens"] + stats["padded_image_tokens"], 1)},
        "fill": _measure.fill(per_step, **bench.size_of(strategy)),
        "transfer": {
            "as_loaded": {"packed": static["collate"]["packs"], "bytes_per_batch": stats["bytes_per_batch"],
                          "copies_per_batch": stats["copies_per_batch"]},
            "moved": moved,  # counted by the copy itself, to check stats() against
            "unpacked": static["unpacked"], "packed": static["packed"],
            "copy_time": copies, "loaded_variant": variant,
            "ms_per_batch": copy_loaded["ms_per_batch"], "GBps": copy_loaded["GBps"],
            "fraction_of_reference": copy_loaded["GBps"] / copies["same_size_reference"]["GBps"]
            if "same_size_reference" in copies else None,
            "fraction_of_peak": copy_loaded["GBps"] / reference["GBps"] if device.type == "cuda" else None,
        },
        "step_ms": e2e["phases_ms"], "step_ms_median": e2e["phases_ms_median"],
        "e2e": {k: e2e[k] for k in ("samples_per_s", "real_tokens_per_s", "batches_per_s", "ms_per_batch",
                                    "ms_per_sample", "data_wait_share", "seconds", "samples", "steps", "load1_mean",
                                    "rounds_samples_per_s")},
        "stats": stats, "memory": memory, "per_step": per_step,
    }


# the loader-alone runs beside the strategies' (NOTE [rounds] in bench/_measure.py): the peer and mmload's padded
# loader on the peer's terms (first source, no masking), the one-core ceiling and the 1-worker loader
PEER, PEER_MMLOAD, CEILING, ONE_WORKER = "webdataset peer", "mmload padded (as the peer)", "ceiling", "1-worker"
SYNTHETIC = "synthetic"
SYNTHETIC_BATCHES = 160  # at most this many device batches for the synthetic baseline (cycled past them)


def per_turn(total: int, rounds: int) -> int:
    """Steps of one turn: ``total`` spread over ``rounds``, rounded up, at least one."""
    return max(1, -(-total // rounds))


def turn_steps(bench: Bench, strategy: str | None = None) -> int:
    """Timed training steps per turn: ``--steps`` (``--per-sample-steps`` for per-sample) over ``--rounds``."""
    a = bench.args
    total = a.per_sample_steps if strategy and get_strategy(strategy).one_call_per_sample else a.steps
    return per_turn(total, a.rounds)


def loader_runs(bench: Bench, names: Sequence[str]) -> dict[str, _measure.LoaderRun]:
    """Every loader timed alone: each strategy's (as it trains: masking on), and, with padded among them, the peer
    and mmload's padded loader on the peer's terms, and the ceiling and the 1-worker loader."""
    a = bench.args
    skip = _measure.idle_batches(a.workers)
    runs = {n: _measure.LoaderRun(bench.stream(get_strategy(n)), skip) for n in names}
    if REFERENCE in names and a.resolution == "square":  # the peer a user writes decodes squares
        urls = list(bench.urls)
        size = {"image_size": bench.shape.image_size, "max_text_len": bench.shape.max_text_len}

        def ours(workers: int) -> EpochStream:
            return EpochStream(lambda epoch: make_loader(REFERENCE, urls, batch_size=a.batch_size, num_workers=workers,
                                                         seed=a.seed, **bench.dataset_kwargs))

        runs[PEER] = _measure.LoaderRun(_peer.endless(lambda: _peer.loader(
            urls, bench.tokenizer, batch_size=a.batch_size, workers=a.workers, **size)), skip)
        runs[PEER_MMLOAD] = _measure.LoaderRun(ours(a.workers), skip)
        runs[CEILING] = _measure.LoaderRun(_measure.ceiling_stream(
            lambda: open_data(urls, seed=a.seed, **bench.dataset_kwargs), a.batch_size))
        runs[ONE_WORKER] = _measure.LoaderRun(ours(1), _measure.idle_batches(1))
    return runs


def measure_loaders(bench: Bench, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The loaders alone, in rounds (NOTE [rounds]), each turn twice a training turn's batches."""
    a = bench.args
    runs = loader_runs(bench, names)
    try:
        for r in runs.values():
            r.warm(a.warmup)
        _measure.interleave(runs, a.rounds, dict.fromkeys(runs, 2 * turn_steps(bench)), "loaders alone", a.progress)
        return {n: r.result() for n, r in runs.items()}
    finally:
        for r in runs.values():
            r.close()


def measure_training(bench: Bench, names: Sequence[str], batches: list[Any] | None,
                     desc: str = "training steps") -> dict[str, dict[str, Any]]:
    """Every strategy's training steps and (given its ``batches``) the synthetic baseline (``SYNTHETIC``), in
    rounds (NOTE [rounds])."""
    a = bench.args
    skip = _measure.idle_batches(a.workers)
    runs: dict[str, Any] = {}
    try:
        for n in names:
            runs[n] = _measure.TrainRun(bench.stream(get_strategy(n)), bench.model(get_strategy(n)), bench.device,
                                        skip)
        if batches is not None:
            runs[SYNTHETIC] = _measure.SyntheticRun(bench.model(get_strategy(REFERENCE)), batches, bench.device,
                                                    skip)
        for r in runs.values():
            r.warm(a.warmup)
        _measure.interleave(runs, a.rounds, {n: turn_steps(bench, n if n in names else None) for n in runs},
                            desc, a.progress)
        return {n: r.result() for n, r in runs.items()}
    finally:
        for r in runs.values():
            r.close()


def peer_figures(loaders: dict[str, dict[str, Any]], bench: Bench) -> dict[str, Any] | None:
    """The peer against mmload's padded loader on the same terms, round by round."""
    if PEER not in loaders:
        return None
    a = bench.args
    theirs, ours = loaders[PEER]["rounds_samples_per_s"], loaders[PEER_MMLOAD]["rounds_samples_per_s"]
    ratio = _measure.per_round_ratio(ours, theirs)
    return {"rounds": [{"peer_samples_per_s": t, "mmload_samples_per_s": o, "ratio": o / t}
                       for t, o in zip(theirs, ours, strict=True)],
            "batches_per_round": loaders[PEER]["batches"] // a.rounds, "warmup": a.warmup, "batch_size": a.batch_size,
            "workers": a.workers, "strategy": REFERENCE, "data": list(bench.urls),
            "peer_samples_per_s": statistics.median(theirs), "mmload_samples_per_s": statistics.median(ours),
            "ratio": ratio["median"], "ratio_min": ratio["min"], "ratio_max": ratio["max"],
            "spread": ratio["spread"], "flagged": ratio["flagged"]}


def ceiling_figures(loaders: dict[str, dict[str, Any]], bench: Bench) -> dict[str, Any] | None:
    """The one-core ceiling (mmload's read, decode, resize and tokenize in this process, no DataLoader), the
    1-worker loader's share of it, and where the rest of a sample's time goes."""
    if CEILING not in loaders:
        return None
    ceiling, one = loaders[CEILING]["rounds_samples_per_s"], loaders[ONE_WORKER]["rounds_samples_per_s"]
    share = _measure.per_round_ratio(one, ceiling)
    # collate and pin as the 1-worker loader does them: batch_size samples a batch (not a token budget)
    samples = bench.samples[DataKind.RAW]
    chunks = [samples[i:i + bench.args.batch_size] for i in range(0, len(samples), bench.args.batch_size)]
    chunks = [c for c in chunks if len(c) == bench.args.batch_size] or [samples]
    collate = get_strategy(REFERENCE).collator()
    pin_ms = _measure.time_pinning([collate(c) for c in chunks])
    us = {"decode": 1e6 / statistics.median(ceiling),
          "collate": _measure.time_collate(collate, chunks)["us_per_sample"]}
    # the 1-worker loader's time per sample as the per-round share says it (the two medians apart are noisier)
    us["ipc and the rest"] = us["decode"] / share["median"] - sum(us.values())
    us["pin (beside, main process)"] = 1e3 * (pin_ms or 0.0) / len(chunks[0])
    return {"ceiling_samples_per_s": statistics.median(ceiling), "one_worker_samples_per_s": statistics.median(one),
            "share": share["median"], "share_min": share["min"], "share_max": share["max"],
            "spread": share["spread"], "flagged": share["flagged"], "us_per_sample": us,
            "pinned": pin_ms is not None,
            "how": "ceiling: the padded strategy's dataset iterated in the benchmark's process (no DataLoader, no "
                   "masking); 1-worker: make_loader(padded, num_workers=1) on the same shards, in the same rounds; "
                   "collate and pinning are timed on pre-decoded samples, the rest (IPC: pickling the batch "
                   "through the worker's queue) is the difference to the 1-worker loader's time per sample, taken "
                   "as the ceiling's over the per-round share"}


def _pick(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: d[k] for k in keys}


def synthetic_batches(bench: Bench) -> list[Any]:
    """The first batches the padded loader yields, as many as padded's training run reads in its rounds (at most
    ``SYNTHETIC_BATCHES``), moved to the device once: the synthetic baseline steps on the same batches per round."""
    a = bench.args
    stream = bench.stream(get_strategy(REFERENCE))
    try:
        skip = _measure.idle_batches(a.workers)
        wanted = a.warmup + a.rounds * (skip + 1 + turn_steps(bench))  # what padded's TrainRun reads (its turns)
        return [_measure.to_device(next(stream), bench.device, non_blocking=False)
                for _ in range(max(1, min(wanted, SYNTHETIC_BATCHES)))]
    finally:
        stream.close()


def measure_freeze(bench: Bench, batches: list[Any], epoch_samples: int | None) -> dict[str, Any]:
    """``full`` vs ``frozen`` (trainer's ``apply_freeze``) on padded's device batches, interleaved step by step."""
    a = bench.args
    trainees = {mode: bench.model(get_strategy(REFERENCE), freeze=mode) for mode in ("full", "frozen")}
    runs = {mode: _measure.SyntheticRun(t, batches, bench.device) for mode, t in trainees.items()}
    for r in runs.values():
        r.warm(a.warmup)
    # rounds of one step each: the two modes alternate step by step, on the same batch in each round
    _measure.interleave(runs, a.freeze_steps, dict.fromkeys(runs, 1), "frozen vs full", a.progress, wait=lambda: None)
    timed = {mode: r.result() for mode, r in runs.items()}
    out: dict[str, Any] = {"strategy": REFERENCE, "steps": a.freeze_steps, "paper": PAPER_FREEZE,
                           "how": "compute only (forward, backward, optimizer) on padded's loader batches already on "
                                  "the device, the two modes interleaved step by step; the loader's share of an "
                                  "epoch is the same for both"}
    for mode, r in timed.items():
        per_sample = r["seconds"] / r["samples"]
        out[mode] = {"seconds": r["seconds"], "samples": r["samples"], "s_per_1000_samples": 1000 * per_sample,
                     "s_per_epoch": per_sample * epoch_samples if epoch_samples else None,
                     "epoch_samples": epoch_samples, "phases_ms": r["phases_ms"],
                     "trainable_params": sum(p.numel() for p in trainees[mode].model.parameters()
                                             if p.requires_grad)}
    out["ratio"] = out["frozen"]["s_per_1000_samples"] / out["full"]["s_per_1000_samples"]
    return out


def native_section(args: BenchConfig, reference: dict[str, Any]) -> dict[str, Any] | None:
    """A square run's section at native resolution: the same data, each image on its own grid (at most the square
    grid's patches), every strategy's static figures and training steps in ``--native-rounds`` rounds of a quarter of
    ``--steps`` (no loader-alone, sweep, peer or freeze runs); None in a native run or with 0 rounds."""
    if args.resolution == "native" or not args.native_rounds:
        return None
    native = dataclasses.replace(args, resolution="native", rounds=args.native_rounds, sweep_sizes=(),
                                 steps=max(args.native_rounds, args.steps // 4), warmup=min(args.warmup, 2),
                                 per_sample_steps=max(1, args.per_sample_steps // 4))
    bench = Bench(native)
    names = [n for n in args.strategies if n not in bench.skipped]
    statics = {n: measure_static(bench, get_strategy(n), reference) for n in names}
    trained = measure_training(bench, names, None, "training steps, native resolution")
    strategies: dict[str, Any] = {}
    for name in names:
        entry = assemble(bench, get_strategy(name), statics[name], {}, trained[name], reference)
        strategies[name] = {"padding": entry["padding"], "fill": entry["fill"],
                            "as_loaded": entry["transfer"]["as_loaded"], "step_ms": entry["step_ms"],
                            "e2e": {k: entry["e2e"][k] for k in ("samples_per_s", "steps", "rounds_samples_per_s")}}
    rounds = {n: r["e2e"]["rounds_samples_per_s"] for n, r in strategies.items()}
    x_padded = ({n: _measure.per_round_ratio(v, rounds[REFERENCE]) for n, v in rounds.items() if n != REFERENCE}
                if REFERENCE in rounds else {})
    grid = (bench.shape.image_size // bench.shape.patch_size) ** 2
    return {"max_patches": grid, "patch_size": bench.shape.patch_size, "rounds": native.rounds,
            "steps": native.steps, "per_sample_steps": native.per_sample_steps, "warmup": native.warmup,
            "strategies": strategies, "skipped": dict(bench.skipped), "x_padded": x_padded,
            "embedding_data": bench.emb_data}


def run(args: BenchConfig) -> dict[str, Any]:
    started, load_start = time.perf_counter(), os.getloadavg()
    date = datetime.now(UTC)
    bench = Bench(args)
    device = bench.device
    info = device_info(device)
    reference = _measure.reference_bandwidth(device)
    names = [n for n in args.strategies if n not in bench.skipped]
    if not names:
        raise ValueError("no strategy left to measure: " + "; ".join(f"{n}: {why}" for n, why in bench.skipped.items())
                         + "; name another with --strategies")
    statics = {n: measure_static(bench, get_strategy(n), reference) for n in names}
    sweep = {n: _measure.transfer_sweep(get_strategy(n), bench.samples[get_strategy(n).data], args.sweep_sizes,
                                        device, patch_size=bench.shape.patch_size)
             for n in names} if args.sweep_sizes else None
    loaders = measure_loaders(bench, names)
    batches = synthetic_batches(bench)
    trained = measure_training(bench, names, batches)
    strategies: dict[str, Any] = {}
    for name in args.strategies:
        strategies[name] = ({"status": f"skipped: {bench.skipped[name]}"} if name in bench.skipped else
                            assemble(bench, get_strategy(name), statics[name], loaders[name], trained[name], reference))
    synthetic = {"batches": "the padded loader's own batches, moved to the device once before timing, cycled",
                 **trained[SYNTHETIC]}
    synthetic["drift"] = _measure.spread(synthetic["rounds_samples_per_s"])["spread"]
    peer, ceiling = peer_figures(loaders, bench), ceiling_figures(loaders, bench)
    freeze = measure_freeze(bench, batches, _data.dataset_size(bench.data)) if args.freeze_steps else None
    del batches
    native = native_section(args, reference)
    reliability = None
    if args.reliability_epochs:
        reliability = _reliability.measure(
            bench.data, epochs=args.reliability_epochs, batch_size=args.batch_size, workers=args.workers,
            seed=args.seed, expected=_data.dataset_size(bench.data), progress=args.progress, **bench.dataset_kwargs)
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
        "freeze": freeze, "reliability": reliability, "profile_dir": profile_dir, "peer": peer, "ceiling": ceiling,
        "sweep": sweep, "native": native,
        "rounds": {"rounds": args.rounds, "how": "every strategy's loader alone, then every strategy's training steps "
                   "and the synthetic baseline, in rounds of a few steps each in a rotating order; a ratio is the "
                   "median of its per-round ratios"},
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
    print("\n".join([_report.table_text(result), *_report.native_table(result)]))
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
