"""One place that turns a URI (local path or ``s3://bucket/prefix``) into a filesystem.

S3 honours ``AWS_ENDPOINT_URL`` (an S3-compatible server such as MinIO or the tests' moto server) and the
usual ``AWS_*`` credential variables. Everything that reads or writes run data goes through here.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import posixpath
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorageError(IOError):
    """A URI cannot be read or written; the message names it."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def absolute_uri(uri: str) -> str:
    """An s3:// URI as is; a local path made absolute (Ray workers run in other working directories)."""
    uri = str(uri)
    return uri if is_s3(uri) else os.path.abspath(uri)


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_s3(base):
        return "s3://" + posixpath.join(base[len("s3://") :], *parts)
    return os.path.join(base, *parts)


def s3_filesystem(endpoint: Optional[str] = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem; a bare ``S3FileSystem()`` ignores AWS_ENDPOINT_URL, so pass it on."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    kwargs: dict[str, Any] = {}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    # Fail fast on an unreachable endpoint instead of retrying for minutes.
    kwargs["connect_timeout"] = float(os.environ.get("CLIQUECNN_S3_CONNECT_TIMEOUT", "5"))
    kwargs["request_timeout"] = float(os.environ.get("CLIQUECNN_S3_REQUEST_TIMEOUT", "30"))
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=3)
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """URI → (filesystem, path inside it)."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _wrap(uri: str, exc: Exception, action: str) -> StorageError:
    return StorageError(f"cannot {action} {uri}: {exc}")


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise _wrap(uri, exc, "reach") from exc


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type == pafs.FileType.Directory
    except OSError as exc:
        raise _wrap(uri, exc, "reach") from exc


def list_files(uri: str, suffixes: Iterable[str] = (), recursive: bool = True) -> list[str]:
    """Files under a directory URI, as URIs, sorted."""
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except OSError as exc:
        raise _wrap(uri, exc, "list") from exc
    suffixes = tuple(s.lower() for s in suffixes)
    out = [
        info.path
        for info in infos
        if info.type == pafs.FileType.File and (not suffixes or info.path.lower().endswith(suffixes))
    ]
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + p for p in out)


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as exc:
        raise _wrap(uri, exc, "create") from exc


def delete(uri: str) -> None:
    """Delete a file or a directory tree; missing is fine."""
    fs, path = resolve(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as exc:
        raise _wrap(uri, exc, "delete") from exc


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as fh:
            return fh.read()
    except FileNotFoundError as exc:
        raise StorageError(f"file not found: {uri}") from exc
    except OSError as exc:
        raise _wrap(uri, exc, "read") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file. Local writes go to a temporary name and are renamed (atomic); an S3 PUT is
    atomic by itself."""
    fs, path = resolve(uri)
    try:
        if is_s3(uri):
            with fs.open_output_stream(path) as fh:
                fh.write(data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))
    except OSError as exc:
        raise _wrap(uri, exc, "write") from exc


def fsync_dir(path: str) -> None:
    """Make a local directory's entries (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=4)
def _s3_client_for(endpoint: Optional[str], timeout: float):
    import boto3
    import botocore.config

    return boto3.client("s3", endpoint_url=endpoint, config=botocore.config.Config(
        connect_timeout=timeout, read_timeout=timeout * 2, retries={"total_max_attempts": 2}))


def s3_client():
    """A boto3 S3 client for what pyarrow's filesystem cannot do (ETags, conditional writes), with the
    same endpoint and fail-fast timeouts; built once per endpoint (building one takes a while)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    return _s3_client_for(endpoint, float(os.environ.get("CLIQUECNN_S3_CONNECT_TIMEOUT", "5")))


def digests(uri: str) -> dict[str, dict]:
    """Every file under a directory URI, by its path relative to it: ``{"size", "sha256"}`` on local disk
    (each file is also fsynced, so what a record names is durable before the record is written), the
    store's ``{"size", "etag"}`` on S3 (one listing, no download)."""
    fs, root = resolve(uri)
    out: dict[str, dict] = {}
    try:
        if is_s3(uri):
            bucket, _, prefix = root.partition("/")
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for page in pages:
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/"):
                        continue  # a directory marker
                    out[obj["Key"][len(prefix) + 1:]] = {"size": obj["Size"], "etag": obj["ETag"].strip('"')}
            return out
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                sha = hashlib.sha256()
                with open(path, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        sha.update(chunk)
                    os.fsync(fh.fileno())
                out[os.path.relpath(path, root)] = {"size": os.path.getsize(path), "sha256": sha.hexdigest()}
            fsync_dir(dirpath)
    except Exception as exc:  # noqa: BLE001 (OSError locally, botocore's errors on S3)
        raise _wrap(uri, exc, "checksum the files under") from exc
    return out


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def write_parquet(table: pa.Table, uri: str) -> None:
    """Write one Parquet file atomically (serialised in memory, then one write)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue())


def read_parquet(uris: str | list[str], columns: Optional[list[str]] = None) -> pa.Table:
    """Read one file, a list of files, or every ``*.parquet`` under a directory, as one table."""
    if isinstance(uris, str):
        uris = list_files(uris, (".parquet",)) if is_dir(uris) else [uris]
    tables = []
    for uri in uris:
        fs, path = resolve(uri)
        try:
            tables.append(pq.read_table(path, filesystem=fs, columns=columns))
        except FileNotFoundError as exc:
            raise StorageError(f"file not found: {uri}") from exc
        except (OSError, pa.ArrowInvalid) as exc:
            raise _wrap(uri, exc, "read Parquet from") from exc
    if not tables:
        raise StorageError(f"no Parquet files at {uris}")
    return pa.concat_tables(tables, promote_options="default")
