"""CPU allocator tuning for training processes.

On Linux/glibc every tensor above the mmap threshold (128 KiB–32 MiB) is a fresh ``mmap``,
and every first write to it page-faults. A ``(batch, d_sae)`` float32 tensor at SAELens's
usual shapes is tens of MiB, so on CPU an elementwise op on a *new* tensor costs several
times the op on a reused one (measured: ~40 ms vs ~8 ms at 4096 × 4608 on 2 cores), and a
training step spends more time faulting pages than in arithmetic. :func:`retain_freed_memory`
makes glibc serve large blocks from its heap and keep freed memory for reuse, the effect
jemalloc/tcmalloc give PyTorch. It changes the whole process, so the library never calls
it on import; ``sae-ext`` calls it for its own commands unless ``SAE_EXT_KEEP_MALLOC=1``.
The cost: resident memory stays at its peak until the process exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def retain_freed_memory() -> bool:
    """Make glibc keep freed large blocks for reuse (no mmap, no trimming); True if applied.

    A no-op returning False off Linux/glibc or when ``SAE_EXT_KEEP_MALLOC=1``. Idempotent.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("SAE_EXT_KEEP_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # 2**31 - 1: the largest int; trimming then never returns the heap top to the OS
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
