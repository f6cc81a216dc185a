"""What fedpeft's defaults buy on this machine, each measured side by side in one invocation.

1. Training: the default ``precision=auto`` (what it resolves to here is printed) vs fp32,
   steps interleaved over the same batches of SemEval (as ``benchmarks/precision.py``).
2. Evaluation: one pass over SemEval's 2,717 test sentences as fedpeft evaluated before
   (fp32, batches in file order), with length-sorted batches alone (fp32), and now
   (length-sorted, ``precision=auto``), passes interleaved; with the share of test predictions
   on which before and now agree.
3. Simulation workers: ``sim-workers=auto`` (CPU: one worker with every core) vs one worker per
   core (one thread each): federated FeDeRA rounds of the SemEval protocol (10 clients of 80
   per round). A simulation cannot switch workers between rounds, so the two arms run as whole
   runs in ABBA order; seconds per round over rounds 2.. (round 1 includes start-up).

    .venv/bin/python benchmarks/defaults.py --out benchmarks/results/defaults.json
"""

from __future__ import annotations

from fedpeft import offline

offline.apply()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from precision import training_speeds  # noqa: E402  (benchmarks/ is sys.path[0])

from fedpeft.config import load_config  # noqa: E402
from fedpeft.federation.resources import plan_resources  # noqa: E402
from fedpeft.federation.runtime import Runtime, set_threads  # noqa: E402
from fedpeft.runlog import read_rounds  # noqa: E402
from fedpeft.training import (  # noqa: E402
    _autocast,
    batches,
    predict,
    resolve_device,
    resolve_precision,
)


def training(method: str, samples: int, repeats: int) -> dict:
    cfg = load_config(None, ["task=semeval", f"method={method}", "max-length=64",
                             f"max-train-samples={samples}", "max-test-samples=8"])
    default = resolve_precision(resolve_device(cfg.device), cfg.precision)
    _, speeds = training_speeds(cfg, {"fp32": "fp32", "default": default}, repeats)
    fp32, auto = statistics.median(speeds["fp32"]), statistics.median(speeds["default"])
    return {"part": "training", "method": method, "auto-resolves-to": default,
            "threads": torch.get_num_threads(), "fp32-samples-per-s": fp32,
            "default-samples-per-s": auto, "speed-up": auto / fp32, "passes": speeds}


def evaluation(repeats: int) -> dict:
    cfg = load_config(None, ["task=semeval", "method=fedlr", "max-length=64"])
    set_threads(cfg, server=True)
    rt = Runtime(cfg)
    rows = rt.features("test").rows
    collate = rt.collate
    default = resolve_precision(rt.device, cfg.precision)

    def logits(out, batch):
        return out.logits.argmax(-1).tolist()

    def before() -> list:  # fp32, batches in the file's order (fedpeft's evaluation until then)
        rt.model.eval()
        preds = []
        with torch.no_grad():
            for batch in batches(rows, cfg.eval_batch_size, collate, np.arange(len(rows))):
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                with _autocast(rt.device, "fp32"):
                    preds += logits(rt.model(**inputs), batch)
        return preds

    def sorted_fp32() -> list:  # length-sorted batches alone
        return predict(rt.model, rows, collate, batch_size=cfg.eval_batch_size, device=rt.device,
                       outputs=logits, precision="fp32")

    def now() -> list:
        return predict(rt.model, rows, collate, batch_size=cfg.eval_batch_size, device=rt.device,
                       outputs=logits, precision=cfg.precision)

    arms = (("before", before), ("sorted-fp32", sorted_fp32), ("now", now))
    seconds: dict[str, list[float]] = {name: [] for name, _ in arms}
    preds = {}
    for i in range(repeats + 1):  # the first round of passes warms up
        for name, fn in arms:
            start = time.perf_counter()
            preds[name] = fn()
            if i:
                seconds[name].append(time.perf_counter() - start)
    agree = float(np.mean(np.array(preds["before"]) == np.array(preds["now"])))
    b, n = statistics.median(seconds["before"]), statistics.median(seconds["now"])
    return {"part": "evaluation", "sentences": len(rows), "eval-batch-size": cfg.eval_batch_size,
            "auto-resolves-to": default, "threads": torch.get_num_threads(),
            "before-seconds": b, "sorted-fp32-seconds": statistics.median(seconds["sorted-fp32"]),
            "now-seconds": n, "speed-up": b / n,
            "predictions-agree": agree, "passes": seconds}


def workers(rounds: int, root: Path) -> dict:
    base = ["task=semeval", "method=federa", "num-clients=100", "clients-per-round=10",
            "alpha=1", f"rounds={rounds}", f"eval-every={rounds}", "max-test-samples=64",
            "progress=false"]
    auto = plan_resources(load_config(None, base + ["sim-workers=auto"]))
    cores = os.cpu_count() or 1
    arms = {"auto": ["sim-workers=auto"], "per-core": [f"sim-workers={cores}"]}
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for i, name in enumerate(["auto", "per-core", "per-core", "auto"]):
        out = root / f"{name}-{i}"
        subprocess.run([str(Path(sys.executable).with_name("fedpeft")), "run", *base, *arms[name],
                        f"out={out}"], check=True, stdout=subprocess.DEVNULL)
        seconds[name] += [r["seconds"] for r in read_rounds(out)[1:]]
    a, p = statistics.mean(seconds["auto"]), statistics.mean(seconds["per-core"])
    return {"part": "sim-workers", "cores": cores,
            "auto": f"{auto.workers} worker(s) x {auto.threads} thread(s)",
            "per-core": f"{cores} worker(s) x 1 thread", "auto-seconds-per-round": a,
            "per-core-seconds-per-round": p, "speed-up": p / a, "rounds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="training,evaluation,sim-workers")
    parser.add_argument("--methods", default="fedlr,federa")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/defaults.json")
    args = parser.parse_args()
    parts = args.parts.split(",")
    results = []
    if "training" in parts:
        results += [training(m, args.samples, args.repeats) for m in args.methods.split(",")]
    if "evaluation" in parts:
        results.append(evaluation(args.repeats))
    if "sim-workers" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(workers(args.rounds, Path(tmp)))
    for row in results:
        print(json.dumps({k: v for k, v in row.items() if k not in ("passes", "rounds")}),
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
