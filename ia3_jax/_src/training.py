"""Training helpers for plain optax: a trainable mask for one-tree users, a jitted adapter step.

IA3 needs no custom optimizer. Either split the params and optimize the adapter tree alone::

    adapter, base = ia3_jax.split(ia3_jax.ia3_init(params, config), config)
    opt_state = optimizer.init(adapter)            # state for the vectors only
    step = ia3_jax.make_train_step(loss_fn, optimizer)
    adapter, opt_state, loss = step(adapter, opt_state, base, batch)

or keep one tree and freeze the rest with `trainable_mask` and ``optax.multi_transform``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config
from ia3_jax._src.errors import StructureError
from ia3_jax._src.partition import is_trainable, join
from ia3_jax._src.targets import modules_to_save_roots


def trainable_mask(params: Mapping[str, Any], config: IA3Config | None = None) -> Any:
    """A bool tree shaped like `params`: True on ``ia3_l`` leaves and on ``modules_to_save`` params.

    For users who keep the whole param tree in one piece. Boxed leaves (``nn.Partitioned``) get a
    boxed bool, so the mask has exactly the structure of `params`. Note that ``optax.masked(tx, mask)``
    alone passes the *raw gradients* through on unmasked leaves; freeze them explicitly:

    Example:
      >>> mask = trainable_mask(params, config)
      >>> labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
      >>> tx = optax.multi_transform({"train": optax.adam(1e-2), "freeze": optax.set_to_zero()}, labels)
      >>> # or: optax.chain(optax.masked(optax.adam(1e-2), mask),
      >>> #                 optax.masked(optax.set_to_zero(), jax.tree.map(lambda m: not m, mask)))

    Args:
      params: a Flax param tree holding ``ia3_l`` vectors (from `ia3_init`).
      config: needed only to mark ``config.modules_to_save`` as trainable.

    Returns:
      A pytree of Python bools with the structure of `params`.

    Raises:
      StructureError: nothing in `params` is trainable (no ``ia3_l`` leaf, no ``modules_to_save``).
    """
    roots = modules_to_save_roots(params, config) if config is not None else []

    def flag(path: jax.tree_util.KeyPath, leaf: Any) -> Any:
        return _tree.rebox(leaf, is_trainable(tuple(_tree.key_str(k) for k in path), roots))

    mask = jax.tree_util.tree_map_with_path(flag, params, is_leaf=_tree.is_box)
    if not any(jax.tree.leaves(mask)):
        raise StructureError(
            "trainable_mask: these params hold no IA3 vector (and config names no modules_to_save): "
            "insert the vectors with ia3_jax.ia3_init(params, config) first."
        )
    return mask


def make_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    donate: bool = False,
) -> Callable[..., tuple[Any, optax.OptState, Any]]:
    """A jitted ``step(adapter, opt_state, base, *args) -> (adapter, opt_state, loss)``.

    Differentiates ``loss_fn(join(base, adapter), *args)`` with respect to the adapter only and
    applies one optax update. The base is an argument, not a closed-over constant, so it is neither
    baked into the compiled program nor copied per step, and it can be sharded like any input.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar`` (or ``(scalar, aux)`` with `has_aux`) on the full
        param tree; it must run the model under the interceptor, e.g. via `apply_fn`.
      optimizer: any optax transformation; its state is ``optimizer.init(adapter)``. With many
        vectors, ``optax.flatten(optimizer)`` updates them all in one kernel instead of one each.
      has_aux: `loss_fn` returns ``(loss, aux)``; the step then returns ``(loss, aux)`` in place of loss.
      donate: donate the adapter and optimizer-state buffers to the step (reuse their memory);
        the arrays passed in are then invalid after the call.

    Example:
      >>> forward = ia3_jax.apply_fn(model.apply, config)
      >>> def loss_fn(params, x, y):
      ...     return optax.softmax_cross_entropy_with_integer_labels(forward({"params": params}, x), y).mean()
      >>> step = make_train_step(loss_fn, optax.adam(3e-3))
      >>> opt_state = optax.adam(3e-3).init(adapter)
      >>> adapter, opt_state, loss = step(adapter, opt_state, base, x, y)
    """

    def step(adapter: Any, opt_state: optax.OptState, base: Any, *args: Any):
        out, grads = jax.value_and_grad(lambda a: loss_fn(join(base, a), *args), has_aux=has_aux)(adapter)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, out

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())
