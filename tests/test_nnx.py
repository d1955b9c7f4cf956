"""IA3 on plain Flax NNX models: every module kind, merge and state ops, guards, sharding, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import ia3_jax
import ia3_jax.nnx as ia3_nnx


class Block(nnx.Module):
    """One module of every supported kind, in a chain: Linear, LinearGeneral (both ways), Einsum, Conv."""

    def __init__(self, rngs: nnx.Rngs, dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=dtype)
        self.k = nnx.Linear(8, 8, **kw)
        self.g = nnx.LinearGeneral(8, (2, 4), **kw)
        self.e = nnx.Einsum("btd,dnh->btnh", (8, 2, 4), (2, 4), **kw)
        self.o = nnx.LinearGeneral((2, 4), 8, axis=(-2, -1), **kw)
        self.c = nnx.Conv(8, 6, (3,), **kw)
        self.ff = nnx.Linear(6, 8, **kw)

    def __call__(self, x):
        h = self.k(x)
        h = self.o(self.g(h) + self.e(h))
        return self.ff(jax.nn.gelu(self.c(h)))


CONFIG = ia3_jax.IA3Config(
    target_modules=["k", "g", "e", "o", "c", "ff"], feedforward_modules=["ff"], init_ia3_weights=False
)
X = jax.random.normal(jax.random.key(1), (2, 5, 8))


def _adapted(dtype=jnp.float32):
    model = Block(nnx.Rngs(0), dtype)
    return model, ia3_nnx.ia3_init(model, CONFIG, X.astype(dtype), rng=jax.random.key(2))


def _hand(model: Block, vectors, x):
    """The adapted Block in numpy, from its weights and vectors (PEFT's rule: y * l, or W (x * l))."""
    names = ("k", "g", "e", "o", "c", "ff")
    w = {n: np.asarray(getattr(model, n).kernel.get_value(), np.float64) for n in names}
    b = {n: np.asarray(getattr(model, n).bias.get_value(), np.float64) for n in names}
    v = {n: np.asarray(vectors[n]["ia3_l"], np.float64) for n in b}
    x = np.asarray(x, np.float64)
    h = (x @ w["k"] + b["k"]) * v["k"]
    g = (np.einsum("btd,dnh->btnh", h, w["g"]) + b["g"]) * v["g"]
    e = (np.einsum("btd,dnh->btnh", h, w["e"]) + b["e"]) * v["e"]
    h = (np.einsum("btnh,nhd->btd", g + e, w["o"]) + b["o"]) * v["o"]
    padded = np.pad(h, ((0, 0), (1, 1), (0, 0)))  # 'SAME' padding of a width-3 kernel
    windows = np.stack([padded[:, i : i + h.shape[1]] for i in range(3)], axis=2)  # (b, t, 3, in)
    c = (np.einsum("btki,kio->bto", windows, w["c"]) + b["c"]) * v["c"]
    c = np.asarray(jax.nn.gelu(jnp.asarray(c, jnp.float32)), np.float64)
    return (c * v["ff"]) @ w["ff"] + b["ff"]


def test_every_module_kind_intercepted_equals_merged_equals_hand():
    model, adapted = _adapted()
    before = model(X)
    vectors = ia3_nnx.adapter(adapted)
    assert {k: v["ia3_l"].shape for k, v in vectors.items()} == {
        "k": (8,),
        "g": (2, 4),
        "e": (2, 4),
        "o": (8,),
        "c": (6,),
        "ff": (6,),
    }
    y = adapted(X)
    np.testing.assert_allclose(y, _hand(adapted, vectors, X), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ia3_nnx.merge(adapted)(X), y, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(y - before)).max() > 0.1  # the random vectors change the output: no no-op passes
    np.testing.assert_array_equal(model(X), before)  # the original model is untouched (copy=True)
    assert type(model.k) is nnx.Linear and not hasattr(model.k, "ia3_l")
    assert type(adapted.k).__name__ == "Linear" and isinstance(adapted.k, nnx.Linear)


def test_merge_unmerge_on_model_and_state():
    model, adapted = _adapted()
    y = adapted(X)
    merged = ia3_nnx.merge(adapted)
    assert type(merged.k) is nnx.Linear and not hasattr(merged.k, "ia3_l")
    _, state = nnx.split(adapted)
    plain = nnx.clone(model)
    nnx.update(plain, ia3_nnx.merge(state))  # a merged state fits the un-adapted model
    np.testing.assert_allclose(plain(X), y, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="inaccurate"):
        restored = ia3_nnx.unmerge(merged, nnx.state(adapted, ia3_nnx.IA3Vector))
    np.testing.assert_allclose(restored(X), model(X), rtol=1e-4, atol=1e-4)
    with pytest.raises(ia3_jax.StructureError, match="got a dict.*pass the adapted model"):
        ia3_nnx.unmerge(merged, ia3_nnx.adapter(adapted))  # the Linen-form dict: no targets in it
    bad = nnx.clone(adapted)
    bad.k.ia3_l.set_value(bad.k.ia3_l.get_value().at[0].set(jnp.inf))
    with pytest.raises(ia3_jax.NonFiniteMergeError, match="'k'"):
        ia3_nnx.merge(bad, safe_merge=True)


def test_weighted_and_combined_adapters():
    model, a = _adapted()
    b = ia3_nnx.ia3_init(model, CONFIG, X, rng=jax.random.key(3))
    mixed = ia3_nnx.add_weighted_adapter([a, nnx.state(b, ia3_nnx.IA3Vector)], [0.7, 0.3])
    both = ia3_nnx.combine([a, b])
    va, vb = ia3_nnx.adapter(a), ia3_nnx.adapter(b)
    np.testing.assert_allclose(
        mixed["k"]["ia3_l"].get_value(), 0.7 * va["k"]["ia3_l"] + 0.3 * vb["k"]["ia3_l"], rtol=1e-6
    )
    target = nnx.clone(a)
    nnx.update(target, both)  # a vector state carries the metadata: update and merge work on it
    np.testing.assert_allclose(ia3_nnx.adapter(target)["e"]["ia3_l"], va["e"]["ia3_l"] * vb["e"]["ia3_l"], rtol=1e-6)
    merged_twice = ia3_nnx.merge(ia3_nnx.ia3_init(ia3_nnx.merge(a), CONFIG, X, rng=jax.random.key(3)))
    np.testing.assert_allclose(ia3_nnx.merge(target)(X), merged_twice(X), rtol=1e-4, atol=1e-5)


def test_gradients_and_optimizer_touch_only_vectors():
    _, model = _adapted()
    base_before = nnx.state(model, nnx.Not(ia3_nnx.IA3Vector))
    vectors_before = ia3_nnx.adapter(model)
    optimizer = nnx.Optimizer(model, optax.adam(1e-1), wrt=ia3_nnx.IA3Vector)

    @nnx.jit
    def step(model, optimizer):
        def loss(m):
            return jnp.mean(m(X) ** 2)

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, ia3_nnx.IA3Vector))(model)
        optimizer.update(model, grads)
        return value, grads

    first, grads = step(model, optimizer)
    assert {p[-1] for p, _ in nnx.to_flat_state(grads)} == {"ia3_l"}
    for _ in range(5):
        last, _ = step(model, optimizer)
    assert last < first
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Not(ia3_nnx.IA3Vector)), base_before)
    assert not np.allclose(ia3_nnx.adapter(model)["k"]["ia3_l"], vectors_before["k"]["ia3_l"])
    # the jitted forward over nnx.split states sees the vectors too
    graphdef, state = nnx.split(model)
    np.testing.assert_allclose(jax.jit(lambda s: nnx.merge(graphdef, s)(X))(state), model(X), rtol=1e-5, atol=1e-6)


