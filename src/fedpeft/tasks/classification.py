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
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..training import predict
from .base import Features, Task
from .files import DataError, find_dataset, json_lines, numbered_lines, open_text


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
        preds = predict(model, features.rows,
                        lambda rows: self.collate(rows, tokenizer.pad_token_id),
                        batch_size=self.cfg.eval_batch_size, device=device,
                        precision=self.cfg.precision,
                        outputs=lambda out, batch: out.logits.argmax(-1).tolist())
        gold = np.array([r["labels"] for r in features.rows])
        pred = np.array(preds)
        return {"accuracy": float((gold == pred).mean()), "macro-f1": macro_f1(gold, pred)}

    def baseline(self) -> dict[str, Any]:
        """The test metric of always predicting the commonest training label (the bar a model
        must clear to have learned anything)."""
        train = [e["label"] for e in self.examples("train")]
        label = max(dict.fromkeys(train), key=train.count)  # ties: the first seen
        test = [e["label"] for e in self.examples("test")]
        return {"accuracy": sum(t == label for t in test) / max(1, len(test)), "label": label}

    def _source(self, split: str) -> str:
        return f"{self.name} {split} split"


def macro_f1(gold: np.ndarray, pred: np.ndarray) -> float:
    """Unweighted mean F1 over the union of gold and predicted classes: scikit-learn's
    ``f1_score(average="macro", zero_division=0)``, so a class that is only ever predicted
    counts with F1 = 0 (it costs precision elsewhere) rather than being left out."""
    from sklearn.metrics import f1_score

    if len(gold) == 0:
        return 0.0
    return float(f1_score(gold, pred, average="macro", zero_division=0))


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
    data = "semeval2010_task8/ (embedded in the package)"
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
    data = "20newsgroups/"
    default_max_length = 256

    def _label_vocabulary(self) -> list[str]:
        names = sorted({(e["label_id"], e["label"]) for e in self.all_examples("train")})
        return [n for _, n in names]

    def _load(self, split: str) -> list[dict[str, Any]]:
        name = f"{split}.jsonl"
        path = find_dataset(self.cfg, "20newsgroups", [name])[name]
        examples = []
        for number, row in json_lines(path):
            try:
                examples.append({"text": row["text"], "label": row["label_text"],
                                 "label_id": int(row["label"])})
            except (KeyError, TypeError, ValueError) as err:
                raise DataError(path, "expected a JSON object with text, label (int) and "
                                f"label_text: {err}", number) from None
        return examples


# --- the user's own files ----------------------------------------------------------------------

class TextFiles(ClassificationTask):
    """The user's CSV or JSONL files: ``train-file``/``test-file`` with ``text-column`` and
    ``label-column`` (names configurable). Labels are strings; their order is sorted."""

    name = "text-files"
    data = "train-file, test-file (CSV, TSV or JSONL)"

    def _label_vocabulary(self) -> list[str]:
        return sorted({e["label"] for e in self.all_examples("train")})

    def _load(self, split: str) -> list[dict[str, Any]]:
        path = self.user_file(split)
        return read_text_file(path, self.cfg.text_column, self.cfg.label_column)

    def _source(self, split: str) -> str:
        return self.user_file(split)


def read_text_file(path: str | Path, text_column: str, label_column: str) -> list[dict[str, Any]]:
    """Read a CSV/TSV (header row) or JSONL file into ``{"text", "label"}`` examples, validating
    that both columns exist, that every row has the header's fields and that no text is empty."""
    path = Path(path)
    name = path.name.removesuffix(".gz")
    rows: list[tuple[int, dict[str, Any]]] = []
    if name.endswith(".jsonl") or name.endswith(".json"):
        rows = list(json_lines(path))
    elif name.endswith(".csv") or name.endswith(".tsv"):
        rows = _read_delimited(path, "\t" if name.endswith(".tsv") else ",", text_column,
                               label_column)
    else:
        raise DataError(path, "expected a .csv, .tsv or .jsonl file (optionally .gz)")
    examples = []
    for number, row in rows:
        if not isinstance(row, dict):
            raise DataError(path, f"expected a JSON object, got {type(row).__name__} "
                            f"{_short(row)}", number)
        for column in (text_column, label_column):
            if column not in row:
                raise DataError(path, f"missing field {column!r} (text-column={text_column!r}, "
                                f"label-column={label_column!r}); the object has "
                                f"{sorted(map(str, row))[:10]}", number)
        text, label = row[text_column], row[label_column]
        if not isinstance(text, str):
            raise DataError(path, f"expected text in {text_column!r}, got "
                            f"{type(text).__name__} {_short(text)}", number)
        if not text.strip():
            raise DataError(path, f"empty text in column {text_column!r}", number)
        if isinstance(label, dict | list):
            raise DataError(path, f"expected a label (a string or a number) in "
                            f"{label_column!r}, got {_short(label)}", number)
        if label is None or str(label).strip() == "":
            raise DataError(path, f"empty label in column {label_column!r}", number)
        examples.append({"text": text, "label": str(label).strip()})
    if not examples:
        raise DataError(path, "no examples found (expected a header row and at least one row)"
                        if not name.endswith(".jsonl") and not name.endswith(".json") else
                        "no examples found (expected one JSON object per line)")
    return examples


def _read_delimited(path: Path, delimiter: str, text_column: str, label_column: str
                    ) -> list[tuple[int, dict[str, Any]]]:
    """(line, row) of a CSV/TSV file with a header row; every row must have its fields."""
    kind = "TSV" if delimiter == "\t" else "CSV"
    # A document may be longer than the csv module's default field limit (128 KiB).
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    rows = []
    with open_text(path) as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = next(reader, None)
            while header == []:  # blank lines before the header
                header = next(reader, None)
            if header is None:
                raise DataError(path, f"is empty; expected a {kind} header row with columns "
                                f"{text_column!r} and {label_column!r}")
            header = [h.strip() for h in header]
            for column in (text_column, label_column):
                if column not in header:
                    other = "," if delimiter == "\t" else "\t"
                    hint = ""
                    if len(header) == 1 and any(c in header[0] for c in (other, ";", "|")):
                        hint = (f" (the header is one field; is the file {other!r}-separated?"
                                " .csv files are comma-separated, .tsv tab-separated)")
                    key = "text-column" if column == text_column else "label-column"
                    raise DataError(path, f"missing column {column!r} ({key}={column!r}); the "
                                    f"header has {header}{hint}", reader.line_num)
            while True:
                line = reader.line_num + 1  # a quoted field may span several lines
                fields = next(reader, None)
                if fields is None:
                    break
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue  # a blank line
                if len(fields) != len(header):
                    raise DataError(path, f"row has {len(fields)} field(s) but the header has "
                                    f"{len(header)} (an unquoted {delimiter!r} in a text, or a "
                                    "missing field?)", line)
                rows.append((line, dict(zip(header, fields, strict=True))))
        except csv.Error as err:
            raise DataError(path, f"malformed {kind}: {err}", reader.line_num or None) from None
    return rows


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
