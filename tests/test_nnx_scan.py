"""IA3 on NNX layers stacked by ``nnx.vmap`` and run by ``nnx.scan`` (Flax's "scan over layers").

References: the same layers unrolled by hand in numpy (forward) and in jnp (gradients), from the
stacked weights and vectors indexed per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ia3_jax
import ia3_jax.nnx as ia3_nnx
from tests.models import TunixStyleEinsum as Einsum

N = 3  # layers


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.k = nnx.Linear(8, 12, rngs=rngs, bias_init=nnx.initializers.normal(0.5))
        self.e = Einsum("btd,dnh->btnh", (12, 2, 4), rngs)
        self.ff = nnx.Linear(8, 8, rngs=rngs, bias_init=nnx.initializers.normal(0.5))

    def __call__(self, x):
        h = self.e(self.k(x))
        return x + self.ff(jax.nn.relu(h.reshape(*h.shape[:-2], 8)))


class Model(nnx.Module):
    """N Blocks created by ``nnx.vmap`` (every param stacked at axis ``axis``) and run by ``nnx.scan``."""

    def __init__(self, rngs: nnx.Rngs, axis: int = 0):
        @nnx.split_rngs(splits=N)
        @nnx.vmap(in_axes=(0,), out_axes=axis)
        def create(rngs):
            return Block(rngs)

        self.axis = axis
        self.layers = create(rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, self.axis), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return self.head(body(x, self.layers))


X = jax.random.normal(jax.random.key(1), (2, 5, 8))
_run = nnx.jit(lambda model, x: model(x))  # one compile per model structure (eager nnx.scan compiles every call)
CONFIG = ia3_jax.IA3Config(
    target_modules=["k", "e", "ff", "head"], feedforward_modules=["ff"], init_ia3_weights=False
)
SHAPES = {("layers", "k"): (N, 12), ("layers", "e"): (N, 2, 4), ("layers", "ff"): (N, 8), ("head",): (4,)}


def _adapted(seed: int = 2) -> tuple[Model, Model]:
    model = Model(nnx.Rngs(0))
    adapted = ia3_nnx.ia3_init(model, CONFIG, X, rng=jax.random.key(seed))
    nnx.update(adapted, jax.tree.map(lambda v: 1 + 0.3 * v, nnx.state(adapted, ia3_nnx.IA3Vector)))
    return model, adapted


def _arrays(model: Model) -> dict[str, np.ndarray]:
    layers = model.layers
    names = {"wk": layers.k.kernel, "bk": layers.k.bias, "we": layers.e.w, "wf": layers.ff.kernel}
    names |= {"bf": layers.ff.bias, "wh": model.head.kernel, "bh": model.head.bias}
    return {n: np.asarray(v.get_value(), np.float64) for n, v in names.items()}


def _hand(model: Model, vectors, x, xp=np) -> np.ndarray:
    """The model unrolled layer by layer: layer i uses slice i of every stacked weight and vector."""
    w = _arrays(model) if xp is np else {n: jnp.asarray(a, jnp.float32) for n, a in _arrays(model).items()}
    v = vectors
    h = x
    for i in range(N):
        a = (h @ w["wk"][i] + w["bk"][i]) * v["layers"]["k"]["ia3_l"][i]
        a = xp.einsum("btd,dnh->btnh", a, w["we"][i]) * v["layers"]["e"]["ia3_l"][i]
        a = xp.maximum(a.reshape(*a.shape[:-2], 8), 0)
        h = h + (a * v["layers"]["ff"]["ia3_l"][i]) @ w["wf"][i] + w["bf"][i]
    return (h @ w["wh"] + w["bh"]) * v["head"]["ia3_l"]


def _numpy(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def test_stacked_vectors_scanned_equal_the_unrolled_hand_computation_and_merge():
    model, adapted = _adapted()
    vectors = ia3_nnx.adapter(adapted)
    flat = {tuple(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(vectors)[0]}
    assert {tuple(k.key for k in p[:-1]): s for p, s in flat.items()} == SHAPES
    target = adapted.layers.k.ia3_l.get_metadata("ia3_target")
    assert target.layout.stack_axes == (0,) and target.kernel_shape == (N, 8, 12)
    assert not np.allclose(vectors["layers"]["k"]["ia3_l"][0], vectors["layers"]["k"]["ia3_l"][1])  # one per layer
    y = _run(adapted, X)
    # measured: max |error| 8.7e-7 (outputs up to 5.4 in size)
    np.testing.assert_allclose(y, _hand(adapted, _numpy(vectors), np.asarray(X, np.float64)), rtol=0, atol=2e-6)
    assert np.abs(np.asarray(y - _run(model, X))).max() > 0.1  # the vectors act

    merged = ia3_nnx.merge(adapted)
    assert not hasattr(merged.layers.k, "ia3_l") and type(merged.layers.k) is nnx.Linear
    # The fold is per layer: kernel[i] * l[i] on the output axis, kernel[i] * l[i][:, None] on the input axis.
    lk, lf = (np.asarray(vectors["layers"][n]["ia3_l"]) for n in ("k", "ff"))
    w0 = _arrays(model)
    np.testing.assert_allclose(merged.layers.k.kernel.get_value(), w0["wk"] * lk[:, None, :], rtol=1e-6)
    np.testing.assert_allclose(merged.layers.k.bias.get_value(), w0["bk"] * lk, rtol=1e-6)
    np.testing.assert_allclose(merged.layers.ff.kernel.get_value(), w0["wf"] * lf[:, :, None], rtol=1e-6)
    np.testing.assert_allclose(merged.layers.ff.bias.get_value(), w0["bf"], rtol=0)  # input side: bias untouched
    np.testing.assert_allclose(_run(merged, X), y, rtol=0, atol=2.5e-6)  # measured: 1.2e-6

    with pytest.warns(UserWarning, match="inaccurate"):
        restored = ia3_nnx.unmerge(merged, adapted)
    np.testing.assert_allclose(restored.layers.e.w.get_value(), w0["we"], rtol=3e-7)  # measured: 1.2e-7 (1 ulp)
    np.testing.assert_allclose(_run(restored, X), _run(model, X), rtol=0, atol=5e-6)  # measured: 2.3e-6

    plain = nnx.clone(model)  # the merged state fits the un-adapted model
    nnx.update(plain, ia3_nnx.merge(nnx.split(adapted)[1]))
    np.testing.assert_allclose(_run(plain, X), y, rtol=0, atol=2.5e-6)  # measured: 1.2e-6


def test_gradients_reach_only_the_stacked_vectors_each_layer_its_own():
    model, adapted = _adapted()
    loss_grad = nnx.grad(lambda m: jnp.sum(m(X) ** 2), argnums=nnx.DiffState(0, ia3_nnx.IA3Vector))
    grads = nnx.jit(loss_grad)(adapted)
    got = {tuple(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(grads)}
    assert set(got) == {p + ("ia3_l",) for p in SHAPES}
    vectors = ia3_nnx.adapter(adapted)
    expected = jax.grad(lambda v: jnp.sum(_hand(adapted, v, X, xp=jnp) ** 2))(vectors)
    for path in SHAPES:
        want = np.asarray(expected[path[0]][path[1]]["ia3_l"] if len(path) == 2 else expected["head"]["ia3_l"])
        # measured: at most 2.0e-7 of the largest entry
        np.testing.assert_allclose(got[path + ("ia3_l",)], want, rtol=0, atol=5e-7 * np.abs(want).max())
        if len(path) == 2:  # each layer's slice gets its own gradient
            assert not np.allclose(want[0], want[1])
    params_before = nnx.state(adapted, nnx.Not(ia3_nnx.IA3Vector))
    optimizer = nnx.Optimizer(adapted, __import__("optax").sgd(0.1), wrt=ia3_nnx.IA3Vector)
    optimizer.update(adapted, grads)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(adapted, nnx.Not(ia3_nnx.IA3Vector)), params_before)
    assert not np.allclose(adapted.layers.k.ia3_l.get_value(), vectors["layers"]["k"]["ia3_l"])


def test_adapter_checkpoints_and_peft_files_of_stacked_layers(tmp_path):
    model, adapted = _adapted()
    vectors = ia3_nnx.adapter(adapted)
    ia3_nnx.save_adapter(tmp_path / "ckpt", adapted, CONFIG)
    fresh = ia3_nnx.ia3_init(model, CONFIG.replace(init_ia3_weights=True), X)  # vectors of ones
    assert ia3_nnx.load_adapter(tmp_path / "ckpt", fresh).target_modules == CONFIG.target_modules
    jax.tree.map(np.testing.assert_array_equal, ia3_nnx.adapter(fresh), vectors)
    with pytest.raises(ia3_jax.VectorShapeError, match="layers"):  # an adapter for another number of layers
        ia3_nnx.set_adapter(fresh, jax.tree.map(lambda v: v[:2] if v.ndim > 1 else v, vectors))

    # PEFT's format has one module per layer: the stacked vector is refused, and unstack gives PEFT's names.
    with pytest.raises(ia3_jax.AdapterMismatchError, match="ia3_jax.unstack"):
        ia3_jax.save_peft(tmp_path / "peft", vectors, CONFIG)
    per_layer = ia3_jax.unstack(vectors, "layers")
    assert per_layer["layers"]["1"]["k"]["ia3_l"].shape == (12,)
    only_k = CONFIG.replace(target_modules=["k"], feedforward_modules=[])
    ia3_jax.save_peft(tmp_path / "peft", ia3_jax.unstack({"layers": {"k": vectors["layers"]["k"]}}, "layers"), only_k)
    base = ia3_jax.unstack(nnx.to_pure_dict(nnx.state(model, nnx.Param)), "layers")
    loaded, _ = ia3_jax.load_peft(tmp_path / "peft", base)
    restacked = ia3_jax.stack(loaded, "layers")["layers"]["k"]["ia3_l"]
    np.testing.assert_array_equal(restacked, vectors["layers"]["k"]["ia3_l"])


def test_layers_stacked_at_axis_1_and_a_refused_axis():
    model = Model(nnx.Rngs(0), axis=1)
    assert model.layers.k.kernel.get_value().shape == (8, N, 12)
    adapted = ia3_nnx.ia3_init(model, CONFIG.replace(target_modules=["k", "ff"]), X, rng=jax.random.key(2))
    assert adapted.layers.k.ia3_l.get_value().shape == (12, N)  # the layer axis where the kernel has it
    assert adapted.layers.ff.ia3_l.get_value().shape == (8, N)
    v = np.asarray(adapted.layers.k.ia3_l.get_value(), np.float64)
    w = np.asarray(model.layers.k.kernel.get_value(), np.float64)
    merged = ia3_nnx.merge(adapted)
    np.testing.assert_allclose(merged.layers.k.kernel.get_value(), w * v.T[None], rtol=1e-6)  # (8, N, 12) * l[i]
    np.testing.assert_allclose(_run(merged, X), _run(adapted, X), rtol=0, atol=3e-6)  # measured: 1.4e-6

    deep = Deep(nnx.Rngs(0))  # kernel (8, 8, N): the vector (8, N) would be sliced at its axis 1, not 2
    with pytest.raises(ia3_jax.LayoutError, match="'layers'.*axis 2"):
        ia3_nnx.ia3_init(deep, ia3_jax.IA3Config(target_modules=["layers"]), X)


class Deep(nnx.Module):
    """Bias-free Linears stacked at their last axis: kernel (in, out, N)."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=N)
        @nnx.vmap(in_axes=(0,), out_axes=2)
        def create(rngs):
            return nnx.Linear(8, 8, use_bias=False, rngs=rngs)

        self.layers = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 2), out_axes=nnx.Carry)
        def body(x, layer):
            return layer(x)

        return body(x, self.layers)


