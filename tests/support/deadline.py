"""Run a call that might block forever (a FIFO opened for reading) under a time limit, and unblock it."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable


def unblock_fifo(path: Path) -> None:
    """Let a reader blocked in open() or read() on the FIFO `path` go on: open its writing end, write
    nothing, close it (the reader then sees end of file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no reader is waiting
        return
    os.close(fd)


def within(seconds: float, call: Callable[[], object], unblock: Callable[[], None] | None = None):
    """`call()`'s result or exception, if it ends within `seconds`; otherwise AssertionError (after
    `unblock()`, so that the thread running it does not stay blocked)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # handed to the caller below
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for _ in range(50):
            if unblock is not None:
                unblock()
            thread.join(0.1)
            if not thread.is_alive():
                break
        raise AssertionError(f"still running after {seconds} s (blocked)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
