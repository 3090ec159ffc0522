"""``bench/throughput.py --quick``, run in-process: every figure is there and agrees with the batches' own stats().

Only structure and accounting are asserted; timings depend on the machine and are never checked here.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench import _measure, _report
from bench.throughput import build_parser, main, parse_args
from mmload.strategy import REGISTRY, STRATEGIES

REPO = Path(__file__).resolve().parents[1]

PHASES = ("data_wait", "transfer", "forward", "backward", "optimizer")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("results")
    cache = tmp_path_factory.mktemp("cache")
    before = sorted(p.name for p in (REPO / "results").glob("*")) if (REPO / "results").is_dir() else []
    # short lognormal texts (median 12 words) stay under the tiny preset's 64 positions: lengths really vary
    result = main(["--quick", "--out", str(out), "--cache-dir", str(cache), "--no-progress", "--text-len", "12,0.8",
                   "--profile"])
    after = sorted(p.name for p in (REPO / "results").glob("*")) if (REPO / "results").is_dir() else []
    assert before == after, "a test run must not write into the repository's results/"
    return result, out


def test_writes_every_result_file_to_out(run: tuple[dict, Path]) -> None:
    result, out = run
    for key in ("json", "csv", "png", "readme"):
        path = out / result["files"][key]
        assert path.is_file() and path.stat().st_size > 0, key
    assert (out / result["files"]["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / result["files"]["json"]).read_text())
    assert on_disk["run"] == result["run"] and set(on_disk["strategies"]) == set(STRATEGIES)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert on_disk["git"]["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert on_disk["git"]["dirty"] in ((True, False) if head.returncode == 0 else (None,))
    for key in ("device", "name", "torch", "cpu_count"):
        assert on_disk["machine"][key] is not None
    assert on_disk["config"]["quick"] and on_disk["config"]["preset"] == "tiny" and on_disk["date"]

    rows = list(csv.DictReader((out / result["files"]["csv"]).open()))
    assert [r["strategy"] for r in rows] == [*STRATEGIES, "synthetic"]
    for r in rows:  # the CSV says what the result says
        want = result["synthetic"] if r["strategy"] == "synthetic" else result["strategies"][r["strategy"]]["e2e"]
        assert float(r["samples_per_s"]) == pytest.approx(want["samples_per_s"], rel=1e-5) and want["samples_per_s"] > 0

    readme = (out / "README.md").read_text()
    assert result["run"] in readme and "### Targets" in readme and result["files"]["png"] in readme
    for strategy in STRATEGIES:
        assert f"| {strategy} |" in readme


def test_every_figure_for_every_strategy(run: tuple[dict, Path]) -> None:
    result, _ = run
    for strategy in STRATEGIES:
        r = result["strategies"][strategy]
        assert r["status"] == "ok", (strategy, r["status"])
        figures = {
            "e2e": ("samples_per_s", "real_tokens_per_s", "ms_per_batch", "ms_per_sample", "data_wait_share"),
            "loader": ("samples_per_s", "real_tokens_per_s", "workers"),
            "collate": ("ms_per_batch", "us_per_sample"),
            "padding": ("real_tokens", "padded_tokens", "padding_fraction"),
            "transfer": ("ms_per_batch", "GBps", "loaded_variant"),
            "step_ms": PHASES,
            "memory": ("rss_start_bytes", "rss_end_bytes", "peak_rss_bytes", "rss_peak_sampled_bytes"),
        }
        for part, keys in figures.items():
            for key in keys:
                assert r[part][key] is not None, (strategy, part, key)
        for form in ("as_loaded", "moved", "unpacked", "packed"):
            assert r["transfer"][form]["bytes_per_batch"] > 0 and r["transfer"][form]["copies_per_batch"] >= 1
        assert r["e2e"]["samples_per_s"] > 0 and r["loader"]["samples_per_s"] > 0
        assert len(r["per_step"]) == r["steps"] == r["e2e"]["steps"]
    syn = result["synthetic"]
    rounds = result["config"]["rounds"]
    assert len(syn["rounds_samples_per_s"]) == rounds and min(syn["rounds_samples_per_s"]) > 0
    assert syn["drift"] == pytest.approx(_measure.spread(syn["rounds_samples_per_s"])["spread"])
    for strategy in STRATEGIES:  # every strategy measured in every round, loader alone and end to end
        r = result["strategies"][strategy]
        assert len(r["e2e"]["rounds_samples_per_s"]) == len(r["loader"]["rounds_samples_per_s"]) == rounds
    assert result["reference_bandwidth"]["GBps"] > 0
    fz = result["freeze"]
    assert fz["frozen"]["trainable_params"] < fz["full"]["trainable_params"]
    assert fz["ratio"] == pytest.approx(fz["frozen"]["s_per_1000_samples"] / fz["full"]["s_per_1000_samples"])
    assert {t["status"] for t in result["targets"]} <= {"met", "missed", "not measured"}
    # one line per target a strategy of the registry promises, in registry order, then the spread of the ratios
    assert [t["target"] for t in result["targets"]][:-1] == [t.name for s in REGISTRY.values() for t in s.targets]
    assert result["targets"][-1]["target"] == "every ratio's spread over rounds <= 10%"


def test_the_synthetic_baseline_times_the_batches_padded_timed_in_each_round(run: tuple[dict, Path]) -> None:
    """Its per-round ratio compares the same batches: the synthetic turn passes over what padded's turn skipped."""
    result, _ = run
    padded = result["strategies"]["padded"]["per_step"]
    keys = ("samples", "real_tokens", "padded_tokens", "bytes")
    assert len(padded) == result["synthetic"]["steps"]
    assert [tuple(r[k] for k in keys) for r in padded] == [tuple(r[k] for k in keys)
                                                          for r in result["synthetic"]["per_step"]]


