"""The results file of a comparison: JSON Lines, one object per finished (or diverged) run.

Safe under kills and concurrent writers on one machine: a record is added with one ``write`` of the whole line
to a file opened ``O_APPEND``, under an exclusive ``flock`` of the file, then ``fsync``-ed, so a reader never
sees half a line and two writers never lose each other's lines (the file is never read and rewritten).
Readers take a shared lock. Files are created with the mode the umask gives (like any other file).

Runs are claimed before they are trained (:class:`RunClaim`): one lock file per run id under ``.claims/``, held
with ``flock`` for as long as the run trains. The OS drops the lock of a process that dies, so its run is taken
over by the next process that asks. Over NFS, ``flock`` is emulated with NFS byte-range locks and works between
machines only if the mount supports locking (NFSv4, or NFSv3 with lockd; not ``nolock`` / ``local_lock=all``).

Loading skips (with a warning) lines that are not a valid record, so one hand-edited line cannot block a report.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any

Record = dict[str, Any]
RESULTS_FILE = "results.jsonl"
OUT_OF_REACH_FILE = "out_of_reach.json"  # method → why the budget is out of its reach (methods left out)
CLAIMS_DIR = ".claims"
FINISHED = "finished"
DIVERGED = "diverged"
STATUSES = (FINISHED, DIVERGED)
# fields a record must carry, and what each must be (bool is an int in Python: refused separately)
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "method": str,
    "seed": int,
    "config_hash": str,
    "knobs": dict,
    "model": str,
    "task": str,
    "budget": str,
    "target_params": int,
}
# numeric fields the report reads: a number or null
NUMERIC_FIELDS = (
    "trainable_params",
    "head_params",
    "test_accuracy",
    "forgetting",
    "effective_rank_mean",
    "train_time_s",
    "step_time_s",
    "peak_memory_mib",
    "adapter_file_bytes",
    "forward_unmerged_s",
    "forward_merged_s",
    "forward_base_s",
    "run_time_s",
)

logger = logging.getLogger(__name__)


class ResultsFileError(ValueError):
    """A results file with no usable record."""


def warn(message: str) -> None:
    """A warning for the user of ``hirank compare`` / ``report`` (one line on stderr unless logging is set up)."""
    logger.warning("hirank: warning: %s", message)


def record_problem(record: object) -> str | None:
    """Why ``record`` is not a usable results record, or None if it is."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for name, kind in REQUIRED_FIELDS.items():
        value = record.get(name)
        if value is None:
            return f"no {name!r}"
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{name!r} is {value!r}, not a {kind.__name__}"
    for name in NUMERIC_FIELDS:
        value = record.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            return f"{name!r} is {value!r}, not a number"
    if record.get("status", FINISHED) not in STATUSES:
        return f"'status' is {record.get('status')!r}, not one of {', '.join(STATUSES)}"
    return None


def run_id(record: Record) -> str:
    """The run's id (as in ``adapters/<run id>``): method, seed and config hash."""
    return record.get("run_id") or f"{record['method']}-seed{record['seed']}-{record['config_hash']}"


def load_records(path: Path, warn_skipped: bool = True) -> list[Record]:
    """All usable records of a results file, in file order (none if it does not exist); lines that are not
    a valid record are skipped, with a warning naming the line and what is wrong with it if ``warn_skipped``."""
    try:
        with open(path, "rb") as file:
            fcntl.flock(file, fcntl.LOCK_SH)  # never read a line another process is writing
            data = file.read()
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problem = f"not valid JSON ({error.msg})"
        else:
            problem = record_problem(record)
        if problem is not None:
            if warn_skipped:
                warn(f"{path}:{number} skipped: {problem}.")
            continue
        records.append(record)
    return records


def _finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(item) for item in value]
    return value


def _open_created(path: Path, flags: int) -> int:
    """``os.open`` with mode 0o666 less the umask for a new file (as ``open()`` does)."""
    return os.open(path, flags | os.O_CLOEXEC, 0o666)


def write_atomically(path: Path, content: str | bytes) -> None:
    """Replace ``path`` with ``content`` in one step (temporary file in the same folder, fsync, ``os.replace``);
    a new file gets the umask's mode, a replaced one keeps its mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    descriptor = _open_created(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        if path.exists():
            os.fchmod(descriptor, path.stat().st_mode & 0o7777)
        with os.fdopen(descriptor, "wb") as file:
            file.write(content.encode() if isinstance(content, str) else content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def append_record(path: Path, record: Record) -> None:
    """Add one run to the results file: one locked ``O_APPEND`` write of the whole line, then fsync.

    Non-finite floats are written as null. If the file's last line lacks its newline (edited by hand), one is
    written first, so the new record is a line of its own.
    """
    line = json.dumps(_finite_json(record), sort_keys=True, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = _open_created(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        size = os.fstat(descriptor).st_size
        if size and os.pread(descriptor, 1, size - 1) != b"\n":
            line = "\n" + line
        data = line.encode()
        while data:
            data = data[os.write(descriptor, data) :]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)  # releases the lock


class RunClaim:
    """An exclusive claim on one run of a comparison folder, held (``flock`` on ``.claims/<run id>.lock``) until
    :meth:`release`; a claim of a process that died is released by the OS and can be taken over."""

    def __init__(self, folder: Path, run: str) -> None:
        self.path = Path(folder) / CLAIMS_DIR / f"{run}.lock"
        self._descriptor: int | None = None

    def try_acquire(self) -> bool:
        """Claim the run if no live process holds it; never blocks."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = _open_created(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return False
        os.ftruncate(descriptor, 0)  # who holds it, for a user looking at a stuck folder
        os.write(descriptor, f"{os.getpid()} {os.uname().nodename}\n".encode())
        self._descriptor = descriptor
        return True

    def holder(self) -> str:
        """``"<pid> <host>"`` of the process that last claimed the run ("" if unknown)."""
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


def write_out_of_reach(folder: Path, out_of_reach: dict[str, str]) -> None:
    """Record which methods a comparison left out because its budget is out of their reach (none: no file)."""
    path = Path(folder) / OUT_OF_REACH_FILE
    if out_of_reach:
        write_atomically(path, json.dumps(out_of_reach, indent=1, ensure_ascii=False) + "\n")
    else:
        path.unlink(missing_ok=True)


def load_out_of_reach(folder: Path) -> dict[str, str]:
    """method → why it was left out (see :func:`write_out_of_reach`); {} if none was."""
    try:
        return json.loads((Path(folder) / OUT_OF_REACH_FILE).read_text())
    except FileNotFoundError:
        return {}
