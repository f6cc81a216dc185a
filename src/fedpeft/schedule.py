"""What changes from round to round besides the model: the clients' learning rate, and which
clients are drawn.

**Learning rate.** The rate of round t (1-based) is a pure function, ``round_lr(base_lr, t,
cfg)``, computed on the server and sent to the round's clients in their config (``"lr"``); the
round log records it. ``base_lr`` is the method's rate (``lr``, else its default). With
W = ``warmup-rounds`` and k = t - W the round's place after the warm-up:

- warm-up, t <= W: ``base_lr * t / W`` (linear; round W trains at the full rate);
- ``constant``: ``base_lr``;
- ``step``: ``base_lr * gamma ** floor((k - 1) / lr-step-rounds)`` (rounds W+1..W+n at the full
  rate, the next n at ``gamma`` times it, ...);
- ``cosine``: ``lr_min + (base_lr - lr_min) * (1 + cos(pi * p)) / 2`` with
  p = min(1, (k - 1) / (T - W)) and T = ``lr-schedule-rounds``: round W+1 trains at ``base_lr``,
  and the rate would reach ``lr-min`` in round T+1, so no round of the horizon is spent at the
  floor (PyTorch's ``CosineAnnealingLR`` with ``T_max = T - W``, stepped once per round);
  rounds beyond the horizon stay at ``lr-min``.

The schedule is over federated rounds, not local steps: each round is one step of the global
model, and a client's AdamW starts afresh every round (``training.local_train``). T is fixed when
the run starts (``RunConfig.resolved``: ``lr-schedule-rounds`` = ``rounds`` unless set, written
into the run's config), so extending a run (``--resume RUN rounds=200``) never changes the rate
of a round already trained; the new rounds continue the same curve (at ``lr-min`` past T).

SLoRA's sparse stage trains at its own rate (``slora-stage1-lr``), unscheduled; its LoRA stage
follows the schedule of ``lr`` by the run's round number (``client_lr``).

**Client sampling.** ``client-sampling=uniform`` draws K of N partitions uniformly without
replacement (``numpy.random.Generator.choice``), ``size`` with probabilities proportional to the
shards' example counts (``sampling_probabilities``), from the same seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .config import ConfigError, RunConfig


def round_lr(base_lr: float, t: int, cfg: RunConfig) -> float:
    """The clients' learning rate in round ``t`` (1-based) of a run with settings ``cfg``."""
    if t < 1:
        raise ValueError(f"rounds are numbered from 1, got {t}")
    warmup = cfg.warmup_rounds
    if warmup and t <= warmup:
        return base_lr * t / warmup
    k = t - warmup  # 1 = the first round after the warm-up
    if cfg.lr_schedule == "constant":
        return base_lr
    if cfg.lr_schedule == "step":
        return base_lr * cfg.lr_step_gamma ** ((k - 1) // cfg.lr_step_rounds)
    if cfg.lr_schedule == "cosine":
        if cfg.lr_min > base_lr:
            raise ConfigError(f"lr-min={cfg.lr_min} exceeds the learning rate {base_lr}")
        horizon = cfg.lr_schedule_rounds or cfg.rounds  # resolved once per run (see above)
        progress = min(1.0, (k - 1) / max(1, horizon - warmup))
        return cfg.lr_min + (base_lr - cfg.lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"unknown lr-schedule {cfg.lr_schedule!r}")


def client_lr(method: Any, cfg: RunConfig, server_round: int) -> float:
    """The rate the clients of ``server_round`` train at (sent with the round's config)."""
    from .methods.base import Method
    from .methods.slora import SLoRA, stage_of

    if isinstance(method, SLoRA) and stage_of(server_round, method.stage1_rounds) == 1:
        return float(cfg.slora_stage1_lr or method.stage1_lr)  # unscheduled (see above)
    return round_lr(Method.lr.fget(method), server_round, cfg)  # the method's main rate


def sampling_probabilities(cfg: RunConfig, sizes: Sequence[int]) -> np.ndarray | None:
    """Each partition's probability to be drawn first (None = uniform, numpy's own default)."""
    if cfg.client_sampling == "uniform":
        return None
    weights = np.asarray(sizes, dtype=np.float64)
    return weights / weights.sum()


__all__ = ["client_lr", "round_lr", "sampling_probabilities"]
