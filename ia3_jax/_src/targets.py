"""Which modules an `IA3Config` targets, and the one record of each target that every operation reads.

`resolve_targets` applies PEFT's matching rules to a param tree. A `Target` then fixes, once, what
`ia3_init`, the interceptor, `merge` / `unmerge`, sharding, PEFT I/O and checkpoint checks need to
know of a targeted module: its kernel layout and logical shape, which side its vector scales, and
the vector's shape. `feedforward_side` is the one place that decides the side.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ia3_jax._src import quant
from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config
from ia3_jax._src.errors import AdapterMismatchError, LayoutError, TargetError, UnsupportedKernelError, VectorShapeError
from ia3_jax._src.layout import KernelLayout, module_layout

_OUTPUT_LAYERS = ("lm_head",)
_CLASSIFIER_LAYERS = ("classifier", "score")


def _all_linear(layers: dict[_tree.Path, Mapping[str, Any]], config: IA3Config) -> set[_tree.Path]:
    linear = {p for p, node in layers.items() if len(quant.kernel_shape(node["kernel"])) == 2}
    wider = sorted(_tree.dotted(p) for p in set(layers) - linear if not config.is_excluded(_tree.dotted(p)))
    if wider:  # PEFT's all-linear is nn.Linear alone; say which kernels that leaves out here
        warnings.warn(
            f"target_modules='all-linear' takes 2-D kernels only and leaves out {_tree.listing(wider)}: convs, or "
            "layers stacked by nn.scan / multi-axis nn.DenseGeneral, which a param tree cannot tell apart. "
            "Name them in target_modules (with layouts=ia3_jax.infer_layouts(...)) to adapt them.",
            stacklevel=4,
        )
    skip = set(_OUTPUT_LAYERS)
    if config.task_type == "SEQ_CLS":
        skip |= set(_CLASSIFIER_LAYERS)
    return {p for p in linear if p[-1] not in skip}


def resolve_targets(params: Mapping[str, Any], config: IA3Config) -> dict[_tree.Path, bool]:
    """Targeted module paths, each mapped to whether it is feedforward (input-scaled).

    Raises `TargetError` naming the problem: no `target_modules`, nothing matched (with the paths
    that exist), a match that is not a layer with a kernel, or a `modules_to_save` entry that
    matches nothing. Warns for list entries or patterns that match nothing while others do.

    Example:
      >>> resolve_targets(params, IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]))
      {('layer_0', 'k'): False, ('layer_0', 'v'): False, ('layer_0', 'wo'): True}
    """
    if config.target_modules is None:
        raise TargetError(
            "IA3Config.target_modules is None. Name the modules to adapt, e.g. target_modules=['k', 'v', 'wo'], "
            "or take a Hugging Face model's defaults with ia3_jax.hf.default_config(model)."
        )
    all_modules = dict(_tree.modules(params))
    layers = {p: node for p, node in all_modules.items() if "kernel" in node}
    if config.is_all_linear:
        chosen = {
            p for p in _all_linear(layers, config) if not config.is_excluded(_tree.dotted(p))
            and not config.is_module_to_save(_tree.dotted(p))
        }
    else:
        chosen = {p for p in all_modules if config.is_target(_tree.dotted(p))}
    not_layers = sorted(p for p in chosen if p not in layers)
    if not_layers:
        raise TargetError(
            f"target_modules={config.target_modules!r} matches modules that are not layers with a kernel "
            f"(an embedding, a norm or a block): {_tree.listing(map(_tree.dotted, not_layers), 40)}. Target their "
            "Dense/Conv children instead."
        )
    if not chosen:
        raise TargetError(
            f"target_modules={config.target_modules!r} matches no module "
            f"(exclude_modules={config.exclude_modules!r}, modules_to_save={config.modules_to_save!r}). "
            f"Layers with a kernel in these params: {_tree.listing(map(_tree.dotted, sorted(layers)), 40)}."
        )
    keys = [_tree.dotted(p) for p in chosen]
    if isinstance(config.target_modules, tuple):
        idle = [t for t in config.target_modules if not any(k == t or k.endswith("." + t) for k in keys)]
        if idle:
            warnings.warn(f"IA3 target_modules entries {idle} match no module and are ignored.", stacklevel=3)
    if config.exclude_modules is not None and not any(config.is_excluded(_tree.dotted(p)) for p in all_modules):
        warnings.warn(f"exclude_modules={config.exclude_modules!r} excludes no module.", stacklevel=3)
    ff_keys = [k for k in keys if config.is_feedforward(k)]
    if isinstance(config.feedforward_modules, tuple):
        idle = [f for f in config.feedforward_modules if not any(k.endswith(f) for k in keys)]
        if idle:
            warnings.warn(f"IA3 feedforward_modules entries {idle} match no targeted module.", stacklevel=3)
    elif isinstance(config.feedforward_modules, str) and not ff_keys:
        warnings.warn(f"feedforward_modules={config.feedforward_modules!r} matches no targeted module.", stacklevel=3)
    for entry in config.modules_to_save or ():
        if not modules_to_save_roots(params, config.replace(modules_to_save=[entry])):
            raise TargetError(
                f"modules_to_save entry {entry!r} matches no module; modules in these params: "
                f"{_tree.listing(map(_tree.dotted, sorted(all_modules)), 40)}."
            )
    return {p: config.is_feedforward(_tree.dotted(p)) for p in sorted(chosen)}


def modules_to_save_roots(params: Mapping[str, Any], config: IA3Config) -> list[_tree.Path]:
    """The outermost modules that `config.modules_to_save` selects."""
    roots: list[_tree.Path] = []
    for path, _ in _tree.modules(params):
        if _tree.under(path, roots):
            continue
        if config.is_module_to_save(_tree.dotted(path)):
            roots.append(path)
    return roots


def feedforward_side(key: str, config: IA3Config | None, fits_input: bool, fits_output: bool) -> bool:
    """Whether the vector at module `key` scales the input side (feedforward) rather than the output.

    The config decides when given (``feedforward_modules``, PEFT's rule). Without one, the side that
    the vector fits decides; a vector that fits both sides (a square layer) raises `VectorShapeError`,
    and one that fits neither is taken as an output vector, whose fit check then names the mismatch.
    """
    if config is not None:
        return config.is_feedforward(key)
    if fits_input and fits_output:
        raise VectorShapeError(
            f"IA3 vector at {key!r} fits both the input and the output of a square layer: pass the IA3Config "
            "so that feedforward_modules decides."
        )
    return fits_input


@dataclasses.dataclass(frozen=True)
class Target:
    """One targeted module, resolved once.

    Attributes:
      path: the module's path in the param tree, e.g. ``("encoder", "layer", "0", "attention", "key")``.
      layout: which kernel axes are input, output and stacked-layer axes.
      kernel_shape: the kernel's logical shape (a quantized kernel's integer shape).
      feedforward: the vector scales the input features (else the output features, bias included).
      slices: ``(kernel axis, indices)`` when the vector covers only these indices of that output axis
        and every other index is scaled by exactly one: the parts of a fused weight that the config does
        not target (Tunix's Gemma 3 ``qkv_einsum`` under ``k_proj``/``v_proj``: q is not in the vector, so
        no optimizer, weight decay included, can move it). None: the vector covers every feature.

    Example: an ``nn.Dense(16)`` on 8 input features, not feedforward:
    ``Target(("mlp", "up"), KernelLayout((0,), (1,)), (8, 16), False).vector_shape == (16,)``.
    """

    path: _tree.Path
    layout: KernelLayout
    kernel_shape: tuple[int, ...]
    feedforward: bool
    slices: tuple[int, tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        if self.slices is not None and self.layout.stack_axes:
            # `full_vector` builds the ones and reads the slice position from the stored (stacked) shape, while
            # inside nnx.scan / nn.scan the vector is one layer's slice: refuse rather than scale wrong features.
            raise LayoutError(
                f"module {self.key!r}: a vector of some slices of a fused weight ({self.slices}) on stacked layers "
                f"(stack axes {self.layout.stack_axes}) is not supported; target every part of the fused weight."
            )

    @property
    def key(self) -> str:
        return _tree.dotted(self.path)

    @property
    def vector_shape(self) -> tuple[int, ...]:
        shape = self.layout.vector_shape(self.kernel_shape, self.feedforward)
        if self.slices is None:
            return shape
        axis, kept = self.slices
        pos = self.vector_axes.index(axis)
        return shape[:pos] + (len(kept),) + shape[pos + 1 :]

    def full_vector(self, vector: jax.Array) -> jax.Array:
        """`vector` over all the features it scales: with `slices`, exactly one at the indices it leaves out."""
        if self.slices is None:
            return vector
        axis, kept = self.slices
        pos = self.vector_axes.index(axis)
        full = self.layout.vector_shape(self.kernel_shape, self.feedforward)
        ones = jnp.ones(full + tuple(vector.shape[len(full) :]), vector.dtype)
        return ones.at[(slice(None),) * pos + (np.asarray(kept),)].set(vector)

    @property
    def vector_axes(self) -> list[int | None]:
        """The kernel axis that each vector axis follows (None: a grouped conv's full input channels)."""
        return [axis for axis, _ in self.layout.vector_labels(self.kernel_shape, self.feedforward)]

    def check_vector(self, shape: Sequence[int]) -> None:
        """Raises `VectorShapeError` unless a vector of `shape` fits this target."""
        shape = tuple(shape)
        if shape == self.vector_shape:
            return
        for pos, axis in enumerate(self.vector_axes):
            n = self.kernel_shape[axis] if axis is not None else None
            if axis in self.layout.stack_axes and pos < len(shape) and shape[pos] != n:
                raise VectorShapeError(
                    f"stacked IA3 vector at {self.key!r} has {shape[pos]} layers (axis {pos} of {shape}) but its "
                    f"kernel {self.kernel_shape} stacks {n} (axis {axis}): the adapter is for a model with another "
                    "number of layers."
                )
        if shape[:-1] == self.vector_shape:  # a bank's vector (the adapter axis last), or layers stacked last
            raise VectorShapeError(
                f"IA3 vector at {self.key!r} has shape {shape} where its kernel {self.kernel_shape} needs "
                f"{self.vector_shape}: {shape[-1]} vectors along the last axis. A bank of adapters (ia3_jax."
                "stack_adapters) gives this: take adapter i with ia3_jax.bank_select(bank, i); so does an adapter of "
                "nn.scan-stacked layers (variable_axes=1) used on unrolled ones: ia3_jax.unstack(adapter, '<layers>', "
                "axis=1)."
            )
        side = "input" if self.feedforward else "output"
        raise VectorShapeError(
            f"IA3 vector at {self.key!r} has shape {shape} but its kernel {self.kernel_shape} needs "
            f"{self.vector_shape} "
            f"({side} features{', stacked layers' if self.layout.stack_axes else ''}): the adapter is for another "
            "model or config, or the layout was guessed wrong (pass layouts=ia3_jax.infer_layouts(...))."
        )

    def check_kernel(self, kernel: Any) -> None:
        """Raises `UnsupportedKernelError` unless a merge can rescale `kernel` exactly.

        Mergeable: a floating array, or a qwix quantized kernel (its float scale absorbs the
        vector). An integer or bool array would be truncated (``[[1, 2, 3]] * [0.5, 1.5, 0.3]`` ->
        ``[[0, 3, 0]]``); any other container is an unknown quantization scheme. `kernel` may be boxed.
        """
        kernel = _tree.unbox(kernel)
        if quant.is_quantized(kernel):
            return
        if not isinstance(kernel, jax.Array | np.ndarray):
            raise UnsupportedKernelError(
                f"kernel at {self.key!r} is a {type(kernel).__name__}, neither an array nor a qwix quantized kernel; "
                "ia3_jax will not rescale its contents blindly: keep the vector unmerged."
            )
        if not jnp.issubdtype(kernel.dtype, jnp.floating):
            raise UnsupportedKernelError(
                f"kernel at {self.key!r} has dtype {kernel.dtype.name}: merging a float IA3 vector into it would "
                "truncate the product to integers. Keep the vector unmerged (ia3_jax.apply_fn), merge into a float "
                "copy of the kernel, or quantize with qwix (whose float scale absorbs the vector exactly)."
            )

    def kernel_factor(self, vector: jax.Array) -> jax.Array:
        """`vector`, checked, reshaped to broadcast against the kernel (grouped convs: expanded)."""
        self.check_vector(vector.shape)
        return self.layout.scale_for_kernel(self.full_vector(vector), self.kernel_shape, self.feedforward)


def targets(
    params: Mapping[str, Any], config: IA3Config, layouts: Mapping[str, KernelLayout] | None = None
) -> dict[_tree.Path, Target]:
    """A `Target` for every module that `config` targets in `params` (PEFT's rules, `resolve_targets`)."""
    out = {}
    for path, feedforward in resolve_targets(params, config).items():
        layout, shape = module_layout(path, _tree.get(params, path), config.fan_in_fan_out, layouts)
        out[path] = Target(path, layout, shape, feedforward)
    return out


def vector_target(
    path: _tree.Path,
    module: Mapping[str, Any],
    vector_shape: Sequence[int],
    config: IA3Config | None,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> Target:
    """The `Target` of a vector that already sits on `module` (merge, unmerge, sharding).

    With a config its side is the config's; without one, the side the vector fits (`feedforward_side`).
    The vector is checked to fit (`VectorShapeError`).
    """
    fan_in_fan_out = bool(config and config.fan_in_fan_out)
    layout, shape = module_layout(path, module, fan_in_fan_out, layouts)
    vector_shape = tuple(vector_shape)
    fits_input = layout.vector_shape(shape, True) == vector_shape
    fits_output = layout.vector_shape(shape, False) == vector_shape
    key = _tree.dotted(path)
    target = Target(path, layout, shape, feedforward_side(key, config, fits_input, fits_output))
    target.check_vector(vector_shape)
    return target


def check_modules_to_save_copies(
    adapter: Mapping[str, Any],
    config: IA3Config,
    *,
    params: Mapping[str, Any] | None = None,
    alternatives: Sequence[str] = (),
) -> None:
    """Raises `AdapterMismatchError` naming a ``modules_to_save`` module that has no copy in `adapter`.

    Without the copy its trained params would be lost (the usual cause: ``split(params)`` without the
    config, which returns the vectors only). With `params`, every module they have that the config
    selects needs its copy. Without them only the adapter tells which modules exist, so each listed
    name needs a copy, except that one of `alternatives` suffices for all of them: PEFT's task
    wrappers list several heads (``classifier`` and ``score`` for SEQ_CLS) of which a model has one.
    """
    listed = list(config.modules_to_save or ())
    if params is not None:
        have = {path for path, _ in _tree.modules(adapter)}
        missing = [_tree.dotted(root) for root in modules_to_save_roots(params, config) if root not in have]
    else:
        present = {m for m in listed if modules_to_save_roots(adapter, config.replace(modules_to_save=[m]))}
        shared = set(alternatives) & set(listed)
        missing = [m for m in listed if m not in present and not (m in shared and present & shared)]
    if missing:
        raise AdapterMismatchError(
            f"the adapter has no copy of module {missing[0]!r}, which config.modules_to_save="
            f"{listed} lists: its trained params would be lost. split(params) without "
            "the config leaves these copies out: save the first result of ia3_jax.split(params, config)."
        )
