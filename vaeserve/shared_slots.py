"""The client's shared memory: one POSIX object of slots, a request's inputs then its outputs.

Used by the Python client's Encode with ``shared_memory=True`` and by ``vae bench``'s load
generator; the server maps what they register (service.shared_memory).
"""

from __future__ import annotations

import uuid
from multiprocessing import shared_memory

import numpy as np

from vaeserve._proto import vae_pb2
from vaeserve.codec import FLOAT32, UINT8
from vaeserve.errors import VaeError

# The shared-memory objects of vaeserve's clients: the only ones a server maps by default.
SHARED_MEMORY_PREFIX = "vaeserve-"


class SharedSlots:
    """A shared-memory object of ``count`` slots: a request's inputs, then room for its outputs.
    The client uses one slot per request in flight; so does the benchmarks' load generator."""

    def __init__(self, count: int, slot_bytes: int, input_bytes: int) -> None:
        try:
            # Named with the prefix a server accepts by default (--shared-memory-prefix).
            name = f"{SHARED_MEMORY_PREFIX}{uuid.uuid4().hex}"
            self.memory = shared_memory.SharedMemory(name=name, create=True, size=count * slot_bytes)
        except OSError as exc:
            raise VaeError(f"cannot create {count * slot_bytes:,} bytes of shared memory ({exc})") from None
        self.name = f"client-{uuid.uuid4().hex}"
        self.slot_bytes, self.input_bytes = slot_bytes, input_bytes

    def registration(self) -> vae_pb2.RegisterSharedMemoryRequest:
        return vae_pb2.RegisterSharedMemoryRequest(
            name=self.name, key=self.memory.name, byte_size=self.memory.size
        )

    def put(self, slot: int, rows: np.ndarray) -> tuple[vae_pb2.Tensor, vae_pb2.SharedMemoryRef]:
        """Copy rows into a slot: their Tensor, and the range left for the outputs."""
        if rows.nbytes > self.input_bytes:
            raise ValueError(
                f"a chunk of shape {rows.shape} ({rows.nbytes:,} bytes) does not fit the "
                f"{self.input_bytes:,}-byte input slot sized from the model's input size"
            )
        base = slot * self.slot_bytes
        view = np.ndarray(rows.shape, rows.dtype, buffer=self.memory.buf, offset=base)
        view[...] = rows
        where = vae_pb2.SharedMemoryRef(region=self.name, offset=base, byte_size=rows.nbytes)
        dtype = UINT8 if rows.dtype == np.uint8 else FLOAT32
        tensor = vae_pb2.Tensor(shape=rows.shape, dtype=dtype, shared_memory=where)
        outputs = vae_pb2.SharedMemoryRef(
            region=self.name, offset=base + self.input_bytes, byte_size=self.slot_bytes - self.input_bytes
        )
        return tensor, outputs

    def read(self, ref: vae_pb2.SharedMemoryRef, byte_size: int, field: str) -> memoryview:
        if ref.region != self.name or ref.byte_size != byte_size or ref.offset + byte_size > self.memory.size:
            raise VaeError(f"{field}: the server pointed outside this client's shared memory")
        return self.memory.buf[ref.offset : ref.offset + byte_size]

    def close(self) -> None:
        """Unmap and delete the object (after unregistering it from the server)."""
        self.memory.close()
        self.memory.unlink()
