"""Keeps XLA:CPU's per-call scratch memory mapped between calls (glibc `mallopt`), so no step pays page faults.

XLA:CPU allocates each executable's temporary buffer (0.7 GB for BERT at all-MiniLM-L6-v2's size at batch
16 x 128) with `malloc` on every call and frees it at the end. glibc serves an allocation that large with a
fresh `mmap` and returns it with `munmap`, so every call touches ~174k new pages: the kernel zeroes each one
on its first write, inside whichever fused kernel writes it first. That cost ~0.3 s of a ~2 s train step
(minor page faults per step: 173,979; issue 20, README "Train-step speed"). PyTorch's CPU allocator meets the
same glibc, but its step allocates less at once (28,769 faults per step on the same model).

`keep_heap()` sets three glibc malloc parameters for the process:

* `M_ARENA_MAX = 1`: every thread allocates from the main arena, which grows with `brk` without limit.
  (A thread's own arena holds at most 64 MB, and glibc falls back to `mmap` for anything larger whatever the
  settings below say.)
* `M_MMAP_MAX = 0`: no allocation is served by `mmap`; large blocks come from the heap.
* `M_TRIM_THRESHOLD = -1` (glibc stores it as `SIZE_MAX`): freed memory at the top of the heap is never
  returned to the kernel.

With them the second and later calls of a compiled step reuse the pages of the first: 0 page faults per step,
and 0.83x the step time in that measurement. The price is PyTorch's on a GPU: the process keeps its peak heap
until it exits, and threads share one malloc lock (XLA's buffers are few and large; Python's small objects
come from its own allocator). With XLA on two or more threads a call's buffers can be freed after the next
call has allocated, so the heap grows in steps over the first 100-300 calls (a 64 MB product on 2 cores:
0.47-0.91 GB resident, against 0.27 GB on one core) and stops faulting once it holds enough free blocks.
Values are unchanged: only where memory comes from.

`import jaxpeft` calls `keep_heap()` unless `JAXPEFT_CPU_HEAP=0`; it has to run before JAX starts its
thread pools (before the first computation), since a thread that already owns an arena keeps it. Where the C
library is not glibc (macOS, musl) it does nothing.
"""

import ctypes
import ctypes.util
import os

from jaxpeft._env_switch import on_unless_zero

ENV_VAR = "JAXPEFT_CPU_HEAP"
# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))


def enabled() -> bool:
  """Whether `import jaxpeft` keeps the heap: `$JAXPEFT_CPU_HEAP` is not '0' (unset: on)."""
  return on_unless_zero(ENV_VAR)


def keep_heap() -> bool:
  """Applies `SETTINGS` with glibc's `mallopt`; True if the C library is glibc and accepted all three."""
  if "CS_GNU_LIBC_VERSION" not in getattr(os, "confstr_names", {}):
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c"))
  return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
