"""The suite's own rule: on CI a skipped test fails the run (a skip there hides a gap)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_pytest_on(body: str, ci: bool) -> int:
    test_dir = ROOT / "tests" / "unit" / f"_suite_rule_{os.getpid()}"
    test_dir.mkdir()
    try:
        (test_dir / "test_probe.py").write_text(body)
        env = {**os.environ, "CI": "true" if ci else ""}
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_dir)],
            cwd=ROOT, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        return result.returncode
    finally:
        for path in test_dir.iterdir():
            path.unlink()
        test_dir.rmdir()


SKIPPING = "import pytest\n\n\ndef test_gap() -> None:\n    pytest.skip('not here')\n"
PASSING = "def test_fine() -> None:\n    assert True\n"


def test_a_skip_fails_the_run_on_ci_only() -> None:
    assert run_pytest_on(SKIPPING, ci=True) != 0
    assert run_pytest_on(SKIPPING, ci=False) == 0
    assert run_pytest_on(PASSING, ci=True) == 0
