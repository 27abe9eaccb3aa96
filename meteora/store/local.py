"""A store on a local directory: atomic writes, and a compare-and-swap under a lock on the directory."""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from ..errors import StoreError
from .files import atomic_write
from .uris import check_key


class LocalStore:
    def __init__(self, root: Path):
        self.root = root
        self.uri = str(root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def tag(self, key: str) -> str | None:
        """A tag that changes when the object does (size and modification time), None if it is missing."""
        try:
            status = self._path(key).stat()
        except FileNotFoundError:
            return None
        return f"{status.st_size}-{status.st_mtime_ns}"

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except OSError as err:
            raise StoreError(f"cannot read {self._path(key)}: {err.strerror or err}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        atomic_write(self._path(key), data)

    def write_if_unchanged(self, key: str, data: bytes, expected: bytes | None) -> bool:
        """Write `data` only if `key` still holds `expected` (None: absent); False, and nothing written, if not.
        Writers hold a lock on the key's directory from the comparison to the rename, so two cannot both win."""
        target = self._path(key)
        if expected is None:
            target.parent.mkdir(parents=True, exist_ok=True)
        elif not target.parent.is_dir():
            return False
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            fcntl.flock(directory, fcntl.LOCK_EX)
            if (target.read_bytes() if target.is_file() else None) != expected:
                return False
            self.write_bytes(key, data)
            return True
        finally:
            os.close(directory)  # releases the lock

    def download(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except OSError as err:
            raise StoreError(f"cannot read {self._path(key)}: {err.strerror or err}") from None

    def list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
