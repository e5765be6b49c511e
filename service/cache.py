"""The response cache (``--cache-mb``): repeated deterministic calls answered from memory.

One byte-bounded, least-recently-used cache per server process, shared by every loaded version
and reached through the data plane's methods (``@cached``), so vae.v1 and OIP over gRPC and HTTP
all use it (service.uses). A call is cached only when its answer is a function of its bytes: Encode and Decode
that draw nothing (or draw with a seed), seeded Reconstruct, SamplePrior and Score. The key is the
version (name, number and its graphs' SHA-256: a version overwritten in place, or a new one, never
answers from another's entries), the use, and the request's exact content: every tensor's dtype,
shape and bytes, every other argument (seeds, k, options). Answers are kept read-only and given
out as they are; a front end copies them onto its wire.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np

Answer = dict[str, np.ndarray]


class ResponseCache:
    def __init__(self, capacity_bytes: int, metrics=None) -> None:
        self.capacity = capacity_bytes
        self.metrics = metrics
        self.entries: OrderedDict[bytes, tuple[Answer, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.lock = threading.Lock()  # calls end on the event loop; tests and tools may read from threads

    def get(self, key: bytes, model: str, use: str) -> Answer | None:
        with self.lock:
            found = self.entries.get(key)
            if found is not None:
                self.entries.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
        if self.metrics is not None:
            self.metrics.cache_event("hits" if found is not None else "misses", model, use)
        return None if found is None else found[0]

    def put(self, key: bytes, answer: Answer, model: str) -> Answer:
        """Keep ``answer`` (read-only from now on) unless it alone is over the bound; give it back."""
        kept = {name: _frozen(array) for name, array in answer.items()}
        size = len(key) + sum(array.nbytes for array in kept.values())
        if size > self.capacity:
            return kept
        evicted = 0
        with self.lock:
            if key in self.entries:
                return self.entries[key][0]
            self.entries[key] = (kept, size)
            self.bytes += size
            while self.bytes > self.capacity:
                _, (_, dropped) = self.entries.popitem(last=False)
                self.bytes -= dropped
                evicted += 1
            self.evictions += evicted
            held = self.bytes
        if self.metrics is not None:
            if evicted:
                self.metrics.cache_event("evictions", "", "", evicted)
            self.metrics.cache_bytes.set(held)
        return kept


def _frozen(array: np.ndarray) -> np.ndarray:
    """Read-only, owning its bytes: a view would keep (and let others write) the batch it is of."""
    if array.base is not None or not array.flags.c_contiguous:
        array = np.array(array, order="C", copy=True)
    array.flags.writeable = False
    return array


def digest_into(hasher, value: Any) -> None:
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        hasher.update(f"{array.dtype.str}{array.shape}".encode())
        hasher.update(memoryview(array).cast("B"))
    else:
        hasher.update(repr(value).encode())
    hasher.update(b"\x00")


def version_key(version) -> bytes:
    """What names a version's answers: its name, number and graphs' checksums."""
    sums = sorted((role, record.sha256) for role, record in version.manifest.graphs.items())
    return f"{version.name}/{version.version}/{sums}".encode()
