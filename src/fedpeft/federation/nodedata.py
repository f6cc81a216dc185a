"""What a deployed SuperNode says about itself in ``--node-config``: its slot, threads, own data.

- ``partition-id``: the slot 0..num-clients-1 the server samples (required);
- ``num-partitions``: informational (the run's ``num-clients`` decides the split);
- ``threads``: torch threads for this node's local training (default: the run's ``threads``,
  else every core); give cores / nodes when several SuperNodes share a machine;
- ``train-file``: this node's own training file (an absolute path on the node's machine), for
  the ``*-files`` tasks, in the task's format (CSV/TSV/JSONL, CoNLL, SQuAD JSON);
- ``data-dir``: this node's own copy of a built-in dataset's folder layout
  (``semeval2010_task8/TRAIN_FILE.TXT``, ...), for the built-in tasks;
- ``state-dir``: where this node keeps the tensors of methods whose clients keep state between
  rounds (fedsa-lora's B; ``client_store.py``), an absolute path; default: the run folder's
  ``clients/`` as the server names it (right in simulation and on the server's machine).

With ``train-file`` or ``data-dir`` the node trains on *every* example of its own training split
(after the run's ``valid-fraction`` and ``max-train-samples``, as on the server) instead of on
partition ``partition-id`` of a dataset every machine holds. The files never leave the node and
the server never opens them: it samples the node by its ``partition-id`` like any other, learns
from the node's query reply that it brings its own data, takes the ``num-examples`` of its
first valid update as the node's FedAvg weight, and rejects a later update whose
``num-examples`` differs from it (the weight a node may not inflate mid-run). The head's label
set is the server's (it travels in every train message): a node's file with a label outside it
is refused with a one-line error naming the file and the labels, as is a missing file, a file in
the wrong format (the task's own reader and its messages) or a relative path.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, RunConfig

KEYS = ("partition-id", "num-partitions", "threads", "train-file", "data-dir", "state-dir")
FILES_TASKS = ("text-files", "conll-files", "squad-files")


class NodeConfigError(ConfigError):
    """A SuperNode's ``--node-config`` is wrong: the message names the key and the value."""


@dataclass(frozen=True)
class NodeSettings:
    """A node's own settings (``--node-config``), validated."""

    threads: int = 0
    train_file: str = ""
    data_dir: str = ""
    state_dir: str = ""  # client_store.py: where this node keeps its clients' own tensors

    @property
    def own_data(self) -> bool:
        return bool(self.train_file or self.data_dir)

    def run_config(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` as this node trains it: with its own training file or data folder."""
        if self.train_file:
            if cfg.task not in FILES_TASKS:
                raise NodeConfigError(
                    f"node-config train-file={self.train_file!r}: task={cfg.task} reads a "
                    f"built-in dataset; give this node data-dir=FOLDER (its own copy of the "
                    f"dataset's folder) instead, or run a {'/'.join(FILES_TASKS)} task")
            if not os.path.isfile(self.train_file):
                raise NodeConfigError(f"node-config train-file={self.train_file!r}: no such file "
                                      "on this node's machine")
            return dataclasses.replace(cfg, train_file=self.train_file)
        if self.data_dir:
            if cfg.task in FILES_TASKS:
                raise NodeConfigError(
                    f"node-config data-dir={self.data_dir!r}: task={cfg.task} reads one file; "
                    "give this node train-file=PATH instead")
            if not os.path.isdir(self.data_dir):
                raise NodeConfigError(f"node-config data-dir={self.data_dir!r}: no such folder "
                                      "on this node's machine")
            return dataclasses.replace(cfg, data_dir=self.data_dir)
        return cfg

    def apply_threads(self) -> None:
        if self.threads:
            import torch

            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)


def node_settings(node_config: Mapping[str, Any]) -> NodeSettings:
    """Validate a SuperNode's ``--node-config`` (the keys in the module docstring)."""
    unknown = sorted(set(node_config) - set(KEYS))
    if unknown:
        raise NodeConfigError(f"node-config keys {unknown} are not fedpeft's; expected some of "
                              f"{', '.join(KEYS)}")
    raw = node_config.get("threads", 0)
    try:
        threads = int(raw)
        if threads < 0 or threads != float(raw):
            raise ValueError
    except (TypeError, ValueError):
        raise NodeConfigError(f"node-config threads={raw!r}: expected a whole number >= 0 "
                              "(0 = the run's threads)") from None
    files = {}
    for key in ("train-file", "data-dir", "state-dir"):
        value = str(node_config.get(key, "") or "")
        if value and not os.path.isabs(value):
            raise NodeConfigError(f"node-config {key}={value!r}: give an absolute path (the "
                                  "ClientApp does not run in the SuperNode's working directory)")
        files[key] = value
    if files["train-file"] and files["data-dir"]:
        raise NodeConfigError("node-config has both train-file and data-dir; give one (train-file "
                              "for the *-files tasks, data-dir for the built-in datasets)")
    return NodeSettings(threads=threads, train_file=files["train-file"],
                        data_dir=files["data-dir"], state_dir=files["state-dir"])


def check_labels(task: Any, server_labels: list[str], source: str) -> None:
    """Refuse a node's own training split whose labels are not all in the server's label set."""
    own = set(type(task)._label_vocabulary(task))
    extra = sorted(own - set(server_labels))
    if extra:
        raise NodeConfigError(
            f"{source}: labels {extra[:5]} are not in the run's label set (the server's, "
            f"{len(server_labels)} labels: {server_labels[:8]}"
            f"{' ...' if len(server_labels) > 8 else ''}); every node's file must use the labels "
            "of the server's training data")
