"""What ``hirank compare`` measures besides the task metric: peak memory, forgetting, effective rank of ΔW,
forward time (unmerged / merged / base) and adapter file size.

Forgetting is the change, caused by the adapters, in the base model's loss on its own general objective on
held-out general text (BoolQ questions and Wikipedia passages, which no task trains on), measured on the
fine-tuned model with the adapters enabled ("after") and disabled ("before"); positive means the model got
worse at it:

* encoders (sentence embedders such as all-MiniLM-L6-v2): the in-batch contrastive loss the model was
  pretrained with (mean-pooled, L2-normalized embeddings; cosine similarity × 20; cross-entropy that each
  question picks its own passage among the 32 of its batch);
* causal LMs: the next-token loss on the passages.
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from hirank.analysis import NonFiniteError, delta_weights, effective_rank

from .tasks import Batch

CONTRASTIVE_BATCH = 32
CONTRASTIVE_SCALE = 20.0


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so that memory an
    earlier run freed but the allocator kept does not count as this run's resident memory."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass


class PeakMemory:
    """Peak memory while the block runs, as an increase over the memory in use when it started, in MiB:
    CUDA allocated memory on a GPU, else the process's resident set size sampled every 20 ms (after handing
    freed memory back to the OS at the start).

    Measured relative to the block's own start so that what earlier runs of the same process left behind
    (caches, fragmentation) does not count: a run's peak does not depend on its position in the process.
    ``baseline_mib`` is the memory in use at the start.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline_mib = 0.0
        self._highest_mib = 0.0
        self._stop = threading.Event()

    def _current_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return psutil.Process().memory_info().rss / 2**20

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mib = self._current_mib()
        else:
            release_freed_memory()
            self.baseline_mib = self._highest_mib = self._current_mib()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            self._highest_mib = max(self._highest_mib, self._current_mib())
            if self._stop.wait(0.02):
                return

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._highest_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._highest_mib = max(self._highest_mib, self._current_mib())

    @property
    def peak_mib(self) -> float:
        """Highest memory in use during the block minus :attr:`baseline_mib`."""
        return max(0.0, self._highest_mib - self.baseline_mib)

    @property
    def kind(self) -> str:
        return "cuda_max_allocated_increase" if self.device.type == "cuda" else "cpu_peak_rss_increase"


def _mean_pooled(encoder: nn.Module, batch: Batch) -> torch.Tensor:
    hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return nn.functional.normalize(pooled, dim=-1)


def contrastive_loss(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], max_length: int
) -> float:
    """Mean in-batch contrastive loss of the model's encoder body on (query, passage) pairs."""
    encoder = model.get_base_model().base_model  # the body under the classification head
    device = next(model.parameters()).device
    losses = []
    for start in range(0, len(pairs), CONTRASTIVE_BATCH):
        queries, passages = zip(*pairs[start : start + CONTRASTIVE_BATCH], strict=True)
        encoded = [
            tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(device)
            for texts in (queries, passages)
        ]
        similarity = (
            CONTRASTIVE_SCALE * _mean_pooled(encoder, dict(encoded[0])) @ _mean_pooled(encoder, dict(encoded[1])).T
        )
        target = torch.arange(len(queries), device=device)
        losses.append(nn.functional.cross_entropy(similarity, target).item())
    return statistics.fmean(losses)


def language_model_loss(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], max_length: int
) -> float:
    """Mean next-token loss of the causal LM on the passages."""
    device = next(model.parameters()).device
    losses = []
    passages = [passage for _, passage in pairs]
    for start in range(0, len(passages), 8):
        batch = tokenizer(
            passages[start : start + 8], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        ).to(device)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        losses.append(model(**batch, labels=labels).loss.item())
    return statistics.fmean(losses)


@torch.no_grad()
def forgetting(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    kind: str,
    pairs: list[tuple[str, str]],
    max_length: int,
    before: float | None = None,
) -> dict[str, float]:
    """``{"general_loss_before", "general_loss_after", "forgetting"}`` (see the module docstring); texts are
    truncated to ``max_length`` tokens. ``before``: the base model's loss on the same texts, when known (it is the
    same for every run on one model), instead of measuring it again."""
    loss = contrastive_loss if kind == "classification" else language_model_loss
    model.eval()
    if before is None:
        with model.disable_adapter():
            before = loss(model, tokenizer, pairs, max_length)
    after = loss(model, tokenizer, pairs, max_length)
    return {"general_loss_before": before, "general_loss_after": after, "forgetting": after - before}


