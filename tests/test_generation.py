"""Generative tasks on decoders (squad-gen, instruct-files): prompts in the chat template, the
loss on the answer tokens only, left-padded batches whose logits are kept for the answers only,
greedy generation and its scoring, the instruction files and their errors, length-grouped
batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from corpora import FIXTURE_OVERRIDE, fixture_config
from decoders import decoder_tokenizer, one_thread, tiny_decoders  # noqa: F401 (fixtures)

from fedpeft.cli import main
from fedpeft.config import ConfigError, load_config
from fedpeft.federation.runtime import Runtime
from fedpeft.tasks import DataError, make_task
from fedpeft.tasks.generation import PLAIN_PROMPT, clean_generation, rouge_l
from fedpeft.tasks.instructions import read_instructions
from fedpeft.tasks.qa import CLUSTERS, question_clusters
from fedpeft.training import length_grouped, local_train

MESSAGES = [{"role": "user", "content": "Which team won Super Bowl 50?"}]
ANSWER = "Denver Broncos"


def generation_task(name: str = "squad-gen", **settings):
    return make_task(fixture_config(task=name, **settings))


# --- answer-only loss ---------------------------------------------------------------------------

def test_labels_mask_exactly_the_prompt_by_hand():
    """The prompt is the ChatML rendering up to the assistant's turn; the labels are -100 on it
    and the completion's own ids after it: the answer and the end-of-turn token."""
    tokenizer = decoder_tokenizer("llama")
    task = generation_task()
    example = {"id": "x", "messages": MESSAGES, "response": ANSWER, "references": [ANSWER]}
    row = task.featurize([example], tokenizer, "train").rows[0]
    prompt = "<|im_start|>user\nWhich team won Super Bowl 50?<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer("Denver Broncos<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == prompt_ids + answer_ids
    assert row["labels"] == [-100] * len(prompt_ids) + answer_ids
    assert tokenizer.decode([t for t in row["labels"] if t >= 0]) == "Denver Broncos<|im_end|>\n"
    assert tokenizer.decode(row["input_ids"][: len(prompt_ids)]) == prompt


def test_without_a_chat_template_the_plain_prompt_and_eos():
    tokenizer = decoder_tokenizer("gpt2")  # no template, no pad token
    task = generation_task()
    example = {"id": "x", "messages": MESSAGES, "response": ANSWER, "references": [ANSWER]}
    row = task.featurize([example], tokenizer, "train").rows[0]
    n = len([t for t in row["labels"] if t == -100])
    assert tokenizer.decode(row["input_ids"][:n]) == PLAIN_PROMPT.format(prompt=MESSAGES[0][
        "content"])
    assert tokenizer.decode(row["input_ids"][n:]) == "Denver Broncos<|endoftext|>"
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"  # padded with EOS


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_loss_is_the_hand_computed_answer_cross_entropy(tiny_decoders, arch):  # noqa: F811
    """Left padding, position ids and the kept last logits give the mean cross-entropy over the
    answer tokens that full logits of each row alone give (GPT-2 has absolute positions, so
    wrong position ids would show)."""
    cfg = load_config(None, [f"model={tiny_decoders(arch)}", "task=squad-gen", "method=fedft",
                             FIXTURE_OVERRIDE])
    runtime = Runtime(cfg)
    rows = runtime.features("test").rows[:3]
    assert len({len(r["input_ids"]) for r in rows}) == 3  # padding is exercised
    batch = runtime.collate(rows)
    assert batch["logits_to_keep"] < batch["input_ids"].shape[1] / 4  # answers only
    model = runtime.model.eval()
    with torch.no_grad():
        batched = float(model(**batch).loss)
        nll, count = 0.0, 0
        for r in rows:
            logits = model(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(r["labels"][1:])
            keep = labels != -100
            nll += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep],
                                                           reduction="sum"))
            count += int(keep.sum())
    assert batched == pytest.approx(nll / count, rel=1e-4)


