"""bfloat16 / float16 bases with float32 vectors: the compute-dtype rule, forward, merge, unmerge, grads.

The rule (`ia3_jax.scale`): the product ``activation * vector`` is computed in
``promote_types(activation, vector)`` and cast back to the activation's dtype; merged kernels keep
their dtype. References: the same model in float32 (params upcast exactly) with the same vectors, and the
products ``(w.astype(float32) * l).astype(dtype)`` written out. Tolerances are relative norms at
about twice the error measured on CPU (jax 0.10.2), each measured value next to it in TOL.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import qwix

import ia3_jax

CONFIG = ia3_jax.IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"], init_ia3_weights=False)
LOW = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Relative-norm tolerances, about twice the measured error (bf16 / f16 measured):
TOL = {
    "forward": {"bfloat16": 1.1e-2, "float16": 1.5e-3},  # vs float32 reference: 5.3e-3 / 7.5e-4
    "merged": {"bfloat16": 1.3e-2, "float16": 1.6e-3},  # vs interceptor: 6.3e-3 / 8.0e-4; vs f32 merge: 5.1e-3 / 5.6e-4
    "grads": {"bfloat16": 1.2e-2, "float16": 2.0e-3},  # largest over the three vectors: 6.0e-3 / 9.9e-4
    "qwix": {"bfloat16": 1.2e-2},  # int8 kernel, bf16 scale: merged vs interceptor 6.1e-3
}
EPS = {"bfloat16": 2.0**-8, "float16": 2.0**-11}  # unit roundoff


class Block(nn.Module):
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.dtype)
        h = dense(24, name="k")(x)
        h = nn.gelu(dense(32, name="v")(h))
        return dense(16, name="wo")(h)


X = jax.random.normal(jax.random.key(1), (8, 16))


def rel(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@functools.cache
def setup(name: str):
    """(low model, low params with float32 vectors near 1, float32 model, the same params upcast)."""
    low = Block(LOW[name])
    params = low.init(jax.random.key(0), X.astype(LOW[name]))["params"]
    params = ia3_jax.ia3_init(params, CONFIG, rng=jax.random.key(3))
    adapter, base = ia3_jax.split(params)
    adapter = jax.tree.map(lambda v: 1 + 0.3 * v, adapter)
    upcast = jax.tree.map(lambda w: w.astype(jnp.float32), base)
    return low, ia3_jax.join(base, adapter), Block(jnp.float32), ia3_jax.join(upcast, adapter)


@pytest.mark.parametrize("name", list(LOW))
def test_vectors_are_float32_by_default(name):
    _, params, _, _ = setup(name)
    assert params["k"]["kernel"].dtype == LOW[name]
    assert {v.dtype for v in jax.tree.leaves(ia3_jax.split(params)[0])} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name", list(LOW))
def test_scale_computes_in_the_promoted_dtype_and_returns_the_activation_dtype(name):
    act = jax.random.normal(jax.random.key(4), (64, 24)).astype(LOW[name])
    vec = 1 + 0.3 * jax.random.normal(jax.random.key(5), (24,))
    out = ia3_jax.scale(act, vec)
    assert out.dtype == LOW[name]
    chex.assert_trees_all_equal(out, (act.astype(jnp.float32) * vec).astype(LOW[name]))
    # The rule matters: rounding the vector to the activation dtype first gives other numbers.
    assert bool(jnp.any(out != act * vec.astype(LOW[name])))
    # A low-precision vector on a float32 activation: float32 out.
    assert ia3_jax.scale(act.astype(jnp.float32), vec.astype(LOW[name])).dtype == jnp.float32


@pytest.mark.parametrize("name", list(LOW))
def test_forward_matches_the_float32_reference(name):
    low, params, ref, ref_params = setup(name)
    y = jax.jit(ia3_jax.apply_fn(low.apply, CONFIG))({"params": params}, X.astype(LOW[name]))
    y_ref = ia3_jax.apply_fn(ref.apply, CONFIG)({"params": ref_params}, X)
    assert y.dtype == LOW[name]
    assert rel(y, y_ref) < TOL["forward"][name]


@pytest.mark.parametrize("name", list(LOW))
def test_merge_keeps_the_dtype_and_matches_the_reference(name):
    low, params, ref, ref_params = setup(name)
    merged = ia3_jax.merge(params, CONFIG)
    for module in ("k", "v", "wo"):
        assert merged[module]["kernel"].dtype == LOW[name] and merged[module]["bias"].dtype == LOW[name]
    # k: output side, kernel (in, out) * l[out], computed in float32 and rounded once.
    k, l_k = params["k"]["kernel"], params["k"]["ia3_l"]
    chex.assert_trees_all_equal(merged["k"]["kernel"], (k.astype(jnp.float32) * l_k).astype(LOW[name]))
    wo, l_wo = params["wo"]["kernel"], params["wo"]["ia3_l"]
    chex.assert_trees_all_equal(merged["wo"]["kernel"], (wo.astype(jnp.float32) * l_wo[:, None]).astype(LOW[name]))
    x = X.astype(LOW[name])
    y_merged = low.apply({"params": merged}, x)
    assert y_merged.dtype == LOW[name]
    assert rel(y_merged, ia3_jax.apply_fn(low.apply, CONFIG)({"params": params}, x)) < TOL["merged"][name]
    assert rel(y_merged, ref.apply({"params": ia3_jax.merge(ref_params, CONFIG)}, X)) < TOL["merged"][name]


@pytest.mark.parametrize("name", list(LOW))
def test_unmerge_restores_the_kernels_within_two_roundings(name):
    _, params, _, _ = setup(name)
    adapter, base = ia3_jax.split(params)
    with pytest.warns(UserWarning, match="inaccurate"):
        restored = ia3_jax.unmerge(ia3_jax.merge(params, CONFIG), adapter, CONFIG)
    for module in ("k", "v", "wo"):
        for leaf in ("kernel", "bias"):
            got, want = restored[module][leaf], base[module][leaf]
            assert got.dtype == want.dtype
            err = jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))
            bound = 2 * EPS[name] * 1.01 * jnp.abs(want.astype(jnp.float32)) + 1e-7
            assert bool(jnp.all(err <= bound)), (module, leaf, float(jnp.max(err - bound)))


@pytest.mark.parametrize("name", list(LOW))
def test_gradients_are_float32_and_match_the_reference(name):
    low, params, ref, ref_params = setup(name)
    adapter, base = ia3_jax.split(params)
    _, ref_base = ia3_jax.split(ref_params)

    def loss(model, base, x, a):
        y = ia3_jax.apply_fn(model.apply, CONFIG)({"params": ia3_jax.join(base, a)}, x)
        return jnp.mean(y.astype(jnp.float32) ** 2)

    grads = jax.jit(jax.grad(functools.partial(loss, low, base, X.astype(LOW[name]))))(adapter)
    grads_ref = jax.grad(functools.partial(loss, ref, ref_base, X))(adapter)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, adapter)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        assert rel(g, g_ref) < TOL["grads"][name]


def test_a_float16_merge_that_overflows_is_caught_by_safe_merge():
    _, params, _, _ = setup("float16")
    big = {**params, "v": {**params["v"], "ia3_l": params["v"]["ia3_l"].at[0].set(1e6)}}
    assert not bool(jnp.isfinite(ia3_jax.merge(big, CONFIG)["v"]["kernel"]).all())
    with pytest.raises(ia3_jax.NonFiniteMergeError, match=r"merged 'v' kernel \(float16\)"):
        ia3_jax.merge(big, CONFIG, safe_merge=True)


@pytest.mark.parametrize("name", list(LOW))
def test_safe_merge_checks_the_bias_too_in_one_transfer(name, monkeypatch):
    """A bias near the dtype's maximum times l = 2 overflows while the kernel stays finite."""
    _, params, _, _ = setup(name)
    dtype = LOW[name]
    k = params["k"]
    bias = k["bias"].at[0].set(jnp.asarray(jnp.finfo(dtype).max / 1.5, dtype))  # a future jax refuses the implicit cast
    big = {**params, "k": {**k, "bias": bias, "ia3_l": k["ia3_l"].at[0].set(2.0)}}
    merged = ia3_jax.merge(big, CONFIG)
    assert bool(jnp.isfinite(merged["k"]["kernel"]).all()) and not bool(jnp.isfinite(merged["k"]["bias"]).all())
    transfers = []
    device_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: transfers.append(x) or device_get(x))
    with pytest.raises(ia3_jax.NonFiniteMergeError, match=rf"merged 'k' bias \({name}\):"):
        ia3_jax.merge(big, CONFIG, safe_merge=True)
    assert len(transfers) == 1  # one flag array for every written kernel and bias
    chex.assert_trees_all_equal(ia3_jax.merge(params, CONFIG, safe_merge=True), ia3_jax.merge(params, CONFIG))


