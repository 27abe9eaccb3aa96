"""A local directory holding what a URI holds: the directory itself, or a mirror of an S3 prefix kept in step by ETag."""
from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_write, cache_dir
from .local import LocalStore
from .opening import open_store


def local_dir(uri: str) -> Path:
    """A local directory with the objects under `uri`: the directory itself, or a mirror of an S3 prefix that
    fetches what is new or changed (by ETag) since the last call and drops what the prefix no longer holds."""
    store = open_store(uri)
    if isinstance(store, LocalStore):
        return store.root
    target = cache_dir() / "mirror" / store.bucket / store.prefix
    record = cache_dir() / "mirror" / ".etags" / f"{Path(store.bucket, store.prefix)}.json"  # {key: ETag} held
    try:
        held = json.loads(record.read_text())
    except (OSError, ValueError):
        held = {}
    listed = {key: tag for key, tag in store.etags().items() if key and not key.endswith("/")}  # no "folder" markers
    for key in held.keys() - listed.keys():
        (target / key).unlink(missing_ok=True)
    for key, tag in listed.items():
        if held.get(key) != tag or not (target / key).is_file():
            atomic_write(target / key, lambda tmp, key=key: store.download(key, Path(tmp)))
    if listed != held:
        atomic_write(record, json.dumps(listed, indent=1, sort_keys=True).encode())
    return target
