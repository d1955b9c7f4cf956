"""`split` / `join`: the trainable adapter tree and the frozen base tree, as plain nested dicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config
from ia3_jax._src.errors import StructureError
from ia3_jax._src.targets import modules_to_save_roots


class Split(NamedTuple):
    """`split`'s result: the trainable adapter tree and the frozen base tree.

    Example:
      >>> adapter, base = ia3_jax.split(params, config)       # a Split, unpacked
      >>> vectors = ia3_jax.split(params, config).adapter  # or by name
    """

    adapter: dict[str, Any]
    base: dict[str, Any]


def is_trainable(path: _tree.Path, saved_roots: Sequence[_tree.Path]) -> bool:
    """The one rule for what IA3 trains: ``ia3_l`` leaves, and every leaf of a ``modules_to_save`` module.

    `path` is a leaf's key path; `saved_roots` is ``modules_to_save_roots(params, config)``.
    """
    return (bool(path) and path[-1] == _tree.VECTOR) or _tree.under(path, saved_roots)


def without_vectors(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `tree` without its ``ia3_l`` leaves (the base params)."""
    out = {}
    for name, child in tree.items():
        if name == _tree.VECTOR:
            continue
        out[name] = without_vectors(child) if isinstance(child, Mapping) else child
    return out


def _shapes(leaf: Any) -> Any:
    """Shapes of a leaf's arrays (a box or a quantized kernel may hold several)."""
    return jax.tree.map(np.shape, _tree.unbox(leaf))


def split(params: Mapping[str, Any], config: IA3Config | None = None) -> Split:
    """Splits params into ``Split(adapter, base)`` (a named tuple: unpack it or read its fields).

    The adapter holds every ``ia3_l`` leaf and, when `config` names ``modules_to_save``, a copy of
    those modules' params (the trainable copies, which `join` lays over the base). The base holds
    everything else, original ``modules_to_save`` params included.

    Example:
      >>> adapter, base = split(ia3_init(params, config), config)
      >>> grads = jax.grad(lambda a: loss(join(base, a), batch))(adapter)
    """
    roots = modules_to_save_roots(params, config) if config is not None else []
    saved = {root: without_vectors(_tree.to_dict(_tree.get(params, root))) for root in roots}
    vectors = {path + (_tree.VECTOR,): vector for path, vector in _tree.vectors(params).items()}
    return Split(_tree.updated({}, {**saved, **vectors}), without_vectors(params))


def join(base: Mapping[str, Any], adapter: Mapping[str, Any]) -> dict[str, Any]:
    """Lays `adapter` over `base`: vectors are added, ``modules_to_save`` copies replace the originals.

    Raises `StructureError` if the adapter names a module that the base does not have.

    Example:
      >>> adapter, base = ia3_jax.split(params, config)
      >>> logits = model.apply({"params": ia3_jax.join(base, adapter)}, x)
    """

    def lay(base_node: Mapping[str, Any], adapter_node: Mapping[str, Any], path: _tree.Path) -> dict[str, Any]:
        out = dict(base_node)
        for name, child in adapter_node.items():
            if name == _tree.VECTOR:
                if "kernel" not in base_node:
                    raise StructureError(
                        f"adapter has an IA3 vector at {_tree.dotted(path)!r} but the base has no kernel there."
                    )
                out[name] = child
            elif name not in base_node:
                raise StructureError(
                    f"adapter entry {_tree.dotted(path + (name,))!r} has no counterpart in the base params "
                    f"(base has {sorted(base_node)[:20]} there): the adapter is for another model."
                )
            elif isinstance(child, Mapping):
                out[name] = lay(base_node[name], child, path + (name,))
            elif _shapes(child) != _shapes(base_node[name]):
                raise StructureError(
                    f"adapter leaf {_tree.dotted(path + (name,))!r} has shape {_shapes(child)} but the base has "
                    f"{_shapes(base_node[name])}: the adapter is for another model size."
                )
            else:
                out[name] = child
        return out

    return lay(base, adapter, ())
