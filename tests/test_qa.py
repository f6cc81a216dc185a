"""Extractive QA: the SQuAD metric, span post-processing, sliding windows, the article split,
partition classes, SQuAD JSON validation, and one federated run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from corpora import FIXTURE_OVERRIDE, fixture_config, needs_corpus
from scaffold import local_round_and_scores, two_round_simulation

from fedpeft.config import RunConfig
from fedpeft.methods import METHODS
from fedpeft.models import load_tokenizer
from fedpeft.tasks import DataError, make_task
from fedpeft.tasks.qa import (
    SQUAD_TEST_ARTICLES,
    article_split,
    best_answers,
    normalize_answer,
    question_clusters,
    read_squad,
    squad_scores,
    token_f1,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("all-MiniLM-L6-v2")


# --- metric -------------------------------------------------------------------------------------

def test_normalisation_is_the_official_one():
    assert normalize_answer("The  Cat's hat!") == "cats hat"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("Theory") == "theory"  # "the" only as a word


def test_squad_scores_by_hand():
    # pred tokens {cat, sat}; gold {cat, sat, down}: P = 1, R = 2/3, F1 = 0.8
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert token_f1("", "cat") == 0.0
    preds = ["The Cat sat", "Denver Broncos", ""]
    golds = [["cat sat", "a dog"], ["Broncos", "the Denver Broncos"], ["x"]]
    scores = squad_scores(preds, golds)
    # question 1: EM (after normalisation); 2: EM with the second gold; 3: nothing
    assert scores["exact-match"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert squad_scores(["Denver"], [["Denver Broncos"]])["f1"] == pytest.approx(2 / 3)


# --- post-processing ----------------------------------------------------------------------------

def test_best_answers_on_hand_made_logits():
    context = "Paris is the capital of France"
    # window tokens: [CLS] q [SEP] paris is the capital of france [SEP]
    offs = np.array([[-1, -1], [-1, -1], [-1, -1], [0, 5], [6, 8], [9, 12], [13, 20],
                     [21, 23], [24, 30], [-1, -1]], dtype=np.int32)
    start = np.zeros(10)
    end = np.zeros(10)
    start[[0, 3, 8]] = [9.0, 4.0, 1.0]  # [CLS] scores best but is not in the context
    end[[0, 3, 8]] = [9.0, 1.0, 5.0]
    # (3, 8) "Paris ... France" = 9 beats (3, 3) "Paris" = 5 and (8, 8) "France" = 6
    assert best_answers([context], [0], [offs], [start], [end], 20, 30) == [context]
    # at most 2 tokens: (8, 8) "France" = 6 wins; end before start is never chosen
    assert best_answers([context], [0], [offs], [start], [end], 20, 2) == ["France"]
    # n_best=1 considers only the top start and end ([CLS], [CLS]): no valid span
    assert best_answers([context], [0], [offs], [start], [end], 1, 30) == [""]
    # two windows of one question: the best score over windows wins
    start2, end2 = np.zeros(10), np.zeros(10)
    start2[6], end2[6] = 20.0, 20.0
    answers = best_answers([context, "unused"], [0, 0], [offs, offs], [start, start2],
                           [end, end2], 20, 30)
    assert answers == ["capital", ""]  # question 1 had no window: empty answer


# --- features -----------------------------------------------------------------------------------

def _long_question(n_sentences: int = 12) -> dict:
    filler = " ".join(f"Sentence {i} says nothing in particular." for i in range(n_sentences))
    context = filler + " The treaty was signed in Wroclaw in 1992. " + filler
    start = context.index("Wroclaw in 1992")
    return {"id": "a", "question": "Where was the treaty signed?", "context": context,
            "answers": [{"text": "Wroclaw in 1992", "answer_start": start}], "title": "t",
            "source": "squad"}


def test_sliding_windows_and_answer_spans(tokenizer):
    task = make_task(RunConfig(task="squad", max_length=64, doc_stride=16))
    example = _long_question()
    train = task.featurize([example], tokenizer, "train")
    assert len(train) > 3 and set(train.example_index) == {0} and train.extra == {}
    holding = 0
    for row in train.rows:
        assert len(row["input_ids"]) <= 64
        s, e = row["start_positions"], row["end_positions"]
        if s == e == 0:  # [CLS]: the answer is not (wholly) in this window
            continue
        holding += 1
        assert tokenizer.decode(row["input_ids"][s : e + 1]) == "wroclaw in 1992"
    assert holding >= 1
    test = task.featurize([example], tokenizer, "test")
    offsets = test.extra["offsets"]
    assert len(offsets) == len(test) and offsets[0].shape == (len(test.rows[0]["input_ids"]), 2)
    assert (offsets[0][:3] == -1).all()  # [CLS] and the question are outside the context
    # consecutive windows share doc-stride context tokens
    first = [tuple(o) for o in offsets[0] if o[0] >= 0]
    second = [tuple(o) for o in offsets[1] if o[0] >= 0]
    assert first[-16:] == second[:16]
    # post-processing with oracle logits recovers the answer text from the context
    s, e = next((r["start_positions"], r["end_positions"]) for r in test.rows
                if r["start_positions"] > 0)
    window = next(i for i, r in enumerate(test.rows) if r["start_positions"] > 0)
    logits_s = [np.zeros(len(o)) for o in offsets]
    logits_e = [np.zeros(len(o)) for o in offsets]
    logits_s[window][s], logits_e[window][e] = 10.0, 10.0
    assert best_answers([example["context"]], test.example_index, offsets, logits_s, logits_e,
                        20, 30) == ["Wroclaw in 1992"]


# --- splits and classes -------------------------------------------------------------------------

def test_article_split_keeps_articles_whole():
    questions = [{"title": f"t{i % 7}", "id": str(i)} for i in range(70)]
    train, test = article_split(questions, 3, seed=0)
    assert len({q["title"] for q in test}) == 3 and len(train) + len(test) == 70
    assert not {q["title"] for q in train} & {q["title"] for q in test}
    assert article_split(questions, 3, seed=0) == (train, test)
    assert article_split(questions, 3, seed=1) != (train, test)


def test_squad_split_on_the_fixture():
    """The fixture: the first paragraph (at most 5 questions) of the first 20 dev articles and
    the first 3 paragraphs of the first 3 train articles (see tests/fixtures/README.md)."""
    task = make_task(fixture_config(task="squad"))
    train, test = task.all_examples("train"), task.all_examples("test")
    assert len({q["title"] for q in test}) == SQUAD_TEST_ARTICLES
    assert len({q["title"] for q in train}) == 3 + 20 - SQUAD_TEST_ARTICLES
    assert (len(train), len(test)) == (61, 78)
    assert not {q["title"] for q in train} & {q["title"] for q in test}
    # the split seed is fixed: 4 dev articles join the 3 train articles, the other 16 test
    assert {q["title"] for q in train} == {"University_of_Notre_Dame", "Beyoncé", "Montana",
                                           "Warsaw", "Teacher", "Southern_California",
                                           "European_Union_law"}
    first = train[0]  # the first question of SQuAD's training file, checked by hand
    assert first["id"] == "5733be284776f41900661182" and first["source"] == "squad"
    assert first["question"] == ("To whom did the Virgin Mary allegedly appear in 1858 in "
                                 "Lourdes France?")
    assert first["answers"] == [{"answer_start": 515, "text": "Saint Bernadette Soubirous"}]
    assert first["context"][515:541] == "Saint Bernadette Soubirous"
    assert {q["title"] for q in train[:41]} == {"University_of_Notre_Dame", "Beyoncé", "Montana"}
    assert train[41]["title"] == "Warsaw"  # then the dev articles that train
    assert test[0]["title"] == "Super_Bowl_50" and len(test[0]["answers"]) == 3  # dev: 3 golds
    assert make_task(fixture_config(task="squad", seed=7)).all_examples("test") == test


@needs_corpus("squad_v1.1")
def test_squad_split_sizes():
    task = make_task(RunConfig(task="squad"))
    train, test = task.all_examples("train"), task.all_examples("test")
    assert len({q["title"] for q in test}) == SQUAD_TEST_ARTICLES
    assert len({q["title"] for q in train}) == 12 + 48 - SQUAD_TEST_ARTICLES
    assert len(train) + len(test) == 4370 + 10570
    assert (len(train), len(test)) == (11244, 3696)
    assert not {q["title"] for q in train} & {q["title"] for q in test}


def test_question_clusters_are_seeded():
    questions = [f"What is the {w} of {x}?" for w in ("capital", "size", "colour", "age")
                 for x in ("France", "Peru", "Chad", "Laos", "Fiji")]
    a = question_clusters(questions, 4, seed=0)
    assert a == question_clusters(questions, 4, seed=0)
    assert len(set(a)) == 4 and all(c.startswith("q") for c in a)
    assert len(set(question_clusters(questions[:3], 30, seed=0))) <= 3  # k <= questions


MRQA_CLASSES = ("squad", "newsqa", "duorc", "race", "relation_extraction")


def _check_mrqa_sources(task) -> tuple[list, list]:
    train, test = task.all_examples("train"), task.all_examples("test")
    classes = task.partition_classes(train)
    assert classes == [q["source"] for q in train]
    assert set(classes) == set(MRQA_CLASSES)
    assert {q["source"] for q in test} == set(classes)
    for source in set(classes):  # contexts (titles) never on both sides
        train_titles = {q["title"] for q in train if q["source"] == source}
        assert not train_titles & {q["title"] for q in test if q["source"] == source}
    ids = [q["id"] for q in train + test]
    assert len(ids) == len(set(ids))  # unique: the MRQA-like ids are prefixed by their source
    return train, test


def test_mrqa_sources_are_the_classes():
    """On the fixtures: the SQuAD slice + hand-made look-alikes of the four MRQA-like sources
    (3 contexts each, pooled over their files; a third of the contexts go to test)."""
    train, test = _check_mrqa_sources(make_task(fixture_config(task="mrqa")))
    assert [sum(q["source"] == s for q in train) for s in MRQA_CLASSES] == [61, 4, 4, 4, 3]
    assert [sum(q["source"] == s for q in test) for s in MRQA_CLASSES] == [78, 2, 2, 2, 2]
    squad = make_task(fixture_config(task="squad"))
    assert [q for q in train if q["source"] == "squad"] == squad.all_examples("train")
    newsqa = [q for q in test if q["source"] == "newsqa"]
    assert [q["question"] for q in newsqa] == ["How many trees were planted?",
                                               "What were the trees meant to stop?"]
    assert newsqa[0]["id"] == f"newsqa-{5:032x}" and newsqa[0]["answers"][0]["text"] == "3,000"


@needs_corpus("squad_v1.1", "mrqa_like")
def test_mrqa_sources_on_the_full_corpora():
    train, test = _check_mrqa_sources(make_task(RunConfig(task="mrqa")))
    assert (len(train), len(test)) == (14568, 5347)
    assert [sum(q["source"] == s for q in train) for s in MRQA_CLASSES] == [
        11244, 2825, 154, 175, 170]
    assert [sum(q["source"] == s for q in test) for s in MRQA_CLASSES] == [3696, 1387, 99, 80, 85]


# --- the user's SQuAD files ---------------------------------------------------------------------

def _squad_file(path: Path, qas: list, context: str = "Anna lives in Rome.") -> Path:
    path.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [
        {"context": context, "qas": qas}]}]}))
    return path


def _qa(qid: str, text: str = "Rome", start: int = 14, question: str = "Where?") -> dict:
    return {"id": qid, "question": question, "answers": [{"text": text, "answer_start": start}]}


def test_squad_files_read(tmp_path: Path):
    path = _squad_file(tmp_path / "train.json", [_qa("1"), _qa("2", "Anna", 0)])
    questions = read_squad(path, "squad-files")
    assert [q["answers"][0]["text"] for q in questions] == ["Rome", "Anna"]
    task = make_task(RunConfig(task="squad-files", train_file=str(path), test_file=str(path)))
    assert len(task.examples("test")) == 2 and task.label_names == []


@pytest.mark.parametrize("qas, message", [
    ([_qa("q1", "Paris")], r"question id 'q1': answer 'Paris' at 14 does not match .*'Rome\.'"),
    ([_qa("q2", start=13)], r"question id 'q2': answer 'Rome' at 13"),
    ([{"id": "q3", "question": "Who?", "answers": []}], "'q3': no answers"),
    ([_qa("q4", question="  ")], "'q4': empty question"),
    ([{"id": "q5", "question": "Who?", "answers": [{"text": "Anna"}]}], "'q5': answer .* needs"),
])
def test_squad_errors_name_file_id_and_value(tmp_path: Path, qas, message):
    path = _squad_file(tmp_path / "bad.json", qas)
    with pytest.raises(DataError, match=message) as err:
        read_squad(path)
    assert str(path) in str(err.value)


def test_squad_malformed_files(tmp_path: Path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [\n  {"title": }\n]}')
    with pytest.raises(DataError, match="not valid JSON") as err:
        read_squad(broken)
    assert err.value.line == 2
    (tmp_path / "layout.json").write_text('{"articles": []}')
    with pytest.raises(DataError, match="expected SQuAD layout"):
        read_squad(tmp_path / "layout.json")
    with pytest.raises(DataError, match="needs train-file"):
        make_task(RunConfig(task="squad-files")).examples("train")


def test_squad_errors_stop_after_five_or_skip_with_count(tmp_path: Path):
    qas = [_qa(f"bad{i}", "Paris") for i in range(7)] + [_qa("good")]
    path = _squad_file(tmp_path / "bad.json", qas)
    with pytest.raises(DataError, match="5 invalid record.*stopped there") as err:
        read_squad(path)
    assert "'bad4'" in str(err.value) and "'bad5'" not in str(err.value)
    with pytest.warns(UserWarning, match="skipped 7 invalid question"):
        assert [q["id"] for q in read_squad(path, skip_invalid=True)] == ["good"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_scores_squad(tiny_models, method):
    """Each method builds its PEFT model for this head, takes a local round and is scored."""
    result, scores = local_round_and_scores([
        f"model={tiny_models('bert')}", "task=squad", f"method={method}", "lora-rank=4",
        "max-train-samples=16", "max-test-samples=8", "max-length=128", "doc-stride=32",
        "num-clients=2", "clients-per-round=1", FIXTURE_OVERRIDE])
    assert result.steps > 0 and np.isfinite(result.loss)
    assert 0.0 <= scores["f1"] <= 1.0


# --- end to end -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_federated_qa_run(tiny_models, tmp_path):
    summary, rounds = two_round_simulation([
        f"model={tiny_models('bert')}", "task=squad", "method=federa", "lora-rank=4",
        "max-train-samples=64", "max-test-samples=24", "max-length=128", "doc-stride=32",
        f"out={tmp_path / 'run'}", FIXTURE_OVERRIDE])  # 61 questions: all of the fixture's
    for r in rounds:
        assert {"f1", "exact-match"} <= r["metrics"].keys()
    assert summary["metric"] == "f1" and 0.0 <= summary["final"]["f1"] <= 1.0
