"""LoRATRF tuner: injects :class:`LoraTRFLayer` into the targeted Linear / Conv1D modules."""

from __future__ import annotations

from typing import Any

from peft.config import PeftConfig
from torch import nn

from ..base import HirankModel, module_name_matches
from .config import LoraTRFConfig
from .layer import LoraTRFLayer


class LoraTRFModel(HirankModel):
    """Creates LoRATRF adapters on a model (use through ``peft.get_peft_model`` with a ``LoraTRFConfig``)."""

    prefix = "loratrf_"
    tuner_layer_cls = LoraTRFLayer

    def _shared_task_vectors(self) -> dict[str, tuple[str, nn.Parameter]]:
        """adapter name → (first module, its task vector), for ``share_task_vector=True``."""
        return self.__dict__.setdefault("_loratrf_shared_task_vectors", {})

    def _create_and_replace(
        self,
        config: LoraTRFConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        super()._create_and_replace(config, adapter_name, target, target_name, parent, current_key, **optional_kwargs)
        layer = getattr(parent, target_name)
        if not config.share_task_vector or adapter_name not in layer.loratrf_filter:
            return
        task_filter = layer.loratrf_filter[adapter_name]
        first_module, shared = self._shared_task_vectors().setdefault(
            adapter_name, (current_key, task_filter.task_vector)
        )
        if shared.shape != task_filter.task_vector.shape:
            raise ValueError(
                f"Cannot adapt module {current_key!r}: share_task_vector=True needs one output width for all filtered "
                f"modules, but {current_key!r} has {layer.out_features} and {first_module!r} has {shared.shape[0]}. "
                "Restrict filter_modules to modules of one width (e.g. ['o_proj', 'down_proj'], which write into "
                "the residual stream), or set share_task_vector=False."
            )
        task_filter.task_vector = shared

    def _post_injection_hook(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        """A name in ``filter_modules`` that matches no adapted module is an error, never a silent no-op."""
        if not isinstance(config.filter_modules, list):
            return
        filtered = [name for name, module in model.named_modules()
                    if isinstance(module, LoraTRFLayer) and adapter_name in module.loratrf_filter]
        missing = [f for f in config.filter_modules if not any(module_name_matches(n, f) for n in filtered)]
        if missing:
            adapted = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                              if isinstance(module, LoraTRFLayer)})
            raise ValueError(
                f"filter_modules {missing} match no adapted module; the filter sits on adapted modules only. "
                f"Adapted module names: {adapted} (add the module to target_modules, or drop it from filter_modules)."
            )

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._shared_task_vectors().pop(adapter_name, None)
