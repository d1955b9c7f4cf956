"""Shardings for IA3 vectors and their optimizer state, derived from the shardings of the kernels.

An IA3 vector multiplies the features of one kernel axis (its output features, or its input
features for feedforward targets), plus any stacked-layer axes. Giving each vector axis the mesh
axes of the kernel axis it follows keeps the scaling local: in tensor parallelism the shard of the
vector sits on the device that holds the matching shard of the activation, so IA3 adds no
collective to the forward pass; under FSDP the vector is split like its kernel; under data
parallelism it is replicated like its kernel.

Example (tensor parallel over a ``('data', 'model')`` mesh)::

    base_specs = {...}                                   # PartitionSpec per base leaf
    specs = adapter_shardings(adapter, base, base_specs, config, mesh=mesh)
    adapter = jax.device_put(adapter, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    opt_specs = optimizer_shardings(tx, adapter, specs)  # mu/nu follow the vectors
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec, Sharding

from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config
from ia3_jax._src.errors import ShardingError, StructureError
from ia3_jax._src.layout import KernelLayout
from ia3_jax._src.targets import Target, vector_target

SpecOrSharding = PartitionSpec | NamedSharding
AnyMesh = Mesh | AbstractMesh


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec | Sharding)


def _leaf_sharding(leaf: Any) -> Any:
    """The sharding an array (or ``ShapeDtypeStruct``) carries, None when it has none."""
    return getattr(_tree.unbox(leaf), "sharding", None)


def _sharding_tree(base: Mapping[str, Any], shardings: Any) -> dict[_tree.Path, Any]:
    """`shardings` by leaf path, checked against `base` leaf for leaf."""
    if shardings is None:
        return {path: _leaf_sharding(leaf) for path, leaf in _tree.leaves_with_paths(base)}
    by_path = dict(_tree.leaves_with_paths(shardings, is_leaf=_is_spec_leaf))
    base_paths = {path for path, _ in _tree.leaves_with_paths(base)}
    if set(by_path) != base_paths:
        missing = sorted(base_paths - set(by_path))
        extra = sorted(set(by_path) - base_paths)
        first = missing[0] if missing else extra[0]
        raise StructureError(
            f"the shardings are for a different tree than the base params: {len(missing)} base leaves have no "
            f"sharding and {len(extra)} shardings have no base leaf (first: {_tree.dotted(first)!r}, "
            f"{'missing' if missing else 'extra'}). Give one PartitionSpec/NamedSharding per base leaf, "
            "e.g. nn.get_partition_spec(base) or jax.tree.map(lambda x: x.sharding, base)."
        )
    return by_path


def _spec_and_mesh(sharding: Any, mesh: AnyMesh | None, where: str) -> tuple[PartitionSpec, AnyMesh | None]:
    if sharding is None:
        return PartitionSpec(), mesh
    if isinstance(sharding, PartitionSpec):
        return sharding, mesh
    if isinstance(sharding, NamedSharding):
        return sharding.spec, sharding.mesh
    if sharding.is_fully_replicated:  # SingleDeviceSharding, replicated PositionalSharding, ...
        return PartitionSpec(), mesh
    raise ShardingError(
        f"{where}: a {type(sharding).__name__} cannot be mapped onto the vector's axes; "
        "shard the kernel with a NamedSharding or give PartitionSpecs."
    )


def _mesh_axes_size(entry: Any, mesh: AnyMesh) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def vector_spec(target: Target, kernel_spec: PartitionSpec, mesh: AnyMesh | None) -> PartitionSpec:
    """The kernel's mesh axes, read at the kernel axes that the vector's axes follow."""
    key, vector_shape = target.key, target.vector_shape
    padded = tuple(kernel_spec) + (None,) * (len(target.kernel_shape) - len(kernel_spec))
    # A grouped conv's input vector (kernel axis None) spans all groups: replicate it.
    entries = [None if axis is None else padded[axis] for axis in target.vector_axes]
    if mesh is not None:
        for pos, (entry, n) in enumerate(zip(entries, vector_shape)):
            if entry is not None and n % _mesh_axes_size(entry, mesh):
                raise ShardingError(
                    f"IA3 vector at {key!r}, shape {tuple(vector_shape)}: mesh axes {entry!r} "
                    f"({_mesh_axes_size(entry, mesh)} devices) do not divide its axis {pos} of size {n}, "
                    f"taken from the kernel's sharding {kernel_spec}. Shard that kernel axis over mesh axes "
                    "whose size divides it."
                )
    return PartitionSpec(*entries)


def adapter_shardings(
    adapter: Mapping[str, Any],
    base: Mapping[str, Any],
    shardings: Any = None,
    config: IA3Config | None = None,
    *,
    layouts: Mapping[str, KernelLayout] | None = None,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """A sharding for every leaf of `adapter`, derived from the shardings of the base kernels.

    Each ``ia3_l`` vector gets, on each axis, the mesh axes of the kernel axis it follows (output
    features, input features for feedforward targets, stacked-layer axes kept); ``modules_to_save``
    copies get the shardings of the base params they copy.

    Args:
      adapter: the adapter tree from `split` (boxed or bare leaves).
      base: the base param tree (arrays or ``jax.ShapeDtypeStruct``; only shapes are read).
      shardings: one ``PartitionSpec`` or ``NamedSharding`` (or None: replicated) per leaf of `base`,
        e.g. ``nn.get_partition_spec(base)``. Default: the ``.sharding`` of `base`'s arrays.
      config: the `IA3Config` (feedforward direction, ``fan_in_fan_out``); without it, shapes decide.
      layouts: the layouts given to `ia3_init` (needed for ``nn.scan`` / ``nn.vmap`` stacks).
      mesh: checks that the mesh axes divide every vector axis they shard (NamedShardings carry
        their own mesh).

    Returns:
      A tree with `adapter`'s structure: ``PartitionSpec`` leaves where the kernels had specs,
      ``NamedSharding`` leaves (on the kernel's mesh) where they had NamedShardings.

    Raises:
      StructureError: `shardings` is not a tree of `base`'s leaves, or a vector has no base kernel.
      ShardingError: a mesh axis does not divide the vector axis it shards.
      VectorShapeError: a vector (e.g. a stacked one with another layer count) does not fit its kernel.

    Example:
      >>> # Megatron MLP: ``up`` split by output, ``down`` by input features over 'model'
      >>> specs = adapter_shardings(adapter, base, {"up": {"kernel": P(None, "model"), "bias": P("model")},
      ...                                          "down": {"kernel": P("model", None), "bias": P()}}, config)
      >>> specs  # {'up': {'ia3_l': P('model')}, 'down': {'ia3_l': P('model')}} with down feedforward
    """
    by_path = _sharding_tree(base, shardings)
    out: dict[_tree.Path, Any] = {}
    for path, leaf in _tree.leaves_with_paths(adapter):
        if path[-1] != _tree.VECTOR:  # a modules_to_save copy: sharded as the original
            if path not in by_path:
                raise StructureError(f"adapter leaf {_tree.dotted(path)!r} has no counterpart in the base params.")
            out[path] = by_path[path]
            continue
        module, key = path[:-1], _tree.dotted(path[:-1])
        if module + ("kernel",) not in by_path:
            raise StructureError(f"adapter vector at {key!r} has no kernel in the base params.")
        target = vector_target(module, _tree.get(base, module), np.shape(_tree.unbox(leaf)), config, layouts)
        kernel_sharding = by_path[module + ("kernel",)]
        spec, kernel_mesh = _spec_and_mesh(kernel_sharding, mesh, f"kernel of {key!r}")
        spec = vector_spec(target, spec, kernel_mesh)
        named = isinstance(kernel_sharding, NamedSharding)  # then its mesh is the vector's too
        out[path] = NamedSharding(kernel_sharding.mesh, spec) if named else spec
    return _tree.updated({}, out)


def optimizer_shardings(
    tx: optax.GradientTransformation,
    adapter: Any,
    shardings: Any,
    *,
    replicated: SpecOrSharding | None = None,
) -> Any:
    """Shardings for ``tx.init(adapter)``: per-parameter state (Adam's mu, nu) follows `shardings`.

    Other state (step counts, scalars) gets `replicated`: ``PartitionSpec()`` by default, or pass
    ``NamedSharding(mesh, PartitionSpec())``. Pass the result to ``jax.jit(...,
    out_shardings=...)`` so the optimizer state stays where its parameters are.

    Example:
      >>> specs = adapter_shardings(adapter, base, base_specs, config)
      >>> opt_specs = optimizer_shardings(optax.adam(1e-2), adapter, specs)
    """
    state = jax.eval_shape(tx.init, adapter)
    replicated = PartitionSpec() if replicated is None else replicated
    return optax.tree_utils.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        state,
        shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=_is_spec_leaf,
    )
