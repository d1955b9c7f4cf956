"""IA3's memory feature (`remat_policy`) and merge at the bandwidth floor (issue 13), on the CPU.

- `remat_policy`: gradients equal the plain IA3 gradients, and the feedforward input (the down_proj
  input ``silu(gate) * up``) is no longer among the residuals that the compiled forward pass hands
  to the backward pass (the outputs of a jitted ``jax.vjp``), while it is without the policy.
- `merge` called eagerly: untouched leaves are the input's own buffers, targeted kernels equal a
  hand computation, on unrolled and scanned layers, and on a repeated call (the cached plan).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ia3_jax
from benchmarks import llama

CONFIG = ia3_jax.IA3Config(
    target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
)
BATCH, SEQ = 2, 16


def _model(scan: bool, remat: bool) -> tuple[llama.Llama, dict, dict | None]:
    config = dataclasses.replace(llama.TINY_F32, scan=scan, remat=remat, remat_policy="ia3")
    model = llama.Llama(config)
    params = llama.init_params(model, jax.random.key(0))
    layouts = ia3_jax.infer_layouts(model.apply, {"params": params}, jnp.zeros((1, 8), jnp.int32)) if scan else None
    return model, params, layouts


def _ids() -> jax.Array:
    return jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, llama.TINY_F32.vocab_size)


def _random_adapter(adapter: dict, seed: int = 2) -> dict:
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([1 + 0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _loss_and_parts(scan: bool, remat: bool):
    model, params, layouts = _model(scan, remat)
    adapter, base = ia3_jax.split(ia3_jax.ia3_init(params, CONFIG, layouts=layouts))
    forward = ia3_jax.apply_fn(model.apply, CONFIG)

    def loss(adapter, base, ids):
        return llama.causal_lm_loss(forward({"params": ia3_jax.join(base, adapter)}, ids), ids)

    return loss, _random_adapter(adapter), base


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_remat_policy_gradients_exact(scan):
    ids = _ids()
    plain, adapter, base = _loss_and_parts(scan, remat=False)
    rematted, _, _ = _loss_and_parts(scan, remat=True)  # same init key: same base weights
    want = jax.jit(jax.value_and_grad(plain))(adapter, base, ids)
    got = jax.jit(jax.value_and_grad(rematted))(adapter, base, ids)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def _down_proj_inputs(params: dict, ids: jax.Array) -> list[np.ndarray]:
    """``silu(gate) * up`` of every layer (IA3 applied), by hand from the captured gate and up outputs."""
    model = llama.Llama(llama.TINY_F32)
    forward = ia3_jax.apply_fn(model.apply, CONFIG)
    _, state = forward({"params": params}, ids, capture_intermediates=True)
    layers = state["intermediates"]["layers"]
    mlps = [layers[str(i)]["mlp"] for i in range(llama.TINY_F32.num_layers)]
    return [np.asarray(nn.silu(m["gate_proj"]["__call__"][0]) * m["up_proj"]["__call__"][0]) for m in mlps]


def _residuals(loss, adapter, base, ids) -> list[np.ndarray]:
    """The arrays the compiled forward pass keeps for the backward pass: outputs of a jitted `jax.vjp`."""

    def forward(adapter, base):
        _, backward = jax.vjp(lambda a: loss(a, base, ids), adapter)
        return jax.tree.leaves(backward)  # a jax.tree_util.Partial: its leaves are the residuals

    compiled = jax.jit(forward).lower(adapter, base).compile()
    return [np.asarray(r) for r in compiled(adapter, base)]


def _holds(residuals: list[np.ndarray], value: np.ndarray) -> bool:
    return any(r.shape == value.shape and np.allclose(r, value, rtol=1e-4, atol=1e-4) for r in residuals)


def test_remat_policy_drops_the_feedforward_input_from_the_residuals():
    ids = _ids()
    plain, adapter, base = _loss_and_parts(scan=False, remat=False)
    rematted, _, _ = _loss_and_parts(scan=False, remat=True)
    hidden = _down_proj_inputs(ia3_jax.join(base, adapter), ids)
    kept = _residuals(plain, adapter, base, ids)
    assert all(_holds(kept, h) for h in hidden)  # without the policy: kept, one per layer
    recomputed = _residuals(rematted, adapter, base, ids)
    assert not any(_holds(recomputed, h) for h in hidden)
    big = BATCH * SEQ * llama.TINY_F32.intermediate_size
    assert sum(r.size for r in recomputed if r.size >= big) < sum(r.size for r in kept if r.size >= big)


def test_remat_policy_keeps_what_the_base_policy_saves():
    policy = ia3_jax.remat_policy(jax.checkpoint_policies.dots_saveable)
    dot = jax.lax.dot_general_p
    name = jax.make_jaxpr(lambda x: jax.ad_checkpoint.checkpoint_name(x, "mine"))(1.0).eqns[0].primitive
    assert policy(dot, dimension_numbers=(((1,), (0,)), ((), ())))
    assert not policy(jax.lax.mul_p)
    assert not policy(name, name=ia3_jax.ACTIVATION_NAME)
    assert not ia3_jax.remat_policy()(name, name="mine")  # default: names are transparent
    assert ia3_jax.remat_policy(jax.checkpoint_policies.save_only_these_names("mine"))(name, name="mine")


# ----------------------------------------------------------------------------------------------- merge


def _leaves(tree) -> dict:
    return dict(jax.tree_util.tree_flatten_with_path(tree)[0])


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_merge_shares_untouched_leaves_and_matches_hand(scan):
    _, params, layouts = _model(scan, remat=False)
    adapter, base = ia3_jax.split(ia3_jax.ia3_init(params, CONFIG, layouts=layouts))
    joined = ia3_jax.join(base, _random_adapter(adapter))
    for _ in range(2):  # the second call replays the cached plan
        merged = ia3_jax.merge(joined, CONFIG, layouts=layouts)
        inputs = _leaves(joined)
        shared = changed = 0
        for path, leaf in _leaves(merged).items():
            keys = tuple(k.key for k in path)
            module = functools.reduce(lambda t, k: t[k], keys[:-1], joined)
            if "ia3_l" not in module:
                assert leaf is inputs[path]  # the same array: no copy
                shared += 1
                continue
            vector, kernel = module["ia3_l"], module["kernel"]
            # hand: feedforward (down_proj) scales the kernel's input rows, k/v their output columns
            if keys[-2] == "down_proj":
                want = kernel * (vector[..., :, None])
            else:
                want = kernel * (vector[..., None, :])
            np.testing.assert_allclose(leaf, want, rtol=1e-6)
            changed += 1
        assert changed == (3 if scan else 3 * llama.TINY_F32.num_layers) and shared > changed
        assert not any("ia3_l" in str(p) for p in _leaves(merged))


def test_unmerge_shares_untouched_leaves_and_round_trips():
    _, params, _ = _model(scan=False, remat=False)
    adapter, base = ia3_jax.split(ia3_jax.ia3_init(params, CONFIG))
    adapter = _random_adapter(adapter)
    merged = ia3_jax.merge(ia3_jax.join(base, adapter), CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        restored = ia3_jax.unmerge(merged, adapter, CONFIG)
    m = _leaves(merged)
    for path, leaf in _leaves(restored).items():
        if "kernel" in str(path) and any(t in str(path) for t in ("k_proj", "v_proj", "down_proj")):
            np.testing.assert_allclose(leaf, _leaves(base)[path], rtol=1e-5)
        else:
            assert leaf is m[path]


def test_merge_in_place_when_donated():
    _, params, _ = _model(scan=False, remat=False)
    adapter, base = ia3_jax.split(ia3_jax.ia3_init(params, CONFIG))
    joined = jax.tree.map(jnp.copy, ia3_jax.join(base, _random_adapter(adapter)))
    want = ia3_jax.merge(jax.tree.map(jnp.copy, joined), CONFIG)  # eager merge shares leaves: not with `joined`
    pointers = {p: x.unsafe_buffer_pointer() for p, x in _leaves(joined).items()}
    merge = jax.jit(functools.partial(ia3_jax.merge, config=CONFIG), donate_argnums=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        merged = merge(joined)
    for path, leaf in _leaves(merged).items():
        assert leaf.unsafe_buffer_pointer() == pointers[path]  # every leaf, merged kernels included: in place
        np.testing.assert_allclose(leaf, _leaves(want)[path], rtol=1e-6)


def test_merge_of_a_tree_sharing_one_array_at_several_leaves():
    # One zeros bias object at two modules and one array at two untouched leaves, then a tree of the
    # same structure with distinct arrays: each merge must be right (a plan keyed by object identity
    # would read one shared position for both).
    config = ia3_jax.IA3Config(target_modules=["a", "b"], feedforward_modules=[])
    zeros, untouched = jnp.zeros(4), jnp.zeros(2)
    kernel = jnp.ones((3, 4))
    shared = {
        "a": {"kernel": kernel, "bias": zeros, "ia3_l": jnp.ones(4)},
        "b": {"kernel": kernel, "bias": zeros, "ia3_l": jnp.ones(4)},
        "n1": {"scale": untouched},
        "n2": {"scale": untouched},
    }
    ia3_jax.merge(shared, config)
    distinct = {
        "a": {"kernel": jnp.ones((3, 4)), "bias": jnp.full(4, 1.0), "ia3_l": jnp.full(4, 2.0)},
        "b": {"kernel": jnp.ones((3, 4)), "bias": jnp.full(4, 5.0), "ia3_l": jnp.full(4, 3.0)},
        "n1": {"scale": jnp.full(2, 7.0)},
        "n2": {"scale": jnp.full(2, 9.0)},
    }
    for _ in range(2):  # the second call replays whatever the first one planned
        merged = ia3_jax.merge(distinct, config)
        np.testing.assert_array_equal(merged["a"]["bias"], np.full(4, 2.0))  # (b * l) by hand
        np.testing.assert_array_equal(merged["b"]["bias"], np.full(4, 15.0))
        np.testing.assert_array_equal(merged["a"]["kernel"], np.full((3, 4), 2.0))
        np.testing.assert_array_equal(merged["n1"]["scale"], np.full(2, 7.0))
        np.testing.assert_array_equal(merged["n2"]["scale"], np.full(2, 9.0))
