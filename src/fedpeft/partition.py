"""Non-IID client partitions: Dirichlet label skew (FeDeRA paper, App. A).

Each client ``j`` draws its class proportions ``q_j ~ Dirichlet(alpha * 1_K)``. Client sizes are
balanced (``n // N``, the first ``n % N`` clients one more), so heterogeneity is in the label mix
alone. Examples are dealt one at a time: a client with room left is chosen uniformly, and it
takes a class drawn from ``q_j`` renormalised over the classes that still have examples (a
client whose favourite classes ran out takes the next best; every example is used exactly once).
Small ``alpha`` (0.1) gives clients dominated by one or two classes; large ``alpha`` (100) gives
near-IID clients.

``min_size``: as sizes are balanced, a client can only be small when there are too few examples
for the number of clients; that is reported as an error naming both numbers, before training.

Everything here is a pure function of its arguments: same (labels, clients, alpha, seed,
min_size), same partition, on any machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import FedpeftError


class PartitionError(FedpeftError, ValueError):
    """The data cannot be split as asked."""


@dataclass(frozen=True)
class Partition:
    """``clients[j]`` = sorted example indices of client ``j``; ``classes`` = class names."""

    clients: list[np.ndarray]
    classes: list[str]
    histograms: np.ndarray  # (num_clients, num_classes) example counts

    def sizes(self) -> np.ndarray:
        return self.histograms.sum(axis=1)


def dirichlet_partition(labels: Sequence[object], num_clients: int, alpha: float, seed: int,
                        min_size: int = 1) -> Partition:
    """Split example indices among ``num_clients`` with Dirichlet(alpha) label skew.

    Parameters
    ----------
    labels : the partition class of every example (any hashable; compared as strings).
    num_clients : number of clients N.
    alpha : Dirichlet concentration (> 0).
    seed : seed of the ``numpy.random.Generator`` that makes every draw.
    min_size : the smallest allowed client.
    """
    if num_clients <= 0:
        raise PartitionError(f"num-clients must be > 0, got {num_clients}")
    if not alpha > 0:
        raise PartitionError(f"alpha must be > 0, got {alpha}")
    names = [str(label) for label in labels]
    n = len(names)
    if n // num_clients < min_size:
        raise PartitionError(f"{n} training examples cannot give {num_clients} clients at least "
                             f"min-size={min_size} each; use fewer clients or more data")
    classes, y = np.unique(np.asarray(names, dtype=object), return_inverse=True)
    k = len(classes)
    rng = np.random.default_rng(seed)
    proportions = rng.dirichlet(np.full(k, alpha), size=num_clients)  # (N, K)
    pools = [list(rng.permutation(np.flatnonzero(y == c))) for c in range(k)]
    left = np.array([len(p) for p in pools], dtype=np.int64)
    room = np.full(num_clients, n // num_clients, dtype=np.int64)
    room[: n % num_clients] += 1
    assigned: list[list[int]] = [[] for _ in range(num_clients)]
    open_clients = list(range(num_clients))
    for _ in range(n):
        j = open_clients[int(rng.integers(len(open_clients)))]
        weights = proportions[j] * (left > 0)
        total = weights.sum()
        # All the client's classes are exhausted (possible when alpha is tiny): take any class.
        weights = weights / total if total > 0 else (left > 0) / np.count_nonzero(left)
        c = int(rng.choice(k, p=weights))
        assigned[j].append(int(pools[c].pop()))
        left[c] -= 1
        room[j] -= 1
        if room[j] == 0:
            open_clients.remove(j)
    clients = [np.sort(np.asarray(a, dtype=np.int64)) for a in assigned]
    histograms = np.stack([np.bincount(y[idx], minlength=k) for idx in clients])
    return Partition(clients, [str(c) for c in classes], histograms)


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two distributions (normalised here)."""
    p = np.asarray(p, dtype=np.float64) / np.sum(p)
    q = np.asarray(q, dtype=np.float64) / np.sum(q)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def js_matrix(histograms: np.ndarray) -> np.ndarray:
    """Pairwise Jensen-Shannon divergences between clients' class distributions, (N, N)."""
    n = len(histograms)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = jensen_shannon(histograms[i], histograms[j])
    return out


def mean_pairwise_js(histograms: np.ndarray) -> float:
    """Mean JS divergence over all client pairs (0 = identical label mixes)."""
    n = len(histograms)
    if n < 2:
        return 0.0
    matrix = js_matrix(histograms)
    return float(matrix[np.triu_indices(n, k=1)].mean())


def describe(partition: Partition, max_clients: int = 20) -> str:
    """A text report: sizes, per-client class histograms and the mean pairwise JS divergence."""
    hist = partition.histograms
    sizes = partition.sizes()
    lines = [
        f"clients: {len(hist)}  examples: {int(sizes.sum())}  classes: {len(partition.classes)}",
        f"client size: min {sizes.min()}  mean {sizes.mean():.1f}  max {sizes.max()}",
        f"mean pairwise Jensen-Shannon divergence: {mean_pairwise_js(hist):.4f}",
        "classes: " + "  ".join(f"[{i}] {c}" for i, c in enumerate(partition.classes)),
        "per-client class histograms (columns = class index):",
        "client  size  " + " ".join(f"{i:>4}" for i in range(len(partition.classes))),
    ]
    for j, row in enumerate(hist[:max_clients]):
        lines.append(f"{j:>6}  {sizes[j]:>4}  " + " ".join(f"{v:>4}" for v in row))
    if len(hist) > max_clients:
        lines.append(f"... {len(hist) - max_clients} more clients")
    return "\n".join(lines)
