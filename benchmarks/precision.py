"""Training speed with bf16 autocast vs fp32 on this machine's CPU (or GPU), per method.

fp32 and bf16 steps are interleaved over the same batches (one warm-up each, then ``--repeats``
alternating passes), so a machine that is busy with other work slows both alike; the figure of
interest is the speed-up. The metric effect of bf16 is measured by a federated run
(``precision=bf16``, see BENCHMARKS.md), not here.

    .venv/bin/python benchmarks/precision.py --methods fedft,fedlr,federa --settings semeval:64 \\
        --out benchmarks/results/precision.json
"""

from __future__ import annotations

from fedpeft import offline

offline.apply()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from fedpeft.config import RunConfig, load_config  # noqa: E402
from fedpeft.federation.runtime import Runtime, set_threads  # noqa: E402
from fedpeft.training import _autocast  # noqa: E402


def training_speeds(cfg: RunConfig, arms: dict[str, str], repeats: int
                    ) -> tuple[Runtime, dict[str, list[float]]]:
    """Training samples/s of ``cfg``'s method on its train rows, for each arm ``label ->
    precision``: one warm-up pass per arm, then ``repeats`` rounds of one pass per arm in turn
    over the same batches (a machine busy with other work slows every arm alike)."""
    set_threads(cfg)
    rt = Runtime(cfg)
    rt.method.make_anchor(rt.model)
    rows = rt.features("train").rows
    data = [rt.collate(rows[i:i + cfg.batch_size]) for i in range(0, len(rows), cfg.batch_size)]
    params = [p for p in rt.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    rt.model.train()

    def one_pass(precision: str) -> float:
        start = time.perf_counter()
        for batch in data:
            batch = {k: v.to(rt.device) for k, v in batch.items()}
            with _autocast(rt.device, precision):
                loss = rt.model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        return len(rows) / (time.perf_counter() - start)

    for precision in arms.values():  # warm-up
        one_pass(precision)
    speeds: dict[str, list[float]] = {label: [] for label in arms}
    for _ in range(repeats):
        for label, precision in arms.items():
            speeds[label].append(one_pass(precision))
    return rt, speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="fedft,fedlr,federa")
    parser.add_argument("--settings", default="semeval:64")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/precision.json")
    args = parser.parse_args()
    results = []
    for setting in args.settings.split(","):
        task, length = setting.split(":")
        for method in args.methods.split(","):
            cfg = load_config(None, [f"task={task}", f"method={method}", f"max-length={length}",
                                     f"max-train-samples={args.samples}", "max-test-samples=8",
                                     f"threads={args.threads}", f"device={args.device}"])
            rt, speeds = training_speeds(cfg, {"fp32": "fp32", "bf16": "bf16"}, args.repeats)
            row = {"task": task, "max-length": int(length), "method": method,
                   "device": str(rt.device), "threads": torch.get_num_threads(),
                   "fp32-samples-per-s": statistics.median(speeds["fp32"]),
                   "bf16-samples-per-s": statistics.median(speeds["bf16"]),
                   "passes": speeds}
            row["speed-up"] = row["bf16-samples-per-s"] / row["fp32-samples-per-s"]
            print(json.dumps({k: v for k, v in row.items() if k != "passes"}), flush=True)
            results.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
