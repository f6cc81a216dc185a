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


def lora_pairs(keys: Sequence[str]) -> list[tuple[str, str]]:
    """(A key, B key) pairs of the LoRA layers in a state (PEFT names ``...lora_A.<adapter>...``)."""
    pairs = []
    for key in keys:
        if ".lora_A." in key:
            partner = key.replace(".lora_A.", ".lora_B.")
            if partner in keys:
                pairs.append((key, partner))
    return pairs


def exact_lora_mean(states: Sequence[State], weights: Sequence[float], scaling: float,
                    rank: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Aggregate LoRA factors through their products (beyond the papers).

    FedAvg of A and B separately averages the factors, but mean(B) @ mean(A) != mean(B @ A):
    the global model is then not the average of the clients' models. Here the server forms the
    weighted mean of the clients' updates s * B_k @ A_k per layer, and factors it back to rank r
    with an SVD (A = sqrt(S_r/s) V_r^T, B = U_r sqrt(S_r/s)); the mean of K rank-r products can
    have rank up to K*r, so the truncation error ||P - s B A||_F / ||P||_F is returned per layer.
    Tensors that are not LoRA factors (the head) are averaged as in ``fedavg``.
    """
    import torch

    from ..methods.lora import svd_factors

    out = fedavg(states, weights)  # the head; LoRA entries are overwritten below
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    errors = {}
    for key_a, key_b in lora_pairs(list(states[0])):
        product = sum(wi * (s[key_b].astype(np.float64) @ s[key_a].astype(np.float64))
                      for wi, s in zip(w, states, strict=True)) * scaling  # (d_out, d_in)
        a, b = svd_factors(torch.from_numpy(product), rank, scaling)
        approx = scaling * (b.numpy() @ a.numpy())
        norm = np.linalg.norm(product)
        errors[key_a.split(".lora_A.")[0]] = float(np.linalg.norm(product - approx) / norm) \
            if norm > 0 else 0.0
        out[key_a] = a.numpy().astype(states[0][key_a].dtype)
        out[key_b] = b.numpy().astype(states[0][key_b].dtype)
    return out, errors
