"""Local-training throughput inside simulated federated rounds vs a bare PyTorch loop.

For each method and (task, max-length), measures samples/s of:
  bare:      a plain loop (forward, backward, AdamW step) over one client's shard, with the
             same model, method, batch size, dynamic padding and sequence lengths, in this process;
  federated: ``seconds-train`` of rounds 2.. of a Flower simulation (server sends the state,
             the client loads it, trains its shard, replies; the server receives), i.e. local
             training plus every per-round overhead of the federation.
The ratio federated/bare is the overhead figure of BENCHMARKS.md (goal >= 0.90).

    .venv/bin/python benchmarks/throughput.py --methods fedft,fedlr,federa \\
        --settings semeval:64,20news:128 --out benchmarks/results/throughput.json
"""

from __future__ import annotations

from fedpeft import offline

offline.apply()

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from fedpeft.config import load_config  # noqa: E402
from fedpeft.federation.runtime import Runtime, set_threads  # noqa: E402
from fedpeft.federation.simulation import simulate  # noqa: E402
from fedpeft.runlog import read_rounds  # noqa: E402
from fedpeft.training import local_train  # noqa: E402


def bare_samples_per_second(cfg, partition_id: int = 0, warmup: int = 2) -> float:
    set_threads(cfg)
    rt = Runtime(cfg)
    rt.method.make_anchor(rt.model)
    rows = rt.client_rows(partition_id)
    params = [p for p in rt.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [rt.collate([rows[i] for i in order[s:s + cfg.batch_size]])
               for s in range(0, len(order), cfg.batch_size)]
    rt.model.train()
    for batch in batches[:warmup]:
        rt.model(**batch).loss.backward()
        opt.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for batch in batches:
        loss = rt.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return len(rows) / (time.perf_counter() - start)


def loop_samples_per_second(cfg, partition_id: int = 0) -> float:
    """fedpeft's own ``local_train`` in this process (isolates the loop from the federation)."""
    rt = Runtime(cfg)
    rt.method.make_anchor(rt.model)
    rows = rt.client_rows(partition_id)
    result = local_train(rt.model, rows, rt.collate, lr=1e-5, epochs=1, batch_size=cfg.batch_size,
                         weight_decay=0.0, max_grad_norm=cfg.max_grad_norm,
                         generator=torch.Generator().manual_seed(0), device=rt.device)
    return result.num_examples / result.seconds


def federated_samples_per_second(cfg) -> tuple[float, list[dict]]:
    with tempfile.TemporaryDirectory() as tmp:
        run_cfg = load_config(None, [f"out={tmp}/run", "progress=false"], base=cfg)
        simulate(run_cfg, overwrite=True)
        rounds = read_rounds(Path(tmp) / "run")
        sizes = json.loads((Path(tmp) / "run" / "partition.json").read_text())["sizes"]
    later = rounds[1:]  # round 1 includes the actor's start-up and model load
    samples = sum(sizes[c] for r in later for c in r["clients"])
    return samples / sum(r["seconds-train"] for r in later), rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="fedft,fedlr,federa")
    parser.add_argument("--settings", default="semeval:64,20news:128")
    parser.add_argument("--samples-per-client", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=3, help="simulated rounds (>= 2)")
    parser.add_argument("--sim-workers", default="1", help="simulation workers of the federated "
                        "arm (default 1: like the bare loop, one process with every core; more "
                        "workers train clients in parallel, which is not federation overhead)")
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    args = parser.parse_args()
    results = []
    for setting in args.settings.split(","):
        task, length = setting.split(":")
        for method in args.methods.split(","):
            cfg = load_config(None, [
                f"task={task}", f"method={method}", f"max-length={length}", "num-clients=4",
                "clients-per-round=2", f"rounds={args.rounds}", "eval-every=1000",
                "max-test-samples=16",
                f"max-train-samples={4 * args.samples_per_client}", "alpha=100",
                f"sim-workers={args.sim_workers}",
            ])
            bare = bare_samples_per_second(cfg)
            loop = loop_samples_per_second(cfg)
            fed, rounds = federated_samples_per_second(cfg)
            row = {"task": task, "max-length": int(length), "method": method,
                   "bare-samples-per-s": bare, "local-train-samples-per-s": loop,
                   "federated-samples-per-s": fed, "ratio": fed / bare,
                   "round-seconds": [r["seconds"] for r in rounds],
                   "round-split": [{k: r.get(k) for k in ("seconds-train", "seconds-clients",
                                                          "seconds-handlers", "seconds-aggregate",
                                                          "seconds-eval")} for r in rounds],
                   "threads": torch.get_num_threads(), "sim-workers": args.sim_workers}
            print(json.dumps(row), flush=True)
            results.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
