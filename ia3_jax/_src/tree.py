"""Small helpers over nested param dicts: module paths, boxed leaves, copy-on-write updates."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any

import jax
from flax.core import meta

from ia3_jax._src.errors import StructureError

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
    """Every nested mapping ("module") below the root with its path, parents before children.

    Raises `StructureError` naming the key for a key that is not a string: module paths are
    '.'-joined names (as Flax and PEFT write them), and ``{0: ...}`` next to ``{"0": ...}`` would
    be one path. Example: ``{"layers": {0: {"kernel": w}}}`` is refused at ``'layers'``; write
    ``{"layers": {"0": ...}}`` (Flax's own naming).
    """
    for name, child in tree.items():
        if not isinstance(name, str):
            raise StructureError(
                f"param tree key {name!r} ({type(name).__name__}) under {dotted(prefix) or 'the root'!r}: ia3_jax "
                f"addresses modules by '.'-joined string names, as Flax and PEFT do. Use the key {str(name)!r}."
            )
        if isinstance(child, Mapping):
            path = prefix + (name,)
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


def root_params(module: Any) -> Mapping[str, Any] | None:
    """The ``params`` that the Flax model running `module` was applied to, or None.

    None inside a lifted body (``nn.scan``, ``nn.vmap``, ``nn.remat``), whose scope has a root of its
    own at the lifted module's path holding that module's params only (the true root, reached
    through the lifted module's own call, has path ``()``), and for an unbound module.
    """
    scope = getattr(module, "scope", None)
    if scope is None or scope.root.path:
        return None
    params = scope.root.variables().get("params", {})
    return params if isinstance(params, Mapping) else None


def rooted(paths: Collection[Path], trees: Collection[frozenset[Path]]) -> dict[Path, Path]:
    """Each of `paths` relative to the root of the tree it belongs to, for paths that belong to one.

    `paths` are paths in some larger pytree (a function's arguments, e.g. ``("0", "0", "params",
    "aux", "fc")`` for ``fn({"params": p}, x)``); each of `trees` is the set of the same kind of
    paths (module paths of vectors or kernels) inside one tree, relative to its root. A path's
    root is its outermost prefix under which every path of `paths`, taken relative to it, is in
    one of `trees`. Matching whole sets, not suffixes, keeps ``aux.fc`` apart from ``fc``.

    Example:
      >>> rooted([("0", "fc"), ("0", "aux", "fc")], [frozenset({("fc",), ("aux", "fc")})])
      {('0', 'fc'): ('fc',), ('0', 'aux', 'fc'): ('aux', 'fc')}
    """
    is_root: dict[Path, bool] = {}
    out = {}
    for path in paths:
        for i in range(len(path)):
            prefix = path[:i]
            if prefix not in is_root:
                below = {p[i:] for p in paths if p[:i] == prefix}
                is_root[prefix] = any(below <= tree for tree in trees)
            if is_root[prefix]:
                out[path] = path[i:]
                break
    return out


def listing(names: Iterable[str], limit: int = 8) -> str:
    """The first `limit` of `names` joined for an error message, with a count of the rest.

    Example: ``listing(["a", "b", "c"], limit=2) == "a, b, ... (1 more)"``.
    """
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
