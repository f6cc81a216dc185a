"""What every task (classification, NER, extractive QA) provides to the federation.

A task turns raw files into *examples* (one per labelled unit: a sentence, a document, a
question), gives each example a *partition class* for the Dirichlet split (paper App. A), turns
examples into model *features* (token ids; one example may give several features, as QA's
sliding windows do), builds the matching Hugging Face model head, and scores a model on a split.
The training loop, the federation and the methods never look inside examples: they only see
features, which is why one loop serves every task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import RunConfig
from .files import DataError


@dataclass
class Features:
    """Model inputs of one split: ``rows[i]`` is a dict of int lists, ``example_index[i]`` the
    example it came from (classification and NER: ``i``; QA: the question of the window)."""

    rows: list[dict[str, list[int]]]
    example_index: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)  # task-specific (e.g. QA offsets)

    def __len__(self) -> int:
        return len(self.rows)

    def select_examples(self, example_ids: Sequence[int]) -> Features:
        """The features of the given examples (a client's shard), in feature order."""
        keep = np.isin(self.example_index, np.asarray(example_ids, dtype=np.int64))
        idx = np.flatnonzero(keep)
        extra = {k: [v[i] for i in idx] if isinstance(v, list) else v
                 for k, v in self.extra.items()}
        return Features([self.rows[i] for i in idx], self.example_index[idx], extra)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(r["input_ids"]) for r in self.rows), dtype=np.int64,
                           count=len(self))


