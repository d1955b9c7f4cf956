"""split/join, gradients, merge/unmerge, weighted and product combinations."""

import re

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import ia3_jax
from ia3_jax import IA3Config
from tests import models

KEY = jax.random.key(0)
X = jax.random.normal(KEY, (8, 10))
Y = jnp.arange(8) % 3
CONFIG = IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"], modules_to_save=["lin2"])


def setup(config=CONFIG, dtype=jnp.float32, seed=1):
    model = models.MLP(dtype=dtype)
    params = models.init(model, X.astype(dtype))
    adapted = ia3_jax.ia3_init(params, config.replace(init_ia3_weights=False), rng=jax.random.key(seed))
    return model, params, adapted


def loss_fn(model, config, base):
    forward = ia3_jax.apply_fn(model.apply, config)

    def loss(adapter):
        logits = forward({"params": ia3_jax.join(base, adapter)}, X)
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), Y).mean()

    return loss


def test_split_join_with_modules_to_save():
    _, params, adapted = setup()
    adapter, base = ia3_jax.split(adapted, CONFIG)
    assert set(adapter) == {"lin0", "lin1", "lin2"}
    assert set(adapter["lin0"]) == {"ia3_l"} and set(adapter["lin2"]) == {"kernel", "bias"}
    chex.assert_trees_all_equal(base, params)
    chex.assert_trees_all_equal(ia3_jax.join(base, adapter), adapted)
    # The adapter's modules_to_save copy overrides the base in join.
    trained = jax.tree.map(lambda v: v + 1.0, adapter)
    joined = ia3_jax.join(base, trained)
    chex.assert_trees_all_equal(joined["lin2"]["kernel"], params["lin2"]["kernel"] + 1.0)
    chex.assert_trees_all_equal(joined["lin0"]["kernel"], params["lin0"]["kernel"])
    with pytest.raises(ia3_jax.StructureError, match="'lin9'"):
        ia3_jax.join(base, {"lin9": {"ia3_l": jnp.ones(3)}})


def test_gradients_only_on_adapter_and_sgd_changes_only_it():
    model, params, adapted = setup()
    adapter, base = ia3_jax.split(adapted, CONFIG)
    loss = loss_fn(model, CONFIG, base)
    grads = jax.jit(jax.grad(loss))(adapter)
    for leaf in jax.tree.leaves(grads):
        assert float(jnp.abs(leaf).max()) > 0

    opt = optax.sgd(0.1)
    state = opt.init(adapter)

    @jax.jit
    def step(adapter, state, base):
        value, g = jax.value_and_grad(loss_fn(model, CONFIG, base))(adapter)
        updates, state = opt.update(g, state)
        return optax.apply_updates(adapter, updates), state, value

    losses = []
    trained = adapter
    for _ in range(3):
        trained, state, value = step(trained, state, base)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    chex.assert_trees_all_equal(base, params)  # the frozen base, bit for bit
    new_params = ia3_jax.join(base, trained)
    for name in ("lin0", "lin1"):
        chex.assert_trees_all_equal(ia3_jax.split(new_params)[1][name], params[name])
    for old, new in zip(jax.tree.leaves(adapter), jax.tree.leaves(trained)):  # every trainable leaf moved
        assert not bool(jnp.array_equal(old, new))


def _dot_count(fn, *args) -> int:
    hlo = jax.jit(fn).lower(*args).as_text()
    return len(re.findall(r"stablehlo\.dot_general", hlo))


def test_ia3_gradient_computes_no_weight_gradients():
    """Structural: the IA3 gradient has no more matrix products than a frozen model's input-side gradient."""
    config = CONFIG.replace(modules_to_save=None)
    model, params, adapted = setup(config)
    adapter, base = ia3_jax.split(adapted)
    ia3_dots = _dot_count(jax.grad(loss_fn(model, config, base)), adapter)

    def floor(bias):  # gradient w.r.t. the first layer's bias forces the whole activation backward pass
        p = {**params, "lin0": {**params["lin0"], "bias": bias}}
        logits = model.apply({"params": p}, X)
        return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()

    floor_dots = _dot_count(jax.grad(floor), params["lin0"]["bias"])
    full_dots = _dot_count(jax.grad(lambda p: loss_fn(model, config, p)({})), adapted)
    assert ia3_dots <= floor_dots < full_dots, (ia3_dots, floor_dots, full_dots)


