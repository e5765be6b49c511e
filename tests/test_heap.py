"""The server's glibc heap settings (service/heap.py)."""

from __future__ import annotations

import platform

import pytest

from vaeserve.errors import ConfigError
from vaeserve.service.heap import keep_freed_heap
from vaeserve.service.settings import ServeSettings


def test_zero_keeps_glibc_defaults() -> None:
    assert keep_freed_heap(0) is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_settings() -> None:
    assert keep_freed_heap(64) is True


def test_negative_heap_keep_is_refused() -> None:
    with pytest.raises(ConfigError, match="--heap-keep-mb"):
        ServeSettings(heap_keep_mb=-1).validate()
