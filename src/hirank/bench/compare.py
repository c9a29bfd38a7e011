"""``hirank compare``: train every (method, seed) at a matched adapter-parameter budget and record one JSON line
per finished run. Re-running the same comparison skips the runs already in the results file.

Several ``hirank compare`` processes on one output folder split the work: each claims a run (an OS file lock,
see :class:`hirank.bench.results.RunClaim`) before training it, skips runs claimed by others, and then waits for
those to be recorded, taking over any whose process died. A run whose training diverges (NaN or infinite loss
or gradient norm) is recorded with status ``diverged`` and the comparison goes on.

After the runs, a timing pass (:mod:`hirank.bench.timing`) times one training step of every method side by side
with LoRA's, for the report's ratios; its results are kept in ``timing.jsonl`` and redone only for new settings.

Runs unchanged under ``accelerate launch`` / ``torchrun``: every process trains (DDP), the main process measures,
saves and writes.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import json
import os
import platform
import re
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, gather_object, set_seed
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm

import hirank

from ..analysis import DEFAULT_BUDGET_TOLERANCE
from .budget import (
    BudgetError,
    BudgetMatch,
    adapter_parameters,
    match_budget,
    parse_budget,
    saved_module_parameters,
)
from .measure import effective_rank_of_updates, forgetting, forward_times, save_adapter
from .methods import METHOD_SETS, MethodSpec, UnknownPresetError, available_methods, expand_method_names, get_method
from .models import PACKAGED_MODELS, LoadedModel, load_model
from .options import check_options
from .results import (
    DIVERGED,
    FINISHED,
    RESULTS_FILE,
    Record,
    RunClaim,
    append_record,
    load_records,
    run_id,
    write_out_of_reach,
)
from .tasks import ClassificationTask, Splits, Task, general_text, get_task
from .timing import TIMING_FILE, TimedModel, load_timings, timing_pass, untimed
from .train import TrainConfig, TrainResult, evaluate_untrained, train_and_evaluate


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
    references: bool = True  # also run the no-adapter reference (head only / zero shot), see REFERENCES
    timing: bool = True  # after the runs, time every method side by side (hirank.bench.timing); not in the run hash
    # a method out of the budget's reach (every setting above it, or below) is left out (listed in OUT_OF_REACH_FILE)
    # instead of stopping the comparison with BudgetError: for budget sweeps, where small budgets exclude some
    skip_out_of_reach: bool = False
    out: Path | None = None
    trust_remote_code: bool = False  # let a model folder / hub id run its own code (auto_map); not in the run hash

    def output_dir(self) -> Path:
        """``out``, or ``results/<model>-<task>-<budget>``."""
        if self.out is not None:
            return Path(self.out)
        return Path("results") / re.sub(r"[^A-Za-z0-9_.%-]+", "_", f"{Path(self.model).name}-{self.task}-{self.budget}")

    def method_names(self) -> list[str]:
        return expand_method_names(self.methods) if self.methods else available_methods()

    def learning_rate(self, method: MethodSpec) -> tuple[float, str]:
        """The learning rate of ``method`` in this comparison, and where it comes from."""
        for key in (method.name, "*"):
            if key in self.learning_rates:
                return self.learning_rates[key], "command line"
        return method.preset_learning_rate(self.learning_rate_preset)


#: Reference runs without an adapter, one per task kind, that every comparison runs beside the methods so that a
#: table where no adapter beats them says so: ``head_only`` trains only the new classification head (at LoRA's
#: learning rate), ``zero_shot`` evaluates the untouched causal LM (once: it has no seed-dependent part).
HEAD_ONLY, ZERO_SHOT = "head_only", "zero_shot"
REFERENCES = {"classification": HEAD_ONLY, "causal_lm": ZERO_SHOT}


@dataclass(frozen=True)
class RunPlan:
    """One (method, seed) run and the settings that identify it (``method`` is None for a reference run)."""

    method_name: str
    method: MethodSpec | None
    seed: int
    match: BudgetMatch
    settings: dict[str, Any]  # everything but the seed that defines the run; hashed for resuming
    config_hash: str
    learning_rate_source: str

    @property
    def run_id(self) -> str:
        return f"{self.method_name}-seed{self.seed}-{self.config_hash}"

    @property
    def is_reference(self) -> bool:
        return self.method is None


TIMING_SEQUENCES = 16
CLAIM_POLL_S = 2.0  # how often a process waiting for runs claimed by others looks again
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
    with accelerator.main_process_first():  # a first load may convert and cache a checkpoint
        return _load_here(options, task)


def _load_here(options: CompareOptions, task: Task) -> LoadedModel:
    """The comparison's model, loaded by this process alone."""
    return load_model(
        options.model,
        task.kind,
        num_labels=task.num_labels if isinstance(task, ClassificationTask) else 2,
        target_modules=list(options.target_modules) if options.target_modules else None,
        trust_remote_code=options.trust_remote_code,
    )


