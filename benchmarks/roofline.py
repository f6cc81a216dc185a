"""How close the demo's local training runs to this CPU core's matrix-multiply peak, side by side
in one invocation: the floor under the demo's training time that no kernel, compiler or
batching change can go below without less arithmetic (fewer examples, shorter sequences, a
smaller model).

- The work: torch's own ``FlopCounterMode`` counts the FLOPs of one local pass (forward and
  backward, the matmuls and attention that dominate a transformer) of the demo's first client
  (SemEval, 20 clients of 400 by Dirichlet(1), FedLR r=32 on query/value, batch 16).
- The time: the same pass without the counter, median of ``--repeats``.
- The peak: fp32 matmuls at the model's own shapes (tokens x 384 @ 384 x 1536 and back, the
  feed-forward layers, and 384 x 384, attention's projections) and one large square matmul, one
  thread each as a simulation worker has, best of ``--repeats``.

    .venv/bin/python benchmarks/roofline.py --out benchmarks/results/roofline.json
"""

from __future__ import annotations

from fedpeft import offline

offline.apply()

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from grouping import demo_client_from_args, local_pass  # noqa: E402  (benchmarks/ is sys.path[0])


def matmul_gflops(m: int, k: int, n: int, repeats: int) -> float:
    """Best GFLOP/s of an fp32 (m x k) @ (k x n) over ``repeats`` timed batches of calls."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    calls = max(1, int(2e9 / (2 * m * k * n)))  # about 2 GFLOP per timed batch
    for _ in range(calls):  # warm-up
        a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        best = max(best, 2 * m * k * n * calls / (time.perf_counter() - start) / 1e9)
    return best


def main() -> None:
    args, cfg, rt, rows, precision = demo_client_from_args(__doc__, "roofline")

    def one_pass(seed: int):
        return local_pass(cfg, rt, rows, precision, seed)

    one_pass(0)  # warm-up
    counter = FlopCounterMode(display=False)
    with counter:
        one_pass(1)
    flops = counter.get_total_flops()
    seconds = [one_pass(1).seconds for _ in range(args.repeats)]
    tokens = 16 * 64  # a full batch at max-length 64: the largest matmul rows a step has
    hidden, inner = 384, 1536
    peaks = {
        f"{tokens}x{hidden}@{hidden}x{inner}": matmul_gflops(tokens, hidden, inner, args.repeats),
        f"{tokens}x{inner}@{inner}x{hidden}": matmul_gflops(tokens, inner, hidden, args.repeats),
        f"{tokens}x{hidden}@{hidden}x{hidden}": matmul_gflops(tokens, hidden, hidden, args.repeats),
        "2048x2048@2048x2048": matmul_gflops(2048, 2048, 2048, args.repeats),
    }
    pass_s = statistics.median(seconds)
    achieved = flops / pass_s / 1e9
    peak = max(peaks.values())
    row = {"task": "semeval", "method": args.method, "client": args.client, "rows": len(rows),
           "batch-size": cfg.batch_size, "threads": args.threads, "precision": precision,
           "cpu": platform.processor() or platform.machine(),
           "cpu-capability": torch.backends.cpu.get_cpu_capability(),
           "gflop-per-pass": flops / 1e9, "seconds-per-pass": pass_s, "passes": seconds,
           "achieved-gflops": achieved, "matmul-gflops": peaks, "peak-gflops": peak,
           "fraction-of-peak": achieved / peak, "floor-seconds-per-pass": flops / peak / 1e9}
    print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps([row], indent=2) + "\n")


if __name__ == "__main__":
    main()
