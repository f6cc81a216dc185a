"""FLoRA (Wang et al., NeurIPS 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", arXiv 2409.05976).

Every round each sampled client trains a freshly initialised LoRA of its own rank r_k
(``client-ranks``; A ~ N(0, 1/r_k^2) drawn from (seed, round, module), B = 0, scale
s_k = lora-alpha / r_k) on the current frozen base, and uploads A_k, B_k and the head. The server
*stacks* the factors,

    B_stack = [B_1 | B_2 | ... | B_K]  (d_out, sum r_k),
    A_stack = [p_1 s_1 A_1; ...; p_K s_K A_K]  (sum r_k, d_in),   p_k = n_k / sum n,

so that B_stack A_stack = sum_k p_k s_k B_k A_k exactly (no cross terms, any mix of ranks), and
merges that product into the frozen weights; the next round starts from fresh LoRA again. The
head is FedAvg'd.

What travels down. The paper sends each round's stacked factors and lets clients add them to
their local weights. Here a client sampled now may have missed earlier merges, and one worker's
model serves many clients, so the server sends the *cumulative* merged update D (every round's
stack so far) and each client sets its base to W_0 + D (``lora_family.apply_merged``): its base is
exactly the server's. D travels factored, the stacks of all rounds side by side (cumulative rank
R = sum over rounds of sum_k r_k: R (d_out + d_in) values per target), while that is smaller than
the dense d_out x d_in matrix, and dense from then on (``lora_family.merged_bytes``); the
global state (and so the checkpoint) holds it in the same form. Every client gets the same
payload (head + D), encoded once per round; round 1 sends the head only (R = 0). Up: A_k, B_k
(r_k (d_in + d_out) per target) and the head.

The round log's ``method-state`` records ``merged-rank`` (R, or ``dense``). ``lora-init=svd``,
DoRA and rsLoRA are refused; transport is fp32 only (a rounded D would give clients another base
than the server's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, RunConfig
from ..federation.aggregation import fedavg
from ..tensors import load_trainable_state, trainable_state
from .lora_family import (
    MERGED,
    RankedLoRA,
    apply_merged,
    check_own_rule,
    lora_key,
    lora_modules,
    merged_bytes,
    merged_modules,
    merged_update,
    module_seed,
    pad,
    rank_budget_rows,
    set_scale,
    split_merged,
    truncate,
    zero_merged,
)

_FRESH_SEED = 0xF10A


def fresh_a(seed: int, server_round: int, module: str, rank: int, d_in: int) -> np.ndarray:
    """The A factor a rank-``rank`` client of ``server_round`` starts from: N(0, 1/rank^2), drawn
    from (seed, round, module) so that the server can recompute it (the update's reference)."""
    rng = np.random.default_rng([seed, server_round, module_seed(module), _FRESH_SEED])
    return (rng.standard_normal((rank, d_in)) / rank).astype(np.float32)


def merged_shape(merged: Mapping[str, np.ndarray], module: str) -> tuple[int, int]:
    """(d_out, d_in) of a module's cumulative update, factored or dense."""
    dense = merged.get(MERGED + module)
    if dense is not None:
        return tuple(dense.shape)  # type: ignore[return-value]
    return (merged[f"{MERGED}{module}/B"].shape[0], merged[f"{MERGED}{module}/A"].shape[1])


def stack(states: list[Mapping[str, np.ndarray]], weights: list[float], scalings: list[float],
          module: str) -> tuple[np.ndarray, np.ndarray]:
    """FLoRA's stacked factors of one module: (A_stack, B_stack) with
    B_stack @ A_stack = sum_k p_k s_k B_k A_k (p_k = weights normalised)."""
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    a = np.concatenate([pk * sk * s[lora_key(module, "A")].astype(np.float64)
                        for pk, sk, s in zip(p, scalings, states, strict=True)], axis=0)
    b = np.concatenate([s[lora_key(module, "B")].astype(np.float64) for s in states], axis=1)
    return a.astype(np.float32), b.astype(np.float32)


def merge(previous: Mapping[str, np.ndarray], module: str, a: np.ndarray,
          b: np.ndarray) -> dict[str, np.ndarray]:
    """The cumulative update of ``module`` after adding the stack (a, b): factored (the earlier
    factors and this stack side by side) while that is smaller than dense, else dense."""
    d_out, d_in = b.shape[0], a.shape[1]
    key_a, key_b = f"{MERGED}{module}/A", f"{MERGED}{module}/B"
    if key_a in previous or MERGED + module not in previous:
        before_a = previous.get(key_a, np.zeros((0, d_in), np.float32))
        before_b = previous.get(key_b, np.zeros((d_out, 0), np.float32))
        factors = {key_a: np.concatenate([before_a, a], axis=0),
                   key_b: np.concatenate([before_b, b], axis=1)}
        if merged_bytes(d_out, d_in, factors[key_a].shape[0])[0]:
            return factors
        return {MERGED + module: merged_update(factors, module)}
    dense = previous[MERGED + module].astype(np.float64) + b.astype(np.float64) @ a.astype(
        np.float64)
    return {MERGED + module: dense.astype(np.float32)}


class FLoRA(RankedLoRA):
    """Fresh LoRA every round; the clients' stacked factors are merged into the base (FLoRA)."""

    name = "flora"
    paper = "FLoRA (Wang et al., NeurIPS 2024, arXiv 2409.05976)"
    default_lr = 2e-3  # FedLR's (the same fresh start, every round)
    merges_base = True  # the frozen weights move (export: merged only)

    def __init__(self, cfg: RunConfig, peft_task_type: str) -> None:
        super().__init__(cfg, peft_task_type)
        self._round = 0  # client side: the round being trained (fresh factors' seed)
        self._merged: dict[str, np.ndarray] = {}  # the merged update this model carries

    @classmethod
    def check_settings(cls, cfg: RunConfig) -> None:
        check_own_rule(cfg)
        if cfg.transport_dtype != "fp32":
            raise ConfigError(f"method=flora sends the frozen base's update, which must arrive "
                              f"exactly: transport-dtype={cfg.transport_dtype} would round it; "
                              "use transport-dtype=fp32")

    # --- the global state: head + cumulative merged update ------------------------------------
    def export_state(self, model: torch.nn.Module) -> dict[str, np.ndarray]:
        head = {k: v for k, v in trainable_state(model).items() if ".lora_" not in k}
        return {**head, **(self._merged or zero_merged(model))}

    def import_state(self, model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
        """The server's model: base W_0 + D, head, LoRA B = 0 (it adds nothing)."""
        merged, head = split_merged(state)
        self._load(model, merged, head, rank=self.cfg.lora_rank, server_round=0)
        set_scale(model, self.global_scale)

    def _load(self, model: torch.nn.Module, merged: Mapping[str, np.ndarray],
              head: Mapping[str, np.ndarray], rank: int, server_round: int) -> None:
        apply_merged(model, merged)
        self._merged = dict(merged)
        lora = {}
        for module in merged_modules(merged):
            d_out, d_in = merged_shape(merged, module)
            lora[lora_key(module, "A")] = fresh_a(self.cfg.seed, server_round, module, rank, d_in)
            lora[lora_key(module, "B")] = np.zeros((d_out, rank), np.float32)
        load_trainable_state(model, pad({**head, **lora}, self.cfg.lora_rank))

    # --- client side ---------------------------------------------------------------------------
    def configure_client(self, runtime: Any, config: Mapping[str, Any]) -> None:
        self._round = int(config.get("round", 0))

    def receive(self, runtime: Any, incoming: Mapping[str, np.ndarray], client: int) -> None:
        rank = self.rank_of(client)
        merged, head = split_merged(incoming)
        self._load(runtime.model, merged, head, rank, self._round)
        set_scale(runtime.model, self.client_scale(rank))
        self._client_rank = rank

    def reply(self, runtime: Any, client: int) -> dict[str, np.ndarray]:
        return truncate(trainable_state(runtime.model), self._client_rank)

    # --- server side -------------------------------------------------------------------------
    def upload_reference(self, sent: dict[str, np.ndarray], client: int,
                         server_round: int) -> dict[str, np.ndarray]:
        """A_k as the client drew it, B_k = 0, and the head it was sent."""
        merged, head = split_merged(sent)
        rank, reference = self.rank_of(client), {}
        for module in merged_modules(merged):
            d_out, d_in = merged_shape(merged, module)
            reference[lora_key(module, "A")] = fresh_a(self.cfg.seed, server_round, module,
                                                       rank, d_in)
            reference[lora_key(module, "B")] = np.zeros((d_out, rank), np.float32)
        return {**reference, **head}

    def make_strategy(self, cfg: RunConfig, common: dict[str, Any]) -> Any:
        from ..federation.strategies.method_rule import MethodRule

        return MethodRule(rule=self.aggregate, **common)

    def aggregate(self, server_round: int, states: list[dict[str, np.ndarray]],
                  weights: list[float], clients: list[int], previous: dict[str, np.ndarray]
                  ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Head: FedAvg. Each target: the stack of this round merged into the cumulative D."""
        modules = lora_modules(states[0])
        heads = [{k: v for k, v in s.items() if ".lora_" not in k} for s in states]
        out = fedavg(heads, weights)
        scalings = [self.client_scale(int(s[lora_key(modules[0], "A")].shape[0]))
                    for s in states]
        merged = split_merged(previous)[0]
        for module in modules:
            a, b = stack(states, weights, scalings, module)
            out.update(merge(merged, module, a, b))
        return out, {}

    def state_dict(self) -> dict[str, Any]:
        if not self._merged:
            return {}
        ranks = [v.shape[0] for k, v in self._merged.items() if k.endswith("/A")]
        return {"merged-rank": max(ranks) if ranks else "dense"}

    def budget_rows(self, runtime: Any) -> list[dict[str, Any]]:
        """Down: the head plus the merged update at its largest (dense), what a client receives
        once the cumulative rank R has reached d_out d_in / (d_out + d_in); before that less."""
        def dense(rank: int) -> int:
            from ..models import weight_matrix
            from .lora import lora_layers

            return sum(4 * weight_matrix(layer.get_base_layer()).numel()
                       for layer in lora_layers(runtime.model).values())

        rows = rank_budget_rows(self, runtime, down_extra=dense)
        for row in rows:
            row["method"] += " (down: dense merge)"
        return rows