def effective_rank_of_updates(model: nn.Module) -> dict[str, float]:
    """Effective (numerical) rank of every adapted layer's dense ΔW: mean, min and max over layers (empty for
    a method whose update is not a fixed matrix)."""
    try:
        # float64: QuanTA's and SURM's smallest singular values sit near float32's rounding floor
        ranks = [effective_rank(delta) for delta in delta_weights(model, dtype=torch.float64).values()]
    except NonFiniteError:
        raise  # a diverged adapter is an error, not a method without a fixed ΔW
    except (ValueError, NotImplementedError):
        return {}
    if not ranks:
        return {}
    return {
        "effective_rank_mean": statistics.fmean(ranks),
        "effective_rank_min": min(ranks),
        "effective_rank_max": max(ranks),
    }


def _seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


@torch.no_grad()
def forward_times(model: PeftModel, batch: Batch, repeats: int = 10, budget_s: float = 6.0) -> dict[str, float | None]:
    """Median forward time (s) of one batch of model inputs with the adapters unmerged, merged into the
    weights, and of the base model (adapters disabled); ``forward_merged_s`` is None for a method that cannot merge.

    The three are timed in turn within each repeat, so that a change in machine load hits all of them alike;
    there are ``repeats`` rounds after a warm-up, fewer (at least 3) if they exceed ``budget_s``. Refuses
    (``NonFiniteError``) to merge an adapter with a NaN or infinite trainable parameter.
    """
    require_finite_parameters(model)
    model.eval()

    def forward() -> object:
        return model(**batch)

    def merged_seconds() -> float | None:
        try:
            model.merge_adapter()
        except (ValueError, NotImplementedError, TypeError):
            return None
        try:
            return _seconds(forward)
        finally:
            model.unmerge_adapter()

    def base_seconds() -> float:
        with model.disable_adapter():
            return _seconds(forward)

    unmerged: list[float] = []
    merged: list[float] = []
    base: list[float] = []
    mergeable = True
    forward()  # warm-up
    started = time.perf_counter()
    while len(base) < repeats and (len(base) < 3 or time.perf_counter() - started < budget_s):
        unmerged.append(_seconds(forward))
        if mergeable:
            seconds = merged_seconds()
            if seconds is None:
                mergeable = False
            else:
                merged.append(seconds)
        base.append(base_seconds())
    return {
        "forward_unmerged_s": statistics.median(unmerged),
        "forward_merged_s": statistics.median(merged) if mergeable else None,
        "forward_base_s": statistics.median(base),
    }


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters with a NaN or infinite entry."""
    return [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and not bool(torch.isfinite(parameter).all())
    ]


def require_finite_parameters(model: nn.Module) -> None:
    """Raise ``NonFiniteError`` naming the trainable parameters with NaN or infinite entries, if any."""
    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteError(
            f"{len(bad)} trainable parameters have NaN or infinite entries (e.g. {bad[0]}): a diverged adapter is "
            "never saved or merged."
        )


def save_adapter(model: PeftModel, folder: Path) -> int:
    """Save the adapter (safetensors) and return the size in bytes of ``adapter_model.safetensors``.

    Written to a temporary sibling folder and renamed into place, so ``folder`` is never a half-written adapter
    (a comparison killed while saving leaves only the temporary folder, which the re-run replaces).
    Refuses (``NonFiniteError``) an adapter with a NaN or infinite trainable parameter.
    """
    require_finite_parameters(model)
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    # no embedding check: it would look up base_model_name_or_path (a public id) on the hub at every save
    model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False)
    size = (staging / "adapter_model.safetensors").stat().st_size
    shutil.rmtree(folder, ignore_errors=True)  # a re-run of a run whose record was lost replaces its adapter
    os.replace(staging, folder)
    return size
