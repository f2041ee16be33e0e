"""Child processes of `grok-torch` stopped at an exact point of a long job, through the test-only hook
GROK_TORCH_TEST_STOP_AT (convert.disk.job.test_stop: it announces the point on stderr, then SIGSTOPs itself)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-c", "import sys; from grok_torch.cli import main; sys.argv[0] = 'grok-torch'; main()"]


def start(args: list, stop_at: str) -> subprocess.Popen:
    """`grok-torch *args` in a child that stops itself at `stop_at` ("tensor:N", "shard:N", "install")."""
    env = dict(os.environ, GROK_TORCH_TEST_STOP_AT=stop_at)
    return subprocess.Popen(CLI + [str(a) for a in args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_until_stopped(proc: subprocess.Popen, point: str) -> list[str]:
    """The child's stderr lines up to its announcement of `point`, once its SIGSTOP has taken effect."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith(f"GROK_TORCH_TEST_STOP_AT: stopped at {point}"):
            break
    else:
        raise AssertionError(f"the command never reached {point}: {''.join(lines)}")
    stat = Path(f"/proc/{proc.pid}/stat")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the SIGSTOP it sends itself has taken effect
        if not stat.exists():
            time.sleep(0.5)
            break
        if stat.read_text().rsplit(")", 1)[1].split()[0] == "T":
            break
        time.sleep(0.01)
    return lines


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL: no clean-up runs."""
    proc.kill()
    proc.wait(30)
    proc.stdout.close()
    proc.stderr.close()
