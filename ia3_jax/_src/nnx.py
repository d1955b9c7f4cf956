"""IA3 on Flax NNX models: vectors as `IA3Vector` variables, applied by the module's own ``__call__``.

NNX has no method interceptors: a module's call is ``type(module).__call__``. So `ia3_init` gives
each targeted module (on a clone of the model, by default) an ``ia3_l`` attribute holding an
`IA3Vector` and swaps the instance's class for a subclass of its own class whose ``__call__``
scales the input (feedforward targets) or the output with the shared `scale` rule, as qwix does
for quantization. Module paths, weight names and the base checkpoint layout do not change.

Everything a fold needs is recorded once, in the vector's metadata: the `Target` (layout, kernel
shape, side) and the name of the weight it scales (``kernel``, or e.g. ``w`` for Tunix's
``Einsum``). So `merge`, `unmerge`, `add_weighted_adapter` and `combine` work on the model or on
an ``nnx.State`` alone, with the same `Target.kernel_factor` and fold arithmetic as Linen.

Two kinds of base need no extra step:

- qwix-quantized models (``qwix.quantize_model(model, qwix.PtqProvider(rules), *inputs)``, before or
  after `ia3_init`): a quantized weight is a ``WithAux(QArray(qvalue, scale))`` whose arrays are
  ``nnx.Param``s. Vectors get its logical shape, the call scales around qwix's integer matmul, and
  `merge` folds output vectors into the per-channel scale with `quant.rescale_quantized` (the Linen
  arithmetic); a feedforward vector, which varies where the scale is shared, raises
  `QuantizedMergeError` naming the module and the fix.
- layers created by ``nnx.vmap`` and run by ``nnx.scan`` (Flax's "scan over layers"): one module
  per stack, every variable with a layer axis. The trace sees one layer's weight, so the layout gets
  that axis as a stacked axis and the vector carries it at the same position (``(n_layers, out)``):
  ``nnx.scan`` hands each layer its own slice, and folds act per layer.

`IA3Vector` subclasses ``nnx.LoRAParam``: ``nnx.Optimizer(model, tx, wrt=IA3Vector)``,
``nnx.DiffState(0, IA3Vector)``, ``nnx.split(model, IA3Vector, ...)`` select the vectors, and
Tunix's unmodified ``PeftTrainer`` (which trains and checkpoints ``nnx.LoRAParam``) trains them.

This module holds the verbs; below it, one way: `nnx_vectors` (the variable types and reading a
model), `nnx_trace` (layouts from the shape-only trace) and `nnx_bank` (`set_bank`, `bank_call`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ia3_jax._src import bank as _bank
from ia3_jax._src import checkpoint as _checkpoint
from ia3_jax._src import merge as _merge
from ia3_jax._src import quant
from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config
from ia3_jax._src.dtypes import check_vector_dtype
from ia3_jax._src.errors import (
    AdapterExistsError,
    AdapterMismatchError,
    IA3ConfigError,
    NonFiniteMergeError,
    NotAppliedError,
    StructureError,
    TargetError,
    VectorShapeError,
)
from ia3_jax._src.interceptor import check_activation_fits, module_input, scale
from ia3_jax._src.nnx_bank import bank_ids, bank_scale, set_bank
from ia3_jax._src.nnx_trace import check_stacking, stored_layout, trace_calls
from ia3_jax._src.nnx_vectors import (
    QUANT_META,
    TARGET_META,
    VECTOR,
    WEIGHT_META,
    IA3SavedParam,
    IA3Vector,
    M,
    ModelOrState,
    adapter,
    base_type,
    call_subclass,
    check_same_modules,
    einsum_output_positions,
    named_modules,
    placed_like,
    quantized_structure,
    saved_variables,
    string_path,
    vector_variables,
    weight_name,
    weight_value,
)
from ia3_jax._src.sharding import vector_spec
from ia3_jax._src.targets import Target, resolve_targets


def _view(model: nnx.Module) -> dict[str, Any]:
    """The model as the nested module dict `resolve_targets` reads: each weight under ``kernel`` (shape only)."""
    view: dict[str, Any] = {}
    for path, module in named_modules(model):
        node = view
        for name in path:
            node = node.setdefault(name, {})
        weight = weight_name(module)
        if weight is not None:
            weight = weight_value(getattr(module, weight))
            node["kernel"] = jax.ShapeDtypeStruct(quant.kernel_shape(weight), jnp.float32)
    return view


# --- the call wrappers: one subclass per module class, cached, so equal models have equal graphdefs ---


def _ia3_call(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
    variable = getattr(self, VECTOR)
    target: Target = variable.get_metadata(TARGET_META)
    vector = target.full_vector(variable.get_value())  # Target.slices: parts it leaves out scale by one
    call = type(self)._ia3_base_type.__call__  # type: ignore[attr-defined]
    ids = bank_ids(self, target, vector)  # per-example adapter ids inside `bank_call`, else None
    if target.feedforward:
        x, rebuild = module_input(base_type(type(self)).__call__, args, kwargs)
        if ids is not None:
            new_args, new_kwargs = rebuild(bank_scale(self, target, vector, x, ids))
            return call(self, *new_args, **new_kwargs)
        check_activation_fits(target.key, vector, x, "input", _NNX_MISFIT)
        new_args, new_kwargs = rebuild(scale(x, vector))
        return call(self, *new_args, **new_kwargs)
    y = call(self, *args, **kwargs)
    if ids is not None:
        return bank_scale(self, target, vector, y, ids)
    positions = einsum_output_positions(self)
    if positions is not None:  # e.g. Tunix's kv_einsum 'BSD,CKDH->CBSKH': features (C, K, H) not all trailing
        return scale(y, _expand(target.key, vector, jnp.shape(y), positions))
    check_activation_fits(target.key, vector, y, "output", _NNX_MISFIT)
    return scale(y, vector)


def _expand(key: str, vector: jax.Array, shape: tuple[int, ...], positions: tuple[int, ...]) -> jax.Array:
    """`vector` (the output features, in output order) with singleton axes at the output's other positions."""
    if len(shape) <= positions[-1] or tuple(shape[i] for i in positions) != vector.shape:
        raise VectorShapeError(
            f"IA3 vector at {key!r} has shape {vector.shape} but the output it scales has shape {shape}. {_NNX_MISFIT}"
        )
    return vector.reshape(tuple(shape[i] if i in positions else 1 for i in range(len(shape))))