class Task(ABC):
    """Base class of a federated fine-tuning task."""

    name: str = ""
    kind: str = ""  # "classification" | "ner" | "qa"
    metric: str = ""  # primary metric key in ``evaluate``'s result
    data: str = ""  # what it reads, for ``fedpeft tasks``: dataset folders or the user's files
    default_max_length: int = 128
    peft_task_type: str = ""  # PEFT TaskType name, so the head is trained and exchanged
    label_pad_id: int = -100
    group_by_length: bool = False  # local training batches rows of similar length (decoders)

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self._all: dict[str, list[dict[str, Any]]] = {}
        self._examples: dict[str, list[dict[str, Any]]] = {}
        self._labels: list[str] | None = None

    # --- raw data ------------------------------------------------------------------------------
    @abstractmethod
    def _load(self, split: str) -> list[dict[str, Any]]:
        """Read the raw examples of ``split`` ("train" or "test")."""

    def user_file(self, split: str) -> str:
        """The user's file behind ``split`` for the ``*-files`` tasks: ``test-file`` for the test
        split, else ``train-file`` (the validation split is carved from it)."""
        key = "test" if split == "test" else "train"
        path = self.cfg.test_file if key == "test" else self.cfg.train_file
        if not path:
            raise DataError(f"{key}-file", f"task={self.name} needs {key}-file=PATH")
        return str(path)

    def all_examples(self, split: str) -> list[dict[str, Any]]:
        """Every example of a split, loaded once (label vocabularies are built from these)."""
        if split not in self._all:
            self._all[split] = self._load(split)
        return self._all[split]

    def examples(self, split: str) -> list[dict[str, Any]]:
        """The examples a run uses for ``split`` ("train", "valid" or "test").

        With ``valid-fraction`` > 0 a seeded share of the training file becomes the "valid"
        split (for choosing learning rates, never the test set) and "train" is the rest.
        ``max-train-samples`` / ``max-test-samples`` then take a seeded random subset (kept in
        file order).
        """
        if split not in self._examples:
            source = "test" if split == "test" else "train"
            examples = self.all_examples(source)
            if source == "train" and self.cfg.valid_fraction > 0:
                rng = np.random.default_rng([self.cfg.seed, 2])
                held = rng.random(len(examples)) < self.cfg.valid_fraction
                examples = [e for e, h in zip(examples, held, strict=True)
                            if h == (split == "valid")]
            elif split == "valid":
                raise ValueError("the valid split needs valid-fraction > 0")
            limit = self.cfg.max_test_samples if split == "test" else self.cfg.max_train_samples
            if split != "valid" and limit and limit < len(examples):
                rng = np.random.default_rng([self.cfg.seed, 1 if split == "test" else 0])
                keep = np.sort(rng.choice(len(examples), size=limit, replace=False))
                examples = [examples[i] for i in keep]
            self._examples[split] = examples
        return self._examples[split]

    @property
    def label_names(self) -> list[str]:
        """Label vocabulary of the model head (class names or BIO tags); empty for QA.
        Computed once, by ``_label_vocabulary``."""
        if self._labels is None:
            self._labels = self._label_vocabulary()
        return self._labels

    def _label_vocabulary(self) -> list[str]:
        return []

    @abstractmethod
    def partition_classes(self, examples: list[dict[str, Any]]) -> list[str]:
        """The class of each example for the Dirichlet non-IID split (paper App. A)."""

    # --- model ---------------------------------------------------------------------------------
    @abstractmethod
    def auto_model_class(self) -> Any:
        """The ``transformers.AutoModelFor*`` class of this task."""

    def model_kwargs(self) -> dict[str, Any]:
        names = self.label_names
        if not names:
            return {}
        return {"num_labels": len(names), "id2label": dict(enumerate(names)),
                "label2id": {n: i for i, n in enumerate(names)}}

    def baseline(self) -> dict[str, Any] | None:
        """The metric of a trivial predictor (classification: the majority class), or None."""
        return None

    length_limit: int | None = None  # the model's longest input, set once the model is known

    def prepare(self, model: torch.nn.Module) -> None:
        """Called with the built model before features are collated (generative tasks ask it
        which forward arguments it takes); nothing by default."""

    @property
    def max_length(self) -> int:
        """``max-length``, else the task's default capped at the model's longest input."""
        if self.cfg.max_length:
            return self.cfg.max_length
        return min(self.default_max_length, self.length_limit or self.default_max_length)

    # --- features ------------------------------------------------------------------------------
    @abstractmethod
    def featurize(self, examples: list[dict[str, Any]], tokenizer: Any, split: str) -> Features:
        """Tokenise examples into features (no padding: batches are padded when collated)."""

    def collate(self, rows: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
        """Pad a batch to its longest row (dynamic padding). Label lists pad with -100."""
        width = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, torch.Tensor] = {}
        for key in rows[0]:
            values = [r[key] for r in rows]
            if isinstance(values[0], int):
                batch[key] = torch.tensor(values, dtype=torch.long)
                continue
            fill = {"input_ids": pad_id, "labels": self.label_pad_id}.get(key, 0)
            out = torch.full((len(rows), width), fill, dtype=torch.long)
            for i, v in enumerate(values):
                out[i, : len(v)] = torch.tensor(v, dtype=torch.long)
            batch[key] = out
        return batch

    # --- metrics -------------------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, model: torch.nn.Module, examples: list[dict[str, Any]], features: Features,
                 tokenizer: Any, device: torch.device) -> dict[str, float]:
        """Score ``model`` on a split; the result holds at least ``self.metric``."""


def per_source_f1(examples: list[dict[str, Any]], left: list[Any], right: list[Any],
                  score: Callable[[list[Any], list[Any]], dict[str, float]]) -> dict[str, float]:
    """``f1-<source>`` for each source when the examples come from several (PLONER, MRQA):
    ``score(left, right)["f1"]`` over that source's items (``left``/``right`` are per-example
    lists in the order ``score`` takes them). Empty for a single source."""
    sources = sorted({e["source"] for e in examples})
    if len(sources) < 2:
        return {}
    out = {}
    for source in sources:
        idx = [i for i, e in enumerate(examples) if e["source"] == source]
        out[f"f1-{source}"] = score([left[i] for i in idx], [right[i] for i in idx])["f1"]
    return out
