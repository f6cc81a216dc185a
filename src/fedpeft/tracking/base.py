"""What every tracker shares: the ``track`` settings and their checks, the numbers a round logs,
the params a config becomes, and the run folder's tracking state (``tracking.json``)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..config import ConfigError, RunConfig
from ..runlog import atomic_write

BACKENDS = ("tensorboard", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # what each one imports
STATE_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
MLFLOW_PARAM_MAX = 6000  # MLflow's longest param value (mlflow.utils.validation)
MLFLOW_BATCH_PARAMS = 100  # params per log_batch call

Record = Mapping[str, Any]


class TrackingWarning(UserWarning):
    """A tracker failed after the run started; the run goes on without it."""


class Tracker(Protocol):
    """One place a run is also logged to."""

    name: str

    def start(self, cfg: RunConfig, run_dir: Path,
              history: Sequence[Record] | None = None) -> None:
        """Open the tracker (continuing an earlier one of this run folder) and log ``history``'s
        rounds it lacks; ``ConfigError`` if it cannot be used."""

    def log_round(self, record: Record) -> None: ...

    def finish(self, summary: Record, run_dir: Path) -> None: ...


# --- settings ------------------------------------------------------------------------------------

def backends(cfg: RunConfig) -> list[str]:
    """The trackers ``cfg.track`` names, in the order given (``none`` -> [])."""
    names = [n.strip().lower() for n in str(cfg.track).split(",") if n.strip()]
    return list(dict.fromkeys(n for n in names if n != "none"))


def check_track(cfg: RunConfig) -> None:
    """``ConfigError`` for a ``track`` value that names no tracker (the libraries are checked
    by ``check_available``, on the server only: exporting a tracked run does not need them)."""
    names = [n.strip().lower() for n in str(cfg.track).split(",") if n.strip()]
    for name in names:
        if name not in ("none", *BACKENDS):
            raise ConfigError(f"track={cfg.track}: unknown tracker {name!r}; expected none, "
                              "tensorboard, mlflow or both (track=tensorboard,mlflow)")
    if not names or ("none" in names and len(set(names)) > 1):
        raise ConfigError(f"track={cfg.track!r}: expected none, or tensorboard and/or mlflow")
    if cfg.track_uri is not None and not cfg.track_uri.strip():
        raise ConfigError("track-uri is empty; leave it unset for the run folder's own store")
    if cfg.track_experiment is not None and not cfg.track_experiment.strip():
        raise ConfigError("track-experiment is empty; leave it unset for the task's name")


def check_available(cfg: RunConfig) -> None:
    """``ConfigError`` naming the package to install if a tracker's library is missing."""
    for name in backends(cfg):
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(
                f"track={cfg.track}: {name} is not installed; install fedpeft's tracking extra "
                f"(pip install -c requirements-lock.txt -e '.[track]'), or "
                f"pip install {'mlflow-skinny' if name == 'mlflow' else name}")


# --- what a round logs ---------------------------------------------------------------------------

SKIP = frozenset({"round", "skipped"})


def round_scalars(record: Record) -> dict[str, float]:
    """The numbers of one ``rounds.jsonl`` line by tracker name (finite values only)."""
    out: dict[str, Any] = {}
    for name, value in (record.get("metrics") or {}).items():
        out[str(name)] = value
    for name, value in (record.get("metrics-after-switch") or {}).items():
        out[f"after-switch/{name}"] = value
    for key, value in record.items():
        if key not in SKIP and isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = value
    out["failures"] = len(record.get("failures") or [])
    out["rejected"] = len(record.get("rejected") or [])
    drift = record.get("drift")
    if isinstance(drift, Mapping):
        for factor, values in (drift.get("mean") or {}).items():
            for name, value in (values or {}).items():
                out[f"drift/{factor}/{name}"] = value
    local = record.get("local-eval")  # local-test-fraction: the spread over clients
    if isinstance(local, Mapping):
        for metric, stats in (local.get("stats") or {}).items():
            for name, value in (stats or {}).items():
                if name != "clients":
                    out[f"local/{metric}/{name}"] = value
    privacy = record.get("privacy")
    if isinstance(privacy, Mapping):
        for name in ("epsilon", "delta"):
            out[f"privacy/{name}"] = privacy.get(name)
    return {k: float(v) for k, v in out.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def param_value(value: Any) -> str:
    """A setting as an MLflow param (and TensorBoard hparam): strings as they are, everything
    else as JSON (``json.loads`` gives the value back), cut to MLflow's limit."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MLFLOW_PARAM_MAX else text[:MLFLOW_PARAM_MAX - 3] + "..."


def config_params(cfg: RunConfig) -> dict[str, str]:
    return {key: param_value(value) for key, value in cfg.to_dict().items()}


# --- the run folder's tracking state -------------------------------------------------------------

def read_state(run_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def update_state(run_dir: Path, name: str, values: Mapping[str, Any]) -> None:
    state = read_state(run_dir)
    state[name] = {**state.get(name, {}), **values}
    atomic_write(run_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= limit else line[:limit] + "..."


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide the libraries' deprecation chatter and INFO lines (database set-up)."""
    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
