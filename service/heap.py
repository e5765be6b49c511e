"""glibc heap settings for a server whose every call allocates message-sized buffers.

By default glibc serves allocations above 128 KiB with fresh ``mmap`` pages, and hands
the top of the heap back to the OS as soon as it is free. Python gRPC copies each
received message several times (slices into a bytearray, into bytes, into the parsed
message), so a 1,024-row request costs megabytes of page faults and zeroing per call:
on 2 cores that halves what a no-op server can receive. Keeping such buffers in the heap,
and the freed heap for the next call, removes that work (docs/service.md).
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger("vaeserve.service")

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest M_MMAP_THRESHOLD glibc accepts on 64-bit systems; bigger blocks stay mmap'ed.
_MMAP_THRESHOLD_MAX = 32 << 20


def keep_freed_heap(megabytes: int) -> bool:
    """Serve blocks up to 32 MiB from the heap and keep up to ``megabytes`` MiB of freed
    heap for reuse. Returns whether it applied (glibc only; 0 keeps glibc's defaults)."""
    if megabytes <= 0:
        return False
    if platform.libc_ver()[0] != "glibc":
        log.info("heap settings: not glibc (%s), left as they are", platform.libc_ver()[0] or "unknown")
        return False
    libc = ctypes.CDLL(None)
    applied = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    applied = applied and libc.mallopt(_M_TRIM_THRESHOLD, megabytes << 20) == 1
    if applied:
        log.info("heap settings: blocks up to 32 MiB from the heap, %d MiB of freed heap kept", megabytes)
    else:
        log.warning("heap settings: glibc refused mallopt, left as they are")
    return applied
