"""FedEx-LoRA (Singhal et al., ACL 2025, "FedEx-LoRA: Exact Aggregation for Federated and
Efficient Fine-Tuning of Foundation Models", arXiv 2410.09432).

FedAvg of A and B is inexact: s mean(B) mean(A) != mean(s B_k A_k). FedEx-LoRA keeps FedAvg's
factors and folds the difference into the frozen weights every round:

    W_t = W_{t-1} + sum_k w_k s B_k A_k - s mean(B) mean(A),    global factors mean(A), mean(B),

so the global model W_t + s mean(B) mean(A) = W_{t-1} + mean(s B_k A_k) is exactly the mean of
the clients' models (w_k: example counts; s = lora-alpha / lora-rank). The server keeps the
cumulative fold D_t = W_t - W_0 per target in the global state (``@merged/<module>``, dense
float32: the residual of K clients has rank up to (K + 1) r, more than a dense matrix holds for
every model we run), and every client sets its frozen weight to W_0 + D_t before training
(``lora_family.apply_merged``), whichever rounds it missed.

- Down: A, B, head, and D (d_out x d_in per target): the same payload for every client.
- Up: A, B, head (D never goes up).
- ``lora-init=svd``: FeDeRA's start (A, B from the SVD of W, W_0 = the residual W - s B0 A0,
  anchor sent once); ``lora-init=gaussian`` (default): FedLR's.
- One rank for every client (``client-ranks`` is refused), fp32 transport only (a rounded D
  would give clients another base than the server's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, RunConfig
from ..federation.aggregation import fedavg, lora_pairs
from ..tensors import load_trainable_state, trainable_state
from .fedsa_lora import SVDStartMixin
from .lora import LoRA, lora_scaling
from .lora_family import MERGED, apply_merged, check_own_rule, rank_budget_rows, split_merged


def fedex_aggregate(states: list[Mapping[str, np.ndarray]], weights: list[float],
                    scaling: float, previous: Mapping[str, np.ndarray]
                    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """FedEx-LoRA's rule: FedAvg of every tensor, plus per LoRA target the cumulative fold
    ``@merged/<module>`` = previous fold + sum_k w_k s B_k A_k - s mean(B) mean(A) (float64, cast
    to float32). Also returns ||residual|| / ||sum_k w_k s B_k A_k|| per module."""
    out = fedavg(states, weights)
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    ratios = {}
    for key_a, key_b in lora_pairs(list(states[0])):
        module = key_a.split(".lora_A.")[0]
        exact = scaling * sum(wi * (s[key_b].astype(np.float64) @ s[key_a].astype(np.float64))
                              for wi, s in zip(w, states, strict=True))  # (d_out, d_in)
        approx = scaling * (out[key_b].astype(np.float64) @ out[key_a].astype(np.float64))
        residual = exact - approx
        before = previous.get(MERGED + module)
        fold = residual if before is None else before.astype(np.float64) + residual
        out[MERGED + module] = fold.astype(np.float32)
        norm = float(np.linalg.norm(exact))
        ratios[module] = float(np.linalg.norm(residual)) / norm if norm > 0 else 0.0
    return out, ratios


class FedExLoRA(SVDStartMixin, LoRA):
    """FedAvg of LoRA factors with the residual folded into the frozen base (FedEx-LoRA)."""

    name = "fedex-lora"
    paper = "FedEx-LoRA (Singhal et al., ACL 2025, arXiv 2410.09432)"
    default_lr = 2e-3  # FedLR's; FeDeRA's with lora-init=svd
    merges_base = True  # the frozen weights move (export: merged only)

    def __init__(self, cfg: RunConfig, peft_task_type: str) -> None:
        super().__init__(cfg, peft_task_type)
        self.init = self._init_value()
        self._merged: dict[str, np.ndarray] = {}  # the fold this process's model carries
        self.residual = 0.0  # mean ||residual|| / ||mean product|| of the last round

    @classmethod
    def check_settings(cls, cfg: RunConfig) -> None:
        check_own_rule(cfg)
        if cfg.transport_dtype != "fp32":
            raise ConfigError(f"method={cfg.method} sends the frozen base's update, which must "
                              f"arrive exactly: transport-dtype={cfg.transport_dtype} would round "
                              "it; use transport-dtype=fp32")

    # --- what travels ------------------------------------------------------------------------
    def export_state(self, model: torch.nn.Module) -> dict[str, np.ndarray]:
        from ..models import weight_matrix
        from .lora import lora_layers

        state = trainable_state(model)
        for name, layer in lora_layers(model).items():
            key = MERGED + name
            state[key] = self._merged.get(key, np.zeros(
                tuple(weight_matrix(layer.get_base_layer()).shape), np.float32))
        return state

    def import_state(self, model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
        merged, rest = split_merged(state)
        apply_merged(model, merged)
        self._merged = merged
        load_trainable_state(model, rest)

    def reply(self, runtime: Any, client: int) -> dict[str, np.ndarray]:
        return trainable_state(runtime.model)

    def upload_reference(self, sent: dict[str, np.ndarray], client: int,
                         server_round: int) -> dict[str, np.ndarray]:
        return split_merged(sent)[1]

    # --- aggregation ----------------------------------------------------------------------------
    def make_strategy(self, cfg: RunConfig, common: dict[str, Any]) -> Any:
        from ..federation.strategies.method_rule import MethodRule

        return MethodRule(rule=self.aggregate, **common)

    def aggregate(self, server_round: int, states: list[dict[str, np.ndarray]],
                  weights: list[float], clients: list[int], previous: dict[str, np.ndarray]
                  ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        out, ratios = fedex_aggregate(states, weights, lora_scaling(self.cfg), previous)
        self.residual = float(np.mean(list(ratios.values()))) if ratios else 0.0
        return out, {}

    def state_dict(self) -> dict[str, Any]:
        return {"residual-ratio": self.residual} if self.residual else {}

    def load_state_dict(self, state: Mapping[str, Any], runtime: Any) -> None:
        self.residual = float(state.get("residual-ratio", 0.0))

    def budget_rows(self, runtime: Any) -> list[dict[str, Any]]:
        return rank_budget_rows(self, runtime)