_NNX_MISFIT = "The module was called with activations of another feature shape than at ia3_init."
_NNX_QUANT_FIX = (
    "Keep this vector unmerged (the adapted model applies it in its __call__), or fold the adapter into the "
    "float model and quantize that: float_adapted = ia3_jax.nnx.ia3_init(float_model, config, *inputs, rng=key) "
    "(Tunix models: ia3_jax.tunix.ia3_init(float_model, config, rng=key), with the same PEFT config); "
    "ia3_jax.nnx.set_adapter(float_adapted, ia3_jax.nnx.adapter(model)); "
    "qwix.quantize_model(ia3_jax.nnx.merge(float_adapted), provider, *inputs)."
)


def _ia3_class(cls: type) -> type:
    return call_subclass(base_type(cls), _ia3_call)


# --- insertion ---


def vector_sharding(kernel: Any, target: Target) -> tuple[dict[str, Any], Any]:
    """The vector's ``out_sharding`` metadata and its NamedSharding, read at the kernel axes it follows.

    For a quantized weight, both are read off its integers (the ``nnx.Param`` of the kernel's logical shape).
    """
    if not isinstance(kernel, nnx.Variable):
        kernel = quant.qvalue(kernel)
    metadata: dict[str, Any] = {}
    if not isinstance(kernel, nnx.Variable):
        return metadata, None
    names = kernel.get_metadata("out_sharding", None)
    if names:
        metadata["out_sharding"] = tuple(vector_spec(target, PartitionSpec(*names), None))
        # The vector is placed below from the kernel's actual sharding; NNX must not place it again
        # at creation (which needs a mesh in context even for a model built unsharded).
        metadata["eager_sharding"] = False
    if kernel.get_metadata("mesh", None) is not None:
        metadata["mesh"] = kernel.get_metadata("mesh")
    sharding = getattr(kernel.get_value(), "sharding", None)
    if isinstance(sharding, NamedSharding):
        return metadata, NamedSharding(sharding.mesh, vector_spec(target, sharding.spec, sharding.mesh))
    return metadata, None


