"""glibc's allocator settings (``mallopt``), without importing torch: ``torchrl_dreamer`` sets one at import."""
from __future__ import annotations

import ctypes

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
INT_MAX = 2**31 - 1


def mallopt(*settings: tuple[int, int]) -> bool:
    """Applies ``mallopt(parameter, value)`` for each pair; ``False`` where there is no glibc (nothing changes)."""
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on (no ldconfig lookup)
    except (OSError, TypeError):  # Windows
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):  # the parameters are glibc's
        return False
    return all([bool(libc.mallopt(parameter, value)) for parameter, value in settings])
