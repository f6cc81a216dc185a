"""Shared test steps: one local round of a method, a short federated run, and which processes
of a process group are still alive."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft.config import load_config
from fedpeft.federation.runtime import Runtime
from fedpeft.training import TrainResult, local_train


def local_round_and_scores(overrides: list[str]) -> tuple[TrainResult, dict[str, float]]:
    """Build the run's model and method, take one local epoch on all of train, score on test."""
    runtime = Runtime(load_config(None, overrides))
    runtime.method.make_anchor(runtime.model)  # the server's one-off state (FeDeRA's SVD), if any
    result = local_train(runtime.model, runtime.features("train").rows, runtime.collate, lr=1e-3,
                         epochs=1, batch_size=8, weight_decay=0.0, max_grad_norm=1.0,
                         generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    return result, runtime.evaluate("test")


def two_round_simulation(overrides: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A 4-client, 2-per-round, 2-round Flower simulation; checks every round trained."""
    from fedpeft.federation.simulation import simulate
    from fedpeft.runlog import read_rounds

    cfg = load_config(None, ["num-clients=4", "clients-per-round=2", "rounds=2", "batch-size=8",
                             "lr=5e-3", "progress=false", *overrides])
    summary = simulate(cfg)
    rounds = read_rounds(cfg.run_dir())
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["successes"] == 2 and np.isfinite(r["train-loss"])
    return summary, rounds


def alive_in_groups(pgids: set[int] | list[int]) -> list[int]:
    """Pids of live (non-zombie) processes whose process group is in ``pgids`` (Linux /proc)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in pgids and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive
