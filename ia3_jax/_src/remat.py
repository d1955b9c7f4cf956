"""A remat policy that removes IA3's memory overhead: the scaled activations are recomputed, not kept.

The gradient of a feedforward vector ``l`` (``y = (x * l) @ W``) is ``sum(x * dL/d(x * l))``, so the
backward pass needs ``x``, the layer's input. Nothing else in a frozen model needs it: the input
gradient of ``(x * l) @ W`` needs ``W`` only. Without remat, JAX keeps ``x`` for every scaled layer
(for Llama's ``down_proj``: batch x seq x intermediate per layer, +26% peak on the benchmark model).
`scale` names every activation that it scales (`ACTIVATION_NAME`); `remat_policy` is a
`jax.checkpoint` policy that never saves that name nor any elementwise result, so the backward pass
recomputes ``x`` (for SwiGLU: ``silu(gate) * up`` from the gate and up outputs, which the backward
pass keeps anyway) inside the kernels that already read those inputs.

Why a policy and not a custom VJP of `scale`: `scale` sees ``x``, not how ``x`` was made, so its
backward cannot rebuild ``x`` from what the model keeps anyway; only `jax.checkpoint` over the code
that makes ``x`` can. A policy leaves the user's model and everything else about its residuals as
they were.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jax.ad_checkpoint import checkpoint_name

ACTIVATION_NAME = "ia3_activation"
"""The `jax.ad_checkpoint.checkpoint_name` that `scale` gives the activation it scales."""

Policy = Callable[..., Any]

# Primitives whose results are cheap to recompute in the backward pass (elementwise arithmetic, casts,
# layout changes): XLA fuses the recomputation into the backward kernels that read their inputs.
# Matching by name keeps this independent of where jax defines each primitive.
ELEMENTWISE = frozenset(
    """abs acos acosh add add_any and asin asinh atan atan2 atanh broadcast_in_dim cbrt ceil clamp
    concatenate convert_element_type copy cos cosh div eq erf erf_inv erfc exp exp2 expand_dims
    expm1 floor ge gt imag integer_pow iota is_finite le log log1p logistic lt max min mul ne neg
    nextafter not or pad pow real reduce_precision rem reshape rev round rsqrt select_n sign sin sinh
    slice sqrt square squeeze sub tan tanh transpose xor""".split()
)


def name_activation(activation: Any) -> Any:
    """Tags `activation` with `ACTIVATION_NAME` (an identity; only `jax.checkpoint` policies read it)."""
    return checkpoint_name(activation, ACTIVATION_NAME)


def _save_non_elementwise(prim: Any, *_: Any, **__: Any) -> bool:
    """Saves matrix products, attention kernels, reductions and other costly results; names are transparent."""
    return prim.name != "name" and prim.name not in ELEMENTWISE


def remat_policy(base: Policy | None = None) -> Policy:
    """A `jax.checkpoint` / `nn.remat` policy under which IA3 adds (almost) no memory to training.

    Saves what `base` saves, except elementwise results and the activations that IA3 scales
    (`ACTIVATION_NAME`): the backward pass recomputes those from the saved matrix products, fused
    into the kernels that read them. A feedforward vector's input (Llama's ``down_proj`` input,
    batch x seq x intermediate per layer) is no longer kept; what IA3 could still add is its
    output-side activations (``k_proj`` / ``v_proj`` outputs), which the attention's own backward
    keeps anyway. Measured on the benchmarks' Llama ~1.1B (bf16, 8 x 1024, one H200): IA3's peak
    12.99 GiB without the policy, 10.27 GiB with it, equal to its floor's (the same model trained
    with no weight gradient) 10.27 GiB, for 1.027x the floor's step time (benchmarks/RESULTS.md).

    Use it on the blocks (the decoder layer) of your own model: ``nn.remat(Block, policy=...)`` in
    Linen, ``jax.checkpoint(fn, policy=...)`` around a function. Gradients are unchanged (the same
    arithmetic, recomputed).

    Args:
      base: the policy your model uses otherwise (any `jax.checkpoint_policies` entry or your own).
        None: save every result that is not elementwise (matrix products, attention, reductions), as
        a model without remat does, minus the float32 copies and elementwise intermediates that
        `jax.checkpoint` would otherwise keep at full size.

    Returns:
      ``policy(prim, *avals, **params) -> bool``, as `jax.checkpoint` expects.

    Example:
      >>> Block = nn.remat(DecoderLayer, policy=ia3_jax.remat_policy())
      >>> # or, around a function of arrays:
      >>> loss_fn = jax.checkpoint(loss_fn, policy=ia3_jax.remat_policy(jax.checkpoint_policies.dots_saveable))
    """
    base_policy = _save_non_elementwise if base is None else base

    def policy(prim: Any, *avals: Any, **params: Any) -> Any:
        if prim.name == "name":
            return params.get("name") != ACTIVATION_NAME and base is not None and base_policy(prim, *avals, **params)
        if prim.name in ELEMENTWISE:
            return False
        return base_policy(prim, *avals, **params)

    return policy