def _given_stack_axes(
    stack_axes: Mapping[str, int | Sequence[int]] | None, chosen: Mapping[_tree.Path, bool]
) -> dict[str, tuple[int, ...]]:
    """`ia3_init`'s ``stack_axes`` as tuples by targeted module: a key names a target, or a module holding
    targets (``"layers"`` for ``layers.up`` and ``layers.down``; a target's own key wins). A key that is
    neither (a typo) raises `TargetError`."""
    given: dict[str, tuple[int, ...]] = {}
    for key, axes in sorted((stack_axes or {}).items(), key=lambda item: item[0].count(".")):  # outer keys first
        covered = [_tree.dotted(p) for p in chosen if _tree.under(p, [tuple(key.split("."))])]
        if not covered:
            raise TargetError(
                f"stack_axes names {key!r}, which is neither a module that the config targets nor one holding "
                "targets: keys are '.'-joined module paths of targets or of modules above them, e.g. "
                f"{sorted(_tree.dotted(p) for p in chosen)[:3]}."
            )
        given.update(dict.fromkeys(covered, (axes,) if isinstance(axes, int) else tuple(axes)))
    return given


def _has_vectors(model: nnx.Module) -> bool:
    return any(isinstance(getattr(m, VECTOR, None), IA3Vector) for _, m in named_modules(model))


def ia3_init(
    model: M,
    config: IA3Config,
    *inputs: Any,
    rng: jax.Array | None = None,
    dtype: Any = jnp.float32,
    copy: bool = True,
    stack_axes: Mapping[str, int | Sequence[int]] | None = None,
    **input_kwargs: Any,
) -> M:
    """The NNX model with an `IA3Vector` ``ia3_l`` on every module that `config` targets.

    Modules are matched by PEFT's rules on '.'-joined NNX paths (``layers.0.attn.k_proj``). The
    model is traced once with shapes only on the example inputs, which reads each target's layout
    (input and output feature axes of its weight, whatever the weight is called) and checks that
    its ``__call__`` runs. A target's class becomes a subclass whose ``__call__`` scales its input
    (feedforward) or output; paths and weights stay as they are.

    Args:
      model: any ``nnx.Module``; supported targets are ``nnx.Linear``, ``nnx.LinearGeneral``,
        ``nnx.Einsum``, ``nnx.Conv`` and modules holding one weight of 2+ axes used as an
        einsum/matmul on the input's trailing axes (Tunix's ``Einsum`` with ``w``). Also supported:
        * their weights quantized by qwix PTQ (``qwix.quantize_model(model, qwix.PtqProvider(rules),
          *inputs)``; quantizing an adapted model works too). Output vectors merge into the scale;
          feedforward vectors cannot (`merge` raises `QuantizedMergeError` with the fix). The state
          alone (``merge(state)``) folds only where `ia3_init` saw the quantized weight; if the model
          was quantized after `ia3_init`, merge the model.
        * layers stacked by ``nnx.vmap`` (``out_axes`` = the layer axis) and run by ``nnx.scan``: the
          vector has the layer axis at the kernel's position, e.g. ``(n_layers, out)``; the layer axis
          must not be beyond the vector's axes (a kernel ``(in, out, L)`` raises `LayoutError`).
          PEFT files have one module per layer: ``ia3_jax.save_peft(path, ia3_jax.unstack(
          ia3_jax.nnx.adapter(model), "layers"), config)``; a stacked vector given as it is is refused.
      config: which modules get vectors, and which of them are feedforward (input-scaled).
      *inputs, **input_kwargs: example inputs of ``model(...)`` (only their shapes matter).
      rng: PRNG key for random vectors; required when ``config.init_ia3_weights`` is False.
      dtype: vector dtype, float32 by default whatever the base dtype (PEFT's autocast).
      copy: adapt a clone (default) and leave `model` as it was; False adapts `model` in place.
      stack_axes: ``{'.'-joined module path (a target, or a module holding targets): layer axis (or axes) of
        the stored weights}`` for ``nnx.vmap``-stacked layers whose layer axis the shapes leave ambiguous (the
        layer count equals a weight dimension, e.g. 8 layers of ``nnx.Linear(8, 8)``: ``stack_axes={"layers":
        0}``, 0 for ``nnx.vmap``'s default ``out_axes``); checked against the shapes. Not needed otherwise.

    Returns:
      The adapted model. A vector's shape is its module's output features, e.g. ``(num_kv_heads,
      head_dim)`` for a Tunix ``k_proj``, or its input features when feedforward. Its sharding
      metadata and placement follow the kernel axes it scales.

    Raises:
      TargetError: the config matches nothing, a module without a weight, or a ``stack_axes`` key that
        names no target nor a module holding targets.
      IA3ConfigError: no example inputs, or random vectors (``init_ia3_weights=False``) without `rng`.
      NotAppliedError: a targeted module's ``__call__`` does not run on these inputs (its weight is
        used some other way, e.g. a tied embedding), so its vector would be a silent no-op.
      LayoutError: the model's own call refuses the example inputs (its error chained), the weight's
        feature axes cannot be told from the shapes, or a stacked layer axis that ``nnx.scan`` would
        slice at another position of the vector.

    Example:
      >>> config = ia3_jax.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
      ...                            feedforward_modules=["down_proj"])
      >>> model = ia3_jax.nnx.ia3_init(llama, config, tokens, positions, None, mask)
      >>> logits, _ = model(tokens, positions, None, mask)
    """
    if not config.init_ia3_weights and rng is None:
        raise IA3ConfigError("IA3Config(init_ia3_weights=False) draws random vectors: pass rng=jax.random.key(...).")
    check_vector_dtype(dtype, "ia3_init's dtype argument")
    if _has_vectors(model):
        raise AdapterExistsError("the model already holds IA3 vectors: merge them (ia3_jax.nnx.merge) first.")
    chosen = resolve_targets(_view(model), config)
    by_path = dict(named_modules(model))
    given = _given_stack_axes(stack_axes, chosen)
    traced, seen_weights = trace_calls(model, {p: by_path[p] for p in chosen}, inputs, input_kwargs)
    idle = sorted(_tree.dotted(p) for p in chosen if p not in traced)
    if idle:
        raise NotAppliedError(
            f"targeted modules {idle[:10]} are not called (their __call__) when the model runs on these inputs: an IA3 "
            "vector there would never be applied. Their weight is used another way (a tied embedding, a method other "
            "than __call__): exclude them (exclude_modules) or target the modules that are called."
        )
    if copy:
        model = nnx.clone(model)
        by_path = dict(named_modules(model))
    keys = iter(jax.random.split(rng, len(chosen))) if rng is not None else None
    vectors = {}  # every layout and sharding is worked out (and may raise) before any module changes
    for path, feedforward in chosen.items():
        module = by_path[path]
        name = weight_name(module)
        assert name is not None  # resolve_targets only returns modules whose view has a kernel
        kernel = getattr(module, name)
        shape = quant.kernel_shape(weight_value(kernel))
        key = _tree.dotted(path)
        layout = stored_layout(module, key, shape, traced[path], seen_weights[path], given.get(key))
        target = Target(path, layout, shape, feedforward)
        check_stacking(target)
        metadata, sharding = vector_sharding(kernel, target)
        if quant.is_quantized(kernel):
            metadata[QUANT_META] = quantized_structure(kernel)
        if keys is None:
            vector = jnp.ones(target.vector_shape, dtype)
        else:
            vector = jax.random.normal(next(keys), target.vector_shape, dtype)
        if sharding is not None:
            vector = jax.device_put(vector, sharding)
        metadata.update({TARGET_META: target, WEIGHT_META: name})
        vectors[path] = IA3Vector(vector, **metadata)
    if config.modules_to_save and not _saved_roots(model, config):
        raise TargetError(f"modules_to_save={list(config.modules_to_save)} matches no module of the model.")
    for path, variable in vectors.items():
        setattr(by_path[path], VECTOR, variable)
        by_path[path].__class__ = _ia3_class(type(by_path[path]))
    _retype_saved(model, config)
    return model


