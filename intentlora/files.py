"""Atomic outputs: a file or folder appears complete or not at all.

Everything the tool writes goes to a temporary name beside its target and is
renamed onto it (a rename within one folder is atomic), so a crash or a kill
never leaves a half-written adapter, model, report or metrics.json behind.
Modes follow the umask, as for any file the user's programs write.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_modes(path: Path) -> None:
    """Give a staged file or tree the modes a plain write would (mkstemp/mkdtemp make them private)."""
    mask = current_umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` survive a power cut, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8"):
    """Yield a file object; on success it replaces `path` whole, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        normal_modes(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_file(path) as f:
        f.write(text)
    return Path(path)


@contextmanager
def staged_dir(target: str | Path):
    """Yield a fresh folder beside `target`; fill it. On success it becomes `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield tmp
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: Path, target: Path) -> Path:
    """Put a complete staging folder in place of `target`; an older `target` is moved aside first, deleted last.

    At every moment either the old folder or the new one is at `target` (or,
    between two renames, beside it under a hidden name): a crash never loses both.
    """
    normal_modes(tmp)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-old-"))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
