"""Instruction tuning of decoder language models: ``GenerationTask``, and generative QA on SQuAD.

- ``squad-gen`` (here): the SQuAD questions of ``squad`` (same article split, same k-means
  question clusters as partition classes), asked generatively: the prompt is the context and the
  question in the model's chat template, the target is the first gold answer.
- ``instruct-files`` (``instructions.py``): the user's JSONL in the Alpaca, Dolly or chat layout.

Features (``encode``): the prompt rendered with the tokenizer's chat template
(``apply_chat_template(..., add_generation_prompt=True)``) and the completion, the rest of the
whole conversation's rendering (the answer and the template's end-of-turn token), tokenised
separately and concatenated; labels are -100 on the prompt, so the loss is on the answer tokens
only. A tokenizer without a chat template (GPT-2, base models) gets a plain
"### Instruction / ### Response" prompt and the answer followed by its EOS token. A prompt
longer than ``max-length`` is an error naming the record (``skip-invalid=true`` skips them;
``squad-gen`` skips and counts them); a completion that does not fit after its prompt is cut.

Batches are left-padded (``collate``), so the answer tokens of every row end at the last
column: the model computes its vocabulary logits only for the last ``logits_to_keep`` positions
(those that predict answer tokens) instead of for every prompt token, where the architecture
takes that argument (every family named in docs/tasks.md does); ``position_ids`` count from
each row's first real token. Training batches are length-grouped (``group_by_length``).

Evaluation on a seeded subset of ``gen-eval-samples`` test examples: the mean loss per answer
token and its perplexity, and greedy generation (at most ``max-new-tokens``) post-processed by
``clean_generation`` and scored against the references with SQuAD's exact match and F1 (the
official script's normalisation, ``qa.squad_scores``) and ROUGE-L F-measure (Google's
``rouge-score``, Porter stemming).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..training import _autocast
from .base import Features, Task
from .files import DataError, InvalidRecords
from .qa import CLUSTERS, question_clusters, squad_scores, squad_split

SQUAD_INSTRUCTION = ("Answer the question with a short span copied from the context. Reply "
                     "with the answer only.")
PLAIN_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"  # no chat template (GPT-2)


# --- prompts and features -------------------------------------------------------------------------

def render(tokenizer: Any, messages: list[dict[str, str]], response: str) -> tuple[str, str]:
    """(prompt text, completion text) of one example in the tokenizer's chat template.

    The prompt is the conversation up to the assistant's turn with the generation prompt; the
    completion is what the whole conversation's rendering adds to it (the answer and the
    template's end of turn). Without a chat template: ``PLAIN_PROMPT`` over the turns' contents,
    and the answer followed by the EOS token."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template renders a conversation that does not "
                             "start with the rendering of its prompt; fedpeft cannot tell the "
                             "answer tokens apart (use a model whose template does)")
        return prompt, full[len(prompt):]
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither a chat template nor an EOS token; fedpeft "
                         "cannot mark where an answer ends")
    text = "\n\n".join(m["content"] for m in messages)
    return PLAIN_PROMPT.format(prompt=text), response + tokenizer.eos_token


def encode(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str]
           ) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the prompts and of the completions, each tokenised on its own without the
    tokenizer's added special tokens (a chat template writes its own); a tokenizer that puts a
    BOS in front of a text (Llama's) gets it in front of a prompt that lacks one."""
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a")["input_ids"]
    adds_bos = bos is not None and len(probe) > 0 and probe[0] == bos and len(probe) > len(
        tokenizer("a", add_special_tokens=False)["input_ids"])
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    if adds_bos:
        prompt_ids = [ids if ids[:1] == [bos] else [bos, *ids] for ids in prompt_ids]
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    return prompt_ids, completion_ids


def clean_generation(text: str, first_line: bool = False) -> str:
    """A generated answer as scored: surrounding whitespace off; with ``first_line`` only its
    first non-empty line (extractive answers are one line; a model that goes on after it is not
    penalised for the rest), and quotes around the whole answer dropped."""
    text = text.strip()
    if first_line:
        text = next((line.strip() for line in text.splitlines() if line.strip()), "")
        for quote in ('"', "'", "`"):
            if len(text) >= 2 and text[0] == quote and text[-1] == quote:
                text = text[1:-1].strip()
    return text


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L F-measure (``rouge-score``, Porter stemming), each the max over the
    example's references."""
    from rouge_score import rouge_scorer

    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs)
                          for pred, refs in zip(predictions, references, strict=True)]))


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(inner.forward).parameters


