"""ia3_init shapes and the interceptor, checked against hand computations and the merged model.

Tolerances: dense layers 1e-5 (float32, PEFT uses 1e-4); convs 1e-4 (their reductions reorder).
"""

import functools
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ia3_jax
from ia3_jax import IA3Config
from tests import models

KEY = jax.random.key(0)


def random_adapter(params, config, seed=1):
    return ia3_jax.ia3_init(params, config.replace(init_ia3_weights=False), rng=jax.random.key(seed))


def test_dense_shapes_and_hand_computation():
    x = jax.random.normal(KEY, (4, 10))
    model = models.MLP()
    params = models.init(model, x)
    config = IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])
    adapted = random_adapter(params, config)
    l0, l1 = adapted["lin0"]["ia3_l"], adapted["lin1"]["ia3_l"]
    chex.assert_shape([l0, l1], [(20,), (20,)])  # lin0: output (20); lin1: input (20), not output (12)
    assert "ia3_l" not in adapted["lin2"]
    chex.assert_trees_all_equal(ia3_jax.split(adapted)[1], params)  # nothing else changed

    p = params
    h = nn.relu((x @ p["lin0"]["kernel"] + p["lin0"]["bias"]) * l0)
    h = nn.relu((h * l1) @ p["lin1"]["kernel"] + p["lin1"]["bias"])
    expected = h @ p["lin2"]["kernel"] + p["lin2"]["bias"]

    got = jax.jit(ia3_jax.apply_fn(model.apply, config))({"params": adapted}, x)
    merged = model.apply({"params": ia3_jax.merge(adapted, config)}, x)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(merged, expected, rtol=1e-5, atol=1e-6)
    # Without a config the direction is read off the shapes (no layer here is square).
    chex.assert_trees_all_close(ia3_jax.apply_fn(model.apply)({"params": adapted}, x), expected, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(model.apply({"params": ia3_jax.merge(adapted)}, x), expected, rtol=1e-5, atol=1e-6)


def test_ones_are_identity_and_dtype_is_float32():
    x = jnp.ones((2, 10), jnp.bfloat16)
    model = models.MLP(dtype=jnp.bfloat16)
    params = models.init(model, x)
    config = IA3Config(target_modules=["lin0", "lin1", "lin2"], feedforward_modules=["lin2"])
    adapted = ia3_jax.ia3_init(params, config)
    for name in ("lin0", "lin1", "lin2"):
        assert adapted[name]["ia3_l"].dtype == jnp.float32
        chex.assert_trees_all_equal(adapted[name]["ia3_l"], jnp.ones_like(adapted[name]["ia3_l"]))
    chex.assert_trees_all_equal(
        ia3_jax.apply_fn(model.apply, config)({"params": adapted}, x), model.apply({"params": params}, x)
    )
    assert ia3_jax.ia3_init(params, config, dtype=jnp.bfloat16)["lin0"]["ia3_l"].dtype == jnp.bfloat16


def test_fan_in_fan_out_kernels():
    x = jax.random.normal(KEY, (3, 8))
    model = models.GPT2StyleMLP()
    params = models.init(model, x)
    config = IA3Config(target_modules=["c_fc", "c_proj"], feedforward_modules=["c_proj"], fan_in_fan_out=True)
    adapted = random_adapter(params, config)
    chex.assert_shape([adapted["c_fc"]["ia3_l"], adapted["c_proj"]["ia3_l"]], [(24,), (24,)])
    p, l_fc, l_proj = params, adapted["c_fc"]["ia3_l"], adapted["c_proj"]["ia3_l"]
    h = nn.gelu((x @ p["c_fc"]["kernel"].T + p["c_fc"]["bias"]) * l_fc)
    expected = (h * l_proj) @ p["c_proj"]["kernel"].T + p["c_proj"]["bias"]
    got = ia3_jax.apply_fn(model.apply, config)({"params": adapted}, x)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(model.apply({"params": ia3_jax.merge(adapted, config)}, x), expected, rtol=1e-5, atol=1e-6)
    # Without a config the shapes decide each side, the (out, in) kernels read as such.
    chex.assert_trees_all_close(ia3_jax.apply_fn(model.apply)({"params": adapted}, x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize("feedforward", [[], ["conv1", "conv2"]])
def test_convs_interceptor_equals_merged(spatial, feedforward):
    x = jax.random.normal(KEY, (1,) + (4,) * spatial + (4,))
    model = models.ConvNet(spatial=spatial)
    params = models.init_from_numpy(model, x)  # and jitted below: eager 3-D convs compile op by op
    config = IA3Config(target_modules=["conv0", "conv1", "conv2"], feedforward_modules=feedforward)
    layouts = ia3_jax.infer_layouts(model.apply, {"params": params}, x)
    assert layouts["conv1"].in_features == 8  # grouped: the kernel holds 8 / 4 input channels
    adapted = ia3_jax.ia3_init(params, config.replace(init_ia3_weights=False), rng=KEY, layouts=layouts)
    expected_sizes = {"conv0": 8, "conv1": 8 if feedforward else 12, "conv2": 12 if feedforward else 6}
    for name, size in expected_sizes.items():
        chex.assert_shape(adapted[name]["ia3_l"], (size,))
    got = jax.jit(ia3_jax.apply_fn(model.apply, config))({"params": adapted}, x)
    merge = jax.jit(functools.partial(ia3_jax.merge, config=config, layouts=layouts))
    merged = jax.jit(model.apply)({"params": merge(adapted)}, x)
    # By hand with lax convolutions: output vectors scale conv(h) + b, input vectors scale h.
    spatial_dims = "DHW"[3 - spatial :]
    numbers = ("N" + spatial_dims + "C", spatial_dims + "IO", "N" + spatial_dims + "C")

    def conv(h, p, name, groups=1):
        vector = p[name]["ia3_l"]
        if name in feedforward:
            h = h * vector
        y = jax.lax.conv_general_dilated(
            h, p[name]["kernel"], (1,) * spatial, "SAME", dimension_numbers=numbers, feature_group_count=groups
        ) + p[name]["bias"]
        return y if name in feedforward else y * vector

    @jax.jit
    def by_hand(p, x):
        h = conv(nn.relu(conv(nn.relu(conv(x, p, "conv0")), p, "conv1", groups=4)), p, "conv2")
        return h.reshape(1, -1) @ p["head"]["kernel"] + p["head"]["bias"]

    expected = by_hand(adapted, x)
    chex.assert_trees_all_close(got, expected, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(merged, expected, rtol=1e-4, atol=1e-5)
    # Without a config the shapes decide each side (no conv here has as many input as output channels).
    config_free = jax.jit(ia3_jax.apply_fn(model.apply))({"params": adapted}, x)
    chex.assert_trees_all_close(config_free, expected, rtol=1e-4, atol=1e-5)


def test_grouped_conv_feedforward_merge_by_hand():
    """PEFT #3511's case: Conv(4 -> 6, groups=2), input vector [0.5, 1, 1.5, 2]."""
    conv = nn.Conv(6, (3, 3), feature_group_count=2, name="c")
    x = jax.random.normal(KEY, (1, 5, 5, 4))
    params = conv.init(KEY, x)["params"]
    vector = jnp.array([0.5, 1.0, 1.5, 2.0])
    adapted = {"ia3_l": vector, **params}
    layout = ia3_jax.KernelLayout(in_axes=(2,), out_axes=(3,), in_features=4)
    merged = ia3_jax.merge({"c": adapted}, IA3Config(target_modules=["c"], feedforward_modules=["c"]), layouts={"c": layout})
    chex.assert_trees_all_close(conv.apply({"params": merged["c"]}, x), conv.apply({"params": params}, x * vector), rtol=1e-5)


def test_dense_general_multi_axis():
    x = jax.random.normal(KEY, (2, 5, 8))
    model = models.Attention()
    params = models.init(model, x)
    config = IA3Config(target_modules=["k", "v", "o"], feedforward_modules=["o"])
    layouts = ia3_jax.infer_layouts(model.apply, {"params": params}, x)
    adapted = ia3_jax.ia3_init(params, config.replace(init_ia3_weights=False), rng=KEY, layouts=layouts)
    chex.assert_shape([adapted["k"]["ia3_l"], adapted["o"]["ia3_l"]], [(2, 4), (2, 4)])
    got = ia3_jax.apply_fn(model.apply, config)({"params": adapted}, x)
    merged = model.apply({"params": ia3_jax.merge(adapted, config, layouts=layouts)}, x)
    chex.assert_trees_all_close(got, merged, rtol=1e-5, atol=1e-6)
    # By hand: k and v outputs scaled per (head, dim); o's input scaled per (head, dim).
    p = params
    proj = lambda name, l: jnp.einsum("bsd,dhe->bshe", x, p[name]["kernel"]) * l + p[name]["bias"] * l  # noqa: E731
    q = jnp.einsum("bsd,dhe->bshe", x, p["q"]["kernel"]) + p["q"]["bias"]
    k, v = proj("k", adapted["k"]["ia3_l"]), proj("v", adapted["v"]["ia3_l"])
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0)
    o = jnp.einsum("bhqk,bkhd->bqhd", w, v) * adapted["o"]["ia3_l"]
    expected = jnp.einsum("bqhd,hde->bqe", o, p["o"]["kernel"]) + p["o"]["bias"]
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
    # Without a config: k, v's (2, 4) vectors fit their outputs, o's its (heads, head_dim) input.
    chex.assert_trees_all_close(ia3_jax.apply_fn(model.apply)({"params": adapted}, x), expected, rtol=1e-5, atol=1e-6)


def test_jit_grad_vmap_remat_compose():
    x = jax.random.normal(KEY, (4, 10))
    model = models.MLP()
    params = models.init(model, x)
    config = IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])
    adapter, base = ia3_jax.split(random_adapter(params, config))
    forward = ia3_jax.apply_fn(model.apply, config)

    # vmap over a batch of adapters: one model, several tasks at once.
    adapters = jax.tree.map(lambda v: jnp.stack([v, 2 * v]), adapter)
    outs = jax.jit(jax.vmap(lambda a: forward({"params": ia3_jax.join(base, a)}, x)))(adapters)
    for i, a in enumerate([adapter, jax.tree.map(lambda v: 2 * v, adapter)]):
        chex.assert_trees_all_close(outs[i], model.apply({"params": ia3_jax.merge(ia3_jax.join(base, a), config)}, x), rtol=1e-5)

    # remat: the same module under nn.remat gives the same values and gradients.
    remat_model = nn.remat(models.MLP)()
    loss = lambda m: lambda a: forward_of(m)({"params": ia3_jax.join(base, a)}, x).sum()  # noqa: E731
    forward_of = lambda m: ia3_jax.apply_fn(m.apply, config)  # noqa: E731
    g_plain = jax.jit(jax.grad(loss(model)))(adapter)
    g_remat = jax.jit(jax.grad(loss(remat_model)))(adapter)
    chex.assert_trees_all_close(g_plain, g_remat, rtol=1e-5)
    # and against the gradient taken through the merged kernels (another computation of the same function).
    merged_loss = lambda a: model.apply({"params": ia3_jax.merge(ia3_jax.join(base, a), config)}, x).sum()  # noqa: E731
    chex.assert_trees_all_close(g_plain, jax.grad(merged_loss)(adapter), rtol=1e-5, atol=1e-6)


def test_vector_never_applied_is_an_error():
    class TwoStage(nn.Module):
        @nn.compact
        def __call__(self, x, first: bool = True):
            h = nn.Dense(6, name="encoder")(x) if first else x
            return nn.Dense(2, name="decoder")(h)

    model = TwoStage()
    params = model.init(KEY, jnp.ones((1, 4)))["params"]
    config = IA3Config(target_modules=["encoder", "decoder"])
    adapted = ia3_jax.ia3_init(params, config)
    decode_only = ia3_jax.apply_fn(lambda v, h: model.apply(v, h, first=False), config)
    with pytest.raises(ia3_jax.NotAppliedError, match="encoder"):
        decode_only({"params": adapted}, jnp.ones((1, 6)))
    relaxed = ia3_jax.apply_fn(lambda v, h: model.apply(v, h, first=False), config, strict=False)
    chex.assert_trees_all_close(relaxed({"params": adapted}, jnp.ones((1, 6))), model.apply({"params": params}, jnp.ones((1, 6)), first=False))


def test_intercept_warns_when_a_jitted_function_was_traced_outside():
    x = jnp.ones((2, 10))
    model = models.MLP()
    params = models.init(model, x)
    config = IA3Config(target_modules=["lin0"], init_ia3_weights=False)
    adapted = ia3_jax.ia3_init(params, config, rng=KEY)
    forward = jax.jit(model.apply)
    plain = forward({"params": adapted}, x)  # traced without the interceptor: the vector is ignored
    with pytest.warns(UserWarning, match="no IA3 vector was applied"), ia3_jax.intercept(config):
        stale = forward({"params": adapted}, x)
    chex.assert_trees_all_equal(stale, plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ia3_jax.intercept(config) as applied:
            model.apply({"params": adapted}, x)
    assert applied.paths == {("lin0",)}


def test_vector_that_does_not_fit_is_reported():
    x = jnp.ones((2, 10))
    model = models.MLP()
    params = models.init(model, x)
    config = IA3Config(target_modules=["lin0"])
    adapted = ia3_jax.ia3_init(params, config)
    adapted["lin0"]["ia3_l"] = jnp.ones((7,))
    with pytest.raises(ia3_jax.VectorShapeError, match=r"'lin0'.*\(7,\).*\(2, 20\)"):
        ia3_jax.apply_fn(model.apply, config)({"params": adapted}, x)
    # The same error type and facts from merge: one check, in the per-target record.
    with pytest.raises(ia3_jax.VectorShapeError, match=r"'lin0'.*\(7,\).*\(10, 20\) needs \(20,\)"):
        ia3_jax.merge(adapted, config)


@pytest.mark.parametrize(
    "layer, x", [(nn.Dense(6, name="sq"), jnp.ones((2, 6))), (nn.Conv(6, (3, 3), name="sq"), jnp.ones((1, 4, 4, 6)))]
)
def test_square_layer_without_config_is_ambiguous(layer, x):
    params = {"sq": layer.init(KEY, x)["params"]}
    adapted = ia3_jax.ia3_init(params, IA3Config(target_modules=["sq"]))
    apply = lambda v, x: layer.apply({"params": v["params"]["sq"]}, x)  # noqa: E731
    with pytest.raises(ia3_jax.VectorShapeError, match="square"):
        ia3_jax.apply_fn(apply, strict=False)({"params": adapted}, x)
    with pytest.raises(ia3_jax.VectorShapeError, match="square"):
        ia3_jax.merge(adapted)


@pytest.mark.parametrize(
    "fields, error, message",
    [
        (dict(target_modules=["nope"]), ia3_jax.TargetError, r"matches no module.*lin0, lin1, lin2"),
        (dict(target_modules=["lin0"], exclude_modules=["lin0"]), ia3_jax.TargetError, "matches no module"),
        (dict(target_modules=None), ia3_jax.TargetError, "target_modules is None"),
        (dict(target_modules=["lin0"], modules_to_save=["head"]), ia3_jax.TargetError, "'head' matches no module"),
    ],
)
def test_bad_targets(fields, error, message):
    params = models.init(models.MLP(), jnp.ones((1, 10)))
    with pytest.raises(error, match=message):
        ia3_jax.ia3_init(params, IA3Config(**fields))


def test_embedding_target_is_rejected_and_idle_entries_warn():
    class Embedder(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(4, name="proj")(nn.Embed(10, 8, name="embed")(ids))

    params = Embedder().init(KEY, jnp.zeros((1, 3), jnp.int32))["params"]
    with pytest.raises(ia3_jax.TargetError, match="not layers with a kernel.*embed"):
        ia3_jax.ia3_init(params, IA3Config(target_modules=["embed", "proj"]))
    with pytest.raises(ia3_jax.TargetError, match="not layers with a kernel"):
        ia3_jax.ia3_init(params, IA3Config(target_modules=".*"))
    with pytest.warns(UserWarning, match=r"\['q_proj'\] match no module"):
        ia3_jax.ia3_init(params, IA3Config(target_modules=["proj", "q_proj"]))


def test_random_init_needs_rng_and_init_is_not_repeated():
    params = models.init(models.MLP(), jnp.ones((1, 10)))
    config = IA3Config(target_modules=["lin0"], init_ia3_weights=False)
    with pytest.raises(ia3_jax.IA3ConfigError, match="rng=jax.random.key"):
        ia3_jax.ia3_init(params, config)
    adapted = ia3_jax.ia3_init(params, config, rng=KEY)
    assert np.std(np.asarray(adapted["lin0"]["ia3_l"])) > 0.3
    with pytest.raises(ia3_jax.AdapterExistsError, match="lin0"):
        ia3_jax.ia3_init(adapted, config, rng=KEY)


def test_all_linear_skips_lm_head():
    class LM(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(5, name="lm_head")(nn.Dense(4, name="up")(x))

    params = LM().init(KEY, jnp.ones((1, 3)))["params"]
    adapted = ia3_jax.ia3_init(params, IA3Config(target_modules="all-linear"))
    assert "ia3_l" in adapted["up"] and "ia3_l" not in adapted["lm_head"]


def test_boxed_kernels_get_boxed_vectors():
    class Sharded(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            return nn.Dense(16, kernel_init=init, name="wi")(x)

    x = jnp.ones((2, 8))
    params = Sharded().init(KEY, x)["params"]
    adapted = ia3_jax.ia3_init(params, IA3Config(target_modules=["wi"], init_ia3_weights=False), rng=KEY)
    assert isinstance(adapted["wi"]["ia3_l"], nn.LogicallyPartitioned)
    assert adapted["wi"]["ia3_l"].names == ("mlp",)
    got = ia3_jax.apply_fn(Sharded().apply)({"params": adapted}, x)
    unboxed = nn.meta.unbox(adapted)
    expected = (x @ unboxed["wi"]["kernel"] + unboxed["wi"]["bias"]) * unboxed["wi"]["ia3_l"]
    chex.assert_trees_all_close(got, expected, rtol=1e-5)


class _Aux(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="fc")(x)


class _FcAndAuxFc(nn.Module):
    """Modules `fc` and `aux.fc`: `fc` is a suffix of `aux.fc`."""

    @nn.compact
    def __call__(self, x, use_aux: bool = True):
        y = nn.Dense(4, name="fc")(x)
        return _Aux(name="aux")(y) if use_aux else y


def test_strict_matches_exact_module_paths():
    model = _FcAndAuxFc()
    x = jnp.ones((2, 4))
    params = model.init(KEY, x)["params"]
    config = IA3Config(target_modules=["fc"])
    adapted = ia3_jax.ia3_init(params, config)
    assert set(ia3_jax.split(adapted).adapter) == {"fc", "aux"}
    ia3_jax.apply_fn(model.apply, config)({"params": adapted}, x)  # both called: fine
    fc_only = ia3_jax.apply_fn(lambda v, h: model.apply(v, h, use_aux=False), config)
    with pytest.raises(ia3_jax.NotAppliedError, match=r"1 IA3 vectors.*\['aux\.fc'\]"):
        fc_only({"params": adapted}, x)
    # The params root found in any argument position, e.g. a loss over the adapter alone.
    adapter, base = ia3_jax.split(adapted)
    loss = ia3_jax.apply_fn(lambda a: model.apply({"params": ia3_jax.join(base, a)}, x, use_aux=False).sum(), config)
    with pytest.raises(ia3_jax.NotAppliedError, match=r"\['aux\.fc'\]"):
        loss(adapter)


def test_strict_tells_apart_two_trees_with_the_same_modules():
    # A student and a teacher adapter on one model: running the teacher alone leaves the student's
    # vectors unapplied, although their module paths were applied (for the teacher).
    model = _FcAndAuxFc()
    x = jnp.ones((2, 4))
    config = IA3Config(target_modules=["fc"])
    adapted = ia3_jax.ia3_init(model.init(KEY, x)["params"], config)
    student, base = ia3_jax.split(adapted)
    teacher = jax.tree.map(lambda v: 2 * v, student)
    both = ia3_jax.apply_fn(
        lambda s, t: model.apply({"params": ia3_jax.join(base, s)}, x) + model.apply({"params": ia3_jax.join(base, t)}, x),
        config,
    )
    jax.jit(both)(student, teacher)  # both applied: fine, traced or eager
    both(student, teacher)
    teacher_only = ia3_jax.apply_fn(lambda s, t: model.apply({"params": ia3_jax.join(base, t)}, x), config)
    for call in (teacher_only, jax.jit(teacher_only)):
        with pytest.raises(ia3_jax.NotAppliedError, match=r"2 IA3 vectors"):
            call(student, teacher)


class _ScanBody(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(x.shape[-1], name="up")(x), None


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.scan(_ScanBody, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="layers")(
            x, None
        )[0]


class _ScanInScan(nn.Module):
    """`layers.up` (scanned) and `enc.layers.up` (scanned inside `enc`): one a suffix of the other."""

    @nn.compact
    def __call__(self, x, use_enc: bool = True):
        if use_enc:
            x = _Scanned(name="enc")(x)
        return _Scanned(name="dec")(x) + nn.scan(
            _ScanBody, variable_axes={"params": 0}, split_rngs={"params": True}, length=2
        )(name="layers")(x, None)[0]


def test_strict_matches_exact_paths_in_scan_bodies():
    """Inside nn.scan the module path is the stacked params' path (no layer index), so it matches exactly."""
    model = _ScanInScan()
    x = jnp.ones((2, 4))
    params = model.init(KEY, x)["params"]
    config = IA3Config(target_modules=["up"])
    layouts = ia3_jax.infer_layouts(model.apply, {"params": params}, x)
    adapted = ia3_jax.ia3_init(params, config, layouts=layouts)
    assert adapted["enc"]["layers"]["up"]["ia3_l"].shape == (3, 4)
    with ia3_jax.intercept(config) as applied:
        model.apply({"params": adapted}, x)
    assert applied.paths == {("enc", "layers", "up"), ("dec", "layers", "up"), ("layers", "up")}
    ia3_jax.apply_fn(model.apply, config)({"params": adapted}, x)
    skip_enc = ia3_jax.apply_fn(lambda v, h: model.apply(v, h, use_enc=False), config)
    with pytest.raises(ia3_jax.NotAppliedError, match=r"\['enc\.layers\.up'\]"):
        skip_enc({"params": adapted}, x)


def test_an_already_jitted_function_is_refused():
    model = models.MLP()
    x = jnp.ones((2, 10))
    params = models.init(model, x)
    config = IA3Config(target_modules=["lin0"], init_ia3_weights=False)
    adapted = ia3_jax.ia3_init(params, config, rng=KEY)
    jitted = jax.jit(model.apply)
    for staged in (jitted, jax.pmap(model.apply), functools.partial(jitted, {"params": adapted})):
        with pytest.raises(ia3_jax.AlreadyJittedError, match=r"jax\.jit\(ia3_jax\.apply_fn\(model\.apply, config\)\)"):
            ia3_jax.apply_fn(staged, config)
    assert isinstance(ia3_jax.AlreadyJittedError("x"), TypeError)
    # The advised order: IA3 in the wrapper's trace only, none in a plain jit of the same function.
    with_ia3 = jax.jit(ia3_jax.apply_fn(model.apply, config))({"params": adapted}, x)
    plain = jitted({"params": adapted}, x)
    chex.assert_trees_all_equal(plain, model.apply({"params": params}, x))
    p = params
    h = nn.relu((x @ p["lin0"]["kernel"] + p["lin0"]["bias"]) * adapted["lin0"]["ia3_l"])
    h = nn.relu(h @ p["lin1"]["kernel"] + p["lin1"]["bias"])
    chex.assert_trees_all_close(with_ia3, h @ p["lin2"]["kernel"] + p["lin2"]["bias"], rtol=1e-5, atol=1e-6)


def test_all_linear_names_the_kernels_it_leaves_out():
    params = {
        "conv": {"kernel": jnp.ones((3, 4, 5)), "bias": jnp.ones(5)},  # a 1-D conv, or a scanned Dense
        "dense": {"kernel": jnp.ones((4, 5)), "bias": jnp.ones(5)},
    }
    with pytest.warns(UserWarning, match=r"2-D kernels only and leaves out conv:"):
        assert ia3_jax.resolve_targets(params, IA3Config(target_modules="all-linear")) == {("dense",): False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an excluded one is not mentioned
        ia3_jax.resolve_targets(params, IA3Config(target_modules="all-linear", exclude_modules=["conv"]))


class _OptionFirst(nn.Module):
    """A layer with a kernel whose call takes an option besides its input."""

    @nn.compact
    def __call__(self, inputs, double=False):
        y = inputs @ self.param("kernel", nn.initializers.normal(1.0), (inputs.shape[-1], 3))
        return 2 * y if double else y


class _CallsByKeyword(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _OptionFirst(name="layer")(double=True, inputs=x)  # the option comes first


def test_input_passed_by_keyword_is_found_by_name():
    model, x = _CallsByKeyword(), jax.random.normal(KEY, (2, 4))
    params = model.init(KEY, x)["params"]
    config = IA3Config(target_modules=["layer"], feedforward_modules=["layer"], init_ia3_weights=False)
    adapted = ia3_jax.ia3_init(params, config, rng=KEY)
    got = ia3_jax.apply_fn(model.apply, config)({"params": adapted}, x)
    layer = adapted["layer"]
    np.testing.assert_allclose(got, 2 * ((x * layer["ia3_l"]) @ layer["kernel"]), rtol=1e-6)  # by hand
