"""The IA3 interceptor: rescales the input or output of every module call that has an ``ia3_l`` vector.

Flax consults method interceptors while *tracing*; they are not part of `jax.jit`'s cache key. A
function traced outside the interceptor ignores the vectors forever, so enter it inside the traced
function: `apply_fn` does that, and checks that every vector in the arguments was applied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from flax.core import meta

from ia3_jax._src import quant
from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config
from ia3_jax._src.dtypes import check_vector_dtype
from ia3_jax._src.errors import (
    AdapterIdsError,
    AlreadyJittedError,
    NotAppliedError,
    StructureError,
    VectorShapeError,
)
from ia3_jax._src.remat import name_activation
from ia3_jax._src.targets import feedforward_side

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass
class Applied:
    """What the interceptor saw during one call.

    Attributes:
      paths: the module paths whose vectors were applied, as ``module.scope.path``: the path from
        the root of the ``params`` that the Flax model was applied to, e.g. ``("encoder", "k")``. In
        an ``nn.scan`` / ``nn.vmap`` body it is the path of the stacked params (no layer index),
        which is where the stacked vector sits, so it is exact there too.
      roots: for each params tree that a Flax model was applied to, the module paths of its
        vectors; `missed` uses them to find where such a tree sits in the arguments.
    """

    paths: set[_tree.Path] = dataclasses.field(default_factory=set)
    roots: set[frozenset[_tree.Path]] = dataclasses.field(default_factory=set)
    # Root scopes already recorded, kept alive so that their ids stay unique during the call.
    _scopes: dict[int, Any] = dataclasses.field(default_factory=dict, repr=False)
    # id of each vector value read -> (module path, the value, kept alive so that the id stays unique).
    _reads: dict[int, tuple[_tree.Path, Any]] = dataclasses.field(default_factory=dict, repr=False)

    def record(self, path: _tree.Path, vector: Any) -> None:
        """Records that the module at `path` applied `vector` (the value it read from its params)."""
        self.paths.add(path)
        self._reads[id(vector)] = (path, vector)

    def record_root(self, module: nn.Module) -> None:
        """Records the vector paths of the params that `module`'s model was applied to (once per apply)."""
        params, scope = _tree.root_params(module), module.scope
        if params is None or scope is None or id(scope.root) in self._scopes:
            return
        self._scopes[id(scope.root)] = scope.root
        vectors = frozenset(_tree.vector_modules(params))
        if vectors:
            self.roots.add(vectors)

    def missed(self, vectors: list[tuple[_tree.Path, Any]]) -> list[_tree.Path]:
        """The paths of the vectors (``(path, leaf)`` in a function's arguments) that no module applied.

        By identity first: a leaf that a module read is applied, and only that one, so a second tree
        with the same module paths (a teacher next to a student) does not count for it. Reads that no
        argument leaf accounts for (``nn.scan`` reads a slice of the stacked vector; a model may copy
        or cast its params) are matched by exact path: a vector's path relative to its params tree's
        root in the arguments (`tree.rooted`) must be such a read's module path. With modules ``fc``
        and ``aux.fc`` and only ``fc`` called, ``aux.fc`` is missed (a suffix rule would count it).
        """
        ids = {id(_tree.unbox(leaf)) for _, leaf in vectors}
        loose = {path for i, (path, _) in self._reads.items() if i not in ids}
        relative = _tree.rooted([p for p, _ in vectors], self.roots)
        return [
            p for p, leaf in vectors if id(_tree.unbox(leaf)) not in self._reads and relative.get(p) not in loose
        ]


def scale(activation: jax.Array, vector: jax.Array) -> jax.Array:
    """``activation * vector`` over the trailing feature axes.

    The product is computed in ``promote_types(activation.dtype, vector.dtype)`` (float32 for a bf16
    activation and a float32 vector, as PEFT's autocast) and cast back to the activation's dtype.
    For the backward pass the activation itself is kept, not its float32 copy (the cast is redone
    there): under `nn.scan`, whose residuals are fixed before XLA sees them, that halves the bytes
    that a bf16 model saves for each IA3 vector.

    The activation is named `ia3_jax.ACTIVATION_NAME` (`jax.ad_checkpoint.checkpoint_name`): under
    ``nn.remat`` / `jax.checkpoint` with `ia3_jax.remat_policy`, the backward pass recomputes it
    instead of keeping it, which removes IA3's memory overhead.

    Example:
      >>> y = scale(jnp.ones((2, 7, 16), jnp.bfloat16), jnp.full((16,), 0.5))   # bf16 (2, 7, 16), all 0.5
    """
    return _scale(name_activation(activation), vector)


