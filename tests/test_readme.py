"""Every Python snippet in the README runs as written (each in a fresh process, from the repository root)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNIPPETS = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S)


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index):
    done = subprocess.run([sys.executable, "-c", SNIPPETS[index]], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"README snippet {index}:\n{SNIPPETS[index]}\n{done.stderr[-3000:]}"
