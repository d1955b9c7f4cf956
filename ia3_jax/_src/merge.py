"""Folding vectors into kernels and combining adapters: tree operations, jit-able with a static config."""

from __future__ import annotations

import functools
import operator
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ia3_jax._src import quant
from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config
from ia3_jax._src.dtypes import check_vector_dtype
from ia3_jax._src.errors import NonFiniteMergeError, StructureError, UnsupportedKernelError, VectorShapeError
from ia3_jax._src.layout import KernelLayout
from ia3_jax._src.partition import without_vectors
from ia3_jax._src.targets import vector_target

UNMERGE_EPS = 1e-8  # PEFT's guard against division by zero in unmerge


def _rescale(
    node: Mapping[str, Any],
    path: _tree.Path,
    vector: jax.Array,
    config: IA3Config | None,
    layouts: Mapping[str, KernelLayout] | None,
    divide: bool,
) -> dict[str, Any]:
    """The module's kernel (and bias, for output vectors) multiplied or divided by the vector."""
    key = _tree.dotted(path)
    boxed_kernel = node["kernel"]
    kernel = _tree.unbox(boxed_kernel)
    if not (quant.is_quantized(kernel) or isinstance(kernel, jax.Array | np.ndarray)):
        raise UnsupportedKernelError(
            f"kernel at {key!r} is a {type(kernel).__name__}, neither an array nor a qwix quantized kernel; "
            "ia3_jax will not rescale its contents blindly: keep the vector unmerged."
        )
    vector = _tree.unbox(vector)
    check_vector_dtype(vector.dtype, f"IA3 vector at {key!r}")
    target = vector_target(path, node, vector.shape, config, layouts)
    feedforward = target.feedforward
    factor = target.kernel_factor(vector)
    op = (lambda w, s: w / (s + UNMERGE_EPS)) if divide else (lambda w, s: w * s)
    out = dict(node)
    if quant.is_quantized(kernel):  # the scale absorbs the vector; the integers stay
        new_kernel = quant.rescale_quantized(kernel, factor, op, key=key, feedforward=feedforward)
    else:
        new_kernel = op(kernel, factor).astype(kernel.dtype)
    out["kernel"] = _tree.rebox(boxed_kernel, new_kernel)
    if not feedforward and "bias" in node:
        bias = _tree.unbox(node["bias"])
        if bias.shape != vector.shape:
            raise VectorShapeError(
                f"module {key!r}: bias {bias.shape} does not match the output vector {vector.shape}."
            )
        out["bias"] = _tree.rebox(node["bias"], op(bias, vector).astype(bias.dtype))
    return out


def _rescaled_tree(tree, vectors, config, layouts, divide):
    changes = {
        path: _rescale(_tree.get(tree, path), path, vector, config, layouts, divide) for path, vector in vectors.items()
    }
    return without_vectors(_tree.updated(_tree.to_dict(tree), changes))


