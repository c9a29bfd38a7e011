"""mkdocs hook: replace ``{{ config_fields("hirank.QuantaConfig") }}`` by a table of the config's fields.

Generated from the dataclass itself (name, type, default, the field's ``help``), so the reference can never
miss a field or show a stale default.
"""

from __future__ import annotations

import dataclasses
import importlib
import re

_MARKER = re.compile(r'\{\{\s*config_fields\("(?P<path>[\w.]+)"\)\s*\}\}')


def _load(path: str) -> type:
    module_name, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(field.default_factory())  # type: ignore[misc]
    return "required"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def config_fields_table(config_class: type) -> str:
    """A markdown table with one row per dataclass field of ``config_class``."""
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(config_class):
        if not field.init:
            continue
        help_text = field.metadata.get("help", "")
        type_name = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        rows.append(f"| `{field.name}` | `{_cell(type_name)}` | `{_cell(_default(field))}` | {_cell(help_text)} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **_: object) -> str:
    return _MARKER.sub(lambda match: config_fields_table(_load(match["path"])), markdown)
