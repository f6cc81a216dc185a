"""NER: first-subword labels, entity-level F1, partition classes, the PLONER tag map, CoNLL
file validation, and one federated run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from corpora import fixture_config, needs_corpus
from scaffold import local_round_and_scores, two_round_simulation

from fedpeft.config import RunConfig
from fedpeft.methods import METHODS
from fedpeft.models import load_tokenizer
from fedpeft.tasks import DataError, make_task
from fedpeft.tasks.files import PACKAGE_DATA, find_dataset
from fedpeft.tasks.ner import (
    PLONER_MAP,
    entity_scores,
    first_subword_positions,
    map_tags,
    merge_rare,
    read_conll,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("all-MiniLM-L6-v2")


def test_first_subword_positions():
    # [CLS] w0 w0 w1 [SEP]; w2 was cut off by truncation
    assert first_subword_positions([None, 0, 0, 1, None], 3) == [1, 3, -1]


def test_only_first_subwords_carry_labels(tokenizer):
    task = make_task(RunConfig(task="wnut17"))
    example = {"tokens": ["Kowalczykowski", "visited", "Paris"],
               "tags": ["B-person", "O", "B-location"], "source": "wnut17"}
    row = task.featurize([example], tokenizer, "test").rows[0]
    pieces = tokenizer.convert_ids_to_tokens(row["input_ids"])
    assert pieces == ["[CLS]", "ko", "##wal", "##cz", "##yk", "##owski", "visited", "paris",
                      "[SEP]"]
    person, location = task.label_names.index("B-person"), task.label_names.index("B-location")
    assert row["labels"] == [-100, person, -100, -100, -100, -100, 0, location, -100]


def test_entity_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-LOC"]]
    # gold entities: PER, LOC, ORG; predicted: PER, ORG (right), LOC at (1,1) (wrong)
    scores = entity_scores(gold, pred)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    # a boundary error is a miss and a false alarm
    assert entity_scores([["B-PER", "I-PER"]], [["B-PER", "O"]])["f1"] == 0.0


class LookupModel(torch.nn.Module):
    """Predicts, for each token id, the label of a table (an oracle for hand-made sentences)."""

    def __init__(self, table: dict[int, int], num_labels: int) -> None:
        super().__init__()
        self.table, self.num_labels = table, num_labels

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        labels = input_ids.clone().apply_(lambda t: self.table.get(t, 0))
        return SimpleNamespace(logits=torch.nn.functional.one_hot(labels, self.num_labels).float())


def test_evaluate_scores_full_sentences(tokenizer, tmp_path: Path):
    """Words cut off by max-length are predicted O, so their gold entities count as misses."""
    train = tmp_path / "train.conll"
    train.write_text("Anna\tB-PER\nin\tO\nRome\tB-LOC\n")
    task = make_task(RunConfig(task="conll-files", train_file=str(train), max_length=8))
    examples = [
        {"tokens": ["Anna", "met", "Bob"], "tags": ["B-PER", "O", "B-PER"], "source": "x"},
        {"tokens": ["in", "Rome", "and", "a", "b", "c", "d", "Oslo"],
         "tags": ["O", "B-LOC", "O", "O", "O", "O", "O", "B-LOC"], "source": "x"},
    ]
    features = task.featurize(examples, tokenizer, "test")
    assert features.extra["word_positions"][1][-1] == -1  # "Oslo" was truncated
    table = {row["input_ids"][p]: lab for row in features.rows
             for p, lab in enumerate(row["labels"]) if lab != -100}
    model = LookupModel(table, len(task.label_names))
    scores = task.evaluate(model, examples, features, tokenizer, torch.device("cpu"))
    assert scores["precision"] == 1.0 and scores["recall"] == pytest.approx(3 / 4)


def test_merge_rare_classes():
    classes = ["O"] * 5 + ["PER"] * 3 + ["LOC"] * 2 + ["ORG"] + ["LOC+PER"]
    assert merge_rare(classes, 3) == ["O"] * 5 + ["PER"] * 3 + ["other"] * 4
    assert merge_rare(classes, 0) == classes and merge_rare(classes, 5) == classes


def test_wnut17_data_and_classes():
    """The full WNUT-2017 corpus: the embedded copy, or the data folder's when there is one."""
    task = make_task(RunConfig(task="wnut17"))
    train, test = task.all_examples("train"), task.all_examples("test")
    assert (len(train), len(test)) == (3394, 1287)
    assert len(task.label_names) == 13 and task.label_names[0] == "O"
    assert task.sentence_class({"tags": ["B-person", "I-person", "O", "B-location"]}) == \
        "location+person"
    assert task.sentence_class({"tags": ["O", "O"]}) == "O"
    classes = task.partition_classes(train)
    assert len(set(classes)) == 16 and "other" in classes  # 31 entity sets, 15 kept + other
    assert classes.count("O") == 2166


