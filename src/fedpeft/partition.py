"""Non-IID client partitions: the FeDeRA split and the splits other federated NLP papers use.

``partition=`` picks the scheme (``make_partition``); every one returns the same ``Partition``
(clients' example indices, class histograms), so the runtime, ``fedpeft partition`` and the run
log's ``partition.json`` treat them alike:

- ``balanced-dirichlet`` (default; FeDeRA paper, App. A), ``dirichlet_partition`` below: each
  client ``j`` draws its class proportions ``q_j ~ Dirichlet(alpha * 1_K)``. Client sizes are
  balanced (``n // N``, the first ``n % N`` clients one more), so heterogeneity is in the label
  mix alone. Examples are dealt one at a time: a client with room left is chosen uniformly, and
  it takes a class drawn from ``q_j`` renormalised over the classes that still have examples (a
  client whose favourite classes ran out takes the next best; every example is used exactly
  once). Small ``alpha`` (0.1) gives clients dominated by one or two classes; large ``alpha``
  (100) gives near-IID clients.
- ``dirichlet`` (per-class Dirichlet over clients): per class, its
  examples are split over the clients by proportions ~ Dirichlet(alpha * 1_N), so client sizes
  vary too (Yurochkin et al. 2019, arXiv 1905.12022, the form most FL code bases use; Hsu et al.
  2019 draw the Dirichlet per client instead, as ``balanced-dirichlet`` does). flwr-datasets'
  ``DirichletPartitioner`` (no self-balancing; a draw that leaves a client below ``min-size``
  is redrawn, up to 10 times).
- ``iid``: a seeded shuffle cut into N equal parts (flwr-datasets' ``IidPartitioner``).
- ``shards`` (pathological, Li et al. 2021 "#C=k", arXiv 2102.02079): each client holds exactly
  ``classes-per-client`` classes; each class is split evenly among the clients holding it
  (flwr-datasets' ``PathologicalPartitioner``, ``class_assignment_mode="first-deterministic"``:
  client j's first class is class j mod K, the others are drawn at random).
- ``quantity`` (quantity skew; label mix IID): client sizes from a Dirichlet,
  ``quantity-alpha`` (Li et al. 2021: sizes ~ Dirichlet(beta * 1_N) * n, redrawn while a client
  is below ``min-size``, up to 10 draws), or from a power law, ``quantity-exponent`` (client j,
  from 0, gets a share proportional to (j+1)^exponent: 1 is flwr-datasets' LinearPartitioner, 2
  its SquarePartitioner); the examples are then dealt from a seeded shuffle (flwr-datasets'
  ``SizePartitioner`` / ``IdToSizeFncPartitioner``).

The flwr-datasets schemes run as ``FederatedDataset`` would run them: on a Hugging Face
``Dataset`` built in memory from the partition classes (columns ``label`` = class index,
``index`` = example index), shuffled with ``seed``, the partitioner seeded with ``seed``.

``min_size``: every scheme checks that each client gets at least ``min-size`` examples, and a
split that cannot (too few examples for the number of clients, a skew that leaves a client
nearly empty) is an error naming the numbers, before training.

Everything here is a pure function of its arguments: same (labels, settings, seed), same
partition, on any machine.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


# --- the schemes of ``partition=`` ---------------------------------------------------------------

#: scheme -> the settings it uses, beyond num-clients, seed and min-size (kebab case).
SCHEMES: dict[str, tuple[str, ...]] = {
    "balanced-dirichlet": ("alpha",),
    "dirichlet": ("alpha",),
    "iid": (),
    "shards": ("classes-per-client",),
    "quantity": ("quantity-alpha", "quantity-exponent"),  # exactly one of the two
}
#: settings of one scheme only; None = unset (``alpha`` has a default, see below).
SCHEME_SETTINGS = ("classes-per-client", "quantity-alpha", "quantity-exponent")
MAX_DRAWS = 10  # redraws of a Dirichlet that leaves a client below min-size (as flwr-datasets)


def _get(cfg: Any, key: str) -> Any:
    return getattr(cfg, key.replace("-", "_"))


def check_partition_settings(cfg: Any) -> None:
    """``ConfigError`` for an unknown ``partition``, a setting it needs that is missing or out of
    range, or a setting of another scheme (a typo'd experiment would otherwise run the default).

    ``alpha`` has a default (1.0) and belongs to both Dirichlet schemes; with another scheme only
    a value other than the default is an error, as an explicit ``alpha=1`` cannot be told apart.
    """
    from .config import ConfigError, RunConfig

    scheme = cfg.partition
    if scheme not in SCHEMES:
        raise ConfigError(f"partition={scheme!r} is unknown; choose from {', '.join(SCHEMES)}")
    used = SCHEMES[scheme]
    for key in SCHEME_SETTINGS:
        if _get(cfg, key) is not None and key not in used:
            users = [name for name, keys in SCHEMES.items() if key in keys]
            raise ConfigError(f"{key} is a setting of partition={' / '.join(users)}, not of "
                              f"partition={scheme}")
    if "alpha" not in used and cfg.alpha != RunConfig.__dataclass_fields__["alpha"].default:
        users = [name for name, keys in SCHEMES.items() if "alpha" in keys]
        raise ConfigError(f"alpha is a setting of partition={' / '.join(users)}, not of "
                          f"partition={scheme}")
    if scheme == "shards":
        k = cfg.classes_per_client
        if k is None or k < 1:
            raise ConfigError("partition=shards needs classes-per-client (the number k of "
                              f"classes each client holds), an integer >= 1; got {k}")
    if scheme == "quantity":
        q_alpha, exponent = cfg.quantity_alpha, cfg.quantity_exponent
        if (q_alpha is None) == (exponent is None):
            raise ConfigError("partition=quantity needs exactly one of quantity-alpha (client "
                              "sizes ~ Dirichlet(quantity-alpha)) and quantity-exponent (client "
                              "j's size ~ (j+1)^quantity-exponent)")
        if q_alpha is not None and not (math.isfinite(q_alpha) and q_alpha > 0):
            raise ConfigError(f"quantity-alpha must be a finite number > 0, got {q_alpha}")
        if exponent is not None and not (math.isfinite(exponent) and exponent > 0):
            raise ConfigError(f"quantity-exponent must be a finite number > 0, got {exponent}")


def partition_summary(cfg: Any) -> str:
    """``partition=<name>`` and its settings, e.g. ``partition=shards classes-per-client=2``."""
    keys = [k for k in SCHEMES.get(cfg.partition, ()) if _get(cfg, k) is not None]
    return " ".join([f"partition={cfg.partition}", *(f"{k}={_get(cfg, k)}" for k in keys)])


def make_partition(labels: Sequence[object], cfg: Any) -> Partition:
    """The clients' split of the training examples (partition classes ``labels``) that ``cfg``
    asks for: ``cfg.partition`` with its settings, ``num_clients``, ``seed`` and ``min_size``
    (any object with those attributes; a validated ``RunConfig`` in fedpeft)."""
    scheme, n_clients, seed, min_size = cfg.partition, cfg.num_clients, cfg.seed, cfg.min_size
    if scheme == "balanced-dirichlet":
        return dirichlet_partition(labels, n_clients, cfg.alpha, seed, min_size)
    if scheme not in SCHEMES:
        raise PartitionError(f"partition={scheme!r} is unknown; choose from {', '.join(SCHEMES)}")
    n = len(labels)
    _check_enough(n, n_clients, min_size)
    # flwr-datasets pulls in `datasets` (and pandas, matplotlib): imported only when used.
    try:
        from flwr_datasets.partitioner import (
            DirichletPartitioner,
            IdToSizeFncPartitioner,
            IidPartitioner,
            PathologicalPartitioner,
            SizePartitioner,
        )
    except ImportError as err:
        raise PartitionError(f"partition={scheme} uses flwr-datasets, which is not installed "
                             f"({err}); `bash scripts/install.sh` installs it") from None

    partitioner: Any
    if scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=n_clients, partition_by="label", alpha=float(cfg.alpha),
            min_partition_size=min_size, self_balancing=False, shuffle=True, seed=seed)
    elif scheme == "iid":
        partitioner = IidPartitioner(num_partitions=n_clients)
    elif scheme == "shards":
        # Not ShardPartitioner (McMahan et al.'s sorted shards): a client's shards may share a
        # class or straddle two, so it gives at most, not exactly, k classes.
        partitioner = PathologicalPartitioner(
            num_partitions=n_clients, partition_by="label",
            num_classes_per_partition=int(cfg.classes_per_client),
            class_assignment_mode="first-deterministic", shuffle=True, seed=seed)
    elif cfg.quantity_exponent is not None:
        exponent = float(cfg.quantity_exponent)
        # flwr-datasets calls the function on the ids 1..N (floats) and normalises the result.
        partitioner = IdToSizeFncPartitioner(
            num_partitions=n_clients, partition_id_to_size_fn=lambda ids: ids ** exponent)
    else:
        sizes = dirichlet_sizes(n, n_clients, float(cfg.quantity_alpha), seed, min_size)
        partitioner = SizePartitioner(partition_sizes=[int(v) for v in sizes])
    tip = {"dirichlet": "; raise alpha, lower min-size or use fewer clients",
           "shards": "; use fewer clients or a smaller classes-per-client",
           "quantity": "; use fewer clients or a milder skew"}.get(scheme, "")
    return flwr_partition(labels, partitioner, seed, min_size, what=partition_summary(cfg),
                          tip=tip)


def flwr_partition(labels: Sequence[object], partitioner: Any, seed: int | None,
                   min_size: int = 1, what: str = "the partition", tip: str = "") -> Partition:
    """Run a flwr-datasets ``Partitioner`` (not yet given a dataset) over the examples whose
    partition classes are ``labels``, as ``FederatedDataset(shuffle=True, seed=seed)`` would:
    on an in-memory ``datasets.Dataset`` with columns ``label`` (class index in the sorted
    class names) and ``index`` (example index), shuffled with ``seed`` (None: not shuffled).

    Raises ``PartitionError`` when the partitioner refuses, leaves an example out (shards whose
    classes no client holds) or leaves a client with fewer than ``min_size`` examples."""
    from datasets import Dataset

    names = [str(label) for label in labels]
    classes, y = np.unique(np.asarray(names, dtype=object), return_inverse=True)
    y = y.astype(np.int64)
    dataset = Dataset.from_dict({"label": y, "index": np.arange(len(y), dtype=np.int64)})
    if seed is not None:
        dataset = dataset.shuffle(seed=seed)
    partitioner.dataset = dataset
    with warnings.catch_warnings():
        # flwr-datasets warns on each Dirichlet redraw and on classes that no client holds; both
        # become the errors below when they matter.
        warnings.simplefilter("ignore")
        try:
            clients = [np.sort(np.asarray(partitioner.load_partition(j)["index"], dtype=np.int64))
                       for j in range(partitioner.num_partitions)]
        except ValueError as err:
            raise PartitionError(f"{what}: flwr-datasets cannot split the {len(y)} examples "
                                 f"({len(classes)} classes) with min-size={min_size}: "
                                 f"{str(err).rstrip('. ')}{tip}") from None
    assigned = np.concatenate(clients) if clients else np.zeros(0, dtype=np.int64)
    if len(assigned) != len(y) or len(np.unique(assigned)) != len(y):
        missing = sorted(set(range(len(y))) - set(assigned.tolist()))
        left_out = [str(classes[c]) for c in np.unique(y[missing])] if missing else []
        hint = (f"; no client holds the class(es) {', '.join(left_out)} (with num-clients >= "
                f"{len(classes)}, the number of classes, every class has a client: client j's "
                f"first class is class j mod {len(classes)})" if left_out else "")
        raise PartitionError(f"{what}: {len(missing)} of {len(y)} training examples would go "
                             f"to no client{hint}")
    histograms = np.stack([np.bincount(y[idx], minlength=len(classes)) for idx in clients])
    part = Partition(clients, [str(c) for c in classes], histograms)
    _check_min_size(part, min_size, what)
    return part


def dirichlet_sizes(n: int, num_clients: int, alpha: float, seed: int, min_size: int = 1,
                    draws: int = MAX_DRAWS) -> np.ndarray:
    """Client sizes ``q * n`` with ``q ~ Dirichlet(alpha * 1_N)`` from
    ``numpy.random.default_rng(seed)``, rounded to integers summing to ``n`` (largest
    remainders; ties to the lower client). A draw with a client below ``min_size`` is redrawn
    from the same generator, up to ``draws`` draws in all (Li et al. 2021 redraw likewise).

    flwr-datasets draws no sizes (its ``SizePartitioner`` takes them, its other size
    partitioners are fixed functions of the client id), hence this function."""
    rng = np.random.default_rng(seed)
    for _ in range(draws):
        share = rng.dirichlet(np.full(num_clients, alpha)) * n
        sizes = np.floor(share).astype(np.int64)
        extra = n - int(sizes.sum())
        sizes[np.argsort(-(share - sizes), kind="stable")[:extra]] += 1
        if sizes.min() >= min_size:
            return sizes
    raise PartitionError(f"partition=quantity quantity-alpha={alpha}: {draws} draws of the sizes "
                         f"of {num_clients} clients all left a client with fewer than "
                         f"min-size={min_size} of the {n} examples; raise quantity-alpha, lower "
                         "min-size or use fewer clients")


def _check_enough(n: int, num_clients: int, min_size: int) -> None:
    if num_clients <= 0:
        raise PartitionError(f"num-clients must be > 0, got {num_clients}")
    if n // num_clients < min_size:
        raise PartitionError(f"{n} training examples cannot give {num_clients} clients at least "
                             f"min-size={min_size} each; use fewer clients or more data")


def _check_min_size(part: Partition, min_size: int, what: str) -> None:
    sizes = part.sizes()
    small = np.flatnonzero(sizes < min_size)
    if len(small):
        j = int(small[0])
        raise PartitionError(f"{what}: client {j} gets {int(sizes[j])} examples, fewer than "
                             f"min-size={min_size} ({len(small)} client(s) below it); use fewer "
                             "clients, a milder skew or a smaller min-size")


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
    held = (hist > 0).sum(axis=1)
    lines = [
        f"clients: {len(hist)}  examples: {int(sizes.sum())}  classes: {len(partition.classes)}",
        f"client size: min {sizes.min()}  mean {sizes.mean():.1f}  max {sizes.max()}",
        f"mean pairwise Jensen-Shannon divergence: {mean_pairwise_js(hist):.4f}",
        f"classes per client: min {held.min()}  mean {held.mean():.1f}  max {held.max()}",
        "classes: " + "  ".join(f"[{i}] {c}" for i, c in enumerate(partition.classes)),
        "per-client class histograms (columns = class index):",
        "client  size  " + " ".join(f"{i:>4}" for i in range(len(partition.classes))),
    ]
    for j, row in enumerate(hist[:max_clients]):
        lines.append(f"{j:>6}  {sizes[j]:>4}  " + " ".join(f"{v:>4}" for v in row))
    if len(hist) > max_clients:
        lines.append(f"... {len(hist) - max_clients} more clients")
    return "\n".join(lines)


LOCAL_TEST, LOCAL_VALID = 0x10CA1, 0x10CA2  # the generators' last seed words


def local_split(indices: Sequence[int] | np.ndarray, fraction: float, seed: int,
                client: int, salt: int = LOCAL_TEST) -> tuple[np.ndarray, np.ndarray]:
    """A client's shard as (training examples, held-out examples), both sorted and disjoint.

    The held-out split (``local-test-fraction``; with ``salt=LOCAL_VALID`` the local validation
    split, ``local-valid-fraction``, drawn from what the test split left) is
    ``round(fraction * n)`` examples, at least one and at most n - 1 (a client always trains on
    something), drawn from ``default_rng([seed, client, salt])``: the same on every machine,
    independent of the other clients. ``fraction`` 0 (or a shard of one example) holds nothing
    out."""
    shard = np.sort(np.asarray(indices, dtype=np.int64))
    n = len(shard)
    if fraction <= 0 or n < 2:
        return shard, np.zeros(0, dtype=np.int64)
    k = min(n - 1, max(1, round(fraction * n)))
    rng = np.random.default_rng([seed, client, salt])
    test = np.sort(rng.choice(shard, size=k, replace=False))
    return np.setdiff1d(shard, test, assume_unique=True), test