def test_overfit_model_generates_the_answer_and_scores_it(tiny_decoders):  # noqa: F811
    """A tiny Llama trained on two questions answers them greedily: generation, decoding,
    post-processing and the SQuAD scores end to end (exact match 1 on both)."""
    cfg = load_config(None, [f"model={tiny_decoders('llama')}", "task=squad-gen", "method=fedft",
                             FIXTURE_OVERRIDE, "max-new-tokens=16", "gen-eval-samples=2"])
    runtime = Runtime(cfg)
    test = runtime.features("test")
    picked = runtime.task.eval_subset(test)
    rows = [test.rows[i] for i in picked]
    torch.manual_seed(0)
    local_train(runtime.model, rows, runtime.collate, lr=3e-3, epochs=150, batch_size=2,
                weight_decay=0.0, max_grad_norm=1.0, generator=torch.Generator().manual_seed(0),
                device=torch.device("cpu"))
    scores = runtime.evaluate("test")
    assert scores["scored"] == 2
    assert scores["exact-match"] == 1.0 and scores["f1"] == 1.0 and scores["rouge-l"] == 1.0
    assert scores["loss"] < 0.05 and scores["perplexity"] < 1.06


def test_clean_generation():
    assert clean_generation("  Denver Broncos\nQuestion: who", first_line=True) == "Denver Broncos"
    assert clean_generation('\n\n"Santa Clara"  ', first_line=True) == "Santa Clara"
    assert clean_generation("'the 1960s'", first_line=True) == "the 1960s"
    assert clean_generation('"unbalanced', first_line=True) == '"unbalanced'
    assert clean_generation("  line one\nline two  ") == "line one\nline two"
    assert clean_generation("\n \n", first_line=True) == ""


def test_rouge_l_and_references():
    # LCS "the cat sat" = 3 of 3 predicted, 3 of 6 reference tokens: F = 2*1*0.5/1.5
    assert rouge_l(["the cat sat"], [["the cat sat on the mat"]]) == pytest.approx(2 / 3)
    assert rouge_l(["cats sitting"], [["a dog", "the cat sits"]]) == pytest.approx(
        2 * 1.0 * (2 / 3) / (1 + 2 / 3))  # stemming: cats->cat, sitting/sits->sit; best ref
    assert rouge_l(["nothing shared"], [["the cat"]]) == 0.0


# --- data ---------------------------------------------------------------------------------------

def test_squad_gen_reuses_squads_questions_and_clusters():
    squad, gen = make_task(fixture_config(task="squad")), generation_task()
    for split in ("train", "test"):
        questions, examples = squad.examples(split), gen.examples(split)
        assert [q["id"] for q in questions] == [e["id"] for e in examples]
        assert all(e["response"] == q["answers"][0]["text"] and q["context"] in
                   e["messages"][0]["content"] and q["question"] in e["messages"][0]["content"]
                   for q, e in zip(questions, examples, strict=True))
    train = gen.examples("train")
    assert gen.partition_classes(train) == question_clusters(
        [q["question"] for q in squad.examples("train")], CLUSTERS, 0)


def test_eval_subset_is_seeded_and_sized():
    task = generation_task(gen_eval_samples=5)
    features = task.featurize(task.examples("test"), decoder_tokenizer(), "test")
    subset = task.eval_subset(features)
    assert len(subset) == 5 and list(subset) == sorted(set(subset.tolist()))
    assert np.array_equal(subset, generation_task(gen_eval_samples=5).eval_subset(features))
    assert not np.array_equal(subset, generation_task(gen_eval_samples=5, seed=1)
                              .eval_subset(features))
    assert len(generation_task(gen_eval_samples=None).eval_subset(features)) == len(features)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records), encoding="utf-8")
    return path


ALPACA = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
DOLLY = {"instruction": "Summarise.", "context": "Cats sleep a lot.", "response": "They sleep.",
         "category": "summarization"}
CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]}


def test_instruction_layouts(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [ALPACA, "", DOLLY, CHAT])
    alpaca, dolly, chat = read_instructions(path)
    assert alpaca["messages"] == [{"role": "user", "content": "Name a colour."}]
    assert alpaca["response"] == "Blue." and alpaca["line"] == 1
    assert dolly["messages"][0]["content"] == "Summarise.\n\nCats sleep a lot."
    assert dolly["line"] == 3 and dolly["references"] == ["They sleep."]
    assert chat["messages"] == CHAT["messages"][:2] and chat["response"] == "Hi."
    with_class = read_instructions(write_jsonl(tmp_path / "d.jsonl", [DOLLY]), "dolly",
                                   "category")
    assert with_class[0]["class"] == "summarization"


