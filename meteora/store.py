"""Object stores: one small interface over a local directory and S3, addressed by URI; and atomic local writes.

    open_store("registry/")  or  open_store("file:///srv/registry")   -> LocalStore (no server needed)
    open_store("s3://bucket/prefix")                                 -> S3Store (boto3)

Keys are "/"-separated paths below the store's root, checked so that none escapes it. Writes that others read
are atomic: a temporary file renamed into place locally, a single PUT (or one completed multipart upload) on
S3. `write_if_unchanged` is a compare-and-swap for small objects several writers share (the registry index): a
lock on the directory locally, a conditional PUT (If-Match / If-None-Match) on S3. S3 uses boto3's usual
credential chain; the endpoint comes from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (boto3 reads them); retries
with exponential backoff are botocore's "standard" mode (AWS_MAX_ATTEMPTS overrides the attempts); files above
64 MiB go up and down in parts. boto3 is imported when an S3 store opens.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from .errors import StoreError

__all__ = ["LocalStore", "S3Store", "absolute_uri", "atomic_write", "cache_dir", "checked_uri", "file_sha256", "is_remote",
           "local_dir", "open_store", "read_uri", "split_uri"]

MULTIPART_THRESHOLD = 64 * 2**20


def open_store(uri: str | Path) -> "LocalStore | S3Store":
    text = checked_uri(uri)
    if is_remote(text):
        bucket, _, prefix = text.removeprefix("s3://").partition("/")
        if len(bucket) < 3:
            raise ValueError(f"{text!r}: an S3 URI needs a bucket name of 3 or more characters")
        return S3Store(bucket, prefix.strip("/"))
    return LocalStore(Path(text.removeprefix("file://")))


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


def split_uri(uri: str) -> tuple[str, str]:
    """'s3://b/p/x.json' -> ('s3://b/p', 'x.json'): the parent as a store URI and the last name as its key."""
    parent, _, name = str(uri).rstrip("/").rpartition("/")
    return parent or ".", name


def read_uri(uri: str) -> bytes:
    """The bytes at `uri`: a local file, file:// or s3:// object (StoreError if it cannot be read)."""
    parent, key = split_uri(checked_uri(uri))
    return open_store(parent).read_bytes(key)


def check_key(key: str) -> str:
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or any(part in ("..", ".") for part in parts) or "\\" in key:
        raise ValueError(f"object key {key!r} is not a plain relative path")
    return key


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


class S3Store:
    def __init__(self, bucket: str, prefix: str):
        self.bucket, self.prefix = bucket, prefix
        self.uri = f"s3://{bucket}/{prefix}".rstrip("/")
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        config = Config(retries={"mode": "standard"}, connect_timeout=5, read_timeout=60)
        self.client = boto3.client("s3", config=config)
        self._transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)
        self._ClientError, self._failures = ClientError, (ClientError, BotoCoreError)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None):
        try:
            yield
        except self._failures as err:
            where = self.uri if key is None else f"s3://{self.bucket}/{self._key(key)}"
            raise StoreError(f"cannot {action} {where}: {err}") from None

    def exists(self, key: str) -> bool:
        return self.tag(key) is not None

    def tag(self, key: str) -> str | None:
        """The object's ETag (it changes when the object does), None if it is missing."""
        with self._errors("check", key):
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ETag"]
            except self._ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

    def read_bytes(self, key: str) -> bytes:
        with self._errors("read", key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors("write", key):  # one PUT, or one multipart upload completed at the end: atomic either way
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key), Config=self._transfer)

    def write_if_unchanged(self, key: str, data: bytes, expected: bytes | None) -> bool:
        """Write `data` only if `key` still holds `expected` (None: absent); False, and nothing written, if not.
        The PUT is conditional on the ETag that was read (or on no object), so S3 refuses it if anyone wrote since."""
        bucket, name = self.bucket, self._key(key)
        with self._errors("write", key):
            try:
                if expected is None:
                    self.client.put_object(Bucket=bucket, Key=name, Body=data, IfNoneMatch="*")
                    return True
                current = self.client.get_object(Bucket=bucket, Key=name)
                if current["Body"].read() != expected:
                    return False
                self.client.put_object(Bucket=bucket, Key=name, Body=data, IfMatch=current["ETag"])
                return True
            except self._ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                    return False
                raise

    def download(self, key: str, path: Path) -> None:
        with self._errors("read", key):
            self.client.download_file(self.bucket, self._key(key), str(path), Config=self._transfer)

    def list(self) -> list[str]:
        return sorted(self.etags())

    def etags(self) -> dict[str, str]:
        """Every key under the prefix -> its ETag (which changes when the object does)."""
        root = f"{self.prefix}/" if self.prefix else ""
        with self._errors("list", None):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root)
            return {obj["Key"].removeprefix(root): obj["ETag"] for page in pages for obj in page.get("Contents", [])}
