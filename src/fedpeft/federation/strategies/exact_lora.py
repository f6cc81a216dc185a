"""Exact LoRA aggregation: FedAvg of the products s*B_k*A_k, re-factored to rank r by SVD.

FedAvg of A and B separately averages the factors, and mean(B)*mean(A) is not mean(B*A): the
global model is not the average of the clients' models. This strategy averages what the
clients' adapters add to W (their products), weighted as FedAvg weighs, and gives the next round
the best rank-r factors of that mean (the homogeneous case of FlexLoRA, Bai et al., 2024;
``aggregation.exact_lora_mean``). Every other tensor (the head, biases) is FedAvg'd as usual.
Only ``aggregate_train`` differs from Flower's FedAvg.

With ``client_scaling`` (``method=flexlora`` with ``client-ranks``) the clients' factors have
their own ranks r_k and scales s_k = alpha / r_k, read from each reply's ``partition-id``: the
mean is sum_k w_k s_k B_k A_k, factored at the global rank (FlexLoRA's full-size aggregation;
``methods/flexlora.py`` sends each client its rank-r_k truncation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from ..aggregation import exact_lora_mean


class ExactLoRA(FedAvg):
    """FedAvg whose LoRA factors are aggregated exactly (see the module docstring)."""

    def __init__(self, *, scaling: float, rank: int,
                 client_scaling: Callable[[int], float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scaling, self.rank = scaling, rank
        self.client_scaling = client_scaling  # partition id -> that client's LoRA scale

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, states, weights = valid_states(self, replies)
        if not valid:
            return None, None
        scalings = None if self.client_scaling is None else \
            [self.client_scaling(int(m.content["metrics"]["partition-id"])) for m in valid]
        state, errors = exact_lora_mean(states, weights, self.scaling, self.rank, scalings)
        error = float(np.mean(list(errors.values()))) if errors else 0.0
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(state[k])) for k in states[0]})
        return arrays, MetricRecord({"lora-truncation-error": error})


def valid_states(strategy: FedAvg, replies: Iterable[Message]
                 ) -> tuple[list[Message], list[dict[str, np.ndarray]], list[float]]:
    """The replies Flower's checks keep, their states as numpy and their FedAvg weights (what
    every fedpeft aggregation rule starts from)."""
    valid, _ = strategy._check_and_log_replies(list(replies), is_train=True)
    states = [{k: np.asarray(v.numpy()) for k, v in m.content["arrays"].items()} for m in valid]
    weights = [float(m.content["metrics"][strategy.weighted_by_key]) for m in valid]
    return valid, states, weights
