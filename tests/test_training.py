"""Training with plain optax: the adapter from `split`, `make_train_step`, `trainable_mask`.

References: a float64 numpy backward pass written out by hand, gradients of the *merged* model
(vectors folded into the kernels, no interceptor) and hand-written SGD updates. Tolerances: float32
against float64, 1e-5 relative.
"""

from __future__ import annotations

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import ia3_jax
from tests.models import MLP

CONFIG = ia3_jax.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"], modules_to_save=["lin2"])
X = jax.random.normal(jax.random.key(1), (6, 5))
Y = jnp.array([0, 1, 2, 0, 1, 2])
LR = 0.1


def _random_like(tree, seed=0):
    """Random arrays shaped like `tree`: vectors in [0.5, 1.5], the rest N(0, 0.5).

    Filled from numpy, as compiling XLA initialisers would dominate the test time.
    """
    rng = np.random.default_rng(seed)

    def fill(path, s):
        if path[-1].key == "ia3_l":
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
        return jnp.asarray(rng.normal(0.0, 0.5, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, tree)


def _params():
    """MLP params with random vectors (not ones), so that every gradient entry is generic."""
    return _random_like(ia3_jax.ia3_init(jax.eval_shape(MLP().init, jax.random.key(0), X)["params"], CONFIG))


_forward = ia3_jax.apply_fn(MLP().apply, CONFIG)


def _loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(_forward({"params": params}, x), y).mean()


def _merged_loss(params, x, y):
    """The same loss through the merged model: no interceptor, an independent path to the gradients."""
    logits = MLP().apply({"params": ia3_jax.merge(params, CONFIG)}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@jax.jit
def _merged_grad(adapter, base):
    return jax.grad(lambda a: _merged_loss(ia3_jax.join(base, a), X, Y))(adapter)


def _hand_grad(params):
    """The gradient of the mean cross-entropy over (X, Y) w.r.t. the adapter, by a float64 backward pass.

    Forward: z0 = x W0 + b0, h0 = relu(z0 * l0)  (output vector, bias scaled too);
             u = h0 * l1, h1 = relu(u W1 + b1)   (feedforward vector, input scaled);
             logits = h1 W2 + b2                (modules_to_save: trained in full).
    """
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x, y = np.asarray(X, np.float64), np.asarray(Y)
    z0 = x @ p["lin0"]["kernel"] + p["lin0"]["bias"]
    a0 = z0 * p["lin0"]["ia3_l"]
    h0 = np.maximum(a0, 0)
    u = h0 * p["lin1"]["ia3_l"]
    z1 = u @ p["lin1"]["kernel"] + p["lin1"]["bias"]
    h1 = np.maximum(z1, 0)
    logits = h1 @ p["lin2"]["kernel"] + p["lin2"]["bias"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    d_logits = (probs - np.eye(logits.shape[-1])[y]) / len(y)
    d_z1 = (d_logits @ p["lin2"]["kernel"].T) * (z1 > 0)
    d_u = d_z1 @ p["lin1"]["kernel"].T
    d_a0 = d_u * p["lin1"]["ia3_l"] * (a0 > 0)
    return {
        "lin0": {"ia3_l": (d_a0 * z0).sum(0)},
        "lin1": {"ia3_l": (d_u * h0).sum(0)},
        "lin2": {"kernel": h1.T @ d_logits, "bias": d_logits.sum(0)},
    }


def _paths(tree):
    return set(traverse_util.flatten_dict(tree))


def test_grad_is_over_the_adapter_only_and_matches_merged_model():
    adapter, base = ia3_jax.split(_params(), CONFIG)
    grad_fn = jax.jit(jax.grad(lambda a, b: _loss(ia3_jax.join(b, a), X, Y)))
    grads = grad_fn(adapter, base)
    chex.assert_trees_all_equal_structs(grads, adapter)
    assert _paths(grads) == {
        ("lin0", "ia3_l"), ("lin1", "ia3_l"), ("lin2", "kernel"), ("lin2", "bias")
    }
    chex.assert_trees_all_close(grads, _hand_grad(ia3_jax.join(base, adapter)), rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(grads, _merged_grad(adapter, base), rtol=1e-5, atol=1e-7)


def test_three_sgd_steps_change_only_the_adapter():
    params = _params()
    adapter0, base = ia3_jax.split(params, CONFIG)
    optimizer = optax.sgd(LR)
    opt_state = optimizer.init(adapter0)
    step = ia3_jax.make_train_step(_loss, optimizer)
    adapter = adapter0
    for _ in range(3):
        adapter, opt_state, loss = step(adapter, opt_state, base, X, Y)
    assert jnp.isfinite(loss)

    # Reference: hand-written SGD on the hand-written gradients.
    expected = adapter0
    for _ in range(3):
        g = _hand_grad(ia3_jax.join(base, expected))
        expected = jax.tree.map(lambda a, g: a - LR * g, expected, g)
    chex.assert_trees_all_close(adapter, expected, rtol=1e-5, atol=1e-6)

    trained = ia3_jax.join(base, adapter)
    changed = _paths(adapter)
    before = traverse_util.flatten_dict(params)
    for path, leaf in traverse_util.flatten_dict(trained).items():
        if path in changed:
            assert not jnp.array_equal(leaf, before[path]), f"{path} did not train"
        else:
            chex.assert_trees_all_equal(leaf, before[path])  # the base, bit for bit
    assert changed == {("lin0", "ia3_l"), ("lin1", "ia3_l"), ("lin2", "kernel"), ("lin2", "bias")}


def test_train_step_aux_and_donation():
    adapter, base = ia3_jax.split(_params(), CONFIG)
    optimizer = optax.adam(1e-2)

    def loss_with_aux(params, x, y):
        loss = _loss(params, x, y)
        return loss, {"loss": loss}

    step = ia3_jax.make_train_step(loss_with_aux, optimizer, has_aux=True, donate=True)
    opt_state = optimizer.init(adapter)
    # Optimizer state covers the adapter leaves only (Adam: mu and nu per adapter leaf).
    mu = opt_state[0].mu
    chex.assert_trees_all_equal_structs(mu, adapter)
    reference = jax.jit(_loss)(ia3_jax.join(base, adapter), X, Y)
    kept = jax.tree.map(jnp.copy, adapter)
    new, opt_state, (loss, aux) = step(adapter, opt_state, base, X, Y)
    chex.assert_trees_all_close(loss, reference, rtol=1e-6)
    chex.assert_trees_all_equal(aux["loss"], loss)
    assert adapter["lin0"]["ia3_l"].is_deleted(), "donate=True should hand the adapter buffers to the step"
    assert not jnp.array_equal(new["lin0"]["ia3_l"], kept["lin0"]["ia3_l"])


def test_trainable_mask_marks_exactly_the_split_adapter():
    params = _params()
    mask = ia3_jax.trainable_mask(params, CONFIG)
    chex.assert_trees_all_equal_structs(mask, params)
    adapter, _ = ia3_jax.split(params, CONFIG)
    assert {p for p, m in traverse_util.flatten_dict(mask).items() if m} == _paths(adapter)
    with pytest.raises(ia3_jax.StructureError, match="hold no IA3 vector.*ia3_init"):
        ia3_jax.trainable_mask(ia3_jax.split(params)[1])
    # Without a config, modules_to_save are not known: vectors only.
    assert {p for p, m in traverse_util.flatten_dict(ia3_jax.trainable_mask(params)).items() if m} == {
        ("lin0", "ia3_l"), ("lin1", "ia3_l")
    }


@pytest.mark.parametrize("style", ["multi_transform", "masked"])
def test_trainable_mask_with_optax_matches_split(style):
    params = _params()
    mask = ia3_jax.trainable_mask(params, CONFIG)
    adam = optax.adam(1e-2)
    if style == "multi_transform":
        labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
        whole = optax.multi_transform({"train": adam, "freeze": optax.set_to_zero()}, labels)
    else:
        frozen = jax.tree.map(lambda m: not m, mask)
        whole = optax.chain(optax.masked(adam, mask), optax.masked(optax.set_to_zero(), frozen))

    @jax.jit
    def whole_step(params, state):
        grads = jax.grad(_loss)(params, X, Y)
        updates, state = whole.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    one_tree, state = params, whole.init(params)
    adapter, base = ia3_jax.split(params, CONFIG)
    split_step = ia3_jax.make_train_step(_loss, adam)
    adapter_state = adam.init(adapter)
    for _ in range(3):
        one_tree, state = whole_step(one_tree, state)
        adapter, adapter_state, _ = split_step(adapter, adapter_state, base, X, Y)
    chex.assert_trees_all_close(one_tree, ia3_jax.join(base, adapter), rtol=1e-6, atol=1e-7)
    frozen_paths = {p for p, m in traverse_util.flatten_dict(mask).items() if not m}
    before = traverse_util.flatten_dict(params)
    for path, leaf in traverse_util.flatten_dict(one_tree).items():
        if path in frozen_paths:
            chex.assert_trees_all_equal(leaf, before[path])


class _Sharded(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(
            n, name=name, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        )
        return nn.Dense(2, name="head")(dense(8, "wo")(nn.relu(dense(8, "k")(x))))


def test_trainable_mask_keeps_boxed_structure():
    model = _Sharded()
    config = ia3_jax.IA3Config(target_modules=["k", "wo"], feedforward_modules=["wo"], modules_to_save=["head"])
    params = ia3_jax.ia3_init(jax.eval_shape(model.init, jax.random.key(0), jnp.ones((2, 4)))["params"], config)
    mask = ia3_jax.trainable_mask(params, config)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    assert isinstance(mask["k"]["ia3_l"], nn.Partitioned) and mask["k"]["ia3_l"].value is True
    assert isinstance(mask["k"]["kernel"], nn.Partitioned) and mask["k"]["kernel"].value is False
    assert mask["head"]["kernel"] is True and mask["k"]["bias"] is False
    # optax accepts it as is.
    tx = optax.multi_transform(
        {"train": optax.sgd(0.1), "freeze": optax.set_to_zero()},
        jax.tree.map(lambda m: "train" if m else "freeze", mask),
    )
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    chex.assert_trees_all_equal(nn.unbox(updates["k"]["kernel"]), jnp.zeros((4, 8)))
    chex.assert_trees_all_equal(nn.unbox(updates["k"]["ia3_l"]), jnp.full((8,), -0.1))


def _dot_count(fn, *args) -> int:
    hlo = jax.jit(fn).lower(*args).as_text()
    return len(re.findall(r"stablehlo\.dot_general", hlo))


def test_ia3_gradient_computes_no_weight_gradients():
    """Structural: the IA3 gradient has no more matrix products than a frozen model's input-side gradient."""
    config = CONFIG.replace(modules_to_save=None)
    params = _params()
    adapter, base = ia3_jax.split(params)
    forward = ia3_jax.apply_fn(MLP().apply, config)

    def loss(adapter, base):
        logits = forward({"params": ia3_jax.join(base, adapter)}, X)
        return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()

    ia3_dots = _dot_count(jax.grad(loss), adapter, base)

    def floor(bias):  # gradient w.r.t. the first layer's bias forces the whole activation backward pass
        p = {**base, "lin0": {**base["lin0"], "bias": bias}}
        return optax.softmax_cross_entropy_with_integer_labels(MLP().apply({"params": p}, X), Y).mean()

    floor_dots = _dot_count(jax.grad(floor), base["lin0"]["bias"])
    full_dots = _dot_count(jax.grad(lambda p: loss({}, p)), params)
    assert ia3_dots <= floor_dots < full_dots, (ia3_dots, floor_dots, full_dots)
