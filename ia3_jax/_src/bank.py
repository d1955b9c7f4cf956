"""Adapter banks: many adapters of one base model in one tree, each example of a batch scaled by its own.

A bank is a plain adapter tree whose ``ia3_l`` leaves carry one more axis, the adapter axis, *last*:
``(*vector_shape, n_adapters)``. Last, because ``nn.scan`` slices every stored param along its
stacked-layer axis (``variable_axes``: 0 by default, 1 in some models) and a vector keeps that axis
where its kernel has it; the adapter axis after all of them is never sliced, so the scan body sees
``(*features, n_adapters)`` and gathers each example's column. Being a plain tree, a bank goes through
`join`, `jax.grad`, optax, `jax.device_put` (replicated, or sharded along its last axis) unchanged.

`bank_apply_fn` runs a model with per-example adapter ids through the one IA3 interceptor: each
example is scaled by its adapter's vectors, input or output side as the config says, and id
`NO_ADAPTER` (-1) runs an example on the base model. Where the ids are fixed for a batch (serving:
a decode loop), `per_example_adapter` picks each example's vectors once, as `PickedRows`, and
`per_example_apply_fn` applies them, so that no step gathers from the bank.

Example::

    loaded = [ia3_jax.load_peft(d, params) for d in adapter_dirs]     # (adapter, config) pairs
    config = loaded[0][1]
    bank = ia3_jax.stack_adapters(loaded, config)                     # vectors (*features, N)
    forward = jax.jit(ia3_jax.bank_apply_fn(model.apply, config))
    logits = forward({"params": ia3_jax.join(base, bank)}, x, adapter_ids=jnp.array([3, -1, 0]))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from ia3_jax._src import interceptor as _interceptor
from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config
from ia3_jax._src.dtypes import check_vector_dtype, integer_scalar
from ia3_jax._src.errors import AdapterIdsError, IA3ConfigError, StructureError, VectorShapeError

F = TypeVar("F", bound=Callable[..., Any])
Adapter = Mapping[str, Any]
# An adapter tree, or the (adapter, config) pair that load_adapter / load_peft return.
AdapterLike = Adapter | tuple[Adapter, IA3Config]


def _as_pair(item: AdapterLike, where: str) -> tuple[Adapter, IA3Config | None]:
    if isinstance(item, Mapping):
        return item, None
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Mapping) and isinstance(item[1], IA3Config):
        return item[0], item[1]
    raise StructureError(
        f"{where} is a {type(item).__name__}; expected an adapter tree or the (adapter, config) pair that "
        "ia3_jax.load_adapter / ia3_jax.load_peft return."
    )


def _vectors(adapter: Adapter, where: str) -> dict[_tree.Path, jax.Array]:
    """The adapter's vectors (unboxed) by module path; anything else in it is refused."""
    vectors = {}
    leaves = _tree.leaves_with_paths(adapter)
    _interceptor.refuse_picked(leaves, f"{where} must be an adapter or a bank: stack, size and pick from the bank.")
    for path, leaf in leaves:
        if not path or path[-1] != _tree.VECTOR:
            raise StructureError(
                f"{where} holds {_tree.dotted(path)!r}, which is not an IA3 vector: a bank holds vectors only, since "
                "per-example copies of whole modules (modules_to_save) are not an IA3 scaling. Serve such adapters "
                "on their own, or drop their modules_to_save copies."
            )
        vector = jnp.asarray(_tree.unbox(leaf))
        check_vector_dtype(vector.dtype, f"IA3 vector at {_tree.dotted(path[:-1])!r} of {where}")
        vectors[path[:-1]] = vector
    if not vectors:
        raise StructureError(f"{where} holds no IA3 vector.")
    return vectors


def _check_config(config: IA3Config, reference: IA3Config, paths: Sequence[_tree.Path], where: str) -> None:
    """Raises `IA3ConfigError` unless `config` scales the same side of every module as `reference`."""
    if config.fan_in_fan_out != reference.fan_in_fan_out:
        raise IA3ConfigError(
            f"{where} has fan_in_fan_out={config.fan_in_fan_out} but the bank's config has "
            f"{reference.fan_in_fan_out}: its kernels are laid out for another model."
        )
    for path in paths:
        key = _tree.dotted(path)
        if config.is_feedforward(key) != reference.is_feedforward(key):
            sides = {True: "input (feedforward)", False: "output"}
            raise IA3ConfigError(
                f"{where} scales the {sides[config.is_feedforward(key)]} of {key!r} but the bank's config scales its "
                f"{sides[reference.is_feedforward(key)]}: the feedforward_modules differ, so one bank call cannot "
                "apply both."
            )


