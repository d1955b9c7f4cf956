"""Kernel layouts: which axes of a stored kernel are the input and output features IA3 scales.

The param tree alone decides the common cases: a 2-D kernel is ``nn.Dense`` (in, out), or (out, in)
with ``fan_in_fan_out`` (Hugging Face's ``FlaxConv1D``); a kernel of 3 or more axes is a channels-last
``nn.Conv`` (spatial..., in / groups, out). `infer_layouts` reads the exact layout off the model
itself (multi-axis ``nn.DenseGeneral``, grouped convs, layers stacked by ``nn.scan`` / ``nn.vmap``)
by tracing it once with shapes only.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ia3_jax._src import quant
from ia3_jax._src import tree as _tree
from ia3_jax._src.errors import LayoutError


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """Axes of a stored kernel.

    Attributes:
      in_axes: axes contracted with the input features, in the order of the input's trailing axes.
      out_axes: axes that are the output features, in the order of the output's trailing axes.
      stack_axes: stacked-layer axes (``nn.scan``/``nn.vmap`` ``variable_axes``); the vector carries
        them at the same positions, so Flax's lifting slices vector and kernel alike.
      in_features: input features when they exceed the kernel's (grouped convs: in = groups * kernel in).

    Example: an ``nn.scan`` over ``nn.Dense`` with ``variable_axes={'params': 1}`` stores the kernel
    (in, L, out): ``KernelLayout(in_axes=(0,), out_axes=(2,), stack_axes=(1,))``; an output vector is
    stored (out, L).
    """

    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    stack_axes: tuple[int, ...] = ()
    in_features: int | None = None

    def feature_shape(self, kernel_shape: Sequence[int], feedforward: bool) -> tuple[int, ...]:
        """Per-layer shape of the vector: the input features (feedforward) or the output features."""
        if feedforward and self.in_features is not None:
            return (self.in_features,)
        return tuple(kernel_shape[a] for a in (self.in_axes if feedforward else self.out_axes))

    def vector_shape(self, kernel_shape: Sequence[int], feedforward: bool) -> tuple[int, ...]:
        return tuple(n for _, n in self.vector_labels(kernel_shape, feedforward))

    def vector_labels(self, kernel_shape: Sequence[int], feedforward: bool) -> list[tuple[int | None, int]]:
        """(kernel axis, size) for each vector axis; kernel axis None for grouped input channels."""
        if feedforward and self.in_features is not None:
            labels: list[tuple[int | None, int]] = [(None, self.in_features)]
        else:
            axes = self.in_axes if feedforward else self.out_axes
            labels = [(a, kernel_shape[a]) for a in axes]
        for s in sorted(self.stack_axes):
            labels.insert(min(s, len(labels)), (s, kernel_shape[s]))
        return labels

    def check(self, kernel_shape: Sequence[int], where: str) -> None:
        axes = self.in_axes + self.out_axes + self.stack_axes
        ndim = len(kernel_shape)
        if len(set(axes)) != len(axes) or any(not 0 <= a < ndim for a in axes):
            raise LayoutError(f"{where}: {self} does not fit a kernel of shape {tuple(kernel_shape)}.")
        if self.in_features is not None:
            (axis,) = self.in_axes
            if self.in_features % kernel_shape[axis]:
                raise LayoutError(
                    f"{where}: in_features={self.in_features} is not a multiple of the kernel's "
                    f"{kernel_shape[axis]} input channels (axis {axis} of {tuple(kernel_shape)})."
                )

    def scale_for_kernel(self, vector: jax.Array, kernel_shape: Sequence[int], feedforward: bool) -> jax.Array:
        """`vector` (of `vector_shape`) reshaped, and for grouped convs expanded, to broadcast against the kernel."""
        labelled = [a for a, _ in self.vector_labels(kernel_shape, feedforward)]
        axes = [a for a in labelled if a is not None]
        if feedforward and self.in_features is not None:  # grouped conv: channel c of group g -> kernel[..., c_g, out]
            (in_axis,), (out_axis,) = self.in_axes, self.out_axes
            vector = jnp.moveaxis(vector, labelled.index(None), -1)
            per_group_in, n_out = kernel_shape[in_axis], kernel_shape[out_axis]
            groups = self.in_features // per_group_in
            out_per_group = n_out // groups
            index = (np.arange(n_out)[None, :] // out_per_group) * per_group_in + np.arange(per_group_in)[:, None]
            vector = vector[..., index]
            axes = [*axes, in_axis, out_axis]
        vector = jnp.transpose(vector, [int(i) for i in np.argsort(axes)])
        present = set(axes)
        return vector.reshape([kernel_shape[a] if a in present else 1 for a in range(len(kernel_shape))])


def default_layout(kernel_shape: Sequence[int], fan_in_fan_out: bool) -> KernelLayout:
    """The layout a kernel's shape implies: Dense (in, out), FlaxConv1D (out, in), Conv (..., in, out).

    Example:
      >>> ia3_jax.default_layout((2304, 768), fan_in_fan_out=True)   # GPT-2's c_attn, a FlaxConv1D (out, in)
      KernelLayout(in_axes=(1,), out_axes=(0,), stack_axes=(), in_features=None)
    """
    ndim = len(kernel_shape)
    if ndim < 2:
        raise LayoutError(f"a kernel of shape {tuple(kernel_shape)} has no (in, out) axes.")
    if ndim == 2:
        return KernelLayout((1,), (0,)) if fan_in_fan_out else KernelLayout((0,), (1,))
    return KernelLayout((ndim - 2,), (ndim - 1,))


def _layout_for(
    path: _tree.Path,
    kernel_shape: Sequence[int],
    fan_in_fan_out: bool,
    layouts: Mapping[str, KernelLayout] | None,
    *,
    bias_shape: Sequence[int] | None = None,
) -> KernelLayout:
    """The layout given in `layouts` for this module, else the one the param tree proves.

    A kernel of 3 or more axes is a channels-last conv only when the module's bias (`bias_shape`,
    None without one) is ``(out,)``: a layer stacked by ``nn.scan`` / ``nn.vmap`` stacks its bias
    too, and a scanned ``nn.Dense`` kernel (L, in, out) looks exactly like a 1-D conv's
    (width, in, out). Without that proof the layout must be given.
    """
    key = _tree.dotted(path)
    layout = (layouts or {}).get(key)
    if layout is None:
        if len(kernel_shape) >= 3 and tuple(bias_shape or ()) != (kernel_shape[-1],):
            raise LayoutError(
                f"module {key!r}: a kernel of shape {tuple(kernel_shape)} may be a conv, a layer stacked by "
                "nn.scan/nn.vmap (layer axis anywhere) or a multi-axis nn.DenseGeneral; the param tree alone "
                "cannot tell. Pass layouts=ia3_jax.infer_layouts(model.apply, {'params': params}, x) (the "
                "same layouts to ia3_init, merge and unmerge)."
            )
        layout = default_layout(kernel_shape, fan_in_fan_out)
    layout.check(kernel_shape, f"module {key!r}")
    return layout


def module_layout(
    path: _tree.Path,
    module: Mapping[str, Any],
    fan_in_fan_out: bool,
    layouts: Mapping[str, KernelLayout] | None,
) -> tuple[KernelLayout, tuple[int, ...]]:
    """``(layout, kernel shape)`` of the module at `path`: `_layout_for` on its kernel and bias.

    The kernel shape is the logical one (quantized kernels included), so every caller reads it alike.
    """
    kernel_shape = quant.kernel_shape(module["kernel"])
    bias_shape = tuple(np.shape(_tree.unbox(module["bias"]))) if "bias" in module else None
    return _layout_for(path, kernel_shape, fan_in_fan_out, layouts, bias_shape=bias_shape), kernel_shape


def _per_layer_layout(module: nn.Module, kernel_shape: tuple[int, ...], x_shape, y_shape) -> KernelLayout:
    ndim = len(kernel_shape)
    path = _tree.dotted(tuple(module.path))
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            raise LayoutError(f"module {path!r}: nn.DenseGeneral with batch_dims is not supported by IA3.")
        n_in = len(module.axis) if isinstance(module.axis, Sequence) else 1
        return KernelLayout(tuple(range(n_in)), tuple(range(n_in, ndim)))
    if isinstance(module, nn.Conv):
        in_features = x_shape[-1] if module.feature_group_count > 1 else None
        return KernelLayout((ndim - 2,), (ndim - 1,), in_features=in_features)
    if ndim != 2:
        raise LayoutError(
            f"module {path!r} ({type(module).__name__}) has a {ndim}-D kernel {kernel_shape} whose layout "
            "ia3_jax cannot tell; pass layouts={path: KernelLayout(in_axes=..., out_axes=...)}."
        )
    fits_dense = x_shape[-1] == kernel_shape[0] and y_shape[-1] == kernel_shape[1]
    fits_transposed = x_shape[-1] == kernel_shape[1] and y_shape[-1] == kernel_shape[0]
    if fits_transposed and (not fits_dense or "Conv1D" in type(module).__name__):
        return KernelLayout((1,), (0,))
    return KernelLayout((0,), (1,))


def stack_axes(
    stored: tuple[int, ...],
    per_layer: tuple[int, ...],
    key: str,
    *,
    given: tuple[int, ...] | None = None,
    fix: str | None = None,
) -> tuple[int, ...]:
    """The axes of a `stored` kernel that a layer does not see (``nn.scan``/``nn.vmap``, NNX's ``nnx.vmap``).

    `given`: the axes the user named, checked against the shapes instead of inferred. `fix`: what the error
    of an ambiguous or unfitting pair tells the user to pass (default: Linen's ``layouts=``).
    """
    extra = len(stored) - len(per_layer)
    fits = [
        axes
        for axes in itertools.combinations(range(len(stored)), extra)
        if tuple(n for i, n in enumerate(stored) if i not in axes) == per_layer
    ]
    if fix is None:
        fix = f"Pass layouts={{{key!r}: KernelLayout(in_axes=..., out_axes=..., stack_axes=...)}} for it."
    if given is not None:
        if tuple(sorted(given)) in fits:
            return tuple(sorted(given))
        raise LayoutError(
            f"module {key!r}: the stacked-layer axes {given} given for it do not fit its stored kernel {stored} and "
            f"the kernel seen inside the layer {per_layer}: removing them does not leave the latter"
            + (f" (the axes that do: any of {fits})." if fits else ".")
        )
    if len(fits) != 1:
        raise LayoutError(
            f"module {key!r}: the stored kernel {stored} and the kernel seen inside the layer {per_layer} "
            + ("do not fit together." if not fits else f"leave the stacked-layer axis ambiguous (any of {fits}).")
            + " "
            + fix
        )
    return fits[0]


def stacked_layout(
    layout: KernelLayout,
    stored: tuple[int, ...],
    per_layer: tuple[int, ...],
    key: str,
    *,
    given: tuple[int, ...] | None = None,
    fix: str | None = None,
) -> KernelLayout:
    """`layout` (of the kernel one layer sees, `per_layer`) as the layout of the `stored` stacked kernel
    (`given`, `fix`: as in `stack_axes`)."""
    stack = stack_axes(stored, per_layer, key, given=given, fix=fix)
    remaining = [i for i in range(len(stored)) if i not in stack]
    return KernelLayout(
        in_axes=tuple(remaining[a] for a in layout.in_axes),
        out_axes=tuple(remaining[a] for a in layout.out_axes),
        stack_axes=stack,
        in_features=layout.in_features,
    )


def _stored_kernels(tree: Any) -> dict[_tree.Path, tuple[int, ...]]:
    return {
        path[:-1]: quant.kernel_shape(leaf)
        for path, leaf in _tree.leaves_with_paths(tree, is_leaf=quant.is_quantized)
        if path and path[-1] == "kernel"
    }


def infer_layouts(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, KernelLayout]:
    """Reads every kernel layout off a model by tracing ``fn(*args, **kwargs)`` with shapes only.

    `fn` is any apply function whose arguments contain the param tree, e.g. ``model.apply``
    with ``({'params': params}, x)``. No FLOP is spent (`jax.eval_shape`).

    Returns:
      ``{module path: KernelLayout}`` for every module with a ``kernel`` that the call used, with
      the stacked-layer axes of ``nn.scan`` / ``nn.vmap`` layers found by comparing the stored kernel
      with the one the layer sees.

    Example:
      >>> layouts = infer_layouts(model.apply, {"params": params}, x)
      >>> params = ia3_init(params, config, layouts=layouts)
    """
    seen: dict[_tree.Path, KernelLayout] = {}
    per_layer_shapes: dict[_tree.Path, tuple[int, ...]] = {}
    roots: dict[int, tuple[Any, frozenset[_tree.Path]]] = {}  # root scope id -> (scope, its kernel paths)

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        params = _tree.root_params(module)
        if params is not None and id(module.scope.root) not in roots:
            kernels = frozenset(p for p, node in _tree.modules(params) if "kernel" in node)
            roots[id(module.scope.root)] = (module.scope.root, kernels)
        if context.method_name != "__call__" or not module.has_variable("params", "kernel"):
            return next_fun(*call_args, **call_kwargs)
        kernel_shape = quant.kernel_shape(module.get_variable("params", "kernel"))
        y = next_fun(*call_args, **call_kwargs)
        x = call_args[0] if call_args else next(iter(call_kwargs.values()))
        path = tuple(module.scope.path)
        seen[path] = _per_layer_layout(module, kernel_shape, np.shape(x), np.shape(y))
        per_layer_shapes[path] = kernel_shape
        return y

    with nn.intercept_methods(record):
        jax.eval_shape(fn, *args, **kwargs)
    stored = _stored_kernels((args, kwargs))
    # Each stored kernel's module path relative to its params root: exact, so `aux.fc` is not `fc`.
    relative = _tree.rooted(list(stored), [kernels for _, kernels in roots.values()])

    layouts = {}
    for path, layout in seen.items():
        key = _tree.dotted(path)
        full = {shape for p, shape in stored.items() if relative.get(p) == path}
        if len(full) != 1:
            raise LayoutError(
                f"module {key!r}: found {len(full)} stored kernel shapes for it in the arguments ({sorted(full)})."
            )
        (stored_shape,) = full
        layouts[key] = stacked_layout(layout, stored_shape, per_layer_shapes[path], key)
    return layouts
