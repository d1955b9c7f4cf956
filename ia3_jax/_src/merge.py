"""Folding vectors into kernels and combining adapters: tree operations, jit-able with a static config."""

from __future__ import annotations

import dataclasses
import functools
import operator
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ia3_jax._src import quant
from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config
from ia3_jax._src.dtypes import check_vector_dtype
from ia3_jax._src.errors import NonFiniteMergeError, StructureError, VectorShapeError
from ia3_jax._src.interceptor import refuse_picked
from ia3_jax._src.layout import KernelLayout
from ia3_jax._src.partition import without_vectors
from ia3_jax._src.targets import Target, vector_target

UNMERGE_EPS = 1e-8  # PEFT's guard against division by zero in unmerge
# Entries of l below this magnitude make unmerge lossy: PEFT's +1e-8 alone shifts w / (l + 1e-8) by
# 1e-8 / |l| (relative; 1e-4 here, beyond float32 and float16 precision), w * l of a float16 kernel
# with |w| < 0.6 is subnormal, and at l = -1e-8 the division is by zero (inf / NaN).
NEAR_ZERO = 1e-4

Written = dict[_tree.Path, dict[str, Any]]  # module path -> {array name: the array a fold wrote}


def _resolve(
    paths: Sequence[_tree.Path],
    nodes: Sequence[Mapping[str, Any]],
    vectors: Sequence[Any],
    config: IA3Config | None,
    layouts: Mapping[str, KernelLayout] | None,
) -> tuple[Target, ...]:
    """The `Target` of each vector (module ``paths[i]``, whose kernel and bias are ``nodes[i]``), checked.

    Dtype, kernel and bias are checked before any fold runs. Shapes and dtypes are all it reads, so
    it runs alike on arrays and on tracers.
    """
    resolved = []
    for path, node, vector in zip(paths, nodes, vectors):
        check_vector_dtype(vector.dtype, f"IA3 vector at {_tree.dotted(path)!r}")
        target = vector_target(path, node, vector.shape, config, layouts)
        target.check_kernel(node["kernel"])
        if not target.feedforward and "bias" in node and jnp.shape(_tree.unbox(node["bias"])) != vector.shape:
            raise VectorShapeError(
                f"module {target.key!r}: bias {jnp.shape(_tree.unbox(node['bias']))} does not match the output "
                f"vector {vector.shape}."
            )
        resolved.append(target)
    return tuple(resolved)


def rescale_module(
    node: Mapping[str, Any], vector: jax.Array, target: Target, divide: bool, *, quantized_fix: str = quant.MERGE_FIX
) -> dict[str, Any]:
    """The arrays that folding `vector` writes into `node`: its kernel and, for an output vector, its bias.

    ``w * l`` (or ``w / (l + 1e-8)``) is computed in the promoted dtype and cast back to ``w``'s; a
    quantized kernel's scale absorbs the vector and its integers stay (`quant.rescale_quantized`,
    whose refusal names `quantized_fix`). Boxes are kept.
    """
    boxed_kernel = node["kernel"]
    kernel = _tree.unbox(boxed_kernel)
    factor = target.kernel_factor(vector)
    op = (lambda w, s: w / (s + UNMERGE_EPS)) if divide else (lambda w, s: w * s)
    if quant.is_quantized(kernel):
        new_kernel = quant.rescale_quantized(
            kernel, factor, op, key=target.key, feedforward=target.feedforward, fix=quantized_fix
        )
    else:
        new_kernel = op(kernel, factor).astype(kernel.dtype)
    written = {"kernel": _tree.rebox(boxed_kernel, new_kernel)}
    if not target.feedforward and "bias" in node:
        bias = _tree.unbox(node["bias"])
        written["bias"] = _tree.rebox(node["bias"], op(bias, target.full_vector(vector)).astype(bias.dtype))
    return written


