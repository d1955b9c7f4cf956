"""The IA3 interceptor: rescales the input or output of every module call that has an ``ia3_l`` vector.

Flax consults method interceptors while *tracing*; they are not part of `jax.jit`'s cache key. A
function traced outside the interceptor ignores the vectors forever, so enter it inside the traced
function: `apply_fn` does that, and checks that every vector in the arguments was applied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from ia3_jax._src import quant
from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config
from ia3_jax._src.dtypes import check_vector_dtype
from ia3_jax._src.errors import AlreadyJittedError, NotAppliedError, VectorShapeError
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

    def record_root(self, module: nn.Module) -> None:
        """Records the vector paths of the params that `module`'s model was applied to (once per apply)."""
        params, scope = _tree.root_params(module), module.scope
        if params is None or scope is None or id(scope.root) in self._scopes:
            return
        self._scopes[id(scope.root)] = scope.root
        vectors = frozenset(_tree.vector_modules(params))
        if vectors:
            self.roots.add(vectors)

    def missed(self, vector_paths: list[_tree.Path]) -> list[_tree.Path]:
        """The vectors at `vector_paths` (in a function's arguments) that no applied module accounts for.

        Matched exactly: a vector's path relative to its params tree's root in the arguments
        (`tree.rooted`) must be an applied module path. With modules ``fc`` and ``aux.fc`` and only
        ``fc`` called, ``aux.fc`` is missed (a suffix rule would count it as applied).
        """
        relative = _tree.rooted(vector_paths, self.roots)
        return [p for p in vector_paths if relative.get(p) not in self.paths]


def scale(activation: jax.Array, vector: jax.Array) -> jax.Array:
    """``activation * vector`` over the trailing feature axes.

    The product is computed in ``promote_types(activation.dtype, vector.dtype)`` (float32 for a bf16
    activation and a float32 vector, as PEFT's autocast) and cast back to the activation's dtype.
    For the backward pass the activation itself is kept, not its float32 copy (the cast is redone
    there): under `nn.scan`, whose residuals are fixed before XLA sees them, that halves the bytes
    that a bf16 model saves for each IA3 vector.
    """
    return _scale(activation, vector)


@functools.partial(jax.checkpoint, prevent_cse=False)
def _scale(activation: jax.Array, vector: jax.Array) -> jax.Array:
    dtype = jnp.promote_types(activation.dtype, vector.dtype)
    return (activation.astype(dtype) * vector.astype(dtype)).astype(activation.dtype)


def _check_fits(key: str, vector: jax.Array, activation: Any, side: str) -> None:
    shape = jnp.shape(activation)
    if vector.ndim > len(shape) or tuple(shape[len(shape) - vector.ndim :]) != vector.shape:
        raise VectorShapeError(
            f"IA3 vector at {key!r} has shape {vector.shape} but the {side} it scales has shape {shape}. "
            "A stacked vector (nn.scan) used outside its scan, or a kernel layout that ia3_init guessed wrong, "
            "gives this: pass layouts=ia3_jax.infer_layouts(...) to ia3_init."
        )


def _trailing(shape: tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(shape[len(shape) - n :]) if n <= len(shape) else ()


def _output_features(kernel_shape: tuple[int, ...], x_shape: tuple[int, ...], n: int) -> tuple[int, ...]:
    """The layer's output features as the kernel seen inside the call shows them (no config needed)."""
    if len(kernel_shape) == 2:  # (in, out) or (out, in): the output is the axis that the input is not
        return (kernel_shape[1] if kernel_shape[0] == x_shape[-1] else kernel_shape[0],)
    return _trailing(kernel_shape, n)


def _interceptor(config: IA3Config | None, applied: Applied):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        applied.record_root(module)  # at any method: the root may be entered through `method=`
        if context.method_name != "__call__" or not module.has_variable("params", _tree.VECTOR):
            return next_fun(*args, **kwargs)
        path = tuple(module.scope.path)
        key = _tree.dotted(path)
        vector = _tree.unbox(module.get_variable("params", _tree.VECTOR))
        check_vector_dtype(vector.dtype, f"IA3 vector at {key!r}")
        if args:
            x, call = args[0], lambda x_: next_fun(x_, *args[1:], **kwargs)
        else:  # input passed by keyword
            name = next(iter(kwargs))
            x, call = kwargs[name], lambda x_: next_fun(**{**kwargs, name: x_})
        fits_input = fits_output = False
        if config is None:  # only then do the shapes decide the side
            kernel_shape = quant.kernel_shape(module.get_variable("params", "kernel"))
            fits_input = _trailing(jnp.shape(x), vector.ndim) == vector.shape
            fits_output = _output_features(kernel_shape, jnp.shape(x), vector.ndim) == vector.shape
        feedforward = feedforward_side(key, config, fits_input, fits_output)
        if feedforward:
            _check_fits(key, vector, x, "input")
            out = call(scale(x, vector))
        else:
            y = call(x)
            _check_fits(key, vector, y, "output")
            out = scale(y, vector)
        applied.paths.add(path)
        return out

    return intercept


@contextlib.contextmanager
def intercept(config: IA3Config | None = None) -> Iterator[Applied]:
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

    Example:
      >>> with intercept(config):
      ...     logits = model.apply({"params": params}, x)
    """
    applied = Applied()
    with nn.intercept_methods(_interceptor(config, applied)):
        yield applied
    if not applied.paths:
        warnings.warn(
            "ia3_jax.intercept: no IA3 vector was applied inside this context. A function jit-ed and traced "
            "outside the context ignores IA3; wrap it with ia3_jax.apply_fn instead.",
            stacklevel=3,
        )


def vector_paths(tree: Any) -> list[_tree.Path]:
    """Module paths of every ``ia3_l`` leaf in any pytree (keys as strings)."""
    return [path[:-1] for path, _ in _tree.leaves_with_paths(tree) if path and path[-1] == _tree.VECTOR]


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
    if _is_staged(fn):
        raise AlreadyJittedError(
            f"apply_fn got {getattr(fn, '__name__', fn)!r}, a function that jax.jit/jax.pmap already wraps: its trace "
            "cache does not know about the interceptor, so IA3 would leak into its plain calls or be skipped. Jit "
            "the wrapper instead: jax.jit(ia3_jax.apply_fn(model.apply, config))."
        )

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with nn.intercept_methods(_interceptor(config, applied := Applied())):
            out = fn(*args, **kwargs)
        if strict:
            paths = vector_paths((args, kwargs))
            missed = applied.missed(paths)
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

    return wrapped  # type: ignore[return-value]
