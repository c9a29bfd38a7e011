"""``import hirank`` registers every method with peft, idempotently and without clobbering peft."""

from __future__ import annotations

import enum
import json
import subprocess
import sys

import peft
import peft.mapping
import pytest
from peft import LoraConfig

import hirank
from hirank import _peft

MAPPINGS = (
    peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING,
    peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING,
    peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING,
)


def _hirank_entries(mapping: dict) -> list:
    return [key for key in mapping if str(key).startswith("HIRANK_")]


def test_every_method_is_registered_once_under_its_enum_member():
    for peft_type, *_ in _peft._METHODS:
        for mapping in MAPPINGS:
            assert peft_type in mapping
            assert isinstance(next(k for k in mapping if k == peft_type), _peft.HirankPeftType)
    for mapping in MAPPINGS:
        assert len(_hirank_entries(mapping)) == len(_peft._METHODS)


def test_registration_is_idempotent_across_reimport_and_reload():
    # in a fresh interpreter: reloading creates a new Enum class whose members must replace the old keys
    code = """
import importlib, peft.mapping as m
import hirank, hirank._peft as p
import hirank
importlib.reload(hirank)
importlib.reload(p)
p.register_all(); p.register_all()
maps = (m.PEFT_TYPE_TO_CONFIG_MAPPING, m.PEFT_TYPE_TO_TUNER_MAPPING, m.PEFT_TYPE_TO_PREFIX_MAPPING)
print([sum(str(k).startswith("HIRANK_") for k in x) for x in maps], len(p._METHODS))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    n = len(_peft._METHODS)
    assert out == [f"[{n},", f"{n},", f"{n}]", str(n)]


def test_refuses_to_overwrite_an_entry_that_is_not_hirank():
    peft_type = _peft._METHODS[0][0]
    saved = [mapping[peft_type] for mapping in MAPPINGS]
    peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = LoraConfig
    try:
        with pytest.raises(RuntimeError, match="not hirank's"):
            _peft.register_all()
    finally:
        for mapping, value in zip(MAPPINGS, saved):
            mapping[peft_type] = value


def test_peft_type_is_an_enum_member_with_a_string_value(tmp_path):
    config = hirank.QuantaConfig(target_modules=["q"])
    assert config.peft_type.value == "HIRANK_QUANTA"  # transformers' load_adapter calls .value
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "HIRANK_QUANTA"
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is hirank.QuantaConfig
    assert isinstance(loaded.peft_type, enum.Enum) and loaded.peft_type == _peft.HirankPeftType.QUANTA


def test_fresh_interpreter_import_prints_version():
    code = "import hirank, peft; import hirank; print(hirank.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hirank.__version__