def plan_runs(
    options: CompareOptions, loaded: LoadedModel, world_size: int, progress: bool = False
) -> tuple[int, list[RunPlan], dict[str, str]]:
    """The target budget and every (method, seed) run, seed by seed, each method's knobs matched to the budget;
    with ``options.references``, the task kind's reference run too (see :data:`REFERENCES`). With
    ``options.skip_out_of_reach``, methods the budget is out of reach for are left out: method → why."""
    target = parse_budget(options.budget, loaded.model, loaded.target_modules)
    plans = []
    out_of_reach: dict[str, str] = {}
    reference = [REFERENCES[loaded.kind]] if options.references else []
    for name in tqdm(options.method_names() + reference, desc="matching budgets", leave=False, disable=not progress):
        spec = None if name in reference else get_method(name)
        if spec is None:  # no adapter: nothing to match; the head (if any) trains at LoRA's rate
            match = BudgetMatch(name, {}, 0, target)
            learning_rate, learning_rate_source = options.learning_rate(get_method("lora"))
        else:
            try:
                match = match_budget(name, loaded.model, target, loaded.target_modules, options.budget_tolerance)
            except BudgetError as error:
                if not options.skip_out_of_reach:
                    raise
                out_of_reach[name] = str(error)
                continue
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
            "fixed_knobs": dict(spec.fixed_knobs) if spec else {},
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
        seeds = range(1) if name == ZERO_SHOT else range(options.seeds)
        plans.extend(RunPlan(name, spec, seed, match, settings, digest, learning_rate_source) for seed in seeds)
    # seed-major: an interrupted comparison has already compared every method on the first seeds
    return target, sorted(plans, key=lambda plan: plan.seed), out_of_reach


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
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    _check_fsdp(accelerator)
    return accelerator