def _check_same(
    vectors: Mapping[_tree.Path, jax.Array], like: Mapping[_tree.Path, tuple[int, ...]], where: str
) -> None:
    """Raises `StructureError` unless `vectors` are at the paths of `like`, with its shapes."""
    missing, extra = sorted(set(like) - set(vectors)), sorted(set(vectors) - set(like))
    if missing or extra:
        raise StructureError(
            f"{where} has other modules than the bank: missing {[_tree.dotted(p) for p in missing[:8]]}, extra "
            f"{[_tree.dotted(p) for p in extra[:8]]}. Adapters of one bank need the same base model and targets."
        )
    for path, vector in vectors.items():
        if vector.shape != like[path]:
            raise StructureError(
                f"{where} has a vector of shape {vector.shape} at {_tree.dotted(path)!r} where the bank's vectors "
                f"have {like[path]}: an adapter for another model size or layout."
            )


def _read(items: Sequence[AdapterLike], config: IA3Config | None, first: int = 0) -> list[dict[_tree.Path, jax.Array]]:
    """Each item's vectors, checked against the first's paths and shapes and against one config.

    Without `config`, the first pair's config is the one the others are checked against.
    """
    read: list[dict[_tree.Path, jax.Array]] = []
    for i, item in enumerate(items, start=first):
        where = f"adapter {i}"
        adapter, own = _as_pair(item, where)
        vectors = _vectors(adapter, where)
        if read:
            _check_same(vectors, {p: v.shape for p, v in read[0].items()}, where)
        if own is not None:
            if config is None:
                config = own
            _check_config(own, config, list(vectors), where)
        read.append(vectors)
    return read


def stack_adapters(adapters: Sequence[AdapterLike], config: IA3Config | None = None) -> dict[str, Any]:
    """N adapters of one base model and config stacked into a bank, the adapter axis last.

    Args:
      adapters: adapter trees (`split`'s adapter), or ``(adapter, config)`` pairs as `load_adapter`
        and `load_peft` return them, in bank order: adapter ``i`` is selected by id ``i``.
      config: the config the bank is applied with; every pair's config must scale the same side of
        every module (``feedforward_modules``) and share ``fan_in_fan_out``. Without it, the first
        pair's config is the reference.

    Returns:
      An adapter tree with the vectors' paths and every ``ia3_l`` of shape ``(*vector_shape, N)``
      (boxes dropped), in the vectors' promoted dtype. Join it to the base with `join`.

    Raises `StructureError` when the adapters differ in modules or vector shapes, or hold anything
    but vectors (``modules_to_save`` copies), and `IA3ConfigError` when their configs disagree.

    Example:
      >>> bank = stack_adapters([a0, a1, a2])
      >>> bank["mlp"]["up"]["ia3_l"].shape          # a0's (16,) vector, 3 adapters
      (16, 3)
    """
    if not adapters:
        raise StructureError("stack_adapters got no adapters.")
    read = _read(adapters, config)
    stacked = {path + (_tree.VECTOR,): jnp.stack([v[path] for v in read], axis=-1) for path in read[0]}
    return _tree.updated({}, stacked)


def bank_width(single: Sequence[int], shape: Sequence[int]) -> int | None:
    """N when a vector of `shape` is a bank of N adapters whose single vectors have shape `single`
    (``single + (N,)``, the adapter axis last), else None. Exact, given the target's ``vector_shape``."""
    shape, single = tuple(shape), tuple(single)
    return shape[-1] if len(shape) == len(single) + 1 and shape[:-1] == single else None


BANK_FIX = "ia3_jax.nnx.set_adapter(model, ia3_jax.bank_select(ia3_jax.nnx.adapter(model), i)) first"


def refuse_bank(key: str, single: Sequence[int], shape: Sequence[int], what: str) -> None:
    """Raises `VectorShapeError` naming the fix when the vector at `key` (of `shape`; one adapter's: `single`) is
    a bank: `what` (merge, unmerge, a PEFT export) works on one adapter."""
    n = bank_width(single, shape)
    if n is not None:
        raise VectorShapeError(
            f"{what}: the IA3 vector at {key!r} (shape {tuple(shape)}) holds a bank of {n} adapters, and {what} "
            f"works on one adapter: write adapter i with {BANK_FIX} (a bank tree: ia3_jax.bank_select(bank, i))."
        )


def _bank_vectors(bank: Adapter) -> dict[_tree.Path, jax.Array]:
    vectors = _vectors(bank, "the bank")
    sizes = {v.shape[-1] if v.ndim else None for v in vectors.values()}
    if len(sizes) != 1 or None in sizes:
        raise StructureError(
            f"the bank's vectors do not share one last (adapter) axis: sizes {sorted(map(str, sizes))}. Build banks "
            "with ia3_jax.stack_adapters."
        )
    return vectors


