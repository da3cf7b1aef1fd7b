"""Compiled programs kept on disk (JAX's persistent compilation cache), so that a resumed or
repeated training run, or the next prediction, loads its compiled steps instead of compiling
them again.

Entries are keyed by the program, the JAX version, the backend and the XLA flags: a stale one
is never loaded. Only programs that took over a second to compile are kept (JAX's default),
a few MB per model and batch shape; the folder is never pruned (delete it to reclaim the space).
"""

from __future__ import annotations

import os

import jax

from se3jax.data.qm9_cache import DEFAULT_CACHE_DIR


def use_compilation_cache(cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> str:
    """Keep compiled programs in ``<cache_dir>/compiled`` (the data's cache folder, by default
    ``~/.cache/se3jax``) from now on, unless a cache folder is set already
    (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``): that one stays. Returns the folder in use."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    folder = os.path.join(os.fspath(cache_dir), "compiled")
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder
