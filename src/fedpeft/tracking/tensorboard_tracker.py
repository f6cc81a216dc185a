"""``track=tensorboard``: event files in ``<run>/tensorboard``."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig, to_toml
from ..runlog import as_logged
from .base import (TENSORBOARD_DIR, Record, _first_line, _quiet, config_params, read_state,
                   round_scalars, update_state)

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
