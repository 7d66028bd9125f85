"""Atomic file writes, shared by every cache, checkpoint helper and report pdx writes."""

from __future__ import annotations

import os
import shutil
import uuid


def atomic_write(path: str, data: bytes | str) -> None:
    """Write `data` to `path` through a uniquely named temporary file renamed into place: a reader sees
    the old file or the new one, never half of one, and concurrent writers never share a temporary.
    Raises OSError (and leaves no temporary behind) when the disk refuses."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_dir(path: str, write) -> None:
    """Call `write(tmp)` on a fresh temporary sibling directory of `path`, then rename it into place: a
    reader sees the old directory or the new one, and a crash leaves only a `.tmp-` sibling behind."""
    path = os.path.abspath(path)
    tmp, old = f"{path}.tmp-{os.getpid()}", f"{path}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