def _saved_roots(model: nnx.Module, config: IA3Config) -> list[_tree.Path]:
    """The outermost modules that ``config.modules_to_save`` selects."""
    roots: list[_tree.Path] = []
    for path, _ in named_modules(model):
        if not _tree.under(path, roots) and config.is_module_to_save(_tree.dotted(path)):
            roots.append(path)
    return roots


def _retype(model: nnx.Module, roots: Sequence[_tree.Path], old: type[nnx.Variable], new: type[nnx.Variable]) -> None:
    for path, module in named_modules(model):
        if not _tree.under(path, roots):
            continue
        for name, value in list(vars(module).items()):
            if isinstance(value, old) and not isinstance(value, (IA3Vector, new)):
                setattr(module, name, new(value.get_value(), **value.get_metadata()))


def _retype_saved(model: nnx.Module, config: IA3Config) -> None:
    """The ``nnx.Param``s of the ``modules_to_save`` modules become `IA3SavedParam`s (trainable copies)."""
    if not config.modules_to_save:
        return
    roots = _saved_roots(model, config)
    if not roots:
        raise TargetError(f"modules_to_save={list(config.modules_to_save)} matches no module of the model.")
    _retype(model, roots, nnx.Param, IA3SavedParam)


# --- the adapter as a plain nested dict (Linen's adapter form: '.'-joinable string keys) ---


