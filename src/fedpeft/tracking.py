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
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from .config import ConfigError, RunConfig, to_toml
from .runlog import as_logged, atomic_write, read_rounds

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


# --- TensorBoard ---------------------------------------------------------------------------------

class TensorBoardTracker:
    """Event files in ``<run>/tensorboard`` (``torch.utils.tensorboard.SummaryWriter``)."""

    name = "tensorboard"

    def __init__(self) -> None:
        self.writer: Any = None
        self.run_dir: Path | None = None
        self.last_round = 0
        self.hparams: dict[str, str] = {}

    def start(self, cfg: RunConfig, run_dir: Path,
              history: Sequence[Record] | None = None) -> None:
        try:
            with _quiet():
                from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError(f"track=tensorboard: cannot import TensorBoard's writer "
                              f"({_first_line(err)}); install fedpeft's tracking extra") from None
        history = list(history or [])
        done = int(history[-1]["round"]) if history else 0
        logdir = run_dir / TENSORBOARD_DIR
        earlier = logdir.is_dir() and any(logdir.iterdir())
        # the rounds an earlier process flushed (none if its events are gone); any later event
        # (a round that ran past the checkpoint) is purged when the files are read
        flushed = min(int(read_state(run_dir).get(self.name, {}).get("round", 0)), done) \
            if earlier else 0
        try:
            self.writer = SummaryWriter(str(logdir), purge_step=flushed + 1 if earlier else None,
                                        flush_secs=30)
        except OSError as err:
            raise ConfigError(f"track=tensorboard: cannot write {logdir}: {err}") from None
        self.run_dir, self.hparams = run_dir, config_params(cfg)
        self.writer.add_text("config", _as_code(to_toml(cfg)), global_step=done)
        for record in history:
            if int(record["round"]) > flushed:
                self._write(record)
        self._flush(done)

    def log_round(self, record: Record) -> None:
        record = as_logged(record)
        self._write(record)
        self._flush(int(record["round"]))

    def finish(self, summary: Record, run_dir: Path) -> None:
        from torch.utils.tensorboard.summary import hparams

        summary = as_logged(summary)
        step = self.last_round
        self.writer.add_text("summary", _as_code(json.dumps(summary, indent=2)), global_step=step)
        metric = summary.get("metric")
        final = (summary.get("final") or {}).get(metric) if metric else None
        metrics = {str(metric): float(final)} if isinstance(final, int | float) else {}
        for event in hparams(self.hparams, metrics):  # the HParams dashboard's row
            self.writer.file_writer.add_summary(event, global_step=step)
        self.writer.flush()
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = None

    def _write(self, record: Record) -> None:
        step = int(record["round"])
        for tag, value in round_scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step)

    def _flush(self, last_round: int) -> None:
        self.writer.flush()
        self.last_round = last_round
        assert self.run_dir is not None
        update_state(self.run_dir, self.name, {"logdir": str(self.run_dir / TENSORBOARD_DIR),
                                               "round": last_round})


def _as_code(text: str) -> str:
    """Text shown verbatim by TensorBoard's markdown renderer."""
    return "\n".join("    " + line for line in text.splitlines())


# --- MLflow --------------------------------------------------------------------------------------

def default_uri(run_dir: Path) -> str:
    """The run folder's own MLflow store: a SQLite file (MLflow 3 keeps its plain-file store in
    maintenance mode and refuses it unless asked)."""
    return f"sqlite:///{(run_dir / MLFLOW_DB).resolve()}"


def _is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks"))


