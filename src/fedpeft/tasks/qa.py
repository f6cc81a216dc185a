"""Extractive question answering: SQuAD v1.1, a multi-source (MRQA stand-in) set, SQuAD files.

- ``squad``: SQuAD v1.1 (Rajpurkar et al., 2016). Only the first 4,370 training questions and the
  complete dev set are at hand, so they are re-split BY ARTICLE (``article_split``): test = 16
  of the 48 dev articles, train = the 12 training articles + the other 32 dev articles. The split
  seed is fixed (``SPLIT_SEED``), so every run, whatever its ``seed``, scores the same test set.
- ``mrqa``: SQuAD (split as above) + four MRQA-derived sources (NewsQA, DuoRC, RACE,
  RelationExtraction). Each source's labelled questions are pooled and split by context, a
  third of the contexts for test. Partition class = source (paper App. A).
- ``squad-files``: the user's SQuAD-format JSON (``train-file``/``test-file``), validated.

Features: question + context windows of ``max-length`` tokens (paper: 384) overlapping by
``doc-stride`` tokens (128), the answer as token start/end (the [CLS] position when a window
does not hold the whole answer). Context offsets are trimmed of the whitespace some tokenizers
put inside a token ("▁the" of SentencePiece/DeBERTa covers the space before the word), so
spans map back to the words alone (``trim_spaces``). Prediction: per window the ``n-best``
start and end logits, spans inside the context of at most ``max-answer-length`` tokens, the
best summed score over the question's windows, mapped back to context characters
(``best_answers``). Metric: official
SQuAD v1.1 exact match and F1 (``squad_scores``), as fractions. Partition class for SQuAD:
k-means (k=30) over TF-IDF vectors of the training questions (``question_clusters``).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..training import predict
from .base import Features, Task, per_source_f1
from .files import DataError, InvalidRecords, find_dataset, open_text

SPLIT_SEED = 0  # fixed: the article split, hence the test set, is the same for every run
SQUAD_TEST_ARTICLES = 16  # of the 48 dev articles
CLUSTERS = 30  # k of the k-means partition classes (paper App. A)
QUESTION_TOKENS = 64  # longer questions are cut (none in the bundled data is longer than 42)
MRQA_SOURCES = {  # source -> files with answers (the test_* files carry no answers)
    "newsqa": ["newsqa_dev.json"],
    "duorc": ["train_duorc.json", "val_duorc.json"],
    "race": ["train_race.json", "val_race.json"],
    "relation_extraction": ["train_relation_extraction.json", "val_relation_extraction.json"],
}


# --- reading and splitting ------------------------------------------------------------------------

def read_squad(path: str | Path, source: str = "squad", skip_invalid: bool = False
               ) -> list[dict[str, Any]]:
    """Questions of a SQuAD-format JSON file as ``{"id", "question", "context", "answers",
    "title", "source"}`` dicts. A question without answers, with an empty question, or with an
    answer that is not ``context[answer_start:answer_start + len(text)]`` is invalid."""
    try:
        with open_text(path) as fh:
            data = json.load(fh)["data"]
        articles = [(a.get("title") or f"article-{i}", a["paragraphs"]) for i, a in enumerate(data)]
        if not all(isinstance(paragraphs, list) for _, paragraphs in articles):
            raise TypeError("paragraphs must be a list")
    except json.JSONDecodeError as err:
        if not err.doc.strip():
            raise DataError(path, "is empty; expected SQuAD-format JSON") from None
        raise DataError(path, f"not valid JSON: {err.msg} (column {err.colno})",
                        err.lineno) from None
    except RecursionError:
        raise DataError(path, "not valid JSON: nested too deeply") from None
    except (KeyError, TypeError, AttributeError):
        raise DataError(path, 'expected SQuAD layout {"data": [{"title", "paragraphs": '
                        '[{"context", "qas": [{"id", "question", "answers"}]}]}]}') from None
    problems = InvalidRecords(path, skip=skip_invalid)
    questions = []
    for title, paragraphs in articles:
        for paragraph in paragraphs:
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not context.strip():
                problems.add(f"article {title!r}: a paragraph has no context")
                continue
            qas = paragraph.get("qas", [])
            if not isinstance(qas, list):
                problems.add(f"article {title!r}: a paragraph's qas is not a list")
                continue
            for qa in qas:
                problem = _question_problem(qa, context)
                if problem:
                    problems.add(f"question id {qa.get('id')!r}: {problem}")
                    continue
                questions.append({"id": str(qa["id"]), "question": qa["question"].strip(),
                                  "context": context, "answers": qa["answers"], "title": title,
                                  "source": source})
    return problems.finish(questions, "question")


def _question_problem(qa: Any, context: str) -> str | None:
    if not isinstance(qa, dict) or "id" not in qa:
        return "expected an object with id, question and answers"
    if not isinstance(qa.get("question"), str) or not qa["question"].strip():
        return "empty question"
    answers = qa.get("answers")
    if not isinstance(answers, list) or not answers:
        return "no answers (unanswerable SQuAD v2 questions are not supported)"
    for answer in answers:
        try:
            text, start = answer["text"], int(answer["answer_start"])
        except (KeyError, TypeError, ValueError):
            return f"answer {answer!r} needs text and an integer answer_start"
        found = context[start : start + len(text)]
        if not text or start < 0 or found != text:
            return f"answer {text!r} at {start} does not match the context there ({found!r})"
    return None


def article_split(questions: list[dict[str, Any]], n_test: int, seed: int
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test): ``n_test`` seeded articles (by ``title``) go to test, whole; file order
    is kept on both sides. No article, hence no paragraph, is on both sides."""
    titles = list(dict.fromkeys(q["title"] for q in questions))
    rng = np.random.default_rng(seed)
    test = {titles[i] for i in rng.choice(len(titles), size=n_test, replace=False)}
    return ([q for q in questions if q["title"] not in test],
            [q for q in questions if q["title"] in test])