def _saved_writes(model: nnx.Module, adapter_tree: Mapping[str, Any] | nnx.State) -> list[tuple[nnx.Variable, Any]]:
    """``(copy variable, new value)`` for every ``modules_to_save`` copy, all checked; nothing written."""
    variables = saved_variables(model)
    if isinstance(adapter_tree, Mapping):
        new = {path: value for path, value in _flat_leaves(_tree.to_dict(adapter_tree)).items() if path[-1] != VECTOR}
    else:
        new = {path: v.get_value() for path, v in saved_variables(adapter_tree).items()}
    check_same_modules(new, variables, "the adapter's modules_to_save copies")
    for path, variable in variables.items():
        if np.shape(new[path]) != np.shape(variable.get_value()):
            raise StructureError(
                f"{_tree.dotted(path)!r}: shape {np.shape(new[path])}, the model has {np.shape(variable.get_value())}."
            )
    return [(variable, new[path]) for path, variable in variables.items()]


def _flat_leaves(tree: Mapping[str, Any], prefix: _tree.Path = ()) -> dict[_tree.Path, Any]:
    out: dict[_tree.Path, Any] = {}
    for name, child in tree.items():
        if isinstance(child, Mapping):
            out.update(_flat_leaves(child, prefix + (name,)))
        else:
            out[prefix + (name,)] = child
    return out


def set_adapter(model: nnx.Module, adapter_tree: Mapping[str, Any] | nnx.State) -> None:
    """Writes an adapter's vectors into the adapted `model`, in place, each checked against its target.

    `adapter_tree` is a nested dict (`adapter`, `load_adapter`, PEFT files) or an ``nnx.State`` of
    vectors. The vectors keep the model's dtype and placement (sharding) of its current vectors.

    Example:
      >>> ia3_jax.nnx.set_adapter(model, ia3_jax.nnx.adapter(tuned))   # tuned: adapted with the same config
      >>> ia3_jax.nnx.set_adapter(model, ia3_jax.bank_select(bank, 2))
    """
    vectors = vector_variables(model)
    new = (
        _tree.vectors(_tree.to_dict(adapter_tree))
        if isinstance(adapter_tree, Mapping)
        else {path: v.get_value() for path, v in vector_variables(adapter_tree).items()}
    )
    check_same_modules(new, vectors, "the adapter's vectors")
    for path, variable in vectors.items():
        variable.get_metadata(TARGET_META).check_vector(np.shape(new[path]))
    writes = [(variable, new[path]) for path, variable in vectors.items()] + _saved_writes(model, adapter_tree)
    for variable, value in writes:  # only once everything is checked: a refused adapter changes nothing
        variable.set_value(placed_like(variable, value))


# --- folding vectors into weights: the Linen fold arithmetic (`merge.rescale_module`) on NNX variables ---


def _stored_weight(
    flat: Mapping[_tree.Path, nnx.Variable], module: nnx.Module | None, vector: nnx.Variable, path: _tree.Path
) -> tuple[Any, tuple[tuple[str, ...], ...] | None]:
    """The weight a vector scales, as the fold reads it (a quantized one rebuilt from its Variables), and the
    paths of a quantized weight's Variables below it (None for a plain array)."""
    target: Target = vector.get_metadata(TARGET_META)
    weight = vector.get_metadata(WEIGHT_META)
    if path + (weight,) in flat:
        return flat[path + (weight,)].get_value(), None
    # A qwix-quantized weight: its arrays sit below it (``kernel.array.scale``). A model has the WithAux/QArray
    # nodes; a state lost them, and the structure recorded at ia3_init rebuilds them.
    attribute = getattr(module, weight, None) if module is not None else None
    if quant.is_quantized(attribute):
        structure = quantized_structure(attribute)
    else:
        structure = vector.get_metadata(QUANT_META, None)
    below = sorted(p[len(path) + 1 :] for p in flat if p[: len(path) + 1] == path + (weight,))
    if structure is None or sorted(structure[0]) != below:
        raise StructureError(
            f"IA3 vector at {target.key!r}: no weight {weight!r} in this model or state"
            + (
                f" that ia3_jax can read (arrays {['.'.join(p) for p in below]} below it, of a quantized weight whose "
                "structure the state does not hold). Merge the model (ia3_jax.nnx.merge(model)) instead of its state."
                if below
                else "."
            )
        )
    parts, treedef = structure
    return jax.tree_util.tree_unflatten(treedef, [flat[path + (weight,) + p].get_value() for p in parts]), parts


