"""The results file of a comparison: JSON Lines, one object per finished run, rewritten atomically.

Each append writes the whole file to a temporary file in the same folder and ``os.replace``-s it over the
old one, so a reader (or a comparison killed mid-write) only ever sees complete lines.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

Record = dict[str, Any]
RESULTS_FILE = "results.jsonl"


class ResultsFileError(ValueError):
    """A results file with a line that is not a JSON object."""


def load_records(path: Path) -> list[Record]:
    """All records of a results file (none if it does not exist)."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ResultsFileError(
                f"{path}:{number} is not valid JSON ({error.msg}); fix or remove that line."
            ) from error
        if not isinstance(record, dict):
            raise ResultsFileError(f"{path}:{number} is not a JSON object.")
        records.append(record)
    return records


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step (temporary file in the same folder, fsync, ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def append_record(path: Path, record: Record) -> None:
    """Add one finished run to the results file, atomically."""
    existing = path.read_text() if path.exists() else ""
    if existing and not existing.endswith("\n"):
        existing += "\n"
    write_atomically(path, existing + json.dumps(record, sort_keys=True) + "\n")


def run_key(record: Record) -> tuple[str, int, str]:
    """What identifies a run for resuming: (method, seed, config hash)."""
    return record["method"], int(record["seed"]), record["config_hash"]
