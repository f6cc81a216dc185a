"""``track=mlflow``: an MLflow run in the run folder's own store or at ``track-uri``."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig
from ..runlog import as_logged
from .base import (MLFLOW_ARTIFACTS, MLFLOW_BATCH_PARAMS, MLFLOW_DB, Record, _first_line, _quiet,
                   config_params, read_state, round_scalars, update_state)

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
        from ..export import ExportError, export_run
        from ..methods import METHODS
        from ..methods.lora import LoRA

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
