"""Object storage: ``s3://``, ``gs://`` and whatever pyarrow's or fsspec's file systems open.

Everywhere a command takes a path it may take a URI instead (``vae embed --input/--output``,
``vae serve --repo``, ``vae export --repo``, ``--model``). A ``Location`` is a local ``Path`` or
an ``ObjectPath``; the stages ask this module for what they need (list a prefix, read a range,
put an object, download a file) and never see the store's client.

Credentials and endpoints come from the standard environment, never from flags:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` and, for S3-compatible stores
(SeaweedFS, MinIO, Ceph), ``AWS_ENDPOINT_URL``; Google's application default credentials for
``gs://``. pyarrow opens s3, gs and hdfs itself; any other scheme goes through fsspec.

What ``put`` and ``upload`` write appears whole or not at all (written under a hidden key, then
moved into place), and the writers put a completion marker last.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Union

from vaeserve.errors import MissingExtraError, StorageError, first_line

Location = Union[Path, "ObjectPath"]


def is_uri(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def location(text: str | Path) -> Location:
    """A URI as an ObjectPath, anything else (``file://`` included) as a local Path."""
    text = str(text)
    if is_uri(text):
        return ObjectPath(text.rstrip("/"))
    return Path(text.removeprefix("file://"))


@dataclass(frozen=True)
class ObjectInfo:
    path: ObjectPath
    size: int
    mtime: datetime | None

    def stamp(self) -> str:
        """Changes when the object is replaced: its size and modification time."""
        return f"{self.size}:{self.mtime.isoformat() if self.mtime else ''}"


@dataclass(frozen=True)
class ObjectPath:
    """An object, or a prefix of objects, in a store: ``scheme://bucket/key``."""

    uri: str

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(f"{self.uri}/{name}")

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.uri.rsplit("/", 1)[0])

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    @property
    def fs(self) -> Any:
        scheme, rest = self.uri.split("://", 1)
        return _filesystem(scheme, rest.split("/", 1)[0])

    @property
    def key(self) -> str:
        """The path the file system knows it by: ``bucket/key``."""
        return self.uri.split("://", 1)[1]

    def exists(self) -> bool:
        return self._info().type.name != "NotFound"

    def is_file(self) -> bool:
        return self._info().type.name == "File"

    def is_dir(self) -> bool:
        """A prefix that holds objects (object stores have no empty folders)."""
        return self._info().type.name == "Directory"

    def files(self) -> list[ObjectInfo]:
        """Every object under this prefix, sorted by key."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.key, recursive=True, allow_not_found=True)
        with said(self, "list"):
            infos = self.fs.get_file_info(selector)
        scheme = self.uri.split("://", 1)[0]
        found = [
            ObjectInfo(ObjectPath(f"{scheme}://{i.path}"), i.size, i.mtime)
            for i in infos
            if i.type.name == "File"
        ]
        return sorted(found, key=lambda info: info.path.uri)

    def stat(self) -> ObjectInfo:
        info = self._info()
        if info.type.name != "File":
            raise StorageError(f"{self}: no such object")
        return ObjectInfo(self, info.size, info.mtime)

    def open(self) -> BinaryIO:
        """A seekable reader (ranged GETs)."""
        with said(self, "open"):
            return self.fs.open_input_file(self.key)

    def read_bytes(self) -> bytes:
        with self.open() as handle:
            return handle.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def put(self, data: bytes | memoryview) -> None:
        """The whole object: readers see the old object or the new, never part of it."""
        self._atomically(lambda out: out.write(data))

    def write_text(self, text: str) -> None:
        self.put(text.encode())

    def upload(self, source: Path) -> None:
        """A local file as this object, streamed, and as atomic as ``put``."""
        with open(source, "rb") as handle:
            self._atomically(lambda out: shutil.copyfileobj(handle, out, 8 << 20))

    def _atomically(self, write: Callable[[Any], object]) -> None:
        """Written under a hidden temporary key, then moved (a server-side copy) to this one.
        A stream that is closed, even by an exception or a worker's SIGTERM, completes its
        upload with whatever it holds, so a direct write could leave a torn object under the
        final name; the copy makes the final key appear whole or not at all. Readers of
        prefixes skip the hidden key ("." first), and a torn one is removed here when it can be."""
        temporary = self.with_name(f".{self.name}.tmp-{uuid.uuid4().hex[:12]}")
        with said(self, "write"):
            try:
                with self.fs.open_output_stream(temporary.key) as out:
                    write(out)
                self.fs.move(temporary.key, self.key)
            except BaseException:
                with contextlib.suppress(OSError):
                    self.fs.delete_file(temporary.key)
                raise

    def download(self, target: Path) -> None:
        """This object as ``target``, renamed into place once whole."""
        from vaeserve.atomic import atomic_path

        target.parent.mkdir(parents=True, exist_ok=True)
        with (
            said(self, "download"),
            self.open() as handle,
            atomic_path(target) as tmp,
            open(tmp, "wb") as out,
        ):
            shutil.copyfileobj(handle, out, 8 << 20)

    def unlink(self, missing_ok: bool = True) -> None:
        if missing_ok and not self.is_file():  # absent, or a prefix (a "folder") of other objects
            return
        with said(self, "delete"):
            self.fs.delete_file(self.key)

    def remove_tree(self) -> None:
        """Every object under this prefix."""
        for info in self.files():
            info.path.unlink()

    def _info(self) -> Any:
        with said(self, "look up"):
            return self.fs.get_file_info(self.key)


@contextlib.contextmanager
def said(path: ObjectPath, verb: str) -> Iterator[None]:
    """A store's failure (no credentials, no bucket, refused, unreachable) as a StorageError
    naming the URI and where credentials come from."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageError(f"{path}: no such object") from None
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot {verb} {path}: {first_line(exc)}{_credentials_hint(path)}") from None