def test_bf16_base_float32_vectors():
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    model = nnx.Sequential(nnx.Linear(8, 16, **kw), nnx.Linear(16, 8, **kw))
    config = ia3_jax.IA3Config(
        target_modules=["layers.0", "layers.1"], feedforward_modules=["layers.1"], init_ia3_weights=False
    )
    x = X.astype(jnp.bfloat16)
    model = ia3_nnx.ia3_init(model, config, x, rng=jax.random.key(2))
    assert model.layers[0].ia3_l.get_value().dtype == jnp.float32
    y = model(x)
    assert y.dtype == jnp.bfloat16
    grads = nnx.grad(lambda m: jnp.mean(m(x).astype(jnp.float32) ** 2), argnums=nnx.DiffState(0, ia3_nnx.IA3Vector))(
        model
    )
    assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(grads))
    merged = ia3_nnx.merge(model)
    assert merged.layers[0].kernel.get_value().dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(merged(x), np.float32), np.asarray(y, np.float32), rtol=0.05, atol=0.05)


class Tied(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 8, rngs=rngs)
        self.proj = nnx.Linear(8, 8, rngs=rngs)
        self.unused = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, tokens):
        return self.embed.attend(self.proj(self.embed(tokens)))


def test_guards():
    model, tokens = Tied(nnx.Rngs(0)), jnp.arange(4)[None]
    with pytest.raises(ia3_jax.TargetError, match="matches no module"):
        ia3_nnx.ia3_init(model, ia3_jax.IA3Config(target_modules=["nope"], feedforward_modules=[]), tokens)
    with pytest.raises(ia3_jax.NotAppliedError, match="unused"):  # its __call__ never runs: a silent no-op
        ia3_nnx.ia3_init(model, ia3_jax.IA3Config(target_modules=["proj", "unused"], feedforward_modules=[]), tokens)
    with pytest.raises(ia3_jax.LayoutError, match="'embed'"):  # a lookup table, no input/output feature axes
        ia3_nnx.ia3_init(model, ia3_jax.IA3Config(target_modules=["embed"], feedforward_modules=[]), tokens)
    with pytest.raises(ia3_jax.IA3ConfigError, match="example inputs"):
        ia3_nnx.ia3_init(model, ia3_jax.IA3Config(target_modules=["proj"], feedforward_modules=[]))
    with pytest.raises(ia3_jax.LayoutError, match=r"failed on them .*\(1, 4\).*ValueError: Input type"):  # the model's own
        ia3_nnx.ia3_init(model, ia3_jax.IA3Config(target_modules=["proj"], feedforward_modules=[]), tokens * 0.5)
    assert not hasattr(model.proj, "ia3_l")  # refused before anything changed

    class Branchy(nnx.Module):  # a Python branch on a value: jax's own tracing error, not a word about inputs
        def __init__(self):
            self.proj = nnx.Linear(4, 4, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.proj(x) if x.sum() > 0 else x

    with pytest.raises(jax.errors.TracerBoolConversionError):
        ia3_nnx.ia3_init(Branchy(), ia3_jax.IA3Config(target_modules=["proj"], feedforward_modules=[]), jnp.ones((1, 4)))
    adapted = ia3_nnx.ia3_init(model, ia3_jax.IA3Config(target_modules=["proj"], feedforward_modules=[]), tokens)
    with pytest.raises(ia3_jax.AdapterExistsError):
        ia3_nnx.ia3_init(adapted, ia3_jax.IA3Config(target_modules=["proj"], feedforward_modules=[]), tokens)
    with pytest.raises(ia3_jax.VectorShapeError, match="'proj'"):
        ia3_nnx.set_adapter(adapted, {"proj": {"ia3_l": jnp.ones(3)}})
    with pytest.raises(ia3_jax.StructureError, match=r"the model's \['proj'\] are missing from them, and \['nope'\]"):
        ia3_nnx.set_adapter(adapted, {"nope": {"ia3_l": jnp.ones(3)}})


def test_sharded_equals_single_device():
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))

    class MLP(nnx.Module):
        def __init__(self, sharded: bool):
            init = nnx.initializers.lecun_normal()
            up_init = nnx.with_partitioning(init, (None, "model")) if sharded else init
            down_init = nnx.with_partitioning(init, ("model", None)) if sharded else init
            self.up = nnx.Linear(8, 16, kernel_init=up_init, rngs=nnx.Rngs(0))
            self.down = nnx.Linear(16, 8, kernel_init=down_init, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.down(jax.nn.relu(self.up(x)))

    config = ia3_jax.IA3Config(target_modules=["up", "down"], feedforward_modules=["down"], init_ia3_weights=False)
    x = jax.random.normal(jax.random.key(0), (4, 8))
    single = ia3_nnx.ia3_init(MLP(False), config, x, rng=jax.random.key(1))
    with jax.set_mesh(mesh):
        sharded = ia3_nnx.ia3_init(MLP(True), config, x, rng=jax.random.key(1))
        # Placed by the variables' own partitioning, kernels and vectors alike: whether NNX placed them
        # at creation depends on flax_always_shard_variable, which importing a Tunix model turns off.
        state = nnx.state(sharded)
        nnx.update(sharded, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
        for name in ("up", "down"):  # output features of up, input features of down: both on 'model'
            vector = getattr(sharded, name).ia3_l
            assert vector.get_metadata("out_sharding") == ("model",)
            assert vector.get_value().sharding.spec == P("model")
        # (checked before the call: nnx.jit writes its outputs' shardings, chosen by XLA, back into the model)
        y = nnx.jit(lambda m, x: m(x))(sharded, jax.device_put(x, NamedSharding(mesh, P("data"))))
    np.testing.assert_allclose(y, single(x), rtol=1e-5, atol=1e-6)


def test_checkpoint_roundtrip_onto_abstract_model(tmp_path):
    _, model = _adapted()
    ia3_nnx.save_adapter(tmp_path / "ckpt", model, CONFIG)
    abstract = nnx.eval_shape(lambda: ia3_nnx.ia3_init(Block(nnx.Rngs(5)), CONFIG, X, rng=jax.random.key(9)))
    assert isinstance(abstract.k.ia3_l.get_value(), jax.ShapeDtypeStruct)
    config = ia3_nnx.load_adapter(tmp_path / "ckpt", abstract)
    assert config == CONFIG
    jax.tree.map(np.testing.assert_array_equal, ia3_nnx.adapter(abstract), ia3_nnx.adapter(model))
    adapter, _ = ia3_jax.load_adapter(tmp_path / "ckpt")  # the same file is a Linen-form adapter dict
    jax.tree.map(np.testing.assert_array_equal, adapter, ia3_nnx.adapter(model))
    # A model adapted with other sides or modules is refused before anything is written into it: k is 8 -> 8, so
    # its vector fits the input as well as the output, and would scale the wrong side silently.
    other_side = ia3_nnx.ia3_init(Block(nnx.Rngs(5)), CONFIG.replace(feedforward_modules=["ff", "k"]), X, rng=jax.random.key(3))
    before = ia3_nnx.adapter(other_side)
    with pytest.raises(ia3_jax.AdapterMismatchError, match=r"module 'k': the checkpoint's config scales its output.*"
                       r"adapted to scale its input"):
        ia3_nnx.load_adapter(tmp_path / "ckpt", other_side)
    jax.tree.map(np.testing.assert_array_equal, ia3_nnx.adapter(other_side), before)
    fewer = ia3_nnx.ia3_init(Block(nnx.Rngs(5)), CONFIG.replace(target_modules=["k", "ff"]), X, rng=jax.random.key(3))
    with pytest.raises(ia3_jax.StructureError, match=r"checkpoint's vectors do not fit the model.*'c'.*not in the model"):
        ia3_nnx.load_adapter(tmp_path / "ckpt", fewer)


class Remat(nnx.Module):
    def __init__(self, rngs):
        self.block = Block(rngs)

    def __call__(self, x):
        return nnx.remat(lambda b, x: b(x))(self.block, x)


def test_remat():
    model = ia3_nnx.ia3_init(
        Remat(nnx.Rngs(0)), CONFIG.replace(target_modules=["block.k", "ff"]), X, rng=jax.random.key(2)
    )
    grads = nnx.grad(lambda m: jnp.mean(m(X) ** 2), argnums=nnx.DiffState(0, ia3_nnx.IA3Vector))(model)
    direct = nnx.grad(lambda m: jnp.mean(m.block(X) ** 2), argnums=nnx.DiffState(0, ia3_nnx.IA3Vector))(model)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, direct)


class _Classifier(nnx.Module):
    def __init__(self, rngs):
        self.body = nnx.Linear(8, 16, rngs=rngs)
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.body(x)))


