"""The federation's settings beyond FedAvg: a Flower strategy with its server optimiser or robust
rule, fedpeft's exact LoRA aggregation, and Flower's differential-privacy wrappers
(``federation/strategies/``)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ConfigError, setting


@dataclass
class StrategyConfig:
    """Aggregation: Flower strategies, server optimisers, robust rules, DP (see
    federation/strategies/)."""

    aggregation: str = setting("fedavg", "fedavg | exact-lora (mean of s*B*A refactored by SVD)")
    strategy: str = setting("fedavg", "a Flower strategy by name (see `fedpeft strategies`)")
    server_lr: float | None = setting(
        None, "fedavgm/fedadam/fedyogi/fedadagrad: server learning rate; None = Flower's default")
    server_momentum: float | None = setting(None, "fedavgm: server momentum")
    beta_1: float | None = setting(None, "fedadam/fedyogi: first-moment decay")
    beta_2: float | None = setting(None, "fedadam/fedyogi: second-moment decay")
    tau: float | None = setting(None, "fedadam/fedyogi/fedadagrad: adaptivity (epsilon)")
    proximal_mu: float | None = setting(None, "fedprox: weight mu of (mu/2)||w - w_global||^2")
    trim_beta: float | None = setting(None, "fedtrimmedavg: share trimmed at each end")
    num_malicious_nodes: int | None = setting(
        None, "krum/multikrum/bulyan: hostile clients tolerated")
    num_nodes_to_select: int | None = setting(None, "multikrum: updates averaged")
    qffl_q: float | None = setting(None, "qfedavg: fairness exponent q")
    dp: str = setting("none", "none | server-fixed | client-fixed | server-adaptive | "
                      "client-adaptive: Flower's DP wrappers")
    dp_noise_multiplier: float | None = setting(
        None, "dp: Gaussian noise std / clipping norm")
    dp_clipping_norm: float | None = setting(
        None, "dp: L2 clipping norm of a client's update (adaptive: the initial one, 0.1)")
    dp_target_quantile: float | None = setting(
        None, "dp adaptive: share of updates left unclipped (Flower: 0.5)")
    dp_clip_norm_lr: float | None = setting(None, "dp adaptive: clipping norm's learning rate")
    dp_clipped_count_stddev: float | None = setting(
        None, "dp adaptive: noise std of the clipped-update count (Flower: clients-per-round/20)")
    dp_delta: float | None = setting(
        None, "dp fixed: delta of the reported epsilon; None = 1 / num-clients^1.1")

    def check_strategy(self) -> None:
        """Each strategy's own settings (federation/strategies/), checked against the run's."""
        if self.aggregation not in ("fedavg", "exact-lora"):
            raise ConfigError(f"aggregation must be fedavg or exact-lora, got {self.aggregation!r}")
        from ..federation.strategies import check_strategy_settings

        check_strategy_settings(self)
        if self.dp_delta is not None and not 0 < self.dp_delta < 1:
            raise ConfigError(f"dp-delta must be in (0, 1), got {self.dp_delta}")
        if self.strategy == "qfedavg" and (getattr(self, "lr_schedule", "constant") != "constant"
                                           or getattr(self, "warmup_rounds", 0)):
            raise ConfigError("strategy=qfedavg uses one client learning rate for the whole run "
                              "(L = 1/lr); use lr-schedule=constant and warmup-rounds=0 with it")
