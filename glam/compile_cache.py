"""JAX's persistent compilation cache for a run (`train.compilation_cache_dir`).

A study's points compile the same programs (the same shapes, another seed or another expert
count's dense twin): with one cache folder for the study (`sweeps/study/base.yaml` puts it
under `outputs/studies/<name>/jax_cache`), every point after the first loads its programs
instead of compiling them. The cache's size limit turns on JAX's file lock, so parallel jobs
(joblib, several hosts on a shared disk) read and write it safely. A cached program is the same
executable: results are bit-identical with or without the cache.
"""

from __future__ import annotations

import jax
from jax.experimental.compilation_cache import compilation_cache

MAX_BYTES = 4 * 2**30  # a bound, which makes JAX lock the folder between processes
_EVENTS = {"/jax/compilation_cache/cache_hits": "hits",
           "/jax/compilation_cache/cache_misses": "misses"}
_counts = {"hits": 0, "misses": 0}


def _count(event: str, **_) -> None:
    if event in _EVENTS:
        _counts[_EVENTS[event]] += 1


jax.monitoring.register_event_listener(_count)


def use(path: str | None) -> None:
    """Point this process's persistent compilation cache at folder `path` (created when
    needed) for everything compiled from now on; None turns it off. Every program is cached,
    however fast it compiled (a CPU study's programs compile in about a second each)."""
    if path == jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    if path is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    compilation_cache.reset_cache()  # the next compilation opens the folder now set


def counts() -> dict[str, int]:
    """Persistent-cache hits and misses of this process so far (programs loaded instead of
    compiled, and programs compiled and stored)."""
    return dict(_counts)
