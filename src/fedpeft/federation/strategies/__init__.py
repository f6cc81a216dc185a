"""Aggregation strategies: Flower's own, by name, with fedpeft's guarantees around them.

``strategy=<name>`` picks one of Flower's message-API strategies (``flwr.serverapp.strategy``);
its settings are fedpeft keys mapped onto the class's own constructor arguments, and a key left
unset takes the class's own default (``fedpeft strategies`` reads them from the class). The
round loop stays fedpeft's (``server_app.py``): it samples clients by partition id, validates
every update, retries, sends FeDeRA's anchor and counts bytes, and hands the strategy exactly
the sampled nodes (``configure_train``) and exactly the validated updates (``aggregate_train``).
``dp=`` wraps the strategy in Flower's differential-privacy wrappers (``dp.py``);
``aggregation=exact-lora`` is fedpeft's own rule, a FedAvg subclass (``exact_lora.py``).

This module is data only (no Flower import), so the configuration can be checked before
anything heavy loads; ``build.py`` makes the objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StrategySpec:
    """A strategy by name: its Flower class and which fedpeft settings set which arguments."""

    flower_class: str  # attribute of ``flwr.serverapp.strategy``
    settings: dict[str, str] = field(default_factory=dict)  # fedpeft field -> constructor kwarg
    about: str = ""


# Server optimisers (Reddi et al., 2021), momentum (Hsu et al., 2019), FedProx (Li et al., 2020),
# q-FFL (Li et al., 2020) and the robust aggregators (Yin et al., 2018; Blanchard et al., 2017;
# El Mhamdi et al., 2018), all as Flower implements them.
STRATEGIES: dict[str, StrategySpec] = {
    "fedavg": StrategySpec("FedAvg", {}, "weighted mean of the updates (McMahan et al., 2017)"),
    "fedavgm": StrategySpec("FedAvgM", {"server_lr": "server_learning_rate",
                                        "server_momentum": "server_momentum"},
                            "FedAvg with server momentum (Hsu et al., 2019)"),
    "fedadam": StrategySpec("FedAdam", {"server_lr": "eta", "beta_1": "beta_1",
                                        "beta_2": "beta_2", "tau": "tau"},
                            "Adam on the server's pseudo-gradient (Reddi et al., 2021)"),
    "fedyogi": StrategySpec("FedYogi", {"server_lr": "eta", "beta_1": "beta_1",
                                        "beta_2": "beta_2", "tau": "tau"},
                            "Yogi on the server's pseudo-gradient (Reddi et al., 2021)"),
    "fedadagrad": StrategySpec("FedAdagrad", {"server_lr": "eta", "tau": "tau"},
                               "Adagrad on the server's pseudo-gradient (Reddi et al., 2021)"),
    "fedprox": StrategySpec("FedProx", {"proximal_mu": "proximal_mu"},
                            "FedAvg + clients add (mu/2)||w - w_global||^2 (Li et al., 2020)"),
    "qfedavg": StrategySpec("QFedAvg", {"qffl_q": "q"},
                            "q-FFL: clients with higher loss weigh more (Li et al., 2020)"),
    "fedmedian": StrategySpec("FedMedian", {}, "coordinate-wise median (Yin et al., 2018)"),
    "fedtrimmedavg": StrategySpec("FedTrimmedAvg", {"trim_beta": "beta"},
                                  "coordinate-wise trimmed mean (Yin et al., 2018)"),
    "krum": StrategySpec("Krum", {"num_malicious_nodes": "num_malicious_nodes"},
                         "the update closest to its neighbours (Blanchard et al., 2017)"),
    "multikrum": StrategySpec("MultiKrum", {"num_malicious_nodes": "num_malicious_nodes",
                                            "num_nodes_to_select": "num_nodes_to_select"},
                              "mean of the Krum-best updates (Blanchard et al., 2017)"),
    "bulyan": StrategySpec("Bulyan", {"num_malicious_nodes": "num_malicious_nodes"},
                           "Krum selection, then trimmed mean (El Mhamdi et al., 2018)"),
}

# Every strategy-specific setting (fedpeft field names), for the check that a set one is used.
STRATEGY_SETTINGS = sorted({k for spec in STRATEGIES.values() for k in spec.settings})

DP_MODES = ("none", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")
DP_SETTINGS = {  # fedpeft field -> the modes that use it
    "dp_noise_multiplier": DP_MODES[1:],
    "dp_clipping_norm": DP_MODES[1:],  # the initial norm of the adaptive modes
    "dp_target_quantile": ("server-adaptive", "client-adaptive"),
    "dp_clip_norm_lr": ("server-adaptive", "client-adaptive"),
    "dp_clipped_count_stddev": ("server-adaptive", "client-adaptive"),
}


def check_strategy_settings(cfg) -> None:  # noqa: ANN001 (RunConfig; no import cycle)
    """Raise ``ConfigError`` for an unknown strategy or dp mode, or a setting the chosen ones do
    not use (a typo'd experiment would otherwise run as plain FedAvg)."""
    from ...config import ConfigError

    spec = STRATEGIES.get(cfg.strategy)
    if spec is None:
        raise ConfigError(f"strategy={cfg.strategy!r} is unknown; choose from "
                          f"{', '.join(STRATEGIES)} (see `fedpeft strategies`)")
    for name in STRATEGY_SETTINGS:
        if getattr(cfg, name) is not None and name not in spec.settings:
            users = [s for s, sp in STRATEGIES.items() if name in sp.settings]
            raise ConfigError(f"{name.replace('_', '-')} is a setting of strategy "
                              f"{' / '.join(users)}, not of strategy={cfg.strategy}")
    f, n = cfg.num_malicious_nodes or 0, cfg.clients_per_round
    need = {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}.get(cfg.strategy, 1)
    if n < need:  # Flower would log it and aggregate nothing, every round
        raise ConfigError(f"strategy={cfg.strategy} with num-malicious-nodes={f} needs "
                          f"clients-per-round >= {need}, got {n}")
    if cfg.dp not in DP_MODES:
        raise ConfigError(f"dp={cfg.dp!r} is unknown; choose from {', '.join(DP_MODES)}")
    for name, modes in DP_SETTINGS.items():
        if getattr(cfg, name) is not None and cfg.dp not in modes:
            raise ConfigError(f"{name.replace('_', '-')} applies to dp={' / '.join(modes)}, "
                              f"not to dp={cfg.dp}")
    if cfg.dp != "none":
        if cfg.dp_noise_multiplier is None or not cfg.dp_noise_multiplier >= 0:
            raise ConfigError(f"dp={cfg.dp} needs dp-noise-multiplier >= 0 (the Gaussian noise's "
                              "std over the clipping norm)")
        if cfg.dp.endswith("fixed") and not (cfg.dp_clipping_norm or 0) > 0:
            raise ConfigError(f"dp={cfg.dp} needs dp-clipping-norm > 0")
    if cfg.aggregation == "exact-lora" and (cfg.strategy != "fedavg" or cfg.dp != "none"):
        raise ConfigError("aggregation=exact-lora is its own aggregation rule (the exact mean of "
                          "s*B*A, re-factored by SVD): it cannot be combined with strategy="
                          f"{cfg.strategy} or dp={cfg.dp}; use strategy=fedavg dp=none")


__all__ = ["DP_MODES", "STRATEGIES", "STRATEGY_SETTINGS", "StrategySpec",
           "check_strategy_settings"]
