"""HetLoRA (Cho et al., EMNLP 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", arXiv 2401.06432).

Clients hold LoRA of different ranks r_k <= r_max = ``lora-rank`` (``client-ranks``); the server
keeps one global LoRA at r_max.

- Distribution by truncation: client k receives the first r_k components of the global factors
  (rows of A, columns of B) and the head.
- Local training with rank self-pruning: the loss gets lambda ||B_tail|| ||A_tail|| per target,
  the tail being the components floor(gamma r_k) .. r_k (``hetlora-lambda``,
  ``hetlora-gamma``); added to the gradients by tensor hooks (``_PruneRegulariser``), which is
  the gradient of that term. If after local training the tail's norm sum_targets
  ||B_tail|| ||A_tail|| is smaller than when the round started, the client prunes its rank to
  max(1, floor(gamma r_k)): it zeroes the tail and sends the factors at the shape it received.
  The server reads the new rank from the update (its leading components that are not all zero),
  keeps it for that client (``method-state``: ``ranks``, checkpointed) and truncates to it from
  then on. ``hetlora-lambda=0`` turns pruning off.
- Sparsity-weighted aggregation: every update is zero-padded to r_max, and per target the
  padded factors are averaged with weights ||B_k A_k||_F / sum_j ||B_j A_j||_F (example counts
  when every product is zero, as before any training); the head is FedAvg'd by example counts.

Every client uses the global scale s = lora-alpha / lora-rank: factors are averaged as they
are, so a component means the same product on every client. Down: r_k (d_in + d_out) per target +
head; up: the same. ``lora-init=svd``, DoRA and rsLoRA are refused. The settings' defaults are
fedpeft's (gamma 0.99: one component at a time for ranks below 100; lambda 1e-3), not tuned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..config import RunConfig
from ..federation.aggregation import fedavg
from .lora import lora_layers
from .lora_family import (
    RankedLoRA,
    lora_key,
    lora_modules,
    pad,
    rank_budget_rows,
    state_rank,
    truncate,
)


def live_rank(state: Mapping[str, np.ndarray]) -> int:
    """The number of leading LoRA components of ``state`` that are not all zero (in A or B, any
    target): a pruned client's rank."""
    live = 0
    for module in lora_modules(state):
        a, b = state[lora_key(module, "A")], state[lora_key(module, "B")]
        used = np.flatnonzero(np.any(a != 0, axis=1) | np.any(b != 0, axis=0))
        live = max(live, int(used[-1]) + 1 if used.size else 0)
    return max(live, 1)


def sparsity_weighted_mean(states: list[Mapping[str, np.ndarray]], weights: list[float],
                           rank: int) -> tuple[dict[str, np.ndarray], dict[str, list[float]]]:
    """HetLoRA's aggregation: the head by example counts; per target, the factors zero-padded
    to ``rank`` and averaged with weights ||B_k A_k||_F / sum_j ||B_j A_j||_F. Returns the
    state and each target's weights."""
    modules = lora_modules(states[0])
    factor_keys = {lora_key(m, x) for m in modules for x in "AB"}
    out = fedavg([{k: v for k, v in s.items() if k not in factor_keys} for s in states], weights)
    padded = [pad({k: s[k] for k in factor_keys}, rank) for s in states]
    used = {}
    for module in modules:
        key_a, key_b = lora_key(module, "A"), lora_key(module, "B")
        norms = np.array([np.linalg.norm(s[key_b].astype(np.float64) @ s[key_a].astype(
            np.float64)) for s in states])
        p = norms if norms.sum() > 0 else np.asarray(weights, dtype=np.float64)
        p = p / p.sum()
        for key in (key_a, key_b):
            out[key] = sum(pk * s[key].astype(np.float64) for pk, s in zip(p, padded,
                                                                            strict=True)
                           ).astype(states[0][key].dtype)
        used[module] = [float(x) for x in p]
    return {k: out[k] for k in states[0]}, used