@needs_corpus("wnut17")
def test_wnut17_embedded_copy_equals_the_original():
    for name, count in (("wnut17train.conll", 3394), ("emerging.test.annotated", 1287)):
        original = find_dataset(RunConfig(), "wnut17", [name])[name]
        assert PACKAGE_DATA not in original.parents  # the data folder's copy, not the package's
        shipped = read_conll(PACKAGE_DATA / "wnut17" / f"{name}.gz")
        assert len(shipped) == count and shipped == read_conll(original)


def test_ploner_tag_map():
    tags = ["B-corporation", "I-corporation", "B-group", "B-product", "I-product", "B-person"]
    assert map_tags(tags, PLONER_MAP["wnut17"]) == ["B-ORG", "I-ORG", "B-ORG", "O", "O", "B-PER"]
    assert map_tags(["B-MISC", "I-MISC", "B-LOC"], PLONER_MAP["conll2003"]) == ["O", "O", "B-LOC"]


def test_ploner_on_the_fixtures():
    """Hand-made CoNLL-2003 look-alike (8 train / 3 test sentences) + the first 60 / 30
    sentences of WNUT-2017's train / test files (see tests/fixtures/README.md)."""
    task = make_task(fixture_config(task="ploner"))
    train, test = task.all_examples("train"), task.all_examples("test")
    assert (len(train), len(test)) == (8 + 60, 3 + 30)
    assert [e["source"] for e in train] == ["conll2003"] * 8 + ["wnut17"] * 60
    assert task.label_names == ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    assert {t for e in train for t in e["tags"]} == set(task.label_names)
    # -DOCSTART- lines are skipped; the tokens come from column 0, the tags from the last one
    assert train[0]["tokens"] == ["Maria", "Nowak", "joined", "Acme", "Shipping", "in",
                                  "Gdansk", "."]
    assert train[0]["tags"] == ["B-PER", "I-PER", "O", "B-ORG", "I-ORG", "O", "B-LOC", "O"]
    assert train[1]["tags"] == ["O", "O", "O", "O", "O", "B-LOC", "O", "O", "O"]  # MISC -> O
    # WNUT: location -> LOC, product -> O (a hand-checked tweet of wnut17train.conll)
    tweet = next(e for e in train if "ipod" in e["tokens"])
    tags = dict(zip(tweet["tokens"], tweet["tags"], strict=True))
    assert tags["alderwood"] == "B-LOC" and tags["ipod"] == "O"
    assert test[0]["tags"] == ["O", "O", "B-ORG", "I-ORG", "I-ORG", "O", "O", "B-LOC", "O"]
    classes = task.partition_classes(train)
    assert classes[:3] == ["conll2003:LOC+ORG+PER", "conll2003:LOC", "conll2003:ORG"]
    assert len(set(classes)) == 10 and classes.count("wnut17:O") == 39


@needs_corpus("conll2003", "wnut17")
def test_ploner_sources_and_classes():
    task = make_task(RunConfig(task="ploner"))
    train, test = task.all_examples("train"), task.all_examples("test")
    assert (len(train), len(test)) == (14041 + 3394, 3453 + 1287)
    assert task.label_names == ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    assert {t for e in train for t in e["tags"]} == set(task.label_names)
    classes = task.partition_classes(train)
    assert len(set(classes)) == 16 and classes[0].startswith("conll2003:")
    assert classes.count("wnut17:O") == 2312


# --- the user's CoNLL files --------------------------------------------------------------------