def test_bank_on_scanned_layers_equals_each_adapter_alone():
    """A bank on nnx.scan-ned layers: vectors (N_layers, *features, n_adapters), the scan slices the layer axis."""
    adapters = []
    for seed in range(3):
        _, tuned = _adapted(seed=seed)
        adapters.append(ia3_nnx.adapter(tuned))
    _, model = _adapted()
    bank = ia3_jax.stack_adapters(adapters)
    ia3_nnx.set_bank(model, bank)
    assert model.layers.k.ia3_l.get_value().shape == (N, 12, 3)
    ids = jnp.array([2, ia3_jax.NO_ADAPTER])
    got = nnx.jit(ia3_nnx.bank_call)(model, ids, X)
    # eagerly too: the ids ride on the layers as state stacked like their vectors, sliced by nnx.scan
    np.testing.assert_allclose(ia3_nnx.bank_call(model, ids, X), got, rtol=1e-6, atol=1e-7)
    swapped = ia3_nnx.bank_call(model, ids[::-1], X[::-1])
    np.testing.assert_allclose(swapped[::-1], got, rtol=1e-6, atol=1e-7)
    assert not hasattr(model.layers.k, "ia3_adapter_ids")
    for row, i in enumerate(np.asarray(ids)):
        alone = _adapted()[1]
        if i >= 0:
            ia3_nnx.set_adapter(alone, ia3_jax.bank_select(bank, int(i)))
            want = _run(alone, X[row : row + 1])
        else:
            want = _run(_adapted()[0], X[row : row + 1])
        np.testing.assert_allclose(got[row : row + 1], want, rtol=1e-6, atol=1e-7)  # measured: bitwise equal
    assert np.abs(np.asarray(got[0] - _run(_adapted()[0], X[:1])[0])).max() > 1e-2  # the adapter acts


