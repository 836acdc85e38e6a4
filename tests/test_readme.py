"""The README's shell examples keep working: every ``dino-vos`` command of its ``bash`` blocks that
needs no data beyond the demo's generated clip runs, in order, after ``dino-vos demo``.

Commands with a placeholder in capitals (``DAVIS``, ``DIR``, ``INPUT`` ...) need the user's data
and are not run; the CI command after ``<!-- ci: tests -->`` is checked for its shape only.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z0-9_]{2,}\b")


def bash_commands(text: str) -> list[str]:
    """The ``dino-vos`` lines of the ``bash`` blocks (continuation lines joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            for part in line.split(" #", 1)[0].split("&&"):
                if part.strip().startswith("dino-vos "):
                    commands.append(part.strip())
    return commands


def runnable(commands: list[str]) -> list[str]:
    return [c for c in commands if not PLACEHOLDER.search(c) and "[" not in c]


def test_ci_marker_is_followed_by_the_test_command():
    lines = README.read_text().splitlines()
    marker = lines.index("<!-- ci: tests -->")
    assert lines[marker + 1] == "```bash"
    assert 'pip install -e ".[dev]"' in lines[marker + 2] and "pytest" in lines[marker + 2]


def test_the_five_commands_are_shown():
    shown = {c.split()[1] for c in bash_commands(README.read_text())}
    assert {"demo", "propagate", "eval", "report", "attention", "pretrain"} <= shown


@pytest.mark.slow
def test_readme_examples_run_on_the_demo_clip(tmp_path):
    commands = runnable(bash_commands(README.read_text()))
    assert commands[0] == "dino-vos demo" and len(commands) >= 5, commands
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for command in commands:
        result = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
    reports = [p for p in tmp_path.rglob("index.html")]
    assert reports, "no README example wrote a report"
