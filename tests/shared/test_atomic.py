"""The atomic writer: ``path`` is the old file or the whole new one, and no ``.tmp`` stays behind either way."""

from __future__ import annotations

from pathlib import Path

import pytest

from lare2.shared.atomic import atomic_write


def test_a_finished_block_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("old")
    with atomic_write(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_failing_block_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="half written"), atomic_write(path) as tmp:
        tmp.write_text("ne")
        raise RuntimeError("half written")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_failing_rename_leaves_no_tmp_and_raises_its_error(tmp_path: Path) -> None:
    folder = tmp_path / "taken"  # a non-empty folder where the file should go: the rename onto it fails
    (folder / "inside").mkdir(parents=True)
    with pytest.raises(OSError) as raised, atomic_write(folder) as tmp:
        tmp.write_text("new")
    assert raised.value.filename2 == str(folder)  # the rename's own error, not another one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert [p.name for p in folder.iterdir()] == ["inside"]
