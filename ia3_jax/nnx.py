"""IA3 for Flax NNX models: the same verbs as for Linen params, on an ``nnx.Module`` or its ``nnx.State``.

`ia3_init` gives each targeted module an `IA3Vector` (an ``nnx.LoRAParam``, so NNX filters,
``nnx.Optimizer(model, tx, wrt=IA3Vector)`` and Tunix's ``PeftTrainer`` train only the vectors) and
a ``__call__`` that applies it. `merge`, `unmerge`, `add_weighted_adapter` and `combine` use the
same fold arithmetic as the Linen functions of ``ia3_jax``; `adapter` gives the vectors as the plain
nested dict that `ia3_jax.save_adapter` and `ia3_jax.save_peft` take.

Example:
  >>> import ia3_jax.nnx as ia3_nnx
  >>> model = ia3_nnx.ia3_init(model, config, x)               # a clone with vectors
  >>> optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=ia3_jax.IA3Vector)
  >>> served = ia3_nnx.merge(model)                            # vectors folded into the weights

Adapter banks (many adapters, each example of a batch with its own): `set_bank` writes
``ia3_jax.stack_adapters([...])`` into the model, `bank_call` runs it with per-example ids::

  >>> ia3_nnx.set_bank(model, ia3_jax.stack_adapters([ia3_nnx.adapter(m) for m in tuned]))
  >>> y = nnx.jit(ia3_nnx.bank_call)(model, jnp.array([2, -1, 0]), x)    # -1: the base model
"""

from ia3_jax._src.nnx import (
    add_weighted_adapter,
    combine,
    ia3_init,
    load_adapter,
    merge,
    save_adapter,
    set_adapter,
    unmerge,
)
from ia3_jax._src.nnx_bank import bank_call, set_bank
from ia3_jax._src.nnx_vectors import IA3SavedParam, IA3Vector, adapter, base_type, saved_variables

__all__ = [
    "IA3SavedParam",
    "IA3Vector",
    "adapter",
    "add_weighted_adapter",
    "bank_call",
    "base_type",
    "combine",
    "ia3_init",
    "load_adapter",
    "merge",
    "save_adapter",
    "saved_variables",
    "set_adapter",
    "set_bank",
    "unmerge",
]
