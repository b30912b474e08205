import pytest

from intentlora.files import publish_dir, staging_dir, write_text_atomic


def test_a_write_that_fails_leaves_the_old_file_and_no_temp(tmp_path):
    target = write_text_atomic(tmp_path / "metrics.json", "old")

    with pytest.raises(TypeError):
        write_text_atomic(target, 123)  # fails inside the write
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapter"
    tmp = staging_dir(target)
    (tmp / "weights").write_text("half")
    assert not target.exists()  # being written: invisible under its name
    publish_dir(tmp, target)
    assert (target / "weights").read_text() == "half" and oct(target.stat().st_mode & 0o777) == "0o755"
    newer = staging_dir(target)
    (newer / "weights").write_text("new")
    publish_dir(newer, target)
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
