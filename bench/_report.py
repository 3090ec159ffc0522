"""Result files of the throughput benchmark: JSON, CSV, chart, and the generated ``README.md``.

Every sentence with a number in the README is made here from the JSON figures; nothing is typed in by hand.
The README shows the newest run per device; older JSON files stay beside it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._measure import SPREAD_LIMIT, per_round_ratio
from mmload.strategy import BASELINES, REFERENCE, REGISTRY


def ok_strategies(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s: r for s, r in result["strategies"].items() if r.get("status") == "ok"}


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """Samples/s of each strategy relative to each baseline strategy (``mmload.strategy.BASELINES``) and to the
    synthetic baseline: medians of per-round ratios (NOTE [rounds] in ``bench/_measure.py``). ``per_round`` holds
    each one's median, min, max and spread; ``spreads`` the ones the run reports as results (end to end and loader
    alone against padded, the peer, the ceiling), each flagged when its rounds spread over ``SPREAD_LIMIT``."""
    ok = ok_strategies(result)
    rounds = {s: r["e2e"]["rounds_samples_per_s"] for s, r in ok.items()}
    loader = {s: r["loader"]["rounds_samples_per_s"] for s, r in ok.items()}
    per_round: dict[str, dict[str, Any]] = {}
    for ref in BASELINES:
        if ref in rounds:
            per_round[f"end to end, x {ref}"] = {s: per_round_ratio(v, rounds[ref]) for s, v in rounds.items()
                                                 if s != ref}
    synthetic = result["synthetic"]["rounds_samples_per_s"]
    per_round["end to end, x synthetic"] = {s: per_round_ratio(v, synthetic) for s, v in rounds.items()}
    if REFERENCE in loader:
        per_round[f"loader alone, x {REFERENCE}"] = {s: per_round_ratio(v, loader[REFERENCE]) for s, v in
                                                     loader.items() if s != REFERENCE}
    for key, name, value in (("peer", "mmload x the webdataset peer (loader alone)", "ratio"),
                             ("ceiling", "1-worker loader / one-core ceiling", "share")):
        fig = result.get(key)
        if fig:
            per_round[name] = {"": {"median": fig[value], "min": fig[f"{value}_min"], "max": fig[f"{value}_max"],
                                    "spread": fig["spread"], "flagged": fig["flagged"]}}
    out: dict[str, Any] = {
        f"vs_{ref.replace('-', '_')}": {s: 1.0 if s == ref else per_round[f"end to end, x {ref}"][s]["median"]
                                        for s in rounds} for ref in BASELINES if ref in rounds}
    out["vs_synthetic"] = {s: v["median"] for s, v in per_round["end to end, x synthetic"].items()}
    out[f"synthetic_vs_{REFERENCE}"] = per_round_ratio(synthetic, rounds[REFERENCE])["median"] \
        if REFERENCE in rounds else None
    out["per_round"] = per_round
    return out


def flagged_ratios(result: dict[str, Any]) -> tuple[int, list[str]]:
    """How many ratios the run reports, and the names of those whose rounds spread over ``SPREAD_LIMIT``."""
    every = [(group, s, v) for group, by in result["ratios"].get("per_round", {}).items() for s, v in by.items()]
    return len(every), [f"{group}: {s}".rstrip(": ") for group, s, v in every if v["flagged"]]


# ---- targets ----

def _target(name: str, status: str, value: str, reason: str = "") -> dict[str, str]:
    return {"target": name, "status": status, "value": value, "reason": reason}


def _transfer_fraction(r: dict[str, Any], result: dict[str, Any]) -> tuple[float | None, str]:
    tr = r["transfer"]
    frac = tr["fraction_of_reference"]
    if frac is None:
        return None, ""
    same = tr["copy_time"]["same_size_reference"]
    return frac, (f"{tr['GBps']:.1f} GB/s ({tr['loaded_variant']}) = {frac:.0%} of a pinned memcpy of the same "
                  f"{same['bytes'] / 2**20:.1f} MiB ({same['GBps']:.1f} GB/s); {tr['fraction_of_peak']:.0%} of the "
                  f"{result['reference_bandwidth']['GBps']:.1f} GB/s large-copy peak")


def _copies(r: dict[str, Any], result: dict[str, Any]) -> tuple[float, str]:
    """Copies per batch as ``stats()`` says and as the copy issued them; NaN (never met) when the two disagree."""
    tr = r["transfer"]
    said, issued = tr["as_loaded"]["copies_per_batch"], tr["moved"]["copies_per_batch"]
    return said if said == issued else float("nan"), f"{said:g} per batch by stats(), {issued:g} issued by the copy"


# How each target metric (``mmload.strategy.Target.metric``) is read from a strategy's result: (value, text).
# A value of None means the metric cannot be measured on this run's device.
METRICS: dict[str, Any] = {
    "padded_tokens": lambda r, res: (r["padding"]["padded_tokens"], f"{r['padding']['padded_tokens']} padded of "
                                     f"{r['padding']['real_tokens'] + r['padding']['padded_tokens']} text tokens"),
    "padding_fraction": lambda r, res: (r["padding"]["padding_fraction"], f"{r['padding']['padding_fraction']:.1%}"),
    "copies_per_batch": _copies,
    "transfer_fraction": _transfer_fraction,
    "data_wait_share": lambda r, res: (r["e2e"]["data_wait_share"], f"{r['e2e']['data_wait_share']:.1%}"),
    "fill": lambda r, res: (r["fill"]["fill"], _fill_text(r["fill"])),
    "vs_peer": lambda r, res: (res["peer"]["ratio"], _peer_text(res["peer"])) if res.get("peer") else (
        None, "the peer was not measured in this run"),
    "ceiling_share": lambda r, res: (res["ceiling"]["share"], _ceiling_text(res["ceiling"])) if res.get("ceiling")
    else (None, "the ceiling was not measured in this run"),
}


def _ceiling_text(c: dict[str, Any]) -> str:
    return (f"{c['share']:.0%} (rounds {c['share_min']:.0%}-{c['share_max']:.0%}): "
            f"{c['one_worker_samples_per_s']:.0f} of {c['ceiling_samples_per_s']:.0f} samples/s")


def _peer_text(peer: dict[str, Any]) -> str:
    return (f"{peer['ratio']:.2f}x (median of {len(peer['rounds'])} rounds, {peer['ratio_min']:.2f}-"
            f"{peer['ratio_max']:.2f}): {peer['mmload_samples_per_s']:.0f} vs {peer['peer_samples_per_s']:.0f} "
            "samples/s")


def _fill_text(fill: dict[str, Any]) -> str:
    """``98.4% of 32 samples (min 30, max 32)``, or the same in tokens of a budget."""
    by, asked = fill["by"], fill["asked"]["batch_size" if fill["by"] == "samples" else "max_tokens"]
    got = fill[by]
    return f"{fill['fill']:.1%} of {asked} {by} (min {got['min']:g}, max {got['max']:g})"


def targets(result: dict[str, Any]) -> list[dict[str, str]]:
    """Every target the registry's strategies promise (``Strategy.targets``) marked met / missed / not measured,
    with the figure it was read from."""
    ok = ok_strategies(result)
    device = result["machine"]["device"].split(":")[0]
    preset = result["config"]["preset"]
    out = []
    for strategy in REGISTRY.values():
        for t in strategy.targets:
            needed = [strategy.name] + ([t.versus] if t.versus else [])
            absent = [s for s in needed if s not in ok]
            if absent:
                why = "; ".join(f"{s}: {result['strategies'].get(s, {}).get('status', 'not run')}" for s in absent)
                out.append(_target(t.name, "not measured", "", f"strategy not measured ({why})"))
                continue
            r = ok[strategy.name]
            if t.metric == "speedup":
                fig = result["ratios"]["per_round"][f"end to end, x {t.versus}"][strategy.name]
                value = fig["median"]
                text = f"{value:.2f}x (rounds {fig['min']:.2f}-{fig['max']:.2f})"
            else:
                value, text = METRICS[t.metric](r, result)
            if value is None:  # the metric's text says why, else it is the host-to-device copy's
                out.append(_target(t.name, "not measured", "", text or f"not measurable on {device}: no "
                                   "host-to-device copy exists"))
                continue
            batching = "tokens" if result["config"].get("max_tokens") else "samples"
            setting = (("device", t.device, device), ("preset", t.preset, preset),
                       ("batching by", t.batching, batching))
            wanted = [f"{what} {need}" for what, need, have in setting if need not in (None, have)]
            if wanted:
                out.append(_target(t.name, "not measured", f"{text} on this run (not the target setting)",
                                   f"needs {', '.join(wanted)}; this run: {device}, {preset}, by {batching}"))
                continue
            reason = "" if device == "cuda" or t.metric != "copies_per_batch" else \
                "counted on the CPU, where the copy itself is a no-op"
            out.append(_target(t.name, "met" if t.met(value) else "missed", text, reason))
    total, flagged = flagged_ratios(result)
    name = f"every ratio's spread over rounds <= {SPREAD_LIMIT:.0%}"
    rounds = result.get("rounds", {}).get("rounds", 1)
    if total == 0 or rounds < 2:
        out.append(_target(name, "not measured", "", f"{_n(rounds, 'round')}, {_n(total, 'ratio')}: a spread needs "
                           "at least 2 rounds and a ratio"))
    else:
        out.append(_target(name, "missed" if flagged else "met", f"{total - len(flagged)} of {total} within",
                           "flagged (not results): " + "; ".join(flagged) if flagged else ""))
    return out


# ---- files ----

def write(result: dict[str, Any], out: Path) -> dict[str, str]:
    """Write ``<run>.json``, ``<run>.csv``, ``<run>.png`` (and ``<run>-transfer.png`` with a sweep) into ``out`` and
    regenerate ``out/README.md``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {ext: f"{result['run']}.{ext}" for ext in ("json", "csv", "png")}  # names, relative to ``out``
    if result.get("sweep"):
        files["transfer_png"] = f"{result['run']}-transfer.png"
    result["files"] = {**files, "readme": "README.md"}
    (out / files["json"]).write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    write_csv(result, out / files["csv"])
    chart(result, out / files["png"])
    if result.get("sweep"):
        sweep_chart(result, out / files["transfer_png"])
    if result.get("reliability"):
        append_reliability_line(result, out / RELIABILITY)
    write_readme(out)
    return {k: str(out / v) for k, v in result["files"].items()}