def _credentials_hint(path: ObjectPath) -> str:
    if path.uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        where = f"the endpoint {endpoint} (AWS_ENDPOINT_URL)" if endpoint else "AWS (no AWS_ENDPOINT_URL set)"
        return (
            f" (store: {where}; credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the AWS config)"
        )
    if path.uri.startswith("gs://"):
        return " (credentials: Google's application default credentials)"
    return ""


@functools.cache
def _filesystem(scheme: str, bucket: str) -> Any:
    """One file system per scheme and bucket, made once: pyarrow's where it has one, else fsspec's."""
    try:
        import pyarrow.fs as pafs
    except ImportError:
        raise MissingExtraError(f"{scheme}:// paths", "store", "pyarrow") from None
    uri = f"{scheme}://{bucket}/"
    try:
        return pafs.FileSystem.from_uri(uri)[0]
    except ValueError:  # pyarrow's ArrowInvalid: a scheme it has no file system for
        pass
    except OSError as exc:
        if "Unrecognized filesystem type" not in str(exc):
            raise StorageError(f"cannot open {uri}: {first_line(exc)}") from None
    try:
        import fsspec

        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{uri}: no file system for {scheme}:// ({first_line(exc)})") from None


# What the stages do to a Location, local or on a store, each written once.


def write_whole(path: Location, data: bytes | memoryview) -> None:
    """``data`` as the file or object ``path``, appearing whole or not at all: renamed into
    place on a disk, moved into place on a store."""
    if isinstance(path, ObjectPath):
        path.put(data)
        return
    from vaeserve.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def open_for_reading(path: Location) -> BinaryIO:
    """A seekable reader of a file or an object."""
    return path.open() if isinstance(path, ObjectPath) else open(path, "rb")


def size_of(path: Location) -> int:
    return path.stat().size if isinstance(path, ObjectPath) else path.stat().st_size


def names_in(folder: Location) -> list[Location]:
    """Every file under a local folder (its own entries) or object under a prefix, sorted."""
    if isinstance(folder, ObjectPath):
        return [info.path for info in folder.files()]
    return sorted(folder.iterdir()) if folder.is_dir() else []


def remove(path: Location) -> None:
    """A file, a folder or a prefix, and everything in it; nothing if it is not there."""
    if isinstance(path, ObjectPath):
        path.remove_tree()
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
