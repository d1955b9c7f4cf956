"""Test-session settings, set before jax is imported (also inherited by the pytest-xdist workers, the
notebook kernels and the subprocesses that tests start):

- the suite's models are tiny, so XLA's CPU backend optimisations cost more compile time than they
  save run time; numerics checks compare paths compiled alike;
- many tests compile the same tiny programs, so the session shares one persistent compilation
  cache, made here and removed at the end (measured: 15% less test time in all). A cache the caller
  set (the README's inner loop: ``.jax_cache``) is used as it is, and kept.
"""

import os
import shutil
import tempfile

_FAST_CPU_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_CPU_COMPILE}".strip()

_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="ia3-jax-test-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:  # made by this process: the controller, or a run without workers
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
