"""Data loaders: the shipped/shared datasets, and clear errors for bad files."""

import gzip
import json
from pathlib import Path

import pytest

from fedpeft.config import RunConfig
from fedpeft.tasks import DataError, make_task
from fedpeft.tasks.base import PACKAGE_DATA, find_dataset
from fedpeft.tasks.classification import SEMEVAL_LABELS, read_semeval, read_text_file


def test_semeval_full_counts_and_labels():
    task = make_task(RunConfig(task="semeval"))
    train, test = task.examples("train"), task.examples("test")
    assert (len(train), len(test)) == (8000, 2717)
    assert task.label_names == SEMEVAL_LABELS and len(SEMEVAL_LABELS) == 19
    assert sum(e["label"] == "Other" for e in train) == 1410
    assert train[0]["text"].startswith("The system as described above")
    assert "<e1>configuration</e1>" in train[0]["text"]  # markers kept as plain text


def test_embedded_semeval_equals_the_original():
    shipped = read_semeval(PACKAGE_DATA / "semeval2010_task8" / "TEST_FILE_FULL.TXT.gz")
    cfg = RunConfig()
    original = read_semeval(find_dataset(cfg, "semeval2010_task8",
                                         ["TEST_FILE_FULL.TXT"])["TEST_FILE_FULL.TXT"])
    assert shipped == original


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


def test_20news_loader():
    task = make_task(RunConfig(task="20news", max_train_samples=50))
    assert len(task.label_names) == 20 and task.label_names[0] == "alt.atheism"
    assert len(task.examples("train")) == 50
    assert task.max_length == 256


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
    a = make_task(RunConfig(task="20news", max_train_samples=200, seed=0)).examples("train")
    b = make_task(RunConfig(task="20news", max_train_samples=200, seed=1)).examples("train")
    assert len({e["label"] for e in a}) > 10  # the file is sorted by label; the subset is not
    assert [e["text"] for e in a] != [e["text"] for e in b]
