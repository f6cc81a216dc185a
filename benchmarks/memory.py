"""Peak memory (RSS summed over the process tree: driver, Ray, actors) of a simulation with
many clients vs one client, same method and model.

    .venv/bin/python benchmarks/memory.py --methods fedlr,federa,fedft \\
        --out benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def tree_rss(root: psutil.Process) -> int:
    """Resident memory of ``root``, its descendants and the Ray cluster it started: Ray's raylet
    and GCS are re-parented, so they are found by their session folder, which ends with the
    driver's pid (``.../session_<date>_<pid>/``); Ray's workers and actors are the raylet's
    children. Other Ray clusters on the machine are not counted."""
    procs = [root, *root.children(recursive=True)]
    marker = f"_{root.pid}/"
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd and ("raylet" in cmd or "gcs_server" in cmd):
            with contextlib.suppress(psutil.Error):
                procs += [p, *p.children(recursive=True)]
    total, seen = 0, set()
    for p in procs:
        if p.pid in seen:
            continue
        seen.add(p.pid)
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def peak_rss(args: list[str]) -> tuple[int, float]:
    proc = subprocess.Popen([sys.executable, "-m", "fedpeft.cli", "run", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root, peak, start = psutil.Process(proc.pid), 0, time.perf_counter()
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, tree_rss(root))
        time.sleep(0.2)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.read().decode()[-2000:])
    return peak, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="fedlr,federa,fedft")
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument("--sim-workers", default="1", help="simulation workers of both runs "
                        "(default 1: the 1-client run has one; each worker holds a model)")
    args = parser.parse_args()
    results = []
    for method in args.methods.split(","):
        row = {"method": method, "sim-workers": args.sim_workers}
        for clients, per_round in ((1, 1), (100, 10)):
            with tempfile.TemporaryDirectory() as tmp:
                peak, seconds = peak_rss([
                    f"method={method}", f"num-clients={clients}",
                    f"clients-per-round={per_round}", "rounds=2", "max-train-samples=800",
                    "max-test-samples=64", "progress=false", f"threads={args.threads}",
                    f"sim-workers={args.sim_workers}",
                    f"out={tmp}/run"])
            row[f"peak-rss-mb-{clients}-clients"] = peak / 2**20
            row[f"seconds-{clients}-clients"] = seconds
        row["ratio"] = row["peak-rss-mb-100-clients"] / row["peak-rss-mb-1-clients"]
        print(json.dumps(row), flush=True)
        results.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
