"""How many simulation workers, with how many threads and how much GPU each.

Each worker (a Ray actor) holds one frozen base model and serves many clients in turn, so more
workers train more clients at once but each costs a model's memory. ``sim-workers=auto``:

- CPU: one single-threaded worker per core, as many as the round has clients and as the memory
  holds (``WORKER_GIB`` per worker, within 3/4 of the machine's RAM); each worker gets
  cores // workers threads. Measured side by side on this project's 2-core machine
  (``benchmarks/defaults.py``, BENCHMARKS.md section 8: FeDeRA, SemEval, 10 clients of 80 per
  round, bf16): two workers x 1 thread took 15.8 s per round against 20.3 s for one worker x 2
  threads (1.28x); torch's intra-op threads scale sublinearly on such small batches, so clients
  in parallel beat threads in parallel. ``sim-workers=N`` sets it by hand.
- CUDA: one worker per visible GPU (``sim-gpus-per-worker`` = 1), or 1/share of them per GPU
  when a share is asked for; each gets the cores divided evenly.

``threads`` set explicitly always wins for the torch threads per worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import RunConfig


# Memory one CPU worker may take, measured here: a whole PEFT simulation of the bundled encoder
# (driver, Ray and one worker) peaked at 2.2-2.4 GB (BENCHMARKS.md section 2); a SmolLM2-135M
# worker (de-quantised to fp32, AdamW state, generation) reached 8 GiB over a 16-round squad-gen
# run. A larger encoder, or FedFT on many cores, may need sim-workers=N by hand.
WORKER_GIB = {"encoder": 2.0, "decoder": 8.0}


@dataclass(frozen=True)
class Resources:
    workers: int
    threads: int  # torch threads per worker
    cpus: int  # Ray CPUs per worker
    gpus: float  # Ray GPUs per worker (0 on CPU)


def plan_resources(cfg: RunConfig, cores: int | None = None, gpus: int | None = None,
                   memory_gib: float | None = None) -> Resources:
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
        memory = memory_gib if memory_gib is not None else _memory_gib()
        kind = "decoder" if _generative(cfg) else "encoder"
        fit = max(1, int(0.75 * memory / WORKER_GIB[kind]))
        workers = max(1, min(cores, cfg.clients_per_round, fit))
    per_worker = max(1, cores // workers)
    threads = cfg.threads or per_worker
    gpu_share = (share if cfg.sim_gpus_per_worker else min(1.0, gpus / workers)) if gpus else 0.0
    return Resources(workers=workers, threads=threads, cpus=per_worker, gpus=gpu_share)


def _memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):  # not a POSIX system: plan for one worker
        return 0.0


def _generative(cfg: RunConfig) -> bool:
    """Whether the task trains a decoder (its workers hold a causal LM)."""
    from ..tasks import TASKS
    from ..tasks.generation import GenerationTask

    task = TASKS.get(cfg.task)
    return task is not None and issubclass(task, GenerationTask)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
