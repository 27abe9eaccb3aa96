"""How stores are addressed: the URIs accepted (local path, file://, s3://), their parts, and object keys that
cannot escape their store."""
from __future__ import annotations

from pathlib import Path, PurePosixPath


def checked_uri(uri: str | Path) -> str:
    """`uri` as text, if it is a local path, file:// or s3:// (ValueError naming it otherwise: pathlib would
    take gs://b/x for the local directory gs:/b/x)."""
    text = str(uri)
    if "://" in text and not text.startswith(("file://", "s3://")):
        raise ValueError(f"{text!r}: unsupported URI scheme (use a local path, file://, or s3://)")
    return text


def is_remote(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def absolute_uri(uri: str | Path) -> str:
    """The URI to hand to other processes: s3:// as it is, a local path (or file://) made absolute."""
    text = checked_uri(uri)
    return text if is_remote(text) else str(Path(text.removeprefix("file://")).resolve())


def split_uri(uri: str) -> tuple[str, str]:
    """'s3://b/p/x.json' -> ('s3://b/p', 'x.json'): the parent as a store URI and the last name as its key."""
    parent, _, name = str(uri).rstrip("/").rpartition("/")
    return parent or ".", name


def check_key(key: str) -> str:
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or any(part in ("..", ".") for part in parts) or "\\" in key:
        raise ValueError(f"object key {key!r} is not a plain relative path")
    return key