def test_merge_equals_interceptor_and_unmerge_restores():
    model, params, adapted = setup()
    config = CONFIG
    adapter, base = ia3_jax.split(adapted, config)
    joined = ia3_jax.join(base, adapter)
    merged = jax.jit(ia3_jax.merge, static_argnums=1)(joined, config)
    assert not ia3_jax.split(merged)[0]  # no ia3_l left
    chex.assert_trees_all_close(
        model.apply({"params": merged}, X), ia3_jax.apply_fn(model.apply, config)({"params": joined}, X), rtol=1e-5, atol=1e-6
    )
    # Bias of an output target is scaled; of a feedforward target it is not.
    chex.assert_trees_all_close(merged["lin0"]["bias"], params["lin0"]["bias"] * adapter["lin0"]["ia3_l"], rtol=1e-6)
    chex.assert_trees_all_equal(merged["lin1"]["bias"], params["lin1"]["bias"])
    with pytest.warns(UserWarning, match="inaccurate"):
        restored = ia3_jax.unmerge(merged, adapter, config)
    chex.assert_trees_all_close(ia3_jax.split(restored)[1]["lin0"], params["lin0"], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(restored["lin1"], params["lin1"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ia3_jax.StructureError, match="'lin5'"):
        ia3_jax.unmerge(merged, {"lin5": {"ia3_l": jnp.ones(3)}}, config)


def test_disabled_adapter_is_the_base_model():
    model, params, adapted = setup()
    _, base = ia3_jax.split(adapted, CONFIG)
    chex.assert_trees_all_equal(ia3_jax.apply_fn(model.apply, CONFIG)({"params": base}, X), model.apply({"params": params}, X))


def test_safe_merge_names_the_broken_module():
    _, _, adapted = setup()
    adapted["lin1"]["ia3_l"] = adapted["lin1"]["ia3_l"].at[3].set(jnp.nan)
    with pytest.raises(ia3_jax.NonFiniteMergeError, match="'lin1'"):
        ia3_jax.merge(adapted, CONFIG, safe_merge=True)
    adapted["lin1"]["ia3_l"] = adapted["lin1"]["ia3_l"].at[3].set(jnp.inf)
    with pytest.raises(ia3_jax.NonFiniteMergeError, match="'lin1'"):
        ia3_jax.merge(adapted, CONFIG, safe_merge=True)


@pytest.mark.parametrize("dtype, rtol", [(jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)])
def test_low_precision_bases(dtype, rtol):
    model, params, adapted = setup(dtype=dtype)
    assert adapted["lin0"]["ia3_l"].dtype == jnp.float32
    x = X.astype(dtype)
    got = ia3_jax.apply_fn(model.apply, CONFIG)({"params": adapted}, x)
    assert got.dtype == dtype
    merged = ia3_jax.merge(adapted, CONFIG)
    assert merged["lin0"]["kernel"].dtype == dtype and merged["lin0"]["bias"].dtype == dtype
    chex.assert_trees_all_close(model.apply({"params": merged}, x).astype(jnp.float32), got.astype(jnp.float32), rtol=rtol, atol=rtol)
    # float32 reference of the same computation.
    ref_model = models.MLP()
    ref = ia3_jax.apply_fn(ref_model.apply, CONFIG)({"params": jax.tree.map(lambda v: v.astype(jnp.float32), adapted)}, X)
    chex.assert_trees_all_close(got.astype(jnp.float32), ref, rtol=rtol, atol=rtol)  # measured: 2.8e-3 bf16, 5.4e-4 f16
    adapter, _ = ia3_jax.split(adapted, CONFIG)
    with pytest.warns(UserWarning):
        restored = ia3_jax.unmerge(merged, adapter, CONFIG)
    assert restored["lin0"]["kernel"].dtype == dtype
    chex.assert_trees_all_close(
        restored["lin0"]["kernel"].astype(jnp.float32), params["lin0"]["kernel"].astype(jnp.float32), rtol=2 * rtol, atol=rtol
    )


def test_add_weighted_adapter_is_the_weighted_sum():
    config = CONFIG.replace(modules_to_save=None)
    _, _, a = setup(config, seed=1)
    _, _, b = setup(config, seed=2)
    (va, _), (vb, _) = ia3_jax.split(a), ia3_jax.split(b)
    mixed = ia3_jax.add_weighted_adapter([va, vb], [0.7, -0.3])
    for path in (("lin0", "ia3_l"), ("lin1", "ia3_l")):
        get = lambda t: t[path[0]][path[1]]  # noqa: E731
        chex.assert_trees_all_close(get(mixed), 0.7 * get(va) - 0.3 * get(vb), rtol=1e-6)
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        ia3_jax.add_weighted_adapter([va, vb], [1.0])
    with pytest.raises(ia3_jax.StructureError, match="'lin1'"):
        ia3_jax.add_weighted_adapter([va, {"lin0": va["lin0"]}], [0.5, 0.5])
    with pytest.raises(ia3_jax.StructureError, match="shape"):
        ia3_jax.combine([va, {**va, "lin0": {"ia3_l": jnp.ones(3)}}])


def test_modules_to_save_in_several_adapters_cannot_be_combined():
    _, _, a = setup(seed=1)
    _, _, b = setup(seed=2)
    va, vb = ia3_jax.split(a, CONFIG)[0], ia3_jax.split(b, CONFIG)[0]
    with pytest.raises(ia3_jax.StructureError, match="modules_to_save"):
        ia3_jax.add_weighted_adapter([va, vb], [0.5, 0.5])


def test_combine_is_merging_one_after_the_other():
    config = CONFIG.replace(modules_to_save=None)
    model, params, a = setup(config, seed=1)
    _, _, b = setup(config, seed=2)
    va, vb = ia3_jax.split(a)[0], ia3_jax.split(b)[0]
    both = ia3_jax.merge(ia3_jax.join(params, ia3_jax.combine([va, vb])), config)
    sequential = ia3_jax.merge(ia3_jax.join(ia3_jax.merge(ia3_jax.join(params, va), config), vb), config)
    chex.assert_trees_all_close(both, sequential, rtol=1e-5, atol=1e-6)
    # and the interceptor with the combined adapter gives the same function.
    chex.assert_trees_all_close(
        ia3_jax.apply_fn(model.apply, config)({"params": ia3_jax.join(params, ia3_jax.combine([va, vb]))}, X),
        model.apply({"params": both}, X),
        rtol=1e-5,
        atol=1e-6,
    )


def test_join_rejects_a_modules_to_save_copy_of_another_size():
    _, params, adapted = setup()
    adapter, base = ia3_jax.split(adapted, CONFIG)
    adapter["lin2"]["kernel"] = jnp.ones((5, 3))
    with pytest.raises(ia3_jax.StructureError, match=r"'lin2.kernel' has shape \(5, 3\) but the base has \(12, 3\)"):
        ia3_jax.join(base, adapter)
