"""Object storage for adapter blobs: a local directory or any S3-compatible server.

Keys are relative, '/'-separated paths of [A-Za-z0-9._-] segments (never '.' or '..'), so no key
can name anything outside the store's root or prefix. Blocking API: callers on an event loop run
it in a thread.
"""
from __future__ import annotations

import io
import os
import pathlib
import re
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Union

__all__ = ["ObjectStore", "FileStore", "S3Store", "open_store", "ObjectInfo",
           "BlobNotFound", "ObjectStoreUnavailable", "InvalidKey", "CHUNK"]

CHUNK = 1 << 20
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]{1,255}$")

Data = Union[bytes, bytearray, memoryview, BinaryIO, Iterable[bytes]]


class BlobNotFound(KeyError):
    """No object under this key."""


class ObjectStoreUnavailable(RuntimeError):
    """The object store cannot be reached or failed; retry later."""


class InvalidKey(ValueError):
    """A key that is not a plain relative path inside the store."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # unix seconds


def check_key(key: str) -> str:
    if not isinstance(key, str) or not key or len(key) > 1024:
        raise InvalidKey(f"invalid object key {key!r}")
    parts = key.split("/")
    for p in parts:
        if p in (".", "..") or not _SEGMENT.match(p):
            raise InvalidKey(f"invalid object key {key!r}: segments must match [A-Za-z0-9._-]+ and not be . or ..")
    return key


def _iter_chunks(data: Data, chunk: int = CHUNK) -> Iterator[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        mv = memoryview(data)
        for i in range(0, len(mv), chunk):
            yield mv[i:i + chunk]
        return
    if hasattr(data, "read"):
        while True:
            b = data.read(chunk)
            if not b:
                return
            yield b
        return
    for b in data:
        if b:
            yield b


class ObjectStore:
    """put/get/delete/exists/list over keys; subclasses implement the storage."""

    url: str = ""

    def put(self, key: str, data: Data) -> int:
        """Store data (bytes, a file-like object, or an iterable of byte chunks) atomically; returns its size."""
        raise NotImplementedError

    def get(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The object's bytes in chunks. Raises BlobNotFound (at the first next()) if absent."""
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.get(key))

    def delete(self, key: str) -> bool:
        """Remove the object; True if it existed (S3: always True)."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        raise NotImplementedError

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with prefix."""
        return (o.key for o in self.list_info(prefix))

    def check(self) -> None:
        """Raise ObjectStoreUnavailable if the store cannot be used right now."""

    def cleanup_temp(self, older_than_s: float) -> int:
        """Remove partial uploads older than this; returns how many."""
        return 0


