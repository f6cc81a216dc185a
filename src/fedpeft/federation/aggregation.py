"""Server-side aggregation maths as pure functions over ``{name: ndarray}`` states."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

State = Mapping[str, np.ndarray]


def fedavg(states: Sequence[State], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Weighted mean of client states, key by key (McMahan et al., 2017).

    ``weights`` are the clients' example counts. Every state must have the same keys and shapes;
    the sum is accumulated in float64 and cast back to each tensor's dtype (``WeightedMean``).
    """
    if not states:
        raise ValueError("fedavg needs at least one client state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    mean = WeightedMean()
    for state, weight in zip(states, weights, strict=True):
        mean.add(state, weight)
    return mean.result()


class WeightedMean:
    """FedAvg one update at a time: the server adds each client's state as it is read and keeps
    only the float64 running sums, never all K updates (K x the trainable state in memory)."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.total = 0.0
        self.count = 0

    def add(self, state: State, weight: float) -> None:
        if not weight >= 0:
            raise ValueError(f"weights must be non-negative, got {weight}")
        if self.count and list(state) != list(self.sums):
            raise ValueError(f"client {self.count} sent keys that differ from client 0's")
        for key, value in state.items():  # check all before adding any
            if self.count and value.shape != self.sums[key].shape:
                raise ValueError(f"{key}: shape {value.shape} differs from "
                                 f"{self.sums[key].shape}")
        for key, value in state.items():
            if not self.count:
                self.sums[key] = np.zeros(value.shape, dtype=np.float64)
                self.dtypes[key] = value.dtype
            self.sums[key] += weight * value.astype(np.float64)
        self.total += weight
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        if not self.total > 0:
            raise ValueError(f"weights must have a positive sum, got {self.total}")
        return {k: (v / self.total).astype(self.dtypes[k]) for k, v in self.sums.items()}


def lora_pairs(keys: Sequence[str]) -> list[tuple[str, str]]:
    """(A key, B key) pairs of the LoRA layers in a state (PEFT's names:
    ``...lora_A.<adapter>...``)."""
    pairs = []
    for key in keys:
        if ".lora_A." in key:
            partner = key.replace(".lora_A.", ".lora_B.")
            if partner in keys:
                pairs.append((key, partner))
    return pairs


def exact_lora_mean(states: Sequence[State], weights: Sequence[float], scaling: float,
                    rank: int, scalings: Sequence[float] | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Aggregate LoRA factors through their products (beyond the papers; FlexLoRA's rule).

    FedAvg of A and B separately averages the factors, but mean(B) @ mean(A) != mean(B @ A):
    the global model is then not the average of the clients' models. Here the server forms the
    weighted mean of the clients' updates s * B_k @ A_k per layer, and factors it back to rank r
    with an SVD (A = sqrt(S_r/s) V_r^T, B = U_r sqrt(S_r/s)); the mean of K rank-r products can
    have rank up to K*r, so the truncation error ||P - s B A||_F / ||P||_F is returned per layer.
    Tensors that are not LoRA factors (the head) are averaged as in ``fedavg``.

    Heterogeneous ranks (FlexLoRA, Bai et al., 2024): client k's factors may have their own rank
    r_k and their own scale ``scalings[k]`` (s_k = alpha / r_k); the mean product is then
    sum_k w_k s_k B_k A_k, factored at ``rank`` with the global ``scaling``.
    """
    import torch

    from ..tensors import svd_factors

    pairs = lora_pairs(list(states[0]))
    factor_keys = {k for pair in pairs for k in pair}
    out = fedavg([{k: v for k, v in s.items() if k not in factor_keys} for s in states],
                 weights)  # the head (and any other tensor)
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    scales = [1.0] * len(states) if scalings is None else list(scalings)
    errors = {}
    for key_a, key_b in pairs:
        product = sum(wi * si * (s[key_b].astype(np.float64) @ s[key_a].astype(np.float64))
                      for wi, si, s in zip(w, scales, states, strict=True))  # (d_out, d_in)
        if scalings is None:  # one scale for every client
            product = product * scaling
        a, b = svd_factors(torch.from_numpy(product), rank, scaling)
        approx = scaling * (b.numpy() @ a.numpy())
        norm = np.linalg.norm(product)
        errors[key_a.split(".lora_A.")[0]] = float(np.linalg.norm(product - approx) / norm) \
            if norm > 0 else 0.0
        out[key_a] = a.numpy().astype(states[0][key_a].dtype)
        out[key_b] = b.numpy().astype(states[0][key_b].dtype)
    return out, errors
