"""split/join, merge/unmerge (safe paths included), weighted and product combinations.

References: numpy hand computations of ``(x @ W + b) * l`` and of the vector sums and products.
Training lives in test_training.py, bf16/f16 in test_mixed_precision.py. Tolerances: float32, 1e-5.
"""

import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ia3_jax
from ia3_jax import IA3Config
from tests import models

KEY = jax.random.key(0)
X = jax.random.normal(KEY, (8, 10))
CONFIG = IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"], modules_to_save=["lin2"])


def setup(config=CONFIG, dtype=jnp.float32, seed=1):
    model = models.MLP(dtype=dtype)
    params = models.init(model, X.astype(dtype))
    adapted = ia3_jax.ia3_init(params, config.replace(init_ia3_weights=False), rng=jax.random.key(seed))
    return model, params, adapted


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


def by_hand(params, x):
    """The MLP with IA3 in float64 numpy: lin0's output scaled (bias included), lin1's input scaled."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
    h = relu((np.asarray(x, np.float64) @ p["lin0"]["kernel"] + p["lin0"]["bias"]) * p["lin0"]["ia3_l"])
    h = relu((h * p["lin1"]["ia3_l"]) @ p["lin1"]["kernel"] + p["lin1"]["bias"])
    return h @ p["lin2"]["kernel"] + p["lin2"]["bias"]


def test_merge_equals_hand_computation_and_unmerge_restores():
    model, params, adapted = setup()
    config = CONFIG
    adapter, base = ia3_jax.split(adapted, config)
    joined = ia3_jax.join(base, adapter)
    merged = jax.jit(ia3_jax.merge, static_argnums=1)(joined, config)
    assert not ia3_jax.split(merged)[0]  # no ia3_l left
    expected = by_hand(joined, X)
    chex.assert_trees_all_close(model.apply({"params": merged}, X), expected, rtol=1e-5, atol=1e-6)
    intercepted = ia3_jax.apply_fn(model.apply, config)({"params": joined}, X)
    chex.assert_trees_all_close(intercepted, expected, rtol=1e-5, atol=1e-6)
    # The folded arrays themselves: W * l[None, :] and b * l for the output target, l[:, None] * W for the
    # feedforward one, whose bias is untouched.
    l0, l1 = np.asarray(adapter["lin0"]["ia3_l"]), np.asarray(adapter["lin1"]["ia3_l"])
    np.testing.assert_allclose(merged["lin0"]["kernel"], np.asarray(params["lin0"]["kernel"]) * l0, rtol=1e-6)
    np.testing.assert_allclose(merged["lin0"]["bias"], np.asarray(params["lin0"]["bias"]) * l0, rtol=1e-6)
    np.testing.assert_allclose(merged["lin1"]["kernel"], l1[:, None] * np.asarray(params["lin1"]["kernel"]), rtol=1e-6)
    chex.assert_trees_all_equal(merged["lin1"]["bias"], params["lin1"]["bias"])
    with pytest.warns(UserWarning, match="inaccurate"):
        restored = ia3_jax.unmerge(merged, adapter, config)
    chex.assert_trees_all_close(ia3_jax.split(restored)[1]["lin0"], params["lin0"], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(restored["lin1"], params["lin1"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ia3_jax.StructureError, match="'lin5'"):
        ia3_jax.unmerge(merged, {"lin5": {"ia3_l": jnp.ones(3)}}, config)
    with pytest.raises(ia3_jax.StructureError, match=r"second argument is of type IA3Config.*unmerge\(merged, adapter, config\)"):
        ia3_jax.unmerge(ia3_jax.join(merged, adapter), config)  # merge's call shape


def test_disabled_adapter_is_the_base_model():
    model, params, adapted = setup()
    _, base = ia3_jax.split(adapted, CONFIG)
    chex.assert_trees_all_equal(ia3_jax.apply_fn(model.apply, CONFIG)({"params": base}, X), model.apply({"params": params}, X))


def test_safe_merge_names_the_broken_module():
    _, _, adapted = setup()
    adapted["lin1"]["ia3_l"] = adapted["lin1"]["ia3_l"].at[3].set(jnp.nan)
    with pytest.raises(ia3_jax.NonFiniteMergeError, match=r"merged 'lin1' kernel \(float32\)"):
        ia3_jax.merge(adapted, CONFIG, safe_merge=True)
    adapted["lin1"]["ia3_l"] = adapted["lin1"]["ia3_l"].at[3].set(jnp.inf)
    with pytest.raises(ia3_jax.NonFiniteMergeError, match="'lin1'"):
        ia3_jax.merge(adapted, CONFIG, safe_merge=True)


def test_add_weighted_adapter_is_the_weighted_sum():
    config = CONFIG.replace(modules_to_save=None)
    _, _, a = setup(config, seed=1)
    _, _, b = setup(config, seed=2)
    (va, _), (vb, _) = ia3_jax.split(a), ia3_jax.split(b)
    mixed = ia3_jax.add_weighted_adapter([va, vb], [0.7, -0.3])
    for path in (("lin0", "ia3_l"), ("lin1", "ia3_l")):
        get = lambda t: t[path[0]][path[1]]  # noqa: E731
        chex.assert_trees_all_close(get(mixed), 0.7 * get(va) - 0.3 * get(vb), rtol=1e-6)
    with pytest.raises(ia3_jax.StructureError, match="2 adapters but 1 weights"):
        ia3_jax.add_weighted_adapter([va, vb], [1.0])
    with pytest.raises(ia3_jax.StructureError, match="at least one adapter"):
        ia3_jax.combine([])
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
    product = ia3_jax.combine([va, vb])
    for name in ("lin0", "lin1"):
        want = np.asarray(va[name]["ia3_l"]) * np.asarray(vb[name]["ia3_l"])
        np.testing.assert_allclose(product[name]["ia3_l"], want, rtol=1e-6)
    both = ia3_jax.merge(ia3_jax.join(params, product), config)
    sequential = ia3_jax.merge(ia3_jax.join(ia3_jax.merge(ia3_jax.join(params, va), config), vb), config)
    chex.assert_trees_all_close(both, sequential, rtol=1e-5, atol=1e-6)
    # Both adapters active at once, by hand: the forward rule multiplies the two vectors.
    expected = by_hand(ia3_jax.join(params, product), X)
    chex.assert_trees_all_close(model.apply({"params": both}, X), expected, rtol=1e-5, atol=1e-6)
    intercepted = ia3_jax.apply_fn(model.apply, config)({"params": ia3_jax.join(params, product)}, X)
    chex.assert_trees_all_close(intercepted, expected, rtol=1e-5, atol=1e-6)


def test_join_rejects_a_modules_to_save_copy_of_another_size():
    _, params, adapted = setup()
    adapter, base = ia3_jax.split(adapted, CONFIG)
    adapter["lin2"]["kernel"] = jnp.ones((5, 3))
    with pytest.raises(ia3_jax.StructureError, match=r"'lin2.kernel' has shape \(5, 3\) but the base has \(12, 3\)"):
        ia3_jax.join(base, adapter)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -np.inf, np.float32("nan")])
def test_add_weighted_adapter_refuses_non_finite_weights(bad):
    _, _, a = setup(CONFIG.replace(modules_to_save=None))
    va = ia3_jax.split(a).adapter
    with pytest.raises(ia3_jax.NonFiniteMergeError, match="weight 1 is"):
        ia3_jax.add_weighted_adapter([va, va], [0.5, bad])
    assert issubclass(ia3_jax.NonFiniteMergeError, ValueError)


def test_combinations_refuse_integer_vectors():
    _, _, a = setup(CONFIG.replace(modules_to_save=None))
    va = ia3_jax.split(a).adapter
    ints = jax.tree.map(lambda v: jnp.full(v.shape, 2, jnp.int32), va)
    with pytest.raises(ia3_jax.AdapterDtypeError, match=r"combine: adapter 1's vector at 'lin0' has dtype int32"):
        ia3_jax.combine([va, ints])
    with pytest.raises(ia3_jax.AdapterDtypeError, match="add_weighted_adapter: adapter 0's vector at 'lin0'"):
        ia3_jax.add_weighted_adapter([ints, ints], [1, 1])


def test_integer_kernels_are_refused_before_anything_is_computed():
    """[[1, 2, 3]] * [0.5, 1.5, 0.3] would truncate to [[0, 3, 0]]; safe_merge crashed on it."""
    params = {
        "a": {"kernel": jnp.ones((3, 3)), "ia3_l": jnp.full((3,), 0.5)},
        "b": {"kernel": jnp.array([[1, 2, 3]], jnp.int32), "ia3_l": jnp.array([0.5, 1.5, 0.3])},
    }
    config = IA3Config(target_modules=["a", "b"])
    for safe in (False, True):
        with pytest.raises(ia3_jax.UnsupportedKernelError, match=r"kernel at 'b' has dtype int32.*truncate"):
            ia3_jax.merge(params, config, safe_merge=safe)
    with pytest.raises(ia3_jax.UnsupportedKernelError, match="'b' has dtype int32"), pytest.warns(UserWarning):
        ia3_jax.unmerge(ia3_jax.split(params).base, ia3_jax.split(params).adapter, config)


def test_non_string_keys_are_refused_naming_the_key():
    params = {"layers": {0: {"fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}}}
    config = IA3Config(target_modules=["fc"])
    with pytest.raises(ia3_jax.StructureError, match=r"key 0 \(int\) under 'layers'.*'0'"):
        ia3_jax.ia3_init(params, config)
    vectors = {"layers": {0: {"fc": {"ia3_l": jnp.ones(3), "kernel": jnp.ones((2, 3))}}}}
    for op in (ia3_jax.merge, ia3_jax.split):
        with pytest.raises(ia3_jax.StructureError, match="key 0"):
            op(vectors)
    # With Flax's own string keys the same tree works.
    named = ia3_jax.ia3_init({"layers": {"0": params["layers"][0]}}, config)
    assert named["layers"]["0"]["fc"]["ia3_l"].shape == (3,)


def test_unmerge_names_vectors_near_zero_and_safe_unmerge_raises():
    config = CONFIG.replace(modules_to_save=None)
    _, params, adapted = setup(config)
    adapter, _ = ia3_jax.split(adapted)
    # l = -1e-8 makes w / (l + 1e-8) a division by zero; 3e-9 only loses the kernel (w * 0.23).
    adapter["lin0"]["ia3_l"] = adapter["lin0"]["ia3_l"].at[2].set(-1e-8)
    adapter["lin1"]["ia3_l"] = adapter["lin1"]["ia3_l"].at[5].set(3e-9)
    merged = ia3_jax.merge(ia3_jax.join(params, adapter), config)
    named = r"inaccurate.*near 0.*'lin0' \(smallest \|l\| 1e-08\), 'lin1' \(smallest \|l\| 3e-09\)"
    with pytest.warns(UserWarning, match=named):
        restored = ia3_jax.unmerge(merged, adapter, config)
    assert not np.isfinite(np.asarray(restored["lin0"]["kernel"])).all()
    with pytest.raises(ia3_jax.NonFiniteMergeError, match=r"near 0.*'lin0' \(smallest \|l\| 1e-08\), 'lin1'"):
        ia3_jax.unmerge(merged, adapter, config, safe_unmerge=True)
    # A NaN entry is not "near 0" but gives NaN arrays: the check of what the division wrote catches it.
    adapter["lin0"]["ia3_l"] = adapter["lin0"]["ia3_l"].at[2].set(jnp.nan)
    adapter["lin1"]["ia3_l"] = adapter["lin1"]["ia3_l"].at[5].set(1.0)
    with pytest.warns(UserWarning), pytest.raises(
        ia3_jax.NonFiniteMergeError, match=r"NaN or inf in the unmerged 'lin0' kernel \(float32\), 'lin0' bias"
    ):
        ia3_jax.unmerge(merged, adapter, config, safe_unmerge=True)
    # A healthy adapter: the generic warning only, and the safe path returns the same tree.
    healthy, _ = ia3_jax.split(adapted)
    merged = ia3_jax.merge(adapted, config)
    with pytest.warns(UserWarning, match=r"inaccurate for \(IA\)\^3\.$"):
        safe = ia3_jax.unmerge(merged, healthy, config, safe_unmerge=True)
    with pytest.warns(UserWarning):
        chex.assert_trees_all_equal(safe, ia3_jax.unmerge(merged, healthy, config))


def test_eager_merge_replays_no_stale_plan_for_a_tree_of_the_same_structure():
    """Eager merge caches a plan per tree structure; new values, shapes or dtypes under it are not served stale.

    Without a config the vector's shape picks the side: (4,) scales kernel (3, 4)'s outputs and the
    bias, (3,) scales kernel (3, 5)'s inputs and leaves the bias alone (the very same array).
    """
    def tree(kernel, bias, vector):
        return {"block": {"fc": {"kernel": kernel, "bias": bias, "ia3_l": vector}}}

    def merged_fc(params):
        return ia3_jax.merge(params)["block"]["fc"]

    rng = np.random.default_rng(0)
    w, b, l = rng.normal(size=(3, 4)), rng.normal(size=4), rng.normal(size=4)
    for _ in range(3):  # the first call makes the plan, later ones replay it with other values
        w, b, l = w + 1.0, b - 1.0, l * 2.0
        fc = merged_fc(tree(jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32), jnp.asarray(l, jnp.float32)))
        np.testing.assert_allclose(fc["kernel"], w * l, rtol=1e-6)
        np.testing.assert_allclose(fc["bias"], b * l, rtol=1e-6)
    # Same structure, other shapes: the input side now, and the bias is not touched.
    w, b, l = rng.normal(size=(3, 5)), jnp.asarray(rng.normal(size=5), jnp.float32), rng.normal(size=3)
    fc = merged_fc(tree(jnp.asarray(w, jnp.float32), b, jnp.asarray(l, jnp.float32)))
    np.testing.assert_allclose(fc["kernel"], w * l[:, None], rtol=1e-6)
    assert fc["bias"] is b
    # Same structure and shapes, other dtypes: float16 kernel (cast back), then the typed errors.
    w16 = jnp.asarray(w, jnp.float16)
    fc = merged_fc(tree(w16, b, jnp.asarray(l, jnp.float32)))
    assert fc["kernel"].dtype == jnp.float16
    np.testing.assert_array_equal(fc["kernel"], (w16.astype(jnp.float32) * l[:, None]).astype(jnp.float16))
    with pytest.raises(ia3_jax.UnsupportedKernelError, match="'block.fc' has dtype int32"):
        merged_fc(tree(jnp.ones((3, 5), jnp.int32), b, jnp.asarray(l, jnp.float32)))
    with pytest.raises(ia3_jax.AdapterDtypeError, match="'block.fc'"):
        merged_fc(tree(jnp.ones((3, 5)), b, jnp.ones(3, jnp.int32)))
    # Leaves jit cannot take get the typed error of a first merge, not jit's TypeError.
    merged_fc(tree(jnp.ones((3, 5)), b, jnp.ones(3)))
    with pytest.raises(ia3_jax.UnsupportedKernelError, match="'block.fc' has dtype object"):
        merged_fc(tree(np.ones((3, 5), dtype=object), b, jnp.ones(3)))


def test_eager_merges_from_several_threads():
    """Threads merging trees of one structure and different widths keep finding each other's cached plan
    stale and dropping it: every merge is right and none fails on the shared cache (without its lock, some
    of these 600 merges raised KeyError in 4 of 4 runs)."""
    def tree(n):  # distinct arrays at every leaf: a tree whose leaves share one array gets no plan
        fc = lambda: {"kernel": jnp.ones((3, n)), "bias": jnp.ones(n), "ia3_l": jnp.full(n, 2.0)}  # noqa: E731
        return {"block": {f"fc{i}": fc() for i in range(20)}}

    errors: list[BaseException] = []

    def work(params):
        try:
            for _ in range(60):
                kernel = ia3_jax.merge(params)["block"]["fc0"]["kernel"]
                np.testing.assert_array_equal(kernel, np.full(kernel.shape, 2.0))
        except BaseException as error:  # noqa: BLE001 - reported below, with the others
            errors.append(error)

    threads = [threading.Thread(target=work, args=(tree(n),)) for n in range(4, 14)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
