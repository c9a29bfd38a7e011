"""Every field of every hirank config is validated in ``__post_init__`` with a one-line error naming the config,
the field, what is allowed and the value; what ``save_pretrained`` writes (JSON: lists, whole numbers) loads back."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import peft
import pytest

import hirank
from hirank.tuners.base import HirankConfig

CONFIGS = (hirank.QuantaConfig, hirank.QuantumPeftConfig, hirank.MTLoraConfig, hirank.LoraTRFConfig,
           hirank.SurmConfig)

# fields every hirank config shares (HirankConfig), with values that must be refused
COMMON_BAD = [
    ("target_modules", 5), ("target_modules", ["query", 3]),
    ("exclude_modules", 3.0),
    ("modules_to_save", "classifier"), ("modules_to_save", [None]),
    ("layers_to_transform", -1), ("layers_to_transform", True), ("layers_to_transform", [0, "1"]),
    ("layers_to_transform", []), ("layers_to_transform", 1.0),
    ("layers_pattern", 3), ("layers_pattern", ["layers", 0]),
    ("init_weights", "gaussian"), ("init_weights", "pissa"), ("init_weights", 1), ("init_weights", None),
    ("hirank_version", 1), ("requires", 3),
]

# (config, field, value that must be refused): each field of each method at least once
METHOD_BAD = [
    (hirank.QuantaConfig, "n_axes", 1), (hirank.QuantaConfig, "n_axes", "4"), (hirank.QuantaConfig, "n_axes", True),
    (hirank.QuantaConfig, "n_axes", 4.0),
    (hirank.QuantaConfig, "factors", "88"), (hirank.QuantaConfig, "factors", [8]), (hirank.QuantaConfig, "factors", [8, 0]),
    (hirank.QuantaConfig, "factors", [8, 8.0]), (hirank.QuantaConfig, "factors", [True, 8]),
    (hirank.QuantaConfig, "out_factors", "88"), (hirank.QuantaConfig, "out_factors", [4, -2]),
    (hirank.QuantaConfig, "pad", "no"), (hirank.QuantaConfig, "pad", 0),
    (hirank.QuantaConfig, "dropout", 1.0), (hirank.QuantaConfig, "dropout", -0.1),
    (hirank.QuantaConfig, "dropout", math.nan), (hirank.QuantaConfig, "dropout", "0.1"),
    (hirank.QuantaConfig, "fold_frozen_copy", "yes"), (hirank.QuantaConfig, "fold_frozen_copy", 1),
    (hirank.QuantumPeftConfig, "rank", 0), (hirank.QuantumPeftConfig, "rank", True),
    (hirank.QuantumPeftConfig, "rank", "8"),
    (hirank.QuantumPeftConfig, "n_layers", -1), (hirank.QuantumPeftConfig, "n_layers", 1.5),
    (hirank.QuantumPeftConfig, "scale", math.nan), (hirank.QuantumPeftConfig, "scale", math.inf),
    (hirank.QuantumPeftConfig, "scale", -math.inf), (hirank.QuantumPeftConfig, "scale", 0.0),
    (hirank.QuantumPeftConfig, "scale", "1"), (hirank.QuantumPeftConfig, "scale", True),
    (hirank.QuantumPeftConfig, "rank_mask", [1] * 7), (hirank.QuantumPeftConfig, "rank_mask", [1] * 7 + [2]),
    (hirank.QuantumPeftConfig, "rank_mask", [0] * 8), (hirank.QuantumPeftConfig, "rank_mask", "11111111"),
    (hirank.MTLoraConfig, "r", 0), (hirank.MTLoraConfig, "r", True), (hirank.MTLoraConfig, "r", 8.0),
    (hirank.MTLoraConfig, "lora_alpha", 0), (hirank.MTLoraConfig, "lora_alpha", -8),
    (hirank.MTLoraConfig, "lora_alpha", math.nan), (hirank.MTLoraConfig, "lora_alpha", "16"),
    (hirank.MTLoraConfig, "lora_dropout", 1.0), (hirank.MTLoraConfig, "lora_dropout", math.inf),
    (hirank.MTLoraConfig, "variant", "multitask"), (hirank.MTLoraConfig, "variant", ["icfm"]),
    (hirank.MTLoraConfig, "init_T", "eye"),
    (hirank.LoraTRFConfig, "r", True), (hirank.LoraTRFConfig, "r", -1),
    (hirank.LoraTRFConfig, "lora_alpha", 0), (hirank.LoraTRFConfig, "lora_alpha", math.inf),
    (hirank.LoraTRFConfig, "lora_dropout", -1e-3),
    (hirank.LoraTRFConfig, "filter_rank", 0), (hirank.LoraTRFConfig, "filter_rank", "8"),
    (hirank.LoraTRFConfig, "similarity", "l2"), (hirank.LoraTRFConfig, "filter_transform", "circulant"),
    (hirank.LoraTRFConfig, "filter_modules", 3), (hirank.LoraTRFConfig, "filter_modules", ["o_proj", 1]),
    (hirank.LoraTRFConfig, "filter_modules", []),
    (hirank.LoraTRFConfig, "share_task_vector", "yes"), (hirank.LoraTRFConfig, "share_task_vector", 1),
    (hirank.LoraTRFConfig, "filter_positions", "first3"), (hirank.LoraTRFConfig, "filter_positions", 3),
    (hirank.SurmConfig, "structure", "lowrank"), (hirank.SurmConfig, "placement", "prefix"),
    (hirank.SurmConfig, "alpha", 0.0), (hirank.SurmConfig, "alpha", math.nan), (hirank.SurmConfig, "alpha", "1"),
    (hirank.SurmConfig, "displacement_rank", 0), (hirank.SurmConfig, "displacement_rank", True),
    (hirank.SurmConfig, "kronecker_factor", 0), (hirank.SurmConfig, "kronecker_factor", 2.0),
    (hirank.SurmConfig, "adapter_activation", "sigmoid"),
    (hirank.SurmConfig, "dropout", 1.0), (hirank.SurmConfig, "dropout", math.nan),
]

BAD = [(cls, name, value) for cls in CONFIGS for name, value in COMMON_BAD] + METHOD_BAD


def _hirank_fields(cls: type) -> set[str]:
    """The fields hirank declares (HirankConfig's and the method's), not peft's own PeftConfig fields."""
    peft_fields = {f.name for f in dataclasses.fields(peft.PeftConfig)}
    return {f.name for f in dataclasses.fields(cls) if f.init} - peft_fields


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_a_bad_value_in_the_table(cls):
    tested = {name for c, name, _ in BAD if c is cls}
    assert _hirank_fields(cls) - tested == set(), "add a bad value for these fields to the table"