def _check_fsdp(accelerator: Accelerator) -> None:
    """accelerate's FSDP config: say what happens instead of sharding silently or hanging."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    if accelerator.distributed_type != DistributedType.FSDP:  # accelerate 1.x: FSDP only for GPU-like devices
        warnings.warn(
            f"accelerate applies its FSDP plugin only on GPUs and other accelerators; these {accelerator.device.type} "
            "processes train with DDP instead (same updates, each process holds the whole model).", stacklevel=2)
        return
    raise NotImplementedError(
        "hirank compare cannot run under FSDP: its measurements (timings, saved adapter, forgetting) run on the "
        "main process alone, which FSDP's collective forward passes do not allow. Launch it with DDP "
        "(torchrun, or accelerate launch without an FSDP config); the hirank methods themselves train under FSDP2.")


def compare(options: CompareOptions, accelerator: Accelerator | None = None) -> list[Record]:
    """Run every pending (method, seed) of the comparison; returns all of its records, old and new."""
    check_options(options)
    accelerator = accelerator or make_accelerator()
    task = get_task(options.task)
    _validate(options, task)
    if options.methods is None and accelerator.is_main_process:
        missing = [name for name in METHOD_SETS["default"] if name not in available_methods()]
        if missing:
            print(f"hirank compare: not in this build, so not compared: {', '.join(missing)}")
    loaded = _load(options, task, accelerator)
    target, plans, out_of_reach = plan_runs(
        options, loaded, accelerator.num_processes, progress=accelerator.is_main_process
    )
    del loaded
    folder = options.output_dir()
    if accelerator.is_main_process:
        write_out_of_reach(folder, out_of_reach)
        for message in out_of_reach.values():
            print(f"hirank compare: left out: {message}")
    results_path = folder / RESULTS_FILE
    ids = {plan.run_id for plan in plans}
    recorded = _recorded(results_path, ids, accelerator)
    pending = [plan for plan in plans if plan.run_id not in recorded]
    splits = _splits(task, options)
    pairs = general_text(options.general_text_pairs) if accelerator.is_main_process else []
    if accelerator.is_main_process:
        print(
            f"hirank compare: {options.model} on {task.name} ({len(splits.train)} train / {len(splits.validation)} "
            f"validation / {len(splits.test)} test), budget {options.budget} = {target:,} adapter parameters; "
            f"{len(pending)} of {len(plans)} runs to do → {results_path}"
        )
        for note in dict.fromkeys(plan.match.note for plan in plans if plan.match.note):
            print(f"hirank compare: note: {note}")
    progress = tqdm(
        total=len(pending),
        desc="runs",
        unit="run",
        bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}{postfix}]",  # tqdm's own ETA assumes equal runs
        disable=not accelerator.is_main_process,
    )
    run_seconds: dict[str, list[float]] = {}
    for record in recorded.values():
        if record.get("run_time_s") is not None:
            run_seconds.setdefault(record["method"], []).append(record["run_time_s"])
    # the base model's loss on the general text is the same for every run here (same model, texts and length)
    base_loss = next((r["general_loss_before"] for r in recorded.values() if r.get("general_loss_before") is not None), None)
    waiting_noted = False
    while pending:
        busy: list[RunPlan] = []
        for index, plan in enumerate(pending):
            left = [other.method_name for other in busy + pending[index:]]
            progress.set_postfix_str(eta_text(*estimate_remaining_s(left, run_seconds)))
            decision, claim = _claim(plan, folder, results_path, accelerator)
            if decision == "busy":
                busy.append(plan)
                continue
            try:
                if decision == "train":
                    record = _run(plan, options, task, splits, pairs, base_loss, accelerator)
                    if accelerator.is_main_process:
                        append_record(results_path, record)
                        base_loss = record.get("general_loss_before", base_loss)
                        run_seconds.setdefault(plan.method_name, []).append(record["run_time_s"])
            finally:
                if claim is not None:
                    claim.release()
            progress.update()
        if busy and len(busy) == len(pending):  # every remaining run is being trained by another process
            if accelerator.is_main_process and not waiting_noted:
                holders = sorted({RunClaim(folder, plan.run_id).holder() or "?" for plan in busy})
                print(
                    f"hirank compare: waiting for {len(busy)} run(s) that other processes are training "
                    f"(pid host: {', '.join(holders)}); a run whose process dies is taken over."
                )
                waiting_noted = True
            time.sleep(CLAIM_POLL_S)
        pending = busy
    progress.set_postfix_str("done")
    progress.close()
    if options.timing:
        _time_methods(options, task, splits, plans, accelerator)
    return [record for record in load_records(results_path, warn_skipped=False) if run_id(record) in ids]


TIMING_CLAIM = "timing-pass"  # the RunClaim name under which one process runs a folder's timing pass


def _time_methods(
    options: CompareOptions, task: Task, splits: Splits, plans: list[RunPlan], accelerator: Accelerator
) -> None:
    """The timing pass (:func:`hirank.bench.timing.timing_pass`) on the main process, for the methods of this
    comparison not yet timed beside LoRA (with LoRA again): one training step on the first ``batch_size``
    training examples, on the comparison's own model. Skipped while another process runs it."""
    if accelerator.is_main_process:
        folder = options.output_dir()
        by_key = {(plan.method_name, plan.config_hash): plan for plan in plans if not plan.is_reference}
        lora = next((key for key in by_key if key[0] == "lora"), None)
        claim = RunClaim(folder, TIMING_CLAIM)
        if untimed(by_key, lora, load_timings(folder)) and claim.try_acquire():
            try:
                missing = untimed(by_key, lora, load_timings(folder))  # as of now that we hold the claim
                if missing:
                    keys = ([lora] if lora is not None and lora not in missing else []) + missing
                    _run_timing_pass(options, task, splits, [by_key[key] for key in keys], accelerator.device)
            finally:
                claim.release()
    accelerator.wait_for_everyone()