def _folds(
    tree: ModelOrState, vectors: Mapping[_tree.Path, nnx.Variable], divide: bool
) -> dict[_tree.Path, dict[str, Any]]:
    """``{name: new value}`` per module path: each vector folded into (or divided out of) its weight.

    Names are '.'-joined below the module: ``kernel`` and ``bias``, or ``kernel.array.scale`` for a
    qwix-quantized weight, whose integers are never written (`quant.rescale_quantized`).
    """
    state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree
    modules = dict(named_modules(tree)) if isinstance(tree, nnx.Module) else {}
    flat = {string_path(parts): v for parts, v in nnx.to_flat_state(state)}
    written = {}
    for path, variable in vectors.items():
        target: Target = variable.get_metadata(TARGET_META)
        weight = variable.get_metadata(WEIGHT_META)
        vector = variable.get_value()
        _bank.refuse_bank(target.key, target.vector_shape, np.shape(vector), "unmerge" if divide else "merge")
        check_vector_dtype(vector.dtype, f"IA3 vector at {target.key!r}")
        kernel, parts = _stored_weight(flat, modules.get(path), variable, path)
        node = {"kernel": kernel}
        if path + ("bias",) in flat and flat[path + ("bias",)].get_value() is not None:
            node["bias"] = flat[path + ("bias",)].get_value()
        target.check_kernel(node["kernel"])
        arrays = _merge.rescale_module(node, vector, target, divide, quantized_fix=_NNX_QUANT_FIX)
        new_kernel = arrays.pop("kernel")
        if parts is None:
            written[path] = {weight: new_kernel, **arrays}
        else:  # only the arrays the fold changed (the scale), each under its own path
            old, new = jax.tree_util.tree_leaves(kernel), jax.tree_util.tree_leaves(new_kernel)
            changed = {".".join((weight, *p)): b for p, a, b in zip(parts, old, new) if a is not b}
            written[path] = {**changed, **arrays}
    return written


def _raise_non_finite(written: Mapping[_tree.Path, dict[str, Any]], what: str) -> None:
    broken = _merge.non_finite_arrays(dict(written))
    if broken:
        raise NonFiniteMergeError(
            f"{what}: NaN or inf in the written {_tree.listing(broken)}: the vector there is broken or too large for "
            "the array's dtype; nothing was changed."
        )


def _write_folds(
    tree: M | nnx.State, written: Mapping[_tree.Path, dict[str, Any]], copy: bool, *, drop_vectors: bool
) -> M | nnx.State:
    """`tree` (a clone, with `copy`) with the folded arrays written; with `drop_vectors` (merge), the
    vectors and the call wrappers removed and the ``modules_to_save`` copies plain ``nnx.Param``s again."""
    if isinstance(tree, nnx.State):
        new = {p + tuple(name.split(".")): array for p, arrays in written.items() for name, array in arrays.items()}
        flat = [
            (
                parts,
                variable.copy(new[string_path(parts)])
                if string_path(parts) in new
                else _plain(variable) if drop_vectors else variable,
            )
            for parts, variable in nnx.to_flat_state(tree)
            if not (drop_vectors and isinstance(variable, IA3Vector) and parts[-1] == VECTOR)
        ]
        return nnx.from_flat_state(flat)
    model = nnx.clone(tree) if copy else tree
    for path, module in named_modules(model):
        for name, array in written.get(path, {}).items():
            variable: Any = functools.reduce(getattr, name.split("."), module)  # kernel, or kernel.array.scale
            variable.set_value(array)
        if drop_vectors and isinstance(getattr(module, VECTOR, None), IA3Vector):
            delattr(module, VECTOR)
            module.__class__ = base_type(type(module))
        if drop_vectors:
            for name, value in list(vars(module).items()):
                if isinstance(value, IA3SavedParam):
                    setattr(module, name, _plain(value))
    return model