def test_padding_zero_for_nested_positive_for_padded(run: tuple[dict, Path]) -> None:
    result, _ = run
    s = result["strategies"]
    assert s["nested"]["padding"]["padded_tokens"] == 0
    assert s["padded"]["padding"]["padded_tokens"] > 0
    assert s["padded"]["padding"]["padding_fraction"] > 0
    # the same stream: nested and padded see the same real tokens
    assert s["nested"]["padding"]["real_tokens"] == s["padded"]["padding"]["real_tokens"]
    target = next(t for t in result["targets"] if t["target"] == "nested has zero padded tokens")
    assert target["status"] == "met"


def test_bytes_and_copies_agree_with_stats(run: tuple[dict, Path]) -> None:
    """What the benchmark counted while copying each batch equals that batch's stats()."""
    result, _ = run
    for strategy in STRATEGIES:
        r = result["strategies"][strategy]
        for step in r["per_step"]:
            assert step["moved_bytes"] == step["bytes"], strategy
            assert step["moved_copies"] == step["tensors"], strategy
        assert r["transfer"]["as_loaded"]["bytes_per_batch"] == pytest.approx(r["transfer"]["moved"]["bytes_per_batch"])
        assert r["transfer"]["as_loaded"]["copies_per_batch"] == r["transfer"]["moved"]["copies_per_batch"]
        assert r["transfer"]["packed"]["copies_per_batch"] == 1
        assert r["transfer"]["unpacked"]["copies_per_batch"] > 1
    assert result["strategies"]["nested"]["transfer"]["as_loaded"]["copies_per_batch"] == 1  # nested packs


def test_readme_keeps_only_the_newest_run_per_device() -> None:
    def fake(label: str, date: str) -> dict:
        return {"run": f"{label}-{date}", "date": date, "machine": {"label": label}, "strategies": {}}

    runs = [fake("cpu", "2025-01-01"), fake("cpu", "2025-02-01"), fake("cuda-h100", "2025-01-15")]
    assert [r["run"] for r in _report.newest_per_device(runs)] == ["cpu-2025-02-01", "cuda-h100-2025-01-15"]


