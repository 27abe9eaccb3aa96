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
from .files import atomic_write, cache_dir, file_sha256
from .local import LocalStore
from .mirror import local_dir
from .opening import open_store, read_uri
from .s3 import S3Store
from .uris import absolute_uri, checked_uri, is_remote, split_uri

__all__ = ["LocalStore", "S3Store", "absolute_uri", "atomic_write", "cache_dir", "checked_uri", "file_sha256", "is_remote",
           "local_dir", "open_store", "read_uri", "split_uri"]
