"""How many simulation workers, with how many threads and how much GPU each.

Each worker (a Ray actor) holds one frozen base model and serves many clients in turn, so more
workers train more clients at once but each costs a model's memory. ``sim-workers=auto``:

- CPU: one worker with every core. Measured on this project's 2-core machine (AVX512-BF16, bf16
  autocast, SemEval clients of 80 examples): one worker x 2 threads trained 108 samples/s (the
  learning-rate grid's runs, docs/results/semeval-a1-lr), two workers x 1 thread 66 samples/s
  (2 x 33, a demo configuration of 20 clients per round); not side by side in one run, but the
  same per-client work. Pass ``sim-workers=N`` to try more on a machine with many cores.
- CUDA: one worker per visible GPU (``sim-gpus-per-worker`` = 1), or 1/share of them per GPU
  when a share is asked for; each gets the cores divided evenly.

``threads`` set explicitly always wins for the torch threads per worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import RunConfig


@dataclass(frozen=True)
class Resources:
    workers: int
    threads: int  # torch threads per worker
    cpus: int  # Ray CPUs per worker
    gpus: float  # Ray GPUs per worker (0 on CPU)


def plan_resources(cfg: RunConfig, cores: int | None = None, gpus: int | None = None
                   ) -> Resources:
    """The workers of ``cfg``'s simulation on this machine (or on the one described)."""
    cores = cores or os.cpu_count() or 1
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and _gpu_count() > 0)
    gpus = (gpus if gpus is not None else _gpu_count()) if cuda else 0
    share = cfg.sim_gpus_per_worker or 1.0
    if cfg.sim_workers != "auto":
        workers = int(cfg.sim_workers)
    elif gpus:
        workers = max(1, int(round(gpus / share)))
    else:
        workers = 1
    per_worker = max(1, cores // workers)
    threads = cfg.threads or per_worker
    gpu_share = (share if cfg.sim_gpus_per_worker else min(1.0, gpus / workers)) if gpus else 0.0
    return Resources(workers=workers, threads=threads, cpus=per_worker, gpus=gpu_share)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
