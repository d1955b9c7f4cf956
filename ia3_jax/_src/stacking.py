"""Stacked layers (``nn.scan`` / ``nn.vmap``) to one module per layer and back.

Flax stores the params of a scanned module once, every leaf with an extra layer axis at the same
position (``variable_axes={'params': axis}``), under a path without a layer index. PEFT's files and
PyTorch models have one module per layer (``layers.0.mlp.down_proj``). `unstack` moves the layer
axis into the path; `stack` moves it back. Both work on params and on adapters alike.

Example (save a scanned adapter in PEFT's format, load it back)::

    save_peft(path, unstack(adapter, "layers", layouts=layouts), config, params=unstack(base, "layers"))
    loaded, config = load_peft(path, unstack(base, "layers"))
    adapter = stack(loaded, "layers")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ia3_jax._src import tree as _tree
from ia3_jax._src.errors import StructureError
from ia3_jax._src.layout import KernelLayout


def _node(tree: Mapping[str, Any], root: str) -> tuple[_tree.Path, Mapping[str, Any]]:
    path = tuple(root.split("."))
    try:
        node = _tree.get(tree, path)
    except (KeyError, TypeError):
        node = None
    if not isinstance(node, Mapping):
        modules = [_tree.dotted(p) for p, _ in _tree.modules(tree)]
        raise StructureError(f"no module {root!r} in the tree; modules there: {modules[:20]}.")
    return path, node


def _check_layer_axis(root: str, axis: int, layouts: Mapping[str, KernelLayout] | None) -> None:
    """Raises `StructureError` when `layouts` (`infer_layouts`'s) give a module under `root` stacked-layer axes
    without `axis`. The hazard: when every leaf has one size on the wrong axis too (layers == features), the
    shapes cannot tell, and the split would cut features."""
    if not layouts:
        return
    if axis < 0:  # counts from each leaf's end, where kernels and vectors differ: no layout axis to compare with
        raise StructureError(
            f"axis={axis}: with layouts=, give the layer axis as the scan's variable_axes['params'] (0 or more), "
            "the position the layouts record."
        )
    for key, layout in layouts.items():
        if (key == root or key.startswith(root + ".")) and layout.stack_axes and axis not in layout.stack_axes:
            raise StructureError(
                f"axis={axis} is not a layer axis of {key!r}: its layouts give stacked-layer axes {layout.stack_axes} "
                f"(the scan's variable_axes['params']). Pass axis={layout.stack_axes[0]}."
            )


def unstack(
    tree: Mapping[str, Any], root: str, *, axis: int = 0, layouts: Mapping[str, KernelLayout] | None = None
) -> dict[str, Any]:
    """`tree` with the layers stacked under `root` split into modules ``root.0``, ``root.1``, ...

    Args:
      tree: params or an adapter; every leaf under `root` carries the layer axis.
      root: '.'-joined path of the scanned module (the ``name`` given to the ``nn.scan`` module).
      axis: the layer axis, ``variable_axes['params']`` of the scan (Flax's default 0).
      layouts: the layouts given to `ia3_init` (`infer_layouts`), if any: `axis` is checked against the
        stacked-layer axes they record (`StructureError` naming the right one), which the shapes alone
        cannot always tell (when the layer count equals a feature size).

    Returns:
      A new tree; leaves under `root` are bare arrays (Flax boxes are unboxed), the rest untouched.
      A scanned ``(L, out)`` vector at ``layers.mlp.up.ia3_l`` becomes L vectors ``(out,)`` at
      ``layers.<i>.mlp.up.ia3_l``.

    Example:
      >>> per_layer = ia3_jax.unstack(adapter, "layers", layouts=layouts)   # (L, out) -> layers.<i>: (out,)
      >>> ia3_jax.save_peft("out/ia3", per_layer, config)
    """
    path, node = _node(tree, root)
    _check_layer_axis(root, axis, layouts)
    leaves = [(p, _tree.unbox(leaf)) for p, leaf in _tree.leaves_with_paths(node)]
    counts = {p: np.shape(x)[axis] for p, x in leaves if np.ndim(x) > axis}
    if len(counts) != len(leaves) or len(set(counts.values())) != 1:
        shown = {_tree.dotted(p): np.shape(x) for p, x in leaves[:8]}
        raise StructureError(
            f"leaves under {root!r} do not share a layer axis {axis} of one size (shapes: {shown}); give the "
            "scanned module's path and its variable_axes['params'] as axis."
        )
    layers = next(iter(counts.values()))
    bare = jax.tree.map(_tree.unbox, _tree.to_dict(node), is_leaf=_tree.is_box)
    split = {str(i): jax.tree.map(lambda x, i=i: jnp.take(x, i, axis=axis), bare) for i in range(layers)}
    return _tree.updated(_tree.to_dict(tree), {path: split})


def stack(
    tree: Mapping[str, Any], root: str, *, axis: int = 0, layouts: Mapping[str, KernelLayout] | None = None
) -> dict[str, Any]:
    """The inverse of `unstack`: modules ``root.0 ... root.<L-1>`` stacked into one at `root`.

    Raises `StructureError` when the children of `root` are not the layers ``0 .. L-1``, the
    layers differ in structure or shapes, or `layouts` (as for `unstack`) record other layer axes.

    Example:
      >>> adapter, config = ia3_jax.load_peft("peft_dir", ia3_jax.unstack(params, "layers"))
      >>> adapter = ia3_jax.stack(adapter, "layers")          # the nn.scan layout again: (L, out) vectors
    """
    path, node = _node(tree, root)
    _check_layer_axis(root, axis, layouts)
    names = [str(i) for i in range(len(node))]
    if set(map(str, node)) != set(names):
        raise StructureError(f"{root!r} holds {sorted(node)[:10]}, not the layers '0'..'{len(names) - 1}'.")
    layers = [_tree.to_dict(node[n]) for n in names]
    shapes = jax.tree.map(jnp.shape, layers[0])  # nested dicts of shapes: == compares structure too
    for i, layer in enumerate(layers[1:], start=1):
        if jax.tree.map(jnp.shape, layer) != shapes:
            raise StructureError(f"layer {root}.{i} differs from {root}.0 in structure or shapes: cannot stack.")
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs, axis=axis), *layers)
    return _tree.updated(_tree.to_dict(tree), {path: stacked})
