"""Data loaders: the shipped/shared datasets, and clear errors for bad files.

Tests of a full corpus outside the package are marked ``needs_corpus`` (skipped on a bare
clone); the same loaders are checked on the committed fixtures (``tests/fixtures/data``)."""

import gzip
import json
from pathlib import Path

import pytest
from corpora import fixture_config, needs_corpus

from fedpeft.config import RunConfig
from fedpeft.tasks import DataError, make_task
from fedpeft.tasks.classification import SEMEVAL_LABELS, read_semeval, read_text_file
from fedpeft.tasks.files import PACKAGE_DATA, find_dataset


def test_semeval_full_counts_and_labels():
    task = make_task(RunConfig(task="semeval"))
    train, test = task.examples("train"), task.examples("test")
    assert (len(train), len(test)) == (8000, 2717)
    assert task.label_names == SEMEVAL_LABELS and len(SEMEVAL_LABELS) == 19
    assert sum(e["label"] == "Other" for e in train) == 1410
    assert train[0]["text"].startswith("The system as described above")
    assert "<e1>configuration</e1>" in train[0]["text"]  # markers kept as plain text


@needs_corpus("semeval2010_task8")
def test_embedded_semeval_equals_the_original():
    shipped = read_semeval(PACKAGE_DATA / "semeval2010_task8" / "TEST_FILE_FULL.TXT.gz")
    cfg = RunConfig()
    path = find_dataset(cfg, "semeval2010_task8", ["TEST_FILE_FULL.TXT"])["TEST_FILE_FULL.TXT"]
    assert PACKAGE_DATA not in path.parents  # the data folder's copy, not the package's
    original = read_semeval(path)
    assert len(shipped) == 2717 and shipped == original


def test_data_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "semeval2010_task8"
    folder.mkdir()
    (folder / "TRAIN_FILE.TXT").write_text('1\t"A <e1>cat</e1> on a <e2>mat</e2>."\r\nOther\r\n'
                                           "Comment:\r\n\r\n")
    monkeypatch.setenv("FEDPEFT_DATA", str(tmp_path))
    assert len(make_task(RunConfig()).examples("train")) == 1  # $FEDPEFT_DATA
    with pytest.raises(DataError, match="does not exist"):
        make_task(RunConfig(data_dir=str(tmp_path / "nope"))).examples("train")
    with pytest.raises(DataError, match=r"TEST_FILE_FULL.TXT: file not found"):
        make_task(RunConfig()).examples("test")  # explicit folder lacks the file


@pytest.mark.parametrize("content, line, message", [
    ('1\t"No quotes end\nOther\n', 1, "expected `<id><TAB>"),
    ('1\t"A <e1>x</e1> <e2>y</e2>."\nNot-A-Label(e1,e2)\n', 2, "expected one of the 19"),
    ('1\t"A <e1>x</e1> <e2>y</e2>."\nOther\nComment:\n\n2\t"no markers"\nOther\n', 5,
     "<e1>"),
])
def test_malformed_semeval_names_file_and_line(tmp_path: Path, content, line, message):
    path = tmp_path / "TRAIN_FILE.TXT"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        read_semeval(path)
    assert err.value.line == line and str(path) in str(err.value)


NEWSGROUPS = ["alt.atheism", "comp.graphics", "comp.os.ms-windows.misc",
              "comp.sys.ibm.pc.hardware", "comp.sys.mac.hardware", "comp.windows.x",
              "misc.forsale", "rec.autos", "rec.motorcycles", "rec.sport.baseball",
              "rec.sport.hockey", "sci.crypt", "sci.electronics", "sci.med", "sci.space",
              "soc.religion.christian", "talk.politics.guns", "talk.politics.mideast",
              "talk.politics.misc", "talk.religion.misc"]


def test_20news_loader():
    """On the fixture (hand-made look-alike: 3 train and 2 test messages per group, sorted by
    label as the real files are)."""
    task = make_task(fixture_config(task="20news"))
    train, test = task.examples("train"), task.examples("test")
    assert (len(train), len(test)) == (60, 40)
    assert task.label_names == NEWSGROUPS  # sorted by label id, the real files' order
    assert [e["label_id"] for e in train] == sorted(e["label_id"] for e in train)
    assert all(task.label_names[e["label_id"]] == e["label"] for e in train + test)
    assert train[0]["label"] == "alt.atheism"
    assert train[0]["text"].startswith("From: user000@example.edu")  # raw text, headers kept
    assert "Subject: Re: burden of proof" in train[0]["text"]
    assert test[-1]["label"] == "talk.religion.misc"
    assert len(make_task(fixture_config(task="20news", max_train_samples=50)
                         ).examples("train")) == 50
    assert task.max_length == 256


