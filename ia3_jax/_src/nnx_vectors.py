"""IA3's NNX variables and what they scale: the vector types, their metadata, and reading them off a model.

An `IA3Vector` records in its metadata everything an operation needs (the `Target`, the name of the
weight it scales, the structure of a qwix-quantized weight), so the modules above work on a model or
on an ``nnx.State`` alone. Also here: a module's weight (an ``nnx.Param``, or a qwix
``WithAux(QArray)`` of ``nnx.Param``s), the subscripts of its ``einsum_str``, the cached subclass that
gives a module class a wrapped ``__call__``, and the adapter as a plain nested dict.

The NNX modules build on this one, one way: `nnx_trace` (layouts from a shape-only trace) and
`nnx_bank` (adapter banks) use it; `nnx` (the verbs: ``ia3_init``, ``merge``, ...) uses all three.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from ia3_jax._src import quant
from ia3_jax._src import tree as _tree
from ia3_jax._src.errors import StructureError

VECTOR = _tree.VECTOR  # the attribute name of a module's vector, as PEFT's and the Linen tree's leaf name
TARGET_META = "ia3_target"  # vector metadata: the module's `Target`
WEIGHT_META = "ia3_weight"  # vector metadata: the name of the weight attribute it scales
# vector metadata, for a qwix-quantized weight only: (the state paths of its arrays below the weight, its treedef),
# so that `merge` of an ``nnx.State`` (where the WithAux/QArray nodes are flattened away) can rebuild it
QUANT_META = "ia3_quantized"

M = TypeVar("M", bound=nnx.Module)
ModelOrState = nnx.Module | nnx.State


class IA3Vector(nnx.LoRAParam):
    """An IA3 scaling vector: trainable, and selected by ``nnx.LoRAParam`` filters too (Tunix).

    Its metadata ``ia3_target`` (a `Target`) and ``ia3_weight`` (the weight's attribute name) tell
    every operation which kernel axes it scales, also when only an ``nnx.State`` is at hand.

    Example:
      >>> optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=ia3_jax.IA3Vector)
      >>> adapter_state = nnx.state(model, ia3_jax.IA3Vector)
    """


class IA3SavedParam(nnx.LoRAParam):
    """A param of a ``modules_to_save`` module: the trainable copy that PEFT keeps beside the original.

    `ia3_init` re-types the listed modules' ``nnx.Param``s of its clone as this ``nnx.LoRAParam``
    subclass, so Tunix's ``PeftTrainer`` (which trains ``nnx.LoRAParam``s) and its LoRA-only checkpoints
    take them with the vectors, and ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains both; the
    original stays in the un-adapted model. `merge` gives them back their ``nnx.Param`` type.

    Example:
      >>> optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)  # vectors + copies
    """


# --- modules and their weights ---


def string_path(parts: Sequence[Any]) -> _tree.Path:
    """An NNX path (list indices are ints) as the string path IA3Config matches: ``layers.0.attn``."""
    return tuple(str(p) for p in parts)


def weight_name(module: nnx.Module) -> str | None:
    """The attribute holding the module's weight: ``kernel``, else its only parameter of 2+ axes.

    A qwix-quantized weight (PTQ puts a ``WithAux(QArray(qvalue=nnx.Param, scale=nnx.Param))`` in the
    module's attribute, not an ``nnx.Param``) counts as a weight of its logical shape.
    """
    names = [
        name
        for name, value in vars(module).items()
        if quant.is_quantized(value)
        or (
            isinstance(value, nnx.Param)
            and not isinstance(value, IA3Vector)
            and len(quant.kernel_shape(value.get_value())) >= 2
        )
    ]
    if "kernel" in names:
        return "kernel"
    return names[0] if len(names) == 1 else None


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def weight_value(weight: Any) -> Any:
    """A weight attribute's value: an ``nnx.Param``'s array, or a quantized kernel with arrays for its Params."""
    if isinstance(weight, nnx.Variable):
        return weight.get_value()
    return jax.tree.map(lambda v: v.get_value(), weight, is_leaf=_is_variable)


def _key_name(key: Any) -> str:
    for field in ("name", "key", "idx"):
        if hasattr(key, field):
            return str(getattr(key, field))
    return str(key)


def quantized_structure(weight: Any) -> tuple[tuple[tuple[str, ...], ...], Any]:
    """(paths of a quantized weight's ``nnx.Variable``s below it, as its state names them; its treedef)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(weight, is_leaf=_is_variable)
    return tuple(tuple(_key_name(k) for k in path) for path, _ in leaves), treedef


def named_modules(model: nnx.Module) -> Iterator[tuple[_tree.Path, nnx.Module]]:
    """Every module below `model` (not itself), by path."""
    # flax >= 0.12.x has the function and deprecates the method; 0.12.0 has only the method.
    iterate = getattr(nnx, "iter_modules", None)
    for parts, module in iterate(model) if iterate is not None else model.iter_modules():
        if parts:
            yield string_path(parts), module


# --- the call wrappers: one subclass per module class, cached, so equal models have equal graphdefs ---


def base_type(cls: type) -> type:
    """The class a module had before ia3_jax (or a recording trace) gave it a subclass.

    Example:
      >>> adapted = ia3_jax.nnx.ia3_init(model, config, x)
      >>> ia3_jax.nnx.base_type(type(adapted.k_proj)) is type(model.k_proj)
      True
    """
    return getattr(cls, "_ia3_base_type", cls)


@functools.cache
def call_subclass(base: type, call: Callable[..., Any]) -> type:
    namespace = {
        "__call__": call,
        "_ia3_base_type": base,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
    }
    return type(base.__name__, (base,), namespace)


# --- a module's ``einsum_str`` ---


def einsum_operands(spec: Any, *, drop_ellipsis: bool = False) -> tuple[str, str, str] | None:
    """(input, weight, output) subscripts of an einsum spec ``'x,w->y'``; None if `spec` is not of that form, or
    holds ``...`` and not `drop_ellipsis` (else each ``...`` is removed).

    Example: ``einsum_operands("BSD,CKDH->CBSKH") == ("BSD", "CKDH", "CBSKH")``.
    """
    if not isinstance(spec, str) or "->" not in spec or spec.count(",") != 1 or ("..." in spec and not drop_ellipsis):
        return None
    operands, out = spec.replace(" ", "").replace("...", "").split("->")
    x, w = operands.split(",")
    return x, w, out


def _einsum_operands(module: nnx.Module) -> tuple[str, str, str] | None:
    """`einsum_operands` of the module's ``einsum_str`` (None without one, or with ``...``)."""
    return einsum_operands(getattr(module, "einsum_str", None))


def einsum_output_positions(module: nnx.Module) -> tuple[int, ...] | None:
    """Where the weight's output features sit in the output of the module's ``einsum_str``, when they are not
    its trailing axes (``'BSD,CKDH->CBSKH'``: C, K, H at 0, 3, 4); None when they are (or there is no einsum)."""
    parsed = _einsum_operands(module)
    if parsed is None:
        return None
    _, w, out = parsed
    positions = tuple(i for i, c in enumerate(out) if c in w)
    return None if positions == tuple(range(len(out) - len(positions), len(out))) else positions


def einsum_batch_position(module: nnx.Module) -> int | None:
    """Where the input's first (batch) axis goes in the output of the module's ``einsum_str`` (None: nowhere)."""
    parsed = _einsum_operands(module)
    if parsed is None or not parsed[0] or parsed[0][0] not in parsed[2]:
        return None
    return parsed[2].index(parsed[0][0])


# --- the adapter as a plain nested dict (Linen's adapter form: '.'-joinable string keys) ---


def check_same_modules(given: Iterable[_tree.Path], model: Iterable[_tree.Path], what: str) -> None:
    """Raises `StructureError` unless `given` (an adapter's paths) and `model` (the model's) are the same set.

    `what` starts the message, e.g. ``"set_bank: the bank's vectors"``.
    """
    missing, extra = sorted(set(model) - set(given)), sorted(set(given) - set(model))
    if missing or extra:
        raise StructureError(
            f"{what} do not fit the model: the model's {[_tree.dotted(p) for p in missing[:8]]} are missing from "
            f"them, and {[_tree.dotted(p) for p in extra[:8]]} are not in the model."
        )


def vector_variables(tree: ModelOrState) -> dict[_tree.Path, nnx.Variable]:
    """Every `IA3Vector` of a model or a state, by module path; `StructureError` for anything else."""
    if not isinstance(tree, nnx.Module | nnx.State):
        raise StructureError(
            f"expected an adapted NNX model or its nnx.State, got a {type(tree).__name__}. A plain dict (as "
            "ia3_jax.nnx.adapter returns, for saving and PEFT files) carries no targets: pass the adapted model, or "
            "nnx.state(model, ia3_jax.nnx.IA3Vector)."
        )
    state = nnx.state(tree, IA3Vector) if isinstance(tree, nnx.Module) else tree
    return {
        string_path(parts[:-1]): variable
        for parts, variable in nnx.to_flat_state(state)
        if isinstance(variable, IA3Vector) and parts[-1] == VECTOR
    }


def saved_variables(tree: ModelOrState) -> dict[_tree.Path, nnx.Variable]:
    """Every `IA3SavedParam` (``modules_to_save`` copy) of a model or a state, by its full path.

    Example:
      >>> copies = ia3_jax.nnx.saved_variables(model)     # {("head", "kernel"): IA3SavedParam, ("head", "bias"): ...}
    """
    state = nnx.state(tree, IA3SavedParam) if isinstance(tree, nnx.Module) else tree
    return {
        string_path(parts): variable
        for parts, variable in nnx.to_flat_state(state)
        if isinstance(variable, IA3SavedParam)
    }


def adapter(tree: ModelOrState) -> dict[str, Any]:
    """The vectors (and ``modules_to_save`` copies) of an adapted model or its ``nnx.State``, as a nested dict.

    Keys are strings (``{"layers": {"0": {"attn": {"k_proj": {"ia3_l": array}}}}}``), the form of
    Linen's adapter tree: `ia3_jax.save_adapter`, `ia3_jax.save_peft` and optax take it as it is. A
    ``modules_to_save`` module's params sit at its path as in Linen's (``{"head": {"kernel", "bias"}}``).

    Example:
      >>> tree = ia3_jax.nnx.adapter(model)     # {"layers": {"0": {"attn": {"k_proj": {"ia3_l": array}}}}}
      >>> ia3_jax.save_adapter("ckpt/run", tree, config)
    """
    vectors = vector_variables(tree)
    if not vectors:
        raise StructureError("no IA3 vectors in this model or state: adapt it with ia3_jax.nnx.ia3_init first.")
    saved = {path: v.get_value() for path, v in saved_variables(tree).items()}
    return _tree.updated({}, {**saved, **{path + (VECTOR,): v.get_value() for path, v in vectors.items()}})


def placed_like(variable: nnx.Variable, value: Any) -> jax.Array:
    """`value` in the variable's dtype, on its current placement (sharding)."""
    old = variable.get_value()
    sharding = getattr(old, "sharding", None)
    value = jnp.asarray(value, old.dtype)
    return jax.device_put(value, sharding) if sharding is not None else value
