"""The training loop, on ``accelerate``: the same code runs on one CPU, one GPU, or several processes launched
with ``accelerate launch`` / ``torchrun`` (DDP; the batch size is per process).

AdamW, linear decay after a linear warm-up, gradient clipping; validation accuracy after every epoch; the
epoch with the best validation accuracy is restored and evaluated once on the test set.

A run that diverges stops at the first step whose loss or gradient norm is NaN or infinite, before that step
updates anything (or, if the trained parameters themselves end non-finite, after training); it is then not
evaluated, and :attr:`TrainResult.diverged_at_step` says where it stopped.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from .measure import PeakMemory
from .tasks import Collator, Example, Splits, Task


@dataclass(frozen=True)
class TrainConfig:
    """Optimization settings of one run (``batch_size`` is per process)."""

    learning_rate: float
    epochs: int = 3
    batch_size: int = 16
    eval_batch_size: int = 64
    max_length: int = 128
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError(f"epochs and batch_size must be ≥ 1 and the learning rate > 0, got {self}.")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """What one training run measured (``train_time_s``: wall time of the training epochs, validation excluded;
    ``step_time_s``: median time of one optimizer step; ``peak_memory_mib``: increase of memory in use during
    training over its start; ``diverged_at_step``: the 1-based step whose ``nonfinite`` quantity ("loss",
    "gradient norm" or "parameters") was NaN or infinite, None if training did not diverge)."""

    validation_accuracy: list[float] = field(default_factory=list)
    best_epoch: int = 0
    test_accuracy: float | None = None
    train_time_s: float = 0.0
    step_time_s: float = 0.0
    steps: int = 0
    final_train_loss: float = float("nan")
    peak_memory_mib: float = 0.0
    memory_kind: str = ""
    diverged_at_step: int | None = None
    nonfinite: str | None = None

    @property
    def diverged(self) -> bool:
        return self.diverged_at_step is not None


def _nonfinite(accelerator: Accelerator, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> str | None:
    """"loss" or "gradient norm" if it is NaN or infinite on any process, else None (same answer everywhere)."""
    loss = loss.detach()
    grad_finite = torch.isfinite(grad_norm).to(loss.device) if grad_norm is not None else torch.ones_like(loss).bool()
    flags = torch.stack([~torch.isfinite(loss), ~grad_finite]).float()
    if accelerator.num_processes > 1:  # a NaN on one process stops every process at the same step
        flags = accelerator.reduce(flags, reduction="sum")
    if flags[0] > 0:
        return "loss"
    if flags[1] > 0:
        return "gradient norm"
    return None


def evaluate(
    accelerator: Accelerator, model: nn.Module, task: Task, loader: DataLoader, description: str = ""
) -> float:
    """Accuracy over the whole split (gathered across processes, padding duplicates dropped), with a progress bar
    named ``description`` on the main process (a multiple-choice split on an LLM takes minutes on a CPU)."""
    model.eval()
    outcomes = []
    batches = tqdm(loader, desc=description, leave=False, disable=not (description and accelerator.is_main_process))
    with torch.no_grad():
        for batch in batches:
            outcomes.append(accelerator.gather_for_metrics(task.correct(model, batch)))
    return torch.cat(outcomes).float().mean().item()


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in state:
                parameter.copy_(state[name])


def train_and_evaluate(
    accelerator: Accelerator,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    splits: Splits,
    config: TrainConfig,
    seed: int,
    description: str = "",
) -> tuple[TrainResult, nn.Module]:
    """Train ``model``'s trainable parameters on ``splits.train``; returns the result and the prepared model
    (with the best-validation weights loaded)."""
    train_loader = _loader(splits.train, task.train_collator(tokenizer, config.max_length), config.batch_size, seed)
    validation_loader = _loader(
        splits.validation, task.eval_collator(tokenizer, config.max_length), config.eval_batch_size
    )
    test_loader = _loader(splits.test, task.eval_collator(tokenizer, config.max_length), config.eval_batch_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = config.epochs * len(train_loader)  # single-process count: accelerate steps the schedule per process
    scheduler = get_linear_schedule_with_warmup(optimizer, round(config.warmup_ratio * total_steps), total_steps)
    model, optimizer, train_loader, validation_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, validation_loader, test_loader, scheduler
    )
    # FSDP2 (fully_shard) replaces the parameters by sharded DTensors: clip and check the prepared model's own
    trainable = [p for p in model.parameters() if p.requires_grad]
    result = TrainResult()
    step_times: list[float] = []
    best_state: dict[str, torch.Tensor] = {}
    progress = tqdm(
        total=config.epochs * len(train_loader), desc=description, leave=False, disable=not accelerator.is_main_process
    )
    with PeakMemory(accelerator.device) as memory:
        for epoch in range(config.epochs):
            model.train()
            epoch_start = time.perf_counter()
            for batch in train_loader:
                step_start = time.perf_counter()
                loss = model(**batch).loss
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                result.nonfinite = _nonfinite(accelerator, loss, grad_norm)
                if result.nonfinite is not None:  # stop before this step changes any parameter
                    result.diverged_at_step = len(step_times) + 1
                    optimizer.zero_grad(set_to_none=True)
                    break
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_times.append(time.perf_counter() - step_start)
                result.final_train_loss = loss.item()
                progress.update()
                progress.set_postfix(loss=f"{result.final_train_loss:.3f}", epoch=epoch + 1)
            result.train_time_s += time.perf_counter() - epoch_start
            if result.diverged:
                break
            accuracy = evaluate(accelerator, model, task, validation_loader, f"{description} validation {epoch + 1}")
            result.validation_accuracy.append(accuracy)
            if epoch == 0 or accuracy > result.validation_accuracy[result.best_epoch]:
                result.best_epoch, best_state = epoch, _trainable_state(model)
    progress.close()
    result.step_time_s = statistics.median(step_times) if step_times else 0.0
    result.steps = len(step_times)
    result.peak_memory_mib, result.memory_kind = memory.peak_mib, memory.kind
    if result.diverged:
        return result, model
    _restore(model, best_state)
    if not all(bool(torch.isfinite(p).all()) for p in trainable):  # finite gradients, yet an overflowing update
        result.diverged_at_step, result.nonfinite = result.steps, "parameters"
        return result, model
    result.test_accuracy = evaluate(accelerator, model, task, test_loader, f"{description} test")
    return result, model


def evaluate_untrained(
    accelerator: Accelerator, model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, splits: Splits,
    config: TrainConfig,
    description: str = "",
) -> TrainResult:
    """Validation and test accuracy of ``model`` as it is, with no training (the zero-shot reference)."""
    collate = task.eval_collator(tokenizer, config.max_length)
    loaders = [_loader(split, collate, config.eval_batch_size) for split in (splits.validation, splits.test)]
    model, validation_loader, test_loader = accelerator.prepare(model, *loaders)
    result = TrainResult()
    result.validation_accuracy = [evaluate(accelerator, model, task, validation_loader, f"{description} validation")]
    result.test_accuracy = evaluate(accelerator, model, task, test_loader, f"{description} test")
    return result


def _loader(examples: list[Example], collate: Collator, batch_size: int, seed: int | None = None) -> DataLoader:
    """A shuffled loader (seeded) for training, or an ordered one for evaluation."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        examples, batch_size=batch_size, shuffle=seed is not None, generator=generator, collate_fn=collate
    )