def test_conll_files_columns_and_docstart(tmp_path: Path):
    path = tmp_path / "train.conll"
    path.write_text("-DOCSTART- -X- -X- O\n\nAnna NNP B-NP B-PER\nsmiled VBD B-VP O\n\n"
                    "New NNP B-NP B-LOC\nYork NNP I-NP I-LOC\n")
    sentences = read_conll(path)
    assert [s["tokens"] for s in sentences] == [["Anna", "smiled"], ["New", "York"]]
    assert [s["tags"] for s in sentences] == [["B-PER", "O"], ["B-LOC", "I-LOC"]]
    assert read_conll(path, tag_column=2)[0]["tags"] == ["B-NP", "B-VP"]
    task = make_task(RunConfig(task="conll-files", train_file=str(path), test_file=str(path)))
    assert task.label_names == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


@pytest.mark.parametrize("content, line, message", [
    ("Anna\tB-PER\nsmiled\n", 2, "got 1 column"),
    ("Anna\tPER\n", 1, "'PER' is not in BIO form"),
    ("Anna\tO\nSmith\tI-PER\n", 2, "'I-PER' follows 'O'"),
    ("Anna\tB-PER\nSmith\tI-LOC\n", 2, "'I-LOC' follows 'B-PER'"),
    ("\n\n", None, "no sentences found"),
])
def test_conll_errors_name_file_line_and_value(tmp_path: Path, content, line, message):
    path = tmp_path / "bad.conll"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        read_conll(path)
    assert err.value.line == line and str(path) in str(err.value)


def test_conll_errors_stop_after_five_or_skip_with_count(tmp_path: Path):
    path = tmp_path / "bad.conll"
    path.write_text("".join(f"w{i}\tBAD\n\n" for i in range(8)) + "ok\tO\n")
    with pytest.raises(DataError, match="5 invalid record.*stopped there") as err:
        read_conll(path)
    assert "line 9: tag 'BAD'" in str(err.value) and "line 11" not in str(err.value)
    with pytest.warns(UserWarning, match="skipped 8 invalid sentence"):
        assert read_conll(path, skip_invalid=True) == [{"tokens": ["ok"], "tags": ["O"],
                                                        "line": 17}]


def test_conll_tags_only_in_test_and_missing_file(tmp_path: Path, tokenizer):
    train, test = tmp_path / "train.conll", tmp_path / "test.conll"
    train.write_text("Anna\tB-PER\n")
    test.write_text("Rome\tB-LOC\n")
    task = make_task(RunConfig(task="conll-files", train_file=str(train), test_file=str(test)))
    with pytest.raises(DataError, match=r"test.conll: tags \['B-LOC'\] occur in the test split"):
        task.featurize(task.examples("test"), tokenizer, "test")
    with pytest.raises(DataError, match="needs test-file"):
        make_task(RunConfig(task="conll-files", train_file=str(train))).examples("test")
    with pytest.raises(DataError, match="file not found"):
        read_conll(tmp_path / "nope.conll")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_scores_wnut17(tiny_models, method):
    """Each method builds its PEFT model for this head, takes a local round and is scored."""
    result, scores = local_round_and_scores([
        f"model={tiny_models('bert')}", "task=wnut17", f"method={method}", "lora-rank=4",
        "max-train-samples=16", "max-test-samples=8", "num-clients=2", "clients-per-round=1"])
    assert result.steps > 0 and np.isfinite(result.loss)
    assert 0.0 <= scores["f1"] <= 1.0


# --- end to end -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_federated_ner_run(tiny_models, tmp_path):
    summary, rounds = two_round_simulation([
        f"model={tiny_models('bert')}", "task=wnut17", "method=federa", "lora-rank=4",
        "max-train-samples=96", "max-test-samples=48", f"out={tmp_path / 'run'}"])
    for r in rounds:
        assert {"f1", "precision", "recall"} <= r["metrics"].keys()
    assert summary["metric"] == "f1" and 0.0 <= summary["final"]["f1"] <= 1.0


def test_per_source_f1_scores_each_source_on_its_own():
    from fedpeft.tasks.base import per_source_f1

    examples = [{"source": "conll"}, {"source": "conll"}, {"source": "wnut"}]
    gold = [["B-PER", "O"], ["B-LOC", "O"], ["B-ORG", "I-ORG"]]
    pred = [["B-PER", "O"], ["O", "O"], ["B-ORG", "I-ORG"]]
    scores = per_source_f1(examples, gold, pred, entity_scores)
    assert scores["f1-wnut"] == 1.0
    assert scores["f1-conll"] == pytest.approx(2 / 3)  # P 1/1, R 1/2
    assert per_source_f1(examples[:2], gold[:2], pred[:2], entity_scores) == {}  # one source
