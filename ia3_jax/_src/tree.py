"""Small helpers over nested param dicts: module paths, boxed leaves, copy-on-write updates."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
from flax.core import meta

VECTOR = "ia3_l"
Path = tuple[str, ...]


def key_str(key: Any) -> str:
    """The text of one jax key-path entry (dict key, attribute or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def dotted(path: Path) -> str:
    return ".".join(path)


def unbox(x: Any) -> Any:
    """The array inside a Flax `AxisMetadata` box (`nn.Partitioned`, `LogicallyPartitioned`), else `x`."""
    return x.unbox() if isinstance(x, meta.AxisMetadata) else x


def rebox(like: Any, value: Any) -> Any:
    """`value` boxed like `like` (same metadata), or bare when `like` is bare."""
    return like.replace_boxed(value) if isinstance(like, meta.AxisMetadata) else value


def is_box(x: Any) -> bool:
    return isinstance(x, meta.AxisMetadata)


def modules(tree: Mapping[str, Any], prefix: Path = ()) -> Iterator[tuple[Path, Mapping[str, Any]]]:
    """Every nested mapping ("module") below the root with its path, parents before children."""
    for name, child in tree.items():
        if isinstance(child, Mapping):
            path = prefix + (str(name),)
            yield path, child
            yield from modules(child, path)


def vector_modules(tree: Mapping[str, Any]) -> dict[Path, Mapping[str, Any]]:
    """The modules that hold an IA3 vector, by path."""
    return {path: node for path, node in modules(tree) if VECTOR in node}


def vectors(tree: Mapping[str, Any]) -> dict[Path, Any]:
    """The IA3 vectors (boxes kept) by module path."""
    return {path: node[VECTOR] for path, node in vector_modules(tree).items()}


def under(path: Path, roots) -> bool:
    """Whether `path` is one of `roots` or lies below one."""
    return any(path[: len(r)] == r for r in roots)


def get(tree: Mapping[str, Any], path: Path) -> Any:
    node: Any = tree
    for name in path:
        node = node[name]
    return node


def to_dict(tree: Any) -> Any:
    """Plain nested dicts (FrozenDicts and other mappings copied), leaves untouched."""
    if isinstance(tree, Mapping):
        return {k: to_dict(v) for k, v in tree.items()}
    return tree


def updated(tree: Mapping[str, Any], changes: Mapping[Path, Any]) -> dict[str, Any]:
    """A copy of `tree` with each `path -> value` set; nothing in `tree` is modified."""
    out = dict(tree)
    by_head: dict[str, dict[Path, Any]] = {}
    for path, value in changes.items():
        if len(path) == 1:
            out[path[0]] = value
        else:
            by_head.setdefault(path[0], {})[path[1:]] = value
    for head, sub in by_head.items():
        out[head] = updated(out.get(head, {}), sub)
    return out


def leaves_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[Path, Any]]:
    """All leaves (boxes, and nodes that `is_leaf` accepts, kept whole) with their string key paths."""
    stop = is_box if is_leaf is None else (lambda x: is_box(x) or is_leaf(x))
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=stop)
    return [(tuple(key_str(k) for k in path), leaf) for path, leaf in flat]
