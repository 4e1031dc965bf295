"""``selftpt.fsmode``'s atomic writes: the target is absent, old or complete, never partial;
a failed write leaves no temporary file; new files get the umask's mode, not mkstemp's 0600."""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from selftpt.fsmode import atomic_path, atomic_write, temp_file_beside


@pytest.fixture
def umask():
    """Set the process umask for a test; restore it afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield os.umask
    os.umask(saved)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_binary_and_text_writes_land_complete(tmp_path):
    target = tmp_path / "a.bin"
    with atomic_write(target) as f:
        f.write(b"\x00\x01")
    with atomic_write(str(tmp_path / "b.txt"), "w", encoding="utf-8") as f:
        f.write("é\n")
    assert target.read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "é\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt"]


def test_target_appears_only_when_the_block_ends(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with atomic_write(target, "w", fsync=True) as f:
        f.write("new, first half")
        f.flush()
        assert target.read_text() == "old"  # the reader still sees the complete old file
        f.write(" and second half")
    assert target.read_text() == "new, first half and second half"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("existed", [False, True])
def test_failure_leaves_old_target_and_no_temp_file(tmp_path, error, existed):
    target = tmp_path / "model.pth"
    if existed:
        target.write_bytes(b"old")
    with pytest.raises(error):
        with atomic_write(target) as f:
            f.write(b"partial")
            raise error()
    assert list(tmp_path.iterdir()) == ([target] if existed else [])
    if existed:
        assert target.read_bytes() == b"old"


def test_atomic_path_for_path_writers(tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("payload")
    target = tmp_path / "copy.txt"
    with atomic_path(target, fsync=True) as tmp:
        assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".copy.txt.")
        assert not target.exists()
        shutil.copyfile(src, tmp)
    assert target.read_text() == "payload"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.txt", "src.txt"]

    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            Path(tmp).write_text("torn")
            raise OSError("disk full")
    assert target.read_text() == "payload"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.txt", "src.txt"]


@pytest.mark.parametrize("mask, expected", [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_mode_follows_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    with atomic_write(tmp_path / "w") as f:
        f.write(b"x")
    with atomic_path(tmp_path / "p") as tmp:
        Path(tmp).write_bytes(b"x")
    fd, tmp = temp_file_beside(tmp_path / "t")
    os.close(fd)
    assert (_mode(tmp_path / "w"), _mode(tmp_path / "p"), _mode(Path(tmp))) == (expected,) * 3


def test_concurrent_writers_never_share_a_temp_file(tmp_path):
    target = tmp_path / "shared.bin"
    barrier = threading.Barrier(4)

    def write(i: int) -> None:
        with atomic_write(target) as f:
            barrier.wait()  # all four temp files exist at once
            f.write(bytes([i]) * 1000)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = target.read_bytes()
    assert len(data) == 1000 and len(set(data)) == 1  # one writer's whole file, not a mix
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]


def test_refuses_modes_that_would_not_write_a_new_file(tmp_path):
    for mode in ("a", "r+", "ab"):
        with pytest.raises(ValueError, match="mode"):
            with atomic_write(tmp_path / "x", mode):
                pass
    with pytest.raises(ValueError, match="encoding"):
        with atomic_write(tmp_path / "x", "wb", encoding="utf-8"):
            pass
    assert list(tmp_path.iterdir()) == []
