"""glibc's heap kept for the next image: no fresh mmap and no page faults per 10 MB image.

A 2500x2048 radiograph is ~10 MB of bytes and a few arrays as large. By default glibc serves
each such block with a fresh ``mmap`` and hands it back to the kernel when freed, and trims
the heap's top after every image; on this kind of virtual machine the kernel returns those
pages to the host, so the next image faults them in again (measured, issue 12: the same
decode 21 ms back to back, 116 ms after a 2 s pause; time-to-flag p50 / p95 156 / 348 ms ->
66 / 110 ms with the trim threshold raised). Raising both thresholds keeps what the largest
image needed resident (RSS higher by about that much, ~100-200 MB per process), which is the
trade this worker makes. Same effect as ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_``, set from inside the process; nothing happens without glibc.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 256 * 2**20


def _mallopt(param: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(param, value))
    except (OSError, AttributeError):  # not glibc
        return False


def raise_mmap_threshold(nbytes: int = KEEP_BYTES) -> bool:
    """Serve blocks up to ``nbytes`` (receive buffers, pixel arrays) from the heap instead of
    a fresh mmap each (pynetdicom's writing receive: 18 -> 24 images/s, PERF-NOTES)."""
    return _mallopt(M_MMAP_THRESHOLD, nbytes)


def keep_freed_heap(nbytes: int = KEEP_BYTES) -> bool:
    """Raise the mmap threshold, and trim the heap only when ``nbytes`` lie free at its top
    (the decoding worker processes: their arrays come and go with every image)."""
    return raise_mmap_threshold(nbytes) and _mallopt(M_TRIM_THRESHOLD, nbytes)
