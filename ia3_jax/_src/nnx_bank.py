"""Adapter banks on NNX models: N adapters in each vector's last axis, each example of a batch scaled by its own.

`set_bank` writes ``ia3_jax.stack_adapters([...])`` into an adapted model (every `IA3Vector`
becomes ``(*shape, N)``); `bank_call` runs it with one adapter id per example. The ids travel as
module state (an `nnx.Variable` set on each module holding a bank for the call's duration), which the
vectors' call wrapper reads with `bank_ids` and applies with `bank_scale`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.errors import TraceContextError

from ia3_jax._src import bank as _bank
from ia3_jax._src import interceptor as _interceptor
from ia3_jax._src import tree as _tree
from ia3_jax._src.errors import StructureError, VectorShapeError
from ia3_jax._src.nnx_vectors import (
    TARGET_META,
    adapter,
    check_same_modules,
    einsum_batch_position,
    einsum_output_positions,
    named_modules,
    placed_like,
    saved_variables,
    vector_variables,
)
from ia3_jax._src.targets import Target


class _AdapterIds(nnx.Variable):
    """The per-example adapter ids of a `bank_call`, set on each module holding a bank for the call's duration.

    Module state (not a trace-time global), so ``nnx.jit``-ed methods, ``nnx.scan`` (which slices it along
    the layers' stacked axes like the vectors) and ``jax.jit`` over ``nnx.split`` states all see the ids of
    the call at hand. Not an ``nnx.Param``: no ``Param`` / ``LoRAParam`` filter, `adapter` or save sees it."""


IDS = "ia3_adapter_ids"  # the attribute of a module's `_AdapterIds` inside `bank_call`

# Hazard: the ids live on the shared model object, so two threads' bank_calls on one model (a server sharing
# it; eager calls, first-call tracing) would overwrite / drop each other's ids mid-call, scaling one thread's
# examples by the other's adapters. Each model gets a re-entrant lock, held from setting the ids until they are
# removed (the same thread may nest: a bank_call traced inside the model's call); weak keys, so models still die.
_LOCKS: weakref.WeakKeyDictionary[nnx.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
_UNHASHABLE_LOCK = threading.RLock()  # models that cannot be weak dict keys (an __eq__ without __hash__) share one
# The lock cannot stop a plain model(x) on another thread from meeting the ids: the module reads them only on a
# thread inside a bank_call, so that call is refused as any plain call of a bank is (where Python runs: eagerly
# or tracing; a cached nnx.jit-ed __call__ reads its state without us).
_BANK_CALLS = threading.local()


@contextmanager
def _model_lock(model: nnx.Module) -> Iterator[None]:
    try:
        lock = _LOCKS.get(model)
        if lock is None:
            with _LOCKS_GUARD:
                lock = _LOCKS.setdefault(model, threading.RLock())
    except TypeError:
        lock = _UNHASHABLE_LOCK
    with lock:
        yield


def _features(target: Target) -> tuple[int, ...]:
    """The feature shape a target's call scales (per layer: without stacked-layer axes)."""
    return target.layout.feature_shape(target.kernel_shape, target.feedforward)


def bank_ids(module: nnx.Module, target: Target, vector: jax.Array) -> jax.Array | None:
    """The module's ids of the `bank_call` in progress (None outside one); a bank vector called without
    ids is refused. (`bank_call` checked that all vectors are banks before setting the ids.)"""
    ids = getattr(module, IDS, None)
    if ids is not None and getattr(_BANK_CALLS, "depth", 0) > 0:  # else another thread's (see _BANK_CALLS)
        return ids.get_value()
    if _bank.bank_width(_features(target), vector.shape) is not None:  # per layer: nnx.scan slices stacked axes
        raise VectorShapeError(
            f"IA3 vector at {target.key!r} holds a bank of {vector.shape[-1]} adapters (shape {vector.shape}, the "
            "adapter axis last) but the model was called without adapter ids: run it with "
            "ia3_jax.nnx.bank_call(model, adapter_ids, *inputs), or write one adapter with "
            "ia3_jax.nnx.set_adapter(model, ia3_jax.bank_select(bank, i))."
        )
    return None


def bank_scale(module: nnx.Module, target: Target, vector: jax.Array, activation: Any, ids: jax.Array) -> Any:
    """`activation` with each example scaled by its adapter's column of `vector`, checked (`check_bank_fits`)."""
    side = "input" if target.feedforward else "output"
    positions = None if target.feedforward else einsum_output_positions(module)
    if positions is None:
        _interceptor.check_bank_fits(target.key, vector, activation, side, ids, {_features(target)})
        return _interceptor.scale_per_example(activation, vector, ids)
    # Features not trailing (Tunix's kv_einsum 'BSD,CKDH->CBSKH'): move the batch axis (where the input's
    # first axis goes) first and the features last, scale, and move them back.
    spec = module.einsum_str  # type: ignore[attr-defined]
    ndim = jnp.ndim(activation)
    batch = einsum_batch_position(module)
    if batch is None or batch in positions or max(positions) >= ndim:
        raise VectorShapeError(
            f"bank_call: the output of {target.key!r} ({spec!r}, shape {jnp.shape(activation)}) has no batch axis "
            "apart from its features, so its examples cannot take their own adapters: serve this module's adapters "
            "one at a time (ia3_jax.nnx.set_adapter(model, ia3_jax.bank_select(bank, i))), or merge them "
            "(ia3_jax.nnx.merge)."
        )
    order = [batch] + [i for i in range(ndim) if i != batch and i not in positions] + list(positions)
    moved = jnp.transpose(activation, order)
    _interceptor.check_bank_fits(target.key, vector, moved, side, ids, {_features(target)})
    return jnp.transpose(_interceptor.scale_per_example(moved, vector, ids), [order.index(i) for i in range(ndim)])


def _check_bank_model(model: nnx.Module, caller: str) -> dict[_tree.Path, nnx.Variable]:
    """The model's vectors, refused (`StructureError`) when there are none or it holds modules_to_save copies."""
    vectors = vector_variables(model)
    if not vectors:
        raise StructureError(f"{caller}: no IA3 vectors in this model: adapt it with ia3_jax.nnx.ia3_init first.")
    if saved_variables(model):
        raise StructureError(
            f"{caller}: the model holds modules_to_save copies, which one bank call would share among all "
            "adapters: per-example copies of whole modules are not an IA3 scaling. Serve such adapters on their own."
        )
    return vectors


def _require_bank(caller: str, target: Target, shape: tuple[int, ...]) -> int:
    """The number of adapters of a bank vector of `shape` at `target`; `VectorShapeError` naming the fix when
    it is a single adapter's vector or one for another model."""
    n = _bank.bank_width(target.vector_shape, shape)
    if n is not None:
        return n
    if shape == target.vector_shape:
        fix = (
            "stack adapters with ia3_jax.stack_adapters([...]), or write one adapter with ia3_jax.nnx.set_adapter."
            if caller == "set_bank"
            else "write a bank first with ia3_jax.nnx.set_bank(model, ia3_jax.stack_adapters([...]))."
        )
        raise VectorShapeError(
            f"{caller}: the IA3 vector at {target.key!r} has shape {shape}, a single adapter's, not a bank of "
            f"{target.vector_shape} vectors ({target.vector_shape} + (n_adapters,), the adapter axis last): {fix}"
        )
    raise VectorShapeError(
        f"{caller}: the bank vector at {target.key!r} has shape {shape}, i.e. vectors {shape[:-1]} and "
        f"{shape[-1:]} adapters (the adapter axis last), but the model's vector there has shape "
        f"{target.vector_shape}: a bank for another model or config; stack adapters of this model "
        "(ia3_jax.stack_adapters([ia3_jax.nnx.adapter(m) for m in tuned]))."
    )


def set_bank(model: nnx.Module, bank: Mapping[str, Any] | nnx.State) -> None:
    """Writes an adapter bank into the adapted `model`, in place: each `IA3Vector` becomes ``(*shape, N)``.

    Args:
      model: adapted by `ia3_init` (vectors at the bank's paths; no ``modules_to_save``).
      bank: `ia3_jax.stack_adapters` of adapters of this model (`adapter` trees, `load_adapter` /
        `load_peft` pairs), i.e. a nested dict whose every ``ia3_l`` is ``(*vector_shape, N)``, the
        adapter axis last; or the vector ``nnx.State`` of a model holding a bank.

    Everything is checked before anything is written (a refused bank changes nothing):
    `StructureError` when the paths differ from the model's or the vectors do not share one adapter
    axis, `VectorShapeError` when a vector's features are not its module's (a single adapter, or
    one for another model). The vectors keep the model's dtype and placement, the adapter axis
    replicated. Run the model with `bank_call`; `adapter` gives the bank back, and
    ``set_adapter(model, ia3_jax.bank_select(bank, i))`` makes it a single-adapter model again.

    Example:
      >>> bank = ia3_jax.stack_adapters([ia3_jax.nnx.adapter(m) for m in tuned])   # k_proj: (2, 8, 5)
      >>> ia3_jax.nnx.set_bank(model, bank)
      >>> logits, _ = ia3_jax.nnx.bank_call(model, jnp.array([4, -1, 0]), tokens, positions, None, mask)
    """
    vectors = _check_bank_model(model, "set_bank")
    tree = adapter(bank) if isinstance(bank, nnx.State) else _tree.to_dict(bank)
    new = _tree.vectors(tree)
    check_same_modules(new, vectors, "set_bank: the bank's vectors")
    for path, variable in vectors.items():
        _require_bank("set_bank", variable.get_metadata(TARGET_META), tuple(np.shape(new[path])))
    _bank.bank_size(tree)  # vectors only (no modules_to_save copies), one adapter axis, float dtypes
    for path, variable in vectors.items():
        variable.set_value(placed_like(variable, new[path]))


def bank_call(model: nnx.Module, adapter_ids: Any, *args: Any, **kwargs: Any) -> Any:
    """``model(*args, **kwargs)`` with each example scaled by its own adapter of the bank `set_bank` wrote.

    Args:
      model: holds a bank (`set_bank`): every vector ``(*features, N)``.
      adapter_ids: ``(batch,)`` integers, one per example along the leading (batch) axis of every
        targeted module's activations: ``i`` for adapter ``i``, `ia3_jax.NO_ADAPTER` (-1) for the base.
      *args, **kwargs: the model's inputs.

    Returns the model's output; each example's equals the model run on it alone with its adapter
    (``set_adapter(model, ia3_jax.bank_select(bank, i))``, or merged), feedforward targets scaling
    their input and the others their output as in the model's own call.

    A plain function of the model: ``nnx.jit(bank_call)(model, ids, x)``, ``jax.jit`` over
    ``nnx.merge(graphdef, state)``, ``nnx.grad`` / ``jax.grad`` (each example's gradient reaches only
    its adapter's column), ``jax.vmap`` and ``nnx.scan``-ed layers compose with it, and so does a model
    whose ``__call__`` (or a submodule's) is ``nnx.jit``-ed: the ids travel as module state, an
    ``nnx.Variable`` (not a ``Param``) set on each module holding a bank for the call's duration and
    removed when it returns or raises (an enclosing bank_call's ids put back). Threads sharing one model
    take turns: a per-model re-entrant lock is held for the call, so no call sees another's ids. A plain
    ``model(x)`` on another thread during a bank_call is refused where Python runs (eagerly, tracing),
    but a cached ``nnx.jit``-ed ``__call__`` reads the ids as state: do not mix plain calls and bank_call
    on one model shared by threads.

    Raises:
      AdapterIdsError: the ids are not a 1-D integer array, concrete ids out of range (checked before
        running; under jit an out-of-range id gives its example NaN: check serving inputs with
        `ia3_jax.check_adapter_ids`), or not one id per example of a module's batch axis.
      VectorShapeError: the model holds single-adapter vectors (or a bank vector is called without
        ids, outside `bank_call`), or a bank's features do not fit the activations.

    Example:
      >>> ia3_jax.nnx.set_bank(model, ia3_jax.stack_adapters(adapters))          # 5 adapters
      >>> y = nnx.jit(ia3_jax.nnx.bank_call)(model, jnp.array([3, -1, 0, 4]), x)  # x: (4, ..., features)
    """
    ids = adapter_ids if isinstance(adapter_ids, jax.Array) else jnp.asarray(adapter_ids)
    _interceptor.check_ids(ids)
    with _model_lock(model):  # see _LOCKS: the checks read the model too, and another call's ids must not show
        _BANK_CALLS.depth = getattr(_BANK_CALLS, "depth", 0) + 1
        try:
            return _bank_call(model, ids, args, kwargs)
        finally:
            _BANK_CALLS.depth -= 1


def _bank_call(model: nnx.Module, ids: jax.Array, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`bank_call` under the model's lock."""
    vectors = _check_bank_model(model, "bank_call")
    sizes = {}
    for variable in vectors.values():
        target: Target = variable.get_metadata(TARGET_META)
        sizes[target.key] = _require_bank("bank_call", target, tuple(np.shape(variable.get_value())))
    if len(set(sizes.values())) != 1:
        shown = dict(list(sizes.items())[:8])
        raise StructureError(
            f"bank_call: the model's vectors hold banks of different sizes {shown}: write one bank of N adapters "
            "for every vector with ia3_jax.nnx.set_bank(model, ia3_jax.stack_adapters(adapters))."
        )
    _interceptor.check_ids(ids, next(iter(sizes.values())))  # values, where they are concrete
    modules = dict(named_modules(model))
    try:
        previous = _set_ids(modules, vectors, ids)
    except TraceContextError:
        # The model lives outside the trace at hand (a jax.jit / jax.vmap closing over it): run a copy made
        # here, and write back what the call changed (which raises as model(...) itself would). Still under the
        # lock: unlocked, the copy could take another thread's ids (or split mid-setattr) and the write-back
        # could land in the middle of its call.
        work = nnx.merge(*nnx.split(model))
        before = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
        modules = dict(named_modules(work))
        previous = _set_ids(modules, vectors, ids)
        try:
            out = work(*args, **kwargs)
        finally:
            _restore_ids(modules, previous)
        after = nnx.state(work)
        if any(v.get_value() is not before.get(p) for p, v in nnx.to_flat_state(after)):
            nnx.update(model, after)
        return out
    try:
        return model(*args, **kwargs)
    finally:
        _restore_ids(modules, previous)


def _set_ids(
    modules: Mapping[_tree.Path, nnx.Module], vectors: Mapping[_tree.Path, nnx.Variable], ids: Any
) -> dict[_tree.Path, _AdapterIds | None]:
    """Gives each module holding a bank vector its `_AdapterIds`: ``(batch,)``, broadcast over the stacked-layer
    axes of ``nnx.vmap``-ed layers at the vector's positions, so that ``nnx.scan`` slices both alike. (All or none.)

    Returns each module's ids before (an enclosing bank_call's, on the same thread: the lock is re-entrant),
    for `_restore_ids`: dropping them instead would leave the enclosing call without ids."""
    previous: dict[_tree.Path, _AdapterIds | None] = {}
    try:
        for path, variable in vectors.items():
            target: Target = variable.get_metadata(TARGET_META)
            shape = np.shape(variable.get_value())
            dims, batch = [int(np.shape(ids)[0])], 0
            for pos, axis in enumerate(target.vector_axes):
                if axis in target.layout.stack_axes:
                    at = min(pos, len(dims))
                    dims.insert(at, shape[pos])
                    batch += at <= batch
            rest = tuple(i for i in range(len(dims)) if i != batch)
            value = jnp.broadcast_to(jnp.expand_dims(ids, rest), dims) if rest else ids
            module = modules[path]
            before = vars(module).get(IDS)
            setattr(module, IDS, _AdapterIds(value))
            previous[path] = before if isinstance(before, _AdapterIds) else None
    except BaseException:
        _restore_ids(modules, previous)
        raise
    return previous


def _restore_ids(modules: Mapping[_tree.Path, nnx.Module], previous: Mapping[_tree.Path, _AdapterIds | None]) -> None:
    for path, before in previous.items():
        module = modules[path]
        if before is not None:
            setattr(module, IDS, before)
        elif isinstance(vars(module).get(IDS), _AdapterIds):
            delattr(module, IDS)
