"""``instruct-files``: the user's instruction data for decoder language models.

The user's JSONL (``train-file``/``test-file``) in the Alpaca layout (``instruction``, ``input``,
``output``), the Dolly layout (``instruction``, ``context``, ``response``, ``category``) or chat
``messages`` (the last one the assistant's answer). Partition classes: the value of
``partition-field`` (e.g. Dolly's ``category``), else k-means over the TF-IDF of the prompts (as
SQuAD's questions). Prompts, features, batches and scoring are ``GenerationTask``'s
(``generation.py``); the default metric is ROUGE-L.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import DataError, InvalidRecords, json_lines
from .generation import GenerationTask

LAYOUTS = {  # layout -> (prompt field, optional extra-input field, response field)
    "alpaca": ("instruction", "input", "output"),
    "dolly": ("instruction", "context", "response"),
}


class InstructFiles(GenerationTask):
    """The user's instruction data (JSONL): Alpaca, Dolly or chat ``messages``."""

    name = "instruct-files"
    data = "train-file, test-file (JSONL: Alpaca, Dolly or chat messages)"
    metric = "rouge-l"

    def _load(self, split: str) -> list[dict[str, Any]]:
        return read_instructions(self.user_file(split), self.cfg.instruct_format,
                                 self.cfg.partition_field, self.cfg.skip_invalid)

    def _source(self, split: str) -> str:
        return self.user_file(split)

    def partition_classes(self, examples: list[dict[str, Any]]) -> list[str]:
        if self.cfg.partition_field:
            return [e["class"] for e in examples]
        return super().partition_classes(examples)


def read_instructions(path: str | Path, layout: str = "auto", partition_field: str | None = None,
                      skip_invalid: bool = False) -> list[dict[str, Any]]:
    """Examples of an instruction JSONL file (one object per line; blank lines ignored).

    ``layout`` auto tells each record's layout by its keys: ``messages`` (chat), ``output``
    (Alpaca), ``response`` (Dolly). A record missing a required field, with an empty prompt or
    response, or (with ``partition_field``) without that field, is invalid: the error names the
    line and the field."""
    problems = InvalidRecords(path, skip=skip_invalid)
    examples = []
    for number, record in json_lines(path):
        if not isinstance(record, dict):
            raise DataError(path, f"expected a JSON object, got {type(record).__name__}", number)
        example, problem = _instruction(record, layout)
        if problem is None and partition_field:
            value = record.get(partition_field)
            if value is None or (isinstance(value, str) and not value.strip()):
                problem = f"no partition-field {partition_field!r}"
            else:
                example["class"] = str(value)
        if problem is not None:
            problems.add(problem, number)
            continue
        example["id"] = str(record.get("id", f"line-{number}"))
        example["line"] = number
        examples.append(example)
    return problems.finish(examples, "record")


def _instruction(record: dict[str, Any], layout: str) -> tuple[dict[str, Any], str | None]:
    """(example, None) or ({}, what is wrong) for one record."""
    if layout == "auto":
        layout = ("messages" if "messages" in record else "alpaca" if "output" in record
                  else "dolly" if "response" in record else "")
        if not layout:
            return {}, (f"cannot tell the layout from its fields {sorted(record)[:8]}: expected "
                        "messages, instruction+output (Alpaca) or instruction+response (Dolly)")
    if layout == "messages":
        return _chat(record.get("messages"))
    prompt_key, extra_key, response_key = LAYOUTS[layout]
    for key in (prompt_key, response_key):
        if key not in record:
            return {}, f"no {key!r} field ({layout} layout: {', '.join(LAYOUTS[layout])})"
        if not isinstance(record[key], str):
            return {}, f"{key!r} must be a string, got {type(record[key]).__name__}"
    extra = record.get(extra_key) or ""
    if not isinstance(extra, str):
        return {}, f"{extra_key!r} must be a string, got {type(extra).__name__}"
    if not record[prompt_key].strip():
        return {}, f"empty {prompt_key!r}"
    response = record[response_key].strip()
    if not response:
        return {}, f"empty response ({response_key!r})"
    content = record[prompt_key].strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")
    return {"messages": [{"role": "user", "content": content}], "response": response,
            "references": [response]}, None


def _chat(messages: Any) -> tuple[dict[str, Any], str | None]:
    if not isinstance(messages, list) or not messages:
        return {}, "'messages' must be a non-empty list of {role, content} objects"
    turns = []
    for k, message in enumerate(messages):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            return {}, f"messages[{k}] must be an object with string role and content"
        turns.append({"role": message["role"], "content": message["content"]})
    if turns[-1]["role"] != "assistant":
        return {}, (f"the last message must be the assistant's answer, got role "
                    f"{turns[-1]['role']!r}")
    if not turns[-1]["content"].strip():
        return {}, "empty response (the last message's content)"
    if not any(t["role"] == "user" and t["content"].strip() for t in turns[:-1]):
        return {}, "no user message before the answer"
    response = turns[-1]["content"].strip()
    return {"messages": turns[:-1], "response": response, "references": [response]}, None
