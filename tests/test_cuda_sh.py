"""``bench/cuda.sh``, the one-call CUDA run, exercised on the CPU (its CUDA parts skipped) so that it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "cuda.sh"

pytestmark = pytest.mark.slow


def _wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (what `pip download` puts into the wheels folder)."""
    path = folder / "mmload_probe-0.1-py3-none-any.whl"
    info = "mmload_probe-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mmload_probe/__init__.py", "PROBE = 1\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: mmload-probe\nVersion: 0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


def test_on_the_cpu_it_installs_the_wheels_skips_the_gpu_parts_and_writes_at_most_8_files(tmp_path: Path) -> None:
    wheels, out = tmp_path / "wheels", tmp_path / "out"
    wheels.mkdir()
    _wheel(wheels)
    done = _run("--wheels", str(wheels), "--out", str(out), "--", "--cache-dir", str(tmp_path / "cache"),
                cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (out / "cuda-sh.log").read_text()
    assert "installing 1 wheel(s)" in log and "no CUDA here: pytest -m gpu skipped" in log
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files) and len(files) <= 8, files
    run = next(f for f in files if f.endswith(".json"))
    result = json.loads((out / run).read_text())
    assert result["config"]["quick"] and result["machine"]["device"] == "cpu"
    stem = run.removesuffix(".json")
    assert {f"{stem}.csv", f"{stem}.png", f"{stem}-transfer.png", "README.md", "cuda-sh.log",
            "reliability.jsonl"} <= set(files)
    again = _run("--wheels", str(wheels), "--out", str(out), cwd=tmp_path)  # a second run would pass 8 files
    assert again.returncode == 2 and "is not empty" in again.stderr


def test_a_failing_benchmark_fails_the_script(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    done = _run("--wheels", str(wheels), "--out", str(tmp_path / "out"), "--", "--data", str(tmp_path / "none.tar"),
                cwd=tmp_path)
    assert done.returncode == 1 and "the benchmark exited 2" in (tmp_path / "out" / "cuda-sh.log").read_text()


@pytest.mark.parametrize("args", [(), ("--wheels",), ("--out", "x"), ("--wheels", "/no/such/folder", "--out", "x"),
                                  ("--bogus",)])
def test_a_wrong_command_line_is_one_line_and_exit_2(args: tuple[str, ...], tmp_path: Path) -> None:
    done = _run(*args, cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) <= 2
    assert "usage: bench/cuda.sh" in done.stderr or "is not a folder" in done.stderr