class GenerationTask(Task):
    """Shared logic of the generative tasks; subclasses read ``{"id", "messages", "response",
    "references", "source"}`` examples (``messages``: the prompt's turns, ``response``: the
    target answer, ``references``: what generations are scored against)."""

    kind = "generation"
    metric = "f1"
    default_max_length = 512
    peft_task_type = "CAUSAL_LM"
    group_by_length = True
    first_line = False  # clean_generation's first_line for this task's answers
    drop_long = False  # skip (and count) examples whose prompt exceeds max-length, or refuse them
    # set by ``prepare`` from the model: whether its forward takes these arguments
    keep_logits = True
    positions = True

    def auto_model_class(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def prepare(self, model: torch.nn.Module) -> None:
        self.keep_logits = _accepts(model, "logits_to_keep")
        self.positions = _accepts(model, "position_ids")

    def partition_classes(self, examples: list[dict[str, Any]]) -> list[str]:
        return question_clusters([e["messages"][-1]["content"] for e in examples], CLUSTERS,
                                 self.cfg.seed)

    def _source(self, split: str) -> str:
        return f"{self.name} {split} split"

    # --- features ------------------------------------------------------------------------------
    def featurize(self, examples: list[dict[str, Any]], tokenizer: Any, split: str) -> Features:
        if tokenizer.pad_token_id is None:  # decoders without one: pad with EOS (masked anyway)
            tokenizer.pad_token = tokenizer.eos_token
        pairs = [render(tokenizer, e["messages"], e["response"]) for e in examples]
        prompt_ids, completion_ids = encode(tokenizer, [p for p, _ in pairs],
                                            [c for _, c in pairs])
        limit = self.max_length
        problems = InvalidRecords(self._source(split), skip=self.drop_long or self.cfg.skip_invalid)
        rows, index, prompt_lengths, cut = [], [], [], 0
        for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            if len(prompt) + 1 > limit:
                example = examples[i]
                problems.add(f"record {example['id']!r}: its prompt is {len(prompt)} tokens, "
                             f"longer than max-length={limit} leaves room for (raise max-length, "
                             "or shorten it)", example.get("line"))
                continue
            room = limit - len(prompt)
            cut += len(completion) > room
            completion = completion[:room]
            rows.append({"input_ids": prompt + completion, "attention_mask": [1] * (len(prompt)
                         + len(completion)), "labels": [-100] * len(prompt) + completion})
            index.append(i)
            prompt_lengths.append(len(prompt))
        skipped = problems.check()
        if skipped:
            warnings.warn(f"{self._source(split)}: left out {skipped} of {len(examples)} examples "
                          f"whose prompt is longer than max-length={limit}", stacklevel=2)
        if cut:
            warnings.warn(f"{self._source(split)}: {cut} answers cut to fit max-length={limit}",
                          stacklevel=2)
        if not rows:
            raise DataError(self._source(split), f"no example fits max-length={limit}")
        return Features(rows, np.asarray(index, dtype=np.int64),
                        {"prompt_lengths": prompt_lengths})

    def collate(self, rows: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
        """Left-padded batch; labels -100 off the answers. With ``keep_logits`` only the last
        positions' logits are computed: ``logits_to_keep`` = the longest answer + 1 (the
        position before an answer's first token predicts it), and ``labels`` are cut to those
        positions (the model's loss shifts them by one within them)."""
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), self.label_pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, width - n:] = torch.tensor(r["input_ids"])
            mask[i, width - n:] = 1
            if "labels" in r:
                labels[i, width - n:] = torch.tensor(r["labels"])
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self.positions:
            batch["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
        if self.keep_logits:
            answered = (labels != self.label_pad_id).any(0).nonzero()
            keep = min(width, width - int(answered[0]) + 1) if len(answered) else 1
            batch["labels"], batch["logits_to_keep"] = labels[:, width - keep:], keep
        else:
            batch["labels"] = labels
        return batch

    # --- metrics -------------------------------------------------------------------------------
    def eval_subset(self, features: Features) -> np.ndarray:
        """Feature rows scored: a seeded subset of ``gen-eval-samples`` (all if fewer), in
        order."""
        n, limit = len(features), self.cfg.gen_eval_samples
        if limit is None or limit >= n:
            return np.arange(n)
        rng = np.random.default_rng([self.cfg.seed, 3])
        return np.sort(rng.choice(n, size=limit, replace=False))

    def evaluate(self, model: torch.nn.Module, examples: list[dict[str, Any]], features: Features,
                 tokenizer: Any, device: torch.device) -> dict[str, float]:
        chosen = self.eval_subset(features)
        rows = [features.rows[i] for i in chosen]
        pad_id = tokenizer.pad_token_id
        loss = self.answer_loss(model, rows, pad_id, device)
        prompts = [r["input_ids"][: features.extra["prompt_lengths"][i]]
                   for r, i in zip(rows, chosen, strict=True)]
        texts = self.generate(model, prompts, tokenizer, device)
        answers = [clean_generation(t, self.first_line) for t in texts]
        refs = [examples[features.example_index[i]]["references"] for i in chosen]
        return {**squad_scores(answers, refs), "rouge-l": rouge_l(answers, refs),
                "loss": loss, "perplexity": float(np.exp(min(loss, 50.0))),
                "scored": float(len(rows))}

    @torch.no_grad()
    def answer_loss(self, model: torch.nn.Module, rows: Sequence[dict[str, list[int]]],
                    pad_id: int, device: torch.device) -> float:
        """Mean cross-entropy per answer token over ``rows`` (length-sorted batches)."""
        model.eval()
        order = np.argsort([-len(r["input_ids"]) for r in rows], kind="stable")
        total, tokens = 0.0, 0
        size = self.cfg.eval_batch_size
        with _autocast(device, self.cfg.precision):
            for start in range(0, len(order), size):
                batch = self.collate([rows[i] for i in order[start:start + size]], pad_id)
                count = int((batch["labels"][:, 1:] != self.label_pad_id).sum())
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                total += float(model(**batch).loss) * count
                tokens += count
        return total / max(1, tokens)

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, prompts: Sequence[list[int]], tokenizer: Any,
                 device: torch.device) -> list[str]:
        """Greedy continuations of ``prompts`` (token ids), decoded without special tokens, in
        the prompts' order (batches of similar length, left-padded)."""
        from transformers import GenerationConfig

        model.eval()
        eos = {tokenizer.eos_token_id}
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update(configured if isinstance(configured, list) else [configured])
        end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
            eos.add(end_of_turn)
        eos.discard(None)
        config = GenerationConfig(max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                  num_beams=1, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=sorted(eos))
        order = np.argsort([-len(p) for p in prompts], kind="stable")
        out: list[str] = [""] * len(prompts)
        size = self.cfg.eval_batch_size
        with _autocast(device, self.cfg.precision):
            for start in range(0, len(order), size):
                picked = order[start:start + size]
                batch = self.collate([{"input_ids": prompts[i]} for i in picked],
                                     tokenizer.pad_token_id)
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                generated = model.generate(input_ids=ids, attention_mask=mask,
                                           generation_config=config)
                new = generated[:, ids.shape[1]:].cpu().tolist()
                for i, tokens in zip(picked, new, strict=True):
                    out[i] = tokenizer.decode(tokens, skip_special_tokens=True)
        return out


# --- the tasks ------------------------------------------------------------------------------------

def squad_prompt(example: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{SQUAD_INSTRUCTION}\n\nContext: {example['context']}"
             f"\n\nQuestion: {example['question']}"}]


class SquadGen(GenerationTask):
    """SQuAD v1.1 (``squad``'s article split) as generative QA; classes by k-means."""

    name = "squad-gen"
    data = "squad_v1.1/"
    first_line = True
    drop_long = True  # a few long contexts are left out (counted), not an error

    def _load(self, split: str) -> list[dict[str, Any]]:
        if not self._all:
            for name, questions in squad_split(self.cfg).items():
                self._all[name] = [{"id": q["id"], "messages": squad_prompt(q),
                                    "response": q["answers"][0]["text"],
                                    "references": [a["text"] for a in q["answers"]],
                                    "question": q["question"], "source": "squad"}
                                   for q in questions]
        return self._all[split]

    def partition_classes(self, examples: list[dict[str, Any]]) -> list[str]:
        return question_clusters([e["question"] for e in examples], CLUSTERS, self.cfg.seed)