class MLflowTracker:
    """An MLflow run: params, per-round metrics, tags, the final model as artifacts."""

    name = "mlflow"

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id: str | None = None
        self.uri: str | None = None
        self.method = ""

    def start(self, cfg: RunConfig, run_dir: Path,
              history: Sequence[Record] | None = None) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports
        uri = cfg.track_uri or default_uri(run_dir)
        if _is_file_store(uri):  # asked for by name: MLflow 3 wants this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            with _quiet():
                from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise ConfigError(f"track=mlflow: cannot import MLflow ({_first_line(err)}); install "
                              "fedpeft's tracking extra") from None
        self.uri, self.method = uri, cfg.method
        history = [as_logged(r) for r in history or []]
        try:
            with _quiet():
                self.client = MlflowClient(tracking_uri=uri)
                resumed = self._open(cfg, run_dir)
                logged = {m.step for m in self.client.get_metric_history(self.run_id, "seconds")
                          } if resumed else set()
                for record in history:
                    if int(record["round"]) not in logged:
                        self._log_metrics(record)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - MLflow and its stores raise many kinds
            where = "track-uri=" + uri if cfg.track_uri else f"the run's store {uri}"
            raise ConfigError(f"track=mlflow: cannot use {where}: {_first_line(err)}") from None
        update_state(run_dir, self.name, {"run-id": self.run_id, "tracking-uri": uri})

    def _open(self, cfg: RunConfig, run_dir: Path) -> bool:
        """Continue this folder's MLflow run if the store holds it, else create one; log the
        params. True if an earlier run was continued."""
        from mlflow.entities import Param, RunStatus, RunTag
        from mlflow.exceptions import MlflowException

        client, run = self.client, None
        earlier = read_state(run_dir).get(self.name, {}).get("run-id")
        if earlier:
            try:
                run = client.get_run(earlier)
            except MlflowException:
                run = None  # another store, or deleted there: start a new run
            if run is not None and run.info.lifecycle_stage != "active":
                run = None
        params = config_params(cfg)
        tags = {"method": cfg.method, "task": cfg.task, "model": cfg.model,
                "fedpeft.run-dir": str(run_dir.resolve())}
        if run is None:
            run = client.create_run(self._experiment(cfg, run_dir), run_name=run_dir.name,
                                    tags=tags)
            self.run_id = run.info.run_id
            new, changed = params, {}
        else:
            self.run_id = run.info.run_id
            client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            old = run.data.params
            new = {k: v for k, v in params.items() if k not in old}
            # MLflow params cannot change: a resumable setting changed on resume is a tag
            changed = {f"resumed.{k}": v for k, v in params.items() if k in old and old[k] != v}
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), MLFLOW_BATCH_PARAMS):
            client.log_batch(self.run_id, params=items[i:i + MLFLOW_BATCH_PARAMS])
        if changed:
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in changed.items()])
        return bool(earlier) and run.info.run_id == earlier

    def _experiment(self, cfg: RunConfig, run_dir: Path) -> str:
        name = cfg.track_experiment or cfg.task
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage != "active":
                raise ConfigError(f"track=mlflow: the MLflow experiment {name!r} is deleted in "
                                  f"{self.uri}; restore it or choose track-experiment=...")
            return found.experiment_id
        location = (run_dir / MLFLOW_ARTIFACTS).resolve().as_uri() if not cfg.track_uri \
            else None
        return self.client.create_experiment(name, artifact_location=location)

    def _log_metrics(self, record: Record) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(record["round"])
        metrics = [Metric(k, v, now, step) for k, v in round_scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_round(self, record: Record) -> None:
        self._log_metrics(as_logged(record))

    def finish(self, summary: Record, run_dir: Path) -> None:
        from mlflow.entities import RunStatus

        with _quiet():
            # not config.toml (the params hold it): a folder with one is a run folder to
            # `fedpeft report`, and the default artifact store lies inside the run folder
            for name in ("final_state.safetensors", "summary.json", "rounds.jsonl"):
                if (run_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(run_dir / name))
            self._log_adapter(run_dir)
            self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))

    def _log_adapter(self, run_dir: Path) -> None:
        """The LoRA family's PEFT adapter folder (``fedpeft export --format peft``)."""
        from .export import ExportError, export_run
        from .methods import METHODS
        from .methods.lora import LoRA

        if not issubclass(METHODS.get(self.method, object), LoRA):
            return
        with tempfile.TemporaryDirectory(prefix="fedpeft-peft-") as tmp:
            try:
                out = export_run(run_dir, "peft", Path(tmp) / "peft-adapter")
            except ExportError:  # e.g. SLoRA stopped before its switch to LoRA
                return
            self.client.log_artifacts(self.run_id, str(out), artifact_path="peft-adapter")

    def close(self) -> None:
        pass


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


__all__ = ["BACKENDS", "MLflowTracker", "TensorBoardTracker", "Tracker", "Trackers",
           "TrackingWarning", "backends", "check_available", "check_track", "config_params",
           "default_uri", "open_tracker", "param_value", "round_scalars"]
