"""What every command line of the project shares (``mmload``, ``python -m models.train``,
``python bench/throughput.py``): help that shows only defaults worth reading, and errors as one line.

NOTE [one-line errors]: a mistake on the command line (a path that matches nothing, a bad value, a non-empty
output folder) is one line on stderr that names the value, with exit status 2; bad data met with ``--strict``,
too many bad samples in a row, a full disk or a read-only folder are one line with exit status 1. ``-v`` shows the
traceback instead, for bug reports. An error a DataLoader worker raised arrives with the worker's traceback in
its message: the line shown is the worker's own error line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from mmload.errors import NoSamples, SampleError, TooManyErrors

USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
DATA_ERRORS = (SampleError, TooManyErrors, NoSamples)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``PROG: error: MESSAGE (see PROG --help)``), exit 2,
    instead of the usage text and then the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after a help text only where it says something: not for flags (store_true/false), not for
    ``None`` (the help says what happens then) and not where the help names its default itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default is None or isinstance(action.default, bool) or "default" in text
                or action.default is argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def add_verbose(parser: argparse.ArgumentParser, sub: bool = False) -> None:
    """``-v``; on a subcommand (``sub``) too, where it must not reset what the main parser read."""
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS if sub else False,
                        help="show the full traceback of an error instead of its one line")


def run_command(prog: str, fn: Callable[[], int | None], verbose: bool = False) -> int:
    """``fn()``'s exit status, or an error's one line on stderr and its status (NOTE [one-line errors])."""
    try:
        return int(fn() or 0)
    except DATA_ERRORS + USAGE_ERRORS + (OSError,) as exn:
        if verbose:
            raise
        print(f"{prog}: error: {one_line(exn)}", file=sys.stderr)
        return 1 if isinstance(exn, DATA_ERRORS) or not isinstance(exn, USAGE_ERRORS) else 2


def one_line(exn: BaseException) -> str:
    """The message of ``exn`` on one line: a worker's re-raised error gives its own last line."""
    lines = [line.strip() for line in str(exn).strip().splitlines() if line.strip()]
    if not lines:
        return type(exn).__name__
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        return lines[-1]
    return " ".join(lines)


__all__ = ["DATA_ERRORS", "USAGE_ERRORS", "HelpFormatter", "Parser", "add_verbose", "one_line", "run_command"]
