"""A saved hirank adapter holds every config field, warns about a field its file lacks, and tells whoever loads
it (adapter_config.json, README.md model card) that peft needs ``import hirank`` first."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model

import hirank
from hirank.tuners._loading import CARD_HEADING
from tests.test_config_validation import CONFIGS
from tests.tiny_models import TINY_MODELS

MLP = TINY_MODELS["mlp"]
REPO = Path(__file__).resolve().parents[1]


def _load_warnings(directory: Path) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.PeftConfig.from_pretrained(directory)
    return [str(w.message) for w in caught if "lacks" in str(w.message)]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_save_writes_every_field_and_a_full_file_loads_without_warning(cls, tmp_path):
    cls(target_modules=["lin0"]).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {f.name for f in dataclasses.fields(cls)} <= set(written)
    assert written["hirank_version"] == hirank.__version__ and "import hirank" in written["requires"]
    assert _load_warnings(tmp_path) == []


@pytest.mark.parametrize("config, field", [
    (hirank.MTLoraConfig(target_modules=["lin0"], lora_alpha=32), "lora_alpha"),
    (hirank.QuantumPeftConfig(target_modules=["lin0"], scale=3.0), "scale"),
    (hirank.SurmConfig(target_modules=["lin0"], alpha=2.0), "alpha"),
    (hirank.LoraTRFConfig(target_modules=["lin0"], similarity="dot"), "similarity"),
    (hirank.SurmConfig(target_modules=["lin0"], placement="adapter", adapter_activation="tanh"),
     "adapter_activation"),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_a_field_missing_from_the_file_is_named_in_a_warning(config, field, tmp_path):
    model = get_peft_model(MLP.build(), config)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    stored = json.loads(path.read_text())
    del stored[field]
    path.write_text(json.dumps(stored))
    with pytest.warns(UserWarning, match=rf"lacks {field}: using the defaults {field}="):
        PeftModel.from_pretrained(MLP.build(), tmp_path)
    assert len(_load_warnings(tmp_path)) == 1  # the generic peft.PeftConfig loader (transformers' path) too


def test_a_file_from_before_the_informational_fields_loads_quietly(tmp_path):
    hirank.QuantaConfig(target_modules=["lin0"]).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    stored = json.loads(path.read_text())
    del stored["hirank_version"], stored["requires"]
    path.write_text(json.dumps(stored))
    assert _load_warnings(tmp_path) == []


def test_the_model_card_says_how_to_load_and_keeps_what_was_there(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n\n# My adapter\n\nTrained on my data.\n\n## Results\n\n90%\n")
    model = get_peft_model(MLP.build(), hirank.QuantaConfig(target_modules=["lin0"]))
    model.add_adapter("other", hirank.QuantaConfig(target_modules=["lin1"]))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # saving again refreshes the section, never duplicates it
    card = (tmp_path / "README.md").read_text()
    assert card.count(CARD_HEADING) == 1
    assert "Trained on my data." in card and "## Results" in card and "license: mit" in card
    assert "import hirank" in card and "KeyError: 'HIRANK_QUANTA'" in card and "- hirank" in card
    assert card.index("Trained on my data.") < card.index(CARD_HEADING) < card.index("## Results")
    other = (tmp_path / "other" / "README.md").read_text()  # peft saves a second adapter in a subfolder
    assert CARD_HEADING in other and "import hirank" in other


def test_a_fresh_process_without_import_hirank_gets_the_key_error_and_the_folder_explains_it(tmp_path):
    model = get_peft_model(MLP.build(), hirank.QuantaConfig(target_modules=["lin0"], init_weights=False))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = MLP.output(model, MLP.inputs())
    torch.save(expected, tmp_path / "expected.pt")
    code = f"""
import sys, torch
from peft import PeftModel
from tests.tiny_models import TINY_MODELS
mlp = TINY_MODELS["mlp"]
try:
    PeftModel.from_pretrained(mlp.build(), {str(tmp_path)!r})
except KeyError as error:
    print("without import:", type(error).__name__, error)
assert "hirank" not in sys.modules
import hirank
loaded = PeftModel.from_pretrained(mlp.build(), {str(tmp_path)!r})
with torch.no_grad():
    error = (mlp.output(loaded, mlp.inputs()) - torch.load({str(tmp_path / "expected.pt")!r})).abs().max().item()
print("with import: max abs error", error)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "without import: KeyError 'HIRANK_QUANTA'"  # peft's own error: peft cannot be changed
    assert float(lines[1].split()[-1]) == 0.0
    # what the user finds next to the adapter: both files name the package and the import
    assert "import hirank" in (tmp_path / "README.md").read_text()
    assert "import hirank" in json.loads((tmp_path / "adapter_config.json").read_text())["requires"]