@functools.partial(jax.checkpoint, prevent_cse=False)
def _scale(activation: jax.Array, vector: jax.Array) -> jax.Array:
    dtype = jnp.promote_types(activation.dtype, vector.dtype)
    return (activation.astype(dtype) * vector.astype(dtype)).astype(activation.dtype)


_LINEN_MISFIT = (
    "A stacked vector (nn.scan) used outside its scan, or a kernel layout that ia3_init guessed wrong, gives "
    "this: pass layouts=ia3_jax.infer_layouts(...) to ia3_init."
)


def check_activation_fits(key: str, vector: jax.Array, activation: Any, side: str, cause: str = _LINEN_MISFIT) -> None:
    """Raises `VectorShapeError` unless `vector` fits the trailing axes of the `side` it scales.

    `cause` says what usually leads there (Linen: a layout; NNX: other inputs than at ``ia3_init``).
    """
    shape = jnp.shape(activation)
    if vector.ndim > len(shape) or tuple(shape[len(shape) - vector.ndim :]) != vector.shape:
        raise VectorShapeError(
            f"IA3 vector at {key!r} has shape {vector.shape} but the {side} it scales has shape {shape}. {cause}"
        )


def module_input(
    method: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, Callable[[Any], tuple[tuple[Any, ...], dict[str, Any]]]]:
    """The input a module call scales and a function that rebuilds ``(args, kwargs)`` around a new one.

    The input is the first argument after ``self``: by position, or by its name in `method`'s
    signature when passed by keyword (``dense(flag=True, inputs=x)`` scales ``x``, not ``flag``).
    """
    if args:
        return args[0], lambda x: ((x, *args[1:]), kwargs)
    name = _input_name(method)
    if name not in kwargs:  # a signature we cannot read (``*args``): the first keyword given
        name = next(iter(kwargs))
    return kwargs[name], lambda x: (args, {**kwargs, name: x})


@functools.cache
def _input_name(method: Callable[..., Any]) -> str | None:
    try:
        parameters = list(inspect.signature(method).parameters.values())[1:]  # after self
    except (TypeError, ValueError):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return parameters[0].name if parameters and parameters[0].kind in named else None


