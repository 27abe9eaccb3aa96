"""A store on an S3 prefix (boto3, imported when one opens): single PUTs or completed multipart uploads, conditional
PUTs for the compare-and-swap, botocore's standard retries."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

from ..errors import StoreError
from .uris import check_key

MULTIPART_THRESHOLD = 64 * 2**20


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