class Square(nnx.Module):
    """8 Linear(8, 8) layers stacked at `axis`: the layer count equals every weight dimension."""

    def __init__(self, rngs: nnx.Rngs, axis: int = 0):
        @nnx.split_rngs(splits=8)
        @nnx.vmap(in_axes=(0,), out_axes=axis)
        def create(rngs):
            return nnx.Linear(8, 8, rngs=rngs, bias_init=nnx.initializers.normal(0.5))

        self.axis = axis
        self.layers = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, self.axis), out_axes=nnx.Carry)
        def body(x, layer):
            return jnp.tanh(layer(x))

        return body(x, self.layers)


@pytest.mark.parametrize("axis, feedforward", [(0, False), (1, True)])
def test_ambiguous_layer_axis_is_named_by_stack_axes(axis, feedforward):
    """Kernel (8, 8, 8) seen as (8, 8) per layer: any axis could be the layer axis. The error names the
    keyword; with it, the scanned model equals the layers unrolled by hand."""
    model = Square(nnx.Rngs(0), axis)
    config = ia3_jax.IA3Config(
        target_modules=["layers"], feedforward_modules=["layers"] if feedforward else [], init_ia3_weights=False
    )
    with pytest.raises(ia3_jax.LayoutError, match=r"ambiguous.*ia3_jax\.nnx\.ia3_init\(.*stack_axes=\{'layers': 0\}"):
        ia3_nnx.ia3_init(model, config, X, rng=jax.random.key(0))
    with pytest.raises(ia3_jax.TargetError, match="stack_axes.*'layer'"):
        ia3_nnx.ia3_init(model, config, X, rng=jax.random.key(0), stack_axes={"layer": axis})
    with pytest.raises(ia3_jax.LayoutError, match="do not fit"):
        ia3_nnx.ia3_init(model, config, X, rng=jax.random.key(0), stack_axes={"layers": 3})

    adapted = ia3_nnx.ia3_init(model, config, X, rng=jax.random.key(2), stack_axes={"layers": axis})
    nnx.update(adapted, jax.tree.map(lambda v: 1 + 0.3 * v, nnx.state(adapted, ia3_nnx.IA3Vector)))
    target = adapted.layers.ia3_l.get_metadata("ia3_target")
    assert target.layout.stack_axes == (axis,)
    v = np.asarray(adapted.layers.ia3_l.get_value(), np.float64)  # the layer axis where the kernel has it
    w = np.asarray(model.layers.kernel.get_value(), np.float64)
    b = np.asarray(model.layers.bias.get_value(), np.float64)
    h = np.asarray(X, np.float64)
    for i in range(8):
        wi, bi, vi = np.take(w, i, axis), np.take(b, i, axis), np.take(v, i, axis)
        h = np.tanh((h * vi) @ wi + bi if feedforward else (h @ wi + bi) * vi)
    y = _run(adapted, X)
    assert np.abs(h - np.asarray(_run(model, X))).max() > 0.05  # the vectors act
    # measured: max |scanned - hand| 2.2e-7, |merged - adapted| 2.4e-7 (outputs tanh, up to 1)
    np.testing.assert_allclose(y, h, rtol=0, atol=5e-7)
    np.testing.assert_allclose(_run(ia3_nnx.merge(adapted), X), y, rtol=0, atol=5e-7)