def test_int8_base_with_bfloat16_scales_folds_in_float32():
    model = Block(jnp.bfloat16)
    x = X.astype(jnp.bfloat16)
    qmodel = qwix.quantize_model(model, qwix.PtqProvider([qwix.QuantizationRule(weight_qtype=jnp.int8)]))
    fp = model.init(jax.random.key(0), x)["params"]
    qparams = qwix.quantize_params(fp, jax.eval_shape(qmodel.init, jax.random.key(0), x)["params"])
    config = CONFIG.replace(feedforward_modules=[], target_modules=["k", "v"])
    params = ia3_jax.ia3_init(qparams, config, rng=jax.random.key(3))
    scale, vec = params["k"]["kernel"].array.scale, params["k"]["ia3_l"]
    assert scale.dtype == jnp.bfloat16 and vec.dtype == jnp.float32
    merged = ia3_jax.merge(params, config)
    folded = (scale.astype(jnp.float32) * vec).astype(jnp.bfloat16)
    chex.assert_trees_all_equal(merged["k"]["kernel"].array.scale, folded)
    y = ia3_jax.apply_fn(qmodel.apply, config)({"params": params}, x)
    assert y.dtype == jnp.bfloat16
    assert rel(qmodel.apply({"params": merged}, x), y) < TOL["qwix"]["bfloat16"]