RELIABILITY = "reliability.jsonl"


def reliability_line(result: dict[str, Any]) -> dict[str, Any]:
    """One line per run: samples read, errors by kind, repeats, lost samples, memory, with where it came from."""
    r = result["reliability"]
    return {"run": result["run"], "date": result["date"], "commit": _commit(result),
            "device": result["machine"]["name"], "data": result["config"]["data"], "strategy": r["strategy"],
            "epochs": r["epochs"], "workers": r["workers"],
            "samples_read": r["samples_read"], "expected_per_epoch": r["expected_per_epoch"], "errors": r["errors"],
            "repeats": r["repeats"], "lost": r["lost"], "resume_repeats": r["resume"]["repeats"],
            "resume_lost": r["resume"].get("lost"), "elastic_resume": _elastic_summary(r.get("elastic_resume")),
            "peak_rss_bytes": r["peak_rss_bytes"],
            "rss_after_epoch_bytes": r["rss_after_epoch_bytes"], "worker_peak_rss_bytes": r["worker_peak_rss_bytes"]}


def _elastic_summary(e: dict[str, Any] | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {"from": e["from"], "to": e["to"], "samples": e["samples"], "repeats": e["repeats"], "lost": e.get("lost")}


def append_reliability_line(result: dict[str, Any], path: Path) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(reliability_line(result), sort_keys=True) + "\n")


