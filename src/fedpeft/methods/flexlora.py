"""FlexLoRA (Bai et al., NeurIPS 2024, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", arXiv 2402.11505).

Clients train LoRA at their own ranks r_k (``client-ranks``, ``lora_family.py``). The server
forms the full-size weighted mean of the clients' updates, P = sum_k w_k s_k B_k A_k (w_k: example
counts, s_k = lora-alpha / r_k), takes its SVD, and keeps the rank-``lora-rank`` factors as the
global LoRA (``aggregation.exact_lora_mean`` through ``strategies.exact_lora.ExactLoRA``: with
every rank equal this is exactly ``aggregation=exact-lora``, FlexLoRA's homogeneous case). Each
client receives the rank-r_k truncation of the global factors, rescaled so that its own scale
gives s_k B_k A_k = the best rank-r_k approximation of P (the SVD's components are nested).

- Down: rank-r_k A, B + head (r_k (d_in + d_out) per target); a client at ``lora-rank`` gets the
  global state itself.
- Up: the same shapes (the r_k components it trained) + head.
- ``lora-init=svd`` (FeDeRA's start: A, B from the SVD of W, residual frozen, anchor sent once)
  works with equal ranks only: a truncated SVD start would leave a rank-r_k client's model short
  of W by the components it does not hold.
- The round log's ``lora-truncation-error`` is ||P - s B A|| / ||P|| of the global rank.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..config import ConfigError, RunConfig
from .fedsa_lora import SVDStartMixin
from .lora_family import RankedLoRA, check_own_rule, rank_budget_rows, truncate


class FlexLoRA(SVDStartMixin, RankedLoRA):
    """Heterogeneous-rank LoRA aggregated through the SVD of the mean product (FlexLoRA)."""

    name = "flexlora"
    paper = "FlexLoRA (Bai et al., NeurIPS 2024, arXiv 2402.11505)"
    default_lr = 2e-3  # FedLR's (the same LoRA, the same start)

    def __init__(self, cfg: RunConfig, peft_task_type: str) -> None:
        super().__init__(cfg, peft_task_type)
        self.init = self._init_value()

    @classmethod
    def check_settings(cls, cfg: RunConfig) -> None:
        check_own_rule(cfg)
        if cfg.lora_init == "svd" and cfg.client_ranks:
            raise ConfigError("method=flexlora with lora-init=svd needs one rank for every "
                              "client: a rank-r_k client would miss the SVD start's other "
                              "components (its model would not start at W); drop client-ranks "
                              "or use lora-init=gaussian")

    def client_payload(self, global_state: dict[str, np.ndarray], client: int,
                       server_round: int) -> dict[str, np.ndarray]:
        rank = self.rank_of(client)
        if rank == self.cfg.lora_rank:
            return global_state
        # s_k (c B_:r)(c A_r:) = s_max B_:r A_r: with c = sqrt(s_max / s_k)
        return truncate(global_state, rank, math.sqrt(self.global_scale / self.client_scale(rank)))

    def make_strategy(self, cfg: RunConfig, common: dict[str, Any]) -> Any:
        from ..federation.strategies.exact_lora import ExactLoRA

        return ExactLoRA(scaling=self.global_scale, rank=cfg.lora_rank,
                         client_scaling=lambda client: self.client_scale(self.rank_of(client)),
                         **common)

    def budget_rows(self, runtime: Any) -> list[dict[str, Any]]:
        return rank_budget_rows(self, runtime)
