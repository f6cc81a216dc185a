"""Tasks by name. Each task class lives in the file of its kind (classification, ner, qa,
generation, instructions)."""

from __future__ import annotations

from ..config import ConfigError, RunConfig
from .base import Features, Task
from .classification import Newsgroups, SemEval, TextFiles
from .files import DataError
from .generation import SquadGen
from .instructions import InstructFiles
from .ner import ConllFiles, Ploner, Wnut17
from .qa import MultiSourceQA, Squad, SquadFiles

TASKS: dict[str, type[Task]] = {
    "semeval": SemEval,
    "20news": Newsgroups,
    "text-files": TextFiles,
    "wnut17": Wnut17,
    "ploner": Ploner,
    "conll-files": ConllFiles,
    "squad": Squad,
    "mrqa": MultiSourceQA,
    "squad-files": SquadFiles,
    "squad-gen": SquadGen,
    "instruct-files": InstructFiles,
}


def make_task(cfg: RunConfig) -> Task:
    """The task named by ``cfg.task``."""
    try:
        return TASKS[cfg.task](cfg)
    except KeyError:
        raise ConfigError(f"unknown task {cfg.task!r}; choose from {', '.join(TASKS)}") from None


def task_table() -> str:
    """One line per task: kind, headline metric, default max-length, what it reads."""
    lines = ["| task | kind | metric | default max-length | reads | about |",
             "|---|---|---|---:|---|---|"]
    for name, cls in TASKS.items():
        # the docstring's first sentence, as plain text
        about = " ".join((cls.__doc__ or "").split()).split(". ")[0].rstrip(".") + "."
        about = about.replace("``", "").replace(" (see the module docstring)", "")
        lines.append(f"| {name} | {cls.kind} | {cls.metric} | {cls.default_max_length} | "
                     f"{cls.data} | {about} |")
    lines.append("Dataset folders are looked up in data-dir (or $FEDPEFT_DATA), else in "
                 "shared/data beside the repository, else in the package's embedded copy; "
                 "the *-files tasks read the user's train-file and test-file.")
    return "\n".join(lines)


__all__ = ["TASKS", "DataError", "Features", "Task", "make_task", "task_table"]