def test_modules_to_save_head_trains_and_round_trips(tmp_path):
    """modules_to_save: the head's params become IA3SavedParam (an nnx.LoRAParam), train, and round-trip."""
    base = _Classifier(nnx.Rngs(0))
    config = ia3_jax.IA3Config(target_modules=["body"], modules_to_save=["head"])
    x = jax.random.normal(jax.random.key(1), (4, 8))
    labels = jnp.array([0, 1, 2, 1])
    model = ia3_nnx.ia3_init(base, config, x)
    assert isinstance(model.head.kernel, ia3_nnx.IA3SavedParam) and type(base.head.kernel) is nnx.Param
    assert set(ia3_nnx.adapter(model)) == {"body", "head"}
    assert set(ia3_nnx.adapter(model)["head"]) == {"kernel", "bias"}  # Linen's modules_to_save copy layout

    def loss(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()

    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.LoRAParam)  # vectors and saved copies
    first = float(loss(model))
    for _ in range(10):
        optimizer.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model))
    assert float(loss(model)) < first
    assert np.abs(model.head.kernel.get_value() - base.head.kernel.get_value()).max() > 0.01
    np.testing.assert_array_equal(model.body.kernel.get_value(), base.body.kernel.get_value())

    trained = ia3_nnx.adapter(model)
    fresh = ia3_nnx.ia3_init(base, config, x)
    ia3_nnx.set_adapter(fresh, trained)
    np.testing.assert_allclose(fresh(x), model(x), rtol=1e-6)
    ia3_nnx.save_adapter(tmp_path / "ckpt", model, config)
    restored = ia3_nnx.ia3_init(base, config, x)
    assert ia3_nnx.load_adapter(tmp_path / "ckpt", restored).modules_to_save == ("head",)
    jax.tree.map(np.testing.assert_array_equal, ia3_nnx.adapter(restored), trained)
    np.testing.assert_allclose(restored(x), model(x), rtol=1e-6)
    with pytest.raises(ia3_jax.StructureError):
        ia3_nnx.set_adapter(fresh, {"body": trained["body"]})  # the head's copy is missing
    # Merged: plain modules and plain nnx.Params again (nothing a LoRA-only trainer would pick up).
    served = ia3_nnx.merge(model)
    assert not jax.tree.leaves(nnx.state(served, nnx.LoRAParam))
    np.testing.assert_allclose(served(x), model(x), rtol=1e-5, atol=1e-6)
    graphdef, state = nnx.split(base)
    merged_state = ia3_nnx.merge(nnx.state(model))
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(merged_state))
    plain = nnx.merge(graphdef, state)
    nnx.update(plain, merged_state)
    np.testing.assert_allclose(plain(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_refused_adapter_changes_nothing():
    class Two(nnx.Module):
        def __init__(self):
            self.k = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
            self.v = nnx.Linear(4, 6, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.v(self.k(x))

    x = jnp.ones((2, 4))
    model = ia3_nnx.ia3_init(Two(), ia3_jax.IA3Config(target_modules=["k", "v"]), x)
    before = ia3_nnx.adapter(model)
    bad = {"k": {"ia3_l": jnp.full((4,), 5.0)}, "v": {"ia3_l": jnp.ones((3,))}}  # k fits, v does not
    with pytest.raises(ia3_jax.VectorShapeError, match="'v'"):
        ia3_nnx.set_adapter(model, bad)
    jax.tree.map(np.testing.assert_array_equal, ia3_nnx.adapter(model), before)  # k was not written either


def test_input_passed_by_keyword_is_found_by_name():
    class OptionFirst(nnx.Module):
        def __init__(self):
            self.kernel = nnx.Param(jax.random.normal(jax.random.key(0), (4, 3)))

        def __call__(self, inputs, double=False):
            y = inputs @ self.kernel.get_value()
            return 2 * y if double else y

    class Model(nnx.Module):
        def __init__(self):
            self.layer = OptionFirst()

        def __call__(self, x):
            return self.layer(double=True, inputs=x)  # the option comes first

    x = jax.random.normal(jax.random.key(1), (2, 4))
    config = ia3_jax.IA3Config(target_modules=["layer"], feedforward_modules=["layer"], init_ia3_weights=False)
    model = ia3_nnx.ia3_init(Model(), config, x, rng=jax.random.key(2))
    vector, kernel = model.layer.ia3_l.get_value(), model.layer.kernel.get_value()
    np.testing.assert_allclose(model(x), 2 * ((x * vector) @ kernel), rtol=1e-6)  # by hand
