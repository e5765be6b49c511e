"""Shared-memory regions of clients on the server's host: tensors without the copies.

A client creates a POSIX shared-memory object, writes its inputs there and registers
it; requests then carry only a reference (region, offset, size), and Encode can write
its outputs back into the region. Bulk bytes never cross the socket, which on a
CPU-bound host is most of what a large call costs besides the model (docs/benchmarks.md).

The server maps ``/dev/shm/KEY`` read-write, and only a regular file there that its own user
owns, opened without following a link: a key that is a symlink (or a hard link's second name)
could otherwise aim the server's writes at any file it may write. Every reference is bounds-checked; a
region unregistered while a call uses it stays mapped until that call is done (the
mapping is released when its last view is).
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import stat
from pathlib import Path

import numpy as np

from vaeserve._proto import vae_pb2
from vaeserve.errors import UNKNOWN_REGION, TensorError
from vaeserve.service.errors import (
    OverloadedError,
    RegionExistsError,
    RegionNotFoundError,
    SharedMemoryDisabledError,
)

SHM_ROOT = Path("/dev/shm")
KEY = re.compile(r"/?[A-Za-z0-9_.-]{1,200}")


class SharedMemoryRegions:
    def __init__(self, enabled: bool, max_regions: int = 256, prefix: str = "") -> None:
        self.enabled, self.max_regions, self.prefix = enabled, max_regions, prefix
        self.regions: dict[str, mmap.mmap] = {}
        self.paths: dict[str, Path] = {}

    def register(self, name: str, key: str, byte_size: int) -> None:
        self._check_enabled()
        if not name:
            raise TensorError("name: empty; give the region a name to refer to it by")
        self._forget_deleted()
        if name in self.regions:
            raise RegionExistsError(f"a region named {name!r} is already registered; unregister it first")
        if len(self.regions) >= self.max_regions:
            raise OverloadedError(f"{self.max_regions} regions are registered already; unregister some first")
        if not KEY.fullmatch(key):
            raise TensorError(f"key {key!r}: expected a shared-memory object name like 'psm_1a2b' (no '/')")
        if not key.lstrip("/").startswith(self.prefix):
            raise TensorError(
                f"key {key!r}: this server maps only objects named {self.prefix}... "
                "(--shared-memory-prefix); name yours so"
            )
        path = SHM_ROOT / key.lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise RegionNotFoundError(f"key {key!r}: no shared-memory object {path} on this host") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise TensorError(
                    f"key {key!r}: {path} is a symbolic link; register the object itself"
                ) from None
            raise TensorError(f"key {key!r}: cannot open {path} ({exc.strerror})") from None
        try:
            found = os.fstat(fd)
            if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1 or found.st_uid != os.geteuid():
                raise TensorError(
                    f"key {key!r}: {path} is not a shared-memory object of this server's user "
                    f"(uid {os.geteuid()}): expected a regular file it owns, with one name"
                )
            size = found.st_size
            if not 0 < byte_size <= size:
                raise TensorError(f"byte_size {byte_size:,}: the object {path} holds {size:,} bytes")
            self.regions[name] = mmap.mmap(fd, byte_size)
            self.paths[name] = path
        finally:
            os.close(fd)

    def unregister(self, name: str) -> None:
        self._check_enabled()
        self.paths.pop(name, None)
        if self.regions.pop(name, None) is None:
            raise RegionNotFoundError(f"{UNKNOWN_REGION} {name!r} is registered")

    def close(self) -> None:
        self.regions.clear()
        self.paths.clear()

    def _forget_deleted(self) -> None:
        """Drop regions whose object its client has deleted: a client that moved to another
        worker (or lost its connection) cannot unregister here, and its pages stay
        allocated while this process maps them."""
        for name, path in list(self.paths.items()):
            if not path.exists():
                del self.regions[name], self.paths[name]

    def read(self, ref: vae_pb2.SharedMemoryRef, byte_size: int, field: str) -> memoryview:
        """The ``byte_size`` bytes a tensor's reference points at."""
        if ref.byte_size != byte_size:
            raise TensorError(
                f"{field}.shared_memory: byte_size {ref.byte_size:,}; the shape and dtype take {byte_size:,}"
            )
        return self._range(ref, field)

    def write(
        self, ref: vae_pb2.SharedMemoryRef, outputs: dict[str, np.ndarray], field: str
    ) -> dict[str, vae_pb2.Tensor]:
        """Copy the outputs back to back into the range; Tensors that point at them."""
        needed = sum(a.nbytes for a in outputs.values())
        if needed > ref.byte_size:
            names = " and ".join(outputs)
            raise TensorError(f"{field}: {names} need {needed:,} bytes; the range holds {ref.byte_size:,}")
        target = self._range(ref, field)
        tensors, offset = {}, 0
        for name, array in outputs.items():
            array = np.ascontiguousarray(array, dtype="<f4")
            np.frombuffer(target, np.uint8, array.nbytes, offset)[:] = array.view(np.uint8).reshape(-1)
            place = vae_pb2.SharedMemoryRef(
                region=ref.region, offset=ref.offset + offset, byte_size=array.nbytes
            )
            tensors[name] = vae_pb2.Tensor(
                shape=array.shape, dtype=vae_pb2.DATA_TYPE_FLOAT32, shared_memory=place
            )
            offset += array.nbytes
        return tensors

    def _range(self, ref: vae_pb2.SharedMemoryRef, field: str) -> memoryview:
        self._check_enabled()
        region = self.regions.get(ref.region)
        if region is None:
            raise RegionNotFoundError(f"{field}.shared_memory: {UNKNOWN_REGION} {ref.region!r} is registered")
        if ref.offset + ref.byte_size > len(region):
            raise TensorError(
                f"{field}.shared_memory: bytes {ref.offset:,} to {ref.offset + ref.byte_size:,} lie "
                f"outside region {ref.region!r} of {len(region):,} bytes"
            )
        return memoryview(region)[ref.offset : ref.offset + ref.byte_size]

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise SharedMemoryDisabledError(
                "shared memory is off on this server; start it with --shared-memory, or send bytes"
            )