class SquarePair(nnx.Module):
    """8 layers of two Linear(8, 8), `up` and `down`, stacked at axis 0: ambiguous for both."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=8)
        @nnx.vmap(in_axes=(0,))
        def create(rngs):
            return nnx.Dict(up=nnx.Linear(8, 8, rngs=rngs), down=nnx.Linear(8, 8, rngs=rngs))

        self.layers = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            return jnp.tanh(layer["down"](jnp.tanh(layer["up"](x))))

        return body(x, self.layers)


def test_stack_axes_keyed_by_a_module_holding_the_targets():
    """``stack_axes={"layers": 0}`` (the README's form) covers layers.up and layers.down; the same as naming each."""
    model = SquarePair(nnx.Rngs(0))
    config = ia3_jax.IA3Config(target_modules=["up", "down"], feedforward_modules=["down"], init_ia3_weights=False)
    by_parent = ia3_nnx.ia3_init(model, config, X, rng=jax.random.key(2), stack_axes={"layers": 0})
    each = ia3_nnx.ia3_init(model, config, X, rng=jax.random.key(2), stack_axes={"layers.up": 0, "layers.down": 0})
    for name in ("up", "down"):
        assert by_parent.layers[name].ia3_l.get_metadata("ia3_target").layout.stack_axes == (0,)
    np.testing.assert_array_equal(_run(by_parent, X), _run(each, X))
    with pytest.raises(ia3_jax.LayoutError, match="do not fit"):  # a target's own key wins over its parent's
        ia3_nnx.ia3_init(model, config, X, rng=jax.random.key(2), stack_axes={"layers": 0, "layers.up": 3})


def test_a_sliced_vector_on_stacked_layers_is_refused():
    """`Target.full_vector` reads the slice position off the stored (stacked) shape, but inside nnx.scan the
    vector is one layer's: a sliced vector on stacked layers can never be built, so it never scales wrongly."""
    stacked = ia3_jax.KernelLayout(in_axes=(2,), out_axes=(1, 3, 4), stack_axes=(0,))
    with pytest.raises(ia3_jax.LayoutError, match="stacked layers"):
        ia3_jax.Target(("layers", "qkv"), stacked, (N, 3, 32, 2, 8), False, slices=(1, (1, 2)))
    flat = ia3_jax.KernelLayout(in_axes=(1,), out_axes=(0, 2, 3))
    assert ia3_jax.Target(("qkv",), flat, (3, 32, 2, 8), False, slices=(0, (1, 2))).vector_shape == (2, 2, 8)