def question_clusters(questions: Sequence[str], k: int, seed: int, dims: int = 50) -> list[str]:
    """k-means over the questions' TF-IDF vectors: class "q00".."q{k-1}".

    TF-IDF (English stop words dropped, sublinear tf) -> LSA (``dims``-d truncated SVD) -> unit
    length -> k-means (n_init=3). The LSA step matters: k-means on raw sparse TF-IDF puts half
    of SQuAD's questions in one catch-all cluster, on LSA vectors the largest holds ~9%. TF-IDF
    rather than encoder embeddings keeps the classes independent of the model and cheap to
    recompute; seeded and single-threaded so the server and every client get the same classes.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        tfidf = TfidfVectorizer(stop_words="english", sublinear_tf=True).fit_transform(questions)
        dims = min(dims, tfidf.shape[1] - 1, len(questions) - 1)
        vectors = normalize(TruncatedSVD(dims, random_state=seed).fit_transform(tfidf)
                            ) if dims >= 2 else tfidf
        k = min(k, len(questions))
        labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(vectors)
    return [f"q{c:02d}" for c in labels]


# --- metric (official SQuAD v1.1 evaluation script) ----------------------------------------------

def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and F1 over questions, each the max over the question's gold answers."""
    if not predictions:
        return {"exact-match": 0.0, "f1": 0.0}
    em = [max(float(normalize_answer(p) == normalize_answer(g)) for g in gs)
          for p, gs in zip(predictions, golds, strict=True)]
    f1 = [max(token_f1(p, g) for g in gs) for p, gs in zip(predictions, golds, strict=True)]
    return {"exact-match": float(np.mean(em)), "f1": float(np.mean(f1))}


# --- post-processing ------------------------------------------------------------------------------

def best_answers(contexts: Sequence[str], example_index: Sequence[int],
                 offsets: Sequence[np.ndarray],
                 start_logits: Sequence[np.ndarray], end_logits: Sequence[np.ndarray],
                 n_best: int, max_answer_length: int) -> list[str]:
    """The best answer text per question from its windows' logits.

    Window ``i`` belongs to question ``example_index[i]``; ``offsets[i]`` is a (T, 2) array of
    each token's (start, end) characters in the context, (-1, -1) outside it. A span (s, e) is
    valid if both ends are in the context, s <= e and e - s + 1 <= ``max_answer_length``; its
    score is start[s] + end[e] over the ``n_best`` highest starts and ends of each window. A
    question with no valid span gets "".
    """
    best: dict[int, tuple[float, str]] = {}
    for i, question in enumerate(example_index):
        start, end, offs = start_logits[i], end_logits[i], offsets[i]
        for s in np.argsort(start)[::-1][:n_best]:
            for e in np.argsort(end)[::-1][:n_best]:
                if offs[s, 0] < 0 or offs[e, 0] < 0 or e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(start[s] + end[e])
                if question not in best or score > best[question][0]:
                    best[question] = (score, contexts[question][offs[s][0] : offs[e][1]])
    return [best[q][1] if q in best else "" for q in range(len(contexts))]