def test_sweep_sizes_and_rounds_on_the_command_line() -> None:
    assert parse_args(["--sweep-sizes", "none"]).sweep_sizes == ()
    assert parse_args(["--sweep-sizes", "8, 64"]).sweep_sizes == (8, 64)
    assert parse_args([]).sweep_sizes == _measure.SWEEP_SIZES and parse_args([]).rounds == 5
    assert parse_args(["--quick"]).rounds == 2
    # one epoch of the default data covers what a loader-alone stream takes: warm-up, turns and skipped batches
    a = parse_args(["--steps", "50", "--warmup", "5", "--workers", "2"])
    assert a.samples >= (5 + 5 * (2 * 10 + 2 * 2)) * 32


def test_help_names_every_option() -> None:
    text = build_parser().format_help()
    for option in ("--data", "--strategies", "--preset", "--batch-size", "--image-text-ratio", "--text-len",
                   "--workers", "--steps", "--warmup", "--device", "--profile", "--out", "--quick", "--rounds",
                   "--sweep-sizes"):
        assert option in text


def test_reliability_line_reports_a_clean_exactly_once_epoch(run: tuple[dict, Path]) -> None:
    result, out = run
    r = result["reliability"]
    assert r["epochs"] == 2 and r["expected_per_epoch"] == 96
    assert r["samples_read"] == 2 * 96 and r["repeats"] == 0 and r["lost"] == 0 and r["errors"] == {}
    assert r["resume"]["unique"] == 96 and r["resume"]["repeats"] == 0 and r["resume"]["lost"] == 0
    assert r["resume"]["stopped_after_batches"] >= 1
    elastic = r["elastic_resume"]
    assert (elastic["from"], elastic["to"]) == ([2, 2], [3, 1])
    assert elastic["unique"] == 96 and elastic["repeats"] == 0 and elastic["lost"] == 0
    lines = (out / "reliability.jsonl").read_text().splitlines()
    line = json.loads(lines[-1])
    assert line["run"] == result["run"] and line["samples_read"] == 192 and line["lost"] == 0
    assert line["elastic_resume"] == {"from": [2, 2], "to": [3, 1], "samples": 96, "repeats": 0, "lost": 0}
    for key in ("commit", "device", "date", "data", "peak_rss_bytes", "errors", "repeats"):
        assert key in line
    assert "### Reliability (loader only)" in (out / "README.md").read_text()


def test_profile_writes_tensorboard_traces_with_a_range_per_phase(run: tuple[dict, Path]) -> None:
    result, _ = run
    traces = sorted(Path(result["profile_dir"]).glob("*.pt.trace.json"))
    assert {t.name.split(".")[0] for t in traces} == set(STRATEGIES)
    text = traces[0].read_text()
    for phase in ("data_wait", "h2d", "forward", "backward", "optimizer"):
        assert f'"{phase}"' in text, phase


def test_img2dataset_shards_with_data_alone_run_all_five(tmp_path: Path, img2dataset_shards: list[str]) -> None:
    """Shards mmload did not write (no tokenizer, no manifest, every sample a pair), given by --data alone: the
    bundled tokenizer reads them and every strategy runs, embeddings included (both sides of each pair)."""
    folder = str(Path(img2dataset_shards[0]).parent)
    result = main(["--quick", "--data", folder, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"),
                   "--no-progress", "--reliability-epochs", "0"])
    for name in STRATEGIES:
        entry = result["strategies"][name]
        assert entry["status"] == "ok" and entry["e2e"]["samples_per_s"] > 0, (name, entry["status"])
    assert result["config"]["tokenizer_vocab"] == 30522


def test_the_webdataset_peer_is_measured_beside_mmload(run: tuple[dict, Path]) -> None:
    result, out = run
    peer = result["peer"]
    rounds = result["config"]["rounds"]
    assert len(peer["rounds"]) == rounds and all(r["peer_samples_per_s"] > 0 for r in peer["rounds"])
    assert peer["ratio_min"] <= peer["ratio"] <= peer["ratio_max"]
    assert peer["ratio"] == pytest.approx(statistics.median(r["ratio"] for r in peer["rounds"]))
    target = next(t for t in result["targets"] if "webdataset peer" in t["target"])
    assert target["status"] in ("met", "missed") and f"median of {rounds} rounds" in target["value"]
    assert "| webdataset peer (PIL, HF tokenizer, tokenizer.pad) |" in (out / "README.md").read_text()


