"""ruff lints every module of the package: no folder is left out by its default excludes (a
package named ``dist`` or ``build`` once was), and the tree is clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = Path(sys.executable).parent / "ruff"
    if exe.is_file():
        return [str(exe)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.skip("ruff is not installed")


def test_ruff_sees_every_module_of_the_package():
    r = subprocess.run([*_ruff(), "check", "--show-files", "layercake"], cwd=ROOT,
                       capture_output=True, text=True, check=True)  # fmt: skip
    seen = {Path(line.strip()).resolve() for line in r.stdout.splitlines() if line.strip()}
    modules = {p.resolve() for p in (ROOT / "layercake").rglob("*.py")}
    assert modules and not (modules - seen), sorted(str(p) for p in modules - seen)


def test_package_files_stay_small():
    big = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "layercake").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not big, f"files over 400 lines: {big}"
