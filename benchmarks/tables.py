"""Markdown tables of BENCHMARKS.md from the result files in benchmarks/results/ (no number is
typed by hand): ``.venv/bin/python benchmarks/tables.py
[throughput|memory|precision|defaults|grouping|roofline|REPORT]``,
or ``... tables.py peer [FILE]`` (default ``peer.json``); ``throughput``, ``memory``,
``precision`` and ``defaults`` also take result files (in benchmarks/results/) to tabulate.

``REPORT`` is a path to a ``fedpeft report`` REPORT.md: its first table (the per-method table),
or the first after a line containing a second argument, is printed as is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def throughput(*names: str) -> list[str]:
    lines = ["| task:L | method | bare samples/s | local_train | federated | ratio "
             "| round seconds |",
             "|---|---|---:|---:|---:|---:|---|"]
    for name in names or ("throughput-main.json", "throughput-fedft-semeval-5rounds.json"):
        for r in json.loads((RESULTS / name).read_text()):
            label = r["method"] + (f" ({len(r['round-seconds'])} rounds)" if "5rounds" in name
                                   else "")
            lines.append(f"| {r['task']}:{r['max-length']} | {label} | "
                         f"{r['bare-samples-per-s']:.1f} | {r['local-train-samples-per-s']:.1f} | "
                         f"{r['federated-samples-per-s']:.1f} | {r['ratio']:.2f} | "
                         + ", ".join(f"{s:.1f}" for s in r["round-seconds"]) + " |")
    return lines


def memory(name: str = "memory.json") -> list[str]:
    lines = []
    for r in json.loads((RESULTS / name).read_text()):
        lines.append(f"| {r['method']} | {r['peak-rss-mb-1-clients']:,.0f} | "
                     f"{r['peak-rss-mb-100-clients']:,.0f} | {r['ratio']:.2f} |")
    return lines


def precision(name: str = "precision.json") -> list[str]:
    lines = ["| task:L | method | threads | fp32 samples/s | bf16 samples/s | speed-up |",
             "|---|---|---:|---:|---:|---:|"]
    for r in json.loads((RESULTS / name).read_text()):
        lines.append(f"| {r['task']}:{r['max-length']} | {r['method']} | {r['threads']} | "
                     f"{r['fp32-samples-per-s']:.1f} | {r['bf16-samples-per-s']:.1f} | "
                     f"{r['speed-up']:.2f} |")
    return lines


def defaults(name: str = "defaults.json") -> list[str]:
    """What the defaults buy (``benchmarks/defaults.py``): training and evaluation speed of
    ``precision=auto`` against fp32, and ``sim-workers=auto`` against one worker per core."""
    rows = json.loads((RESULTS / name).read_text())
    lines = ["| part | arm | baseline | default | baseline figure | default figure | speed-up |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        if r["part"] == "training":
            lines.append(f"| training samples/s | {r['method']} ({r['threads']} threads) | fp32 | "
                         f"auto (= {r['auto-resolves-to']}) | {r['fp32-samples-per-s']:.1f} | "
                         f"{r['default-samples-per-s']:.1f} | {r['speed-up']:.2f} |")
        elif r["part"] == "evaluation":
            what = (f"{r['sentences']:,} test sentences, batch {r['eval-batch-size']} "
                    f"({r['threads']} threads)")
            lines.append(f"| seconds per evaluation | {what} | fp32, file order | "
                         f"fp32, length-sorted | {r['before-seconds']:.1f} | "
                         f"{r['sorted-fp32-seconds']:.1f} | "
                         f"{r['before-seconds'] / r['sorted-fp32-seconds']:.2f} |")
            lines.append(f"| seconds per evaluation | {what} | fp32, file order | "
                         f"auto (= {r['auto-resolves-to']}), length-sorted | "
                         f"{r['before-seconds']:.1f} | {r['now-seconds']:.1f} | "
                         f"{r['speed-up']:.2f} |")
        else:  # the arm sim-workers=auto chose when measured vs one single-threaded worker per core
            lines.append(f"| seconds per round | federa, 10 clients x 80 per round | "
                         f"{r['auto']} (auto then) | {r['per-core']} (auto now) | "
                         f"{r['auto-seconds-per-round']:.1f} | "
                         f"{r['per-core-seconds-per-round']:.1f} | "
                         f"{r['auto-seconds-per-round'] / r['per-core-seconds-per-round']:.2f} |")
    return lines


def grouping(name: str = "grouping.json") -> list[str]:
    """Random vs length-grouped local batches (``benchmarks/grouping.py``)."""
    lines = ["| client shard | threads | precision | padded tokens random | grouped | "
             "samples/s random | grouped | speed-up |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in json.loads((RESULTS / name).read_text()):
        lines.append(f"| {r['task']} client {r['client']} ({r['rows']} rows, batch "
                     f"{r['batch-size']}, {r['real-tokens']:,} real tokens) | {r['threads']} | "
                     f"{r['precision']} | {r['random-padded-tokens']:,} | "
                     f"{r['grouped-padded-tokens']:,} | {r['random-samples-per-s']:.1f} | "
                     f"{r['grouped-samples-per-s']:.1f} | {r['speed-up']:.2f} |")
    return lines


def roofline(name: str = "roofline.json") -> list[str]:
    """One local pass against the core's matmul peak (``benchmarks/roofline.py``)."""
    lines = ["| client shard | threads | precision | GFLOP / pass | s / pass | GFLOP/s | "
             "matmul peak GFLOP/s | share of peak | floor s / pass |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in json.loads((RESULTS / name).read_text()):
        lines.append(f"| {r['task']} client {r['client']} ({r['rows']} rows, batch "
                     f"{r['batch-size']}, {r['method']}) | {r['threads']} | {r['precision']} | "
                     f"{r['gflop-per-pass']:,.0f} | {r['seconds-per-pass']:.1f} | "
                     f"{r['achieved-gflops']:.1f} | {r['peak-gflops']:.1f} | "
                     f"{r['fraction-of-peak']:.0%} | {r['floor-seconds-per-pass']:.1f} |")
    return lines


def peer(name: str = "peer.json") -> list[str]:
    """Section 9: fedpeft vs a plain Flower + PEFT app (``benchmarks/peer.py``); ``name`` is a
    file in benchmarks/results/ or a path."""
    path = Path(name) if Path(name).exists() else RESULTS / name
    data = json.loads(path.read_text())
    lines = ["| arm | s/round median | s/round mean | total s | peak RSS MB | final accuracy |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in data["arms"]:
        accuracy = "" if r.get("accuracy") is None else f"{r['accuracy']:.4f}"
        lines.append(f"| {r['arm']} | {r['seconds-per-round-median']:.1f} | "
                     f"{r['seconds-per-round-mean']:.1f} | {r['total-seconds']:.0f} | "
                     f"{r['peak-rss-mb']:,.0f} | {accuracy} |")
    ratios = data.get("ratios-plain-over-fedpeft")
    if ratios:
        lines.append(f"| plain / fedpeft | {ratios['seconds-per-round-median']:.2f}x | "
                     f"{ratios['seconds-per-round-mean']:.2f}x | {ratios['total-seconds']:.2f}x | "
                     f"{ratios['peak-rss-mb']:.2f}x | |")
    return lines


def report_table(path: Path, heading: str = "") -> list[str]:
    """The first table of ``path`` after the first line containing ``heading``."""
    lines, started, found = [], False, not heading
    for line in path.read_text().splitlines():
        found = found or heading in line
        if found and line.startswith("|"):
            started = True
            lines.append(line)
        elif started:
            break
    return lines


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "throughput"
    tables = {"throughput": throughput, "precision": precision, "defaults": defaults,
              "grouping": grouping, "roofline": roofline}
    if what in tables:
        out = tables[what](*sys.argv[2:])
    elif what.startswith("memory"):
        out = memory(*(sys.argv[2:3]))
    elif what == "peer":
        out = peer(*(sys.argv[2:3]))
    else:
        out = report_table(Path(what), *(sys.argv[2:3]))
    print("\n".join(out))


if __name__ == "__main__":
    main()