def test_the_ceiling_and_the_one_worker_share(run: tuple[dict, Path]) -> None:
    result, out = run
    c = result["ceiling"]
    assert c["ceiling_samples_per_s"] > 0 and c["one_worker_samples_per_s"] > 0
    assert c["share_min"] <= c["share"] <= c["share_max"]
    us = c["us_per_sample"]
    pin = "pin (beside, main process)"
    assert set(us) == {"decode", "collate", "ipc and the rest", pin} and us["decode"] > 0 and us["collate"] > 0
    # the worker's parts add up to the 1-worker loader's time per sample; pinning runs beside them
    assert us["decode"] + us["collate"] + us["ipc and the rest"] == pytest.approx(us["decode"] / c["share"])
    assert us[pin] == 0 and not c["pinned"]  # the CPU pins nothing
    target = next(t for t in result["targets"] if "one-core ceiling" in t["target"])
    assert target["status"] in ("met", "missed") and "samples/s" in target["value"]
    assert "### The one-core ceiling" in (out / "README.md").read_text()


def test_the_transfer_sweep_per_strategy_and_batch_size(run: tuple[dict, Path]) -> None:
    result, out = run
    sizes = tuple(result["config"]["sweep_sizes"])
    assert set(result["sweep"]) == set(STRATEGIES)
    for name, points in result["sweep"].items():
        assert tuple(p["batch_size"] for p in points) == sizes, name
        for p in points:
            assert p["bytes_per_batch"] > 0 and p["copies_per_batch"] >= 1 and p["ms_per_batch"] > 0
            assert 1 <= p["samples_per_batch"] <= p["batch_size"]
    nested, per_sample = result["sweep"]["nested"], result["sweep"]["per-sample"]
    assert all(p["copies_per_batch"] == 1 for p in nested)  # one packed buffer at every size
    assert [p["copies_per_batch"] for p in per_sample] == sorted(p["copies_per_batch"] for p in per_sample)
    assert per_sample[-1]["copies_per_batch"] > per_sample[0]["copies_per_batch"]  # a copy set per sample
    png = out / result["files"]["transfer_png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (out / "README.md").read_text()
    assert "### Transfer only, by batch size" in readme and result["files"]["transfer_png"] in readme


class _Stream:
    """A stream of numbered fake batches that records every one taken."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name, self.i = log, name, 0

    def __next__(self) -> _measure.Chunk:
        self.log.append(self.name)
        self.i += 1
        return _measure.Chunk([])


def test_rounds_rotate_the_order_and_every_turn_first_takes_what_an_idle_loader_had_ready() -> None:
    log: list[str] = []
    runs = {n: _measure.LoaderRun(_Stream(log, n), skip=2) for n in "abc"}
    waits: list[int] = []
    _measure.interleave(runs, rounds=4, steps=dict.fromkeys("abc", 3), desc="", progress=False,
                        wait=lambda: waits.append(len(log)))
    assert waits == list(range(0, 60, 5))  # before every turn, nothing taken meanwhile
    turns = [log[i] for i in range(0, len(log), 5)]  # each turn: 2 skipped, 3 timed
    assert turns == list("abc" "bca" "cab" "abc")
    assert all(len(r.turns) == 4 and all(t["batches"] == 3 for t in r.turns) for r in runs.values())
    assert all(runs[n].stream.i == 4 * 5 for n in "abc")


def test_a_ratio_is_the_median_of_its_rounds_and_a_wide_one_is_flagged() -> None:
    tight = _measure.per_round_ratio([10, 20, 30], [10, 21, 29])
    assert tight["median"] == pytest.approx(statistics.median([1, 20 / 21, 30 / 29])) and not tight["flagged"]
    wide = _measure.per_round_ratio([10, 20, 30], [10, 10, 10])
    assert wide["median"] == 2 and wide["min"] == 1 and wide["max"] == 3 and wide["spread"] == 1 and wide["flagged"]
    assert not _measure.spread([1.0, 1.1])["flagged"] and _measure.spread([1.0, 1.11])["flagged"]


def test_settle_waits_for_a_busy_child_process_to_go_idle() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 0.6: pass"])
    try:
        waited = _measure.settle(quiet_s=0.05, timeout_s=5)
        assert child.poll() is not None or waited >= 0.4  # it waited for the busy loop to end
    finally:
        child.wait()
    assert _measure.settle(quiet_s=0.05) < 0.5  # nothing busy: one quiet window or two


def test_a_run_of_one_strategy_without_a_sweep_or_padded(tmp_path: Path) -> None:
    result = main(["--quick", "--strategies", "nested", "--rounds", "1", "--sweep-sizes", "none", "--out",
                   str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"), "--no-progress",
                   "--reliability-epochs", "0", "--freeze-steps", "0"])
    assert result["strategies"]["nested"]["status"] == "ok" and result["sweep"] is None
    assert result["peer"] is None and result["ceiling"] is None
    spread = result["targets"][-1]
    assert spread["status"] == "not measured" and "at least 2 rounds" in spread["reason"]


def test_native_resolution_reports_the_image_padding_each_strategy_pays(tmp_path: Path) -> None:
    result = main(["--quick", "--resolution", "native", "--out", str(tmp_path / "out"), "--cache-dir",
                   str(tmp_path / "c"), "--no-progress", "--reliability-epochs", "0", "--freeze-steps", "0",
                   "--sweep-sizes", "none"])
    s = result["strategies"]
    assert s["embeddings"]["status"] == "ok"  # precomputed at native resolution, each image at its own grid
    assert result["peer"] is None and result["native"] is None  # the peer decodes squares; the run is native
    assert s["padded"]["padding"]["image_padding_fraction"] > 0.1  # the builtin images' aspect ratios vary
    for name in ("nested", "per-sample"):  # only real patches carried, one image a call
        assert s[name]["padding"]["padded_image_tokens"] == 0, name
    assert s["nested"]["padding"]["image_tokens"] == s["padded"]["padding"]["image_tokens"]  # the same images
    assert s["nested"]["transfer"]["as_loaded"]["bytes_per_batch"] < s["padded"]["transfer"]["as_loaded"][
        "bytes_per_batch"]  # no pixel of padding travels
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "images at native resolution" in readme and "| image padding |" in readme


def test_a_square_run_adds_a_native_resolution_section(tmp_path: Path) -> None:
    """The default run's native section: every strategy at native resolution, padding, bytes and ratios to padded,
    in the JSON, the CSV, the README and what the run prints."""
    result = main(["--quick", "--native-rounds", "2", "--strategies", "padded,nested,embeddings", "--out",
                   str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"), "--no-progress",
                   "--reliability-epochs", "0", "--freeze-steps", "0", "--sweep-sizes", "none"])
    native = result["native"]
    assert native["rounds"] == 2 and set(native["strategies"]) == {"padded", "nested", "embeddings"}
    padded, nested = native["strategies"]["padded"], native["strategies"]["nested"]
    assert padded["padding"]["image_padding_fraction"] > 0.1 and nested["padding"]["padded_image_tokens"] == 0
    assert result["strategies"]["padded"]["padding"]["padded_image_tokens"] == 0  # the square run pads none
    assert len(nested["e2e"]["rounds_samples_per_s"]) == 2 and set(native["x_padded"]) == {"nested", "embeddings"}
    assert nested["as_loaded"]["bytes_per_batch"] < padded["as_loaded"]["bytes_per_batch"]
    csv = (tmp_path / "out" / f"{result['run']}.csv").read_text()
    assert csv.count(",native,") == 3 and csv.count(",square,") == 4  # 3 strategies and the synthetic row
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "### Images at native resolution (a section of this run)" in readme
    assert f"Padded spent {padded['padding']['image_padding_fraction']:.0%} of its image positions" in readme
