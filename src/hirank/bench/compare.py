"""``hirank compare``: train every (method, seed) at a matched adapter-parameter budget and record one JSON line
per finished run. Re-running the same comparison skips the runs already in the results file.

Runs unchanged under ``accelerate launch`` / ``torchrun``: every process trains (DDP), the main process measures,
saves and writes.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import json
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm

import hirank

from ..analysis import DEFAULT_BUDGET_TOLERANCE
from .budget import (
    BudgetMatch,
    adapter_parameters,
    match_budget,
    parse_budget,
    saved_module_parameters,
)
from .measure import effective_rank_of_updates, forgetting, forward_times, save_adapter
from .methods import METHODS, MethodSpec, UnknownPresetError, available_methods, get_method
from .models import PACKAGED_MODELS, LoadedModel, load_model
from .options import check_options
from .results import RESULTS_FILE, Record, append_record, load_records, run_key
from .tasks import ClassificationTask, Splits, Task, general_text, get_task
from .train import TrainConfig, TrainResult, train_and_evaluate


@dataclass(frozen=True)
class CompareOptions:
    """A comparison: which model, task, methods, budget and seeds, and how to train."""

    model: str = "minilm"
    task: str = "sst2"
    methods: tuple[str, ...] | None = None  # None: every method available in this build
    budget: str = "lora-r4"
    budget_tolerance: float | None = DEFAULT_BUDGET_TOLERANCE
    seeds: int = 3
    epochs: int = 3
    batch_size: int = 16
    max_length: int = 128
    learning_rate_preset: str = "tuned"  # "tuned" (short-schedule defaults) or "paper" (published recipes)
    learning_rates: dict[str, float] = field(default_factory=dict)  # overrides: method (or "*" for all) → lr
    target_modules: tuple[str, ...] | None = None  # None: the model's defaults (e.g. BERT: query, value)
    train_limit: int | None = None  # use only the first N training examples (smoke tests)
    eval_limit: int | None = None  # use only the first N validation and test examples (smoke tests)
    general_text_pairs: int = 128
    out: Path | None = None
    trust_remote_code: bool = False  # let a model folder / hub id run its own code (auto_map); not in the run hash

    def output_dir(self) -> Path:
        """``out``, or ``results/<model>-<task>-<budget>``."""
        if self.out is not None:
            return Path(self.out)
        return Path("results") / re.sub(r"[^A-Za-z0-9_.%-]+", "_", f"{Path(self.model).name}-{self.task}-{self.budget}")

    def method_names(self) -> list[str]:
        return list(self.methods) if self.methods else available_methods()

    def learning_rate(self, method: MethodSpec) -> tuple[float, str]:
        """The learning rate of ``method`` in this comparison, and where it comes from."""
        for key in (method.name, "*"):
            if key in self.learning_rates:
                return self.learning_rates[key], "command line"
        return method.preset_learning_rate(self.learning_rate_preset)


@dataclass(frozen=True)
class RunPlan:
    """One (method, seed) run and the settings that identify it."""

    method: MethodSpec
    seed: int
    match: BudgetMatch
    settings: dict[str, Any]  # everything but the seed that defines the run; hashed for resuming
    config_hash: str
    learning_rate_source: str

    @property
    def run_id(self) -> str:
        return f"{self.method.name}-seed{self.seed}-{self.config_hash}"


TIMING_SEQUENCES = 16
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class CompareError(ValueError):
    """Options that cannot make a comparison (no methods, no seeds, a model unfit for the task)."""


def _config_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _validate(options: CompareOptions, task: Task) -> None:
    if not options.method_names():
        raise CompareError("no method to compare.")
    for name in options.method_names():
        spec = get_method(name)
        try:
            options.learning_rate(spec)
        except UnknownPresetError as error:
            raise CompareError(str(error)) from None
    if options.seeds < 1:
        raise CompareError(f"--seeds must be ≥ 1, got {options.seeds}.")
    strays = set(options.learning_rates) - set(options.method_names()) - {"*"}
    if strays:
        raise CompareError(f"learning rates given for methods not compared: {', '.join(sorted(strays))}.")
    packaged = PACKAGED_MODELS.get(options.model)
    if packaged is not None and task.kind not in packaged.kinds:
        suitable = [name for name, model in PACKAGED_MODELS.items() if task.kind in model.kinds]
        raise CompareError(
            f"task {task.name} needs a {task.kind} model and {options.model} is not one; use one of {suitable} "
            "or a hub id / local path."
        )


def _load(options: CompareOptions, task: Task, accelerator: Accelerator) -> LoadedModel:
    num_labels = task.num_labels if isinstance(task, ClassificationTask) else 2
    targets = list(options.target_modules) if options.target_modules else None
    with accelerator.main_process_first():  # a first load may convert and cache a checkpoint
        return load_model(
            options.model,
            task.kind,
            num_labels=num_labels,
            target_modules=targets,
            trust_remote_code=options.trust_remote_code,
        )


def plan_runs(
    options: CompareOptions, loaded: LoadedModel, world_size: int, progress: bool = False
) -> tuple[int, list[RunPlan]]:
    """The target budget and every (method, seed) run, seed by seed, each method's knobs matched to the budget."""
    target = parse_budget(options.budget, loaded.model, loaded.target_modules)
    plans = []
    for name in tqdm(options.method_names(), desc="matching budgets", leave=False, disable=not progress):
        spec = get_method(name)
        match = match_budget(name, loaded.model, target, loaded.target_modules, options.budget_tolerance)
        learning_rate, learning_rate_source = options.learning_rate(spec)
        train_config = TrainConfig(
            learning_rate=learning_rate,
            epochs=options.epochs,
            batch_size=options.batch_size,
            max_length=options.max_length,
        )
        settings = {
            "model": options.model,
            "task": options.task,
            "method": name,
            "knobs": match.knobs,
            "fixed_knobs": dict(spec.fixed_knobs),
            "target_modules": list(match.knobs.get("target_modules", loaded.target_modules)),
            "head_modules": loaded.head_modules,
            "budget": options.budget,
            "target_params": target,
            "train": train_config.as_dict(),
            "train_limit": options.train_limit,
            "eval_limit": options.eval_limit,
            "general_text_pairs": options.general_text_pairs,
            "world_size": world_size,
        }
        digest = _config_hash(settings)
        plans.extend(
            RunPlan(spec, seed, match, settings, digest, learning_rate_source) for seed in range(options.seeds)
        )
    # seed-major: an interrupted comparison has already compared every method on the first seeds
    return target, sorted(plans, key=lambda plan: plan.seed)


