"""The code is formatted and linted by ruff (settings in pyproject.toml), so CI keeps it so."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).parent / "ruff"


@pytest.mark.parametrize("args", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_ruff(args):
    if not RUFF.exists():
        pytest.fail("ruff is not installed: install the dev extra (pip install -e '.[dev]')")
    out = subprocess.run([str(RUFF), *args, str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
