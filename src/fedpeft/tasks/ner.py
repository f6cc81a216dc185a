"""Named-entity recognition (token classification): WNUT-2017, a PLONER stand-in, CoNLL files.

- ``wnut17``: WNUT-2017 emerging entities, 13 BIO tags (Derczynski et al., 2017). Train on the
  train file, score on the test file (the dev file is not used; ``valid-fraction`` carves a
  validation split from train).
- ``ploner``: stand-in for PLONER (person/location/organisation NER pooled over corpora):
  CoNLL-2003 + WNUT-2017 with tags mapped by ``PLONER_MAP`` (MISC, creative-work and product
  become O). Every sentence keeps its ``source``; the test metric is also given per source.
- ``conll-files``: the user's CoNLL files (``train-file``/``test-file``, ``token-column``,
  ``tag-column``), validated as IOB2.

Labelling: the first subword of each word carries the word's tag, the other subwords -100
(ignored by the loss). Sentences are encoded as pre-split words; a byte-level BPE tokenizer
(RoBERTa) then needs a prefix space before every word (``words_tokenizer``). Max length 64
(the FeDeRA paper's). Words cut off by truncation are predicted O, so their gold entities count
as misses: the score is over full sentences.
Metric: seqeval entity-level micro F1, precision and recall (conlleval semantics).
Partition class (paper App. A): the sorted set of entity types of a sentence ("O" if none),
for ``ploner`` prefixed by the source; beyond ``ner-max-classes`` the rarest classes merge
into "other".
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..training import predict
from .base import Features, Task, per_source_f1
from .files import DataError, InvalidRecords, find_dataset, numbered_lines

_TAG = re.compile(r"^(O|[BI]-\S+)$")
WNUT17_TYPES = ["corporation", "creative-work", "group", "location", "person", "product"]
PLONER_TYPES = ["PER", "LOC", "ORG"]
# source -> {source entity type: PLONER type}; types not listed become O.
PLONER_MAP = {
    "conll2003": {"PER": "PER", "LOC": "LOC", "ORG": "ORG"},
    "wnut17": {"person": "PER", "location": "LOC", "corporation": "ORG", "group": "ORG"},
}


def bio_labels(types: Sequence[str]) -> list[str]:
    """``O`` then ``B-t``, ``I-t`` for each type in the given order."""
    return ["O", *(f"{p}-{t}" for t in types for p in "BI")]


def bio_problem(previous: str, tag: str) -> str | None:
    """Why ``tag`` after ``previous`` is not IOB2, or None if it is fine."""
    if not _TAG.match(tag):
        return f"tag {tag!r} is not in BIO form (O, B-TYPE or I-TYPE)"
    if tag.startswith("I-") and previous[2:] != tag[2:]:
        return (f"tag {tag!r} follows {previous!r}: an entity must start with B-{tag[2:]} "
                "(IOB1 files must be converted to IOB2)")
    return None


def read_conll(path: str | Path, token_column: int = 0, tag_column: int = -1,
               skip_invalid: bool = False) -> list[dict[str, Any]]:
    """Read a CoNLL file into ``{"tokens", "tags", "line"}`` sentences.

    One token per line, columns split by tabs (or by whitespace when a line has no tab), blank
    or whitespace-only lines between sentences, ``-DOCSTART-`` lines ignored. A sentence with a
    short line, an empty token or a non-IOB2 tag is invalid (see ``InvalidRecords``).
    """
    problems = InvalidRecords(path, skip=skip_invalid)
    sentences: list[dict[str, Any]] = []
    tokens: list[str] = []
    tags: list[str] = []
    start, bad = 0, False

    def close() -> None:
        if tokens and not bad:
            sentences.append({"tokens": list(tokens), "tags": list(tags), "line": start})
        tokens.clear()
        tags.clear()

    for number, line in numbered_lines(path):
        if not line.strip() or line.startswith("-DOCSTART-"):
            close()
            bad = False
            continue
        if not tokens and not bad:
            start = number
        columns = line.split("\t") if "\t" in line else line.split()
        n = len(columns)
        if not (-n <= token_column < n and -n <= tag_column < n) or \
                token_column % n == tag_column % n:
            problem: str | None = (f"expected token column {token_column} and tag column "
                                   f"{tag_column}, got {n} column(s): {line!r}")
        else:
            token, tag = columns[token_column].strip(), columns[tag_column].strip()
            previous = tags[-1] if tags else "O"
            problem = "empty token" if not token else bio_problem(previous, tag)
        if problem is not None:
            if not bad:
                problems.add(problem, number)
            bad = True
            continue
        tokens.append(token)
        tags.append(tag)
    close()
    return problems.finish(sentences, "sentence")


def entity_types(tags: Sequence[str]) -> list[str]:
    """Sorted distinct entity types of a tag sequence."""
    return sorted({t[2:] for t in tags if t != "O"})


def merge_rare(classes: Sequence[str], limit: int) -> list[str]:
    """Keep the ``limit - 1`` most frequent classes (ties by name) and call the rest "other".

    ``limit`` 0, or no more classes than ``limit``, keeps every class unchanged.
    """
    counts = Counter(classes)
    if limit == 0 or len(counts) <= limit:
        return list(classes)
    keep = {c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: limit - 1]}
    return [c if c in keep else "other" for c in classes]


def first_subword_positions(word_ids: Sequence[int | None], num_words: int) -> list[int]:
    """Token position of each word's first subword, -1 for a word with none (cut off by
    truncation, or a character the tokenizer drops). ``word_ids`` as from a fast tokenizer."""
    positions = [-1] * num_words
    for position, word in enumerate(word_ids):
        if word is not None and positions[word] < 0:
            positions[word] = position
    return positions


def words_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer`` ready to encode pre-split words (``is_split_into_words=True``).

    Byte-level BPE (RoBERTa, GPT-2 and their kin) marks a word's start by the space before it
    ("Ġvisited"). Given the words one by one, a tokenizer built without ``add_prefix_space``
    encodes each as if it continued the previous word ("v", "is", "ited"): pieces the model
    never saw at word starts, for every word of every sentence, and transformers 5 no longer
    refuses it. Such a tokenizer is copied with the prefix space switched on in its
    pre-tokenizer and post-processor (what ``add_prefix_space=True`` at load time gives);
    any other tokenizer (WordPiece, SentencePiece/Metaspace, which mark every word already) is
    returned as it is.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"NER needs a fast tokenizer (word ids); {type(tokenizer).__name__} "
                         "is not one (give a model folder with a tokenizer.json)")
    if getattr(tokenizer, "add_prefix_space", False):
        return tokenizer
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if not _add_prefix_space(state.get("pre_tokenizer")):
        return tokenizer
    _add_prefix_space(state.get("post_processor"))
    from tokenizers import Tokenizer

    patched = Tokenizer.from_str(json.dumps(state))
    variant = copy.deepcopy(tokenizer)
    variant.backend_tokenizer.pre_tokenizer = patched.pre_tokenizer
    variant.backend_tokenizer.post_processor = patched.post_processor
    variant.add_prefix_space = True
    return variant


def _add_prefix_space(component: Any) -> bool:
    """Switch on ``add_prefix_space`` of every byte-level part of a serialised tokenizer
    component (nested sequences included); whether any was off."""
    if isinstance(component, list):
        return any([_add_prefix_space(c) for c in component])
    if not isinstance(component, dict):
        return False
    changed = False
    if component.get("type") in ("ByteLevel", "RobertaProcessing") and \
            component.get("add_prefix_space") is False:
        component["add_prefix_space"] = changed = True
    for key in ("pretokenizers", "processors"):
        changed |= _add_prefix_space(component.get(key))
    return changed


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """seqeval entity-level micro precision, recall and F1 (0 where undefined)."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    return {"f1": float(f1_score(gold, pred, zero_division=0)),
            "precision": float(precision_score(gold, pred, zero_division=0)),
            "recall": float(recall_score(gold, pred, zero_division=0))}


