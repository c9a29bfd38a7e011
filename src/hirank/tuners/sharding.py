"""Adapter parameters held by a sharding wrapper (torch FSDP2 ``fully_shard``, DeepSpeed ZeRO-3).

Outside a module's own forward, FSDP2 keeps each parameter as a sharded ``DTensor`` and ZeRO-3 as an empty
placeholder. A hirank layer reads its adapter parameters outside its forward in two places: building ΔW
(merge, unmerge, ``get_delta_weight``) and Quantum-PEFT's shared circuit batch (which skips sharded layers,
see :func:`is_gathered`). :func:`gathered_adapter_parameters` makes them whole local tensors for the first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft.utils.integrations import gather_params_ctx
from torch import nn

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor, distribute_tensor

    _DTENSOR_TYPES: tuple[type, ...] = (DTensor,)
else:  # a torch build without torch.distributed has no DTensor
    _DTENSOR_TYPES = ()


def is_gathered(parameter: torch.Tensor, numel: int) -> bool:
    """False while a sharding wrapper holds ``parameter``: FSDP2's sharded DTensor, or the empty placeholder of
    FSDP1 (flat parameters) and DeepSpeed ZeRO-3."""
    return not isinstance(parameter, _DTENSOR_TYPES) and parameter.numel() == numel


@contextlib.contextmanager
def gathered_adapter_parameters(layer: nn.Module) -> Iterator[None]:
    """Inside the block every parameter of ``layer`` but its base layer's is a whole local tensor.

    FSDP2: each sharded DTensor is swapped for its ``full_tensor()`` (a collective: every rank must enter, as
    every rank calls ``merge``) and swapped back on exit. DeepSpeed ZeRO-3: peft's ``gather_params_ctx`` gathers
    all of the layer's parameters, base weight included, and rank 0's edits are kept (peft's LoRA does the same).
    Unsharded: nothing happens.
    """
    base_modules = {id(module) for module in layer.get_base_layer().modules()}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    for module in layer.modules():
        if id(module) in base_modules:
            continue
        for name, parameter in module.named_parameters(recurse=False):
            if isinstance(parameter, _DTENSOR_TYPES):
                swapped.append((module, name, parameter))
                module._parameters[name] = nn.Parameter(parameter.full_tensor(), parameter.requires_grad)
    try:
        with gather_params_ctx(list(layer.parameters()), modifier_rank=0):
            yield
    finally:
        for module, name, parameter in swapped:
            module._parameters[name] = parameter


def like_base_weight(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``delta`` (full, as every rank computed it) laid out as ``weight``: under FSDP2 this rank's shard as a
    DTensor (cut locally, no communication), else ``delta`` itself."""
    if isinstance(weight, _DTENSOR_TYPES) and not isinstance(delta, _DTENSOR_TYPES):
        return distribute_tensor(delta, weight.device_mesh, weight.placements, src_data_rank=None)
    return delta