def _fold_all(
    tree: Mapping[str, Any],
    vectors: Mapping[_tree.Path, Any] | None,
    config: IA3Config | None,
    layouts: Mapping[str, KernelLayout] | None,
    divide: bool,
) -> tuple[dict[str, Any], Written]:
    """`tree` with every vector folded in (or divided out) and no ``ia3_l`` left, and what was written.

    `vectors`: module path -> vector; None: the ``ia3_l`` leaves of `tree`.

    Inside a trace, the fold is traced into the caller's program. Called eagerly, the targeted
    arrays alone go through one compiled call and every other leaf of the result is the input's leaf;
    the host-side work (matching, checks, rebuilding the tree) is done once per tree structure and
    replayed from a `_Plan` on later calls.
    """
    leaves, treedef = jax.tree_util.tree_flatten((tree, vectors))
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        paths, nodes, arrays = _targeted(tree, vectors)
        targets = _resolve(paths, nodes, arrays, config, layouts)
        return _assemble(tree, dict(zip(paths, _fold_targets(nodes, arrays, targets, divide))))
    key = _plan_key(treedef, config, layouts, divide)
    plan = _PLANS.get(key) if key is not None else None
    if plan is not None:
        try:
            return plan.replay(leaves)
        except _StalePlan:  # same structure, other shapes or leaves jit cannot take: resolve again below
            with _PLANS_LOCK:
                _PLANS.pop(key, None)
    paths, nodes, arrays = _targeted(tree, vectors)
    targets = _resolve(paths, nodes, arrays, config, layouts)
    fold = _compiled_fold(targets, config, _layouts_key(layouts), divide)
    folded = _in_write_order(fold(nodes, arrays))
    merged, written = _assemble(tree, dict(zip(paths, folded)))
    plan = _Plan.make(leaves, (nodes, arrays), folded, merged, paths, fold)
    if key is not None and plan is not None:
        with _PLANS_LOCK:
            _PLANS[key] = plan
            while len(_PLANS) > _MAX_PLANS:
                _PLANS.pop(next(iter(_PLANS)))
    return merged, written


def _targeted(
    tree: Mapping[str, Any], vectors: Mapping[_tree.Path, Any] | None
) -> tuple[tuple[_tree.Path, ...], list[dict[str, Any]], list[Any]]:
    """What the fold reads, module by module: the paths, each module's kernel (and bias), each vector (unboxed).

    `vectors`: module path -> vector; None: the ``ia3_l`` leaves of `tree`.
    """
    vectors = _tree.vectors(tree) if vectors is None else vectors
    paths = tuple(vectors)
    refuse_picked(vectors.items(), "fold one adapter of the bank, ia3_jax.bank_select(bank, i).")
    nodes = [{k: v for k, v in _tree.get(tree, p).items() if k in ("kernel", "bias")} for p in paths]
    return paths, nodes, [_tree.unbox(vectors[p]) for p in paths]


def _assemble(tree: Mapping[str, Any], written: Written) -> tuple[dict[str, Any], Written]:
    changes = {path: {**_tree.get(tree, path), **arrays} for path, arrays in written.items()}
    return without_vectors(_tree.updated(_tree.to_dict(tree), changes)), written


def _fold_targets(
    nodes: Sequence[Mapping[str, Any]], vectors: Sequence[jax.Array], targets: tuple[Target, ...], divide: bool
) -> list[dict[str, Any]]:
    """`rescale_module` of each targeted module (its kernel and bias only), in order."""
    return [rescale_module(node, vector, target, divide) for node, vector, target in zip(nodes, vectors, targets)]


