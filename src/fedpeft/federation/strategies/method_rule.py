"""A method's own aggregation rule as a Flower strategy (flora, fedex-lora, hetlora).

``MethodRule`` is Flower's FedAvg with ``aggregate_train`` replaced by the method's rule, a pure
function of the round's validated updates (``rule(server_round, states, weights, clients,
previous)``: states in partition order, their example counts, their partition ids, and the global
state the round started from). The round's global state comes from ``configure_train``, which
fedpeft's round loop calls first every round (``rounds.train_round``), so a resumed run needs no
extra strategy state: it is kept in a tuple, which the checkpoint's generic strategy state
(``state.py``) leaves alone (the global state is saved beside it anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from .exact_lora import valid_states

State = dict[str, np.ndarray]
Rule = Callable[[int, list[State], list[float], list[int], State],
                tuple[State, dict[str, float]]]


class MethodRule(FedAvg):
    """FedAvg whose aggregation is ``rule`` (see the module docstring)."""

    def __init__(self, *, rule: Rule, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rule = rule
        self._round_start: tuple[ArrayRecord, ...] = ()  # this round's global state

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._round_start = (arrays,)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, states, weights = valid_states(self, replies)
        if not valid:
            return None, None
        clients = [int(m.content["metrics"]["partition-id"]) for m in valid]
        previous = {k: np.asarray(v.numpy()) for k, v in self._round_start[0].items()} \
            if self._round_start else {}
        state, metrics = self.rule(server_round, states, weights, clients, previous)
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})
        return arrays, MetricRecord(metrics)
