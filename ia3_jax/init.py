"""`ia3_init`: insert an ``ia3_l`` vector next to the kernel of every targeted module."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax.core import meta

from ia3_jax import _tree
from ia3_jax.config import IA3Config
from ia3_jax.layout import KernelLayout, module_layout
from ia3_jax.quant import check_vector_dtype
from ia3_jax.targets import resolve_targets


class AdapterExistsError(ValueError):
    """The params already hold IA3 vectors."""


def _boxed_like(kernel: Any, vector: jax.Array, layout: KernelLayout, feedforward: bool) -> Any:
    """The vector in the kernel's box, its axis names taken from the kernel axes it follows."""
    if not isinstance(kernel, meta.Partitioned):
        return vector
    names = kernel.names
    axes = [a for a, _ in layout.vector_labels(jnp.shape(kernel.value), feedforward)]
    return kernel.replace(value=vector, names=tuple(None if a is None else names[a] for a in axes))


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
        raise ValueError("IA3Config(init_ia3_weights=False) draws random vectors: pass rng=jax.random.key(...).")
    check_vector_dtype(dtype, "ia3_init's dtype argument")
    existing = _tree.vector_modules(params)
    if existing:
        raise AdapterExistsError(
            f"params already hold IA3 vectors (e.g. at {_tree.dotted(next(iter(existing)))!r}); "
            "split them off with ia3_jax.split(params) first, or merge them."
        )
    targets = resolve_targets(params, config)
    keys = jax.random.split(rng, len(targets)) if rng is not None else [None] * len(targets)
    changes = {}
    for key, (path, feedforward) in zip(keys, targets.items()):
        module = _tree.get(params, path)
        kernel = module["kernel"]
        layout, shape = module_layout(path, module, config.fan_in_fan_out, layouts)
        vector_shape = layout.vector_shape(shape, feedforward)
        if config.init_ia3_weights:
            vector = jnp.ones(vector_shape, dtype)
        else:
            vector = jax.random.normal(key, vector_shape, dtype)
        changes[path + (_tree.VECTOR,)] = _boxed_like(kernel, vector, layout, feedforward)
    return _tree.updated(_tree.to_dict(params), changes)
