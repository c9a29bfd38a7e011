"""The one place that touches peft's registries.

peft's own ``register_peft_method`` only accepts names of its closed ``PeftType`` enum, so hirank
keys its methods by members of its own ``str`` Enum (transformers' ``load_adapter`` calls
``peft_type.value``; a bare string would break it) and writes them into peft's three mappings
directly. Registration is idempotent and refuses to overwrite an entry that is not hirank's.
"""

from __future__ import annotations

import enum
import importlib

import peft.mapping


class HirankPeftType(str, enum.Enum):
    """peft_type of every hirank method (the value is what adapter_config.json stores)."""

    QUANTA = "HIRANK_QUANTA"
    QUANTUM_PEFT = "HIRANK_QUANTUM_PEFT"
    MTLORA = "HIRANK_MTLORA"
    LORATRF = "HIRANK_LORATRF"
    SURM = "HIRANK_SURM"

    def __str__(self) -> str:  # json.dumps and f-strings show the plain value
        return self.value


# (peft_type, module, config class, tuner class). Adding a method to hirank is one line here.
_METHODS: tuple[tuple[HirankPeftType, str, str, str], ...] = (
    (HirankPeftType.QUANTA, "hirank.tuners.quanta", "QuantaConfig", "QuantaModel"),
    (HirankPeftType.SURM, "hirank.tuners.surm", "SurmConfig", "SurmModel"),
    (HirankPeftType.QUANTUM_PEFT, "hirank.tuners.quantum_peft", "QuantumPeftConfig", "QuantumPeftModel"),
    (HirankPeftType.MTLORA, "hirank.tuners.mtlora", "MTLoraConfig", "MTLoraModel"),
    (HirankPeftType.LORATRF, "hirank.tuners.loratrf", "LoraTRFConfig", "LoraTRFModel"),
)


def _is_hirank(obj: object) -> bool:
    return getattr(obj, "__module__", "").split(".")[0] == "hirank"


def register_method(peft_type: HirankPeftType, config_cls: type, model_cls: type) -> None:
    """Register one method with peft; re-registering hirank's own entry replaces it in place."""
    config_map = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    tuner_map = peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING
    prefix_map = peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING
    prefix = model_cls.prefix
    taken = peft_type in config_map or peft_type in tuner_map or peft_type in prefix_map
    if taken and not (_is_hirank(config_map.get(peft_type)) and _is_hirank(tuner_map.get(peft_type))):
        raise RuntimeError(
            f"peft already has a method registered as {peft_type.value!r} that is not hirank's "
            f"({config_map.get(peft_type)!r}); refusing to overwrite it."
        )
    for other_type, other_prefix in prefix_map.items():
        if other_prefix == prefix and other_type != peft_type:
            raise RuntimeError(
                f"prefix {prefix!r} of hirank method {peft_type.value} is already used by peft method {other_type}."
            )
    # Drop a stale key first (e.g. after importlib.reload created a new Enum member with the same value),
    # so that each method has exactly one entry.
    for mapping, new in ((config_map, config_cls), (tuner_map, model_cls), (prefix_map, prefix)):
        mapping.pop(peft_type, None)
        mapping[peft_type] = new


def register_all() -> None:
    """Register every hirank method with peft (called by ``import hirank``)."""
    for peft_type, module_name, config_name, model_name in _METHODS:
        module = importlib.import_module(module_name)
        register_method(peft_type, getattr(module, config_name), getattr(module, model_name))
