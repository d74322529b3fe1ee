"""Paths that are either local files or `s3://bucket/key` objects, behind a few small functions.

Everything that reads a source (annotation files, images, tar shards) goes through here, so the
same parameters work on a laptop folder and on a bucket. S3 access uses boto3 with the standard
AWS configuration only — credentials, region and endpoint come from the environment
(`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, ...) or the shared
config files, never from params. Missing objects raise `FileNotFoundError` like missing files, so
callers handle both the same way. One client is created per process (workers included) on first
use. Writing stays local: outputs are built in a local folder and renamed into place.
"""

from __future__ import annotations

import functools
import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

S3_PREFIX = "s3://"


def is_s3(path: str) -> bool:
    """True for an `s3://bucket/key` URI."""
    return str(path).startswith(S3_PREFIX)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` → `("bucket", "a/b")`."""
    rest = uri[len(S3_PREFIX) :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{uri}: no bucket name in S3 URI")
    return bucket, key


@functools.lru_cache(maxsize=1)
def _client() -> Any:
    import boto3
    from botocore.config import Config

    # A custom endpoint (moto, MinIO, Ceph) rarely serves virtual-host buckets: use path style.
    custom = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    style = "path" if custom else "auto"
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": style})
    return boto3.client("s3", config=config)


def _is_missing(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound")


def read_bytes(path: str) -> bytes:
    """The whole content of a local file or S3 object; `FileNotFoundError` when it is absent."""
    if not is_s3(path):
        return Path(path).read_bytes()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(path)
    try:
        return _client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if _is_missing(exc):
            raise FileNotFoundError(path) from None
        raise OSError(f"{path}: {exc}") from None


@contextmanager
def open_stream(path: str) -> Iterator[BinaryIO]:
    """A forward-only binary stream (for tar shards, read once without holding them in memory)."""
    if not is_s3(path):
        with open(path, "rb") as f:
            yield f
        return
    from botocore.exceptions import ClientError

    bucket, key = split_s3(path)
    try:
        body = _client().get_object(Bucket=bucket, Key=key)["Body"]
    except ClientError as exc:
        if _is_missing(exc):
            raise FileNotFoundError(path) from None
        raise OSError(f"{path}: {exc}") from None
    try:
        yield body
    finally:
        body.close()


def exists(path: str) -> bool:
    """True when a local file/folder or an S3 object exists."""
    if not is_s3(path):
        return Path(path).exists()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(path)
    try:
        _client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if _is_missing(exc):
            return False
        raise OSError(f"{path}: {exc}") from None


def list_files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """Sorted files directly under a local folder or S3 prefix whose names end with a suffix."""
    if not is_s3(path):
        folder = Path(path)
        return sorted(str(p) for p in folder.iterdir() if p.is_file() and p.name.endswith(suffixes))
    bucket, prefix = split_s3(path)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    found = []
    pages = _client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, Delimiter="/"
    )
    for page in pages:
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(suffixes):
                found.append(f"{S3_PREFIX}{bucket}/{obj['Key']}")
    return sorted(found)


def is_dir(path: str) -> bool:
    """A local folder, or an S3 URI ending in `/` or naming a prefix with objects under it."""
    if not is_s3(path):
        return Path(path).is_dir()
    if path.endswith("/"):
        return True
    bucket, prefix = split_s3(path)
    resp = _client().list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/", MaxKeys=1)
    return resp.get("KeyCount", 0) > 0


def parent(path: str) -> str:
    """The folder holding `path` (`s3://b/x/y.json` → `s3://b/x`)."""
    if is_s3(path):
        return posixpath.dirname(path.rstrip("/"))
    return str(Path(path).parent)


def join(root: str, relative: str) -> str:
    """`relative` (a posix path already checked not to escape) under `root`."""
    if is_s3(root):
        return root.rstrip("/") + "/" + relative
    return str(Path(root) / relative)


def name(path: str) -> str:
    """The last component of a path or URI."""
    return posixpath.basename(str(path).rstrip("/")) if is_s3(path) else Path(path).name
