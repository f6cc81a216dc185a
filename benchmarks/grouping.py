"""Local training with random batches (the encoders' default) vs length-grouped batches
(``group-by-length=true``), side by side in one invocation.

The demo's clients (SemEval, 20 clients of 400 by Dirichlet(1), the demo's seed): ``local_train``
over the same shard with each batching in turn (one warm-up pass each, then ``--repeats``
alternating passes, so a machine busy with other work slows both alike), one thread as one
simulation worker has. Besides samples/s, the tokens per batch it pads to (the work) against the
real tokens (the same in both). What grouping does to accuracy is a federated run's question
(README, "What `make demo` runs"), not this script's.

    .venv/bin/python benchmarks/grouping.py --out benchmarks/results/grouping.json
"""

from __future__ import annotations

from fedpeft import offline

offline.apply()

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from fedpeft.config import load_config  # noqa: E402
from fedpeft.federation.runtime import Runtime  # noqa: E402
from fedpeft.training import length_grouped, local_train, resolve_device, resolve_precision  # noqa: E402,E501


def padded_tokens(lengths: list[int], order: list[int], batch_size: int) -> int:
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(max(lengths[j] for j in b) * len(b) for b in batches)


def demo_client(method: str, client: int):
    """The demo's runtime (SemEval, 20 clients of 400 by Dirichlet(1), ``method`` at lr 5e-3),
    client ``client``'s rows and the precision ``precision=auto`` picks here."""
    cfg = load_config(None, ["task=semeval", f"method={method}", "num-clients=20",
                             "clients-per-round=4", "alpha=1.0", "lr=5e-3"])
    rt = Runtime(cfg)
    rt.method.make_anchor(rt.model)
    return cfg, rt, rt.client_rows(client), resolve_precision(resolve_device(cfg.device),
                                                              cfg.precision)


def local_pass(cfg, rt, rows, precision: str, seed: int, grouped: bool = False):
    """One epoch of ``local_train`` over ``rows`` at lr 1e-6: the model barely moves, so every
    pass does the same work on the same rows."""
    return local_train(rt.model, rows, rt.collate, lr=1e-6, epochs=1, batch_size=cfg.batch_size,
                       weight_decay=0.0, max_grad_norm=cfg.max_grad_norm,
                       generator=torch.Generator().manual_seed(seed), device=rt.device,
                       precision=precision, group_by_length=grouped)


def demo_client_from_args(doc: str, name: str):
    """The command line both demo-client benchmarks take (``--method``, ``--client``,
    ``--repeats``, ``--threads``, ``--out``, default ``benchmarks/results/<name>.json``), then
    ``torch.set_num_threads`` and ``demo_client``: (args, cfg, runtime, rows, precision)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--method", default="fedlr")
    parser.add_argument("--client", type=int, default=0, help="partition id of the shard")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=f"benchmarks/results/{name}.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return (args, *demo_client(args.method, args.client))


def main() -> None:
    args, cfg, rt, rows, precision = demo_client_from_args(__doc__, "grouping")
    lengths = [len(r["input_ids"]) for r in rows]

    def one_pass(grouped: bool, seed: int) -> float:
        result = local_pass(cfg, rt, rows, precision, seed, grouped)
        return result.num_examples / result.seconds

    arms = {"random": False, "grouped": True}
    for grouped in arms.values():  # warm-up
        one_pass(grouped, 0)
    speeds: dict[str, list[float]] = {label: [] for label in arms}
    for repeat in range(args.repeats):
        for label, grouped in arms.items():
            speeds[label].append(one_pass(grouped, repeat + 1))
    generator = torch.Generator().manual_seed(1)
    order = torch.randperm(len(rows), generator=generator).tolist()
    grouped_order = length_grouped(order, lengths, cfg.batch_size, generator)
    row = {"task": "semeval", "max-length": max(lengths), "method": args.method,
           "client": args.client, "rows": len(rows), "batch-size": cfg.batch_size,
           "threads": args.threads, "precision": precision, "cpu": platform.processor() or
           platform.machine(), "cpu-capability": torch.backends.cpu.get_cpu_capability(),
           "real-tokens": sum(lengths),
           "random-padded-tokens": padded_tokens(lengths, order, cfg.batch_size),
           "grouped-padded-tokens": padded_tokens(lengths, grouped_order, cfg.batch_size),
           "random-samples-per-s": statistics.median(speeds["random"]),
           "grouped-samples-per-s": statistics.median(speeds["grouped"]), "passes": speeds}
    row["speed-up"] = row["grouped-samples-per-s"] / row["random-samples-per-s"]
    print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps([row], indent=2) + "\n")


if __name__ == "__main__":
    main()
