"""`split` / `join`: the trainable adapter tree and the frozen base tree, as plain nested dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from ia3_jax import _tree
from ia3_jax.config import IA3Config
from ia3_jax.targets import modules_to_save_roots


class StructureError(ValueError):
    """Two trees that should fit together do not."""


def _without_vectors(tree: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for name, child in tree.items():
        if name == _tree.VECTOR:
            continue
        out[name] = _without_vectors(child) if isinstance(child, Mapping) else child
    return out


def _shapes(leaf: Any) -> Any:
    """Shapes of a leaf's arrays (a box or a quantized kernel may hold several)."""
    return jax.tree.map(np.shape, _tree.unbox(leaf))


def split(params: Mapping[str, Any], config: IA3Config | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits params into ``(adapter, base)``.

    The adapter holds every ``ia3_l`` leaf and, when `config` names ``modules_to_save``, a copy of
    those modules' params (the trainable copies, which `join` lays over the base). The base holds
    everything else, original ``modules_to_save`` params included.

    Example:
      >>> adapter, base = split(ia3_init(params, config), config)
      >>> grads = jax.grad(lambda a: loss(join(base, a), batch))(adapter)
    """
    vectors = {path + (_tree.VECTOR,): vector for path, vector in _tree.vectors(params).items()}
    saved = {}
    if config is not None and config.modules_to_save:
        saved = {path: _tree.to_dict(_tree.get(params, path)) for path in modules_to_save_roots(params, config)}
        saved = {path: _without_vectors(node) for path, node in saved.items()}
    adapter = _tree.updated({}, {**saved, **vectors})
    return adapter, _without_vectors(params)


def join(base: Mapping[str, Any], adapter: Mapping[str, Any]) -> dict[str, Any]:
    """Lays `adapter` over `base`: vectors are added, ``modules_to_save`` copies replace the originals.

    Raises `StructureError` if the adapter names a module that the base does not have.
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
