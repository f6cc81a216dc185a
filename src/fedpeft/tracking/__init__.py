"""Experiment tracking: a run's settings, rounds and final model in TensorBoard and/or MLflow.

``track=tensorboard`` writes TensorBoard event files to ``<run>/tensorboard``: one scalar per
value of every round (step = round), the resolved config as text, and at the end the summary as
text and the settings as hparams (``tensorboard --logdir runs/`` compares runs).
``track=mlflow`` logs an MLflow run (default store ``sqlite:///<run>/mlflow.db`` with artifacts
in ``<run>/mlartifacts``, no server; ``track-uri=`` names another store or a server): the
resolved config as params, every round's values as metrics (step = round), tags
method/task/model, and at the end ``final_state.safetensors``, ``summary.json``, ``rounds.jsonl``
and, for the LoRA family, the PEFT adapter folder (``fedpeft export --format peft``) as
artifacts. ``track=tensorboard,mlflow`` does both.

The values of a round (``round_scalars``): every evaluation metric under its own name
(``accuracy``, ``valid-accuracy``), ``after-switch/<metric>`` (SLoRA), ``train-loss``,
``bytes-down``/``bytes-up``, ``seconds`` and each ``seconds-*`` phase, ``successes``,
``attempts``, ``failures``/``rejected`` (counts), ``drift/<A|B>/<magnitude|direction>`` (means
over the LoRA layers), ``privacy/epsilon``/``privacy/delta``, and any other number of the line
(``lora-truncation-error``, ``lr``).

Rounds reach the trackers once they are checkpointed, so a resumed run never logs a round twice
(MLflow cannot delete a logged value). ``<run>/tracking.json`` keeps the MLflow run id and the
last round TensorBoard flushed: a resumed run continues the same MLflow run and appends to the
same event files (``purge_step`` drops anything past that round), and both first log the rounds
of the history they are missing (e.g. ``track=`` switched on at the resume). A missing library
or an unusable store stops the run at its start (``ConfigError``); an error while logging later
is reported once as a ``TrackingWarning`` and that tracker stops for the rest of the run (the
next resume fills in what it missed), so tracking never kills a long run.

The package: ``base.py`` (settings, a round's numbers, the folder's state), one module per
tracker (``tensorboard_tracker.py``, ``mlflow_tracker.py``), and here the set of a run's trackers.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..runlog import read_rounds
from .base import (BACKENDS, MLFLOW_PARAM_MAX, Record, Tracker, TrackingWarning, _first_line,
                   backends, check_available, check_track, config_params, param_value,
                   round_scalars)
from .mlflow_tracker import MLflowTracker, default_uri
from .tensorboard_tracker import TensorBoardTracker

TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker}


# --- all of a run's trackers ---------------------------------------------------------------------

class Trackers:
    """The trackers ``cfg.track`` names; each one's first failure after ``start`` is reported
    once (``TrackingWarning``) and that tracker is dropped, so the run goes on."""

    name = "trackers"

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)

    def start(self, cfg: RunConfig, run_dir: Path,
              history: Sequence[Record] | None = None) -> None:
        run_dir = Path(run_dir)
        if history is None:
            history = read_rounds(run_dir)
        started = []
        try:
            for tracker in self.trackers:
                tracker.start(cfg, run_dir, history)
                started.append(tracker)
        except BaseException:
            for tracker in started:
                _close(tracker)
            raise

    def log_round(self, record: Record) -> None:
        self._each("log_round", record)

    def finish(self, summary: Record, run_dir: Path) -> None:
        self._each("finish", summary, Path(run_dir))
        for tracker in self.trackers:
            _close(tracker)

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # noqa: BLE001 - logging must never stop the run
                self.trackers.remove(tracker)
                _close(tracker)
                warnings.warn(
                    f"track={tracker.name}: logging failed ({type(err).__name__}: "
                    f"{_first_line(err)}); the run goes on without {tracker.name} (a --resume "
                    "logs the rounds it missed)", TrackingWarning, stacklevel=2)


def _close(tracker: Tracker) -> None:
    close = getattr(tracker, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


def open_tracker(cfg: RunConfig, run_dir: str | Path,
                 history: Sequence[Record] | None = None) -> Trackers:
    """The started trackers of ``cfg.track`` (none: a tracker that does nothing) for the run in
    ``run_dir`` whose finished rounds are ``history`` (default: its ``rounds.jsonl``)."""
    names = backends(cfg)
    if names:
        check_available(cfg)
    trackers = Trackers([TRACKERS[name]() for name in names])
    if names:
        trackers.start(cfg, Path(run_dir), history)
    return trackers


__all__ = ["BACKENDS", "MLFLOW_PARAM_MAX", "MLflowTracker", "TensorBoardTracker", "Tracker",
           "Trackers", "TrackingWarning", "backends", "check_available", "check_track",
           "config_params", "default_uri", "open_tracker", "param_value", "round_scalars"]
