"""Shared peft glue for hirank tuners: a method only supplies its math.

A method provides three classes, as peft does for each tuner:

* a config: a dataclass subclassing :class:`HirankConfig` that adds the method's knobs;
* a layer: a subclass of :class:`HirankLayer` that creates its tensors in ``update_layer`` and
  implements ``delta_weight`` (dense ΔW, (out, in)) and ``adapter_output`` (the structured
  forward of the adapter branch);
* a model: a subclass of :class:`HirankModel` naming the layer class and the unique prefix.

Everything else (wrapping ``nn.Linear`` / transformers ``Conv1D``, clear errors for unknown
targets or layer types, fp32 merge with a single cast, into bitsandbytes 4-/8-bit weights too, unmerge,
several adapters, enabling and disabling) lives here once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from peft.config import PeftConfig
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..ops.merged import merged_linear
from ._loading import REQUIRES, warn_missing_fields, write_card_section
from ._validate import FieldCheck, is_integer
from .sharding import gathered_adapter_parameters, is_gathered, like_base_weight

SUPPORTED_LAYER_TYPES = (nn.Linear, Conv1D)


def drops_inputs(dropout: nn.Module) -> bool:
    """Whether an adapter's dropout changes its input in this forward (then its branch reads another x than the
    base layer, and cannot be folded into the base product)."""
    return isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0


@dataclass
class HirankConfig(PeftConfig):
    """Fields every hirank method shares with peft's LoRA config (see peft's ``LoraConfig``).

    Loading a saved hirank adapter needs ``import hirank`` first (it registers the HIRANK_* peft types; without
    it peft raises ``KeyError: 'HIRANK_...'``). The saved folder says so: adapter_config.json holds
    ``hirank_version`` and ``requires``, and its README.md model card has a loading section. A saved config
    that lacks one of the method's fields loads with the default and a warning naming the field.
    """

    #: Fields that describe the file, not the adapter: a file without them loads without a warning.
    informational_fields = ("hirank_version", "requires")

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (exact names or dotted suffixes, e.g. ['query', 'value']) or one regex to adapt. "
            "With a list, every name must match at least one module, else get_peft_model raises."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave alone."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules other than the adapters to train and save (e.g. a new classifier head)."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list used with layers_to_transform (e.g. 'layers')."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the method's paper init, with ΔW = 0 so the model starts unchanged. "
            "False: a random non-zero ΔW (for tests and experiments)."
        },
    )

    hirank_version: Optional[str] = field(
        default=None, metadata={"help": "The hirank version that wrote this config (filled in automatically)."}
    )
    requires: str = field(
        default=REQUIRES,
        metadata={"help": "What loading this adapter needs (informational; always set to hirank's current text)."},
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> HirankConfig:
        if "peft_type" in kwargs:  # built from a saved adapter_config.json: peft passes every stored key
            warn_missing_fields(cls, kwargs, cls.informational_fields)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hirank_version is None:
            from .. import __version__

            self.hirank_version = __version__
        check = FieldCheck(self)
        if not isinstance(self.hirank_version, str):
            check.fail("hirank_version", "None or a version string")
        if not isinstance(self.requires, str):
            check.fail("requires", "a string (informational: hirank writes its own text)")
        self.requires = REQUIRES
        for name in ("target_modules", "exclude_modules"):
            check.module_names(name)
        check.module_names("modules_to_save", allow_string=False, expected="None or a list of module names")
        layers = "None, a layer index ≥ 0 or a non-empty list of them"
        if is_integer(self.layers_to_transform):
            self.layers_to_transform = check.integer("layers_to_transform", minimum=0, expected=layers)
        else:
            self.layers_to_transform = check.integers("layers_to_transform", min_length=1, minimum=0, expected=layers)
        check.module_names("layers_pattern", expected="None, a name or a list of names (e.g. 'layers')")
        check.flag("init_weights", "True (the paper's init: ΔW = 0, the model starts unchanged) or False (random "
                   "ΔW ≠ 0); hirank has no named inits such as 'gaussian'")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a regex string.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a regex string.")

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """adapter_config.json (every field, by peft), plus the loading section of the folder's README.md."""
        super().save_pretrained(save_directory, **kwargs)
        write_card_section(save_directory, str(self.peft_type), type(self).__name__)


def module_name_matches(module_name: str, key: str) -> bool:
    """peft's rule for a listed target name: the module's full name is ``key`` or ends with ``.key``."""
    return module_name == key or module_name.endswith("." + key)