def reliability_section(result: dict[str, Any]) -> list[str]:
    line = reliability_line(result)
    mib = [f"{b / 2**20:.0f}" for b in line["rss_after_epoch_bytes"]]
    return ["", "### Reliability (loader only)", "", result["reliability"]["how"], "",
            "| strategy | epochs | samples read | expected per epoch | errors | repeats | lost | resumed epoch: "
            "repeats, lost | elastic resume: repeats, lost | RSS after each epoch (MiB) | largest worker peak RSS "
            "(MiB) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {line['strategy']} | {line['epochs']} | {line['samples_read']} | {line['expected_per_epoch']} | "
            f"{line['errors'] or 'none'} | {line['repeats']} | {line['lost']} | {line['resume_repeats']}, "
            f"{line['resume_lost']} | {_elastic_cell(line['elastic_resume'])} | {' -> '.join(mib)} | "
            f"{' -> '.join(f'{b / 2**20:.0f}' for b in line['worker_peak_rss_bytes'])} |",
            "", f"Every run appends this line to [`{RELIABILITY}`]({RELIABILITY})."]


def _elastic_cell(e: dict[str, Any] | None) -> str:
    if e is None:
        return "not run"
    (r, w), (r2, w2) = e["from"], e["to"]
    return f"{r} ranks x {w} workers -> {r2} x {w2}: {e['repeats']}, {e['lost']}"


CSV_COLUMNS = ("strategy", "resolution", "status", "steps", "samples_per_s", "vs_padded", "real_tokens_per_s",
               "ms_per_batch", "ms_per_sample", "data_wait_ms", "transfer_ms", "forward_ms", "backward_ms",
               "optimizer_ms", "data_wait_share", "real_tokens", "padded_tokens", "padding_fraction", "image_tokens",
               "padded_image_tokens", "image_padding_fraction", "bytes_per_batch",
               "copies_per_batch", "unpacked_bytes_per_batch", "unpacked_copies_per_batch",
               "packed_bytes_per_batch", "packed_copies_per_batch", "copy_variant", "copy_ms_per_batch", "copy_GBps",
               "fraction_of_reference", "loader_samples_per_s", "loader_real_tokens_per_s", "collate_ms_per_batch",
               "peak_device_bytes", "peak_rss_bytes", "rss_start_bytes", "rss_end_bytes")


def csv_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    vs = result["ratios"].get("vs_padded", {})
    rows = []
    for s, r in result["strategies"].items():
        if r.get("status") != "ok":
            rows.append({"strategy": s, "status": r.get("status")})
            continue
        e, tr, m = r["e2e"], r["transfer"], r["memory"]
        rows.append({
            "strategy": s, "status": "ok", "steps": e["steps"], "samples_per_s": e["samples_per_s"],
            "vs_padded": vs.get(s), "real_tokens_per_s": e["real_tokens_per_s"], "ms_per_batch": e["ms_per_batch"],
            "ms_per_sample": e["ms_per_sample"], **{f"{p}_ms": v for p, v in r["step_ms"].items()},
            "data_wait_share": e["data_wait_share"], **r["padding"], "fill": r["fill"]["fill"],
            "samples_per_batch": r["fill"]["samples"]["mean"], "tokens_per_batch": r["fill"]["tokens"]["mean"],
            "bytes_per_batch": tr["as_loaded"]["bytes_per_batch"],
            "copies_per_batch": tr["as_loaded"]["copies_per_batch"],
            "unpacked_bytes_per_batch": tr["unpacked"]["bytes_per_batch"],
            "unpacked_copies_per_batch": tr["unpacked"]["copies_per_batch"],
            "packed_bytes_per_batch": tr["packed"]["bytes_per_batch"],
            "packed_copies_per_batch": tr["packed"]["copies_per_batch"], "copy_variant": tr["loaded_variant"],
            "copy_ms_per_batch": tr["ms_per_batch"], "copy_GBps": tr["GBps"],
            "fraction_of_reference": tr["fraction_of_reference"],
            "loader_samples_per_s": r["loader"]["samples_per_s"],
            "loader_real_tokens_per_s": r["loader"]["real_tokens_per_s"],
            "collate_ms_per_batch": r["collate"]["ms_per_batch"], "peak_device_bytes": m["peak_device_bytes"],
            "peak_rss_bytes": m["peak_rss_bytes"], "rss_start_bytes": m["rss_start_bytes"],
            "rss_end_bytes": m["rss_end_bytes"]})
    syn = result["synthetic"]
    rows.append({"strategy": "synthetic", "status": "ok", "steps": syn["steps"],
                 "samples_per_s": syn["samples_per_s"], "vs_padded": result["ratios"]["synthetic_vs_padded"],
                 "real_tokens_per_s": syn["real_tokens_per_s"], "ms_per_batch": syn["ms_per_batch"],
                 **{f"{p}_ms": v for p, v in syn["phases_ms"].items()}})
    resolution = result["config"].get("resolution", "square")
    for row in rows:
        row["resolution"] = resolution
    native = result.get("native")
    for s, r in (native or {}).get("strategies", {}).items():  # the square run's native-resolution section
        x = native["x_padded"].get(s)
        rows.append({"strategy": s, "resolution": "native", "status": "ok", "steps": r["e2e"]["steps"],
                     "samples_per_s": r["e2e"]["samples_per_s"], "vs_padded": 1.0 if s == REFERENCE else
                     x and x["median"], **{f"{p}_ms": v for p, v in r["step_ms"].items()}, **r["padding"],
                     "bytes_per_batch": r["as_loaded"]["bytes_per_batch"],
                     "copies_per_batch": r["as_loaded"]["copies_per_batch"]})
    return rows