def _in_write_order(folded: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each module's arrays in `rescale_module`'s order (kernel, then bias), not jit's sorted one."""
    return [{k: d[k] for k in ("kernel", "bias") if k in d} for d in folded]


class _StalePlan(Exception):
    """A cached fold was retraced for arrays whose targets differ from the ones it was planned for."""


def _checked_fold(
    nodes: list[dict[str, Any]],
    vectors: list[jax.Array],
    *,
    targets: tuple[Target, ...],
    config: IA3Config | None,
    layouts: tuple[tuple[str, KernelLayout], ...] | None,
    divide: bool,
) -> list[dict[str, Any]]:
    """`_fold_targets` that resolves the targets again from the traced shapes and dtypes.

    jit retraces exactly when an argument's shape or dtype changes, so a plan replayed on arrays
    it was not made for still raises the typed errors of `_resolve`, or `_StalePlan` when the
    targets differ, before anything runs.
    """
    paths = tuple(target.path for target in targets)
    if _resolve(paths, nodes, vectors, config, None if layouts is None else dict(layouts)) != targets:
        raise _StalePlan
    return _fold_targets(nodes, vectors, targets, divide)


@functools.lru_cache(maxsize=16)
def _compiled_fold(
    targets: tuple[Target, ...],
    config: IA3Config | None,
    layouts: tuple[tuple[str, KernelLayout], ...] | None,
    divide: bool,
) -> Callable[[list[dict[str, Any]], list[jax.Array]], list[dict[str, Any]]]:
    """`_checked_fold` as one XLA program, its static arguments bound: one per set of targets.

    Binding them (instead of jit's static arguments) saves hashing 66 `Target`s on every call; the
    cache keeps one jitted function per set of targets, so a tree that cannot have a `_Plan` (one
    array at several leaves) does not compile on every call.
    """
    bound = functools.partial(_checked_fold, targets=targets, config=config, layouts=layouts, divide=divide)
    return jax.jit(bound)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """An eager fold of one tree structure, replayed on flat leaves of ``(tree, vectors)``.

    Attributes:
      paths: the targeted modules, in fold order.
      fold: the compiled fold (`_compiled_fold`) of their kernels, biases and vectors.
      inputs: indices of the leaves the compiled fold reads; ``in_def`` rebuilds its arguments.
      out_def: the result's structure; ``out_from`` says where each result leaf comes from: ``i >= 0``
        the input leaf ``i`` (shared), ``i < 0`` the folded leaf ``-1 - i``.
    """

    paths: tuple[_tree.Path, ...]
    fold: Callable[[list[dict[str, Any]], list[jax.Array]], list[dict[str, Any]]]
    inputs: tuple[int, ...]
    in_def: Any
    out_def: Any
    out_from: tuple[int, ...]

    @staticmethod
    def make(
        leaves: list[Any],
        args: Any,
        folded: Any,
        merged: Any,
        paths: tuple[_tree.Path, ...],
        fold: Callable[[list[dict[str, Any]], list[jax.Array]], list[dict[str, Any]]],
    ) -> _Plan | None:
        """The plan of a fold just done, matched by object identity; None if a leaf cannot be traced back.

        Identity is ambiguous when one array object sits at several leaves (a shared zeros bias): a
        plan replayed on a tree of distinct arrays would then read the wrong one, so none is made.
        """
        if len({id(x) for x in leaves}) != len(leaves):
            return None
        position = {id(x): i for i, x in enumerate(leaves)}
        new = {id(x): i for i, x in enumerate(jax.tree_util.tree_leaves(folded))}
        arg_leaves, in_def = jax.tree_util.tree_flatten(args)
        out_leaves, out_def = jax.tree_util.tree_flatten(merged)
        traced_back = all(id(x) in position for x in arg_leaves)
        if not traced_back or not all(id(x) in position or id(x) in new for x in out_leaves):
            return None
        out_from = tuple(-1 - new[id(x)] if id(x) in new else position[id(x)] for x in out_leaves)
        inputs = tuple(position[id(x)] for x in arg_leaves)
        return _Plan(paths, fold, inputs, in_def, out_def, out_from)

    def replay(self, leaves: list[Any]) -> tuple[dict[str, Any], Written]:
        """The fold of a tree whose flat leaves are `leaves`: one compiled call, then the result rebuilt."""
        nodes, arrays = jax.tree_util.tree_unflatten(self.in_def, [leaves[i] for i in self.inputs])
        try:
            folded = _in_write_order(self.fold(nodes, arrays))
        except TypeError as error:  # a leaf jit cannot take (an object array): the fresh path's checks name it
            raise _StalePlan from error
        new = jax.tree_util.tree_leaves(folded)
        out = [new[-1 - i] if i < 0 else leaves[i] for i in self.out_from]
        return jax.tree_util.tree_unflatten(self.out_def, out), dict(zip(self.paths, folded))


_PLANS: dict[Any, _Plan] = {}
_PLANS_LOCK = threading.Lock()  # merges from several threads: lookups are atomic, updates and eviction are not
_MAX_PLANS = 16


def _layouts_key(layouts: Mapping[str, KernelLayout] | None) -> tuple[tuple[str, KernelLayout], ...] | None:
    return None if layouts is None else tuple(sorted(layouts.items()))


def _plan_key(
    treedef: Any, config: IA3Config | None, layouts: Mapping[str, KernelLayout] | None, divide: bool
) -> Any:
    """What a `_Plan` is looked up by: the structure of ``(tree, vectors)``, config, layouts; None if unhashable.

    Shapes and dtypes are left out (hashing them costs more than the rest of a replay): the plan's
    compiled fold checks them itself (`_checked_fold`).
    """
    key = (treedef, config, _layouts_key(layouts), divide)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _all_finite(array: Any) -> jax.Array:
    """One device-side flag: every float leaf of `array` (a quantized kernel: its scale) is finite."""
    floats = [x for x in jax.tree.leaves(_tree.unbox(array)) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack([jnp.isfinite(x).all() for x in floats]).all() if floats else jnp.asarray(True)


def _describe(path: _tree.Path, name: str, array: Any) -> str:
    array = _tree.unbox(array)
    if quant.is_quantized(array):
        return f"{_tree.dotted(path)!r} {name} (its quantized scale)"
    return f"{_tree.dotted(path)!r} {name} ({array.dtype.name})"


def non_finite_arrays(written: Written) -> list[str]:
    """Every written array holding NaN or inf, described; one device-to-host transfer for the whole tree."""
    arrays = [(path, name, array) for path, named in written.items() for name, array in named.items()]
    if not arrays:
        return []
    ok = np.asarray(jax.device_get(jnp.stack([_all_finite(array) for _, _, array in arrays])))
    return [_describe(path, name, array) for (path, name, array), good in zip(arrays, ok) if not good]


def merge(
    params: Mapping[str, Any],
    config: IA3Config | None = None,
    *,
    safe_merge: bool = False,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> dict[str, Any]:
    """Folds every ``ia3_l`` into its kernel (and, for output vectors, its bias); removes the vectors.

    ``kernel * l`` is computed in the promoted dtype and cast back to the kernel's dtype. The result
    is a plain base param tree: the model runs it at full speed without the interceptor.

    Called eagerly (the documented way), the targeted kernels, vectors and biases alone go through
    one compiled call (compiled once per tree structure): each targeted kernel is read once and
    written once, and every other leaf of the result *is* the input's leaf (same buffer, no copy:
    donating or deleting `params` later deletes those leaves of the result too).
    Inside your own `jax.jit`, every output leaf is a new buffer (a copy of the whole tree) unless
    you donate the input, which makes the merge in place and copies nothing:
    ``jax.jit(functools.partial(merge, config=config), donate_argnums=0)`` (the vectors' buffers are
    then reported unusable, as they have no output; `params` must not be used afterwards).

    Args:
      params: a joined param tree (``join(base, adapter)``).
      config: decides feedforward vs output; without it, the vector's shape decides.
      safe_merge: raise `NonFiniteMergeError` naming the module and the array if any array the
        merge writes (kernel, bias, a quantized kernel's scale) holds NaN or inf, e.g. a float16
        bias times a vector entry of 1e6. The check reads values (one device-to-host transfer for
        the whole tree), so call it outside `jax.jit`.
      layouts: the same per-module layouts given to `ia3_init`, if any.

    Raises:
      UnsupportedKernelError: a targeted kernel is an integer array (the product would be truncated)
        or an unknown container; raised before anything is computed.

    Example:
      >>> serving_params = merge(join(base, adapter), config)
      >>> model.apply({"params": serving_params}, x)   # no interceptor needed
    """
    merged, written = _fold_all(params, None, config, layouts, divide=False)
    if safe_merge:
        broken = non_finite_arrays(written)
        if broken:
            raise NonFiniteMergeError(
                f"merge(safe_merge=True): NaN or inf in the merged {_tree.listing(broken)}: the vector there is "
                "broken or too large for the array's dtype (float16 overflows above 65504); nothing was returned."
            )
    return merged


def smallest_magnitudes(vectors: Mapping[_tree.Path, Any]) -> dict[_tree.Path, float]:
    """``min |l|`` of each vector (one device-to-host transfer); empty under tracing, where values are unknown."""
    arrays = [_tree.unbox(v) for v in vectors.values()]
    if not arrays or any(isinstance(a, jax.core.Tracer) for a in arrays):
        return {}
    return dict(zip(vectors, map(float, jax.device_get(_smallest_magnitudes_compiled(arrays)))))


@jax.jit
def _smallest_magnitudes_compiled(arrays: list[jax.Array]) -> jax.Array:
    """``min |l|`` of each vector in float32, stacked: one dispatch (an eager op per vector cost 20 us each)."""
    return jnp.stack([jnp.min(jnp.abs(a)).astype(jnp.float32) for a in arrays])


def unmerge(
    merged: Mapping[str, Any],
    adapter: Mapping[str, Any],
    config: IA3Config | None = None,
    *,
    safe_unmerge: bool = False,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> dict[str, Any]:
    """Divides the adapter's vectors back out of merged kernels: ``w / (l + 1e-8)``, as PEFT.

    Approximate (warns, as PEFT): low-precision kernels round twice, and entries of ``l`` near
    zero (``|l| < NEAR_ZERO``, 1e-4) lose the kernel or give inf / NaN; called eagerly, the warning
    names those modules and their smallest ``|l|``. ``modules_to_save`` params stay as merged (the
    originals are not in the adapter).

    Args:
      merged: the output of `merge`.
      adapter: the adapter that was merged (``ia3_l`` leaves; other leaves are ignored).
      config: decides feedforward vs output, as for `merge`.
      safe_unmerge: raise `NonFiniteMergeError` before returning if a vector has entries near zero
        or an array the division wrote holds NaN or inf (reads values: call it outside `jax.jit`).
      layouts: the same per-module layouts given to `ia3_init`, if any.

    Example:
      >>> base_again = unmerge(merge(join(base, adapter), config), adapter, config, safe_unmerge=True)
    """
    if not isinstance(adapter, Mapping):  # unmerge(join(merged, adapter), config): merge's call shape
        raise StructureError(
            f"unmerge(merged, adapter, config): the second argument is of type {type(adapter).__name__}, not the "
            "adapter tree that was merged. The merged params hold no vectors any more: pass the adapter apart, "
            "unmerge(merged, adapter, config)."
        )
    vectors = _tree.vectors(adapter)
    for path in vectors:
        try:
            node = _tree.get(merged, path)
        except (KeyError, TypeError):
            node = None
        if not isinstance(node, Mapping) or "kernel" not in node:
            raise StructureError(f"adapter vector at {_tree.dotted(path)!r} has no kernel in the merged params.")
    near = [
        f"{_tree.dotted(path)!r} (smallest |l| {m:.3g})"
        for path, m in smallest_magnitudes(vectors).items()
        if m < NEAR_ZERO
    ]
    if safe_unmerge and near:  # refused before anything is computed
        raise NonFiniteMergeError(
            f"unmerge(safe_unmerge=True): vectors with entries near 0 (below {NEAR_ZERO:g}) at {_tree.listing(near)}; "
            "dividing by them loses the kernel or gives inf/NaN. Keep the base params from before the merge "
            "(ia3_jax.split) instead of unmerging."
        )
    warnings.warn(
        "Unmerge result can be inaccurate for (IA)^3."
        + (
            f" Vectors with entries near 0 (below {NEAR_ZERO:g}) at {_tree.listing(near)}: dividing by them loses the "
            "kernel or gives inf/NaN there; pass safe_unmerge=True to raise instead."
            if near
            else ""
        ),
        stacklevel=2,
    )
    restored, written = _fold_all(merged, vectors, config, layouts, divide=True)
    broken = non_finite_arrays(written) if safe_unmerge else []
    if broken:
        raise NonFiniteMergeError(
            f"unmerge(safe_unmerge=True): NaN or inf in the unmerged {_tree.listing(broken)}: the vector there "
            "is broken (check it for NaN) or the division overflows the array's dtype; nothing was returned."
        )
    return restored


def _has_leaves(tree: Any) -> bool:
    return bool(jax.tree_util.tree_leaves(tree))


def _combined(
    adapters: Sequence[Mapping[str, Any]], combine_fn: Callable[[list[jax.Array]], jax.Array], what: str
) -> dict[str, Any]:
    """One adapter whose vectors are ``combine_fn`` of the adapters' vectors at each module.

    Checks first that the adapters target the same modules with vectors of one shape and a
    floating dtype, and that at most one carries ``modules_to_save`` copies (kept as they are).
    """
    if not adapters:
        raise StructureError(f"{what}: pass at least one adapter.")
    parts = [(_tree.vectors(a), without_vectors(a)) for a in adapters]
    first = parts[0][0]
    for i, (vectors, _) in enumerate(parts):
        if vectors.keys() != first.keys():
            only = sorted(set(vectors) ^ set(first))
            raise StructureError(
                f"{what}: adapter {i} and adapter 0 target different modules (first difference: "
                f"{_tree.dotted(only[0])!r}). Combine adapters made with the same config."
            )
        for path, v in vectors.items():
            where = f"{what}: adapter {i}'s vector at {_tree.dotted(path)!r}"
            check_vector_dtype(jnp.result_type(_tree.unbox(v)), where)
            if jnp.shape(_tree.unbox(v)) != jnp.shape(_tree.unbox(first[path])):
                raise StructureError(
                    f"{what}: vector {_tree.dotted(path)!r} has shape {jnp.shape(_tree.unbox(v))} in adapter {i} "
                    f"but {jnp.shape(_tree.unbox(first[path]))} in adapter 0."
                )
    saved = [rest for _, rest in parts if _has_leaves(rest)]
    if len(saved) > 1:
        raise StructureError(
            f"{what}: several adapters carry modules_to_save copies; PEFT cannot combine those either. "
            "Keep modules_to_save in one adapter at most."
        )
    combined = {
        path + (_tree.VECTOR,): _tree.rebox(first[path], combine_fn([_tree.unbox(p[0][path]) for p in parts]))
        for path in first
    }
    return _tree.updated(saved[0] if saved else {}, combined)


def add_weighted_adapter(adapters: Sequence[Mapping[str, Any]], weights: Sequence[float]) -> dict[str, Any]:
    """PEFT's ``add_weighted_adapter`` for IA3: the weighted *sum* ``sum_i w_i l_i`` of the vectors.

    Weights are not normalised (PEFT's docs suggest they sum to 1); negative weights are allowed,
    NaN and inf are not (`NonFiniteMergeError`; weights traced under `jax.jit` are not checked).
    A ``modules_to_save`` copy, if one adapter has it, is carried over (PEFT would take an untrained
    copy instead). Vectors must be floating (`AdapterDtypeError`).

    Example:
      >>> mixed = add_weighted_adapter([adapter_a, adapter_b], [0.7, 0.3])
    """
    if len(weights) != len(adapters):
        raise StructureError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights.")
    bad = [(i, w) for i, w in enumerate(weights) if not isinstance(w, jax.core.Tracer) and not np.isfinite(w)]
    if bad:
        raise NonFiniteMergeError(
            f"add_weighted_adapter: weight {bad[0][0]} is {bad[0][1]!r}; weights must be finite numbers "
            "(a NaN or inf weight makes every vector of the result NaN or inf)."
        )
    def weighted_sum(vs: list[jax.Array]) -> jax.Array:
        return functools.reduce(operator.add, [w * v for w, v in zip(weights, vs)])

    return _combined(adapters, weighted_sum, "add_weighted_adapter")


def combine(adapters: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several adapters active at once: the elementwise product of their vectors (PEFT's forward rule).

    Vectors must be floating (`AdapterDtypeError`). ``merge(join(base, combine([a, b])))`` equals
    merging `a` then `b`.

    Example:
      >>> both = combine([style_adapter, task_adapter])   # l = l_style * l_task at every module
    """
    return _combined(adapters, lambda vs: functools.reduce(operator.mul, vs), "combine")
