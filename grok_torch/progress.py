"""Progress bars and byte counts for long jobs (convert, verify, export), the same on every command."""

from __future__ import annotations

import sys


def progress_bar(total: int, desc: str, progress: bool | None):
    """A tqdm byte counter (size, rate, ETA) on stderr: shown on a TTY, or when `progress` is True."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not show,
                file=sys.stderr, dynamic_ncols=True)


def human_bytes(n: int) -> str:
    """7353600 -> '7,353,600 bytes (7.4 MB)'."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n:,} bytes ({n / size:.1f} {unit})"
    return f"{n:,} bytes"