def bank_size(bank: Adapter) -> int:
    """The number of adapters in `bank` (the size of its vectors' last axis).

    Example:
      >>> bank_size(stack_adapters([adapter_a, adapter_b], config))
      2
    """
    return int(next(iter(_bank_vectors(bank).values())).shape[-1])


def bank_add(bank: Adapter, adapter: AdapterLike, config: IA3Config | None = None) -> dict[str, Any]:
    """`bank` with `adapter` appended: its id is the old `bank_size`. The other adapters are not re-read.

    `adapter` may be an ``(adapter, config)`` pair; with `config` (the bank's) too, they must agree
    as in `stack_adapters`. Raises `StructureError` when its modules or shapes differ from the bank's.

    Example:
      >>> bank = bank_add(bank, ia3_jax.load_adapter("ckpt/customer_17"), config)
    """
    vectors, n = _bank_vectors(bank), bank_size(bank)
    (new,) = _read([adapter], config, first=n)
    _check_same(new, {p: v.shape[:-1] for p, v in vectors.items()}, f"adapter {n}")
    added = {p + (_tree.VECTOR,): jnp.concatenate([v, new[p][..., None]], axis=-1) for p, v in vectors.items()}
    return _tree.updated({}, added)


def _checked_index(index: Any, n: int) -> int:
    """`index` as a Python int if it is an integer scalar (Python, NumPy or a concrete JAX one) in ``[0, n)``."""
    value = integer_scalar(index)
    if value is None or not 0 <= value < n:
        raise AdapterIdsError(
            f"adapter index {index!r} is not one of the bank's 0..{n - 1} (an integer known outside jit)."
        )
    return value


def bank_remove(bank: Adapter, index: int) -> dict[str, Any]:
    """`bank` without adapter `index`; the ids of the adapters after it drop by one.

    Example:
      >>> bank = bank_remove(bank, 2)      # old ids 3, 4, ... are now 2, 3, ...
    """
    n = bank_size(bank)
    index = _checked_index(index, n)
    if n == 1:
        raise StructureError("bank_remove would leave an empty bank; run the base model (adapter id -1) instead.")
    kept = np.delete(np.arange(n), index)
    return _tree.updated({}, {p + (_tree.VECTOR,): v[..., kept] for p, v in _bank_vectors(bank).items()})


def bank_select(bank: Adapter, index: int) -> dict[str, Any]:
    """Adapter `index` of `bank` as an ordinary adapter tree (for `merge`, `save_peft`, a reference run).

    Example:
      >>> merged = ia3_jax.merge(ia3_jax.join(base, bank_select(bank, 3)), config)
    """
    index = _checked_index(index, bank_size(bank))
    return _tree.updated({}, {p + (_tree.VECTOR,): v[..., index] for p, v in _bank_vectors(bank).items()})


def check_adapter_ids(adapter_ids: Any, bank: Adapter | int) -> None:
    """Host-side check that every id is `NO_ADAPTER` (-1) or in ``[0, bank_size)``.

    A jitted call sees ids as tracers and cannot check their values: there an id out of range
    gives its example NaN outputs. Call this where the ids are concrete, before the jitted call
    (`bank_apply_fn` does it for you when it is called with concrete ids). Raises `AdapterIdsError`.

    Example:
      >>> check_adapter_ids(jnp.array([0, 4, -1]), bank)       # a bank of 5 adapters: fine
    """
    n = int(bank) if isinstance(bank, int | np.integer) else bank_size(bank)
    _interceptor.check_ids(np.asarray(jax.device_get(adapter_ids)), n)


def _argument_bank_size(args: Any) -> int | None:
    """The adapter-axis size of the bank vectors in a call's arguments (None when none is there)."""
    leaves = {_tree.dotted(p): v for p, v in _tree.leaves_with_paths(args) if p and p[-1] == _tree.VECTOR}
    for key, leaf in leaves.items():
        _interceptor.check_picked(key, leaf, per_example=False)
    vectors = {key: _tree.unbox(leaf) for key, leaf in leaves.items()}
    sizes = {k: np.shape(v)[-1] for k, v in vectors.items() if np.ndim(v)}
    if len(set(sizes.values())) > 1:
        shown = dict(list(sizes.items())[:8])
        raise StructureError(
            f"the IA3 vectors in the arguments have last (adapter) axes of different sizes {shown}: not one bank, "
            "but a single adapter's vectors or vectors of two banks. Stack the adapters with ia3_jax.stack_adapters "
            "and join the bank alone to the base."
        )
    return next(iter(sizes.values()), None)


