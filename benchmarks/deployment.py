"""Seconds per round of one protocol in simulation and in a real Flower deployment, side by side.

Runs the same fedpeft settings (N clients, all of them every round) four ways, one after the
other in this one invocation, and prints seconds per round and their split:

  sim         ``fedpeft run``: Flower's simulation runtime (one Ray worker, clients in turn)
  warm        ``scripts/deploy_local.sh N``: a SuperLink and N SuperNodes on loopback, each with
              fedpeft's warm worker (federation/worker.py), fedpeft's poll/backoff settings and
              the packed wire format (federation/latency.py, state.py)
  cold        the same with ``FEDPEFT_WORKERS=0``: Flower's process per message
  warm-stock  the warm worker with Flower's own waits and one object per tensor
              (FEDPEFT_SUPERNODE_POLL=3, FEDPEFT_PULL_BACKOFF=1, FEDPEFT_PACK=0): what the
              worker alone gave before this benchmark's changes

Per round (rounds 2.., round 1 loads the model everywhere) from each run's rounds.jsonl:
compute = the clients' train handlers (deployment: the slowest, the nodes train in parallel;
simulation: their sum, one worker trains them in turn) + aggregation + evaluation; transfer =
the round's bytes at this machine's measured loopback throughput; overhead = the rest (polls,
Flower's object store and RPCs, process starts). The ratio round / (compute + transfer) is the
figure of BENCHMARKS.md section 7 (target <= 1.3 for warm).

    .venv/bin/python benchmarks/deployment.py --clients 2 --rounds 5 \\
        --settings "max-train-samples=160 max-test-samples=200" \\
        --out benchmarks/results/deployment
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
MODES = {
    "sim": {},
    "warm": {},
    "cold": {"FEDPEFT_WORKERS": "0"},
    "warm-stock": {"FEDPEFT_SUPERNODE_POLL": "3", "FEDPEFT_PULL_BACKOFF": "1",
                   "FEDPEFT_PACK": "0"},
}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def loopback_bytes_per_second(total: int = 64 << 20) -> float:
    """Throughput of one TCP stream over 127.0.0.1 on this machine, now."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            while conn.recv(1 << 20):
                pass

    thread = threading.Thread(target=sink, daemon=True)
    thread.start()
    block = b"\0" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as client:
        start = time.perf_counter()
        for _ in range(total >> 20):
            client.sendall(block)
    thread.join(timeout=30)
    server.close()
    return total / (time.perf_counter() - start)


def run_mode(mode: str, clients: int, settings: list[str], work: Path, timeout: float) -> Path:
    """Run the protocol one way; return its run folder."""
    out = work / mode / "run"
    (work / mode).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **OFFLINE_ENV, "VENV_BIN": str(VENV_BIN), **MODES[mode]}
    common = [f"num-clients={clients}", f"clients-per-round={clients}", "progress=false",
              *settings]
    if mode == "sim":
        cmd = [str(VENV_BIN / "fedpeft"), "run", *common, f"out={out}"]
    else:
        port, node_port = free_ports(2)
        env.update({"FEDPEFT_DEPLOY_DIR": str(work / mode), "FEDPEFT_OUT": str(out),
                    "FEDPEFT_PORT": str(port), "FEDPEFT_NODE_PORT": str(node_port)})
        cmd = ["bash", str(ROOT / "scripts" / "deploy_local.sh"), str(clients), *settings,
               "progress=false"]
    print(f"[{mode}] {shlex.join(cmd)}", flush=True)
    log = (work / mode / "benchmark.log").open("w")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"[{mode}] timed out after {timeout:.0f} s", flush=True)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        pids = work / mode / "pids"
        for pid in (pids.read_text().split() if pids.exists() else []):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pid), signal.SIGKILL)
        log.close()
    return out


