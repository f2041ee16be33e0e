"""The README's first section works as written: its commands are run here, in a temporary directory."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from support.paths import TOKENIZER

ROOT = Path(__file__).resolve().parents[1]


def _try_it_commands() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Try it in two minutes", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


@pytest.mark.skipif(not TOKENIZER.exists(), reason=f"the release's tokenizer is not at {TOKENIZER}")
def test_try_it_in_two_minutes_runs_as_written(tmp_path):
    script = _try_it_commands()
    assert "grok-torch convert" in script and "grok-torch generate" in script
    script = script.replace("/tmp/try", str(tmp_path / "try")).replace("../shared/grok1/tokenizer.model", str(TOKENIZER))
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "GROK_TOKENIZER": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"ok: every tensor of {tmp_path / 'try' / 'int8'} matches" in done.stdout
    assert "PARITY PASSED" in done.stdout
    assert "The answer to life, the universe and everything is" in done.stdout
    assert (tmp_path / "try" / "int8" / "tokenizer.model").exists()
