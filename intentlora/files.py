"""Atomic outputs: a file or folder appears complete or not at all.

Everything the tool writes goes to a temporary name beside its target and is
renamed onto it (a rename within one folder is atomic), so a crash or a kill
never leaves a half-written adapter, model, report or metrics.json behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def staging_dir(target: Path) -> Path:
    """A fresh folder beside `target`; fill it, then `publish_dir` it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    return tmp


def publish_dir(tmp: Path, target: Path) -> Path:
    """Put a complete staging folder in place of `target` (replacing an older one)."""
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def write_text_atomic(path: Path, text: str) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
