"""A target's kernel layout, read off the shapes its module's calls see in one shape-only trace of the model.

NNX modules do not declare which weight axes are input and which are output features: `trace_calls`
runs the model under ``jax.eval_shape`` with each target's class swapped for a recording subclass,
and `stored_layout` splits the weight's axes so that every recorded call fits (a known module type,
or an ``einsum_str``, decides between several fits). Layers stacked by ``nnx.vmap`` and run by
``nnx.scan`` show each call one layer's weight: the stored weight's extra axes are stacked axes.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from ia3_jax._src import quant
from ia3_jax._src import tree as _tree
from ia3_jax._src.errors import IA3ConfigError, IA3Error, LayoutError
from ia3_jax._src.interceptor import module_input
from ia3_jax._src.layout import KernelLayout, stacked_layout
from ia3_jax._src.nnx_vectors import (
    base_type,
    call_subclass,
    einsum_operands,
    einsum_output_positions,
    weight_name,
    weight_value,
)
from ia3_jax._src.targets import Target


def _record_call(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
    # The weight as the call sees it: inside nnx.scan / nnx.vmap over stacked layers, one layer's slice.
    name = weight_name(self)
    seen = quant.kernel_shape(weight_value(getattr(self, name))) if name is not None else None
    y = type(self)._ia3_base_type.__call__(self, *args, **kwargs)  # type: ignore[attr-defined]
    x, _ = module_input(base_type(type(self)).__call__, args, kwargs)
    path = self._ia3_record_path  # type: ignore[attr-defined]
    _RECORDED.setdefault(path, []).append((np.shape(x), np.shape(y)))
    _RECORDED_WEIGHTS.setdefault(path, set()).add(seen)
    return y


_RECORDED: dict[_tree.Path, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
_RECORDED_WEIGHTS: dict[_tree.Path, set[tuple[int, ...] | None]] = {}
_TRACING = threading.Lock()  # one trace at a time: the records above are shared (ia3_init from several threads)


def _einsum_layout(spec: str) -> KernelLayout | None:
    """The layout an ``einsum_str`` ``"x,w->y"`` declares for its weight ``w`` (None if not of that form)."""
    parsed = einsum_operands(spec, drop_ellipsis=True)
    if parsed is None:
        return None
    x, w, out = parsed
    if "." in w or len(set(w)) != len(w):
        return None
    in_axes = tuple(w.index(c) for c in x if c in w and c not in out)
    out_axes = tuple(w.index(c) for c in out if c in w)
    if sorted(in_axes + out_axes) != list(range(len(w))):
        return None
    return KernelLayout(in_axes, out_axes)


def _declared_layout(module: nnx.Module, weight_shape: tuple[int, ...]) -> KernelLayout | None:
    """The layout a known module declares, to decide between layouts that the shapes alone allow."""
    einsum_str = getattr(module, "einsum_str", None)
    if isinstance(einsum_str, str):
        return _einsum_layout(einsum_str)
    if isinstance(module, nnx.Linear):
        return KernelLayout((0,), (1,))
    if isinstance(module, nnx.LinearGeneral) and not module.batch_axis:
        n_in = len(module.in_features)
        return KernelLayout(tuple(range(n_in)), tuple(range(n_in, len(weight_shape))))
    return None


def _fitting_layouts(
    weight: tuple[int, ...], calls: list[tuple[tuple[int, ...], tuple[int, ...]]]
) -> list[KernelLayout]:
    """Every split of the weight's axes into input axes (the input's trailing axes, in order) and output
    axes (the output's trailing axes) that fits all recorded calls."""
    n = len(weight)
    fits = []
    for n_in in range(1, n):
        for in_axes in itertools.permutations(range(n), n_in):
            rest = [a for a in range(n) if a not in in_axes]
            for out_axes in itertools.permutations(rest):
                layout = KernelLayout(in_axes, out_axes)
                if all(
                    layout.feature_shape(weight, True) == tuple(x[len(x) - n_in :])
                    and layout.feature_shape(weight, False) == tuple(y[len(y) - len(out_axes) :])
                    for x, y in calls
                ):
                    fits.append(layout)
    return fits


def _layout(module: nnx.Module, key: str, weight: tuple[int, ...], calls) -> KernelLayout:
    """The weight's layout, read off the shapes its module's calls saw; a known module type decides ties."""
    if isinstance(module, nnx.Conv):
        groups = module.feature_group_count
        return KernelLayout((len(weight) - 2,), (len(weight) - 1,), in_features=calls[0][0][-1] if groups > 1 else None)
    fits = _fitting_layouts(weight, calls)
    declared = _declared_layout(module, weight)
    if declared is not None and declared in fits:
        return declared
    positions = einsum_output_positions(module)
    if (
        declared is not None
        and positions is not None
        and all(
            declared.feature_shape(weight, True) == tuple(x[len(x) - len(declared.in_axes) :])
            and len(y) > positions[-1]
            and declared.feature_shape(weight, False) == tuple(y[i] for i in positions)
            for x, y in calls
        )
    ):
        return declared  # its output features are where its einsum_str puts them, not trailing
    if len(fits) == 1 and declared is None:
        return fits[0]
    raise LayoutError(
        f"module {key!r} ({type(module).__name__}): its weight {weight} and the input/output shapes of its calls "
        f"{calls[:2]} "
        + (
            "fit no split into input and output feature axes (trailing axes of the input and the output)"
            if not fits
            else f"fit several layouts {fits}, and its type declares none of them"
        )
        + "; IA3 cannot tell which features to scale there."
    )


def stored_layout(
    module: nnx.Module,
    key: str,
    stored: tuple[int, ...],
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]],
    seen: set[tuple[int, ...] | None],
    given: tuple[int, ...] | None = None,
) -> KernelLayout:
    """The layout of the weight as stored: `_layout` of the weight one call sees, with the stacked-layer axes
    (``nnx.vmap``-created layers run by ``nnx.scan``) that the stored weight has and the call does not;
    `given`: those axes as the user named them (``ia3_init(..., stack_axes=...)``), checked against the shapes."""
    if seen == {None} or not seen:
        raise LayoutError(
            f"module {key!r}: no weight was seen during its calls (the module held no weight when called), so its "
            "layout cannot be read off the shapes; IA3 supports modules that hold their weight and use it in __call__."
        )
    if len(seen) != 1 or None in seen:
        raise LayoutError(
            f"module {key!r}: its calls saw its weight with several shapes "
            f"{sorted(map(str, seen - {None}))}" + (" (and some calls did not read it)" if None in seen else "") + "."
        )
    (per_layer,) = seen
    assert per_layer is not None
    layout = _layout(module, key, per_layer, calls)
    if per_layer == stored:
        if given:
            raise LayoutError(
                f"stack_axes={{{key!r}: {list(given)}}}: its weight {stored} is not stacked (each call sees all of it)."
            )
        return layout
    example = f"stack_axes={{{key!r}: 0}}"
    fix = (
        f"Name the layer axis of its stored weight: ia3_jax.nnx.ia3_init(model, config, *inputs, {example}) "
        "(0 for nnx.vmap's default out_axes=0; the key is the module's '.'-joined path)."
    )
    return stacked_layout(layout, stored, per_layer, key, given=given, fix=fix)


