"""Atomic writes give files the mode any new file gets and leave no temporary file; hashing streams the file."""
import hashlib
import os

from meteora_moe.store import atomic_write, file_sha256


def test_atomic_writes_get_the_umasks_mode_and_leave_no_temporary_file(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "registry.json", b"{}")
        atomic_write(tmp_path / "weights.bin", lambda path: open(path, "wb").write(b"w"))
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in sorted(tmp_path.iterdir())] == ["0o644", "0o644"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.json", "weights.bin"]


def test_file_sha256_streams_the_file(tmp_path):
    data = bytes(range(256)) * 5000  # over one 1 MiB block
    (tmp_path / "blob").write_bytes(data)
    assert file_sha256(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