def _run_timing_pass(
    options: CompareOptions, task: Task, splits: Splits, plans: list[RunPlan], device: torch.device
) -> None:
    set_seed(0)
    loaded = _load_here(options, task)  # main process only: the others wait
    collated = task.train_collator(loaded.tokenizer, options.max_length)(splits.train[: options.batch_size])
    inputs = {key: value.to(device) for key, value in collated.items()}
    base = loaded.model.to(device)

    def builder(plan: RunPlan) -> TimedModel:
        config = plan.method.make_config(loaded.target_modules, plan.match.knobs, modules_to_save=loaded.head_modules)
        return TimedModel(plan.method_name, plan.config_hash, lambda model: get_peft_model(model, config))

    names = ", ".join(plan.method_name for plan in plans)
    print(
        f"hirank compare: timing one training step of {names} side by side on a batch of "
        f"{'×'.join(map(str, inputs['input_ids'].shape))} tokens → {options.output_dir() / TIMING_FILE}"
    )
    timing_pass(base, [builder(plan) for plan in plans], inputs, options.output_dir(), device)


def _recorded(results_path: Path, ids: set[str], accelerator: Accelerator) -> dict[str, Record]:
    """The records of runs in ``ids`` already in the results file (read by the main process, shared with all)."""
    recorded: list[dict[str, Record]] = [{}]
    if accelerator.is_main_process:
        recorded = [{run_id(record): record for record in load_records(results_path) if run_id(record) in ids}]
    broadcast_object_list(recorded)
    return recorded[0]


def _claim(plan: RunPlan, folder: Path, results_path: Path, accelerator: Accelerator) -> tuple[str, RunClaim | None]:
    """Whether this comparison process must ``"train"`` ``plan``'s run (with the held claim on the main process),
    finds it ``"recorded"`` meanwhile, or finds it ``"busy"`` (another live process is training it). Decided by
    the main process, the same answer on every DDP process."""
    claim = RunClaim(folder, plan.run_id)
    decision = ["busy"]
    if accelerator.is_main_process:
        if plan.run_id in _recorded_ids(results_path):
            decision = ["recorded"]
        elif claim.try_acquire():
            # recorded between our look at the file and the claim: the other process finished it and let go
            decision = ["recorded" if plan.run_id in _recorded_ids(results_path) else "train"]
    broadcast_object_list(decision)
    if decision[0] != "train" or not accelerator.is_main_process:
        claim.release()
        return decision[0], None
    return decision[0], claim


def _recorded_ids(results_path: Path) -> set[str]:
    return {run_id(record) for record in load_records(results_path, warn_skipped=False)}  # warned once at start


def estimate_remaining_s(
    pending_methods: Sequence[str], run_seconds: Mapping[str, Sequence[float]]
) -> tuple[float, int]:
    """Seconds the pending runs (one method name each) will take, from each method's median measured run time,
    and how many pending runs are of a method not timed yet (not counted: the seconds are then a lower bound).

    Methods differ in speed by up to an order of magnitude, so one rate for all runs (tqdm's ETA) is off by
    hours early in a comparison.
    """
    seconds, untimed = 0.0, 0
    for method in pending_methods:
        if run_seconds.get(method):
            seconds += statistics.median(run_seconds[method])
        else:
            untimed += 1
    return seconds, untimed


def eta_text(seconds: float, untimed: int) -> str:
    """``"ETA 1:02:03"``; ``"ETA ≥ 0:05:00 (+3 runs not timed yet)"`` while some methods have no measured run."""
    clock = str(datetime.timedelta(seconds=round(seconds)))
    if not untimed:
        return f"ETA {clock}"
    if seconds == 0:
        return "ETA ?"
    return f"ETA ≥ {clock} (+{untimed} runs not timed yet)"