class FileStore(ObjectStore):
    """A local directory. Writes go to a temp file in ROOT/.tmp and are renamed into place."""

    def __init__(self, root: str | os.PathLike, fsync: bool = True):
        self.root = pathlib.Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = self.root / ".tmp"
        self.tmp.mkdir(exist_ok=True)
        self.fsync = fsync
        self.url = self.root.as_uri()

    def _path(self, key: str) -> pathlib.Path:
        check_key(key)
        p = (self.root / key).resolve()
        if self.root not in p.parents or p.is_relative_to(self.tmp):
            raise InvalidKey(f"object key {key!r} escapes the store root")
        return p

    def put(self, key: str, data: Data) -> int:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="put-")
        except OSError as e:
            raise ObjectStoreUnavailable(f"file store {self.root}: {e}") from e
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for b in _iter_chunks(data):
                    f.write(b)
                    size += len(b)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if self.fsync:
                dfd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise ObjectStoreUnavailable(f"file store {self.root}: {e}") from e
            raise
        return size

    def get(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        path = self._path(key)

        def gen():
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                raise BlobNotFound(key) from None
            except OSError as e:
                raise ObjectStoreUnavailable(f"file store {self.root}: {e}") from e
            with f:
                while True:
                    b = f.read(chunk_size)
                    if not b:
                        return
                    yield b
        return gen()

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        except OSError as e:
            raise ObjectStoreUnavailable(f"file store {self.root}: {e}") from e

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            raise ObjectStoreUnavailable(f"file store {self.root}: {e}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for dirpath, dirnames, filenames in os.walk(self.root):
            if pathlib.Path(dirpath) == self.root:
                dirnames[:] = [d for d in dirnames if d != ".tmp"]
            dirnames.sort()
            for name in sorted(filenames):
                p = pathlib.Path(dirpath) / name
                key = p.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key, st.st_size, st.st_mtime)

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise ObjectStoreUnavailable(f"file store {self.root} is not writable")

    def cleanup_temp(self, older_than_s: float) -> int:
        n, now = 0, time.time()
        for p in self.tmp.glob("put-*"):
            try:
                if now - p.stat().st_mtime > older_than_s:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                pass
        return n


class S3Store(ObjectStore):
    """s3://bucket/prefix through boto3; endpoint from endpoint_url or AWS_ENDPOINT_URL."""

    def __init__(self, url: str, endpoint_url: str | None = None, create_bucket: bool = True, client=None):
        u = urllib.parse.urlparse(url)
        if u.scheme != "s3" or not u.netloc:
            raise ValueError(f"expected s3://bucket[/prefix], got {url!r}")
        self.url = url
        self.bucket = u.netloc
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", self.bucket):
            raise ValueError(f"invalid S3 bucket name {self.bucket!r} in {url!r}: 3-63 characters of a-z 0-9 . -")
        self.prefix = u.path.strip("/")
        if self.prefix:
            check_key(self.prefix)
            self.prefix += "/"
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.client("s3", endpoint_url=self.endpoint_url,
                                  config=Config(retries={"max_attempts": 2, "mode": "standard"},
                                                connect_timeout=2, read_timeout=30,
                                                s3={"addressing_style": "path"}))
        self.client = client
        self._bucket_ok = False
        self._create_bucket = create_bucket
        try:
            self._ensure_bucket()
        except ObjectStoreUnavailable:
            pass  # created lazily on first use once the server is up

    def _errors(self):
        import botocore.exceptions as be

        return be

    def _wrap(self, e: Exception, key: str | None = None) -> Exception:
        be = self._errors()
        if isinstance(e, be.ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound") and key is not None:
                return BlobNotFound(key)
            return ObjectStoreUnavailable(f"S3 {self.bucket}: {code}: {e}")
        return ObjectStoreUnavailable(f"S3 {self.bucket} at {self.endpoint_url or 'AWS'}: {e}")

    def _catch(self):
        be = self._errors()
        return (be.BotoCoreError, be.ClientError)

    def _ensure_bucket(self) -> None:
        if self._bucket_ok:
            return
        be = self._errors()
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except be.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code not in ("404", "NoSuchBucket", "NotFound") or not self._create_bucket:
                raise self._wrap(e) from e
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except be.ClientError as e2:
                if e2.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise self._wrap(e2) from e2
            except be.BotoCoreError as e2:
                raise self._wrap(e2) from e2
        except be.BotoCoreError as e:
            raise self._wrap(e) from e
        self._bucket_ok = True

    def _k(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put(self, key: str, data: Data) -> int:
        k = self._k(key)
        self._ensure_bucket()
        try:
            if isinstance(data, (bytes, bytearray, memoryview)):
                body = bytes(data)
                self.client.put_object(Bucket=self.bucket, Key=k, Body=body)
                return len(body)
            seekable = hasattr(data, "read") and getattr(data, "seekable", lambda: False)()
            if not seekable:
                spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)
                for b in _iter_chunks(data):
                    spool.write(b)
                data = spool
                data.seek(0)
            start = data.tell()
            size = data.seek(0, io.SEEK_END) - start
            data.seek(start)
            self.client.upload_fileobj(data, self.bucket, k)
            return size
        except self._catch() as e:
            raise self._wrap(e) from e

    def get(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        k = self._k(key)

        def gen():
            try:
                self._ensure_bucket()
                body = self.client.get_object(Bucket=self.bucket, Key=k)["Body"]
            except self._catch() as e:
                raise self._wrap(e, key) from e
            try:
                yield from body.iter_chunks(chunk_size)
            except self._catch() as e:
                raise self._wrap(e, key) from e
            finally:
                body.close()
        return gen()

    def delete(self, key: str) -> bool:
        k = self._k(key)
        try:
            self._ensure_bucket()
            self.client.delete_object(Bucket=self.bucket, Key=k)
            return True
        except self._catch() as e:
            raise self._wrap(e, key) from e

    def exists(self, key: str) -> bool:
        k = self._k(key)
        be = self._errors()
        try:
            self._ensure_bucket()
            self.client.head_object(Bucket=self.bucket, Key=k)
            return True
        except be.ClientError as e:
            if e.response.get("Error", {}).get("Code", "") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._wrap(e) from e
        except be.BotoCoreError as e:
            raise self._wrap(e) from e

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        try:
            self._ensure_bucket()
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self.prefix + prefix)
            for page in pages:
                for o in page.get("Contents", []):
                    key = o["Key"][len(self.prefix):]
                    yield ObjectInfo(key, int(o.get("Size", 0)), o["LastModified"].timestamp())
        except self._catch() as e:
            raise self._wrap(e) from e

    def check(self) -> None:
        self._bucket_ok = False
        self._ensure_bucket()


def open_store(url: str | None, data_dir: str | os.PathLike | None = None) -> ObjectStore:
    """file:///path, s3://bucket/prefix, a plain path, or None (-> DATA_DIR/blobs)."""
    if not url:
        if data_dir is None:
            raise ValueError("open_store needs an object store URL or a data directory")
        return FileStore(pathlib.Path(data_dir) / "blobs")
    if url.startswith("s3://"):
        return S3Store(url)
    if url.startswith("file://"):
        u = urllib.parse.urlparse(url)
        if u.netloc not in ("", "localhost"):
            raise ValueError(f"file URL must be local: {url!r}")
        return FileStore(urllib.parse.unquote(u.path))
    if "://" in url:
        raise ValueError(f"unsupported object store {url!r}: use file:///path or s3://bucket/prefix")
    return FileStore(url)