def _plain(variable: nnx.Variable) -> nnx.Variable:
    """A `IA3SavedParam` (a ``modules_to_save`` copy) as the ``nnx.Param`` it was before `ia3_init`."""
    if not isinstance(variable, IA3SavedParam):
        return variable
    return nnx.Param(variable.get_value(), **variable.get_metadata())


def merge(tree: M | nnx.State, *, safe_merge: bool = False, copy: bool = True) -> M | nnx.State:
    """Folds every vector into its weight (and, for output vectors, its bias); removes the vectors.

    On a model: returns the model with plain module classes and no ``ia3_l`` (a clone, unless
    ``copy=False``). On an ``nnx.State`` (``nnx.split(model)[1]``): returns the state without the
    vectors, which fits the original, un-adapted model (``nnx.update(plain_model, merged)``).
    ``w * l`` is computed in the promoted dtype and cast back to ``w``'s, as for Linen.

    A qwix-quantized weight keeps its integers: an output vector is folded into its scale.

    Raises:
      NonFiniteMergeError: with ``safe_merge``, a written array holds NaN or inf (nothing changes).
      UnsupportedKernelError: a weight is an integer array.
      QuantizedMergeError: a feedforward vector on a quantized weight (folding would re-round the
        integers); the message names the module and the fix. Nothing changes.
      StructureError: an ``nnx.State`` whose quantized weight `ia3_init` did not see quantized (the
        model was quantized after `ia3_init`): merge the model instead.

    Example:
      >>> served = ia3_jax.nnx.merge(model)           # runs at full speed, no vectors
    """
    vectors = vector_variables(tree)
    if not vectors:
        raise StructureError("merge: no IA3 vectors in this model or state.")
    written = _folds(tree, vectors, divide=False)
    if safe_merge:
        _raise_non_finite(written, "merge(safe_merge=True)")
    return _write_folds(tree, written, copy, drop_vectors=True)


def unmerge(
    merged: M | nnx.State, adapter_tree: ModelOrState, *, safe_unmerge: bool = False, copy: bool = True
) -> M | nnx.State:
    """Divides the vectors of `adapter_tree` (an adapted model or its vector state) back out of `merged`.

    ``w / (l + 1e-8)`` as PEFT; approximate, and warns like PEFT (and `ia3_jax.unmerge`). Returns
    the base model (or state) without vectors.

    Example:
      >>> base_again = ia3_jax.nnx.unmerge(ia3_jax.nnx.merge(model), model)
    """
    vectors = vector_variables(adapter_tree)
    if not vectors:
        raise StructureError("unmerge: the adapter holds no IA3 vectors.")
    written = _folds(merged, vectors, divide=True)
    near = [
        f"{_tree.dotted(p)!r} (smallest |l| {m:.3g})"
        for p, m in _merge.smallest_magnitudes({p: v.get_value() for p, v in vectors.items()}).items()
        if m < _merge.NEAR_ZERO
    ]
    if safe_unmerge:
        if near:
            raise NonFiniteMergeError(
                f"unmerge(safe_unmerge=True): vectors with entries near 0 at {_tree.listing(near)}."
            )
        _raise_non_finite(written, "unmerge(safe_unmerge=True)")
    warnings.warn("Unmerge result can be inaccurate for (IA)^3.", stacklevel=2)
    return _write_folds(merged, written, copy, drop_vectors=False)


# --- combining adapters: the Linen combinations on the vectors, returned as a vector state ---


