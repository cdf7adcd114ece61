"""Giving freed memory back to the system after a model swap.

An onnxruntime session frees hundreds of small and large blocks when it goes; glibc keeps much
of that in its arenas, so every update left the agent ~20 MB larger (bench/soak.py measured
+13 to +23 MB per swap, flat otherwise). ``malloc_trim(0)`` returns it. Elsewhere (musl, macOS)
this is a no-op.
"""

from __future__ import annotations

import ctypes
import gc
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def _load_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _load_trim()


def release_freed_memory() -> None:
    """Collect garbage (the old session's Python side), then hand free heap back to the system."""
    gc.collect()
    if _TRIM is not None:
        try:
            _TRIM(0)
        except OSError as exc:  # never a reason to fail an update
            log.debug("malloc_trim failed: %s", exc)
