"""The run folder: everything a run leaves behind, written as it goes.

```
runs/<name>/
  config.toml          the resolved configuration (every setting, defaults included)
  partition.json       client sizes, class histograms, mean pairwise JS divergence
  rounds.jsonl         one JSON line per round: metrics, bytes up/down, seconds
  summary.json         the final result (written at the end)
  final_state.safetensors   the global trainable state after the last round
```
Lines are flushed as soon as a round ends, so a killed run keeps every finished round. An
existing run folder is never overwritten unless asked (``--overwrite``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, RunConfig, to_toml
from .errors import FedpeftError


class RunExistsError(FedpeftError, FileExistsError):
    pass


class RunLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, cfg: RunConfig, overwrite: bool = False) -> RunLog:
        path = cfg.run_dir()
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                raise RunExistsError(f"run folder {path} already exists; pass --overwrite to "
                                     "replace it or out=... to choose another")
            if not (path / "config.toml").is_file():  # --overwrite replaces runs, nothing else
                raise RunExistsError(f"{path} is not empty and holds no fedpeft run (no "
                                     "config.toml): --overwrite replaces run folders only; "
                                     "choose another out=...")
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        log = cls(path)
        atomic_write(path / "config.toml", to_toml(cfg))
        return log

    def write_json(self, name: str, data: Any) -> None:
        atomic_write(self.path / name, json.dumps(_jsonable(data), indent=2) + "\n")

    def log_round(self, record: Mapping[str, Any]) -> None:
        with open(self.path / "rounds.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(_jsonable(record)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def rounds(self) -> list[dict[str, Any]]:
        return read_rounds(self.path)

    def reset_rounds(self, records: list[Mapping[str, Any]]) -> None:
        """Replace ``rounds.jsonl`` with ``records`` (a resumed run restarts from its checkpoint,
        dropping the line of any round that finished after the checkpoint was written)."""
        atomic_write(self.path / "rounds.jsonl",
                     "".join(json.dumps(_jsonable(r)) + "\n" for r in records))

    def save_state(self, name: str, state: Mapping[str, np.ndarray]) -> Path:
        from safetensors.numpy import save_file

        target = self.path / name
        tmp = target.with_suffix(target.suffix + ".tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp))
        os.replace(tmp, target)
        return target


def as_logged(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` as it reads back from ``rounds.jsonl`` (numpy scalars -> numbers, NaN -> None)."""
    return json.loads(json.dumps(_jsonable(record)))


def read_rounds(path: str | Path) -> list[dict[str, Any]]:
    file = Path(path) / "rounds.jsonl"
    if not file.exists():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def validation_series(records: Sequence[Mapping[str, Any]], metric: str
                      ) -> tuple[str, list[tuple[int, float]]]:
    """What a run's learning rate is chosen on, as (its name, [(round, value)] at every round
    that logged it): for a run whose clients score their own personalised models on local
    validation splits (``local-valid-fraction`` with fedsa-lora, whose global model is not what
    it delivers) the mean over clients of ``valid-personal-<metric>``; else the global model's
    ``valid-<metric>`` on the validation split (``valid-fraction``). ``fedpeft compare`` and
    ``fedpeft report`` both choose by it, so they choose alike."""
    personal = f"valid-personal-{metric}"
    local = [(int(r["round"]), float(stats[personal]["mean"])) for r in records
             if personal in (stats := (r.get("local-eval") or {}).get("stats") or {})]
    if local:
        return f"{personal} (mean over clients)", local
    key = f"valid-{metric}"
    return key, [(int(r["round"]), float(r["metrics"][key])) for r in records
                 if (r.get("metrics") or {}).get(key) is not None]


def load_state(path: str | Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def atomic_write(path: Path, text: str) -> None:
    """Write then rename, so a crash never leaves a half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating | float):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


RUN_FILES = ("partition.json", "rounds.jsonl", "summary.json", "checkpoint.safetensors",
             "final_state.safetensors")


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` holds a fedpeft run (its config.toml and something a run wrote)."""
    return (path / "config.toml").is_file() and any((path / f).exists() for f in RUN_FILES)


def check_run_folder(path: Path, overwrite: bool) -> None:
    """Refuse a new run's folder that is a file, lies inside another run's folder, or that
    ``--overwrite`` would delete although it holds no run."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out={path} is a file; expected a folder for the run")
    inside = next((p for p in path.resolve().parents if is_run_folder(p)), None)
    if inside is not None:
        raise ConfigError(f"out={path} is inside the run folder {inside}; choose a folder "
                          "outside it (run folders are never written into)")
    if overwrite and path.is_dir() and any(path.iterdir()) and \
            not (path / "config.toml").is_file():
        raise ConfigError(f"out={path} holds files but no fedpeft run (no config.toml); "
                          "--overwrite only replaces run folders, so choose another out=")
