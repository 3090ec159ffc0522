"""The ``mmload`` command: ``make-shards``, ``inspect``, ``precompute``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from mmload import inspect, make_shards, precompute

    parser = argparse.ArgumentParser(prog="mmload", description="Mixed image/text webdataset shards: make them, "
                                     "inspect them, precompute embeddings for them.")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="do not log skipped samples (they are still counted)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    make_shards.add_parser(sub)
    inspect.add_parser(sub)
    precompute.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
