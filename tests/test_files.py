"""Directories written atomically (`files.atomic_dir`): all of the new one, or the old one."""

import pytest

from saefeatures.files import atomic_dir


def test_atomic_dir_replaces_the_target_whole(tmp_path):
    target = tmp_path / "sae"
    target.mkdir()
    (target / "old.json").write_text("{}")
    with atomic_dir(target) as tmp:
        (tmp / "new.json").write_text("{}")
        assert (target / "old.json").exists()  # readers see the old directory until the end
    assert [p.name for p in target.iterdir()] == ["new.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]


def test_a_failed_write_leaves_the_old_directory_and_no_temp(tmp_path):
    target = tmp_path / "sae"
    target.mkdir()
    (target / "old.json").write_text("{}")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.json").write_text("{")
        raise RuntimeError("killed")
    assert [p.name for p in target.iterdir()] == ["old.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]
