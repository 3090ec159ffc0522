"""The ``mmload`` command: ``make-shards``, ``inspect``, ``precompute``.

NOTE [layers]: this module is the top floor. The library (every other module of ``mmload``) never imports
``models``; ``models`` imports the library. The command line may import both: ``mmload precompute --encoder
CHECKPOINT`` turns a path into an encoder object with ``models.features.load_encoder`` and hands that object to
the library's ``mmload.precompute.precompute``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from mmload.commands import HelpFormatter, Parser, add_verbose, run_command


def build_parser() -> argparse.ArgumentParser:
    from mmload import inspect, make_shards

    parser = Parser(prog="mmload", description="Mixed image/text webdataset shards: make them, "
                                     "inspect them, precompute embeddings for them.")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="do not log skipped samples (they are still counted)")
    add_verbose(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    make_shards.add_parser(sub)
    inspect.add_parser(sub)
    _add_precompute(sub)
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
        add_verbose(command, sub=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0, 2 for a mistake on the command line, 1 for bad data or a failed write (NOTE [one-line
    errors] in :mod:`mmload.commands`)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s %(message)s")
    return run_command(f"mmload {args.command}", lambda: args.func(args), args.verbose)


def _add_precompute(subparsers: Any) -> None:
    from mmload.decode import RESOLUTIONS
    from mmload.reader import ReadLimits

    p = subparsers.add_parser("precompute", help="embed shards once with a frozen encoder",
                              description="Run a frozen encoder over shards once (batched, on the GPU when "
                                          "present) and write shards with KEY.emb.npy (float16) beside the labels; "
                                          "an image-text pair gets both sides (KEY.text.emb.npy). Under torchrun "
                                          "(torchrun --nproc_per_node N -m mmload.cli precompute ...) each rank "
                                          "embeds its share of the shards and rank 0 writes the one manifest.")
    p.add_argument("shards", nargs="+", help="input shards (paths, brace patterns or directories)")
    p.add_argument("out", help="output directory for the embedding shards")
    p.add_argument("--encoder", action="append", required=True, metavar="[image=|text=]PATH",
                   help="an mmload checkpoint (.pt: both modalities) or a HF model directory (a text model for "
                        "texts, a vision model for images); prefix image= or text= to give each its own")
    p.add_argument("--tokens", action="store_true", help="keep every token's embedding, not only the pooled one")
    p.add_argument("--teacher", metavar="PATH",
                   help="also store an image teacher's class logits (KEY.logits.npy) for distillation: a HF image "
                        "classifier folder or an mmload checkpoint")
    p.add_argument("--batch-size", type=_positive, default=64, help="samples per encoder batch (default 64)")
    p.add_argument("--workers", type=_at_least_zero, default=0,
                   help="DataLoader workers decoding the input (default 0)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present, one GPU per rank)")
    p.add_argument("--tokenizer", default=None, metavar="NAME_OR_PATH",
                   help="tokenizer for the texts when the text encoder brings none (default: the one beside the "
                        "shards, else the bundled bert-base-uncased)")
    p.add_argument("--resolution", default="square", choices=RESOLUTIONS,
                   help="square: shorter side resized to the image encoder's image size, centre crop; native: each "
                        "image's aspect ratio kept, scaled (down only) to at most --max-patches patches of the "
                        "encoder's patch size, and embedded at its own size (one encoder call per distinct size "
                        "in a batch; --tokens gives each image its own length)")
    p.add_argument("--max-patches", type=_positive, metavar="N",
                   help="--resolution native: patches per image, the class token not counted (default: the image "
                        "encoder's square grid, (image size / patch size) ** 2)")
    p.add_argument("--max-samples-per-shard", type=_positive, default=1000, help="output shard size (default 1000)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    ReadLimits.add_arguments(p)
    p.set_defaults(func=_precompute)


def _positive(text: str) -> int:
    return _int_at_least(text, 1)


def _at_least_zero(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def _precompute(args: argparse.Namespace) -> int:
    """``mmload precompute``: resolve --encoder and --teacher paths into objects, then run the library's precompute
    (in the process group ``torchrun`` describes, when there is one)."""
    import torch.distributed as dist

    from mmload.precompute import precompute
    from mmload.reader import ReadLimits
    from models.distributed import init_distributed
    from models.features import load_encoder

    specs = []
    for spec in args.encoder:  # every path checked before a process group or a model is made
        kind, sep, path = spec.partition("=")
        if not sep:
            kind, path = "both", spec
        if kind not in ("image", "text", "both"):
            raise ValueError(f"--encoder {spec!r}: the prefix must be image= or text=")
        if not os.path.exists(path):
            raise FileNotFoundError(f"--encoder {spec!r}: {path} does not exist")
        specs.append((kind, path))
    if args.max_patches is not None and args.resolution != "native":
        raise ValueError("--max-patches sets the native grid; give it with --resolution native")
    if args.teacher and not os.path.exists(args.teacher):
        raise FileNotFoundError(f"--teacher {args.teacher!r} does not exist")
    info, device = init_distributed(args.device or "auto")
    try:
        image_enc = text_enc = None
        for kind, path in specs:
            enc = load_encoder(path, device)
            if kind in ("image", "both") and enc.image_size is not None:
                image_enc = enc
            if kind in ("text", "both") and enc.takes_text:
                text_enc = enc
        teacher = None
        if args.teacher:
            from models.kd import ImageTeacher

            teacher = ImageTeacher(args.teacher).to(device)
            teacher.name = args.teacher
        manifest = precompute(args.shards, args.out, image_encoder=image_enc, text_encoder=text_enc,
                              tokens=args.tokens, batch_size=args.batch_size, num_workers=args.workers,
                              device=device, maxcount=args.max_samples_per_shard, overwrite=args.overwrite,
                              teacher=teacher, tokenizer=args.tokenizer, progress=info.is_main,
                              resolution=args.resolution, max_patches=args.max_patches,
                              **ReadLimits.from_args(args).kwargs())
    finally:
        if info.owns_group:
            dist.destroy_process_group()
    if info.is_main:
        print(json.dumps({"out": args.out, "samples": manifest["samples"], "shards": len(manifest["shards"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
