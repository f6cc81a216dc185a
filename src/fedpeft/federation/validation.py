"""Checks on a client's update before it is aggregated (pure functions, no Flower).

A client update is a ``{name: ndarray}`` state. The server compares it with the state it sent
that round (the *reference*): the same keys, shapes and dtypes, finite values, and a distance
from the reference that is not absurd. An update that fails any check is rejected and logged;
the others are aggregated. One bad client (a bug, a flipped bit, a hostile participant) then
cannot turn the global model into NaNs or drag it arbitrarily far.

The distance bound is relative, ``||w_k - w||_2 <= max_update_norm * max(1, ||w||_2)``, so one
setting (``max-update-norm``, default 100) fits methods whose states differ by orders of
magnitude in size (a LoRA adapter vs. a full encoder). It is a sanity bound, not a defence
against subtle poisoning (that needs robust aggregation, which is out of scope here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

State = Mapping[str, np.ndarray]


def global_norm(state: State) -> float:
    """L2 norm of all tensors of ``state`` taken together (float64 accumulation)."""
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in state.values()))


def distance(update: State, reference: State) -> float:
    """L2 norm of ``update - reference`` over all tensors (same keys and shapes assumed)."""
    total = 0.0
    for key, ref in reference.items():
        diff = update[key].astype(np.float64) - ref.astype(np.float64)
        total += float(np.sum(np.square(diff)))
    return math.sqrt(total)


def check_structure(update: State, reference: State) -> str | None:
    """Why ``update`` does not have ``reference``'s keys, shapes and dtypes (None if it does)."""
    missing = sorted(reference.keys() - update.keys())
    extra = sorted(update.keys() - reference.keys())
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) {missing[:3]}")
        if extra:
            parts.append(f"unexpected {len(extra)} key(s) {extra[:3]}")
        return "; ".join(parts)
    for key, ref in reference.items():
        value = update[key]
        if not isinstance(value, np.ndarray):
            return f"{key}: not an array ({type(value).__name__})"
        if value.shape != ref.shape:
            return f"{key}: shape {value.shape} != {ref.shape}"
        if value.dtype != ref.dtype:
            return f"{key}: dtype {value.dtype} != {ref.dtype}"
    return None


def check_finite(update: State) -> str | None:
    """Why ``update`` holds NaN or infinite values (None if every value is finite)."""
    for key, value in update.items():
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            return f"{key}: {bad} non-finite value(s)"
    return None


def check_norm(update: State, reference: State, max_update_norm: float) -> str | None:
    """Why ``update`` is too far from ``reference`` (None if within the bound; 0 = no bound)."""
    if max_update_norm <= 0:
        return None
    dist = distance(update, reference)
    bound = max_update_norm * max(1.0, global_norm(reference))
    if not dist <= bound:
        return f"update norm {dist:.4g} exceeds max-update-norm bound {bound:.4g}"
    return None


def check_weight(num_examples: float, expected: int) -> str | None:
    """Why a reported example count (FedAvg's weight) is not the client's shard size."""
    if not (math.isfinite(num_examples) and num_examples == expected):
        return f"num-examples={num_examples} but the client's shard has {expected} examples"
    return None


def check_own_weight(num_examples: float, first: int | None) -> str | None:
    """Why the example count of a node that trains on its own files (the server cannot count
    them) is not acceptable: not a whole number >= 1, or not the count of its first update."""
    if not (math.isfinite(num_examples) and num_examples >= 1
            and num_examples == int(num_examples)):
        return f"num-examples={num_examples}: expected a whole number >= 1"
    if first is not None and num_examples != first:
        return (f"num-examples={num_examples} but this node (its own data) reported {first} in "
                "its first update; a node's FedAvg weight may not change during a run")
    return None


def check_update(update: State, reference: State, max_update_norm: float) -> str | None:
    """All checks in order (structure, finiteness, norm); the first failure's reason or None."""
    return (check_structure(update, reference) or check_finite(update)
            or check_norm(update, reference, max_update_norm))


def ordered_like(update: State, reference: State) -> dict[str, np.ndarray]:
    """``update`` with its keys in ``reference``'s order (aggregation expects one order)."""
    return {key: update[key] for key in reference}
