"""Making the strategy object of a run, and handing it exactly the nodes fedpeft sampled.

Flower's strategies sample nodes themselves (``sample_nodes``: a random share of the nodes the
grid lists). fedpeft samples by partition id with its own seeded generator, so that a run is the
same whichever node ids a deployment hands out and replays after a crash: the strategy is given
a ``SampledGrid`` that lists only the sampled nodes, with ``fraction_train=1``, so it addresses
each of them and nothing else.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flower

from ...config import ConfigError, RunConfig
from . import STRATEGIES
from .exact_lora import ExactLoRA

UNIFORM_WEIGHT = "uniform-weight"  # the reply metric DP aggregation weighs by (always 1)


class SampledGrid:
    """A view of ``grid`` whose nodes are the ones sampled for this round attempt."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        self._grid, self._nodes = grid, list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:  # the rest of the Grid API, unchanged
        return getattr(self._grid, name)


def flower_defaults(name: str) -> dict[str, Any]:
    """The constructor defaults of strategy ``name``'s Flower class, by fedpeft setting."""
    spec = STRATEGIES[name]
    params = inspect.signature(getattr(flower, spec.flower_class).__init__).parameters
    return {key: params[arg].default for key, arg in spec.settings.items()}


def make_strategy(cfg: RunConfig, client_lr: float, method: Any = None) -> flower.Strategy:
    """The run's strategy: the method's own rule where it has one (``Method.make_strategy``),
    else Flower's class for ``cfg.strategy`` (or fedpeft's exact LoRA mean), wrapped in Flower's
    DP wrapper for ``cfg.dp``."""
    dp = cfg.dp != "none"
    local = cfg.local_test_fraction > 0  # federated evaluation on the clients' local splits
    common = {"fraction_train": 1.0, "fraction_evaluate": 1.0 if local else 0.0,
              "min_train_nodes": 1, "min_evaluate_nodes": int(local), "min_available_nodes": 1,
              # DP's noise is calibrated to an unweighted mean of clipped updates
              "weighted_by_key": UNIFORM_WEIGHT if dp else "num-examples"}
    own = method.make_strategy(cfg, common) if method is not None else None
    if own is not None:
        return own
    if cfg.aggregation == "exact-lora":
        from ...methods.lora import lora_scaling  # alpha / r, or alpha / sqrt(r) with rsLoRA

        return ExactLoRA(scaling=lora_scaling(cfg), rank=cfg.lora_rank, **common)
    spec = STRATEGIES[cfg.strategy]
    kwargs = {arg: getattr(cfg, key) for key, arg in spec.settings.items()
              if getattr(cfg, key) is not None}
    if cfg.strategy in ("fedadam", "fedyogi", "fedadagrad"):
        kwargs["eta_l"] = client_lr  # FedOpt records the clients' rate (it does not use it)
    if cfg.strategy == "qfedavg":
        kwargs.update(client_learning_rate=client_lr, train_loss_key="train-loss")
    with quiet(logging.ERROR):  # "fraction_evaluate is 0": fedpeft evaluates on the server
        try:
            strategy = getattr(flower, spec.flower_class)(**common, **kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"strategy={cfg.strategy}: {err}") from None
        if dp:
            from .dp import wrap_dp

            strategy = wrap_dp(cfg, strategy)
    return strategy


@contextlib.contextmanager
def quiet(level: int = logging.WARNING) -> Iterator[None]:
    """Flower's strategies log every sampling and aggregation at INFO; fedpeft's round log
    says the same once per round."""
    logger = logging.getLogger("flwr")
    before = logger.level
    logger.setLevel(max(level, before))
    try:
        yield
    finally:
        logger.setLevel(before)


def strategies_table() -> str:
    """Markdown: every strategy, its Flower class, its settings with Flower's defaults; then the
    DP modes (what ``fedpeft strategies`` prints)."""
    from . import DP_MODES

    lines = ["| strategy | Flower class | settings (Flower's defaults) | what it does |",
             "|---|---|---|---|"]
    for name, spec in STRATEGIES.items():
        defaults = flower_defaults(name)
        settings = ", ".join(f"{key.replace('_', '-')}={value:g}"
                             if isinstance(value, int | float) else key.replace("_", "-")
                             for key, value in defaults.items()) or "-"
        lines.append(f"| {name} | {spec.flower_class} | {settings} | {spec.about} |")
    lines += ["", "Combine any strategy with `dp=` " + " | ".join(DP_MODES) + " (Flower's "
              "DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping; settings "
              "dp-noise-multiplier, dp-clipping-norm, dp-target-quantile, dp-clip-norm-lr, "
              "dp-clipped-count-stddev, dp-delta). `aggregation=exact-lora` (fedpeft's exact mean "
              "of s*B*A) works with strategy=fedavg dp=none only. See docs/strategies.md."]
    return "\n".join(lines)


def streams(strategy: flower.Strategy) -> bool:
    """Whether updates can be summed as they arrive (plain FedAvg) instead of all kept."""
    return type(strategy) is flower.FedAvg


def messages_by_node(messages: Iterable[Message]) -> dict[int, Message]:
    return {m.metadata.dst_node_id: m for m in messages}


__all__ = ["SampledGrid", "flower_defaults", "make_strategy", "messages_by_node", "quiet",
           "strategies_table", "streams"]