@pytest.mark.parametrize("cls, name, value", BAD, ids=lambda v: getattr(v, "__name__", repr(v)))
def test_a_bad_value_is_refused_in_one_line_naming_the_field_and_value(cls, name, value):
    with pytest.raises(ValueError) as raised:
        cls(**{"target_modules": ["query"], name: value})
    message = str(raised.value)
    assert "\n" not in message
    assert re.match(rf"{cls.__name__}: {name}[ =]", message), message
    assert repr(value) in message or (isinstance(value, list) and not value), message


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name, value, stored", [
    ("target_modules", ("query", "value"), {"query", "value"}),
    ("target_modules", {"query"}, {"query"}),
    ("target_modules", r".*\.query", r".*\.query"),
    ("layers_to_transform", np.int64(1), 1),
    ("layers_to_transform", (0, 1), [0, 1]),
    ("layers_pattern", "layer", "layer"),
    ("init_weights", False, False),
])
def test_accepted_forms_are_normalized_to_plain_python(cls, name, value, stored):
    config = cls(**{"target_modules": ["query"], name: value})
    assert getattr(config, name) == stored and type(getattr(config, name)) is type(stored)


@pytest.mark.parametrize("cls, knobs", [
    (hirank.QuantaConfig, {"factors": (4, np.int64(4), 4), "out_factors": [4, 4, 4], "pad": True, "dropout": 0}),
    (hirank.QuantumPeftConfig, {"rank": np.int32(4), "n_layers": 0, "scale": -0.5, "rank_mask": (1, 0, 1, 1)}),
    (hirank.MTLoraConfig, {"r": 4, "lora_alpha": np.float32(2.5), "lora_dropout": 0.1, "variant": "dtsm",
                           "init_T": "zeros"}),
    (hirank.LoraTRFConfig, {"r": 2, "lora_alpha": 16, "filter_rank": 3, "similarity": "dot",
                            "filter_modules": {"o_proj", "down_proj"}, "share_task_vector": True,
                            "filter_positions": "f2+l3", "filter_transform": "dense"}),
    (hirank.SurmConfig, {"structure": "kronecker", "placement": "adapter", "alpha": -2, "kronecker_factor": 4,
                         "adapter_activation": "tanh", "dropout": 0.15}),
], ids=lambda v: getattr(v, "__name__", ""))
def test_what_save_writes_loads_back_equal(cls, knobs, tmp_path):
    config = cls(target_modules=["query", "value"], layers_to_transform=[0, 1], layers_pattern="layer",
                 init_weights=False, **knobs)
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(written["target_modules"], list)
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is cls
    assert loaded.to_dict() == config.to_dict()


def test_every_config_is_a_hirank_config():
    assert all(issubclass(cls, HirankConfig) for cls in CONFIGS)
    registered = {cls for key, cls in peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING.items() if str(key).startswith("HIRANK_")}
    assert registered == set(CONFIGS)
