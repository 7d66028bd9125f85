"""pdx.files: what an atomic directory writer killed mid-swap leaves is repaired, live writers untouched."""

import os
import subprocess
import sys

from pdx.files import atomic_dir, recover_dir


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write(directory, name, text):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "w") as f:
        f.write(text)


def test_a_swapped_out_directory_goes_back_and_half_writes_are_removed(tmp_path):
    path, pid = str(tmp_path / "state"), _dead_pid()
    _write(f"{path}.old-{pid}", "progress", "complete")  # killed after moving the old state aside
    _write(f"{path}.tmp-{pid}", "progress", "half")  # ...before renaming the new one in
    recover_dir(path)
    assert sorted(os.listdir(tmp_path)) == ["state"]
    assert open(os.path.join(path, "progress")).read() == "complete"


def test_a_stale_old_copy_beside_a_complete_directory_is_removed(tmp_path):
    path, pid = str(tmp_path / "state"), _dead_pid()
    _write(path, "progress", "new")
    _write(f"{path}.old-{pid}", "progress", "old")  # killed before removing the old state
    atomic_dir(path, lambda tmp: _write(tmp, "progress", "newer"))
    assert sorted(os.listdir(tmp_path)) == ["state"]
    assert open(os.path.join(path, "progress")).read() == "newer"


def test_a_live_writers_siblings_are_left_alone(tmp_path):
    path = str(tmp_path / "state")
    _write(f"{path}.tmp-{os.getpid()}", "progress", "being written")
    recover_dir(path)
    assert sorted(os.listdir(tmp_path)) == [f"state.tmp-{os.getpid()}"]
