"""The README's python examples run as written, in order, in one folder (a later example may load what an
earlier one saved)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

# Each example runs in its own process with fresh globals and without hirank imported (it must import what it
# uses, and register hirank itself), forked from one parent that has imported only the third-party packages
# every example loads: the examples share their ~15 s of import time instead of paying it each.
RUNNER = r"""
import json, linecache, os, sys, traceback
import torch, transformers, peft  # imported only: no torch op runs here, so forking stays safe
for number, example in enumerate(json.loads(sys.stdin.read()), start=1):
    name = f"<README python example {number}>"
    linecache.cache[name] = (len(example), None, example.splitlines(True), name)  # tracebacks show the line
    sys.stdout.flush(); sys.stderr.flush()
    child = os.fork()
    if child == 0:
        try:
            exec(compile(example, name, "exec"), {"__name__": "__main__"})
        except BaseException:
            traceback.print_exc()
            code = 1
        else:
            code = 0
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    if os.waitpid(child, 0)[1] != 0:
        sys.exit(f"{name} failed")
"""


def test_readme_python_examples_run(tmp_path):
    examples = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert examples, "the README has no python example"
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    env.update({name: os.environ[name] for name in ("OMP_NUM_THREADS", "PYTHONPATH") if name in os.environ})
    result = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(examples), cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