def split(mode: str, run: Path, bandwidth: float) -> dict:
    """Mean seconds per round (rounds 2..) and their split, from a run's rounds.jsonl."""
    path = run if run.suffix == ".jsonl" else run / "rounds.jsonl"
    rounds = [json.loads(line) for line in path.read_text().splitlines()
              if line.strip()] if path.exists() else []
    steady = [r for r in rounds if r["round"] >= 2 and r["successes"]]
    if not steady:
        return {"mode": mode, "error": f"no finished round >= 2 in {run}"}

    def mean(values):
        return statistics.fmean(values)

    if mode == "sim":
        clients = [r["seconds-handlers"] for r in steady]
    else:
        clients = [r.get("seconds-handler-max", r["seconds-client-max"]) for r in steady]
    train = [r["seconds-client-max"] if mode != "sim" else r["seconds-clients"] for r in steady]
    agg = [r["seconds-aggregate"] for r in steady]
    ev = [r["seconds-eval"] for r in steady]
    transfer = [(r["bytes-down"] + r["bytes-up"]) / bandwidth for r in steady]
    total = [r["seconds"] for r in steady]
    compute = [c + a + e for c, a, e in zip(clients, agg, ev, strict=True)]
    ratios = [t / (c + x) for t, c, x in zip(total, compute, transfer, strict=True)]
    # the training phase alone: send, train, reply (evaluation and aggregation left out)
    train_ratios = [(t - a - e) / (c + x) for t, a, e, c, x
                    in zip(total, agg, ev, clients, transfer, strict=True)]
    return {
        "mode": mode, "rounds": [r["round"] for r in steady],
        "round-1-seconds": rounds[0]["seconds"],
        "seconds": mean(total), "seconds-min": min(total), "seconds-max": max(total),
        "local-training": mean(train), "client-handlers": mean(clients),
        "aggregate": mean(agg), "eval": mean(ev), "transfer": mean(transfer),
        "compute": mean(compute),
        "overhead": mean(total) - mean(compute) - mean(transfer),
        "ratio": mean(ratios), "ratio-max": max(ratios),
        "ratio-train-phase": mean(train_ratios),
        "bytes-per-round": mean([r["bytes-down"] + r["bytes-up"] for r in steady]),
    }


def table(rows: list[dict]) -> str:
    head = ("| mode | s / round (min-max) | round 1 | local training | client handlers "
            "(compute) | aggregate + eval | transfer | overhead | round / (compute + transfer) "
            "| training phase / (handlers + transfer) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['error']} |||||||")
            continue
        lines.append(
            f"| {r['mode']} | {r['seconds']:.2f} ({r['seconds-min']:.2f}-{r['seconds-max']:.2f})"
            f" | {r['round-1-seconds']:.1f} | {r['local-training']:.2f} | "
            f"{r['client-handlers']:.2f} | {r['aggregate'] + r['eval']:.2f} | "
            f"{r['transfer'] * 1000:.1f} ms | {r['overhead']:.2f} | {r['ratio']:.2f} "
            f"(max {r['ratio-max']:.2f}) | {r['ratio-train-phase']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settings", default="max-train-samples=160 max-test-samples=200",
                        help="fedpeft key=value settings shared by every mode")
    parser.add_argument("--modes", default="sim,warm,cold,warm-stock")
    parser.add_argument("--out", default=None, help="folder for the JSON, the table and logs")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mode")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    settings = [f"rounds={args.rounds}", *shlex.split(args.settings)]
    work = Path(tempfile.mkdtemp(prefix="fedpeft-bench-deploy-"))
    bandwidth = loopback_bytes_per_second()
    rows = []
    for mode in modes:
        started = time.monotonic()
        run = run_mode(mode, args.clients, settings, work, args.timeout)
        rows.append(split(mode, run, bandwidth) | {"wall-seconds": time.monotonic() - started})
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    load = os.getloadavg()
    result = {"clients": args.clients, "settings": settings, "modes": modes,
              "loopback-bytes-per-second": bandwidth, "cores": os.cpu_count(),
              "load-average-after": load, "work": str(work), "rows": rows}
    print(table(rows))
    print(f"loopback {bandwidth / 1e9:.2f} GB/s; load average after {load[0]:.1f}; logs {work}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "deployment.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "deployment.md").write_text(table(rows) + "\n")
        for mode in modes:
            for name in ("rounds.jsonl", "summary.json"):
                src = work / mode / "run" / name
                if src.exists():
                    (out / f"{mode}-{name}").write_text(src.read_text())




def retable(folder: str) -> None:
    """Rebuild the table of a saved result (``python benchmarks/deployment.py --retable DIR``)."""
    data = json.loads((Path(folder) / "deployment.json").read_text())
    bandwidth = data["loopback-bytes-per-second"]
    rows = [split(m, Path(folder) / f"{m}-rounds.jsonl", bandwidth) for m in data["modes"]]
    print(table(rows))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--retable"]:
        retable(sys.argv[2])
    else:
        main()
