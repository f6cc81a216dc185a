"""Peer comparison (issue 18, item 7): fedpeft vs a plain Flower + PEFT app, same protocol.

The comparison a user would make before adopting fedpeft: the same federated LoRA fine-tuning
run by fedpeft and by the Flower app one would write from Flower's own Hugging Face / PEFT
examples (``examples/quickstart-huggingface``, the FlowerTune template of ``flwr new``), side
by side on one machine, one after the other, each arm in its own process.

Arm ``a``, fedpeft: ``fedpeft.federation.simulation.simulate`` with method=fedlr (LoRA r=32,
alpha=32 on query/value, the head trained), the SemEval protocol (100 clients, 10 per round,
Dirichlet(1), L=64, batch 16, 1 local epoch of AdamW), evaluation after the last round only.

Arm ``b``, the plain app (``plain_app.py``): a ``ClientApp`` whose ``@app.train()``
handler, for EVERY message, loads the pretrained model
(``AutoModelForSequenceClassification.from_pretrained``), wraps it with
``peft.get_peft_model(LoraConfig(r, lora_alpha, target_modules=["query", "value"],
task_type="SEQ_CLS"))``, loads the received arrays with ``set_peft_model_state_dict``, trains
one epoch with AdamW over its shard (a ``DataLoader``, shuffled, ``DataCollatorWithPadding``),
and replies ``ArrayRecord(get_peft_model_state_dict(model))`` + ``num-examples``. The
``ServerApp`` runs Flower's stock ``FedAvg(fraction_train=K/N).start(...)`` with an
``evaluate_fn`` that, after the last round, loads the model + the global arrays and computes
test accuracy with a simple loop. Started with ``flwr.simulation.run_simulation`` on the same
Ray settings as fedpeft (fedpeft's ``backend_config``: the same number of actors and CPUs per
actor, no dashboard, loopback); ``--sim-workers`` (default: what fedpeft's ``sim-workers=auto``
picks on this machine, resolved once) sets the actors for both arms.

What is held equal, for a fair comparison: the model file, the data (the plain app's shards are
built with fedpeft's own task, tokenisation and ``dirichlet_partition``, same seed and alpha,
so client k holds the same sentences, tokenised identically, in both arms), batch size, lr,
epochs, max length, AdamW (weight decay 0) with gradient clipping at 1.0 (fedpeft's
``max-grad-norm``; also Hugging Face Trainer's default, which the FlowerTune template uses),
dynamic padding, precision (``--precision``), the number of clients sampled per round, the test
set. What differs, by design: the plain app builds its model for every message, as the
examples do; which K clients a round samples (Flower samples with Python's ``random``, seeded
here; fedpeft with its own seeded sampler) and the LoRA init (PEFT's default vs fedpeft's
Gaussian A), so accuracies should be in the same range, not equal. Like the examples' cached
``FederatedDataset`` (``fds = None`` in their ``task.py``), the plain app keeps the tokenised
data in its process between messages: only the model is rebuilt per message.

Measured per arm: seconds per round, excluding the final evaluation (fedpeft:
``seconds - seconds-eval`` of each line of its rounds.jsonl, which leaves out the run log and
checkpoint writes after each round, milliseconds for 302k parameters: the JSON also has the
time between rounds, ``seconds-between-callbacks``, to check that; plain app: time between the calls
of FedAvg's ``evaluate_fn``, which ``FedAvg.start`` makes before round 1 and after every round,
taken when the call starts, so the last round's evaluation is left out as well); the
evaluation's seconds; the clients' summed local training and handler seconds (model building
included for the plain app); total wall seconds of the arm's process; peak RSS summed over the
process tree and the Ray cluster it starts (``benchmarks/memory.py``'s ``tree_rss``, sampled
every 0.2 s); final test accuracy. The arms run one after the other (``--arms b,a`` reverses
the order): on a machine that is not quiet, the load changes between them and so do the times.

    .venv/bin/python benchmarks/peer.py                          # the full protocol, both arms
    .venv/bin/python benchmarks/tables.py peer                   # its table for BENCHMARKS.md
    .venv/bin/python benchmarks/peer.py --rounds 2 --num-clients 10 --clients-per-round 2 \\
        --max-train-samples 200 --max-test-samples 64 --out /tmp/peer-smoke.json   # smoke run
"""

from __future__ import annotations