def _splits(task: Task, options: CompareOptions) -> Splits:
    splits = task.splits()
    return Splits(
        train=splits.train[: options.train_limit],
        validation=splits.validation[: options.eval_limit],
        test=splits.test[: options.eval_limit],
    )


def make_accelerator() -> Accelerator:
    """An Accelerator that also goes distributed on machines without a GPU: under ``torchrun`` /
    ``accelerate launch`` on CPUs it sets up DDP over gloo (accelerate does that only when told ``cpu=True``)."""
    return Accelerator(cpu=not torch.accelerator.is_available())


def compare(options: CompareOptions, accelerator: Accelerator | None = None) -> list[Record]:
    """Run every pending (method, seed) of the comparison; returns all of its records, old and new."""
    check_options(options)
    accelerator = accelerator or make_accelerator()
    task = get_task(options.task)
    _validate(options, task)
    if options.methods is None and accelerator.is_main_process:
        missing = [name for name in METHODS if name not in available_methods()]
        if missing:
            print(f"hirank compare: not in this build, so not compared: {', '.join(missing)}")
    loaded = _load(options, task, accelerator)
    target, plans = plan_runs(options, loaded, accelerator.num_processes, progress=accelerator.is_main_process)
    del loaded
    results_path = options.output_dir() / RESULTS_FILE
    finished = [None]
    if accelerator.is_main_process:
        finished = [{run_key(record) for record in load_records(results_path)}]
    broadcast_object_list(finished)  # every process skips the same runs
    pending = [plan for plan in plans if (plan.method.name, plan.seed, plan.config_hash) not in finished[0]]
    splits = _splits(task, options)
    pairs = general_text(options.general_text_pairs) if accelerator.is_main_process else []
    if accelerator.is_main_process:
        print(
            f"hirank compare: {options.model} on {task.name} ({len(splits.train)} train / {len(splits.validation)} "
            f"validation / {len(splits.test)} test), budget {options.budget} = {target:,} adapter parameters; "
            f"{len(pending)} of {len(plans)} runs to do → {results_path}"
        )
    for plan in tqdm(pending, desc="runs", disable=not accelerator.is_main_process):
        record = _run(plan, options, task, splits, pairs, accelerator)
        if accelerator.is_main_process:
            append_record(results_path, record)
    hashes = {plan.config_hash for plan in plans}
    return [record for record in load_records(results_path) if record["config_hash"] in hashes]


