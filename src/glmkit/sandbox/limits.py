"""What bounds a sandboxed kernel (`Limits`), and the measure of its workspace's quota.

The quota is watched by the host while a cell runs (see interpreter.py) and checked by the
console before an upload (server/workspace.py): one measure, so neither can fill what the other
refuses."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

WORKSPACE_ENTRIES = 100_000       # files and directories a workspace may hold
MB = 1024 * 1024


@dataclass
class Limits:
    wall_seconds: float = 30.0        # per cell
    cpu_seconds: int = 600            # CPU time of all the kernel's processes together, over its life
    memory_mb: int = 2048             # the whole sandbox, tmpfs included (and each process's address space)
    max_procs: int = 32               # processes in the sandbox
    max_file_mb: int = 100            # one file
    tmpfs_mb: int = 256               # each of /tmp and /dev/shm
    workspace_mb: int = 1024          # everything in /mnt/data
    max_output: int = 20_000          # characters of output kept per cell


def workspace_usage(path: Path, max_entries: int = WORKSPACE_ENTRIES) -> tuple[int, int]:
    """(bytes, entries) of a workspace, counting what it takes on disk or its size if larger (a
    sparse file), a hard-linked file once; stops counting after max_entries + 1 entries.  fwalk
    holds each directory open and follows no symlink, even one the sandbox swaps in mid-walk."""
    total, entries, seen = 0, 0, set()
    for _, dirnames, filenames, dfd in os.fwalk(path, follow_symlinks=False):
        for name in dirnames + filenames:
            entries += 1
            if entries > max_entries:
                return total, entries
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except OSError:
                continue
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += max(st.st_size if stat.S_ISREG(st.st_mode) else 0, st.st_blocks * 512)
    return total, entries
