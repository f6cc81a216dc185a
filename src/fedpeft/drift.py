"""Weight drift of LoRA factors across rounds: magnitude and direction variation (FeDeRA §4.2).

FeDeRA (Yan et al., 2024, arXiv 2404.18848, §4.2, Fig. 3/4) explains why an SVD-initialised
adapter copes better with non-IID clients by how much the global A and B matrices move from one
round to the next, split DoRA-style (Liu et al., 2024, §3) into a magnitude and a direction.
Matrices are taken as stored, in PyTorch's (out, in) layout, and the norms follow DoRA as PEFT
implements it (``peft.tuners.lora.dora.DoraLinearLayer.get_weight_norm``:
``torch.linalg.norm(weight, dim=1)``): **one norm per output feature**, i.e. per row. (The
paper calls them the column-wise norms ``||W||_c`` in its own notation for W; PEFT's code,
which we follow, takes them along dim 1 of the (out, in) weight.)

- magnitude of M (d_out, d_in): the row-wise L2 norms ``m_i = ||M[i, :]||`` (d_out,);
- direction of M: the row-normalised matrix ``M / m[:, None]``;
- magnitude variation between M and M': ``mean_i |m_i - m'_i|`` over the d_out rows;
- direction variation: ``mean_i (1 - cos(M[i, :], M'[i, :]))`` over the rows whose norm is
  non-zero in both (a zero row, e.g. of FedLR's B at init, has no direction); ``None`` when no
  row qualifies.

So A (r, d_in) gets one norm per rank component (its row: the d_in-vector that component reads
from the input) and B (d_out, r) one per output feature of the adapted layer (an r-vector): the
per-output-feature convention DoRA applies to W + s·B·A, applied to each factor.

Records logged before this convention (fedpeft's drift records without ``"norms"``) took one
norm per *input* feature (the columns of the (out, in) matrix: per input feature of A, per rank
component of B). Their values are not comparable with records carrying ``"norms": "rows"`` and
cannot be recomputed from a run's log (it holds the drift, not every round's global state).

What is compared (``between``):
- ``"weights"`` (default): successive global matrices, M_{t-1} -> M_t. This is DoRA's analysis
  (which compares a fine-tuned W with W_0) applied round to round, and what FeDeRA plots: how far
  one round of FedAvg moves A and B. Needs the previous global state only.
- ``"updates"``: successive global updates, dM_t = M_t - M_{t-1} vs dM_{t+1}. Asks whether
  consecutive rounds push the factors the same way (a direction variation near 1 means the
  rounds' updates are unrelated: clients pull the model in turn). Needs two previous states.

``DriftTracker`` keeps O(1) states and returns one JSON-able record per round; the server stores
it as the round log's ``drift`` field (format in ``DriftTracker.observe``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
_LORA = re.compile(r"(?:^|\.)([^.]+)\.lora_([AB])(?:\.|$)")
BETWEEN = ("weights", "updates")
NORMS = "rows"  # the record's "norms": one norm per output feature (row of the (out, in) matrix)


def magnitude(matrix: np.ndarray) -> np.ndarray:
    """Row-wise L2 norms of a (d_out, d_in) matrix, shape (d_out,): one per output feature, as
    PEFT's DoRA (``weight.norm(p=2, dim=1)``)."""
    return np.linalg.norm(np.asarray(matrix, dtype=np.float64), axis=1)


def direction(matrix: np.ndarray) -> np.ndarray:
    """The row-normalised matrix ``M / m[:, None]``; zero rows stay zero."""
    m = np.asarray(matrix, dtype=np.float64)
    norms = magnitude(m)[:, None]  # (d_out, 1)
    return np.divide(m, norms, out=np.zeros_like(m), where=norms > 0)


def magnitude_variation(before: np.ndarray, after: np.ndarray) -> float:
    """Mean absolute difference of the row norms of two matrices of the same shape."""
    _check_shapes(before, after)
    return float(np.mean(np.abs(magnitude(after) - magnitude(before))))


def direction_variation(before: np.ndarray, after: np.ndarray) -> float | None:
    """Mean over rows of ``1 - cos`` between matching rows; rows that are zero in either
    matrix are skipped; None if every row is zero in one of them."""
    _check_shapes(before, after)
    d0, d1 = direction(before), direction(after)
    valid = (magnitude(before) > 0) & (magnitude(after) > 0)  # (d_out,)
    if not valid.any():
        return None
    cosine = np.sum(d0 * d1, axis=1)[valid]  # (valid rows,)
    return float(np.mean(1.0 - np.clip(cosine, -1.0, 1.0)))