def _run(
    plan: RunPlan,
    options: CompareOptions,
    task: Task,
    splits: Splits,
    pairs: list[tuple[str, str]],
    accelerator: Accelerator,
) -> Record:
    """Train one run on every process; the main process measures and returns its record (others: ``{}``)."""
    set_seed(plan.seed)  # head init, adapter init, data order, dropout
    loaded = _load(options, task, accelerator)
    config = plan.method.make_config(loaded.target_modules, plan.match.knobs, modules_to_save=loaded.head_modules)
    model = get_peft_model(loaded.model, config)
    adapter_params = adapter_parameters(model)
    train_config = TrainConfig(**plan.settings["train"])
    description = f"{plan.method.name} seed {plan.seed}"
    result, prepared = train_and_evaluate(
        accelerator, model, loaded.tokenizer, task, splits, train_config, plan.seed, description
    )
    params_per_rank = gather_object([adapter_params])
    record: Record = {}
    if accelerator.is_main_process:
        record = {
            "run_id": plan.run_id,
            "method": plan.method.name,
            "seed": plan.seed,
            "config_hash": plan.config_hash,
            **{
                key: plan.settings[key]
                for key in ("model", "task", "budget", "target_params", "knobs", "target_modules")
            },
            "trainable_params": adapter_params,
            "budget_relative_error": (adapter_params - plan.match.target) / plan.match.target,
            "trainable_params_per_rank": params_per_rank,
            "world_size": accelerator.num_processes,
            "learning_rate": train_config.learning_rate,
            "learning_rate_source": plan.learning_rate_source,
            "train": plan.settings["train"],
            "train_examples": len(splits.train),
            "test_examples": len(splits.test),
            **_training_fields(result),
            **_measurements(
                accelerator.unwrap_model(prepared), loaded, task, splits, pairs, options, plan, accelerator
            ),
            "versions": {
                "hirank": hirank.__version__,
                "peft": peft.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
            "device": f"{accelerator.device.type} ({platform.machine()}, {torch.get_num_threads()} threads)",
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    del model, prepared, loaded
    gc.collect()
    return record


def _training_fields(result: TrainResult) -> Record:
    return {
        "test_accuracy": result.test_accuracy,
        "validation_accuracy": result.validation_accuracy,
        "best_epoch": result.best_epoch + 1,
        "train_time_s": result.train_time_s,
        "step_time_s": result.step_time_s,
        "steps": result.steps,
        "final_train_loss": result.final_train_loss,
        "peak_memory_mib": result.peak_memory_mib,
        "memory_kind": result.memory_kind,
    }


def _measurements(
    model: PeftModel,
    loaded: LoadedModel,
    task: Task,
    splits: Splits,
    pairs: list[tuple[str, str]],
    options: CompareOptions,
    plan: RunPlan,
    accelerator: Accelerator,
) -> Record:
    """Head size, adapter file size, forgetting, effective rank of ΔW and forward times of a trained model."""
    # 16 sequences of the test split (for multiple choice: the first examples' prompt + choice sequences)
    collated = task.eval_collator(loaded.tokenizer, options.max_length)(splits.test[:TIMING_SEQUENCES])
    timing_batch = {
        key: collated[key][:TIMING_SEQUENCES].to(accelerator.device) for key in MODEL_INPUTS if key in collated
    }
    return {
        "head_params": saved_module_parameters(model),
        "adapter_file_bytes": save_adapter(model, options.output_dir() / "adapters" / plan.run_id),
        **forgetting(model, loaded.tokenizer, task.kind, pairs, options.max_length),
        **effective_rank_of_updates(model),
        **forward_times(model, timing_batch),
    }