def _trailing(shape: tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(shape[len(shape) - n :]) if n <= len(shape) else ()


NO_ADAPTER = -1  # the adapter id of an example that runs on the base model alone


def scale_per_example(activation: jax.Array, bank_vector: jax.Array, adapter_ids: jax.Array) -> jax.Array:
    """`scale` with each example's own vector, gathered from a bank.

    Args:
      activation: ``(batch, ..., *features)``.
      bank_vector: ``(*features, n_adapters)``: the adapter axis is last, where no ``nn.scan`` slices.
      adapter_ids: ``(batch,)`` integers; `NO_ADAPTER` (-1) leaves an example unscaled. Any other
        value outside ``[0, n_adapters)`` gives that example NaN (a jitted call cannot raise on values;
        `ia3_jax.check_adapter_ids` checks them on the host).

    Returns:
      ``activation[b] * bank_vector[..., adapter_ids[b]]`` for every example ``b``, in `scale`'s dtype
      rule. Under `jax.grad` each example's gradient reaches its own adapter's column only.

    Example:
      >>> y = scale_per_example(jnp.ones((3, 5, 16)), jnp.ones((16, 4)), jnp.array([2, -1, 0]))
    """
    return scale_rows(activation, pick_per_example(bank_vector, adapter_ids))


class PickedRows(struct.PyTreeNode, meta.AxisMetadata):
    """An ``ia3_l`` leaf of `ia3_jax.per_example_adapter`: each example's vector, ``(batch, *features)``,
    stacked at `layer_axes` for ``nn.scan`` / ``nn.vmap``-stacked layers.

    A Flax box, so that a call can tell picked rows from any other vector (a single adapter's, a bank's)
    and Flax's lifting reports each axis it slices (`remove_axis`). The hazard it handles: picked
    without the layer axis of a stacked module, the rows ``(batch, layers, *features)`` would have their
    examples sliced as layers, silently when batch == layers; here that slice raises instead.
    """

    value: Any
    layer_axes: tuple[int, ...] = struct.field(pytree_node=False, default=())
    module: str = struct.field(pytree_node=False, default="")  # the module path, for error messages

    def unbox(self) -> Any:
        return self.value

    def replace_boxed(self, val: Any) -> PickedRows:
        return self.replace(value=val)

    def add_axis(self, index: int, params: dict[Any, Any]) -> PickedRows:
        index %= jnp.ndim(self.value) + 1  # a negative variable_axes counts from the end
        shifted = tuple(a + (a >= index) for a in self.layer_axes)
        return self.replace(layer_axes=tuple(sorted((*shifted, index))))

    def remove_axis(self, index: int, params: dict[Any, Any]) -> PickedRows:
        index %= jnp.ndim(self.value)  # a negative variable_axes counts from the end
        if index not in self.layer_axes:
            given = f"the layer axes it was given: {self.layer_axes}" if self.layer_axes else "no layer axis given"
            raise VectorShapeError(
                f"nn.scan / nn.vmap slices axis {index} of the per-example vectors at {self.module!r} (shape "
                f"{jnp.shape(self.value)}), which ia3_jax.per_example_adapter did not pick as a layer axis ({given}): "
                "the examples would be sliced as layers. Name the stacked module holding it (or one above it) in "
                "stack_axes with its variable_axes['params'], one key per stacking transform, outermost first: "
                f"stack_axes={{'<stacked module>': {index}}}."
            )
        return self.replace(layer_axes=tuple(a - (a > index) for a in self.layer_axes if a != index))


def refuse_picked(leaves: Iterable[tuple[_tree.Path, Any]], fix: str) -> None:
    """Raises `StructureError` when any ``(path, leaf)`` holds `PickedRows`: one batch's rows where an adapter or
    a bank is needed; `fix` says what to pass instead."""
    picked = [_tree.dotted(path) for path, leaf in leaves if isinstance(leaf, PickedRows)]
    if picked:
        raise StructureError(
            f"{_tree.listing(picked)} holds per-example rows (ia3_jax.per_example_adapter's result for one batch), "
            f"not an adapter: {fix}"
        )


def scale_rows(activation: jax.Array, rows: jax.Array) -> jax.Array:
    """`scale` of each example ``b`` by its own vector ``rows[b]``: ``(batch, ..., *features)`` by
    ``(batch, *features)``, the axes between batch and features broadcast.

    Example:
      >>> y = scale_rows(jnp.ones((3, 5, 16)), jnp.ones((3, 16)))
    """
    middle = (1,) * (jnp.ndim(activation) - rows.ndim)  # the activation's axes between batch and features
    return scale(activation, rows.reshape(rows.shape[:1] + middle + rows.shape[1:]))


def pick_per_example(bank_vector: jax.Array, adapter_ids: jax.Array) -> jax.Array:
    """Each example's vector from a bank ``(*features, n_adapters)``: ``(batch, *features)``.

    `NO_ADAPTER` (-1) gives ones (the base model); any other id outside ``[0, n_adapters)`` gives NaN.
    """
    n = bank_vector.shape[-1]
    # Called inside a decode loop's step, this gather is not hoisted by XLA's GPU compiler but fused into each
    # step's multiply, which then reads a strided column of the (*features, N) bank: 2.1x that fusion's time
    # with one adapter on an H200. Hence `ia3_jax.per_example_adapter`, which picks once, before the loop.
    rows = jnp.moveaxis(bank_vector, -1, 0)  # (n_adapters, *features)
    # Every negative id is sent out of range: -2 must give NaN, not wrap around to adapter n - 2.
    picked = jnp.take(rows, jnp.where(adapter_ids < 0, n, adapter_ids), axis=0, mode="fill", fill_value=jnp.nan)
    base = (adapter_ids == NO_ADAPTER).reshape((-1,) + (1,) * (bank_vector.ndim - 1))
    return jnp.where(base, jnp.ones((), picked.dtype), picked)


def check_ids(adapter_ids: Any, n_adapters: int | None = None) -> None:
    """Raises `AdapterIdsError` unless the ids are a 1-D signed integer array and, where their values are known
    (not traced) and `n_adapters` is given, each is `NO_ADAPTER` or in ``[0, n_adapters)``.

    Unsigned ids are refused: under jit their values are not checked, and the largest one equals
    `NO_ADAPTER` once compared with -1 (uint32 4294967295 == -1), which would serve the base model silently.
    """
    if np.ndim(adapter_ids) != 1 or not jnp.issubdtype(jnp.result_type(adapter_ids), jnp.signedinteger):
        raise AdapterIdsError(
            f"adapter_ids must be a 1-D signed integer array (NO_ADAPTER is -1), one id per example; got shape "
            f"{np.shape(adapter_ids)} and dtype {jnp.result_type(adapter_ids)}."
        )
    if n_adapters is None or isinstance(adapter_ids, jax.core.Tracer):
        return
    ids = np.asarray(adapter_ids)
    bad = np.flatnonzero((ids < NO_ADAPTER) | (ids >= n_adapters))
    if bad.size:
        shown = {int(i): int(ids[i]) for i in bad[:8]}
        raise AdapterIdsError(
            f"adapter_ids out of range at positions {shown} (position: id): ids are 0..{n_adapters - 1} for a bank "
            f"of {n_adapters} adapters, or {NO_ADAPTER} for the base model."
        )


def _kernel_feature_shapes(
    kernel_shape: tuple[int, ...],
    x_shape: tuple[int, ...],
    y_shape: tuple[int, ...] | None = None,
    *,
    out_features: tuple[int, ...] | None = None,
    conv: bool = False,
) -> dict[str, set[tuple[int, ...]]]:
    """The full feature shapes, ``{"input": {...}, "output": {...}}``, that a module's kernel allows for a call
    on `x_shape` (giving `y_shape`, where known): the readings of a dense-type kernel ``(*in, *out)``, a
    transposed 2-D kernel ``(out, in)``, or with `conv` a convolution kernel ``(*window, in, out)``, that fit
    the activations (and `out_features`, the module's declared output features, where known). Empty sets:
    no reading fits (a layout these readings do not know), so nothing can be told."""
    found: dict[str, set[tuple[int, ...]]] = {"input": set(), "output": set()}

    def add(ins: tuple[int, ...], outs: tuple[int, ...]) -> None:
        fits_y = y_shape is None or _trailing(y_shape, len(outs)) == outs
        if fits_y and (out_features is None or outs == out_features):
            found["input"].add(ins)
            found["output"].add(outs)

    n = len(kernel_shape)
    if conv:
        if n >= 3 and x_shape and kernel_shape[-2] and x_shape[-1] % kernel_shape[-2] == 0:
            add(tuple(x_shape[-1:]), tuple(kernel_shape[-1:]))
        return found
    for k in range(1, n):
        if _trailing(x_shape, k) == tuple(kernel_shape[:k]):
            add(tuple(kernel_shape[:k]), tuple(kernel_shape[k:]))
    if n == 2 and tuple(x_shape[-1:]) == tuple(kernel_shape[1:]):
        add(tuple(kernel_shape[1:]), tuple(kernel_shape[:1]))
    return found


def _fits_apart_from_one_axis(
    shape: tuple[int, ...], own: tuple[int, ...], features: set[tuple[int, ...]] | None
) -> bool:
    """Whether the features `own` of a bank's or picked rows' vector (its shape apart from the adapter or
    example axis) are at least one axis, trail the activation's `shape` after a batch axis, and are one of the
    module's `features` where those are known."""
    fits = bool(own) and len(shape) > len(own) and _trailing(shape, len(own)) == own
    return fits and not (features and own not in features)


def check_bank_fits(
    key: str,
    bank_vector: jax.Array,
    activation: Any,
    side: str,
    adapter_ids: jax.Array,
    features: set[tuple[int, ...]] | None = None,
) -> None:
    """Trace-time checks of a per-example call: the features fit, and one adapter id per example.

    `features`, where known, are the module's full feature shapes for `side` (read off its kernel):
    the bank vector's features must be one of them, so that a single adapter whose last vector axis
    happens to look like an adapter axis (``(4, 4)`` heads and head_dim) is refused, not misread.
    """
    shape, own = jnp.shape(activation), bank_vector.shape[:-1]
    if not _fits_apart_from_one_axis(shape, own, features):
        told = f" (its kernel gives the module {side} features {sorted(features)})" if features else ""
        raise VectorShapeError(
            f"bank vector at {key!r} has shape {bank_vector.shape}, i.e. features {own} and "
            f"{bank_vector.shape[-1:]} adapters (the adapter axis is last), but the {side} it scales has shape "
            f"{shape}{told}. A bank of adapters for another base model, or a single adapter given to a bank call "
            "(stack adapters with ia3_jax.stack_adapters), gives this."
        )
    if shape[0] != adapter_ids.shape[0]:
        raise AdapterIdsError(
            f"adapter_ids has {adapter_ids.shape[0]} entries but the {side} of {key!r} has shape {shape}, whose "
            "leading (batch) axis needs one id per example. Beam search or num_return_sequences repeat each "
            "example: repeat its id the same way (jnp.repeat(adapter_ids, k)); a model that flattens batch and "
            "sequence axes before this layer cannot take per-example ids."
        )
    check_ids(adapter_ids, bank_vector.shape[-1])  # values, where they are known


def check_rows_fit(
    key: str, rows: jax.Array, activation: Any, side: str, features: set[tuple[int, ...]] | None = None
) -> None:
    """Trace-time checks of a call on picked vectors (`ia3_jax.per_example_apply_fn`): ``rows`` is
    ``(batch, *features)``, its features fit (one of the module's `features`, where known) and its batch
    is the activation's."""
    shape, own = jnp.shape(activation), rows.shape[1:]
    if not _fits_apart_from_one_axis(shape, own, features):
        told = f" (its kernel gives the module {side} features {sorted(features)})" if features else ""
        raise VectorShapeError(
            f"per-example vector at {key!r} has shape {rows.shape}, i.e. {rows.shape[:1]} examples (the leading axis) "
            f"and features {own}, but the {side} it scales has shape {shape}{told}. A single adapter or a bank given "
            "to a per-example call (pick each example's vectors with ia3_jax.per_example_adapter(bank, adapter_ids)), "
            "or the vectors of nn.scan-stacked layers picked without stack_axes=, gives this."
        )
    if shape[0] != rows.shape[0]:
        raise VectorShapeError(
            f"the vectors at {key!r} were picked for {rows.shape[0]} examples but the {side} they scale has shape "
            f"{shape}, whose leading (batch) axis needs one row per example: pick with this batch's adapter_ids "
            "(beam search or num_return_sequences repeat each example: repeat its id the same way)."
        )


def check_picked(key: str, stored: Any, per_example: bool) -> None:
    """Raises `VectorShapeError` unless the vector at `key` is picked rows (`PickedRows`, every layer axis
    sliced) exactly when the call is a per-example one (`per_example_apply_fn`)."""
    shape = jnp.shape(_tree.unbox(stored))
    if not isinstance(stored, PickedRows):
        if per_example:
            raise VectorShapeError(
                f"per_example_apply_fn: the IA3 vector at {key!r} (shape {shape}) was not picked by "
                "ia3_jax.per_example_adapter: pick each example's vectors from a bank with "
                "ia3_jax.per_example_adapter(bank, adapter_ids) (a single adapter runs with apply_fn, a bank with "
                "bank_apply_fn)."
            )
        return
    if not per_example:
        raise VectorShapeError(
            f"the IA3 vector at {key!r} holds per-example rows (shape {shape}) that ia3_jax.per_example_adapter "
            "picked: run them with ia3_jax.per_example_apply_fn."
        )
    if stored.layer_axes:
        raise VectorShapeError(
            f"the per-example vectors at {key!r} (shape {shape}) have layer axes {stored.layer_axes} that no nn.scan "
            "/ nn.vmap sliced: stack_axes of ia3_jax.per_example_adapter names a module that is not stacked."
        )


def _declared_features(module: nn.Module) -> tuple[int, ...] | None:
    """A Linen module's declared output features (``features`` of Dense, DenseGeneral, Conv), if any."""
    features = getattr(module, "features", None)
    if isinstance(features, int | np.integer):
        return (int(features),)
    if isinstance(features, tuple) and features and all(isinstance(f, int | np.integer) for f in features):
        return tuple(int(f) for f in features)
    return None


def _module_feature_shapes(
    module: nn.Module, x: Any, y_shape: tuple[int, ...] | None = None
) -> dict[str, set[tuple[int, ...]]]:
    """`_kernel_feature_shapes` of a Linen module's kernel on its input `x` (and output shape, where known)."""
    return _kernel_feature_shapes(
        quant.kernel_shape(module.get_variable("params", "kernel")),
        jnp.shape(x),
        y_shape,
        out_features=_declared_features(module),
        conv=hasattr(module, "kernel_size"),
    )


def _interceptor(
    config: IA3Config | None, applied: Applied, adapter_ids: jax.Array | None = None, per_example: bool = False
):
    """The method interceptor. With `adapter_ids` every vector is a bank vector ``(*features, n_adapters)``;
    with `per_example` every vector holds one row per example, ``(batch, *features)``."""

    def scaled(key: str, vector: jax.Array, activation: Any, side: str, module: nn.Module, x: Any) -> jax.Array:
        if adapter_ids is None and not per_example:
            check_activation_fits(key, vector, activation, side)
            return scale(activation, vector)
        y_shape = jnp.shape(activation) if side == "output" else None
        features = _module_feature_shapes(module, x, y_shape)[side]
        if adapter_ids is None:
            check_rows_fit(key, vector, activation, side, features)
            return scale_rows(activation, vector)
        check_bank_fits(key, vector, activation, side, adapter_ids, features)
        return scale_per_example(activation, vector, adapter_ids)

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        applied.record_root(module)  # at any method: the root may be entered through `method=`
        if context.method_name != "__call__" or not module.has_variable("params", _tree.VECTOR):
            return next_fun(*args, **kwargs)
        path = tuple(module.scope.path)
        key = _tree.dotted(path)
        stored = module.get_variable("params", _tree.VECTOR)
        check_picked(key, stored, per_example)
        vector = _tree.unbox(stored)
        check_vector_dtype(vector.dtype, f"IA3 vector at {key!r}")
        x, rebuild = module_input(type(module).__call__, args, kwargs)

        def call(x_: Any) -> Any:
            call_args, call_kwargs = rebuild(x_)
            return next_fun(*call_args, **call_kwargs)

        fits_input = fits_output = False
        if config is None:  # only then do the shapes decide the side
            features = vector.shape[1:] if per_example else vector.shape if adapter_ids is None else vector.shape[:-1]
            fits_input = _trailing(jnp.shape(x), len(features)) == features
            fits_output = features in _module_feature_shapes(module, x)["output"]
        feedforward = feedforward_side(key, config, fits_input, fits_output)
        if feedforward:
            out = call(scaled(key, vector, x, "input", module, x))
        else:
            out = scaled(key, vector, call(x), "output", module, x)
        applied.record(path, vector)
        return out

    return intercept


@contextlib.contextmanager
def intercept(config: IA3Config | None = None, *, adapter_ids: jax.Array | None = None) -> Iterator[Applied]:
    """Context manager under which Flax module calls apply their IA3 vectors.

    Feedforward targets (``config.feedforward_modules``) get their input scaled, the others their
    output, bias included. Without a config the direction is read off the shapes (the vector fits the
    input or the output); square layers then need the config.

    Trace inside it: a function `jax.jit`-ed and first traced outside ignores the vectors, also when
    later called inside; one first traced inside keeps IA3 in its cache for later calls outside
    (the interceptor is not part of jit's cache key). So do not call an already-jitted function
    here: jit the function that enters the context, which `apply_fn` does for you
    (``jax.jit(ia3_jax.apply_fn(model.apply, config))``). Yields an `Applied` record of the module
    paths applied.

    With `adapter_ids` (``(batch,)`` integers) the params hold an adapter bank
    (`ia3_jax.stack_adapters`) and each example is scaled by its own adapter, as `ia3_jax.bank_apply_fn`.

    Example:
      >>> with intercept(config):
      ...     logits = model.apply({"params": params}, x)
    """
    if adapter_ids is not None:
        check_ids(adapter_ids)
    applied = Applied()
    with nn.intercept_methods(_interceptor(config, applied, adapter_ids)):
        yield applied
    if not applied.paths:
        warnings.warn(
            "ia3_jax.intercept: no IA3 vector was applied inside this context. A function jit-ed and traced "
            "outside the context ignores IA3; wrap it with ia3_jax.apply_fn instead.",
            stacklevel=3,
        )


def vector_leaves(tree: Any) -> list[tuple[_tree.Path, Any]]:
    """``(module path, leaf)`` of every ``ia3_l`` leaf in any pytree (keys as strings)."""
    return [(path[:-1], leaf) for path, leaf in _tree.leaves_with_paths(tree) if path and path[-1] == _tree.VECTOR]


def _is_staged(fn: Callable[..., Any]) -> bool:
    """Whether jax already stages `fn` with a trace cache of its own (`jax.jit`, `jax.pmap`).

    `jax.stages.Wrapped` is jax's public protocol of a jitted function (callable, ``lower`` and
    ``trace``); a `jax.pmap`-ed function has ``lower`` only. `functools.partial` is looked through.
    """
    while isinstance(fn, functools.partial):
        fn = fn.func
    return isinstance(fn, jax.stages.Wrapped) or callable(getattr(fn, "lower", None))


def apply_fn(fn: F, config: IA3Config | None = None, *, strict: bool = True) -> F:
    """Wraps `fn` so that it runs under the IA3 interceptor, entered inside whatever traces it.

    `fn` is any function whose call runs Flax modules: ``model.apply``, a Hugging Face Flax model's
    ``__call__`` / ``generate``, or a whole loss. Transform the *result*: ``jax.jit``, ``jax.grad``,
    ``jax.vmap`` and ``jax.pmap`` compose with it in any order among themselves. `fn` itself must
    not be jitted: ``apply_fn(jax.jit(model.apply))`` would trace IA3 into that jit's own cache,
    which later plain calls of ``jax.jit(model.apply)`` reuse (IA3 where none was asked for), or
    reuse an earlier plain trace (IA3 ignored); it raises `AlreadyJittedError`.

    With ``strict`` (default), every ``ia3_l`` leaf found in the arguments must have been applied by
    the call, matched by its exact module path (stacked ``nn.scan`` bodies included), else
    `NotAppliedError` names the unused ones (a silent no-op caught at trace time). Pass
    ``strict=False`` for calls that legitimately use part of the model (a T5 encoder alone).

    Example:
      >>> forward = jax.jit(ia3_jax.apply_fn(model.apply, config))
      >>> logits = forward({"params": params}, x)   # logits: (batch, ..., classes)
    """
    check_not_staged(fn, "apply_fn")

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return call_intercepted(fn, config, strict, args, kwargs)

    return wrapped  # type: ignore[return-value]


def check_not_staged(fn: Callable[..., Any], caller: str) -> None:
    """Raises `AlreadyJittedError` if `fn` is already jitted (see `apply_fn`)."""
    if _is_staged(fn):
        raise AlreadyJittedError(
            f"{caller} got {getattr(fn, '__name__', fn)!r}, a function that jax.jit/jax.pmap already wraps: its trace "
            "cache does not know about the interceptor, so IA3 would leak into its plain calls or be skipped. Jit "
            f"the wrapper instead: jax.jit(ia3_jax.{caller}(model.apply, config))."
        )


def call_intercepted(
    fn: Callable[..., Any],
    config: IA3Config | None,
    strict: bool,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    adapter_ids: jax.Array | None = None,
    per_example: bool = False,
) -> Any:
    """``fn(*args, **kwargs)`` under the interceptor, then `apply_fn`'s strict check of the arguments' vectors."""
    with nn.intercept_methods(_interceptor(config, applied := Applied(), adapter_ids, per_example)):
        out = fn(*args, **kwargs)
    if strict:
        vectors = vector_leaves((args, kwargs))
        paths = [path for path, _ in vectors]
        missed = applied.missed(vectors)
        if missed:
            # Named by module path where the params root was found, else by argument position.
            relative = _tree.rooted(paths, applied.roots)
            names = sorted({_tree.dotted(relative.get(p, p[1:])) for p in missed})
            raise NotAppliedError(
                f"{len(missed)} IA3 vectors in the arguments were never applied by "
                f"{getattr(fn, '__name__', fn)!r}: "
                f"{names[:10]}{' ...' if len(names) > 10 else ''}. Those modules were not called with these "
                "params (pass strict=False if that is intended), or a module reads its kernel without "
                "its __call__."
            )
    return out
