"""The report's figures (PNG, matplotlib's Agg backend), drawn from runs and seed groups only.

- ``plot_metric``: metric vs round or vs cumulative bytes, one line per group (mean over seeds,
  band = ± one standard deviation when there are several);
- ``plot_sweep``: final metric per method against a swept setting (FeDeRA paper Fig. 5:
  alpha) or the trainable parameters it changes (Fig. 6: budget);
- ``plot_partition``: per-client class distribution (stacked bars) and the pairwise
  Jensen-Shannon divergence heatmap between clients (FeDeRA paper Fig. 7);
- ``plot_drift`` / ``plot_drift_layers``: magnitude and direction variation of the LoRA factors
  A and B per round and per layer (FeDeRA paper §4.2, Fig. 3/4; see ``fedpeft.drift``).

matplotlib is an optional dependency (``pip install fedpeft[plots]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .drift import layer_order
from .partition import js_matrix
from .report_model import Group, Run
from .report_tables import DRIFT_PANELS, drift_records, mean_std, sweep_rows, trainable_params


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'fedpeft[plots]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cumulative_mb(run: Run) -> dict[int, float]:
    """Round -> megabytes sent down + up over all clients from round 1 to that round."""
    total, out = 0.0, {}
    for record in run.rounds:
        total += (record["bytes-down"] + record["bytes-up"]) / 1e6
        out[int(record["round"])] = total
    return out


def seed_curve(runs: Sequence[Run], metric: str, x: str) -> tuple[np.ndarray, ...]:
    """(x, mean, std) over the rounds that every seed evaluated; x = round or cumulative MB."""
    series = [dict(r.series(metric)) for r in runs]
    rounds = sorted(set.intersection(*(set(s) for s in series)))
    values = np.array([[s[n] for n in rounds] for s in series])  # (seeds, rounds)
    if x == "bytes":
        xs = np.array([[cumulative_mb(r)[n] for n in rounds] for r in runs]).mean(axis=0)
    else:
        xs = np.array(rounds, dtype=np.float64)
    std = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(rounds))
    return xs, values.mean(axis=0), std


def plot_metric(groups: Sequence[Group], metric: str, path: Path, x: str = "round",
                title: str = "") -> Path:
    """One line per group: ``metric`` vs round (``x="round"``) or vs cumulative MB
    (``x="bytes"``, log scale when the methods' traffic differs by more than 20x)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    spans = []  # (smallest, largest) x of each line
    for i, g in enumerate(groups):
        xs, mean, std = seed_curve(g.runs, metric, x)
        if not len(xs):
            continue
        color = f"C{i % 10}"
        seeds = f" ({len(g.runs)} seeds)" if len(g.runs) > 1 else ""
        ax.plot(xs, mean, marker="o", markersize=3, color=color, label=g.label + seeds)
        if len(g.runs) > 1:
            ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        spans.append((xs.min(), xs.max()))
    if x == "bytes":
        if spans and max(s[1] for s in spans) > 20 * max(min(s[0] for s in spans), 1e-9):
            ax.set_xscale("log")
        ax.set_xlabel("cumulative communication, all clients, down + up (MB)")
    else:
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(f"test {metric}")
    ax.set_title(title or f"{metric} vs {'communication' if x == 'bytes' else 'round'}")
    ax.grid(alpha=0.3)
    if spans:
        ax.legend(fontsize=8)
    else:  # no evaluation logged yet
        ax.text(0.5, 0.5, f"no {metric} evaluated yet", ha="center", transform=ax.transAxes)
    return _save(fig, path)


def plot_sweep(groups: Sequence[Group], metric: str, swept: Sequence[str], path: Path,
               title: str = "") -> Path | None:
    """Final metric per method (one line each; error bars = ± one std over seeds; unfinished
    runs left out) against the trainable parameters when they change along the sweep (FeDeRA
    Fig. 6), else against the first numeric swept setting (Fig. 5: alpha); log x when the
    values span more than 20x. None (nothing drawn) when the sweep has no numeric axis."""
    rows = sweep_rows(groups, swept)
    methods = list(dict.fromkeys(g.method for g in groups))
    by_params = any(len({trainable_params(g) for g in groups if g.method == m} - {None}) > 1
                    for m in methods)
    numeric = [i for i, k in enumerate(swept)
               if all(isinstance(v[i], int | float) for v, _ in rows)]
    if not by_params and not numeric:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs_all = []
    for i, method in enumerate(methods):
        points = []
        for values, row in rows:
            g = row.get(method)
            if g is None or g.done < int(g.settings.get("rounds", 0)):
                continue  # not run, or unfinished
            finals = [r.final(metric) for r in g.runs]
            position = trainable_params(g) if by_params else values[numeric[0]]
            if position is None or any(f is None for f in finals):
                continue
            mean, std = mean_std([float(f) for f in finals])  # type: ignore[arg-type]
            points.append((float(position), mean, std or 0.0))
        if not points:
            continue
        points.sort()
        x, y, err = (np.array(column) for column in zip(*points, strict=True))
        ax.errorbar(x, y, yerr=err if err.any() else None, marker="o", markersize=4,
                    capsize=3, color=f"C{i % 10}", label=method)
        xs_all.extend(x)
    positive = [x for x in xs_all if x > 0]
    if positive and len(positive) == len(xs_all) and max(positive) > 20 * min(positive):
        ax.set_xscale("log")
    ax.set_xlabel("trainable parameters" if by_params else swept[numeric[0]])
    ax.set_ylabel(f"final test {metric}")
    ax.set_title(title or f"final {metric} vs {', '.join(swept)}")
    ax.grid(alpha=0.3)
    if xs_all:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no {metric} evaluated yet", ha="center", transform=ax.transAxes)
    return _save(fig, path)


def plot_partition(partition: dict[str, Any], path: Path, title: str = "") -> Path:
    """Stacked per-client class shares (left) and the client x client JS divergence (right)."""
    plt = pyplot()
    hist = np.asarray(partition["histograms"], dtype=np.float64)  # (clients, classes)
    classes = partition.get("classes") or [str(k) for k in range(hist.shape[1])]
    shares = hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)
    fig, (bars, heat) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=120,
                                     gridspec_kw={"width_ratios": [1.5, 1]})
    cmap = plt.get_cmap("tab20")
    bottom = np.zeros(len(hist))
    clients = np.arange(len(hist))
    for k, name in enumerate(classes):
        bars.bar(clients, shares[:, k], bottom=bottom, width=0.9, color=cmap(k % 20),
                 label=name, linewidth=0)
        bottom += shares[:, k]
    bars.set_xlabel("client")
    bars.set_ylabel("share of the client's examples")
    bars.set_xlim(-0.5, len(hist) - 0.5)
    bars.set_ylim(0, 1)
    bars.set_title("class distribution per client")
    if len(classes) <= 40:
        bars.legend(fontsize=6, ncol=1 + len(classes) // 20, loc="upper left",
                    bbox_to_anchor=(1.0, 1.0), frameon=False)
    image = heat.imshow(js_matrix(hist), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    heat.set_title("Jensen-Shannon divergence between clients")
    heat.set_xlabel("client")
    heat.set_ylabel("client")
    fig.colorbar(image, ax=heat, fraction=0.046, pad=0.04, label="JS divergence (base 2)")
    fig.suptitle(title)
    return _save(fig, path)


def plot_drift(groups: Sequence[Group], path: Path) -> Path:
    """Mean (over layers and modules) magnitude and direction variation of A and B per round,
    one line per group (mean over seeds at rounds every seed logged)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), dpi=120, sharex=True)
    for i, g in enumerate(groups):
        per_seed = [dict(drift_records(r)) for r in g.runs]
        rounds = sorted(set.intersection(*(set(s) for s in per_seed)))
        if not rounds:
            continue
        for ax, (factor, name) in zip(axes.flat, DRIFT_PANELS, strict=True):
            ys = [_nanmean([_num(s[n]["mean"].get(factor, {}).get(name)) for s in per_seed])
                  for n in rounds]
            ax.plot(rounds, ys, color=f"C{i % 10}", marker="o", markersize=2, label=g.label)
    for ax in axes[1]:
        ax.xaxis.get_major_locator().set_params(integer=True)
    _finish_drift_axes(axes, "", "round")
    fig.suptitle(f"drift of the global LoRA factors between successive {_between(groups)}")
    return _save(fig, path)


def plot_drift_layers(groups: Sequence[Group], path: Path) -> Path:
    """Per layer (mean over modules, rounds and seeds): magnitude and direction variation of A
    and B, one line per group."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), dpi=120, sharex=True)
    for i, g in enumerate(groups):
        values: dict[tuple[str, str, str], list[float]] = {}
        for run in g.runs:
            for _, record in drift_records(run):
                for layer, modules in record["layers"].items():
                    for factors in modules.values():
                        for factor, pair in factors.items():
                            for name, v in pair.items():
                                values.setdefault((layer, factor, name), []).append(_num(v))
        layers = sorted({k[0] for k in values}, key=layer_order)
        if not layers:
            continue
        for ax, (factor, name) in zip(axes.flat, DRIFT_PANELS, strict=True):
            ys = [_nanmean(values.get((la, factor, name), [])) for la in layers]
            ax.plot(range(len(layers)), ys, color=f"C{i % 10}", marker="o", label=g.label)
            ax.set_xticks(range(len(layers)), layers)
    _finish_drift_axes(axes, " (mean over rounds)", "layer")
    fig.suptitle(f"drift per layer, between successive {_between(groups)}")
    return _save(fig, path)


def _finish_drift_axes(axes: Any, title_suffix: str, xlabel: str) -> None:
    """Titles, grids, log scale where wide, x labels and the legend of the 2x2 drift panels."""
    for ax, (factor, name) in zip(axes.flat, DRIFT_PANELS, strict=True):
        ax.set_title(f"{factor}: {name} variation{title_suffix}")
        ax.grid(alpha=0.3)
        _log_if_wide(ax)
    for ax in axes[1]:
        ax.set_xlabel(xlabel)
    axes[0, 0].legend(fontsize=8)


def _between(groups: Sequence[Group]) -> str:
    kinds = {rec.get("between", "weights") for g in groups for r in g.runs
             for _, rec in drift_records(r)}
    return "global " + (" / ".join(sorted(kinds)) if kinds else "weights")


def _log_if_wide(ax: Any, ratio: float = 20.0) -> None:
    """Log y scale when the lines' positive values span more than ``ratio`` (methods whose
    factors have very different scales, e.g. SVD-initialised vs Gaussian A)."""
    ys = np.concatenate([np.asarray(line.get_ydata(), dtype=np.float64)
                         for line in ax.get_lines()] or [np.zeros(0)])
    ys = ys[np.isfinite(ys) & (ys > 0)]
    if len(ys) and ys.max() > ratio * ys.min():
        ax.set_yscale("log")


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN (a gap in the line) when there are none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_local_clients(groups: Sequence[Group], metric: str, path: Path, title: str = "") -> Path:
    """Per-client ``metric`` on the clients' local test splits at the last local evaluation:
    each client's value, clients sorted from worst to best, one line per group and model
    (global: dashed; personalised: solid); a group's first seed."""
    from .report_extra import LOCAL_MODELS, last_local_eval

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    drawn = 0
    for i, g in enumerate(groups):
        record = last_local_eval(g.runs[0])
        if record is None:
            continue
        for prefix, label in LOCAL_MODELS:
            values = record["values"].get(f"{prefix}-{metric}")
            if not values:
                continue
            ys = np.sort(np.asarray(values, dtype=np.float64))
            xs = np.arange(1, len(ys) + 1) / len(ys) * 100
            ax.plot(xs, ys, color=f"C{i % 10}", marker="o", markersize=3,
                    linestyle="-" if prefix == "personal" else "--",
                    label=f"{g.label}: {label}")
            drawn += 1
    ax.axvline(10, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("clients, sorted by their value (% of clients evaluated)")
    ax.set_ylabel(f"{metric} on the client's local test split")
    ax.set_title(title or f"per-client {metric} (last local evaluation)")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no local evaluation logged", ha="center", transform=ax.transAxes)
    return _save(fig, path)
