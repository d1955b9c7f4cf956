"""The dtype policy of IA3 vectors: floating point, float32 by default, cast only where representable.

The scaling itself (`scale`) computes in ``promote_types(activation, vector)`` and casts back; this
module holds the checks that keep a vector in a dtype that can carry it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ia3_jax._src import tree as _tree
from ia3_jax._src.errors import AdapterDtypeError


def dtype_of(x: Any) -> np.dtype:
    """The dtype of an array (jax, numpy, ShapeDtypeStruct) or a Python scalar, as numpy's.

    ``np.result_type`` of a jax array is deprecated (an implicit array-to-dtype conversion).
    """
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)


def integer_scalar(value: Any) -> int | None:
    """`value` as a Python int if it is a concrete integer scalar (Python, NumPy or JAX), else None.

    Bools are not integers here (``True`` is no step or adapter index), nor are traced values.

    Example: ``integer_scalar(jnp.int32(3)) == 3``, ``integer_scalar(3.0) is None``.
    """
    if isinstance(value, bool | np.bool_ | jax.core.Tracer):
        return None
    if isinstance(value, int):
        return value
    dtype = getattr(value, "dtype", None)  # NumPy and JAX scalars; a float, a string: None
    if dtype is None or np.ndim(value) != 0 or not jnp.issubdtype(dtype, jnp.integer):
        return None
    return int(value)


def check_vector_dtype(dtype: Any, where: str) -> None:
    """Raises `AdapterDtypeError` unless `dtype` is a floating dtype (vectors need gradients and fractions).

    `where` names the vector for the message, e.g. ``"IA3 vector at 'layers_0.k'"``.
    """
    if not jnp.issubdtype(dtype, jnp.floating):
        raise AdapterDtypeError(
            f"{where} has dtype {jnp.dtype(dtype).name}; IA3 vectors must be floating point "
            "(float32 by default, as PEFT). Cast the adapter with ia3_jax.cast_adapter(adapter, jnp.float32)."
        )


def cast_adapter(adapter: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
    """The adapter's ``ia3_l`` vectors cast to the floating `dtype`, checked to be representable.

    Raises `AdapterDtypeError` naming the module if `dtype` is not floating, if a vector holds NaN or
    inf (a broken adapter: `save_peft` refuses it too), or if a finite entry would round to inf in
    `dtype` (float16: magnitudes of 65520 and above). Entries below the dtype's smallest subnormal
    round to 0, as any cast does (float16: below 6e-8); `unmerge` cannot divide such an entry back out.
    Reads values, so call it outside `jax.jit`.

    Example:
      >>> adapter16 = cast_adapter(adapter, jnp.float16)   # e.g. to ship next to a float16 base
    """
    target = jnp.dtype(dtype)
    check_vector_dtype(target, "cast_adapter's dtype argument")
    out = {}
    for path, node in _tree.vector_modules(adapter).items():
        key = _tree.dotted(path)
        vector = _tree.unbox(node[_tree.VECTOR])
        values = np.asarray(vector)
        if not np.isfinite(values).all():
            raise AdapterDtypeError(
                f"IA3 vector at {key!r} holds NaN or inf: the adapter is broken (diverged training, a damaged file); "
                "nothing was cast. Load or train it again."
            )
        with np.errstate(over="ignore"):  # the overflow is what is checked here
            overflows = not np.isfinite(values.astype(target)).all()  # numpy's cast rounds as XLA's does
        if overflows:
            biggest = float(np.max(np.abs(values.astype(np.float64))))
            raise AdapterDtypeError(
                f"IA3 vector at {key!r} has an entry of magnitude {biggest:.6g}, which overflows {target.name} (inf or "
                f"NaN; its maximum is {float(jnp.finfo(target).max):.6g}). Keep the adapter in float32 (the "
                "interceptor computes in the promoted dtype anyway)."
            )
        out[path + (_tree.VECTOR,)] = _tree.rebox(node[_tree.VECTOR], vector.astype(target))  # keeps placement
    return _tree.updated(_tree.to_dict(adapter), out)
