"""A URI to its store, and the bytes at a URI."""
from __future__ import annotations

from pathlib import Path

from .local import LocalStore
from .s3 import S3Store
from .uris import checked_uri, is_remote, split_uri


def open_store(uri: str | Path) -> "LocalStore | S3Store":
    text = checked_uri(uri)
    if is_remote(text):
        bucket, _, prefix = text.removeprefix("s3://").partition("/")
        if len(bucket) < 3:
            raise ValueError(f"{text!r}: an S3 URI needs a bucket name of 3 or more characters")
        return S3Store(bucket, prefix.strip("/"))
    return LocalStore(Path(text.removeprefix("file://")))


def read_uri(uri: str) -> bytes:
    """The bytes at `uri`: a local file, file:// or s3:// object (StoreError if it cannot be read)."""
    parent, key = split_uri(checked_uri(uri))
    return open_store(parent).read_bytes(key)
