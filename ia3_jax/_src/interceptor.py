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
from ia3_jax._src.errors import NotAppliedError, VectorShapeError
from ia3_jax._src.targets import feedforward_side

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass
class Applied:
    """Module paths whose vectors the interceptor applied (scan bodies: the path without a layer index)."""

    paths: set[_tree.Path] = dataclasses.field(default_factory=set)

    def covers(self, vector_path: _tree.Path) -> bool:
        return any(vector_path[len(vector_path) - len(p) :] == p for p in self.paths)


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
    later called inside. Prefer `apply_fn`. Yields an `Applied` record of the module paths applied.

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


def apply_fn(fn: F, config: IA3Config | None = None, *, strict: bool = True) -> F:
    """Wraps `fn` so that it runs under the IA3 interceptor, entered inside whatever traces it.

    `fn` is any function whose call runs Flax modules: ``model.apply``, a Hugging Face Flax model's
    ``__call__`` / ``generate``, or a whole loss. The result composes with `jax.jit`, `jax.grad`,
    `jax.vmap` and `jax.pmap` in any order.

    With ``strict`` (default), every ``ia3_l`` leaf found in the arguments must have been applied by
    the call, else `NotAppliedError` names the unused ones (a silent no-op caught at trace time). Pass
    ``strict=False`` for calls that legitimately use part of the model (a T5 encoder alone).

    Example:
      >>> forward = jax.jit(ia3_jax.apply_fn(model.apply, config))
      >>> logits = forward({"params": params}, x)
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with nn.intercept_methods(_interceptor(config, applied := Applied())):
            out = fn(*args, **kwargs)
        if strict:
            missed = [p for p in vector_paths((args, kwargs)) if not applied.covers(p)]
            if missed:
                names = sorted({_tree.dotted(p[1:]) for p in missed})
                raise NotAppliedError(
                    f"{len(missed)} IA3 vectors in the arguments were never applied by "
                    f"{getattr(fn, '__name__', fn)!r}: "
                    f"{names[:10]}{' ...' if len(names) > 10 else ''}. Those modules were not called with these "
                    "params (pass strict=False if that is intended), or a module reads its kernel without "
                    "its __call__."
                )
        return out

    return wrapped  # type: ignore[return-value]