class _PruneRegulariser:
    """Adds the gradient of lambda ||B_tail||_F ||A_tail||_F (tail: components lo..hi) to every
    LoRA factor's gradient, through tensor hooks (removed by ``remove``)."""

    def __init__(self, model: torch.nn.Module, lo: int, hi: int, weight: float) -> None:
        self.handles = []
        for layer in lora_layers(model).values():
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            self.handles.append(a.register_hook(self._hook(a, b, lo, hi, weight, "A")))
            self.handles.append(b.register_hook(self._hook(a, b, lo, hi, weight, "B")))

    @staticmethod
    def _hook(a: torch.Tensor, b: torch.Tensor, lo: int, hi: int, weight: float, which: str):
        def add(grad: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                tail_a, tail_b = a[lo:hi], b[:, lo:hi]
                na, nb = tail_a.norm(), tail_b.norm()
                extra = torch.zeros_like(grad)
                if which == "A" and na > 0:
                    extra[lo:hi] = weight * nb * tail_a / na
                if which == "B" and nb > 0:
                    extra[:, lo:hi] = weight * na * tail_b / nb
            return grad + extra
        return add

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def tail_norm(model: torch.nn.Module, lo: int, hi: int) -> float:
    """sum over targets of ||B_tail||_F ||A_tail||_F."""
    total = 0.0
    with torch.no_grad():
        for layer in lora_layers(model).values():
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            total += float(a[lo:hi].double().norm() * b[:, lo:hi].double().norm())
    return total


class HetLoRA(RankedLoRA):
    """Heterogeneous ranks: truncation down, self-pruning, sparsity-weighted mean (HetLoRA)."""

    name = "hetlora"
    paper = "HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432)"
    default_lr = 2e-3  # FedLR's
    per_client_scale = False  # factors are averaged as they are: one scale for all

    def __init__(self, cfg: RunConfig, peft_task_type: str) -> None:
        super().__init__(cfg, peft_task_type)
        self.pruned: dict[int, int] = {}  # server: client -> rank after self-pruning
        self._regulariser: _PruneRegulariser | None = None
        self._tail_start = 0.0

    def rank_of(self, client: int) -> int:
        return self.pruned.get(client, super().rank_of(client))

    def prune_to(self, rank: int) -> int:
        return max(1, math.floor(self.cfg.hetlora_gamma * rank))

    # --- server side -------------------------------------------------------------------------
    def client_payload(self, global_state: dict[str, np.ndarray], client: int,
                       server_round: int) -> dict[str, np.ndarray]:
        rank = self.rank_of(client)
        return global_state if rank == self.cfg.lora_rank else truncate(global_state, rank)

    def make_strategy(self, cfg: RunConfig, common: dict[str, Any]) -> Any:
        from ..federation.strategies.method_rule import MethodRule

        return MethodRule(rule=self.aggregate, **common)

    def aggregate(self, server_round: int, states: list[dict[str, np.ndarray]],
                  weights: list[float], clients: list[int], previous: dict[str, np.ndarray]
                  ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        for client, state in zip(clients, states, strict=True):
            live = live_rank(state)
            if live < (state_rank(state) or live):
                self.pruned[client] = live
        out, _ = sparsity_weighted_mean(states, weights, self.cfg.lora_rank)
        return out, {}

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": {str(k): v for k, v in sorted(self.pruned.items())}} \
            if self.pruned else {}

    def load_state_dict(self, state: Mapping[str, Any], runtime: Any) -> None:
        self.pruned = {int(k): int(v) for k, v in state.get("ranks", {}).items()}

    # --- client side: self-pruning -----------------------------------------------------------
    def receive(self, runtime: Any, incoming: Mapping[str, np.ndarray], client: int) -> None:
        super().receive(runtime, incoming, client)
        if self._regulariser is not None:  # a previous round that raised
            self._regulariser.remove()
            self._regulariser = None
        rank = self._client_rank
        lo = self.prune_to(rank)
        if self.cfg.hetlora_lambda > 0 and lo < rank:
            self._tail_start = tail_norm(runtime.model, lo, rank)
            self._regulariser = _PruneRegulariser(runtime.model, lo, rank,
                                                  self.cfg.hetlora_lambda)

    def reply(self, runtime: Any, client: int) -> dict[str, np.ndarray]:
        rank = self._client_rank
        if self._regulariser is not None:
            self._regulariser.remove()
            self._regulariser = None
            lo = self.prune_to(rank)
            if tail_norm(runtime.model, lo, rank) < self._tail_start:
                with torch.no_grad():
                    for layer in lora_layers(runtime.model).values():
                        layer.lora_A["default"].weight[lo:rank] = 0
                        layer.lora_B["default"].weight[:, lo:rank] = 0
        return super().reply(runtime, client)

    def budget_rows(self, runtime: Any) -> list[dict[str, Any]]:
        return rank_budget_rows(self, runtime)
