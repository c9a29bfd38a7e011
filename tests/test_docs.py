"""The documentation stands alone and covers the public API (the site itself is built by `make docs`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import hirank

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIGS = [hirank.QuantaConfig, hirank.QuantumPeftConfig, hirank.MTLoraConfig, hirank.LoraTRFConfig, hirank.SurmConfig]


def _hook():
    spec = importlib.util.spec_from_file_location("config_fields", DOCS / "hooks" / "config_fields.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_and_docs_never_point_outside_the_repository():
    for path in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        assert "../shared" not in path.read_text(), f"{path} points outside the repository"


def test_every_public_name_is_in_the_api_reference():
    api = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^::: hirank\.(\w+)", api, flags=re.M))
    public = {name for name in hirank.__all__ if not name.startswith("__")}
    assert public <= documented, f"missing from docs/api.md: {sorted(public - documented)}"


def test_every_config_field_is_in_its_generated_table():
    hook = _hook()
    for config_class in CONFIGS:
        table = hook.on_page_markdown(f'{{{{ config_fields("hirank.{config_class.__name__}") }}}}')
        for field in dataclasses.fields(config_class):
            if field.init:
                assert f"| `{field.name}` |" in table, f"{config_class.__name__}.{field.name} missing"


def test_every_config_is_on_its_method_page_and_in_the_api_reference():
    pages = {path.name: path.read_text() for path in (DOCS / "methods").glob("*.md")}
    api = (DOCS / "api.md").read_text()
    for config_class in CONFIGS:
        marker = f'config_fields("hirank.{config_class.__name__}")'
        assert marker in api
        assert any(marker in text for text in pages.values()), f"no method page lists {config_class.__name__}"
