"""Test-session settings: the suite's models are tiny, so XLA's CPU backend optimisations cost more
compile time than they save run time. Set before jax is imported (also inherited by the notebook
kernels and the subprocesses that tests start); numerics checks compare paths compiled alike."""

import os

_FAST_CPU_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_CPU_COMPILE}".strip()
