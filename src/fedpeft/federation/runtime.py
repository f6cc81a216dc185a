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

from ..config import ConfigError, RunConfig, non_structural_settings
from ..methods import Method, make_method
from ..models import load_model, load_tokenizer, max_input_length, quantization_kwargs
from ..partition import Partition, make_partition
from ..tasks import Features, Task, make_task
from ..training import resolve_device


def structure_key(cfg: RunConfig) -> str:
    """A hash of the settings the model, the data and the partition depend on."""
    skip = non_structural_settings()
    values = {k: v for k, v in cfg.to_dict().items() if k not in skip}
    return hashlib.sha256(repr(sorted(values.items())).encode()).hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of every parameter and buffer (names, shapes, bytes) of ``model``.

    The server sends the fingerprint of its pretrained model with every train message; a node
    whose own copy differs (another revision, another file) refuses to train, since it would
    compute, e.g., a different FeDeRA residual W - s*B0*A0 and poison the average unnoticed."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


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

    def __init__(self, cfg: RunConfig, labels: list[str] | None = None) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.task: Task = make_task(cfg)
        if labels is not None:  # the server's label set (a node with its own files)
            self.task._labels = list(labels)
        self.method: Method = make_method(cfg, self.task.peft_task_type)
        self.tokenizer = load_tokenizer(cfg.model)
        self.base_fingerprint = ""  # of the pretrained model + seeded head, set by build_model
        self.model = self.build_model()
        self._check_limits()
        self.anchor_id = ""
        self._features: dict[str, Features] = {}
        self._partition: Partition | None = None

    def build_model(self) -> torch.nn.Module:
        """Pretrained encoder + head (seeded), with the method applied, on the run's device."""
        task = self.task
        base = load_model(self.cfg.model, task.auto_model_class(), seed=self.cfg.seed,
                          **task.model_kwargs(),
                          **quantization_kwargs(self.cfg.quantize, self.device))  # QLoRA base
        if not self.base_fingerprint:
            self.base_fingerprint = weights_fingerprint(base)
        return self.method.apply(base).to(self.device)

    def _check_limits(self) -> None:
        """Settings the model or the device cannot honour fail here, before any training."""
        cfg, limit = self.cfg, max_input_length(self.model)
        self.task.length_limit = limit
        self.task.prepare(self.model)
        if cfg.max_length and limit and cfg.max_length > limit:
            raise ConfigError(f"max-length={cfg.max_length} exceeds what model={cfg.model} can "
                              f"take: its position embeddings allow {limit} tokens")
        if (cfg.precision == "bf16" and self.device.type == "cuda"
                and not torch.cuda.is_bf16_supported()):
            raise ConfigError(f"precision=bf16: the GPU {torch.cuda.get_device_name(self.device)}"
                              " has no bf16 support; use precision=fp32 or auto")

    # --- data ----------------------------------------------------------------------------------
    def features(self, split: str) -> Features:
        if split not in self._features:
            examples = self.task.examples(split)
            self._features[split] = self.task.featurize(examples, self.tokenizer, split)
        return self._features[split]

    def partition(self) -> Partition:
        if self._partition is None:
            classes = self.task.partition_classes(self.task.examples("train"))
            self._partition = make_partition(classes, self.cfg)
        return self._partition

    def client_examples(self, partition_id: int, part: str = "train") -> np.ndarray:
        """Client ``partition_id``'s training examples (indices into the train split), or with
        ``part="local-test"`` / ``"local-valid"`` its held-out local test split
        (``local-test-fraction``) / local validation split (``local-valid-fraction``, drawn from
        what the test split left)."""
        from ..partition import LOCAL_VALID, local_split

        cfg = self.cfg
        train, test = local_split(self.partition().clients[partition_id],
                                  cfg.local_test_fraction, cfg.seed, partition_id)
        train, valid = local_split(train, cfg.local_valid_fraction, cfg.seed, partition_id,
                                   LOCAL_VALID)
        return {"local-test": test, "local-valid": valid}.get(part, train)

    def client_rows(self, partition_id: int) -> list[dict[str, list[int]]]:
        """Training features of client ``partition_id`` (without its local held-out splits)."""
        examples = self.client_examples(partition_id)
        return self.features("train").select_examples(examples).rows

    def evaluate_local(self, partition_id: int, part: str = "local-test") -> dict[str, float]:
        """The model's metrics on client ``partition_id``'s local test (or ``part="local-valid"``
        validation) split, featurised as an evaluation split, once per client."""
        key = f"{part}-{partition_id}"
        train = self.task.examples("train")
        examples = [train[i] for i in self.client_examples(partition_id, part)]
        if not examples:
            raise ValueError(f"client {partition_id} has no {part} split (local-test-fraction="
                             f"{self.cfg.local_test_fraction}, local-valid-fraction="
                             f"{self.cfg.local_valid_fraction})")
        if key not in self._features:
            self._features[key] = self.task.featurize(examples, self.tokenizer, part)
        return self.task.evaluate(self.model, examples, self._features[key], self.tokenizer,
                                  self.device)

    def collate(self, rows: Any) -> dict[str, torch.Tensor]:
        return self.task.collate(rows, self.tokenizer.pad_token_id)

    def evaluate(self, split: str = "test") -> dict[str, float]:
        return self.task.evaluate(self.model, self.task.examples(split), self.features(split),
                                  self.tokenizer, self.device)


def set_threads(cfg: RunConfig, server: bool = False) -> None:
    """Torch threads: ``threads`` if set; else a worker's share of the cores
    (``resources.plan_resources``), or every core for the server, which evaluates while the
    workers wait."""
    from .resources import plan_resources

    threads = cfg.threads or ((os.cpu_count() or 1) if server else plan_resources(cfg).threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


_CACHE: dict[str, Runtime] = {}


def cached_runtime(cfg: RunConfig, labels: list[str] | None = None) -> Runtime:
    """This process's runtime for ``cfg`` (built on first use; one run cached at a time).
    ``labels``: the head's label set when it must be the server's rather than this node's."""
    key = structure_key(cfg) + ("" if labels is None else repr(labels))
    runtime = _CACHE.get(key)
    if runtime is None:
        _CACHE.clear()
        set_threads(cfg)
        runtime = _CACHE[key] = Runtime(cfg, labels)
    runtime.cfg = cfg  # non-structural settings (lr, rounds) may change between messages
    runtime.method.cfg = cfg
    runtime.task.cfg = cfg
    return runtime
