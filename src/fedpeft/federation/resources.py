"""How many simulation workers, with how many threads and how much GPU each.

Each worker (a Ray actor) holds one frozen base model and serves many clients in turn, so more
workers train more clients at once but each costs a model's memory. ``sim-workers=auto``:

- CPU: one worker per core (1 thread each), at most ``clients-per-round`` (more would idle) and
  at most what the memory holds (about 1.5 GB per worker: torch, the model, a client's batches).
  On 2 cores, 2 workers x 1 thread trained a SemEval round ~20% faster than 1 worker x 2
  threads (BENCHMARKS.md): small encoder matmuls do not use two threads well.
- CUDA: one worker per visible GPU (``sim-gpus-per-worker`` = 1), or 1/share of them per GPU
  when a share is asked for; each gets the cores divided evenly.

``threads`` set explicitly always wins for the torch threads per worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import RunConfig

WORKER_MEMORY_GB = 1.5


@dataclass(frozen=True)
class Resources:
    workers: int
    threads: int  # torch threads per worker
    cpus: int  # Ray CPUs per worker
    gpus: float  # Ray GPUs per worker (0 on CPU)


def plan_resources(cfg: RunConfig, cores: int | None = None, gpus: int | None = None,
                   memory_gb: float | None = None) -> Resources:
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
        memory_gb = memory_gb if memory_gb is not None else _memory_gb()
        workers = max(1, min(cores, cfg.clients_per_round, int(memory_gb // WORKER_MEMORY_GB)))
    per_worker = max(1, cores // workers)
    threads = cfg.threads or per_worker
    gpu_share = (share if cfg.sim_gpus_per_worker else min(1.0, gpus / workers)) if gpus else 0.0
    return Resources(workers=workers, threads=threads, cpus=per_worker, gpus=gpu_share)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _memory_gb() -> float:
    try:
        pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size / 2**30
    except (ValueError, OSError, AttributeError):
        return 8.0