def merge(
    params: Mapping[str, Any],
    config: IA3Config | None = None,
    *,
    safe_merge: bool = False,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> dict[str, Any]:
    """Folds every ``ia3_l`` into its kernel (and, for output vectors, its bias); removes the vectors.

    ``kernel * l`` is computed in the promoted dtype and cast back to the kernel's dtype. The result
    is a plain base param tree: the model runs it at full speed without the interceptor.

    Called eagerly, only the targeted kernels are computed and every other leaf is shared with
    `params`. Under `jax.jit` every output leaf is a new buffer unless the input is donated
    (``jax.jit(merge, static_argnums=1, donate_argnums=0)``), which is what makes a jitted merge of
    a large tree cost more than its targeted kernels (benchmarks/RESULTS.md).

    Args:
      params: a joined param tree (``join(base, adapter)``).
      config: decides feedforward vs output; without it, the vector's shape decides.
      safe_merge: raise `NonFiniteMergeError` naming the module if a merged kernel holds NaN or inf.
        The check reads values (one device-to-host transfer of a flag per module), so call it
        outside `jax.jit`.
      layouts: the same per-module layouts given to `ia3_init`, if any.

    Example:
      >>> serving_params = merge(join(base, adapter), config)
      >>> model.apply({"params": serving_params}, x)   # no interceptor needed
    """
    vectors = _tree.vectors(params)
    merged = _rescaled_tree(params, vectors, config, layouts, divide=False)
    if safe_merge:
        finite = jax.device_get({path: _all_finite(_tree.get(merged, path)["kernel"]) for path in vectors})
        broken = [path for path, ok in finite.items() if not ok]
        if broken:
            raise NonFiniteMergeError(
                f"NaNs or infs in the merged kernel of {_tree.dotted(broken[0])!r}"
                + (f" (and {len(broken) - 1} more modules)" if len(broken) > 1 else "")
                + ": the adapter seems broken (check its vector there); nothing was merged."
            )
    return merged


def _all_finite(kernel: Any) -> jax.Array:
    """One device-side flag: every float leaf of the kernel (a quantized kernel: its scale) is finite."""
    floats = [x for x in jax.tree.leaves(_tree.unbox(kernel)) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack([jnp.isfinite(x).all() for x in floats]).all()


def unmerge(
    merged: Mapping[str, Any],
    adapter: Mapping[str, Any],
    config: IA3Config | None = None,
    *,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> dict[str, Any]:
    """Divides the adapter's vectors back out of merged kernels: ``w / (l + 1e-8)``, as PEFT.

    Approximate (warns, as PEFT): entries of ``l`` near zero lose information, and low-precision
    kernels round twice. ``modules_to_save`` params stay as merged (the originals are not in it).
    """
    vectors = _tree.vectors(adapter)
    for path in vectors:
        try:
            node = _tree.get(merged, path)
        except (KeyError, TypeError):
            node = None
        if not isinstance(node, Mapping) or "kernel" not in node:
            raise StructureError(f"adapter vector at {_tree.dotted(path)!r} has no kernel in the merged params.")
    warnings.warn("Unmerge result can be inaccurate for (IA)^3.", stacklevel=2)
    return _rescaled_tree(merged, vectors, config, layouts, divide=True)


def _has_leaves(tree: Any) -> bool:
    return bool(jax.tree_util.tree_leaves(tree))


def _fold(adapters: Sequence[Mapping[str, Any]], combine_fn, what: str) -> dict[str, Any]:
    if not adapters:
        raise ValueError(f"{what}: pass at least one adapter.")
    parts = [(_tree.vectors(a), without_vectors(a)) for a in adapters]
    first = parts[0][0]
    for i, (vectors, _) in enumerate(parts[1:], start=1):
        if vectors.keys() != first.keys():
            only = sorted(set(vectors) ^ set(first))
            raise StructureError(
                f"{what}: adapter {i} and adapter 0 target different modules (first difference: "
                f"{_tree.dotted(only[0])!r}). Combine adapters made with the same config."
            )
        for path, v in vectors.items():
            if jnp.shape(_tree.unbox(v)) != jnp.shape(_tree.unbox(first[path])):
                raise StructureError(
                    f"{what}: vector {_tree.dotted(path)!r} has shape {jnp.shape(_tree.unbox(v))} in adapter {i} "
                    f"but {jnp.shape(_tree.unbox(first[path]))} in adapter 0."
                )
    saved = [rest for _, rest in parts if _has_leaves(rest)]
    if len(saved) > 1:
        raise StructureError(
            f"{what}: several adapters carry modules_to_save copies; PEFT cannot combine those either. "
            "Keep modules_to_save in one adapter at most."
        )
    combined = {
        path + (_tree.VECTOR,): _tree.rebox(first[path], combine_fn([_tree.unbox(p[0][path]) for p in parts]))
        for path in first
    }
    return _tree.updated(saved[0] if saved else {}, combined)


def add_weighted_adapter(adapters: Sequence[Mapping[str, Any]], weights: Sequence[float]) -> dict[str, Any]:
    """PEFT's ``add_weighted_adapter`` for IA3: the weighted *sum* ``sum_i w_i l_i`` of the vectors.

    Weights are not normalised (PEFT's docs suggest they sum to 1); negative weights are allowed.
    A ``modules_to_save`` copy, if one adapter has it, is carried over (PEFT would take an untrained
    copy instead).

    Example:
      >>> mixed = add_weighted_adapter([adapter_a, adapter_b], [0.7, 0.3])
    """
    if len(weights) != len(adapters):
        raise ValueError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights.")
    return _fold(adapters, lambda vs: sum(w * v for w, v in zip(weights, vs)), "add_weighted_adapter")


def combine(adapters: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several adapters active at once: the elementwise product of their vectors (PEFT's forward rule).

    ``merge(join(base, combine([a, b])))`` equals merging `a` then `b`.
    """
    return _fold(adapters, lambda vs: functools.reduce(operator.mul, vs), "combine")