def check_stacking(target: Target) -> None:
    """Raises `LayoutError` unless each stacked-layer axis sits at the same position in the vector as in the
    weight, since nnx.scan / nnx.vmap slice every variable of a module at one axis: a kernel (L, in, out) gives
    the vector (L, out), fine; a kernel (in, out, L) would give (out, L), refused."""
    axes = target.vector_axes
    moved = [s for s in target.layout.stack_axes if axes.index(s) != s]
    if moved:
        raise LayoutError(
            f"module {target.key!r}: its weight {target.kernel_shape} stacks layers at axis {moved[0]}, but its IA3 "
            f"vector {target.vector_shape} has only {len(axes)} axes, so the layer axis sits at {axes.index(moved[0])} "
            "there; nnx.scan / nnx.vmap slice every variable of a module at the same axis. Stack the layers at a "
            "lower axis (nnx.vmap's default, 0)."
        )


def trace_calls(
    model: nnx.Module, modules: Mapping[_tree.Path, nnx.Module], args: tuple, kwargs: dict
) -> tuple[dict, dict]:
    """The (input shape, output shape) of every call of `modules` in ``model(*args, **kwargs)``, and the
    shapes their weight had inside those calls (one layer's, under ``nnx.scan``), shapes only."""
    if not args and not kwargs:
        raise IA3ConfigError(
            "ia3_jax.nnx needs example inputs of the model (as qwix does): ia3_init(model, config, *inputs, "
            "**input_kwargs). They are traced with shapes only (jax.eval_shape) to read each target's layout and "
            "to check that its __call__ runs."
        )
    with _TRACING:
        return _traced(model, modules, args, kwargs)


def _traced(
    model: nnx.Module, modules: Mapping[_tree.Path, nnx.Module], args: tuple, kwargs: dict
) -> tuple[dict, dict]:
    """`trace_calls` under `_TRACING`."""
    classes = {path: type(m) for path, m in modules.items()}
    try:
        for path, module in modules.items():
            module._ia3_record_path = path  # type: ignore[attr-defined]
            module.__class__ = call_subclass(base_type(type(module)), _record_call)
        graphdef, state = nnx.split(model)
        _RECORDED.clear()
        _RECORDED_WEIGHTS.clear()
        try:
            jax.eval_shape(lambda s: nnx.merge(graphdef, s)(*args, **kwargs), state)
        except (IA3Error, jax.errors.JAXTypeError, jax.errors.JAXIndexError):
            raise  # ours, or jax's own about tracing (a Python branch on a value): not about the inputs
        except Exception as error:  # the model's own call refused the example inputs: say which ones
            shapes = jax.tree.map(np.shape, (args, kwargs))
            raise LayoutError(
                f"ia3_jax.nnx traces the model once on the example inputs to read each target's layout, and the "
                f"model's call failed on them (positional, keyword shapes: {shapes}): {type(error).__name__}: "
                f"{str(error)[:300].rstrip('.')}. Pass inputs the model's __call__ accepts, as for a forward pass."
            ) from error
        return dict(_RECORDED), dict(_RECORDED_WEIGHTS)
    finally:
        _RECORDED.clear()
        _RECORDED_WEIGHTS.clear()
        for path, module in modules.items():
            module.__class__ = classes[path]
            del module._ia3_record_path  # type: ignore[attr-defined]
