"""The real tokenizer kinds of the papers' backbones, on every task kind.

The tiny RoBERTa carries a real byte-level BPE (``RobertaTokenizerFast``: "Ġ" marks a word that
follows a space, offsets trimmed of it) and the tiny DeBERTa-v2/v3 a real SentencePiece-style
Unigram (``DebertaV2TokenizerFast``: Metaspace "▁" marks every word, and its offsets include the
space before the word), both trained on SemEval sentences by ``conftest.py``. For each: the
special ids agree with the model, classification rows and padding, NER labels on the first
piece of each pre-split word, QA answers mapped back through the offsets to exactly the answer
text, and one short federated run per task kind (in-process Flower grid). Also the hub layout of
DeBERTa-v3's tokenizer (a SentencePiece file only).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from corpora import FIXTURE_OVERRIDE, needs_corpus
from inprocess import flower_identity, run_inprocess, tiny_config  # noqa: F401

from fedpeft.config import RunConfig
from fedpeft.federation.runtime import Runtime
from fedpeft.models import load_tokenizer
from fedpeft.tasks import make_task
from fedpeft.tasks.qa import best_answers

ARCHS = ["roberta", "deberta-v2"]
# The mark of a word that follows a space, per tokenizer kind.
WORD_MARK = {"roberta": "Ġ", "deberta-v2": "▁"}
CPU = torch.device("cpu")


def test_tiny_models_have_real_tokenizers_of_their_kind(tiny_models):
    from transformers import AutoConfig

    kinds = {"roberta": ("RobertaTokenizer", "<s>", "</s>", "<pad>"),
             "deberta-v2": ("DebertaV2Tokenizer", "[CLS]", "[SEP]", "[PAD]")}
    for arch, (cls, first, last, pad) in kinds.items():
        tokenizer, config = load_tokenizer(tiny_models(arch)), AutoConfig.from_pretrained(
            tiny_models(arch))
        assert type(tokenizer).__name__.startswith(cls) and tokenizer.is_fast
        assert len(tokenizer) == config.vocab_size >= 2000
        assert (tokenizer.cls_token, tokenizer.sep_token, tokenizer.pad_token) == (first, last, pad)
        assert tokenizer.pad_token_id == config.pad_token_id
        pieces = tokenizer.convert_ids_to_tokens(tokenizer("The cat sat.")["input_ids"])
        assert pieces[0] == first and pieces[-1] == last
        assert pieces[2].startswith(WORD_MARK[arch]) and not pieces[1].startswith("Ġ")
    assert load_tokenizer(tiny_models("roberta")).add_prefix_space is False  # raw text: as is


def test_a_sentencepiece_only_tokenizer_loads_or_names_the_missing_package(tiny_models, tmp_path):
    """DeBERTa-v3 on the hub ships ``spm.model`` and no ``tokenizer.json``: transformers converts
    it with the ``sentencepiece`` package, and without it fails speaking of tiktoken."""
    import importlib.util
    import json
    import shutil

    from transformers.utils import sentencepiece_model_pb2_new as spm_pb2

    from fedpeft.config import ConfigError

    source = tiny_models("deberta-v2")
    proto = spm_pb2.ModelProto()
    vocab = json.loads((Path(source) / "tokenizer.json").read_text())["model"]["vocab"]
    for piece, score in vocab:  # the tiny DeBERTa's Unigram as a SentencePiece model
        entry = proto.pieces.add()
        entry.piece, entry.score = piece, score
        entry.type = 2 if piece == "[UNK]" else 3 if piece.startswith("[") else 1
    proto.trainer_spec.model_type, proto.trainer_spec.unk_id = 1, 3  # unigram
    folder = tmp_path / "deberta-v3-spm"
    folder.mkdir()
    shutil.copy(Path(source) / "config.json", folder)
    (folder / "spm.model").write_bytes(proto.SerializeToString())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "DebertaV2Tokenizer", "do_lower_case": False, "vocab_type": "spm"}))
    if importlib.util.find_spec("sentencepiece") is None:
        with pytest.raises(ConfigError, match="SentencePiece model.*pip install sentencepiece"):
            load_tokenizer(str(folder))
    else:
        tokenizer = load_tokenizer(str(folder))
        assert tokenizer.is_fast and len(tokenizer) == len(vocab)


# --- classification -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_classification_rows_padding_and_evaluate(tiny_models, arch):
    runtime = Runtime(RunConfig(model=tiny_models(arch), task="semeval", method="fedlr",
                                lora_rank=4, max_train_samples=16, max_test_samples=24,
                                eval_batch_size=8))
    tokenizer, examples = runtime.tokenizer, runtime.task.examples("test")
    features = runtime.features("test")
    for row, example in zip(features.rows, examples, strict=True):
        ids = row["input_ids"]
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        if arch == "roberta" and len(ids) < runtime.task.max_length:  # byte-level BPE gives
            # the (untruncated) text back exactly
            assert tokenizer.decode(ids, skip_special_tokens=True) == example["text"]
    # dynamic padding with the tokenizer's pad id changes no row's logits
    model = runtime.model.eval()
    rows = features.rows[:6]
    with torch.no_grad():
        batch = runtime.collate(rows)
        assert (batch["input_ids"] == tokenizer.pad_token_id).any()
        padded = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for i, row in enumerate(rows):
            alone = runtime.collate([row])
            logits = model(**{k: v for k, v in alone.items() if k != "labels"}).logits
            assert torch.allclose(logits[0], padded[i], atol=1e-5)
    scores = runtime.evaluate("test")
    assert 0.0 <= scores["accuracy"] <= 1.0


# --- NER ------------------------------------------------------------------------------------------

# Hand-checked pieces of ["Kowalczykowski", "visited", "Paris"] (as tests/test_ner.py does for
# BERT's WordPiece), from the tokenizers conftest.py trains: each word's first piece carries the
# word mark. Without a prefix space, byte-level BPE would give "K", ..., "v", "is", "ited", "P".
NER_PIECES = {
    "roberta": ["<s>", "ĠK", "ow", "al", "c", "z", "y", "k", "ow", "s", "k", "i", "Ġvis", "ited",
                "ĠP", "ar", "is", "</s>"],
    "deberta-v2": ["[CLS]", "▁K", "o", "w", "al", "c", "z", "y", "k", "o", "w", "s", "k", "i",
                   "▁visit", "ed", "▁Pa", "ris", "[SEP]"],
}
FIRST_PIECES = {"roberta": [1, 12, 14], "deberta-v2": [1, 14, 16]}  # of the three words


@pytest.mark.parametrize("arch", ARCHS)
def test_ner_labels_the_first_piece_of_each_word(tiny_models, arch):
    tokenizer = load_tokenizer(tiny_models(arch))
    task = make_task(RunConfig(task="wnut17"))
    example = {"tokens": ["Kowalczykowski", "visited", "Paris"],
               "tags": ["B-person", "O", "B-location"], "source": "wnut17"}
    row = task.featurize([example], tokenizer, "test").rows[0]
    pieces = tokenizer.convert_ids_to_tokens(row["input_ids"])
    assert pieces == NER_PIECES[arch]
    person, location = task.label_names.index("B-person"), task.label_names.index("B-location")
    first = FIRST_PIECES[arch]
    assert first == [i for i, p in enumerate(pieces) if p.startswith(WORD_MARK[arch])]
    expected = [-100] * len(pieces)
    for position, label in zip(first, [person, 0, location], strict=True):
        expected[position] = label
    assert row["labels"] == expected
    # the prefix space is for pre-split words only: raw text still encodes as before
    assert tokenizer.convert_ids_to_tokens(tokenizer("Paris")["input_ids"])[1] in ("P", "▁Pa")


@pytest.mark.parametrize("arch", ARCHS)
def test_ner_words_keep_their_pieces_and_an_oracle_scores_one(tiny_models, arch):
    """On real WNUT sentences every word's pieces spell the word (after the word mark), the
    first one carries the label, and predicting the gold labels scores F1 = 1."""
    tokenizer = load_tokenizer(tiny_models(arch))
    task = make_task(RunConfig(task="wnut17", max_length=512, max_test_samples=60))
    examples = [e for e in task.examples("test") if any(t != "O" for t in e["tags"])]
    features = task.featurize(examples, tokenizer, "test")
    for i, (example, row) in enumerate(zip(examples, features.rows, strict=True)):
        pieces = tokenizer.convert_ids_to_tokens(row["input_ids"])
        positions = features.extra["word_positions"][i]
        assert min(positions) > 0  # nothing truncated, no word without pieces
        ends = [*positions[1:], len(pieces) - 1]  # a word's pieces run up to the next word's
        for word, start, end in zip(example["tokens"], positions, ends, strict=True):
            assert pieces[start].startswith(WORD_MARK[arch]), (word, pieces)
            ids = row["input_ids"][start:end]
            if tokenizer.unk_token_id not in ids:
                assert tokenizer.decode(ids).strip() == word, (word, pieces[start:end])
        assert sum(lab != -100 for lab in row["labels"]) == len(positions)

    class Oracle(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gold = {tuple(r["input_ids"]): r["labels"] for r in features.rows}

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            labels = torch.zeros_like(input_ids)
            for b, n in enumerate(attention_mask.sum(1).tolist()):
                gold = torch.tensor(self.gold[tuple(input_ids[b, :n].tolist())]).clamp(min=0)
                labels[b, :n] = gold
            num = len(task.label_names)
            return SimpleNamespace(logits=torch.nn.functional.one_hot(labels, num).float())

    assert task.evaluate(Oracle(), examples, features, tokenizer, CPU)["f1"] == 1.0


# --- QA -------------------------------------------------------------------------------------------

CONTEXT = ("The treaty was signed in Wrocław in 1992.  Anna Kowalczyk,\nthe mayor, signed it "
           "for the city (population 640,000).")
ANSWERS = ["The treaty", "signed", "Wrocław in 1992", "Anna Kowalczyk", "the mayor",
           "640,000", "city"]


def qa_examples() -> list[dict]:
    return [{"id": str(i), "question": f"What is answer {i}?", "context": CONTEXT,
             "answers": [{"text": text, "answer_start": CONTEXT.index(text)}],
             "title": "t", "source": "squad"} for i, text in enumerate(ANSWERS)]


def gold_logits(features) -> tuple[list[np.ndarray], list[np.ndarray]]:
    starts, ends = [], []
    for row, offs in zip(features.rows, features.extra["offsets"], strict=True):
        s, e = np.zeros(len(offs)), np.zeros(len(offs))
        s[row["start_positions"]], e[row["end_positions"]] = 10.0, 10.0
        starts.append(s)
        ends.append(e)
    return starts, ends


@pytest.mark.parametrize(("arch", "options"), [
    ("roberta", {}), ("roberta", {"trim_offsets": False}), ("deberta-v2", {})],
    ids=["roberta", "roberta-untrimmed-offsets", "deberta-v2"])
def test_qa_gold_spans_map_back_to_exactly_the_answer_text(tiny_models, arch, options):
    """After a double space, a newline, a non-ASCII letter, a comma inside a number: the gold
    token span, post-processed, is the answer text itself (no stray space or newline), also
    for tokenizers whose offsets include the space before a word (Metaspace "▁the"; byte-level
    BPE without ``trim_offsets``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models(arch), **options) if options \
        else load_tokenizer(tiny_models(arch))
    raw = tokenizer(CONTEXT, return_offsets_mapping=True)["offset_mapping"]
    spaced = any(CONTEXT[s].isspace() and CONTEXT[s:e].strip() for s, e in raw)  # " word"
    assert spaced == (arch == "deberta-v2" or bool(options))  # the case this test is about
    task = make_task(RunConfig(task="squad", max_length=128, doc_stride=32))
    examples = qa_examples()
    assert examples[4]["answers"][0]["answer_start"] == CONTEXT.index("\nthe mayor") + 1
    features = task.featurize(examples, tokenizer, "test")
    assert len(features) == len(examples)  # one window each
    assert all(row["start_positions"] > 0 for row in features.rows)  # answers in the windows
    starts, ends = gold_logits(features)
    answers = best_answers([e["context"] for e in examples], features.example_index,
                           features.extra["offsets"], starts, ends, 20, 30)
    assert answers == ANSWERS
    for offs in features.extra["offsets"]:  # no context token starts or ends with a space
        inside = offs[offs[:, 0] >= 0]
        assert not any(CONTEXT[s].isspace() or CONTEXT[e - 1].isspace() for s, e in inside
                       if e > s)

    class Oracle(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gold = {tuple(r["input_ids"]): (r["start_positions"], r["end_positions"])
                         for r in features.rows}

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            start, end = torch.zeros(input_ids.shape), torch.zeros(input_ids.shape)
            for b, n in enumerate(attention_mask.sum(1).tolist()):
                s, e = self.gold[tuple(input_ids[b, :n].tolist())]
                start[b, s], end[b, e] = 10.0, 10.0
            return SimpleNamespace(start_logits=start, end_logits=end)

    scores = task.evaluate(Oracle(), examples, features, tokenizer, CPU)
    assert scores["exact-match"] == 1.0 and scores["f1"] == 1.0


@needs_corpus("squad_v1.1")
@pytest.mark.parametrize("arch", ARCHS)
def test_qa_gold_spans_on_squad_have_no_stray_spaces(tiny_models, arch):
    """On real SQuAD questions (128-token windows, several per question) the gold spans map
    back to the answers: exact match after normalisation for nearly all (a few answers start
    or end inside a piece) and never with whitespace the answer does not have."""
    tokenizer = load_tokenizer(tiny_models(arch))
    task = make_task(RunConfig(task="squad", max_length=128, doc_stride=32,
                               max_test_samples=150))
    examples = task.examples("test")
    features = task.featurize(examples, tokenizer, "test")
    assert len(features) > len(examples)  # contexts longer than a window
    starts, ends = gold_logits(features)
    for s, row in zip(starts, features.rows, strict=True):
        if row["start_positions"] == row["end_positions"] == row["input_ids"].index(
                tokenizer.cls_token_id):
            s[:] = 0.0  # a window without the answer gets no vote
    answers = best_answers([e["context"] for e in examples], features.example_index,
                           features.extra["offsets"], starts, ends, 20, 30)
    golds = [e["answers"][0]["text"] for e in examples]
    assert all(a == a.strip() for a in answers)
    exact = np.mean([a == g for a, g in zip(answers, golds, strict=True)])
    assert exact >= 0.95, [(a, g) for a, g in zip(answers, golds, strict=True) if a != g][:5]


# --- one short federated run per task kind -------------------------------------------------------

RUNS = {
    "classification": ["task=semeval", "max-length=64"],
    "ner": ["task=wnut17", "max-length=64"],
    "qa": ["task=squad", "max-length=128", "doc-stride=32", "max-train-samples=32",
           "max-test-samples=16", FIXTURE_OVERRIDE],
}


@pytest.mark.parametrize("kind", list(RUNS))
@pytest.mark.parametrize("arch", ARCHS)
def test_federated_run_per_task_kind(tiny_models, tmp_path, arch, kind,
                                     flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models(arch), str(tmp_path / "run"), *RUNS[kind])
    summary = run_inprocess(cfg)
    assert summary["rounds"] == 2 and summary["failures"] == 0
    final = summary["final"]
    assert final and 0.0 <= final[summary["metric"]] <= 1.0
    assert all(np.isfinite(v) for v in final.values())
