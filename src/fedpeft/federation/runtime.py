"""One process's view of a run: task, tokenizer, method, model, tokenised data, partition.

The server builds one to initialise and evaluate the global model. Each simulation worker (a
Ray actor) or deployed SuperNode builds one on its first message and keeps it for the whole run:
one frozen base model per worker, the data tokenised once, and per client only the trainable
tensors are swapped in (``load_trainable_state``) for the length of its local training.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
import torch

from ..config import RunConfig
from ..methods import Method, make_method
from ..models import load_model, load_tokenizer
from ..partition import Partition, dirichlet_partition
from ..tasks import Features, Task, make_task
from ..training import resolve_device

# Settings that do not change the model, the data or the partition: a cached runtime survives
# a change of these (e.g. a resumed run with more rounds).
_NOT_STRUCTURAL = {"rounds", "clients_per_round", "eval_every", "lr", "weight_decay",
                   "local_epochs", "batch_size", "max_grad_norm", "eval_batch_size", "out",
                   "progress", "sim_workers", "threads"}


def structure_key(cfg: RunConfig) -> str:
    values = {k: v for k, v in cfg.to_dict().items() if k.replace("-", "_") not in _NOT_STRUCTURAL}
    return hashlib.sha256(repr(sorted(values.items())).encode()).hexdigest()[:16]


def anchor_id(anchor: dict[str, np.ndarray] | None) -> str:
    """Content hash of an anchor, so a client can tell whether it already applied it."""
    if not anchor:
        return ""
    digest = hashlib.sha256()
    for key in sorted(anchor):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(anchor[key]).tobytes())
    return digest.hexdigest()[:16]


class Runtime:
    """Everything a process needs to train or evaluate for one run configuration."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.task: Task = make_task(cfg)
        self.method: Method = make_method(cfg, self.task.peft_task_type)
        self.tokenizer = load_tokenizer(cfg.model)
        self.model = self.build_model()
        self.anchor_id = ""
        self._features: dict[str, Features] = {}
        self._partition: Partition | None = None

    def build_model(self) -> torch.nn.Module:
        """Pretrained encoder + head (seeded), with the method applied, on the run's device."""
        task = self.task
        base = load_model(self.cfg.model, task.auto_model_class(), seed=self.cfg.seed,
                          **task.model_kwargs())
        return self.method.apply(base).to(self.device)

    # --- data ----------------------------------------------------------------------------------
    def features(self, split: str) -> Features:
        if split not in self._features:
            examples = self.task.examples(split)
            self._features[split] = self.task.featurize(examples, self.tokenizer, split)
        return self._features[split]

    def partition(self) -> Partition:
        if self._partition is None:
            classes = self.task.partition_classes(self.task.examples("train"))
            self._partition = dirichlet_partition(classes, self.cfg.num_clients, self.cfg.alpha,
                                                  self.cfg.seed, self.cfg.min_size)
        return self._partition

    def client_rows(self, partition_id: int) -> list[dict[str, list[int]]]:
        """Training features of client ``partition_id``."""
        examples = self.partition().clients[partition_id]
        return self.features("train").select_examples(examples).rows

    def collate(self, rows: Any) -> dict[str, torch.Tensor]:
        return self.task.collate(rows, self.tokenizer.pad_token_id)

    def evaluate(self, split: str = "test") -> dict[str, float]:
        return self.task.evaluate(self.model, self.task.examples(split), self.features(split),
                                  self.tokenizer, self.device)


def set_threads(cfg: RunConfig) -> None:
    """Torch threads per worker: ``threads`` if set, else the cores shared among workers."""
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.sim_workers)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


_CACHE: dict[str, Runtime] = {}


def cached_runtime(cfg: RunConfig) -> Runtime:
    """This process's runtime for ``cfg`` (built on first use; one run cached at a time)."""
    key = structure_key(cfg)
    runtime = _CACHE.get(key)
    if runtime is None:
        _CACHE.clear()
        set_threads(cfg)
        runtime = _CACHE[key] = Runtime(cfg)
    runtime.cfg = cfg  # non-structural settings (lr, rounds) may change between messages
    runtime.method.cfg = cfg
    runtime.task.cfg = cfg
    return runtime
