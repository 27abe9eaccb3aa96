"""Local files: atomic writes, hashing in blocks, and the cache directory."""
from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(target: str | Path, data: bytes | Callable[[str], None]) -> None:
    """Write `data` (bytes, or a function that writes a given path) to a temporary file beside `target`, then
    rename it into place: readers see the old file or the new one, never a part."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask's mode, as for any new file
    try:
        if isinstance(data, bytes):
            Path(tmp).write_bytes(data)
        else:
            data(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def file_sha256(file: Path) -> str:
    """The sha256 of a file's bytes, read in blocks (a GGUF base model may not fit in memory twice)."""
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where remote objects are cached: $METEORA_CACHE or ~/.cache/meteora."""
    return Path(os.environ.get("METEORA_CACHE", Path.home() / ".cache" / "meteora"))
