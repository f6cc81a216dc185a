"""Which corpora a test can use: the full data folder when it is there, the small committed
fixtures always.

The full corpora live outside the repository (``$FEDPEFT_DATA``, else ``shared/data`` beside the
repository, the loaders' own search order), so a bare ``git clone`` has none of them. Tests of a
full corpus (exact counts, the embedded copies equal to the originals) are marked
``@needs_corpus("squad_v1.1")`` and are SKIPPED, with the reason, where it is absent; CI has
the folder, so there they run. Everything else reads the fixtures in ``tests/fixtures/data``
(same folder and file names as the data folder; see ``tests/fixtures/README.md``) through
``fixture_config(...)`` / ``FIXTURE_OVERRIDE``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from fedpeft.config import RunConfig
from fedpeft.tasks.files import REPO_SHARED_DATA

FIXTURE_DATA = Path(__file__).resolve().parent / "fixtures" / "data"
FIXTURE_OVERRIDE = f"data-dir={FIXTURE_DATA}"  # for load_config(None, [...]) overrides

# The files each corpus's tests read (a file may also be there gzipped, as the loaders accept).
CORPORA: dict[str, list[str]] = {
    "20newsgroups": ["train.jsonl", "test.jsonl"],
    "semeval2010_task8": ["TRAIN_FILE.TXT", "TEST_FILE_FULL.TXT"],
    "wnut17": ["wnut17train.conll", "emerging.test.annotated"],
    "conll2003": ["train.txt", "test.txt"],
    "squad_v1.1": ["train-v1.1.partial.json", "dev-v1.1.json"],
    "mrqa_like": ["newsqa_dev.json", "train_duorc.json", "val_duorc.json", "train_race.json",
                  "val_race.json", "train_relation_extraction.json",
                  "val_relation_extraction.json"],
}


def data_folder() -> tuple[Path, str]:
    """The full data folder the loaders use when no ``data-dir`` is given, and how it was
    found. Never the copies embedded in the package: those are what some tests check."""
    explicit = os.environ.get("FEDPEFT_DATA")
    if explicit:
        return Path(explicit).expanduser(), "$FEDPEFT_DATA"
    return REPO_SHARED_DATA, "shared/data beside the repository"


def missing_corpus(name: str) -> str | None:
    """Why corpus ``name`` cannot be used (a file that is missing), or None if it can."""
    root, source = data_folder()
    for file in CORPORA[name]:
        if not any((root / name / f).is_file() for f in (file, f"{file}.gz")):
            return f"no {root / name / file}[.gz], {source}"
    return None


def needs_corpus(*names: str) -> pytest.MarkDecorator:
    """Skip the test unless every named full corpus is in the data folder."""
    unknown = [n for n in names if n not in CORPORA]
    if unknown:
        raise ValueError(f"unknown corpus {unknown}; known: {', '.join(CORPORA)}")
    problems = [p for p in map(missing_corpus, names) if p]
    return pytest.mark.skipif(
        bool(problems),
        reason=f"needs the full {' + '.join(names)} corpus: {'; '.join(problems)}; set "
        "$FEDPEFT_DATA or put shared/data beside the repository to run it")


def fixture_config(**settings: Any) -> RunConfig:
    """A ``RunConfig`` whose data folder is the committed fixtures."""
    return RunConfig(data_dir=str(FIXTURE_DATA), **settings)