def _as_adapters(adapters: Sequence[ModelOrState | Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [_tree.to_dict(a) if isinstance(a, Mapping) else adapter(a) for a in adapters]


def _vector_state(like: ModelOrState | Mapping[str, Any], combined: Mapping[str, Any]) -> Any:
    """`combined` as an ``nnx.State`` of vectors with `like`'s metadata (or as a dict if `like` is one)."""
    if isinstance(like, Mapping):
        return combined
    vectors = _tree.vectors(combined)
    state = nnx.state(like, IA3Vector) if isinstance(like, nnx.Module) else like
    return nnx.from_flat_state(
        [
            (parts, variable.copy(vectors[string_path(parts[:-1])]))
            for parts, variable in nnx.to_flat_state(state)
            if isinstance(variable, IA3Vector) and parts[-1] == VECTOR
        ]
    )


def add_weighted_adapter(adapters: Sequence[ModelOrState | Mapping[str, Any]], weights: Sequence[float]) -> Any:
    """PEFT's weighted *sum* ``sum_i w_i l_i`` of adapted models' (or vector states') vectors.

    Returns an ``nnx.State`` of vectors with the first adapter's metadata: ``nnx.update(model, it)``
    makes `model` carry it. (Nested dicts in, a nested dict out.)

    Example:
      >>> mixed = ia3_jax.nnx.add_weighted_adapter([model_a, model_b], [0.7, 0.3])
      >>> nnx.update(model_a, mixed)            # model_a now applies 0.7 l_a + 0.3 l_b
    """
    return _vector_state(adapters[0], _merge.add_weighted_adapter(_as_adapters(adapters), weights))


def combine(adapters: Sequence[ModelOrState | Mapping[str, Any]]) -> Any:
    """Several adapters at once: the elementwise product of their vectors, as an ``nnx.State`` of vectors.

    Example:
      >>> nnx.update(model, ia3_jax.nnx.combine([task_model, style_model]))   # applies l_task * l_style
    """
    return _vector_state(adapters[0], _merge.combine(_as_adapters(adapters)))


# --- checkpoints: the adapter-only orbax checkpoint of `ia3_jax.save_adapter` ---


def save_adapter(path: Any, tree: ModelOrState, config: IA3Config, **kwargs: Any) -> Any:
    """`ia3_jax.save_adapter` of an adapted NNX model's (or vector state's) vectors; same keywords.

    Example:
      >>> ia3_jax.nnx.save_adapter("ckpt/run", model, config, step=step)
    """
    return _checkpoint.save_adapter(path, adapter(tree), config, **kwargs)


def _check_checkpoint_fits(
    vectors: Mapping[_tree.Path, nnx.Variable], saved: Mapping[str, Any], config: IA3Config
) -> None:
    """Refuses a checkpoint whose modules or sides are not the model's, before any array is read.

    The hazard: a module whose input and output have one size takes the vector either way; a model adapted
    with other ``feedforward_modules`` than the checkpoint's would scale the wrong side, silently.
    """
    check_same_modules(_tree.vectors(saved), vectors, "the checkpoint's vectors")
    for variable in vectors.values():
        target: Target = variable.get_metadata(TARGET_META)
        if config.is_feedforward(target.key) != target.feedforward:
            sides = ("input", "output") if target.feedforward else ("output", "input")
            raise AdapterMismatchError(
                f"module {target.key!r}: the checkpoint's config scales its {sides[1]} (feedforward_modules="
                f"{list(config.feedforward_modules or ())}), the model was adapted to scale its {sides[0]}: the "
                "vectors would scale the wrong side. Adapt the model with the config the checkpoint was saved with "
                "(`_, config = ia3_jax.load_adapter(path)` reads it): ia3_jax.nnx.ia3_init(base_model, config, ...)."
            )


def load_adapter(path: Any, model: nnx.Module, *, step: int | None = None) -> IA3Config:
    """Reads an adapter checkpoint into the adapted `model` in place; returns its config.

    The arrays are restored straight onto the devices and shardings of the model's vectors, so a
    model built sharded (or with ``nnx.eval_shape`` and then materialised) gets sharded vectors.
    A checkpoint of a bank (`save_adapter` of a model that `set_bank` gave one) is written with
    `set_bank`, into a model holding a bank or one adapter alike; `bank_call` runs it.

    Example:
      >>> model = ia3_jax.nnx.ia3_init(base_model, config, *inputs)     # the config the checkpoint was trained with
      >>> config = ia3_jax.nnx.load_adapter("ckpt/run", model)          # latest step, written into model
    """
    vectors = vector_variables(model)
    _check_checkpoint_fits(vectors, *_checkpoint.saved_adapter(path, step=step))
    shardings = _tree.updated(
        {},
        {
            p + (VECTOR,): getattr(v.get_value(), "sharding", None)
            or jax.sharding.SingleDeviceSharding(jax.devices()[0])
            for p, v in vectors.items()
        }
        | {
            p: getattr(v.get_value(), "sharding", None) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
            for p, v in saved_variables(model).items()
        },
    )
    restored, config = _checkpoint.load_adapter(path, step=step, shardings=shardings)
    read = _tree.vectors(_tree.to_dict(restored))
    if any(
        _bank.bank_width(v.get_metadata(TARGET_META).vector_shape, np.shape(read[p])) is not None
        for p, v in vectors.items()
        if p in read
    ):
        set_bank(model, restored)  # a bank's checkpoint (`save_adapter` of a bank model): the model holds it after
    else:
        set_adapter(model, restored)
    return config