def per_example_adapter(
    bank: Adapter, adapter_ids: Any, *, stack_axes: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """Each example's vectors, picked from `bank` once: the adapter of one batch, for `per_example_apply_fn`.

    `bank_apply_fn` picks inside every call, which in a decode loop means at every step: XLA's GPU
    compiler fuses that gather into each step's scaling, reading a strided column of the bank (on an
    H200, 5% of the lean Llama's decode time). Picked once, before the loop, each step reads one
    contiguous row per example, as with a single adapter.

    Args:
      bank: an adapter bank (`stack_adapters`), vectors ``(*vector_shape, N)``; it may be traced.
      adapter_ids: ``(batch,)`` integers: ``i`` for adapter ``i``, `NO_ADAPTER` (-1) for the base model
        (a row of ones). Any other id out of range gives its row NaN (checked here when concrete).
      stack_axes: ``{module path: layer axis}`` for ``nn.scan`` / ``nn.vmap``-stacked layers (the
        transform's ``variable_axes['params']``), a key naming the stacked module or one above it;
        nested stacks give one key each (``{"outer": 0, "outer.inner": 0}``). A stacked module left
        out is refused when the call slices it (`VectorShapeError`), never read wrongly.

    Returns:
      An adapter tree with the bank's paths, each ``ia3_l`` a `PickedRows` box holding ``(batch,
      *vector_shape)``: a stacked one the per-layer rows ``(batch, *features)`` stacked at its layer
      axes (``(layers, batch, *features)`` for axis 0), so that the transform slices layers, not
      examples. In the bank's dtype; gradients flow back to the bank's columns.

    Raises `AdapterIdsError` for malformed or (concrete) out-of-range ids, `StructureError` when a
    `stack_axes` key names no module of the bank or an axis its vectors cannot have.

    Example:
      >>> forward = ia3_jax.per_example_apply_fn(model.apply, config)
      >>> @jax.jit
      ... def serve(base, bank, prompt, ids):       # ids fixed for each sequence
      ...     params = ia3_jax.join(base, ia3_jax.per_example_adapter(bank, ids))
      ...     return generate(forward, params, prompt)   # every decode step reads the picked rows
    """
    vectors = _bank_vectors(bank)
    ids = adapter_ids if isinstance(adapter_ids, jax.Array) else jnp.asarray(adapter_ids)
    _interceptor.check_ids(ids, next(iter(vectors.values())).shape[-1])  # values only where concrete
    axes = _layer_axes(vectors, stack_axes or {})
    picked = {}
    for path, vector in vectors.items():
        rows = _interceptor.pick_per_example(vector, ids)  # (batch, *vector_shape)
        picked[path + (_tree.VECTOR,)] = _stacked_rows(rows, axes.get(path, ()), _tree.dotted(path))
    return _tree.updated({}, picked)


def _stacked_rows(rows: jax.Array, axes: tuple[int, ...], module: str) -> _interceptor.PickedRows:
    """Rows ``(batch, *stored)`` rearranged so that each layer axis (`axes`, outermost first, each counted in
    the shape that the outer ones leave) is where its transform slices, the batch axis first of what is left."""
    stored = list(range(rows.ndim - 1))
    layer = [stored.pop(a) for a in axes]  # the layer axes' positions in the stored vector
    order = ["batch", *stored]
    for a, s in reversed(list(zip(axes, layer))):
        order.insert(a, s)
    source = ["batch", *range(rows.ndim - 1)]
    placed = jnp.transpose(rows, [source.index(label) for label in order])
    return _interceptor.PickedRows(placed, tuple(sorted(order.index(s) for s in layer)), module)


def _layer_axes(
    vectors: Mapping[_tree.Path, jax.Array], stack_axes: Mapping[str, int]
) -> dict[_tree.Path, tuple[int, ...]]:
    """Each stacked vector's layer axes from ``{module path: axis}``, outermost (shortest key) first."""
    found: dict[_tree.Path, tuple[int, ...]] = {}
    for key, axis in sorted(stack_axes.items(), key=lambda item: len(item[0])):
        root = tuple(key.split("."))
        matched = [p for p in vectors if _tree.under(p, [root])]
        if not matched:
            raise StructureError(
                f"stack_axes names {key!r}, which holds no vector of the bank; its modules: "
                f"{_tree.listing(_tree.dotted(p) for p in vectors)}."
            )
        for path in matched:
            outer = found.get(path, ())
            left = vectors[path].ndim - 1 - len(outer)  # the vector's axes the outer layer axes leave
            if not isinstance(axis, int | np.integer) or not 0 <= axis < left or left < 2:
                raise StructureError(
                    f"stack_axes[{key!r}] = {axis!r}, but the bank's vector at {_tree.dotted(path)!r} has shape "
                    f"{vectors[path].shape} (the adapter axis last{', inside the layer axes ' if outer else ''}"
                    f"{outer if outer else ''}): a layer axis is one of the {left} axes left, and a feature axis must "
                    "remain besides it."
                )
            found[path] = (*outer, int(axis))
    return found


def per_example_apply_fn(fn: F, config: IA3Config | None = None, *, strict: bool = True) -> F:
    """`apply_fn` for vectors picked per example (`per_example_adapter`): example ``b`` is scaled by row ``b``.

    The params given to `fn` hold ``join(base, per_example_adapter(bank, ids))``; the batch (leading)
    axis of every targeted module's activations must be the one the rows were picked for. Same
    results as `bank_apply_fn` with those ids, and the same transformations (`jax.jit`, `jax.grad`
    back to the bank, `jax.vmap`, sharded `jit`, ``nn.scan``, Hugging Face ``generate``). Checked at
    trace time: each vector is ``(batch, *features)`` with features that fit its activation, and
    its batch is the activation's (`VectorShapeError`). ``strict`` is `apply_fn`'s.

    Example:
      >>> forward = jax.jit(per_example_apply_fn(model.apply, config))
      >>> rows = per_example_adapter(bank, jnp.array([0, 3, -1]))
      >>> logits = forward({"params": join(base, rows)}, x)     # x: (3, ...)
    """
    _interceptor.check_not_staged(fn, "per_example_apply_fn")

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return _interceptor.call_intercepted(fn, config, strict, args, kwargs, per_example=True)

    return wrapped  # type: ignore[return-value]


def bank_apply_fn(fn: F, config: IA3Config | None = None, *, strict: bool = True) -> F:
    """`apply_fn` for a bank: the wrapper takes ``adapter_ids=`` and scales each example by its own adapter.

    The params given to `fn` hold a bank joined to the base (``join(base, stack_adapters(...))``).
    The wrapper's call is ``wrapped(*args, adapter_ids=ids, **kwargs)``, ``ids`` of shape ``(batch,)``,
    one integer per example along the leading axis of every targeted module's activations: ``i``
    for adapter ``i``, `NO_ADAPTER` (-1) for the base model. Feedforward targets scale their input,
    the others their output, as in `apply_fn`; the result equals running each example alone with its
    adapter (merged or not). Jit the wrapper; `jax.grad` (each example's gradient reaches only its
    adapter's column), `jax.vmap`, sharded `jit` (bank replicated or sharded along its last axis),
    ``nn.scan`` and Hugging Face ``generate`` (the ids stay with their sequences through the
    KV-cached steps) work as with `apply_fn`.

    Checked before anything runs: the ids' shape and dtype, one adapter-axis size among the
    arguments' vectors, and, at trace time, that each vector's features fit its activation and the
    batch axis has one id per example (`AdapterIdsError`, `VectorShapeError`). Id values are checked
    when the wrapper gets concrete ids (unjitted); under `jax.jit` an out-of-range id gives its
    example NaN, so check serving inputs with `check_adapter_ids` on the host. ``strict`` is
    `apply_fn`'s.

    Example:
      >>> forward = jax.jit(bank_apply_fn(model.apply, config))
      >>> logits = forward({"params": join(base, bank)}, x, adapter_ids=jnp.array([0, 3, -1]))
    """
    _interceptor.check_not_staged(fn, "bank_apply_fn")

    @functools.wraps(fn)
    def wrapped(*args: Any, adapter_ids: Any = None, **kwargs: Any) -> Any:
        if adapter_ids is None:  # Python's own message would name the wrapped function, not this wrapper
            raise AdapterIdsError(
                f"{getattr(fn, '__qualname__', 'the function')} wrapped by bank_apply_fn needs adapter_ids=: one "
                f"id per example, {_interceptor.NO_ADAPTER} for the base model (one adapter for all: its id on every "
                "row)."
            )
        ids = adapter_ids if isinstance(adapter_ids, jax.Array) else jnp.asarray(adapter_ids)
        _interceptor.check_ids(ids)
        n = _argument_bank_size((args, kwargs))
        if n is not None and not isinstance(ids, jax.core.Tracer):
            check_adapter_ids(ids, n)
        return _interceptor.call_intercepted(fn, config, strict, args, kwargs, adapter_ids=ids)

    return wrapped  # type: ignore[return-value]
