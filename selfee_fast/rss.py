"""A process's resident memory on Linux, for the CPU measurements (`kernel-demo`, `bench/`).

Peak RSS only tells the truth about one piece of work when (1) the peak counter is reset
right before it (`/proc/self/clear_refs`; `getrusage` cannot be reset, so anything the
process did earlier, such as building the inputs, can hide the work's peak under its own),
and (2) freed memory leaves RSS: glibc keeps freed heap memory resident and serves big
tensors from it after a large free, so every block of 1 MiB or more gets its own mapping.
"""

from __future__ import annotations

import ctypes
import gc
import re
import resource


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def map_big_blocks_alone(from_bytes: int = 1 << 20) -> None:
    """glibc: every block of `from_bytes` or more in its own mapping, given back on free (no-op off
    glibc). Setting it turns glibc's adaptive threshold off."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, from_bytes)
    libc.mallopt(m_trim_threshold, 2 * from_bytes)
    libc.malloc_trim(0)


def peak_can_be_reset() -> bool:
    """Linux lets a process reset its peak RSS (VmHWM) by writing 5 to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_bytes("VmHWM")
        return True
    except (OSError, AttributeError):
        return False


def reset_peak() -> int:
    """Reset the peak counter; the bytes resident now (where it cannot be reset: the peak so far)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM
        return _status_bytes("VmRSS")
    except OSError:
        return peak()


def peak() -> int:
    """The peak resident bytes since the last `reset_peak` (or since the process started)."""
    try:
        return _status_bytes("VmHWM")
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
