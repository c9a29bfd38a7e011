"""The suite results in ``evidence/`` (what ``hirank suite NAME --out evidence/NAME`` wrote: results, timing passes
and reports, not the adapters) are what the README quotes: each ``suite.md`` is rebuilt from its records and
must come out as committed, and a README that points at one shows its overall table verbatim."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hirank.bench.suite import SUITE_REPORT, build_suite_report, get_suite

ROOT = Path(__file__).resolve().parents[1]
EVIDENCE = ROOT / "evidence"
SUITES = sorted(path.parent.name for path in EVIDENCE.glob(f"*/{SUITE_REPORT}"))


def _overall_table(text: str) -> list[str]:
    return [line for line in text.split("## Overall")[1].split("\n## ")[0].splitlines() if line.startswith("|")]


def test_there_is_evidence() -> None:
    assert SUITES, "no evidence/<suite>/suite.md"


@pytest.mark.parametrize("name", SUITES)
def test_a_suite_report_rebuilds_from_its_records_and_the_readme_quotes_it(name: str, tmp_path: Path) -> None:
    copy = shutil.copytree(EVIDENCE / name, tmp_path / name)
    rebuilt = build_suite_report(get_suite(name), copy)
    assert rebuilt == (EVIDENCE / name / SUITE_REPORT).read_text()
    readme = (ROOT / "README.md").read_text()
    if f"evidence/{name}/{SUITE_REPORT}" in readme:
        missing = [line for line in _overall_table(rebuilt) if line not in readme.splitlines()]
        assert not missing, f"README's overall table of {name} differs from the evidence: {missing}"
