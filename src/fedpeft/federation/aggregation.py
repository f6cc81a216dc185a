"""Server-side aggregation maths as pure functions over ``{name: ndarray}`` states."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

State = Mapping[str, np.ndarray]


def fedavg(states: Sequence[State], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Weighted mean of client states, key by key (McMahan et al., 2017).

    ``weights`` are the clients' example counts. Every state must have the same keys and shapes;
    the sum is accumulated in float64 and cast back to each tensor's dtype.
    """
    if not states:
        raise ValueError("fedavg needs at least one client state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    w = w / w.sum()
    keys = list(states[0])
    for i, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            raise ValueError(f"client {i} sent keys that differ from client 0's")
    out = {}
    for key in keys:
        acc = np.zeros(states[0][key].shape, dtype=np.float64)
        for wi, state in zip(w, states, strict=True):
            if state[key].shape != acc.shape:
                raise ValueError(f"{key}: shape {state[key].shape} differs from {acc.shape}")
            acc += wi * state[key].astype(np.float64)
        out[key] = acc.astype(states[0][key].dtype)
    return out