class NerTask(Task):
    """Shared logic; subclasses read ``{"tokens", "tags", "source"}`` sentences and fix the tags."""

    kind = "ner"
    metric = "f1"
    default_max_length = 64
    peft_task_type = "TOKEN_CLS"

    def _label_vocabulary(self) -> list[str]:
        train = self.all_examples("train")
        return bio_labels(sorted({t for e in train for t in entity_types(e["tags"])}))

    def sentence_class(self, example: dict[str, Any]) -> str:
        return "+".join(entity_types(example["tags"])) or "O"

    def partition_classes(self, examples: list[dict[str, Any]]) -> list[str]:
        return merge_rare([self.sentence_class(e) for e in examples], self.cfg.ner_max_classes)

    def auto_model_class(self) -> Any:
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    def featurize(self, examples: list[dict[str, Any]], tokenizer: Any, split: str) -> Features:
        label_id = {n: i for i, n in enumerate(self.label_names)}
        unknown = sorted({t for e in examples for t in e["tags"]} - label_id.keys())
        if unknown:
            raise DataError(self._source(split), f"tags {unknown[:5]} occur in the {split} split "
                            "but not in the training split")
        enc = words_tokenizer(tokenizer)([e["tokens"] for e in examples],
                                         is_split_into_words=True, truncation=True,
                                         max_length=self.max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        rows, word_positions = [], []
        for i, example in enumerate(examples):
            positions = first_subword_positions(enc.word_ids(i), len(example["tokens"]))
            labels = [self.label_pad_id] * len(enc["input_ids"][i])
            for position, tag in zip(positions, example["tags"], strict=True):
                if position >= 0:
                    labels[position] = label_id[tag]
            rows.append({k: enc[k][i] for k in keys} | {"labels": labels})
            word_positions.append(positions)
        return Features(rows, np.arange(len(rows), dtype=np.int64),
                        {"word_positions": word_positions})

    def evaluate(self, model: torch.nn.Module, examples: list[dict[str, Any]], features: Features,
                 tokenizer: Any, device: torch.device) -> dict[str, float]:
        preds = predict(model, features.rows, partial(self.collate, pad_id=tokenizer.pad_token_id),
                        batch_size=self.cfg.eval_batch_size, device=device,
                        precision=self.cfg.precision,
                        outputs=lambda out, batch: out.logits.argmax(-1).tolist())
        names, word_positions = self.label_names, features.extra["word_positions"]
        pred_tags = [[names[row[p]] if p >= 0 else "O" for p in positions]
                     for row, positions in zip(preds, word_positions, strict=True)]
        gold = [e["tags"] for e in examples]
        return {**entity_scores(gold, pred_tags),
                **per_source_f1(examples, gold, pred_tags, entity_scores)}

    def _source(self, split: str) -> str:
        return f"{self.name} {split} split"


class Wnut17(NerTask):
    """WNUT-2017 emerging and rare entities: 6 types, 13 BIO tags."""

    name = "wnut17"
    data = "wnut17/ (embedded in the package)"
    files = {"train": "wnut17train.conll", "test": "emerging.test.annotated"}

    def _label_vocabulary(self) -> list[str]:
        return bio_labels(WNUT17_TYPES)

    def _load(self, split: str) -> list[dict[str, Any]]:
        name = self.files[split]
        path = find_dataset(self.cfg, "wnut17", [name])[name]
        return [s | {"source": "wnut17"} for s in read_conll(path)]


class Ploner(NerTask):
    """PLONER stand-in: CoNLL-2003 + WNUT-2017 with PER/LOC/ORG tags (``PLONER_MAP``)."""

    name = "ploner"
    data = "conll2003/ + wnut17/"
    files = {"conll2003": {"train": "train.txt", "test": "test.txt"}, "wnut17": Wnut17.files}

    def _label_vocabulary(self) -> list[str]:
        return bio_labels(PLONER_TYPES)

    def sentence_class(self, example: dict[str, Any]) -> str:
        return f"{example['source']}:{super().sentence_class(example)}"

    def _load(self, split: str) -> list[dict[str, Any]]:
        examples = []
        for source, files in self.files.items():
            name = files[split]
            path = find_dataset(self.cfg, source, [name])[name]
            for sentence in read_conll(path):
                tags = map_tags(sentence["tags"], PLONER_MAP[source])
                examples.append(sentence | {"tags": tags, "source": source})
        return examples


def map_tags(tags: Sequence[str], mapping: dict[str, str]) -> list[str]:
    """Rename entity types by ``mapping``; a type it lacks becomes O (B- and I- alike)."""
    out = []
    for tag in tags:
        new = mapping.get(tag[2:]) if tag != "O" else None
        out.append(f"{tag[:2]}{new}" if new else "O")
    return out


class ConllFiles(NerTask):
    """The user's CoNLL files: ``train-file``/``test-file``; tags must be IOB2. The tag set is
    the training file's (O, then B-/I- per type, types sorted)."""

    name = "conll-files"
    data = "train-file, test-file (CoNLL, IOB2 tags)"

    def _load(self, split: str) -> list[dict[str, Any]]:
        path = self.user_file(split)
        sentences = read_conll(path, self.cfg.token_column, self.cfg.tag_column,
                               self.cfg.skip_invalid)
        return [s | {"source": "conll-files"} for s in sentences]

    def _source(self, split: str) -> str:
        return self.user_file(split)