def layer_dims(base_layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a supported layer; TypeError otherwise."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features, False
    if isinstance(base_layer, Conv1D):  # GPT-2 style: weight is stored (in, out)
        in_features, out_features = base_layer.weight.shape
        return in_features, out_features, True
    supported = ", ".join(t.__module__ + "." + t.__name__ for t in SUPPORTED_LAYER_TYPES)
    raise TypeError(f"layer type {type(base_layer).__name__} is not supported; supported types: {supported}.")


def quantized_weight_kind(base_layer: nn.Module) -> Optional[str]:
    """"4bit" or "8bit" for a bitsandbytes-quantized weight (``Linear4bit``, ``Linear8bitLt``), else None."""
    weight = base_layer.weight
    kind = get_bnb_param_type(weight)
    if kind == "8bit" and weight.dtype != torch.int8:  # Int8Params(has_fp16_weights=True) holds a float weight
        return None
    return kind or None


def check_weight_storage(base_layer: nn.Module) -> None:
    """TypeError unless hirank can read and merge into the layer's weight: a float tensor or bitsandbytes 4/8-bit."""
    weight = base_layer.weight
    if weight.dtype.is_floating_point or quantized_weight_kind(base_layer) is not None:
        return
    raise TypeError(
        f"its weight is stored as {type(weight).__name__} of {weight.dtype} ({type(base_layer).__name__}), which hirank "
        "cannot merge into. Supported: float weights and bitsandbytes Linear4bit / Linear8bitLt."
    )


def _packed_for_cpu_kernel(weight: nn.Parameter) -> bool:
    """Whether bitsandbytes repacked this 4-bit weight for its AVX512-BF16 CPU kernel (done in place on the first
    eval forward on such a CPU; ``dequantize_4bit`` reads only the portable layout)."""
    return getattr(weight.quant_state, "packing_format_for_cpu", False)


def _restore_portable_4bit_layout(weight: nn.Parameter) -> None:
    """Undo bitsandbytes' CPU-kernel packing in place, keeping exactly the bf16 absmax the kernel computes with.

    bitsandbytes' own inverse restores the codes, but leaves a plain absmax as the kernel's transposed
    (in / blocksize, out) matrix and re-quantizes a double-quantized one, a lossy step (0.50.2).
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # the only inverse bitsandbytes has

    absmax = weight.quant_state.absmax.T.reshape(-1).float()  # blocks in row-major order, as quantize_4bit lays them
    weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    state.absmax, state.nested, state.offset, state.state2 = absmax, False, None, None
    weight.quant_state = state


def merge_weight_dtype(base_layer: nn.Module) -> torch.dtype:
    """The dtype of the layer's weight as ΔW is added to it (what a quantized weight dequantizes to)."""
    kind = quantized_weight_kind(base_layer)
    if kind == "4bit":
        state = base_layer.weight.quant_state
        return state.original_dtype if _packed_for_cpu_kernel(base_layer.weight) else state.dtype
    return torch.float32 if kind == "8bit" else base_layer.weight.dtype


def dense_base_weight(base_layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense float tensor in its stored layout (bitsandbytes weights dequantized; a
    4-bit weight packed for bitsandbytes' CPU kernel is first returned to the portable layout)."""
    kind = quantized_weight_kind(base_layer)
    if kind is None:
        return base_layer.weight.data
    if kind == "4bit" and _packed_for_cpu_kernel(base_layer.weight):
        _restore_portable_4bit_layout(base_layer.weight)
    state = base_layer.weight.quant_state if kind == "4bit" else base_layer.state
    return dequantize_bnb_weight(base_layer.weight, state=state).to(merge_weight_dtype(base_layer))


def store_base_weight(base_layer: nn.Module, weight: torch.Tensor) -> None:
    """Write a dense float weight back: cast once to the stored dtype, or requantize a bitsandbytes weight
    with its own settings (peft's ``lora/bnb.py`` merge)."""
    kind = quantized_weight_kind(base_layer)
    old = base_layer.weight
    if kind is None:
        old.data.copy_(weight)  # in place: FSDP2 all-gathers from the storage it sharded
        return
    import bitsandbytes as bnb

    if kind == "4bit":
        settings = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
        settings.update(requires_grad=False, bnb_quantized=False)
        dense = weight.to(merge_weight_dtype(base_layer)).to("cpu")
        base_layer.weight = bnb.nn.Params4bit(dense, **settings).to(old.device)
    else:
        dense = weight.to("cpu")
        base_layer.weight = bnb.nn.Int8Params(dense, requires_grad=False, has_fp16_weights=False).to(old.device)
        base_layer.state.reset_grads()


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters keep at least float32 master weights (float64 stays float64)."""
    return torch.promote_types(base_dtype, torch.float32) if base_dtype.is_floating_point else torch.float32


class HirankLayer(nn.Module, BaseTunerLayer):
    """A wrapped ``nn.Linear``/``Conv1D`` plus additive adapters ``y = base(x) + Σ_active branch(x)``.

    Subclasses set ``adapter_layer_names`` (trainable ``ParameterDict``s keyed by adapter name, names
    starting with the method prefix), ``other_param_names`` (per-adapter settings and frozen
    buffers) and implement ``update_layer``, ``delta_weight`` and ``adapter_output``.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    #: False for methods whose adapter depends on the input non-linearly (merge then raises).
    mergeable: bool = True
    #: Why the adapter cannot be merged (shown in the error), for non-mergeable methods.
    not_mergeable_reason: str = ""
    #: True for methods that implement ``fused_output`` (one product with W₀ + ΔW where their cost model says so).
    fuses_delta: bool = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: HirankConfig, **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self.in_features, self.out_features, self.fan_in_fan_out = layer_dims(self.get_base_layer())
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    # ---- what a method implements -------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: HirankConfig, **kwargs: Any) -> None:
        """Create the tensors of ``adapter_name`` (then call ``self._finish_update_layer``)."""
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ΔW of shape (out_features, in_features) in the adapter's dtype (≥ float32)."""
        raise NotImplementedError

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The adapter branch's contribution to the output, shape (..., out_features), for input x."""
        raise NotImplementedError

    # ---- shared machinery ---------------------------------------------------------------------
    def _finish_update_layer(self, adapter_name: str, config: HirankConfig) -> None:
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Move the adapter to the base layer's device; keep float32 master weights under a half base."""
        weight = self.get_base_layer().weight
        device = device if device is not None else weight.device
        dtype = adapter_dtype(weight.dtype)
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if not isinstance(container, (nn.ParameterDict, nn.ModuleDict, BufferDict)) or adapter_name not in container:
                continue
            item = container[adapter_name]
            if getattr(item, "device", None) == torch.device("meta"):
                continue
            is_float = getattr(item, "dtype", torch.float32).is_floating_point
            container[adapter_name] = item.to(device, dtype=dtype) if is_float else item.to(device)

    def _adapter_names(self) -> set[str]:
        return set(getattr(self, self.adapter_layer_names[0]).keys())

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ΔW in the base weight's layout and dtype (peft's convention; Conv1D is transposed).
        For a bitsandbytes 4-/8-bit base, the dtype its weight dequantizes to."""
        with gathered_adapter_parameters(self):
            delta = self._delta_in_weight_layout(adapter_name)
        return delta.to(merge_weight_dtype(self.get_base_layer()))

    def _delta_in_weight_layout(self, adapter_name: str) -> torch.Tensor:
        delta = self.delta_weight(adapter_name)
        return delta.T if self.fan_in_fan_out else delta

    def _check_mergeable(self) -> None:
        if not self.mergeable:
            raise ValueError(f"{type(self).__name__} cannot be merged: {self.not_mergeable_reason}")

    def _add_to_base_weight(self, adapter_name: str, sign: float, safe_merge: bool = False) -> None:
        """W ← W + sign·ΔW, summed in float32 (at least) and stored back once (requantized for bitsandbytes)."""
        base_layer = self.get_base_layer()
        weight = dense_base_weight(base_layer)
        delta = self._delta_in_weight_layout(adapter_name)
        accumulate = torch.promote_types(weight.dtype, delta.dtype)
        merged = weight.to(accumulate) + sign * like_base_weight(delta.to(weight.device, accumulate), weight)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs or infs detected in the merged weights; adapter {adapter_name!r} seems broken.")
        store_base_weight(base_layer, merged)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add ΔW of the given (default: active) adapters to the base weight: fp32 sum, then one cast.
        A bitsandbytes 4-/8-bit weight is dequantized, summed in float32 and requantized (as peft's LoRA does),
        so merged outputs match unmerged ones up to the quantization error. Under FSDP2 / ZeRO-3 every rank must
        call it (the adapter is gathered, each rank edits its shard)."""
        self._check_mergeable()
        adapter_names = check_adapters_to_merge(self, adapter_names)
        with gathered_adapter_parameters(self):
            for name in adapter_names:
                if name not in self._adapter_names():
                    continue
                self._add_to_base_weight(name, 1.0, safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ΔW again (in the same fp32-then-cast way)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        with gathered_adapter_parameters(self):
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name in self._adapter_names():
                    self._add_to_base_weight(name, -1.0)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        name = self._fusable_adapter(x) if self.fuses_delta and not (args or kwargs) else None
        fused = None if name is None else self.fused_output(x, name)
        if fused is not None:  # one product with W₀ + ΔW (ops/merged.py: 3 GEMMs per step instead of 5)
            return fused
        return self._adapted_output(self.base_layer(x, *args, **kwargs), x)

    # ---- one product with the merged weight, where a method builds ΔW densely for the step -------------------
    def fused_output(self, x: torch.Tensor, adapter_name: str) -> Optional[torch.Tensor]:
        """The layer's output as one product x·(W₀ + ΔW)ᵀ + b (e.g. :meth:`merged_product`), where the method's
        cost model prefers it to a separate branch for ``x``; None (the default): base output plus the branch."""
        return None

    def merged_product(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x·(W₀ + ΔW)ᵀ + b for a differentiable ΔW (out_features, in_features) built for this forward."""
        base = self.base_layer
        return merged_linear(x, base.weight, base.bias, delta)

    def base_runs_as_product(self, types: tuple[type, ...] = (nn.Linear,)) -> bool:
        """Whether the layer may compute the base layer's output as its own product with the base weight instead of
        calling it: the base is exactly one of ``types`` (not a subclass such as bitsandbytes'), without hooks or a
        patched forward, and its weight is a plain whole tensor (no DTensor or quantized tensor subclass, not a
        FSDP / ZeRO-3 shard)."""
        base = self.base_layer
        return type(base) in types and not base._forward_hooks and not base._forward_pre_hooks \
            and "forward" not in base.__dict__ and type(base.weight) in (nn.Parameter, torch.Tensor) \
            and is_gathered(base.weight, self.in_features * self.out_features)

    def _fusable_adapter(self, x: torch.Tensor) -> Optional[str]:
        """The layer's one active unmerged adapter when its ΔW may be folded into the base product: the base is a
        plain ``nn.Linear`` (:meth:`base_runs_as_product`) with a weight of the adapter's dtype (float32 or float64:
        hirank keeps at least float32 adapters, and a half-precision W₀ + ΔW would round a small ΔW away), as x
        has, outside autocast. Else None."""
        names = [name for name in self.active_adapters if name in self._adapter_names()]
        if self.merged or len(names) != 1 or not self.base_runs_as_product() \
                or torch.is_autocast_enabled(x.device.type):
            return None
        weight = self.base_layer.weight
        tensors = [getattr(self, attr)[names[0]] for attr in self.adapter_layer_names
                   if names[0] in getattr(self, attr)]
        if x.dtype != weight.dtype or any(tensor.dtype != weight.dtype for tensor in tensors):
            return None
        return names[0]

    def _adapted_output(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The layer's output with adapters on, from the base layer's (merged weights included) output ``result``.
        Additive methods add each active unmerged branch; a method that also edits the output overrides this."""
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self._adapter_names():
                result = result + self.adapter_output(x, name).to(result.dtype)
        return result

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return self.mergeable

    def __repr__(self) -> str:
        return f"{self.__class__.__module__.split('.')[-2]}.{super().__repr__()}"


class HirankModel(BaseTuner):
    """peft tuner for a hirank method: injects ``layer_cls`` into the targeted modules."""

    prefix: str
    tuner_layer_cls: type[HirankLayer]
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _pre_injection_hook(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        """peft silently ignores a listed target that matches nothing; hirank raises instead."""
        targets = config.target_modules
        if not isinstance(targets, (list, set, tuple)):
            return
        names = [name for name, _ in model.named_modules() if name]
        missing = sorted(t for t in targets if not any(module_name_matches(n, t) for n in names))
        if missing:
            leaf_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                 if n and isinstance(m, SUPPORTED_LAYER_TYPES)})
            raise ValueError(
                f"target_modules {missing} match no module of {type(model).__name__}. "
                f"Adaptable (Linear/Conv1D) module names in this model: {leaf_names}."
            )

    def _create_and_replace(
        self,
        config: HirankConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        try:
            if isinstance(target, self.tuner_layer_cls):
                target.update_layer(adapter_name, config, module_name=current_key)
                return
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            if not isinstance(base, SUPPORTED_LAYER_TYPES):
                raise TypeError(
                    f"it is a {type(base).__name__}, which {type(self).__name__.removesuffix('Model')} does not "
                    "support. Target nn.Linear or transformers Conv1D modules instead (e.g. the attention projections)."
                )
            check_weight_storage(base)
            new_module = self.tuner_layer_cls(target, adapter_name, config, module_name=current_key)
        except (TypeError, ValueError) as error:  # say which module, whatever the method objected to
            raise type(error)(f"Cannot adapt module {current_key!r}: {error}") from error
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
