"""Import the official DINO code (github.com/facebookresearch/dino) from a local copy, at run time.

Its files are read from a checkout or a bare git dir given on the command line, never copied into
dino-vos; tools use them only as anchors for comparisons.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def official_source(path: Path, scratch: Path) -> Path:
    """A folder with the official ``*.py`` files: ``path`` itself, or (a bare git dir) its HEAD's
    top-level Python files written to ``scratch``."""
    if (path / "main_dino.py").is_file():
        return path
    if not (path / "HEAD").is_file():
        sys.exit(f"{path} is neither a DINO checkout (main_dino.py) nor a git dir: pass --dino-src")
    out = scratch / "dino"
    out.mkdir()
    git = ["git", f"--git-dir={path}"]
    names = subprocess.run(
        [*git, "ls-tree", "--name-only", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.split()
    for name in (n for n in names if n.endswith(".py")):
        text = subprocess.run([*git, "show", f"HEAD:{name}"], check=True, capture_output=True)
        (out / name).write_bytes(text.stdout)
    return out


def import_official(source: Path):
    """The official ``main_dino`` module (it imports ``utils`` and ``vision_transformer``)."""
    sys.path.insert(0, str(source))
    import main_dino  # type: ignore[import-not-found]

    return main_dino
