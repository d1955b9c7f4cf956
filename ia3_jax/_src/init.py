"""`ia3_init`: insert an ``ia3_l`` vector next to the kernel of every targeted module."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config
from ia3_jax._src.dtypes import check_vector_dtype
from ia3_jax._src.errors import AdapterExistsError, IA3ConfigError
from ia3_jax._src.layout import KernelLayout
from ia3_jax._src.targets import Target, targets


def _boxed_like(kernel: Any, vector: jax.Array, target: Target) -> Any:
    """The vector in the kernel's box, its axis names taken from the kernel axes it follows."""
    if not isinstance(kernel, meta.Partitioned):
        return vector
    names = kernel.names
    return kernel.replace(value=vector, names=tuple(None if a is None else names[a] for a in target.vector_axes))


def ia3_init(
    params: Mapping[str, Any],
    config: IA3Config,
    *,
    rng: jax.Array | None = None,
    dtype: jnp.dtype = jnp.float32,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> dict[str, Any]:
    """Returns `params` with an ``ia3_l`` vector next to the kernel of each targeted module.

    Attention-type targets get a vector of their output features, feedforward targets one of their
    input features; stacked-layer axes (``nn.scan``) are kept. Nothing else changes and `params` is
    not modified.

    Args:
      params: a Flax param tree (the contents of ``variables['params']``).
      config: which modules to adapt (`IA3Config`).
      rng: PRNG key for random vectors; required when ``config.init_ia3_weights`` is False.
      dtype: vector dtype, float32 by default whatever the base dtype (PEFT's autocast).
      layouts: per-module `KernelLayout` for kernels whose shape alone is ambiguous (multi-axis
        ``nn.DenseGeneral``, grouped convs, ``nn.scan``); see `infer_layouts`.

    Returns:
      A new param tree. For a ``nn.Dense(out)`` on input ``(..., in)`` the vector is ``(out,)``, or
      ``(in,)`` when feedforward; under ``nn.scan`` over L layers ``(L, out)``.

    Example:
      >>> params = model.init(key, x)["params"]
      >>> params = ia3_init(params, IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]))
    """
    if not config.init_ia3_weights and rng is None:
        raise IA3ConfigError(
            "IA3Config(init_ia3_weights=False) draws random vectors: pass rng=jax.random.key(...)."
        )
    check_vector_dtype(dtype, "ia3_init's dtype argument")
    existing = _tree.vector_modules(params)
    if existing:
        raise AdapterExistsError(
            f"params already hold IA3 vectors (e.g. at {_tree.dotted(next(iter(existing)))!r}); "
            "split them off with ia3_jax.split(params) first, or merge them."
        )
    resolved = targets(params, config, layouts)
    shapes = tuple(target.vector_shape for target in resolved.values())
    if config.init_ia3_weights:
        vectors = [jnp.asarray(np.ones(shape, dtype)) for shape in shapes]  # host-made: nothing to compile
    else:
        vectors = _standard_normal(shapes, jnp.dtype(dtype), rng)
    changes = {
        (*path, _tree.VECTOR): _boxed_like(_tree.get(params, path)["kernel"], vector, target)
        for (path, target), vector in zip(resolved.items(), vectors)
    }
    return _tree.updated(_tree.to_dict(params), changes)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _standard_normal(shapes: tuple[tuple[int, ...], ...], dtype: jnp.dtype, rng: jax.Array) -> list[jax.Array]:
    """One standard-normal vector per shape, from ``split(rng, len(shapes))``: one compiled call for them all."""
    return [jax.random.normal(key, shape, dtype) for key, shape in zip(jax.random.split(rng, len(shapes)), shapes)]