def _run(
    plan: RunPlan,
    options: CompareOptions,
    task: Task,
    splits: Splits,
    pairs: list[tuple[str, str]],
    base_loss: float | None,
    accelerator: Accelerator,
) -> Record:
    """Train one run on every process; the main process measures and returns its record (others: ``{}``).
    A diverged run is recorded without measurements and its adapter is not saved. ``base_loss``: the base
    model's loss on ``pairs`` if an earlier run measured it."""
    started = time.perf_counter()
    set_seed(plan.seed)  # head init, adapter init, data order, dropout
    loaded = _load(options, task, accelerator)
    train_config = TrainConfig(**plan.settings["train"])
    description = f"{plan.method_name} seed {plan.seed}"
    if plan.is_reference:
        model = _reference_model(loaded)
        adapter_params = 0
    else:
        config = plan.method.make_config(loaded.target_modules, plan.match.knobs, modules_to_save=loaded.head_modules)
        model = get_peft_model(loaded.model, config)
        adapter_params = adapter_parameters(model)
    if plan.method_name == ZERO_SHOT:
        result = evaluate_untrained(accelerator, model, loaded.tokenizer, task, splits, train_config, description)
        prepared = model
    else:
        result, prepared = train_and_evaluate(
            accelerator, model, loaded.tokenizer, task, splits, train_config, plan.seed, description
        )
    params_per_rank = gather_object([adapter_params])
    record: Record = {}
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(prepared)
        if result.diverged:
            print(
                f"hirank compare: {description} diverged at step {result.diverged_at_step} ({result.nonfinite} not "
                "finite): recorded as diverged, adapter not saved; going on."
            )
            measured = {"head_params": saved_module_parameters(trained)}
        elif plan.is_reference:  # no adapter: nothing to save, merge or rank; the base model is unchanged
            measured = {"head_params": sum(p.numel() for p in trained.parameters() if p.requires_grad)}
        else:
            measured = _measurements(trained, loaded, task, splits, pairs, base_loss, options, plan, accelerator)
        record = {
            "run_id": plan.run_id,
            "method": plan.method_name,
            "reference": plan.is_reference,
            "seed": plan.seed,
            "config_hash": plan.config_hash,
            "status": DIVERGED if result.diverged else FINISHED,
            **{
                key: plan.settings[key]
                for key in ("model", "task", "budget", "target_params", "knobs", "target_modules")
            },
            "trainable_params": adapter_params,
            "budget_relative_error": (adapter_params - plan.match.target) / plan.match.target,
            "budget_note": plan.match.note,
            "trainable_params_per_rank": params_per_rank,
            "world_size": accelerator.num_processes,
            "learning_rate": train_config.learning_rate,
            "learning_rate_source": plan.learning_rate_source,
            "train": plan.settings["train"],
            "train_examples": len(splits.train),
            "test_examples": len(splits.test),
            **baseline_accuracy(task, splits),
            **_training_fields(result),
            **measured,
            "versions": {
                "hirank": hirank.__version__,
                "peft": peft.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
            "device": f"{accelerator.device.type} ({platform.machine()}, {torch.get_num_threads()} threads)",
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "run_time_s": time.perf_counter() - started,  # load, train, measure, save: for the ETA
        }
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    del model, prepared, loaded
    gc.collect()
    return record


def _reference_model(loaded: LoadedModel) -> torch.nn.Module:
    """The base model with every parameter frozen except the new classification head (if it has one)."""
    model = loaded.model
    model.requires_grad_(False)
    for name in loaded.head_modules:
        model.get_submodule(name).requires_grad_(True)
    return model


def baseline_accuracy(task: Task, splits: Splits) -> Record:
    """The score of guessing, on the test split: the majority class of the training split (classification), or
    the mean of 1 / number of choices (multiple choice)."""
    if isinstance(task, ClassificationTask):
        labels = [example["label"] for example in splits.train]
        majority = max(set(labels), key=labels.count)
        share = sum(example["label"] == majority for example in splits.test) / len(splits.test)
        return {"baseline_accuracy": share, "baseline_kind": "majority class"}
    chance = statistics.fmean(1 / len(example["choices"]) for example in splits.test)
    return {"baseline_accuracy": chance, "baseline_kind": "chance"}


def _training_fields(result: TrainResult) -> Record:
    diverged = {"diverged_at_step": result.diverged_at_step, "diverged_quantity": result.nonfinite}
    return {
        **(diverged if result.diverged else {}),
        "test_accuracy": result.test_accuracy,
        "validation_accuracy": result.validation_accuracy,
        "best_epoch": None if result.diverged else result.best_epoch + 1,
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
    base_loss: float | None,
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
        **forgetting(model, loaded.tokenizer, task.kind, pairs, options.max_length, base_loss),
        **effective_rank_of_updates(model),
        **forward_times(model, timing_batch),
    }
