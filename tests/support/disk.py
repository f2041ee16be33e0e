"""A disk that fills up: the shard writer's write system call, failing with ENOSPC after a budget."""

from __future__ import annotations

import errno
import os


class FullDisk:
    """The shard writer's write system call on a disk that fills up after `budget` bytes (then ENOSPC, as the
    kernel does: a short write first, then the error)."""

    def __init__(self, budget: int):
        self.left = budget

    def write(self, fd: int, data) -> int:
        if self.left == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        data = memoryview(data).cast("B")
        n = os.write(fd, data[:self.left])
        self.left -= n
        return n
