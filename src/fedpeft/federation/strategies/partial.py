"""A strategy for rounds in which clients upload only part of the global state (RoLoRA).

``KeepFrozen`` wraps the run's Flower strategy. ``configure_train`` remembers the global state
the round starts from (the arrays the round loop gives the strategy) and lets the inner strategy
configure the round (FedProx's ``proximal-mu``, ...); ``aggregate_train`` lets the inner strategy
combine what the clients sent (one LoRA factor + the head) and returns the whole next global
state: the combined tensors, and every other tensor exactly as it was. Evaluation is the inner
strategy's. The inner strategy must keep no state over all tensors across rounds (FedAvgM's
momentum, FedAdam's moments): RoLoRA's settings check refuses those.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class KeepFrozen(Strategy):
    """``strategy`` for partial uploads: untouched tensors keep their global values."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self._start: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._start = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None or self._start is None:
            return arrays, metrics
        unknown = set(arrays) - set(self._start)
        if unknown:
            raise ValueError(f"aggregated tensors the global state lacks: {sorted(unknown)[:3]}")
        merged = ArrayRecord({k: arrays.get(k, v) for k, v in self._start.items()})
        self._start = None  # not kept in the checkpoint: the next round sets it again
        return merged, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def __getattr__(self, name: str) -> Any:  # weighted_by_key, fraction_evaluate, ...
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)
