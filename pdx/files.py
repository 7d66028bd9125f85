"""Atomic file writes, shared by every cache, checkpoint helper and report pdx writes."""

from __future__ import annotations

import glob
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
    reader sees the old directory or the new one; what a killed writer left is repaired by `recover_dir`."""
    path = os.path.abspath(path)
    recover_dir(path)
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dir(path: str) -> None:
    """Repair what an `atomic_dir` writer killed mid-swap left beside `path`: a dead writer's `.old-`
    sibling (the last complete directory) goes back into place if `path` is gone, else is removed, and
    its `.tmp-` sibling (never complete until renamed) is removed. Live writers' siblings are left alone."""
    path = os.path.abspath(path)
    for kind in ("old", "tmp"):
        for sibling in sorted(glob.glob(f"{glob.escape(path)}.{kind}-*")):
            pid = sibling.rsplit("-", 1)[-1]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not os.path.exists(path):
                os.rename(sibling, path)
            else:
                shutil.rmtree(sibling, ignore_errors=True)
