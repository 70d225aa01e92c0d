"""The import rules of shared/DESIGN.md hold: the pure core does no I/O, the API schemas
stay importable without FUSE, netlink or Qt (contracts in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_core_modules_import_nothing_that_does_io() -> None:
    """A second, independent look: no module of agent/core names an I/O module at all."""
    forbidden = {"os", "socket", "asyncio", "subprocess", "time", "sqlite3", "pyroute2"}
    for path in (ROOT / "agent" / "core").glob("*.py"):
        for line in path.read_text().splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] in ("import", "from"):
                top = words[1].split(".")[0]
                assert top not in forbidden, f"{path.name}: {line.strip()}"
