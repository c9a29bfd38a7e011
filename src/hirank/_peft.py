"""The one place that touches peft's registries.

peft's own ``register_peft_method`` only accepts names of its closed ``PeftType`` enum, so hirank
keys its methods by members of its own ``str`` Enum (transformers' ``load_adapter`` calls
``peft_type.value``; a bare string would break it) and writes them into peft's three mappings
directly. Registration is idempotent and refuses to overwrite an entry that is not hirank's.

``import hirank`` registers at once when peft is already imported, else as soon as peft finishes importing
(:func:`register_when_peft_loads`), so that ``import hirank`` (and the ``hirank`` command's ``--help``)
needs neither peft nor torch. This module imports peft only inside its functions for the same reason.
"""

from __future__ import annotations

import enum
import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType


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
    import peft.mapping

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
    """Register every hirank method in this build with peft (called by ``import hirank``)."""
    for peft_type, module_name, config_name, model_name in _METHODS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:  # a method left out of this build (hirank.bench lists it as unavailable)
            if error.name != module_name:
                raise
            continue
        register_method(peft_type, getattr(module, config_name), getattr(module, model_name))


class _RegisterAfterPeft(importlib.abc.MetaPathFinder):
    """Finds nothing itself: gives peft's own spec a loader that runs :func:`register_all` once peft's
    ``__init__`` has run (the same technique as ``wrapt``'s post-import hooks)."""

    def find_spec(self, fullname: str, path: object = None, target: ModuleType | None = None):
        if fullname != "peft":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # peft's module keeps its real loader (importlib.resources and inspect ask it)
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _remove_hook()
        register_all()

    def __getattr__(self, name: str) -> object:  # anything else a loader offers: the real loader's
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


def _remove_hook() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterAfterPeft)]


def register_when_peft_loads() -> None:
    """Register now if peft is imported, else right after peft's import (called by ``import hirank``).

    The modules :func:`register_all` imports must not be the ones that first import peft (they would be
    half-initialized when the hook runs): ``hirank.tuners`` imports peft before any of its submodules.
    """
    if "peft" in sys.modules:
        _remove_hook()
        register_all()
    elif not any(isinstance(finder, _RegisterAfterPeft) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeft())