if __name__ == "__main__":  # run everything inside module ``peer``, which Ray workers import
    import sys

    import peer  # noqa: F401  (benchmarks/ is sys.path[0] when run as a script)

    sys.exit(peer.main())

from fedpeft import offline  # noqa: E402

offline.apply()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from plain_app import run_plain  # noqa: E402  (benchmarks/ is sys.path[0])


HERE = Path(__file__).resolve().parent
ARMS = {"a": "fedpeft", "b": "plain"}


# --- the run configuration both arms share ---------------------------------------------------

def overrides(args: argparse.Namespace) -> list[str]:
    """fedpeft settings of the protocol; the plain app reads the same RunConfig."""
    items = [
        "task=semeval", "method=fedlr", "model=all-MiniLM-L6-v2", "lora-rank=32",
        "lora-alpha=32", "lora-dropout=0", "target-modules=query,value", "alpha=1",
        f"seed={args.seed}", f"num-clients={args.num_clients}",
        f"clients-per-round={args.clients_per_round}", f"rounds={args.rounds}",
        f"lr={args.lr}", "batch-size=16", "local-epochs=1", "weight-decay=0",
        "max-grad-norm=1", "max-length=64", f"eval-every={args.rounds}",
        "eval-batch-size=64", f"precision={args.precision}", "device=cpu", "progress=false",
    ]
    if args.max_train_samples:
        items.append(f"max-train-samples={args.max_train_samples}")
    if args.max_test_samples:
        items.append(f"max-test-samples={args.max_test_samples}")
    return items


def sim_workers(cfg: Any, asked: str) -> int:
    """Ray actors for both arms: ``--sim-workers``, or what fedpeft's ``sim-workers=auto``
    resolves to on this machine, fixed once here (it depends on the free memory)."""
    if asked != "auto":
        return int(asked)
    try:
        from fedpeft.federation.resources import plan_resources
    except ImportError:  # a fedpeft without sim-workers=auto
        return 1
    return plan_resources(cfg).workers


def load_cfg(items: list[str]) -> Any:
    from fedpeft.config import load_config

    return load_config(None, items)


# --- arm a: fedpeft ----------------------------------------------------------------------------

def run_fedpeft(cfg: Any, workdir: Path) -> dict[str, Any]:
    from fedpeft.config import load_config
    from fedpeft.federation.simulation import simulate
    from fedpeft.runlog import read_rounds

    run_cfg = load_config(None, [f"out={workdir / 'fedpeft-run'}"], base=cfg)
    stamps: list[float] = []  # when each round's record is out (after its checkpoint)
    start = time.perf_counter()
    summary = simulate(run_cfg, overwrite=True, on_round=lambda _: stamps.append(
        time.perf_counter()))
    seconds = time.perf_counter() - start
    rounds = []
    for i, r in enumerate(read_rounds(run_cfg.run_dir())):
        rounds.append({
            "round": r["round"], "seconds": r["seconds"] - r["seconds-eval"],
            "seconds-with-eval": r["seconds"], "seconds-eval": r["seconds-eval"],
            # cross-check, rounds 2..: time between the rounds' callbacks, less evaluation
            # (includes what ``seconds`` leaves out: the run log and checkpoint writes)
            "seconds-between-callbacks": stamps[i] - stamps[i - 1] - r["seconds-eval"]
            if 0 < i < len(stamps) else None,
            "seconds-clients": r["seconds-clients"], "seconds-handlers": r["seconds-handlers"],
            "clients": len(r["clients"]), "successes": r["successes"],
            "train-loss": r["train-loss"]})
    return {"rounds": rounds, "accuracy": summary["final"].get("accuracy"),
            "seconds-in-process": seconds, "trainable-params": summary["trainable-params"],
            "bytes-per-client-round": summary["bytes-per-client-round"]}


# --- arm b: the plain Flower + PEFT app (plain_app.py) ---------------------------------------

# --- one arm in this process (the driver that the parent samples) -----------------------------

def worker(arm: str, spec: Path, result: Path) -> int:
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])  # Ray workers import peer
    cfg = load_cfg(json.loads(spec.read_text())["overrides"])
    import torch

    if arm == "a":
        with tempfile.TemporaryDirectory() as tmp:
            row = run_fedpeft(cfg, Path(tmp))
    else:
        row = run_plain(cfg)
    row["driver-threads"] = torch.get_num_threads()
    try:
        from fedpeft.federation.resources import plan_resources

        plan = plan_resources(cfg)
        row["ray-plan"] = {"workers": plan.workers, "cpus-per-worker": plan.cpus,
                           "threads-per-worker": plan.threads}
    except ImportError:
        pass
    result.write_text(json.dumps(row) + "\n")
    return 0


