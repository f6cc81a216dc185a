"""The settings of particular tasks: bring-your-own files, NER, extractive QA, and the generative
tasks on decoders (``tasks/``; ``fedpeft tasks`` lists which task reads which)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ConfigError, setting


@dataclass
class TaskConfig:
    """Task-specific: bring-your-own files, NER, QA, generation (tasks/, docs/tasks.md)"""

    # --- bring-your-own data -----------------------------------------------------------------
    train_file: str | None = setting(None, "*-files tasks: the training file")
    test_file: str | None = setting(None, "*-files tasks: the test file")
    text_column: str = setting("text", "text-files: the column of the text")
    label_column: str = setting("label", "text-files: the column of the label")
    token_column: int = setting(0, "conll-files: 0-based column of the token")
    tag_column: int = setting(-1, "conll-files: 0-based column of the BIO tag (-1 = last)")
    skip_invalid: bool = setting(
        False, "conll-files/squad-files: skip bad sentences/questions (counted)")
    ner_max_classes: int = setting(
        16, 'NER partition classes: 15 commonest entity sets + "other"; 0=all')
    doc_stride: int = setting(128, "QA: tokens shared by consecutive sliding windows (paper L=384)")
    max_answer_length: int = setting(30, "QA: longest predicted answer span, in tokens")
    n_best: int = setting(
        20, "QA: start and end candidates per window considered in post-processing")
    # --- generative tasks on decoders (squad-gen, instruct-files; docs/tasks.md) --------------
    gen_eval_samples: int | None = setting(
        200, "squad-gen/instruct-files: seeded test subset scored (loss + greedy generation); "
        "None = all")
    max_new_tokens: int = setting(
        32, "squad-gen/instruct-files: longest generated answer, in tokens", resumable=True,
        structural=False)
    instruct_format: str = setting(
        "auto", "instruct-files: auto | alpaca (instruction/input/output) | dolly "
        "(instruction/context/response) | messages (chat)")
    partition_field: str | None = setting(
        None, "instruct-files: field holding the partition class (e.g. category); None = k-means")

    def check_task_settings(self) -> None:
        if self.gen_eval_samples is not None and self.gen_eval_samples <= 0:
            raise ConfigError(f"gen-eval-samples must be > 0 (or none), got "
                              f"{self.gen_eval_samples}")
        if self.max_new_tokens <= 0:
            raise ConfigError(f"max-new-tokens must be > 0, got {self.max_new_tokens}")
        if self.instruct_format not in ("auto", "alpaca", "dolly", "messages"):
            raise ConfigError(f"instruct-format must be auto, alpaca, dolly or messages, got "
                              f"{self.instruct_format!r}")
        if self.doc_stride < 0:
            raise ConfigError(f"doc-stride must be >= 0, got {self.doc_stride}")
        if self.max_answer_length <= 0 or self.n_best <= 0:
            raise ConfigError("max-answer-length and n-best must be > 0, got "
                              f"{self.max_answer_length} and {self.n_best}")
        if self.ner_max_classes == 1 or self.ner_max_classes < 0:
            raise ConfigError(f"ner-max-classes must be 0 (keep all) or >= 2, got "
                              f"{self.ner_max_classes}")
