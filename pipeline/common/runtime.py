"""CPU runtime settings applied before torch loads (measured in bench/bench_features.py, bench_distill.py).

- OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning, so DataLoader workers and
  compute threads sharing a few cores do not steal each other's time (up to 5x per training step on
  a loaded 2-core machine).
- glibc malloc keeps large freed blocks instead of returning each >32 MB activation buffer to the
  OS after every layer (page-fault storms: ~2x on CNN teacher inference). Memory stays at its peak.
Both are defaults only: a value the user already set wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_MAX = -4


def tune_cpu_runtime() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_MAX_" in os.environ:
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):  # not glibc (musl, ...): keep the allocator's defaults
        pass