# --- the tasks ------------------------------------------------------------------------------------

class QATask(Task):
    """Shared logic; subclasses read questions (``read_squad``) and define partition classes."""

    kind = "qa"
    metric = "f1"
    default_max_length = 384
    peft_task_type = "QUESTION_ANS"

    def partition_classes(self, examples: list[dict[str, Any]]) -> list[str]:
        return question_clusters([e["question"] for e in examples], CLUSTERS, self.cfg.seed)

    def auto_model_class(self) -> Any:
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering

    def featurize(self, examples: list[dict[str, Any]], tokenizer: Any, split: str) -> Features:
        """Sliding windows with start/end positions; outside the train split each window
        keeps its context offsets in ``extra["offsets"]`` ((T, 2) int32, -1 off the context),
        trimmed of surrounding whitespace (``trim_spaces``)."""
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"QA needs a fast tokenizer (offset mappings); "
                             f"{type(tokenizer).__name__} is not one (give a model folder with "
                             "a tokenizer.json)")
        length = self.max_length
        q_cap = min(QUESTION_TOKENS, length // 4)
        stride = max(0, min(self.cfg.doc_stride, length - q_cap - 4))
        enc = tokenizer([_cut(tokenizer, e["question"], q_cap) for e in examples],
                        [e["context"] for e in examples], truncation="only_second",
                        max_length=length, stride=stride, return_overflowing_tokens=True,
                        return_offsets_mapping=True)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        sample = enc["overflow_to_sample_mapping"]
        rows, offsets = [], []
        spaces: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # context -> space_tables
        for i, offs in enumerate(enc["offset_mapping"]):
            example = examples[sample[i]]
            in_context = np.asarray([s == 1 for s in enc.sequence_ids(i)])
            if example["context"] not in spaces:
                spaces[example["context"]] = space_tables(example["context"])
            array = trim_spaces(np.asarray(offs, dtype=np.int32).reshape(-1, 2), in_context,
                                *spaces[example["context"]])
            array[~in_context] = -1
            row = {k: enc[k][i] for k in keys}
            row["start_positions"], row["end_positions"] = self._span(
                example["answers"][0], array, enc["input_ids"][i], tokenizer.cls_token_id)
            rows.append(row)
            if split != "train":  # only scoring needs offsets (and they are large)
                offsets.append(array)
        extra = {"offsets": offsets} if split != "train" else {}
        return Features(rows, np.asarray(sample, dtype=np.int64), extra)

    @staticmethod
    def _span(answer: dict[str, Any], offs: np.ndarray, input_ids: list[int],
              cls_id: int | None) -> tuple[int, int]:
        """Token (start, end) of the answer in a window, or the [CLS] position twice.
        ``offs``: the window's (T, 2) context offsets, -1 off the context."""
        inside = np.flatnonzero(offs[:, 0] >= 0)
        first, last = int(inside[0]), int(inside[-1])
        start_char = int(answer["answer_start"])
        end_char = start_char + len(answer["text"])
        if not (offs[first][0] <= start_char and offs[last][1] >= end_char):
            cls = input_ids.index(cls_id) if cls_id in input_ids else 0
            return cls, cls
        context = offs[first : last + 1]
        start = first + int(np.argmax(context[:, 1] > start_char))  # first token ending after it
        end = first + int(np.flatnonzero(context[:, 0] < end_char)[-1])  # last starting before
        return start, max(start, end)

    def evaluate(self, model: torch.nn.Module, examples: list[dict[str, Any]], features: Features,
                 tokenizer: Any, device: torch.device) -> dict[str, float]:
        def logits(out: Any, batch: dict[str, torch.Tensor]) -> list:
            lengths = batch["attention_mask"].sum(1).tolist()
            return [(out.start_logits[i, :n].float().cpu().numpy(),
                     out.end_logits[i, :n].float().cpu().numpy()) for i, n in enumerate(lengths)]

        outs = predict(model, features.rows, partial(self.collate, pad_id=tokenizer.pad_token_id),
                       batch_size=self.cfg.eval_batch_size, device=device,
                       precision=self.cfg.precision, outputs=logits)
        answers = best_answers([e["context"] for e in examples], features.example_index,
                               features.extra["offsets"], [o[0] for o in outs],
                               [o[1] for o in outs], self.cfg.n_best, self.cfg.max_answer_length)
        golds = [[a["text"] for a in e["answers"]] for e in examples]
        return {**squad_scores(answers, golds),
                **per_source_f1(examples, answers, golds, squad_scores)}


# str.isspace by code point; every whitespace character is below U+3001, all above map to the
# last (non-space) entry.
_IS_SPACE = np.array([chr(c).isspace() for c in range(0x3002)])


def space_tables(text: str) -> tuple[np.ndarray, np.ndarray]:
    """For ``trim_spaces``: ``next_char[i]`` = the first non-space position >= i (len(text) if
    none); ``end_char[i]`` = 1 + the last non-space position < i (0 if none); both of length
    len(text) + 1."""
    n = len(text)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    solid = ~_IS_SPACE[np.minimum(codes, len(_IS_SPACE) - 1)]
    positions = np.arange(n + 1)
    at = np.where(np.append(solid, True), positions, n + 1)
    next_char = np.minimum.accumulate(at[::-1])[::-1].clip(max=n)
    after = np.where(np.insert(solid, 0, True), positions, 0)  # i where text[i - 1] is solid
    after[0] = 0
    end_char = np.maximum.accumulate(after)
    return next_char, end_char


def trim_spaces(offsets: np.ndarray, in_context: np.ndarray, next_char: np.ndarray,
                end_char: np.ndarray) -> np.ndarray:
    """Context token offsets without leading/trailing whitespace (a copy).

    SentencePiece-style tokenizers (Metaspace: DeBERTa-v2/v3, XLM-R, ALBERT) give a word's first
    piece the space before it ("▁the" spans " the"), so do byte-level BPE ones built with
    ``trim_offsets=False`` ("Ġthe"); an answer mapped back through such offsets would start
    with a space. A whitespace-only token ("▁" alone) becomes empty at its end. Tokens outside
    the context are left as they are."""
    out = offsets.copy()
    s, e = offsets[in_context, 0], offsets[in_context, 1]
    s = np.minimum(next_char[s], e)
    out[in_context, 0] = s
    out[in_context, 1] = np.maximum(end_char[e], s)
    return out


def _cut(tokenizer: Any, question: str, max_tokens: int) -> str:
    """The question, cut after ``max_tokens`` subwords (so a window always has context room)."""
    offs = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    spans = offs["offset_mapping"]
    return question if len(spans) <= max_tokens else question[: spans[max_tokens - 1][1]]


class Squad(QATask):
    """SQuAD v1.1 re-split by article (see the module docstring); classes by k-means."""

    name = "squad"
    data = "squad_v1.1/"

    def _load(self, split: str) -> list[dict[str, Any]]:
        if not self._all:  # both splits come from one read of both files
            self._all.update(squad_split(self.cfg))
        return self._all[split]


def squad_split(cfg: Any) -> dict[str, list[dict[str, Any]]]:
    """{"train", "test"} questions of SQuAD: partial train + 32 dev articles / 16 dev articles."""
    names = ["train-v1.1.partial.json", "dev-v1.1.json"]
    paths = find_dataset(cfg, "squad_v1.1", names)
    dev_train, test = article_split(read_squad(paths[names[1]]), SQUAD_TEST_ARTICLES, SPLIT_SEED)
    return {"train": read_squad(paths[names[0]]) + dev_train, "test": test}


class MultiSourceQA(QATask):
    """SQuAD + NewsQA, DuoRC, RACE, RelationExtraction; class = source (MRQA stand-in)."""

    name = "mrqa"
    data = "squad_v1.1/ + mrqa_like/"

    def partition_classes(self, examples: list[dict[str, Any]]) -> list[str]:
        return [e["source"] for e in examples]

    def _load(self, split: str) -> list[dict[str, Any]]:
        if not self._all:  # both splits come from one read of every file
            self._all.update(squad_split(self.cfg))
            for source, names in MRQA_SOURCES.items():
                paths = find_dataset(self.cfg, "mrqa_like", names)
                pooled = [q | {"id": f"{source}-{q['id']}"}
                          for name in names for q in read_squad(paths[name], source)]
                n_test = round(len({q["title"] for q in pooled}) / 3)
                train, test = article_split(pooled, n_test, SPLIT_SEED)
                self._all["train"] += train
                self._all["test"] += test
        return self._all[split]


class SquadFiles(QATask):
    """The user's SQuAD-format JSON: ``train-file``/``test-file``; classes by k-means."""

    name = "squad-files"
    data = "train-file, test-file (SQuAD JSON)"

    def _load(self, split: str) -> list[dict[str, Any]]:
        path = self.user_file(split)
        return read_squad(path, "squad-files", self.cfg.skip_invalid)