# --- the parent: both arms, one after the other -----------------------------------------------

def run_arm(arm: str, spec: Path, tmp: Path) -> dict[str, Any]:
    import psutil
    from memory import tree_rss  # benchmarks/memory.py's sampler

    result, log = tmp / f"{arm}.json", tmp / f"{arm}.log"
    cmd = [sys.executable, str(HERE / "peer.py"), "--worker", arm, "--spec", str(spec),
           "--result", str(result)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start, peak, samples = time.perf_counter(), 0, 0
    with open(log, "w") as stream:
        proc = subprocess.Popen(cmd, stdout=stream, stderr=subprocess.STDOUT, env=env)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, tree_rss(root))
                samples += 1
            except psutil.Error:
                pass
            time.sleep(0.2)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not result.exists():
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"arm {arm} ({ARMS[arm]}) failed (exit {proc.returncode}):\n{tail}")
    row = json.loads(result.read_text())
    seconds = [r["seconds"] for r in row["rounds"]]
    row.update({
        "arm": ARMS[arm], "total-seconds": wall, "peak-rss-mb": peak / 2**20,
        "rss-samples": samples, "seconds-per-round-median": statistics.median(seconds),
        "seconds-per-round-mean": statistics.fmean(seconds),
        "seconds-per-round-mean-from-2": statistics.fmean(seconds[1:]) if seconds[1:] else None,
        "seconds-eval": sum(r["seconds-eval"] for r in row["rounds"]),
    })
    return row


def machine() -> dict[str, Any]:
    import psutil

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("torch", "transformers", "peft", "flwr", "ray", "fedpeft"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu-count": os.cpu_count(), "cpu-affinity": len(os.sched_getaffinity(0)),
            "cpu-model": model, "memory-gb": psutil.virtual_memory().total / 2**30,
            "platform": platform.platform(), "python": platform.python_version(),
            "load-average-at-start": os.getloadavg(), "versions": versions}


RATIO_KEYS = ("seconds-per-round-median", "seconds-per-round-mean", "total-seconds",
              "peak-rss-mb")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--num-clients", type=int, default=100)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sim-workers", default="auto",
                        help="Ray actors, both arms (auto = fedpeft's choice for this machine)")
    parser.add_argument("--arms", default="both",
                        help="a (fedpeft), b (plain app), a,b = both, or b,a (in that order)")
    parser.add_argument("--max-train-samples", type=int, default=0, help="0 = all (smoke runs)")
    parser.add_argument("--max-test-samples", type=int, default=0, help="0 = all (smoke runs)")
    parser.add_argument("--out", default=str(HERE / "results" / "peer.json"))
    parser.add_argument("--worker", choices=tuple(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        return worker(args.worker, args.spec, args.result)
    arms = ["a", "b"] if args.arms == "both" else args.arms.split(",")  # run in this order
    if not arms or any(a not in ARMS for a in arms) or len(set(arms)) < len(arms):
        raise SystemExit(f"--arms: expected a, b, a,b, b,a or both, got {args.arms!r}")
    items = overrides(args)
    workers = sim_workers(load_cfg(items), args.sim_workers)  # bad settings fail here
    items.append(f"sim-workers={workers}")
    info = machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedpeft-peer-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"overrides": items}))
        for arm in arms:
            print(f"arm {arm} ({ARMS[arm]}) ...", file=sys.stderr, flush=True)
            row = run_arm(arm, spec, Path(tmp))
            print(f"arm {arm} ({ARMS[arm]}): {row['total-seconds']:.0f} s, rounds "
                  + ", ".join(f"{r['seconds']:.1f}" for r in row["rounds"]),
                  file=sys.stderr, flush=True)
            rows.append(row)
    by_arm = {r["arm"]: r for r in rows}
    ratios = ({k: by_arm["plain"][k] / by_arm["fedpeft"][k] for k in RATIO_KEYS}
              if len(by_arm) == 2 else None)
    result = {"command": shlex.join(["python", *sys.argv]), "settings": items, "machine": info,
              "arms": rows, "ratios-plain-over-fedpeft": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    from tables import peer as peer_table  # benchmarks/tables.py: the table of BENCHMARKS.md

    print("\n".join(peer_table(str(Path(args.out).resolve()))))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
