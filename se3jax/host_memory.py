"""The process's host memory: its peak resident set, handing freed memory back to the OS, and
glibc's allocator settings for training processes.

Used by the training loop and the predictor (which compile ahead with :func:`compile_and_release`),
the benchmarks (which report the peak), and the training entry points
(:func:`restart_with_training_allocator`). Imports no JAX: it may run before JAX is loaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import resource
import sys

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def release_freed_host_memory() -> None:
    """Hand the memory the compiler freed back to the OS, to call after compiling a step and
    before running it: glibc keeps freed memory in its arenas, and the step's buffers then come
    on top of it in the resident set (at batch 100 inference, a 0.84 GB process after compiling
    reached 1.03 GB at its first step; the trunk's training step at 10^5 edges 1.9 GB, against
    1.5 GB after this call). A no-op where the C library has no ``malloc_trim``."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def compile_and_release(jitted, *args):
    """``jitted.lower(*args).compile()`` -- the executable, to call with arguments shaped like
    ``args`` -- then :func:`release_freed_host_memory`, so that the first call's buffers do not
    come on top of the compiler's scratch memory (at batch 100 inference, peak RSS 0.95 GB with
    a lazily compiled ``jax.jit``, 0.80 GB compiled this way)."""
    compiled = jitted.lower(*args).compile()
    release_freed_host_memory()
    return compiled


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux and macOS). On Linux from
    ``VmHWM``: ``ru_maxrss`` survives ``exec``, so a child process would report its parent's
    peak when that was larger."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


# glibc malloc settings for training processes (GLIBC_TUNABLES, read at process start):
# large blocks backed by transparent huge pages, and blocks of 16 MiB or more mapped on their own
TRAINING_TUNABLES = {"glibc.malloc.hugetlb": "1", "glibc.malloc.mmap_threshold": str(16 << 20)}
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def training_allocator_environment(environ=None, thp_mode_file: str = THP_MODE_FILE) -> dict | None:
    """The environment with :data:`TRAINING_TUNABLES` added to ``GLIBC_TUNABLES`` (a setting the
    user gave is kept), or ``None`` where there is nothing to add, it is turned off
    (``SE3JAX_TRAINING_ALLOCATOR=0``), or it would not help (not glibc 2.35+ on Linux, or the
    kernel's transparent huge pages are ``never``: smaller blocks mapped on their own would then
    cost page faults)."""
    environ = os.environ if environ is None else environ
    if environ.get("SE3JAX_TRAINING_ALLOCATOR", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    libc, version = platform.libc_ver()
    try:
        if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
            return None
        with open(thp_mode_file) as f:
            if "[never]" in f.read():
                return None
    except (OSError, ValueError):
        return None
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    given = {t.split("=")[0] for t in tunables}
    missing = [f"{k}={v}" for k, v in TRAINING_TUNABLES.items() if k not in given]
    if not missing:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(tunables + missing)}


def restart_with_training_allocator() -> None:
    """Re-execute this Python process (same interpreter, same arguments) with
    :func:`training_allocator_environment`, when it returns one; else return.

    For processes that train, called before JAX is imported (glibc reads its tunables only at
    start). Measured on the 2-core machine at batch 100 (the reference model, fp32), counted with
    ``getrusage`` over 6 steps, separate processes:

    - XLA's CPU runtime allocates a training step's scratch memory (546 MB) afresh for every
      step, and glibc maps such blocks anew each time: ~140,000 page faults and 0.4-0.5 s of
      system time per step with 4 KB pages, ~4,000 and 0.1 s with huge pages.
    - The step also allocates blocks of 8-12 MB outside that scratch memory; mapped on their
      own (a threshold of 8 MiB or less) they cost ~240,000-310,000 page faults and 1.1-1.6 s
      of system time per step; from glibc's heaps (16 MiB) ~4,000-9,000 and 0.1-0.2 s.
    - Without a fixed threshold glibc's own grows with what is freed, and its per-thread heaps
      fragment: peak RSS 1.55-1.61 GB against 1.50-1.52 GB with 16 MiB (1.44 GB with 2 MiB, at
      the system time above).

    Not for inference: its smaller steps measured 12% slower with huge pages."""
    environment = training_allocator_environment()
    if environment is not None:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
