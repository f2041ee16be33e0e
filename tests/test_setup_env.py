"""scripts/setup-env prints a short summary, not pip's output; a failed install shows the end of its log."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for .venv/bin/python: a noisy pip, and the version probe
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  for i in $(seq 1 100); do echo "WARNING: noise line $i from pip"; done
  exit ${FAKE_PIP_STATUS:-0}
fi
if [ "$1" = "-" ]; then echo "grok-torch 0.1.0, torch 2.13.0+cpu"; exit 0; fi
exit 3
"""


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copyfile(ROOT / name, root / name)
    shutil.copyfile(ROOT / "scripts" / "setup-env", root / "scripts" / "setup-env")
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return root


def _run(root: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(root / "scripts" / "setup-env")], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


def test_install_prints_a_summary_and_keeps_pip_in_a_log(tmp_path):
    root = _tree(tmp_path)
    done = _run(root)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and "WARNING" not in done.stdout + done.stderr
    assert lines[1].startswith("setup: ready in ") and lines[1].endswith("grok-torch 0.1.0, torch 2.13.0+cpu")
    assert "noise line 100" in (root / ".venv" / "setup.log").read_text()
    again = _run(root)  # installed and unchanged: nothing to do, nothing printed
    assert again.returncode == 0 and again.stdout == ""


def test_a_failed_install_shows_the_end_of_the_log(tmp_path):
    root = _tree(tmp_path)
    done = _run(root, FAKE_PIP_STATUS="1")
    assert done.returncode == 1
    assert "setup: the install failed" in done.stderr and "noise line 100" in done.stderr
    assert "noise line 60" not in done.stderr  # only the end
    assert not (root / ".venv" / ".grok-torch-installed").exists()
