"""What a saved hirank adapter tells whoever loads it: the fields a file lacks, and that it needs ``import hirank``.

peft finds a method by the ``peft_type`` stored in adapter_config.json, in a dict that only ``import hirank``
fills; peft cannot be changed, so without the import it fails with a bare ``KeyError: 'HIRANK_QUANTA'`` before
any hirank code runs. No hook runs earlier (peft reads no entry points, and a ``.pth`` file would import torch
into every Python process), so the saved folder explains itself instead: adapter_config.json holds
``hirank_version`` and ``requires``, and the folder's README.md (the model card peft writes) gets a section
with the install and import lines.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
import warnings
from typing import Any, Mapping

REQUIRES = (
    "the hirank package (pip install hirank): run `import hirank` before peft loads this adapter; it registers "
    "the HIRANK_* peft types (without it peft raises KeyError: 'HIRANK_...')"
)

CARD_HEADING = "## Loading this adapter needs hirank"


def warn_missing_fields(cls: type, stored: Mapping[str, Any], informational: tuple[str, ...]) -> None:
    """``stored`` came from a saved adapter_config.json (it has ``peft_type``): warn about each field of ``cls``
    that hirank declares but the file lacks, since the default then replaces the value the adapter was trained
    with (a missing ``lora_alpha`` or ``scale`` changes the outputs)."""
    from peft.config import PeftConfig

    peft_fields = {f.name for f in dataclasses.fields(PeftConfig)}
    missing = [f for f in dataclasses.fields(cls)
               if f.init and f.name not in stored and f.name not in peft_fields and f.name not in informational]
    if not missing:
        return

    def default(f: dataclasses.Field) -> Any:
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    defaults = ", ".join(f"{f.name}={default(f)!r}" for f in missing)
    warnings.warn(
        f"adapter config for {stored['peft_type']} lacks {', '.join(f.name for f in missing)}: using the defaults "
        f"{defaults}, which may differ from what the adapter was trained with (check adapter_config.json).",
        UserWarning,
        stacklevel=3,
    )


def card_section(peft_type: str, config_name: str) -> str:
    return "\n".join([
        CARD_HEADING,
        "",
        f"This adapter's method ({config_name}, peft_type `{peft_type}`) comes from the `hirank` package, not from "
        "peft itself. Install hirank and import it before peft loads the adapter:",
        "",
        "```python",
        "# pip install hirank",
        "import hirank  # registers the hirank methods with peft",
        "from peft import PeftModel",
        "",
        'model = PeftModel.from_pretrained(base_model, "<this folder or repo id>")',
        "```",
        "",
        f"Without `import hirank`, peft stops with `KeyError: '{peft_type}'`.",
        "",
    ])


def write_card_section(directory: str, peft_type: str, config_name: str) -> None:
    """Add (or refresh) the loading section of README.md in ``directory`` (peft's model card, created if absent)
    above its first section, and tag the card ``hirank``. The file is replaced atomically."""
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(directory, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    card.data.tags = sorted(set(card.data.tags or []) | {"hirank"})
    text = card.text
    if CARD_HEADING in text:  # replace our section, up to the next heading of the same level
        start = text.index(CARD_HEADING)
        end = text.find("\n## ", start + len(CARD_HEADING))
        text = text[:start].rstrip("\n") + ("\n\n" + text[end + 1:] if end != -1 else "")
    first_section = text.find("\n## ")  # ours goes first, above peft's template sections
    head, tail = (text, "") if first_section == -1 else (text[:first_section], text[first_section + 1:])
    card.text = head.rstrip("\n") + "\n\n" + card_section(peft_type, config_name) + ("\n" + tail if tail else "")
    temporary = os.path.join(directory, f".README.md.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    # os.open with 0o666 keeps the user's umask (mkstemp would make the card 0600)
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(str(card))
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
