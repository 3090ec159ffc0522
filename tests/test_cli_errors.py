"""Every command's mistakes: one line on stderr that names the value, exit 2 (usage) or 1 (bad data, a failed
write), no traceback unless -v. A table of bad invocations per command, run in-process through each command's own
entry point, and each entry point once as a real process."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import junk_shard

from bench.throughput import cli as bench_cli
from mmload.cli import main as mmload_main
from models.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
COMMANDS: dict[str, Callable[[list[str]], int]] = {"mmload": mmload_main, "train": train_main, "bench": bench_cli}


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory, builtin_shards: list[str]) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("someone's file")
    (root / "empty").mkdir()
    (root / "a-file").write_text("not a folder")
    junk = junk_shard(root / "junk.tar", 3)
    return {"SHARD": builtin_shards[0], "SHARDS": str(Path(builtin_shards[0]).parent), "TMP": str(root),
            "JUNK": str(junk), "FULL": str(root / "full"), "EMPTY": str(root / "empty"), "FILE": str(root / "a-file")}


# (command, argv, exit status, what the one line must say); {NAME} is filled from `places`
TABLE = [
    # mmload: the command itself
    ("mmload", [], 2, "the following arguments are required: COMMAND"),
    ("mmload", ["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    # mmload inspect
    ("mmload", ["inspect"], 2, "the following arguments are required: shards"),
    ("mmload", ["inspect", "{TMP}/missing.tar"], 2, "missing.tar"),
    ("mmload", ["inspect", "{TMP}/shard-{{000..003}}.tar"], 2, "shard-{000..003}.tar"),
    ("mmload", ["inspect", "{TMP}/nothing-*.tar"], 2, "nothing-*.tar"),
    ("mmload", ["inspect", "{TMP}/shard-{{000..003.tar"], 2, "brace"),
    ("mmload", ["inspect", "{EMPTY}"], 2, "no *.tar shards in directory"),
    ("mmload", ["inspect", "{SHARD}", "--tokenizer", "./no-such-tokenizer"], 2, "'./no-such-tokenizer': no such file"),
    ("mmload", ["inspect", "{SHARD}", "--read-timeout", "-1"], 2, "read_timeout must be"),
    ("mmload", ["inspect", "{SHARD}", "--max-sample-bytes", "lots"], 2, "'lots'"),
    ("mmload", ["inspect", "{JUNK}", "--strict"], 1, "[image_decode]"),
    # mmload make-shards
    ("mmload", ["make-shards"], 2, "the following arguments are required: OUT"),
    ("mmload", ["make-shards", "{FULL}"], 2, "is not empty; pass --overwrite"),
    ("mmload", ["make-shards", "{FILE}"], 2, "is a file; give a folder"),
    ("mmload", ["make-shards", "{TMP}/o1", "--source", "folder"], 2, "--source folder needs a PATH"),
    ("mmload", ["make-shards", "{TMP}/o2", "--source", "folder", "{TMP}/no-such-folder"], 2, "no-such-folder"),
    ("mmload", ["make-shards", "{TMP}/o3", "--vocab-size", "2"], 2, "vocab_size must be >="),
    ("mmload", ["make-shards", "{TMP}/o4", "--source", "folder", "{EMPTY}", "--samples", "9"], 2,
     "--samples: options of --source builtin"),
    # mmload precompute
    ("mmload", ["precompute", "{SHARD}", "{TMP}/p1", "--encoder", "{TMP}/no-such.pt"], 2, "no-such.pt does not exist"),
    ("mmload", ["precompute", "{SHARD}", "{TMP}/p2", "--encoder", "audio={TMP}/x.pt"], 2,
     "the prefix must be image= or text="),
    ("mmload", ["precompute", "{SHARD}", "{TMP}/p3", "--encoder", "{FILE}", "--batch-size", "0"], 2,
     "argument --batch-size: must be >= 1, got 0"),
    ("mmload", ["precompute", "{SHARD}", "{TMP}/p4", "--encoder", "{FILE}", "--workers", "-1"], 2,
     "argument --workers: must be >= 0, got -1"),
    ("mmload", ["precompute", "{SHARD}", "{TMP}/p5", "--encoder", "{FILE}", "--teacher", "{TMP}/t"], 2,
     "does not exist"),
    # python -m models.train
    ("train", ["--data", "{TMP}/missing.tar"], 2, "missing.tar"),
    ("train", ["--data", "{SHARDS}@-1"], 2, "weight"),
    ("train", ["--data", "{SHARDS}@0"], 2, "weight"),
    ("train", ["--strategy", "fastest"], 2, "invalid choice: 'fastest'"),
    ("train", ["--batch-size", "0"], 2, "--batch-size must be >= 1, got 0"),
    ("train", ["--resolution", "big"], 2, "invalid choice: 'big'"),
    ("train", ["--max-patches", "16"], 2, "--max-patches sets the native grid; give it with --resolution native"),
    ("train", ["--resolution", "native", "--max-patches", "0"], 2, "--max-patches must be >= 1, got 0"),
    ("train", ["--batch-size", "x"], 2, "invalid int value: 'x'"),
    ("train", ["--lr", "0"], 2, "--lr must be > 0"),
    ("train", ["--data", "{SHARDS}", "--tokenizer", "./no-such-tokenizer", "--steps", "1"], 2,
     "'./no-such-tokenizer': no such file"),
    ("train", ["--resume", "{EMPTY}"], 2, "no checkpoint-STEP.pt in"),
    ("train", ["--log-keys"], 2, "--log-keys writes OUT/keys-rank"),
    ("train", ["--data", "{JUNK}", "--steps", "1", "--num-workers", "0", "--no-progress"], 1,
     "no good sample for this process; skipped: image_decode 3"),
    # python bench/throughput.py
    ("bench", ["--data", "{TMP}/missing.tar"], 2, "missing.tar"),
    ("bench", ["--data", "{SHARDS}@-1"], 2, "weight"),
    ("bench", ["--strategies", "fastest"], 2, "--strategies: unknown ['fastest']"),
    ("bench", ["--batch-size", "0"], 2, "--batch-size must be >= 1, got 0"),
    ("bench", ["--text-len", "long"], 2, "--text-len takes MEDIAN,SIGMA"),
    ("bench", ["--device", "tpu"], 2, "--device"),
    ("bench", ["--rounds", "0"], 2, "--rounds must be >= 1, got 0"),
    ("bench", ["--max-patches", "16"], 2, "--max-patches takes N >= 1 with --resolution native, got 16 without it"),
    ("bench", ["--native-rounds", "-1"], 2, "--native-rounds must be >= 0, got -1"),
    ("bench", ["--sweep-sizes", "8,big"], 2, "--sweep-sizes takes batch sizes like 8,16,32 (or none)"),
    ("bench", ["--sweep-sizes", "0,8"], 2, "--sweep-sizes must be >= 1"),
    ("train", ["--device", "tpu"], 2, "--device 'tpu' is not a device"),
    ("mmload", ["precompute", "{SHARD}", "{TMP}/p6", "--encoder", "{FILE}", "--device", "tpu"], 2,
     "--device 'tpu' is not a device"),
    ("bench", ["--data", "{SHARDS}", "--tokenizer", "./no-such-tokenizer", "--quick"], 2,
     "'./no-such-tokenizer': no such file"),
]


def _fill(argv: list[str], places: dict[str, str]) -> list[str]:
    return [a.format(**places) for a in argv]


@pytest.mark.parametrize(("command", "argv", "status", "says"), TABLE,
                         ids=[f"{c}:{' '.join(a)[:50]}" for c, a, _, _ in TABLE])
def test_a_bad_invocation_is_one_line_and_an_exit_status(command: str, argv: list[str], status: int, says: str,
                                                         places: dict[str, str],
                                                         capsys: pytest.CaptureFixture) -> None:
    try:
        got = COMMANDS[command](_fill(argv, places))
    except SystemExit as e:  # argparse's own errors
        got = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines()  # logged warnings and progress bars aside
             if line.strip() and not line.startswith(("WARNING ", "INFO ")) and not re.search(r" samples \[", line)]
    assert "Traceback" not in err, err
    assert got == status, (got, err)
    assert len(lines) == 1, err  # one line: no usage text, no traceback (logged warnings aside)
    prog = {"mmload": "mmload", "train": "python -m models.train", "bench": "python bench/throughput.py"}[command]
    assert lines[0].startswith(f"{prog}") and ": error: " in lines[0] and says in lines[0], lines[0]


def test_verbose_shows_the_traceback(places: dict[str, str]) -> None:
    with pytest.raises(FileNotFoundError):
        mmload_main(["-v", "inspect", _fill(["{TMP}/missing.tar"], places)[0]])
    with pytest.raises(FileNotFoundError):  # after the subcommand too
        mmload_main(["inspect", _fill(["{TMP}/missing.tar"], places)[0], "-v"])
    with pytest.raises(FileNotFoundError):
        train_main(["-v", "--data", _fill(["{TMP}/missing.tar"], places)[0]])


@pytest.mark.parametrize("argv", [["-m", "mmload.cli", "inspect", "{TMP}/missing.tar"],
                                  ["-m", "models.train", "--data", "{TMP}/missing.tar"],
                                  [str(REPO / "bench" / "throughput.py"), "--data", "{TMP}/missing.tar"]])
def test_each_entry_point_as_a_process(argv: list[str], places: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, *_fill(argv, places)], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert len(proc.stderr.strip().splitlines()) == 1 and "missing.tar" in proc.stderr, proc.stderr


def test_help_shows_defaults_only_where_they_say_something(capsys: pytest.CaptureFixture) -> None:
    for command, argv in (("train", ["--help"]), ("mmload", ["inspect", "--help"]), ("mmload", ["precompute", "-h"])):
        with pytest.raises(SystemExit):
            COMMANDS[command](argv)
        out = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in out and "(default: True)" not in out and "(default: False)" not in out
    with pytest.raises(SystemExit):
        train_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--no-shuffle read shards and samples in order (training shuffles by default)" in out
    assert "(default: small)" in out  # a real default still shows