@pytest.mark.parametrize("record, layout, field, expected", [
    ({"instruction": "x"}, "alpaca", None, "line 1: no 'output' field (alpaca layout"),
    ({"instruction": "x", "output": "  "}, "auto", None, "line 1: empty response ('output')"),
    ({"instruction": "", "response": "y"}, "auto", None, "line 1: empty 'instruction'"),
    ({"prompt": "x", "completion": "y"}, "auto", None, "cannot tell the layout from its fields"),
    ({"messages": [{"role": "user", "content": "x"}]}, "auto", None,
     "the last message must be the assistant's answer"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
     "auto", None, "empty response (the last message's content)"),
    (DOLLY | {"category": ""}, "dolly", "category", "no partition-field 'category'"),
    ("[1, 2]", "auto", None, "expected a JSON object, got list"),
    ("{bad", "auto", None, "expected one JSON object per line"),
])
def test_bad_records_are_named(tmp_path, record, layout, field, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError, match="bad.jsonl") as err:
        read_instructions(path, layout, field)
    assert expected in str(err.value)


def test_a_prompt_longer_than_max_length_is_an_error_or_skipped(tmp_path):
    long = {"instruction": "word " * 400, "output": "ok"}
    path = write_jsonl(tmp_path / "train.jsonl", [ALPACA, long])
    settings = dict(task="instruct-files", train_file=str(path), test_file=str(path),
                    max_length=64)
    task = make_task(fixture_config(**settings))
    with pytest.raises(DataError, match=r"train.jsonl:2: 1 invalid record.*record 'line-2': "
                       r"its prompt is \d+ tokens, longer than max-length=64"):
        task.featurize(task.examples("train"), decoder_tokenizer(), "train")
    task = make_task(fixture_config(**settings, skip_invalid=True))
    with pytest.warns(UserWarning, match="left out 1 of 2"):
        features = task.featurize(task.examples("train"), decoder_tokenizer(), "train")
    assert features.example_index.tolist() == [0]


def test_squad_gen_skips_and_counts_long_prompts():
    task = generation_task(max_length=300)
    examples = task.examples("train")
    with pytest.warns(UserWarning, match=r"left out \d+ of 61 examples"):
        features = task.featurize(examples, decoder_tokenizer(), "train")
    assert 0 < len(features) < len(examples)
    assert all(len(r["input_ids"]) <= 300 for r in features.rows)


def test_partition_classes_from_a_field_or_kmeans(tmp_path):
    records = [DOLLY | {"category": c, "instruction": f"Question {i} about {c}?"}
               for i, c in enumerate(["qa", "qa", "summarization", "brainstorm"])]
    path = write_jsonl(tmp_path / "dolly.jsonl", records)
    named = make_task(fixture_config(task="instruct-files", train_file=str(path),
                                     test_file=str(path), partition_field="category"))
    assert named.partition_classes(named.examples("train")) == [
        "qa", "qa", "summarization", "brainstorm"]
    clustered = make_task(fixture_config(task="instruct-files", train_file=str(path),
                                         test_file=str(path)))
    classes = clustered.partition_classes(clustered.examples("train"))
    assert len(classes) == 4 and all(c.startswith("q") for c in classes)


def test_cli_bad_instruction_file_is_one_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", [ALPACA, {"instruction": "x", "output": ""}])
    code = main(["partition", "task=instruct-files", f"train-file={path}", f"test-file={path}",
                 "num-clients=1", "clients-per-round=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "Traceback" not in err[0]
    assert "train.jsonl:2" in err[0] and "empty response ('output')" in err[0]


def test_settings_of_the_generative_tasks_are_checked():
    with pytest.raises(ConfigError, match="instruct-format must be auto, alpaca, dolly or "):
        load_config(None, ["instruct-format=sharegpt"])
    with pytest.raises(ConfigError, match="gen-eval-samples must be > 0"):
        load_config(None, ["gen-eval-samples=0"])
    with pytest.raises(ConfigError, match="max-new-tokens must be > 0"):
        load_config(None, ["max-new-tokens=0"])


# --- length-grouped batches ---------------------------------------------------------------------

def test_length_grouped_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 400, size=1000).tolist()
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    grouped = length_grouped(order, lengths, 16, torch.Generator().manual_seed(2), megabatch=8)
    assert sorted(grouped) == list(range(1000))  # every row once

    def padding(o):
        batches = [o[i:i + 16] for i in range(0, len(o), 16)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b)
                   for b in batches)

    assert padding(grouped) < padding(order) / 2.5
    assert grouped == length_grouped(order, lengths, 16, torch.Generator().manual_seed(2),
                                     megabatch=8)  # reproducible from the generator
    starts = [grouped[i] for i in range(0, 1000, 16)]
    assert starts != sorted(starts, key=lambda i: -lengths[i])  # batches are shuffled
