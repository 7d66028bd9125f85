"""Atomic file writes, shared by every cache, checkpoint helper and report pdx writes."""

from __future__ import annotations

import os
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
