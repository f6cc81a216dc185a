"""A strategy's state in the checkpoint: FedAdam's and FedYogi's moments, FedAvgM's momentum,
adaptive DP's clipping norm, the privacy accountant's compositions.

Flower's strategies keep their state in plain attributes (``m_t``, ``v_t``, ``momentum_vector``,
``current_arrays``, ``clipping_norm``) and offer no state_dict, so it is read generically: every
attribute that holds arrays (a dict or list of ndarrays, or an ArrayRecord) becomes tensors of
the checkpoint file, every number a JSON value, and the accountant its own ``state_dict()``; a DP
wrapper's inner strategy is saved under ``strategy.``. A resumed run sets them back, so FedAdam
resumed after SIGKILL ends with the same state as an uninterrupted run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

Tensors = dict[str, np.ndarray]
_SKIP = {"accountant", "_pending_events", "strategy"}


def strategy_state(strategy: Any, prefix: str = "") -> tuple[dict[str, Any], Tensors]:
    """``(json_state, tensors)`` of ``strategy`` and, nested, of a wrapped one."""
    meta: dict[str, Any] = {}
    tensors: Tensors = {}
    for name, value in vars(strategy).items():
        if name in _SKIP or callable(value):
            continue
        key = f"{prefix}{name}"
        if isinstance(value, bool | int | float | str) or value is None:
            meta[key] = value
        elif isinstance(value, ArrayRecord):
            meta[key] = {"kind": "arrayrecord", "keys": list(value.keys())}
            tensors.update({f"{key}/{k}": np.asarray(v.numpy()) for k, v in value.items()})
        elif isinstance(value, dict) and value and all(isinstance(v, np.ndarray)
                                                        for v in value.values()):
            meta[key] = {"kind": "dict", "keys": list(value)}
            tensors.update({f"{key}/{k}": v for k, v in value.items()})
        elif isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
            meta[key] = {"kind": "list", "length": len(value)}
            tensors.update({f"{key}/{i}": v for i, v in enumerate(value)})
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None:
        meta[f"{prefix}accountant"] = {"kind": "accountant", "state": accountant.state_dict()}
    inner = getattr(strategy, "strategy", None)
    if inner is not None and not callable(inner):
        inner_meta, inner_tensors = strategy_state(inner, f"{prefix}strategy.")
        meta.update(inner_meta)
        tensors.update(inner_tensors)
    return meta, tensors


def load_strategy_state(strategy: Any, meta: dict[str, Any], tensors: Tensors,
                        prefix: str = "") -> None:
    """Set back what ``strategy_state`` saved (a checkpoint without it leaves ``strategy``)."""
    for key, value in meta.items():
        if not key.startswith(prefix) or "." in key[len(prefix):]:
            continue
        name = key[len(prefix):]
        if not isinstance(value, dict):
            setattr(strategy, name, value)
        elif value["kind"] == "arrayrecord":
            setattr(strategy, name, ArrayRecord({k: Array(np.ascontiguousarray(
                tensors[f"{key}/{k}"])) for k in value["keys"]}))
        elif value["kind"] == "dict":
            setattr(strategy, name, {k: tensors[f"{key}/{k}"] for k in value["keys"]})
        elif value["kind"] == "list":
            setattr(strategy, name, [tensors[f"{key}/{i}"] for i in range(value["length"])])
        elif value["kind"] == "accountant" and getattr(strategy, "accountant", None):
            strategy.accountant.load_state_dict(value["state"])
    inner = getattr(strategy, "strategy", None)
    if inner is not None and not callable(inner):
        load_strategy_state(inner, meta, tensors, f"{prefix}strategy.")
