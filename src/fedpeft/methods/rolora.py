"""RoLoRA: federated LoRA by alternating optimisation of A and B (Chen et al., NeurIPS 2025,
"Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA", arXiv 2502.01755).

FedAvg of LoRA factors is not FedAvg of the clients' updates: mean(B_k) mean(A_k) !=
mean(B_k A_k). RoLoRA alternates: in one round every client trains B with A frozen, in the next
A with B frozen. With the frozen factor the same on every client, the average of the trained
one is exactly the average of the clients' products (as FFA-LoRA, but both factors learn).

- Odd rounds train B (A frozen), even rounds A (B frozen): with ``lora-init=gaussian`` B starts
  at 0, so A's gradient is 0 until B has moved; B goes first. The server sends the round's
  factor with every message (``client_config``: ``rolora-factor``); a client freezes the other
  one (``configure_client``), so its trainable tensors, and its upload, are that factor + head.
- Down: A, B and head every round. The frozen factor of round t was aggregated in round t-1, so
  no client sampled in round t holds it, and the trained factor is only held by the clients of
  round t-1: fedpeft's clients keep no state, and every message carries both (bytes counted).
- Up: the trained factor + head (about half of FedLR's upload). ``upload_reference``: updates
  are checked against exactly those tensors.
- Aggregation: the run's strategy averages what came up; ``KeepFrozen``
  (``federation/strategies/partial.py``) puts the frozen factor back unchanged, so a B-round
  changes only B (and the head) and an A-round only A. Strategies that keep a server state over
  every tensor (fedavgm, fedadam, fedyogi, fedadagrad), qfedavg, DP and ``aggregation=exact-lora``
  (redundant: the average is already exact) are refused.
- ``lora-init=svd``: FeDeRA's SVD start with the residual frozen (anchor sent once per client).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, RunConfig
from .fedsa_lora import SVDStartMixin
from .lora import LoRA, lora_layers

# strategies that average (or robustly combine) the replies' tensors and keep no per-tensor state
ROLORA_STRATEGIES = ("fedavg", "fedprox", "fedmedian", "fedtrimmedavg", "krum", "multikrum",
                     "bulyan")


def factor_of(server_round: int) -> str:
    """The factor round ``server_round`` trains: B in odd rounds, A in even ones."""
    return "B" if server_round % 2 == 1 else "A"


def frozen_key(name: str, factor: str) -> bool:
    """Whether tensor ``name`` is the factor that does not train when ``factor`` does."""
    other = "A" if factor == "B" else "B"
    return f".lora_{other}." in name


class RoLoRA(SVDStartMixin, LoRA):
    """LoRA whose rounds alternate between training B (A frozen) and A (B frozen)."""

    name = "rolora"
    paper = "RoLoRA (Chen et al., NeurIPS 2025, arXiv 2502.01755)"
    default_lr = 2e-3  # FedLR's (lora-init=gaussian); FeDeRA's with lora-init=svd

    def __init__(self, cfg: RunConfig, peft_task_type: str) -> None:
        super().__init__(cfg, peft_task_type)
        self.init = self._init_value()
        self.factor = "AB"  # the server's model: both factors (the global state); clients: one

    @classmethod
    def check_settings(cls, cfg: RunConfig) -> None:
        if cfg.strategy not in ROLORA_STRATEGIES:
            raise ConfigError(f"method=rolora trains a different factor every round, which "
                              f"strategy={cfg.strategy} (a server state over every tensor) does "
                              f"not follow; use one of {', '.join(ROLORA_STRATEGIES)}")
        if cfg.dp != "none":
            raise ConfigError(f"method=rolora uploads a different factor every round; dp="
                              f"{cfg.dp} (clipping against what was sent) is not supported with "
                              "it; use dp=none")
        if cfg.aggregation == "exact-lora":
            raise ConfigError("aggregation=exact-lora is redundant with method=rolora (one "
                              "factor is frozen and shared, so FedAvg of the other is already "
                              "exact); use aggregation=fedavg")

    # --- the round's factor ------------------------------------------------------------------
    def client_config(self, server_round: int) -> dict[str, Any]:
        return {"rolora-factor": factor_of(server_round)}

    def configure_client(self, runtime: Any, config: Mapping[str, Any]) -> None:
        factor = str(config.get("rolora-factor", "B"))
        if factor not in ("A", "B"):
            raise ValueError(f"rolora-factor must be A or B, got {factor!r}")
        for layer in lora_layers(runtime.model).values():
            layer.lora_A.requires_grad_(factor == "A")
            layer.lora_B.requires_grad_(factor == "B")
        self.factor = factor

    def upload_reference(self, sent: dict[str, np.ndarray], client: int,
                         server_round: int) -> dict[str, np.ndarray]:
        factor = factor_of(server_round)
        return {k: v for k, v in sent.items() if not frozen_key(k, factor)}

    def make_strategy(self, cfg: RunConfig, common: dict[str, Any]) -> Any:
        from ..federation.strategies.build import make_strategy
        from ..federation.strategies.partial import KeepFrozen

        return KeepFrozen(make_strategy(cfg, self.lr, None))

    # --- what travels ------------------------------------------------------------------------
    # export_state (the base's): the trainable tensors, i.e. on a client the round's factor +
    # head, on the server (nothing frozen) A, B and head: the global state.
    def import_state(self, model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
        """Load A, B and head, whichever of them trains this round."""
        params = dict(model.named_parameters())
        wanted = {n for n, p in params.items()
                  if p.requires_grad or ".lora_A." in n or ".lora_B." in n}
        if set(state) != wanted:
            raise ValueError(f"rolora state does not match A, B and head: missing "
                             f"{sorted(wanted - set(state))[:3]}, unexpected "
                             f"{sorted(set(state) - wanted)[:3]}")
        with torch.no_grad():
            for name in wanted:
                params[name].copy_(torch.as_tensor(np.asarray(state[name])).to(params[name].dtype))
