"""Image and model stores: ``file://`` folders and ``s3://`` buckets behind one small interface.

The S3 client is made on first use in the process that uses it (never at import, never before
a fork). ``STILLTAG_S3_ENDPOINT_URL`` points it at MinIO or any S3-compatible server.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

from shared.errors import SettingsError, UserError


class StoreError(UserError):
    """An object could not be read or written; the message says which and why."""


class ObjectMissing(StoreError):
    pass


class ObjectTooLarge(StoreError):
    pass


class LocalStore:
    """Objects as files under a root folder (``file:///path``)."""

    def __init__(self, root: Path):
        self.root = root

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / key.lstrip("/")

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        path = self._path(key)
        try:
            size = path.stat().st_size
            if max_bytes is not None and size > max_bytes:
                raise ObjectTooLarge(f"{path} is {size} bytes, over the {max_bytes}-byte limit")
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectMissing(f"no such file: {path}") from None
        except IsADirectoryError:
            raise ObjectMissing(f"{path} is a folder, not a file") from None
        except PermissionError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from None

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)

    def put_file(self, key: str, source: Path) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(path)

    def get_file(self, key: str, dest: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectMissing(f"no such file: {source}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def location(self, key: str) -> str:
        return str(self._path(key))


class S3Store:
    """Objects in an S3 bucket under a prefix (``s3://bucket/prefix``)."""

    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str = "", max_connections: int = 16):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or None
        self.max_connections = max_connections
        self._client = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint={self.endpoint_url!r})"

    @property
    def client(self):
        # boto3 clients are thread-safe once made; making one is not, hence the lock.
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                self._client = boto3.session.Session().client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    config=Config(max_pool_connections=self.max_connections, retries={"max_attempts": 3}),
                )
            return self._client

    def _key(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _missing(self, exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        return code in ("NoSuchKey", "404", "NotFound")

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(key)
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=full)
            size = obj.get("ContentLength")
            if max_bytes is not None and size is not None and size > max_bytes:
                obj["Body"].close()
                raise ObjectTooLarge(f"s3://{self.bucket}/{full} is {size} bytes, over the {max_bytes}-byte limit")
            return obj["Body"].read()
        except ClientError as exc:
            if self._missing(exc):
                raise ObjectMissing(f"no such object: s3://{self.bucket}/{full}") from None
            raise StoreError(f"cannot read s3://{self.bucket}/{full}: {exc}") from None
        except BotoCoreError as exc:
            raise StoreError(f"cannot read s3://{self.bucket}/{full}: {exc}") from None

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, source: Path) -> None:
        self.client.upload_file(str(source), self.bucket, self._key(key))

    def get_file(self, key: str, dest: Path) -> None:
        from botocore.exceptions import ClientError

        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(key), str(dest))
        except ClientError as exc:
            if self._missing(exc):
                raise ObjectMissing(f"no such object: s3://{self.bucket}/{self._key(key)}") from None
            raise

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if self._missing(exc):
                return False
            raise

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


Store = LocalStore | S3Store


def open_store(url: str, *, endpoint_url: str = "", max_connections: int = 16) -> Store:
    """A store for a ``file://`` or ``s3://`` URL (a folder or a bucket with a prefix)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(Path(unquote(parsed.netloc + parsed.path)))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise SettingsError(f"{url!r} names no bucket; write s3://BUCKET/prefix")
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url, max_connections=max_connections)
    raise SettingsError(f"unsupported store URL {url!r}: use file:///path or s3://bucket/prefix")


def is_local(url: str) -> bool:
    """Whether a store URL (or an image URL template) names a local folder (``file://``)."""
    return urlparse(url).scheme == "file"


class ImageSource:
    """Reads image bytes by ID through a URL template such as ``s3://stills/{image_id}.jpg``.

    One image per call; the tagging worker fetches a batch's images concurrently from S3 in threads of
    its own, or reads a local one in the thread that decodes it (``worker.prepare_pool``).
    """

    def __init__(self, template: str, *, endpoint_url: str = "", concurrency: int = 16, max_bytes: int | None = None):
        if "{image_id}" not in template:
            raise SettingsError("the image URL must contain {image_id}, e.g. s3://stills/{image_id}.jpg")
        head, _, tail = template.partition("{image_id}")
        root, _, prefix = head.rpartition("/")
        self.store = open_store(root + "/", endpoint_url=endpoint_url, max_connections=concurrency)
        self.key_template = prefix + "{image_id}" + tail
        self.max_bytes = max_bytes

    def key(self, image_id: int) -> str:
        return self.key_template.format(image_id=image_id)

    def fetch(self, image_id: int) -> bytes:
        return self.store.get(self.key(image_id), max_bytes=self.max_bytes)

    def put(self, image_id: int, data: bytes) -> None:
        self.store.put(self.key(image_id), data)