@needs_corpus("20newsgroups")
def test_20news_full_corpus():
    task = make_task(RunConfig(task="20news", max_train_samples=50))
    assert task.label_names == NEWSGROUPS
    assert len(task.examples("train")) == 50
    assert (len(task.all_examples("train")), len(task.all_examples("test"))) == (11314, 7532)
    train = task.all_examples("train")
    assert sum(e["label"] == "alt.atheism" for e in train) == 480
    assert sum(e["label"] == "talk.religion.misc" for e in train) == 377


def test_text_files_csv_and_jsonl(tmp_path: Path):
    csv_file = tmp_path / "train.csv"
    csv_file.write_text("sentence,tag\nhello world,pos\nbad day,neg\n")
    rows = read_text_file(csv_file, "sentence", "tag")
    assert rows == [{"text": "hello world", "label": "pos"}, {"text": "bad day", "label": "neg"}]
    jsonl = tmp_path / "test.jsonl.gz"
    with gzip.open(jsonl, "wt") as fh:
        fh.write(json.dumps({"text": "ok", "label": 1}) + "\n")
    assert read_text_file(jsonl, "text", "label") == [{"text": "ok", "label": "1"}]


@pytest.mark.parametrize("content, line, message", [
    ("sentence,label\nhi,pos\n", 1, "missing column 'text'"),
    ("text,label\nhi,pos\n ,neg\n", 3, "empty text"),
    ("text,label\nhi,\n", 2, "empty label"),
])
def test_text_file_errors(tmp_path: Path, content, line, message):
    path = tmp_path / "data.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        read_text_file(path, "text", "label")
    assert err.value.line == line


def test_label_only_in_test_is_an_error(tmp_path: Path, tiny_models):
    from fedpeft.models import load_tokenizer

    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\n")
    (tmp_path / "test.csv").write_text("text,label\nc,z\n")
    cfg = RunConfig(task="text-files", train_file=str(tmp_path / "train.csv"),
                    test_file=str(tmp_path / "test.csv"))
    task = make_task(cfg)
    with pytest.raises(DataError, match=r"labels \['z'\] occur in the test split"):
        task.featurize(task.examples("test"), load_tokenizer(tiny_models("bert")), "test")


def test_validation_split_is_carved_from_train_only():
    task = make_task(RunConfig(task="semeval", valid_fraction=0.1))
    train, valid, test = task.examples("train"), task.examples("valid"), task.examples("test")
    assert len(train) + len(valid) == 8000 and 700 < len(valid) < 900
    assert {e["id"] for e in train}.isdisjoint(e["id"] for e in valid)
    assert len(test) == 2717
    again = make_task(RunConfig(task="semeval", valid_fraction=0.1)).examples("valid")
    assert [e["id"] for e in again] == [e["id"] for e in valid]


def test_sample_limits_take_a_seeded_subset_of_every_label_order():
    """On the 20news fixture: 60 training messages, 3 per label, sorted by label."""
    full = make_task(fixture_config(task="20news")).examples("train")
    a = make_task(fixture_config(task="20news", max_train_samples=20, seed=0)).examples("train")
    b = make_task(fixture_config(task="20news", max_train_samples=20, seed=1)).examples("train")
    assert len(a) == len(b) == 20
    # the first 20 messages of the file hold only 7 labels; a seeded random subset holds more
    assert len({e["label"] for e in full[:20]}) == 7
    assert len({e["label"] for e in a}) == 15 and len({e["label"] for e in b}) == 15
    assert [e["text"] for e in a] != [e["text"] for e in b]
    # kept in file order, a subset of the file, the same for the same seed
    position = {e["text"]: i for i, e in enumerate(full)}  # the fixture's texts are unique
    assert len(position) == 60
    kept = [position[e["text"]] for e in a]
    assert kept == sorted(kept) and kept != list(range(20))
    again = make_task(fixture_config(task="20news", max_train_samples=20, seed=0))
    assert again.examples("train") == a
    # the test split has its own limit and seed stream
    test = make_task(fixture_config(task="20news", max_test_samples=10)).examples("test")
    assert len(test) == 10 and len({e["label"] for e in test}) == 9


@needs_corpus("20newsgroups")
def test_sample_limits_on_the_full_20news():
    a = make_task(RunConfig(task="20news", max_train_samples=200, seed=0)).examples("train")
    b = make_task(RunConfig(task="20news", max_train_samples=200, seed=1)).examples("train")
    assert len({e["label"] for e in a}) > 10  # the file is sorted by label; the subset is not
    assert [e["text"] for e in a] != [e["text"] for e in b]