def write_csv(result: dict[str, Any], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in csv_rows(result):
            writer.writerow({k: _csv_value(v) for k, v in row.items()})


def _csv_value(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


# ---- chart ----

def _bars(result: dict[str, Any]) -> tuple[list[str], dict[str, list[float]], list[float]]:
    """Bar labels (strategy and samples per batch; synthetic last), ms per batch by part, and samples/s."""
    syn = result["synthetic"]
    rows = [(s, r["step_ms"], r["e2e"]["samples_per_s"], r["e2e"]["samples"] / r["e2e"]["steps"])
            for s, r in ok_strategies(result).items()]
    rows.append(("synthetic", {"data_wait": 0.0, "transfer": 0.0, **syn["phases_ms"]}, syn["samples_per_s"],
                 syn["samples"] / syn["steps"]))
    labels = [f"{name}\n{per_batch:.0f}/batch" for name, _, _, per_batch in rows]
    parts = {"data wait": [ms["data_wait"] for _, ms, _, _ in rows],
             "transfer": [ms["transfer"] for _, ms, _, _ in rows],
             "compute (fwd+bwd+opt)": [ms["forward"] + ms["backward"] + ms["optimizer"] for _, ms, _, _ in rows]}
    return labels, parts, [rate for _, _, rate, _ in rows]


def chart(result: dict[str, Any], path: Path) -> None:
    """Time per batch stacked into data wait / transfer / compute, and samples/s, per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, parts, sps = _bars(result)
    colors = {"data wait": "#e4572e", "transfer": "#f3a712", "compute (fwd+bwd+opt)": "#29335c"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    bottom = [0.0] * len(names)
    for label, values in parts.items():
        ax1.bar(names, values, bottom=bottom, label=label, color=colors[label])
        bottom = [b + v for b, v in zip(bottom, values)]
    for x, total in enumerate(bottom):
        ax1.annotate(f"{total:.0f}", (x, total), ha="center", va="bottom", fontsize=9)
    ax1.set_ylim(0, 1.3 * max(bottom))  # room for the legend above the tallest bar
    ax1.set_ylabel("ms per batch (mean)")
    ax1.set_title("time per batch")
    ax1.legend(frameon=False, fontsize=9, loc="upper center", ncol=3)
    bars = ax2.bar(names, sps, color=["#8d99ae" if n.startswith("synthetic") else "#2b9348" for n in names])
    for bar, v in zip(bars, sps):
        ax2.annotate(f"{v:.0f}" if v >= 10 else f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                     va="bottom", fontsize=9)
    ax2.set_ylabel("samples / s (end to end)")
    ax2.set_title("samples/s, end to end")
    ax2.set_xlabel("synthetic: padded's batches already on the device, no loader", fontsize=9)
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=9)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(_headline(result), fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_chart(result: dict[str, Any], path: Path) -> None:
    """The transfer-only sweep (the paper's Fig. 1, measured): time to move one sample's share of a batch, and
    copies per batch, against batch size, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuda = result["machine"]["device"].startswith("cuda")
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.6), layout="constrained")
    for name, points in result["sweep"].items():
        if not points:
            continue
        sizes = [p["batch_size"] for p in points]
        ax1.plot(sizes, [p["us_per_sample"] for p in points], marker="o", label=name)
        ax2.plot(sizes, [p["copies_per_batch"] for p in points], marker="o", label=name)
        ax3.plot(sizes, [p["bytes_per_batch"] / max(p["samples_per_batch"], 1) / 1024 for p in points], marker="o",
                 label=name)
    how = "host-to-device from pinned memory, CUDA events" if cuda else \
        "CPU: a host memcpy stand-in (no host-to-device copy exists)"
    for ax, ylabel, title in ((ax1, "us per sample moved", f"time to move a batch, per sample\n({how})"),
                              (ax2, "copies per batch", "host-to-device copies per batch"),
                              (ax3, "KiB per sample", "bytes moved per sample")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (samples asked)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    ax1.legend(frameon=False, fontsize=9)
    fig.suptitle("Moving mixed image/text batches: " + _headline(result), fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_table(result: dict[str, Any]) -> list[str]:
    sweep = result.get("sweep")
    if not sweep:
        return []
    sizes = sorted({p["batch_size"] for points in sweep.values() for p in points})
    cuda = result["machine"]["device"].startswith("cuda")
    lines = ["", "### Transfer only, by batch size (the paper's Fig. 1, measured)", "",
             ("Time to move one batch from pinned host memory to the device (CUDA events), per sample, with copies "
              "per batch, in the form each strategy's loader hands it (nested: one packed buffer)." if cuda else
              "CPU: no host-to-device copy exists, so each batch's tensors are cloned in host memory (a stand-in "
              "for per-copy overhead, labelled as such), in the form each strategy's loader hands it (nested: one "
              "packed buffer).") + f" Chart: `{result['files'].get('transfer_png', '-')}`.", "",
             "| strategy | " + " | ".join(f"{n}: us/sample (copies)" for n in sizes) + " |",
             "|" + " --- |" * (len(sizes) + 1)]
    for name, points in sweep.items():
        by = {p["batch_size"]: p for p in points}
        lines.append(f"| {name} | " + " | ".join(
            f"{by[n]['us_per_sample']:.2f} ({by[n]['copies_per_batch']:g})" if n in by else "-" for n in sizes) + " |")
    if result["files"].get("transfer_png"):
        lines += ["", f"![transfer time per sample by batch size]({result['files']['transfer_png']})"]
    return lines


def spreads_table(result: dict[str, Any]) -> list[str]:
    """Every ratio of the run with its rounds' min-max and spread; a flagged one is not a result."""
    groups = result["ratios"].get("per_round", {})
    if not groups:
        return []
    lines = ["", f"### Ratios over {result['rounds']['rounds']} rounds", "",
             f"Each ratio is the median of its per-round ratios; one whose rounds spread more than "
             f"{SPREAD_LIMIT:.0%} (max - min over the median) is flagged: read it as noise, not as a result. The "
             f"synthetic baseline, the same compute on the same batches in every round, spread "
             f"{result['synthetic']['drift']:.0%}: the machine's own noise from one turn to the next.", "",
             "| ratio | strategy | median | min-max | spread | |", "| --- | --- | --- | --- | --- | --- |"]
    for group, by in groups.items():
        for name, v in by.items():
            lines.append(f"| {group} | {name or '-'} | {v['median']:.2f} | {v['min']:.2f}-{v['max']:.2f} | "
                         f"{v['spread']:.0%} | {'flagged' if v['flagged'] else ''} |")
    return lines


def ceiling_section(result: dict[str, Any]) -> list[str]:
    c = result.get("ceiling")
    if not c:
        return []
    us = c["us_per_sample"]
    return ["", "### The one-core ceiling", "",
            f"How: {c['how']}.", "",
            f"mmload's decode path alone on one core ran at {c['ceiling_samples_per_s']:.0f} samples/s; the 1-worker "
            f"loader at {c['one_worker_samples_per_s']:.0f}, {c['share']:.0%} of it (rounds {c['share_min']:.0%}-"
            f"{c['share_max']:.0%}).", "",
            "| per sample | " + " | ".join(us) + " |", "|" + " --- |" * (len(us) + 1),
            "| us | " + " | ".join(f"{v:.0f}" for v in us.values()) + " |", "",
            "decode, collate and the rest add up to the 1-worker loader's time per sample (the ceiling's over the "
            "share); pinning runs beside them "
            "in the main process's pin thread" + (" (none on the CPU)" if not c["pinned"] else "") + "; the rest "
            "(IPC, the main process's unpickling) is the difference, so noise between rounds can make it negative."]


def _headline(result: dict[str, Any]) -> str:
    c, m = result["config"], result["machine"]
    return (f"{m['label']} ({m['name']}), {c['preset']} preset, batch {c['batch_size']}, "
            f"{_n(c['workers'], 'worker')}, {_n(result['threads'], 'thread')}, {result['date']}, "
            f"commit {_commit(result)}")


def _commit(result: dict[str, Any]) -> str:
    g = result["git"]
    return ((g["commit"] or "none")[:10]) + ("+dirty" if g["dirty"] else "")


# ---- tables and README ----

def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def _kb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1000:.1f} kB"


def _f(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def table_text(result: dict[str, Any]) -> str:
    """The two markdown tables of one run: end to end, and the data path."""
    ok = ok_strategies(result)
    cuda = result["machine"]["device"].startswith("cuda")
    mem_col = "peak device memory" if cuda else "peak RSS in run"
    lines = ["| strategy | samples/s | x padded | x per-sample | text tokens/s | ms/batch | data wait ms | "
             "transfer ms | forward ms | backward ms | optimizer ms | data-wait share | " + mem_col + " |",
             "|" + " --- |" * 13]
    for s, r in result["strategies"].items():
        if s not in ok:
            lines.append(f"| {s} | {r.get('status')} |" + " |" * 11)
            continue
        e, ms, m = r["e2e"], r["step_ms"], r["memory"]
        lines.append(
            f"| {s} | {e['samples_per_s']:.1f} | {_ratio(result, 'padded', s)} | {_ratio(result, 'per-sample', s)} | "
            f"{e['real_tokens_per_s']:.0f} | {e['ms_per_batch']:.0f} | {ms['data_wait']:.1f} | {ms['transfer']:.2f} | "
            f"{ms['forward']:.0f} | {ms['backward']:.0f} | {ms['optimizer']:.0f} | {e['data_wait_share']:.1%} | "
            f"{_mb(m['peak_device_bytes'] if cuda else m['rss_peak_sampled_bytes'])} |")
    syn, sms = result["synthetic"], result["synthetic"]["phases_ms"]
    lines.append(f"| synthetic | {syn['samples_per_s']:.1f} | {_f(result['ratios']['synthetic_vs_padded'], '{:.2f}')}"
                 f" | - | {syn['real_tokens_per_s']:.0f} | {syn['ms_per_batch']:.0f} | - | - | "
                 f"{sms['forward']:.0f} | {sms['backward']:.0f} | {sms['optimizer']:.0f} | - | - |")
    copy_kind = "h2d" if cuda else "host memcpy"
    lines += ["", "| strategy | loader alone samples/s | loader text tokens/s | collate ms/batch | fill (asked) | "
                  "samples/batch (min-max) | tokens/batch (min-max) | real tokens | "
                  "padded tokens | padding | image padding | bytes/batch (as loaded) | copies/batch (as loaded) | "
                  "copies unpacked -> "
                  f"packed | {copy_kind} ms/batch | {copy_kind} GB/s | RSS start -> end |",
              "|" + " --- |" * 17]
    for s, r in ok.items():
        tr, p, m, f = r["transfer"], r["padding"], r["memory"], r["fill"]
        asked = f"{f['asked']['batch_size']} samples" if f["by"] == "samples" else f"{f['asked']['max_tokens']} tokens"
        lines.append(
            f"| {s} | {r['loader']['samples_per_s']:.0f} | {r['loader']['real_tokens_per_s']:.0f} | "
            f"{r['collate']['ms_per_batch']:.2f} | {f['fill']:.1%} ({asked}) | "
            f"{f['samples']['mean']:.1f} ({f['samples']['min']:g}-{f['samples']['max']:g}) | "
            f"{f['tokens']['mean']:.0f} ({f['tokens']['min']:g}-{f['tokens']['max']:g}) | "
            f"{p['real_tokens']} | {p['padded_tokens']} | "
            f"{p['padding_fraction']:.1%} | {_f(p.get('image_padding_fraction'), '{:.1%}')} | "
            f"{_kb(tr['as_loaded']['bytes_per_batch'])} | "
            f"{tr['as_loaded']['copies_per_batch']:.1f}{' (packed)' if tr['as_loaded']['packed'] else ''} | "
            f"{tr['unpacked']['copies_per_batch']:.1f} -> {tr['packed']['copies_per_batch']:.0f} | "
            f"{tr['ms_per_batch']:.3f} | {tr['GBps']:.2f} | {_mb(m['rss_start_bytes'])} -> {_mb(m['rss_end_bytes'])} |")
    peer = result.get("peer")
    if peer:
        def per_round(key: str, fmt: str) -> str:
            return ", ".join(fmt.format(r[key]) for r in peer["rounds"])

        lines += ["", "| loader alone, same shards, workers and batch | samples/s (the median round) | per round |",
                  "| --- | --- | --- |",
                  f"| webdataset peer (PIL, HF tokenizer, tokenizer.pad) | {peer['peer_samples_per_s']:.0f} | "
                  f"{per_round('peer_samples_per_s', '{:.0f}')} |",
                  f"| mmload {peer['strategy']} | {peer['mmload_samples_per_s']:.0f} | "
                  f"{per_round('mmload_samples_per_s', '{:.0f}')} |",
                  f"| ratio | {peer['ratio']:.2f}x | {per_round('ratio', '{:.2f}')} |"]
    return "\n".join(lines)


def _ratio(result: dict[str, Any], versus: str, strategy: str) -> str:
    """``1.32 (1.25-1.40)`` from the run's per-round ratios; ``flagged`` when they spread over the limit."""
    if strategy == versus:
        return "1"
    return _rounds_ratio(result["ratios"].get("per_round", {}).get(f"end to end, x {versus}", {}).get(strategy))


def _rounds_ratio(v: dict[str, Any] | None) -> str:
    if v is None:
        return "-"
    return f"{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f}){' flagged' if v['flagged'] else ''}"


def native_table(result: dict[str, Any]) -> list[str]:
    """The square run's section at native resolution (``--native-rounds``): what each strategy pays for images
    of several sizes, and a sentence that reads it."""
    n = result.get("native")
    if not n:
        return []
    steps = {s: r["e2e"]["steps"] for s, r in n["strategies"].items()}
    measured = ", ".join(f"{s} {k}" for s, k in steps.items())
    lines = ["", "### Images at native resolution (a section of this run)", "",
             f"The same data with each image on its own grid (aspect ratio kept, at most {n['max_patches']} patches "
             f"of {n['patch_size']} pixels, the square grid's), every strategy's training steps in {n['rounds']} "
             f"rounds after {n['warmup']} warm-up (measured steps: {measured}). *Image padding* is padded image "
             "positions (patches and class tokens) over all image positions of the batches: encoder work spent on "
             "nothing.", "",
             "| strategy | image padding | text padding | image tokens/batch (real) | bytes/batch (as loaded) | "
             "copies/batch | samples/s | x padded (rounds min-max) |", "|" + " --- |" * 8]
    for s, r in n["strategies"].items():
        p, t = r["padding"], r["as_loaded"]
        lines.append(f"| {s} | {p['image_padding_fraction']:.1%} | {p['padding_fraction']:.1%} | "
                     f"{p['image_tokens'] / r['e2e']['steps']:.0f} | {_kb(t['bytes_per_batch'])} | "
                     f"{t['copies_per_batch']:.1f} | {r['e2e']['samples_per_s']:.1f} | "
                     f"{'1' if s == REFERENCE else _rounds_ratio(n['x_padded'].get(s))} |")
    for s, why in n["skipped"].items():
        lines.append(f"| {s} | skipped: {why} |" + " |" * 6)
    ok = n["strategies"]
    if REFERENCE in ok:
        pad = ok[REFERENCE]["padding"]["image_padding_fraction"]
        free = [s for s, r in ok.items() if r["padding"]["padded_image_tokens"] == 0 and s != REFERENCE]
        said = f"{REFERENCE.capitalize()} spent {pad:.0%} of its image positions on padding"
        if free:
            said += (f"; {', '.join(free)} none, moving "
                     + ", ".join(f"{_kb(ok[s]['as_loaded']['bytes_per_batch'])} ({s})" for s in free)
                     + f" a batch against {REFERENCE}'s {_kb(ok[REFERENCE]['as_loaded']['bytes_per_batch'])}, at "
                     + ", ".join(f"{n['x_padded'][s]['median']:.2f}x ({s})" for s in free if s in n["x_padded"])
                     + " its samples/s")
        lines += ["", said + "."]
    return lines


def reading(result: dict[str, Any]) -> str:
    """One paragraph that reads the run's numbers, every figure taken from ``result``."""
    ok = ok_strategies(result)
    c, m = result["config"], result["machine"]
    cuda = m["device"].startswith("cuda")
    if not ok:
        return "No strategy ran to completion in this run; see the statuses in the table."
    sps = {s: r["e2e"]["samples_per_s"] for s, r in ok.items()}
    best = max(sps, key=sps.get)
    syn = result["synthetic"]
    out = [f"On {m['name']} ({m['device']}, {c['preset']} preset, batch {c['batch_size']}, "
           f"{_n(c['workers'], 'loader worker')}, {_n(result['threads'], 'compute thread')}), {best} was the fastest "
           f"strategy end to end at "
           f"{sps[best]:.1f} samples/s"]
    ref, slow = REFERENCE, BASELINES[-1]  # the baseline every user starts from, and the slow one
    if ref in sps and best != ref:
        out[-1] += f" ({sps[best] / sps[ref]:.2f}x {ref})"
    if slow in sps and best != slow:
        out[-1] += f"; {slow} ran at {sps[slow]:.1f} samples/s, {sps[best] / sps[slow]:.1f}x below"
    out[-1] += "."
    shares = {s: r["e2e"]["data_wait_share"] for s, r in ok.items()}
    hi = max(shares, key=shares.get)
    out.append(f"Data wait took {min(shares.values()):.1%} to {shares[hi]:.1%} of the step (most: {hi})"
               + (f", so the loader starved {hi}" if shares[hi] > 0.1 else "") + ".")
    if ref in sps:
        gap = 1 - sps[ref] / syn["samples_per_s"]
        out.append(f"The synthetic baseline ({ref}'s own batches, already on the device, no loader) ran at "
                   f"{syn['samples_per_s']:.1f} samples/s, so the data path cost {ref} {gap:.0%} of its upper bound"
                   if gap > 0 else f"The synthetic baseline ran at {syn['samples_per_s']:.1f} samples/s, no faster "
                   f"than {ref} through its loader, so the data path did not limit {ref}")
        compute = {k: sum(v[p] for p in ("forward", "backward", "optimizer")) for k, v in
                   (("loop", ok[ref]["step_ms"]), ("synthetic", syn["phases_ms"]))}
        if gap > 0 and compute["loop"] > 1.1 * compute["synthetic"]:
            out[-1] += (f"; little of it was waiting: the same batches' compute took {compute['loop']:.0f} ms in the "
                        f"loader run against {compute['synthetic']:.0f} ms in the synthetic one; "
                        f"{_n(c['workers'], 'loader worker')} and {_n(result['threads'], 'compute thread')} share "
                        f"{_n(m['cpu_count'], 'core')} (with whatever else runs on the machine), so the loader's work "
                        f"likely shows up as slower compute")
        out[-1] += "."
    promised = {metric: [s for s in REGISTRY.values() if s.name in ok and any(t.metric == metric for t in s.targets)]
                for metric in ("padded_tokens", "padding_fraction", "transfer_fraction")}
    for strategy in promised["padded_tokens"]:  # the strategies that promise no padding at all
        if ref not in ok:
            break
        name = strategy.name
        compute = {s: sum(ok[s]["step_ms"][p] for p in ("forward", "backward", "optimizer")) for s in (name, ref)}
        pf = ok[ref]["padding"]["padding_fraction"]
        verdict = ("its jagged kernels cost more than the padding they remove" if compute[name] > compute[ref]
                   else "removing the padding paid for its jagged kernels")
        out.append(f"{ref.capitalize()} wasted {pf:.0%} of its text tokens on padding, {name} "
                   f"{ok[name]['padding']['padded_tokens']} tokens; {name}'s compute (forward+backward+optimizer) "
                   f"took {compute[name]:.0f} ms per batch against {ref}'s {compute[ref]:.0f} ms, so here {verdict}.")
    for strategy in promised["padding_fraction"]:
        out.append(f"{strategy.name.capitalize()} cut padding to "
                   f"{ok[strategy.name]['padding']['padding_fraction']:.1%}.")
    for strategy in promised["transfer_fraction"] if cuda else ():
        tr = ok[strategy.name]["transfer"]
        out.append(f"{strategy.name.capitalize()} moved {_kb(tr['as_loaded']['bytes_per_batch'])} per batch in "
                   f"{tr['as_loaded']['copies_per_batch']:g} copies at {tr['GBps']:.1f} GB/s, "
                   f"{tr['fraction_of_reference']:.0%} of a pinned memcpy of the same size on this GPU "
                   f"({tr['copy_time']['same_size_reference']['GBps']:.1f} GB/s; large-copy peak "
                   f"{result['reference_bandwidth']['GBps']:.1f} GB/s).")
    if not cuda:
        out.append("There is no host-to-device copy on the CPU: the transfer column is the hand-over of the batch "
                   "(views, no copy) and the copy times are host memcpy stand-ins, so the bandwidth target needs a "
                   "CUDA run.")
    growth = {s: (r["memory"]["rss_end_bytes"] - r["memory"]["rss_start_bytes"]) / 2**20 for s, r in ok.items()}
    late = {s: (r["per_step"][-1]["rss_bytes"] - r["per_step"][len(r["per_step"]) * 2 // 3]["rss_bytes"]) / 2**20
            for s, r in ok.items()}
    worst, worst_late = max(growth, key=lambda s: abs(growth[s])), max(late, key=lambda s: abs(late[s]))
    out.append(f"Process RSS moved by at most {growth[worst]:+.0f} MiB over a strategy's measured steps ({worst}) "
               f"and by at most {late[worst_late]:+.0f} MiB over the last third of them ({worst_late}).")
    if result.get("freeze"):
        fz = result["freeze"]
        out.append(f"Frozen training took {fz['ratio']:.2f}x the compute time of full training per sample "
                   f"(padded batches, the two interleaved step by step; the seed paper: {fz['paper']['ratio']:.2f}).")
    loads = [r["e2e"]["load1_mean"] for r in ok.values()] + [result["load_average"]["start"][0],
                                                             result["load_average"]["end"][0]]
    own = result["threads"] + c["workers"]  # the most this benchmark keeps busy
    out.append(f"During the run the machine's 1-minute load average was {min(loads):.1f} to {max(loads):.1f} on "
               f"{_n(m['cpu_count'], 'core')}, this benchmark accounting for at most {own}"
               + (", so other processes competed for the CPU throughout and the rates here are lower and noisier "
                  "than on an idle machine" if min(loads) > own else "")
               + f"; the synthetic baseline's rounds spread {syn['drift']:.0%}.")
    return " ".join(out)


def section(result: dict[str, Any]) -> str:
    c, m = result["config"], result["machine"]
    fz = result.get("freeze")
    lines = [
        f"## {m['label']}: {m['name']}" + (f", batches of --max-tokens {c['max_tokens']}" if c.get("max_tokens")
                                            else "")
        + (", images at native resolution (at most " + (f"{c['max_patches']} patches)" if c.get("max_patches")
                                                         else "the square grid's patches)")
           if c.get("resolution") == "native" else ""),
        "",
        f"Run `{result['run']}` on {result['date']}: commit {_commit(result)}, torch {m['torch']}, "
        f"{m['cpu_count']} CPUs, {_n(result['threads'], 'compute thread')}; {c['preset']} preset, batch "
        f"{c['batch_size']}" + (f" (padded, bucketed, nested: --max-tokens {c['max_tokens']})" if c.get("max_tokens")
                                else "") + f", {_n(c['workers'], 'loader worker')}, {c['steps']} measured steps "
        f"after {c['warmup']} warm-up (per-sample: {c['per_sample_steps']}) in {c.get('rounds', 1)} rounds, "
        f"data {', '.join(c['data'])}{' (--quick)' if c['quick'] else ''}; "
        f"took {result['duration_s']:.0f} s. Figures: `{result['files']['json']}`.",
        "",
        table_text(result),
        "",
        f"![time per batch and samples/s per strategy]({result['files']['png']})",
        "",
        reading(result),
        "",
        "### Targets",
        "",
        "| target | status | value | why |",
        "| --- | --- | --- | --- |",
    ]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['status']} | {t['value'] or '-'} | {t['reason'] or '-'} |")
    if fz:
        lines += ["", "### Freeze modes (padded)", "", f"How: {fz['how']}.", "",
                  "| mode | s per 1000 samples | s per epoch | trainable parameters |", "| --- | --- | --- | --- |"]
        for mode in ("full", "frozen"):
            f = fz[mode]
            lines.append(f"| {mode} | {f['s_per_1000_samples']:.2f} | {_f(f['s_per_epoch'], '{:.1f}')} "
                         f"({f['epoch_samples'] or '?'} samples) | {f['trainable_params']:,} |")
        lines.append(f"| frozen / full | {fz['ratio']:.2f} | paper: {fz['paper']['frozen_s_per_epoch']} / "
                     f"{fz['paper']['full_s_per_epoch']} s = {fz['paper']['ratio']} | |")
    lines += native_table(result) + spreads_table(result) + ceiling_section(result) + sweep_table(result)
    if result.get("reliability"):
        lines += reliability_section(result)
    ref = result["reference_bandwidth"]
    lines += ["", f"Reference copy bandwidth: {ref['kind']}, {ref['bytes'] / 2**20:.0f} MiB in {ref['ms']:.2f} ms = "
                  f"{ref['GBps']:.1f} GB/s."]
    if result.get("profile_dir"):
        lines += ["", f"Profiler traces: `{result['profile_dir']}` (`tensorboard --logdir "
                      f"{Path(result['profile_dir']).parent}`)."]
    return "\n".join(lines)


def load_results(folder: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            r = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(r, dict) and {"run", "strategies", "machine", "date"} <= r.keys():
            out.append(r)
    return out


def newest_per_device(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest run per device, batching (``--batch-size`` or ``--max-tokens``) and resolution."""
    newest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in results:
        c = r.get("config", {})
        key = (r["machine"]["label"], "tokens" if c.get("max_tokens") else "samples", c.get("resolution", "square"))
        if key not in newest or r["date"] > newest[key]["date"]:
            newest[key] = r
    return [newest[k] for k in sorted(newest)]


def write_readme(folder: Path) -> None:
    every = load_results(folder)
    runs = newest_per_device(every)
    older = len(every) - len(runs)
    parts = [
        "# Throughput results",
        "",
        "Generated by `python bench/throughput.py` (see `--help`); do not edit: every number and sentence below is "
        "made from the JSON files in this folder. Only the newest run per device is shown"
        + (f"; {older} older run file(s) stay beside it." if older else "."),
        "",
        "Columns: *samples/s* and *text tokens/s* are end to end (loader, copy, forward, backward, optimizer) over "
        "the measured steps; *ms/batch* is wall time per step split into phases (means; the device is synchronized "
        "before every clock read on CUDA); *data-wait share* is data wait over the step; *x padded* compares "
        "samples/s within the run, as the median of per-round ratios (strategies run in rounds of a few steps each, "
        "in a rotating order; the range is the rounds' min-max, *flagged* when it spans more than 10%). The "
        "*synthetic* row is the same step on padded's own batches, moved to the device "
        "before timing: padded's upper bound without a loader. *Loader alone* is the DataLoader with no model; "
        "*collate* times the collator on pre-decoded samples; *copies unpacked -> packed* are host-to-device copies "
        "per batch without and with the one-buffer staging (`mmload.staging.pack`) on those same batches, and the "
        "memcpy columns time them (CUDA: host-to-device, with the loader's pinning; CPU: a host memcpy stand-in).",
        "",
    ]
    for r in runs:
        parts += [section(r), ""]
    (folder / "README.md").write_text("\n".join(parts), encoding="utf-8")
