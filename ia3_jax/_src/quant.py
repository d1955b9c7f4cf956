"""Kernels that are not plain float arrays: qwix's weight-only quantized kernels.

qwix post-training quantization (PTQ) stores a quantized kernel as
``WithAux(array=QArray(qvalue, scale, zero_point, qtype), how)``: ``qvalue`` holds the integers in the
kernel's logical shape, ``scale`` (same rank, each axis 1, a tile count, or the full size) multiplies
them back, ``dequantized = (qvalue - zero_point) * scale``. qwix's ``dot_general`` multiplies the
integers first and the scale after, so the IA3 interceptor (which scales a module's input or output)
composes with it unchanged: only `ia3_init` and `merge` have to look inside the kernel.

qwix is never imported here unless the user has imported it: without it no leaf can be a qwix type.

An output (attention-type) vector ``l`` folds exactly into a per-output-channel scale:
``(q - z) * s * l = (q - z) * (s * l)``; the integers never change. A feedforward (input) vector
varies along the input axis, where the scale is shared: folding it would mean re-rounding the
integers, so `rescale_quantized` refuses and says what to do instead.

Example:
  >>> qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
  >>> qparams = qwix.quantize_params(params, jax.eval_shape(qmodel.init, key, x)["params"])
  >>> adapter, base = ia3_jax.split(ia3_jax.ia3_init(qparams, config))
  >>> logits = ia3_jax.apply_fn(qmodel.apply, config)({"params": ia3_jax.join(base, adapter)}, x)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ia3_jax._src import tree as _tree
from ia3_jax._src.errors import QuantizedMergeError, UnsupportedKernelError


def _qwix_types() -> tuple[Any, Any] | None:
    """(WithAux, QArray), or None when qwix was never imported (then no leaf can be a qwix type)."""
    if "qwix" not in sys.modules:  # keeps `import ia3_jax` free of qwix for users who do not quantize
        return None
    from qwix import QArray
    from qwix._src.providers.ptq import WithAux

    return WithAux, QArray


def is_quantized(leaf: Any) -> bool:
    """True for a qwix quantized kernel: a ``WithAux`` (any subclass) or a bare ``QArray``.

    Example:
      >>> import ia3_jax.quant
      >>> ia3_jax.quant.is_quantized(jnp.ones((4, 8)))
      False
    """
    types = _qwix_types()
    return types is not None and isinstance(leaf, types)


def _qarray(kernel: Any) -> Any:
    with_aux, _ = _qwix_types()  # type: ignore[misc]
    return kernel.array if isinstance(kernel, with_aux) else kernel


def _known_qarray(kernel: Any, where: str) -> Any:
    """The ``QArray`` of a plain qwix PTQ kernel; anything else (AWQ's ``WithAwqScale``, a ``WithAux``
    around a float array) dequantizes differently, so it raises `UnsupportedKernelError`."""
    with_aux, qarray_type = _qwix_types()  # type: ignore[misc]
    qarray = _qarray(kernel)
    if type(kernel) not in (with_aux, qarray_type) or type(qarray) is not qarray_type:
        raise UnsupportedKernelError(
            f"{where} is a {type(kernel).__qualname__} around a {type(qarray).__qualname__}, a quantized kernel "
            "whose dequantization ia3_jax does not know; keep the IA3 vector unmerged (ia3_jax.apply_fn) instead."
        )
    return qarray


def _qtype_name(qtype: Any) -> str:
    try:
        return jnp.dtype(qtype).name
    except TypeError:  # qwix's string qtypes ("nf4", "mxfp8")
        return str(qtype)


def kernel_shape(kernel: Any) -> tuple[int, ...]:
    """The logical shape of a kernel: an array's shape, a quantized kernel's ``qvalue`` shape.

    `kernel` may be boxed (``nn.Partitioned``). Raises `UnsupportedKernelError` naming the type for a
    kernel that is a container of arrays ia3_jax does not know (another quantization scheme), since
    its shape and its meaning cannot be told apart safely.

    Example:
      >>> import ia3_jax.quant
      >>> ia3_jax.quant.kernel_shape(jnp.ones((4, 8)))      # a plain array; a qwix QArray: its qvalue's shape
      (4, 8)
    """
    kernel = _tree.unbox(kernel)
    if is_quantized(kernel):
        inner = _qarray(kernel)
        return tuple(jnp.shape(_tree.unbox(getattr(inner, "qvalue", inner))))
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(kernel)) or isinstance(kernel, jax.ShapeDtypeStruct):
        return tuple(jnp.shape(kernel))
    raise UnsupportedKernelError(
        f"kernel of type {type(kernel).__module__}.{type(kernel).__qualname__} is neither an array nor a qwix "
        "quantized kernel (WithAux/QArray); ia3_jax does not know this quantization scheme. Quantize with "
        "qwix.PtqProvider, or pass dequantized params."
    )


# What to do instead when a vector cannot be folded into a quantized kernel (Linen params; NNX has its own).
MERGE_FIX = (
    "Keep this vector unmerged (serve with ia3_jax.apply_fn), or merge into dequantized weights: "
    "ia3_jax.merge(ia3_jax.quant.dequantize(params), config), then requantize with qwix if needed."
)


def qvalue(kernel: Any) -> Any:
    """The integers of a qwix quantized kernel as stored (an ``nnx.Param`` in an NNX model, else an array)."""
    return _qarray(kernel).qvalue


def rescale_quantized(
    kernel: Any,
    factor: jax.Array,
    fold: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    key: str,
    feedforward: bool,
    fix: str = MERGE_FIX,
) -> Any:
    """`kernel` with ``fold(scale, factor)`` as its scale; its integers are left untouched.

    Args:
      kernel: a qwix ``WithAux`` or ``QArray`` of logical shape ``K``.
      factor: the IA3 vector broadcast to the kernel's rank (size 1 on the axes it does not vary on),
        as `KernelLayout.scale_for_kernel` gives it.
      fold: ``lambda s, f: s * f`` (merge) or its inverse (unmerge); computed in the promoted dtype
        and cast back to the scale's dtype.
      key: the module path, for messages.
      feedforward: whether the vector scales the input side (only for the message).
      fix: what the `QuantizedMergeError` tells the user to do instead.

    Raises:
      QuantizedMergeError: the scale is shared along an axis where the vector varies (always the case
        for a feedforward vector and qwix's per-output-channel scales): exact folding is impossible.
      UnsupportedKernelError: an unknown ``WithAux`` subclass (AWQ, ...) whose dequantization differs.
    """
    qarray = _known_qarray(kernel, f"kernel at {key!r}")
    boxed_scale = qarray.scale
    scale = _tree.unbox(boxed_scale)
    shape = tuple(jnp.shape(_tree.unbox(qarray.qvalue)))
    shared = [a for a, (f, s, n) in enumerate(zip(factor.shape, scale.shape, shape)) if f != 1 and s != n]
    if shared:
        side = "feedforward (input-side)" if feedforward else "output-side"
        raise QuantizedMergeError(
            f"cannot merge the {side} IA3 vector at {key!r} into its quantized kernel: the kernel {shape} "
            f"({_qtype_name(qarray.qtype)}) has scale {tuple(scale.shape)}, one value shared along axis "
            f"{shared[0]} where the vector varies, so folding it would re-round the integers (lossy). {fix}"
        )
    new_scale = fold(scale, factor).astype(scale.dtype)
    qarray = qarray.replace(scale=_tree.rebox(boxed_scale, new_scale))
    return qarray if kernel is _qarray(kernel) else kernel.replace(array=qarray)


def _refuse_state_form(node: Any, path: tuple[str, ...] = ()) -> None:
    """Raises `UnsupportedKernelError` at a quantized weight flattened to a ``{"qvalue", "scale"}`` dict
    (``nnx.state`` / ``nnx.to_pure_dict`` of a qwix NNX model), which `dequantize` would pass over."""
    if not isinstance(node, Mapping):
        return
    if {"qvalue", "scale"} <= set(node):
        raise UnsupportedKernelError(
            f"dequantize: {'.'.join(path)!r} is a quantized weight flattened to a dict ({sorted(node)}), as the state "
            "of an NNX model that qwix quantized: dequantize reads Linen params holding qwix arrays. For an NNX "
            "model, ia3_jax.nnx.merge folds output vectors into the quantized scale; to serve in float, build the "
            "float model and load the adapter there."
        )
    for key, child in node.items():  # not _tree.modules: an NNX state of lists has int keys, which it refuses
        _refuse_state_form(child, (*path, str(key)))


def dequantize(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` with every qwix quantized kernel replaced by its float array ``(q - z) * s``.

    The result runs in the original (unquantized) model, and `merge` can fold any vector into it.
    Other leaves (``ia3_l`` vectors, biases, norms) are kept as they are.

    Example:
      >>> merged = ia3_jax.merge(ia3_jax.quant.dequantize(ia3_jax.join(qbase, adapter)), config)
      >>> model.apply({"params": merged}, x)

    Raises:
      UnsupportedKernelError: a quantized kernel qwix cannot dequantize, or a quantized weight in the state
        form of an NNX model (a ``{"qvalue", "scale"}`` dict), which this function would pass over.
    """
    _refuse_state_form(params)
    if _qwix_types() is None:
        return _tree.to_dict(params)
    import qwix

    def leaf(path: Any, x: Any) -> Any:
        if not is_quantized(x):
            return x
        return qwix.dequantize(_known_qarray(x, f"the leaf at {jax.tree_util.keystr(path)}"))

    return _tree.to_dict(jax.tree_util.tree_map_with_path(leaf, params, is_leaf=is_quantized))
