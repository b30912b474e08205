import os
import stat

import pytest

from intentlora.files import atomic_file, publish_dir, staged_dir, write_text_atomic


def test_a_write_that_fails_leaves_the_old_file_and_no_temp(tmp_path):
    target = write_text_atomic(tmp_path / "metrics.json", "old")

    with pytest.raises(TypeError):
        write_text_atomic(target, 123)  # fails inside the write
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapter"
    with staged_dir(target) as tmp:
        (tmp / "weights").write_text("half")
        assert not target.exists()  # being written: invisible under its name
    assert (target / "weights").read_text() == "half"
    with staged_dir(target) as newer:
        (newer / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_failed_staging_is_removed_and_the_old_folder_kept(tmp_path):
    target = tmp_path / "model"
    with staged_dir(target) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_publishing_moves_the_old_folder_aside_before_the_new_one_comes_in(tmp_path, monkeypatch):
    """If the process dies between the two renames, the old folder survives (under a hidden name), never neither."""
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    new = tmp_path / "staged"
    new.mkdir()
    (new / "weights").write_text("new")
    real_replace, calls = os.replace, []

    def dies_on_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_second_rename)
    with pytest.raises(OSError):
        publish_dir(new, target)
    survivors = [p for p in tmp_path.rglob("weights") if p.read_text() == "old"]
    assert len(survivors) == 1


def test_outputs_follow_the_umask_not_mkstemp_privacy(tmp_path):
    """Exports are read by other users and serving containers: 0644 files and 0755 folders under umask 022."""
    old = os.umask(0o022)
    try:
        with staged_dir(tmp_path / "export") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            os.chmod(tmp / "model.safetensors", 0o600)  # as safetensors / tempfile-based writers leave it
        with atomic_file(tmp_path / "metrics.json") as f:
            f.write("{}")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "export") == 0o755
    assert mode(tmp_path / "export" / "model.safetensors") == 0o644
    assert mode(tmp_path / "metrics.json") == 0o644