def parse_lora_key(key: str) -> tuple[str, str, str] | None:
    """``(layer, module, "A"|"B")`` of a PEFT LoRA parameter name, None for other parameters.

    ``base_model.model.bert.encoder.layer.3.attention.self.query.lora_A.default.weight`` ->
    ``("3", "query", "A")``; a LoRA module outside numbered layers gets its path as layer.
    """
    lora = _LORA.search(key)
    if lora is None:
        return None
    layer = _LAYER.search(key)
    where = layer.group(1) if layer else key[: lora.start(1)].rstrip(".") or "-"
    return where, lora.group(1), lora.group(2)


def variations(before: Mapping[str, np.ndarray],
               after: Mapping[str, np.ndarray]) -> dict[str, dict[str, float | None]]:
    """Per LoRA key present in both states with equal shapes: magnitude and direction variation."""
    out = {}
    for key, value in after.items():
        if parse_lora_key(key) is None or key not in before:
            continue
        if np.shape(before[key]) != np.shape(value) or np.ndim(value) != 2:
            continue
        out[key] = {"magnitude": magnitude_variation(before[key], value),
                    "direction": direction_variation(before[key], value)}
    return out


class DriftTracker:
    """Round-by-round drift of the global LoRA factors; call ``observe`` with every global state.

    Typical server use: ``tracker.observe(initial_state)`` before round 1, then after each
    aggregation ``drift = tracker.observe(global_state)`` and ``record["drift"] = drift`` when it
    is not None. Only LoRA factors (``...lora_A...``/``...lora_B...``) are tracked; a key whose
    shape changes or that appears later (SLoRA's stage switch) starts afresh.
    """

    def __init__(self, between: str = "weights", digits: int = 6) -> None:
        if between not in BETWEEN:
            raise ValueError(f"between must be one of {BETWEEN}, got {between!r}")
        self.between = between
        self.digits = digits
        self._previous: dict[str, np.ndarray] | None = None  # M_{t-1}
        self._update: dict[str, np.ndarray] | None = None  # dM_{t-1} ("updates" only)

    def observe(self, state: Mapping[str, np.ndarray]) -> dict[str, Any] | None:
        """Record drift from the previous call to this one; None while history is too short.

        Returns ``{"between": "weights"|"updates", "norms": "rows",
        "mean": {"A": {"magnitude": x, "direction": y}, "B": {...}},
        "layers": {"<layer>": {"<module>": {"A": {"magnitude": x, "direction": y}, "B": ...}}}}``
        where ``mean`` is the unweighted mean over every tracked matrix of that kind, values are
        rounded to ``digits`` significant digits, and a direction is None when undefined.
        ``"norms": "rows"`` marks the per-output-feature convention (records without it were
        logged with one norm per input feature; see the module docstring).
        """
        current = {k: np.array(v, dtype=np.float64) for k, v in state.items()
                   if parse_lora_key(k) is not None}
        previous, self._previous = self._previous, current
        if previous is None:
            return None
        if self.between == "weights":
            per_key = variations(previous, current)
        else:
            update = {k: v - previous[k] for k, v in current.items()
                      if k in previous and previous[k].shape == v.shape}
            last, self._update = self._update, update
            if last is None:
                return None
            per_key = variations(last, update)
        return self._record(per_key) if per_key else None

    def _record(self, per_key: Mapping[str, Mapping[str, float | None]]) -> dict[str, Any]:
        layers: dict[str, dict[str, dict[str, dict[str, float | None]]]] = {}
        pooled: dict[str, dict[str, list[float]]] = {}
        for key, values in per_key.items():
            layer, module, factor = parse_lora_key(key)  # type: ignore[misc]
            layers.setdefault(layer, {}).setdefault(module, {})[factor] = {
                name: self._round(v) for name, v in values.items()}
            for name, v in values.items():
                found = pooled.setdefault(factor, {}).setdefault(name, [])
                if v is not None:
                    found.append(v)
        mean = {factor: {name: self._round(float(np.mean(vs))) if vs else None
                         for name, vs in by_name.items()}
                for factor, by_name in sorted(pooled.items())}
        ordered = dict(sorted(layers.items(), key=lambda kv: layer_order(kv[0])))
        return {"between": self.between, "norms": NORMS, "mean": mean, "layers": ordered}

    def _round(self, value: float | None) -> float | None:
        if value is None or not math.isfinite(value):
            return None
        return float(f"{value:.{self.digits}g}")


def layer_order(layer: str) -> tuple[int, int | str]:
    """Sort key of a layer name: numbered layers by number, then the others by name."""
    return (0, int(layer)) if layer.isdigit() else (1, layer)


def _check_shapes(before: np.ndarray, after: np.ndarray) -> None:
    if np.shape(before) != np.shape(after) or np.ndim(before) != 2:
        raise ValueError(f"expected two 2-D matrices of one shape, got {np.shape(before)} and "
                         f"{np.shape(after)}")
