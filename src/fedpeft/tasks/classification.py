"""Sequence classification: SemEval-2010 Task 8, 20 Newsgroups, and the user's CSV/JSONL files.

Metric: accuracy (the FeDeRA paper's metric for both datasets), plus macro-F1.
Partition class (paper App. A): the label.

SemEval entity markers: the ``<e1>..</e1>`` and ``<e2>..</e2>`` tags are kept as plain text, so
the tokenizer splits them into ordinary word pieces (``<``, ``e``, ``##1``, ``>`` for BERT).
Adding them as new special tokens would add embedding rows that must be trained and exchanged
by every method, which would change each method's trainable budget; plain text keeps the
budget exactly the paper's and still marks the two nominals for the encoder.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..training import predict
from .base import DataError, Features, Task, find_dataset, numbered_lines, open_text


class ClassificationTask(Task):
    """Shared logic; subclasses only read their files into ``{"text", "label"}`` examples."""

    kind = "classification"
    metric = "accuracy"
    peft_task_type = "SEQ_CLS"

    def _label_vocabulary(self) -> list[str]:
        """Labels in first-seen order of the training split (subclasses may fix an order)."""
        return list(dict.fromkeys(e["label"] for e in self.all_examples("train")))

    def partition_classes(self, examples: list[dict[str, Any]]) -> list[str]:
        return [e["label"] for e in examples]

    def auto_model_class(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def featurize(self, examples: list[dict[str, Any]], tokenizer: Any, split: str) -> Features:
        label_id = {n: i for i, n in enumerate(self.label_names)}
        unknown = sorted({e["label"] for e in examples} - label_id.keys())
        if unknown:
            raise DataError(self._source(split), f"labels {unknown[:5]} occur in the {split} split "
                            "but not in the training split")
        enc = tokenizer([e["text"] for e in examples], truncation=True, max_length=self.max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        rows = [{k: enc[k][i] for k in keys} | {"labels": label_id[e["label"]]}
                for i, e in enumerate(examples)]
        return Features(rows, np.arange(len(rows), dtype=np.int64))

    def evaluate(self, model: torch.nn.Module, examples: list[dict[str, Any]], features: Features,
                 tokenizer: Any, device: torch.device) -> dict[str, float]:
        preds = predict(model, features.rows, lambda rows: self.collate(rows, tokenizer.pad_token_id),
                        batch_size=self.cfg.eval_batch_size, device=device,
                        precision=self.cfg.precision,
                        outputs=lambda out, batch: out.logits.argmax(-1).tolist())
        gold = np.array([r["labels"] for r in features.rows])
        pred = np.array(preds)
        return {"accuracy": float((gold == pred).mean()), "macro-f1": macro_f1(gold, pred)}

    def _source(self, split: str) -> str:
        return f"{self.name} {split} split"


def macro_f1(gold: np.ndarray, pred: np.ndarray) -> float:
    """Unweighted mean F1 over the classes present in ``gold``."""
    scores = []
    for c in np.unique(gold):
        tp = float(np.sum((pred == c) & (gold == c)))
        denom = float(np.sum(pred == c) + np.sum(gold == c))
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else 0.0


# --- SemEval-2010 Task 8 -----------------------------------------------------------------------

SEMEVAL_LABELS = [
    "Other",
    *(f"{rel}({a},{b})" for rel in (
        "Cause-Effect", "Component-Whole", "Content-Container", "Entity-Destination",
        "Entity-Origin", "Instrument-Agency", "Member-Collection", "Message-Topic",
        "Product-Producer") for a, b in (("e1", "e2"), ("e2", "e1"))),
]
_SEMEVAL_SENTENCE = re.compile(r'^(\d+)\t"(.*)"\s*$')


class SemEval(ClassificationTask):
    """SemEval-2010 Task 8: 19 directed relation labels (Hendrickx et al., 2010). L=64."""

    name = "semeval"
    default_max_length = 64
    files = {"train": "TRAIN_FILE.TXT", "test": "TEST_FILE_FULL.TXT"}

    def _label_vocabulary(self) -> list[str]:
        return SEMEVAL_LABELS

    def _load(self, split: str) -> list[dict[str, Any]]:
        path = find_dataset(self.cfg, "semeval2010_task8", [self.files[split]])[self.files[split]]
        return read_semeval(path)


def read_semeval(path: str | Path) -> list[dict[str, Any]]:
    """Parse the official 4-line blocks: ``id<TAB>"sentence"``, label, ``Comment:``, blank."""
    examples: list[dict[str, Any]] = []
    lines = list(numbered_lines(path))
    i = 0
    while i < len(lines):
        number, line = lines[i]
        if not line.strip():
            i += 1
            continue
        match = _SEMEVAL_SENTENCE.match(line)
        if not match:
            raise DataError(path, 'expected `<id><TAB>"<sentence>"`', number)
        if i + 1 >= len(lines):
            raise DataError(path, "expected a relation label after the sentence", number + 1)
        label_number, label = lines[i + 1]
        label = label.strip()
        if label not in SEMEVAL_LABELS:
            raise DataError(path, f"expected one of the 19 relation labels, got {label!r}",
                            label_number)
        text = match.group(2)
        if "<e1>" not in text or "<e2>" not in text:
            raise DataError(path, "expected <e1>..</e1> and <e2>..</e2> markers", number)
        examples.append({"id": match.group(1), "text": text, "label": label})
        i += 2
        if i < len(lines) and lines[i][1].startswith("Comment"):
            i += 1
    if not examples:
        raise DataError(path, "no examples found")
    return examples


# --- 20 Newsgroups -----------------------------------------------------------------------------

class Newsgroups(ClassificationTask):
    """20 Newsgroups, bydate split, 20 labels (Lang, 1995). Paper L=256."""

    name = "20news"
    default_max_length = 256

    def _label_vocabulary(self) -> list[str]:
        names = sorted({(e["label_id"], e["label"]) for e in self.all_examples("train")})
        return [n for _, n in names]

    def _load(self, split: str) -> list[dict[str, Any]]:
        name = f"{split}.jsonl"
        path = find_dataset(self.cfg, "20newsgroups", [name])[name]
        examples = []
        for number, line in numbered_lines(path):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                examples.append({"text": row["text"], "label": row["label_text"],
                                 "label_id": int(row["label"])})
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise DataError(path, "expected a JSON object with text, label (int) and "
                                f"label_text: {err}", number) from None
        return examples


# --- the user's own files ----------------------------------------------------------------------

class TextFiles(ClassificationTask):
    """The user's CSV or JSONL files: ``train-file``/``test-file`` with ``text-column`` and
    ``label-column`` (names configurable). Labels are strings; their order is sorted."""

    name = "text-files"

    def _label_vocabulary(self) -> list[str]:
        return sorted({e["label"] for e in self.all_examples("train")})

    def _load(self, split: str) -> list[dict[str, Any]]:
        path = self.user_file(split)
        return read_text_file(path, self.cfg.text_column, self.cfg.label_column)

    def _source(self, split: str) -> str:
        return self.user_file(split)


def read_text_file(path: str | Path, text_column: str, label_column: str) -> list[dict[str, Any]]:
    """Read a CSV (header row) or JSONL file into ``{"text", "label"}`` examples, validating
    that both columns exist and that no text is empty."""
    path = Path(path)
    name = path.name.removesuffix(".gz")
    rows: list[tuple[int, dict[str, Any]]] = []
    if name.endswith(".jsonl") or name.endswith(".json"):
        for number, line in numbered_lines(path):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(path, f"expected one JSON object per line: {err.msg}",
                                number) from None
    elif name.endswith(".csv") or name.endswith(".tsv"):
        with open_text(path) as fh:
            reader = csv.DictReader(fh, delimiter="\t" if name.endswith(".tsv") else ",")
            for column in (text_column, label_column):
                if column not in (reader.fieldnames or []):
                    raise DataError(path, f"missing column {column!r}; the header has "
                                    f"{reader.fieldnames}", 1)
            rows = [(i + 2, r) for i, r in enumerate(reader)]
    else:
        raise DataError(path, "expected a .csv, .tsv or .jsonl file")
    examples = []
    for number, row in rows:
        if not isinstance(row, dict):
            raise DataError(path, "expected a JSON object", number)
        for column in (text_column, label_column):
            if column not in row:
                raise DataError(path, f"missing field {column!r}", number)
        text, label = row[text_column], row[label_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(path, f"empty text in column {text_column!r}", number)
        if label is None or str(label).strip() == "":
            raise DataError(path, f"empty label in column {label_column!r}", number)
        examples.append({"text": text, "label": str(label).strip()})
    if not examples:
        raise DataError(path, "no examples found")
    return examples
