"""Stacked layers (nn.scan with the layer axis at 0 or 1, nn.remat inside, nn.vmap) against the same
layers unrolled: outputs, gradients of the vectors, merge, unmerge and weighted adapters.

The reference is the block written out in plain jnp (no Flax, no interceptor), looped over the
stacked params sliced layer by layer: up's output (bias included) and down's input scaled by hand.
Tolerances: float32, the same ops in another order (measured below each assertion's TOL).
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import ia3_jax

L, D, H = 3, 8, 16
CONFIG = ia3_jax.IA3Config(target_modules=["up", "down"], feedforward_modules=["down"], init_ia3_weights=False)
# Measured over the four cases: outputs bitwise equal to the reference, merged outputs 4.8e-7 apart
# (values up to 6.5), vector gradients 1.7e-6 (values up to 6.8), unmerged kernels 3.6e-7.
TOL = {"rtol": 0, "atol": 1e-6}
GRAD_TOL = {"rtol": 0, "atol": 3.5e-6}


class Block(nn.Module):
    """A residual MLP block; biases included so that output vectors also scale a stacked bias."""

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.relu(nn.Dense(H, name="up")(x))
        return x + nn.Dense(D, name="down")(h), None


class Scanned(nn.Module):
    axis: int = 0
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        body = nn.remat(Block, prevent_cse=False) if self.remat else Block
        stack = nn.scan(body, variable_axes={"params": self.axis}, split_rngs={"params": True}, length=L)
        return stack(name="layers")(x, None)[0]


class Ensemble(nn.Module):
    """nn.vmap: L independent blocks, member i applied to x[i]."""

    @nn.compact
    def __call__(self, x):
        members = nn.vmap(Block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(0, None))
        return members(name="layers")(x, None)[0]


def layer(tree, i: int, axis: int):
    """Layer i of every stacked leaf (Flax stacks all of a layer's params at the same axis)."""
    return jax.tree.map(lambda a: jnp.take(a, i, axis=axis), tree)


def hand_block(p, x):
    """Block by hand: relu of up's scaled output, down applied to its scaled input, the residual."""
    up, down = p["up"], p["down"]
    h = jax.nn.relu((x @ up["kernel"] + up["bias"]) * up["ia3_l"])
    return x + (h * down["ia3_l"]) @ down["kernel"] + down["bias"]


def unrolled(params, x, axis: int, vmapped: bool):
    """The reference: the hand-written block, one per layer, on the layer's slice of the stacks."""
    ys = []
    for i in range(L):
        p = layer(params["layers"], i, axis)
        if vmapped:
            ys.append(hand_block(p, x[i]))
        else:
            x = hand_block(p, x)
    return jnp.stack(ys) if vmapped else x


def setup(model, x):
    params = model.init(jax.random.key(0), x)["params"]
    layouts = ia3_jax.infer_layouts(model.apply, {"params": params}, x)
    params = ia3_jax.ia3_init(params, CONFIG, rng=jax.random.key(1), layouts=layouts)
    return params, layouts


CASES = {
    "scan_axis0": (Scanned(axis=0), 0, False),
    "scan_axis1": (Scanned(axis=1), 1, False),
    "scan_remat": (Scanned(axis=0, remat=True), 0, False),
    "vmap": (Ensemble(), 0, True),
}


@pytest.mark.parametrize("name", CASES)
def test_stacked_equals_unrolled(name):
    model, axis, vmapped = CASES[name]
    x = jax.random.normal(jax.random.key(2), (L, 4, D) if vmapped else (4, D))
    params, layouts = setup(model, x)
    # The layer axis sits where Flax stacks it: (L, H) at axis 0, (H, L) at axis 1.
    assert params["layers"]["up"]["ia3_l"].shape == ((H, L) if axis == 1 else (L, H))
    assert params["layers"]["down"]["ia3_l"].shape == ((H, L) if axis == 1 else (L, H))
    assert layouts["layers.up"].stack_axes == (axis,)

    adapter, base = ia3_jax.split(params)
    forward = ia3_jax.apply_fn(model.apply, CONFIG)

    def loss(a, apply):
        return jnp.sum(jnp.sin(apply(ia3_jax.join(base, a), x)))

    y = forward({"params": params}, x)
    y_ref = unrolled(params, x, axis, vmapped)
    chex.assert_trees_all_close(y, y_ref, **TOL)

    grads = jax.jit(jax.grad(lambda a: loss(a, lambda p, x: forward({"params": p}, x))))(adapter)
    grads_ref = jax.jit(jax.grad(lambda a: loss(a, lambda p, x: unrolled(p, x, axis, vmapped))))(adapter)
    chex.assert_trees_all_close(grads, grads_ref, **GRAD_TOL)
    # every layer has its own gradient, not a shared one
    assert not np.allclose(
        layer(grads["layers"], 0, axis)["up"]["ia3_l"], layer(grads["layers"], 1, axis)["up"]["ia3_l"]
    )

    merged = ia3_jax.merge(params, CONFIG, layouts=layouts)
    chex.assert_trees_all_close(model.apply({"params": merged}, x), y_ref, **TOL)
    # Stacked merge == per-layer merges of the unrolled layers, restacked.
    for i in range(L):
        per_layer = ia3_jax.merge(layer(params["layers"], i, axis), CONFIG)
        chex.assert_trees_all_close(layer(merged["layers"], i, axis), per_layer, **TOL)

    with pytest.warns(UserWarning, match="inaccurate"):
        restored = ia3_jax.unmerge(merged, adapter, CONFIG, layouts=layouts)
    chex.assert_trees_all_close(restored, base, rtol=0, atol=7e-7)


def test_weighted_and_combined_stacked_adapters():
    model, x = Scanned(axis=1), jnp.ones((2, D))
    params, layouts = setup(model, x)
    a, base = ia3_jax.split(params)
    b = jax.tree.map(lambda v: 2.0 * v + 1.0, a)
    mixed = ia3_jax.add_weighted_adapter([a, b], [0.25, 0.75])
    product = ia3_jax.combine([a, b])
    for i in range(L):  # per layer: PEFT's weighted sum, and the product of two active adapters
        la, lb = layer(a["layers"], i, 1), layer(b["layers"], i, 1)
        chex.assert_trees_all_close(
            layer(mixed["layers"], i, 1), jax.tree.map(lambda u, v: 0.25 * u + 0.75 * v, la, lb)
        )
        chex.assert_trees_all_close(layer(product["layers"], i, 1), jax.tree.map(jnp.multiply, la, lb))
    merged_twice = ia3_jax.merge(
        ia3_jax.join(ia3_jax.merge(ia3_jax.join(base, a), CONFIG, layouts=layouts), b), CONFIG, layouts=layouts
    )
    chex.assert_trees_all_close(
        ia3_jax.merge(ia3_jax.join(base, product), CONFIG, layouts=layouts), merged_twice, **TOL
    )


@pytest.mark.parametrize("axis", [0, 1])
def test_stacked_kernel_without_layouts_is_refused(axis):
    model, x = Scanned(axis=axis), jnp.ones((2, D))
    params = model.init(jax.random.key(0), x)["params"]
    # (L, in, out) or (in, L, out) looks like a 1-D conv's (width, in, out): ia3_init must not guess.
    with pytest.raises(ia3_jax.LayoutError, match=r"layers\.(up|down).*infer_layouts\(model\.apply"):
        ia3_jax.ia3_init(params, CONFIG, rng=jax.random.key(1))
    layouts = ia3_jax.infer_layouts(model.apply, {"params": params}, x)
    stacked = ia3_jax.ia3_init(params, CONFIG, rng=jax.random.key(1), layouts=layouts)
    with pytest.raises(ia3_jax.LayoutError, match="infer_layouts"):
        ia3_jax.merge(stacked, CONFIG)


def test_conv_with_unstacked_bias_needs_no_layouts():
    """A bias of shape (out,) proves the 3-D kernel is not stacked: a 1-D conv, read from the tree."""
    conv = nn.Conv(6, (3,), name="conv")
    params = {"conv": conv.init(jax.random.key(0), jnp.ones((1, 5, 4)))["params"]}
    config = ia3_jax.IA3Config(target_modules=["conv"], feedforward_modules=["conv"])
    assert ia3_jax.ia3_init(params, config)["conv"]["ia3_l"].shape == (4,)
    no_bias = {"conv": {"kernel": params["conv"]["kernel"]}}
    with pytest.raises(ia3_jax.LayoutError, match="cannot tell"):
        ia3_jax.ia3_init(no_bias, config)


@pytest.mark.parametrize("axis", [0, 1])
def test_unstacked_adapter_saves_one_peft_key_per_layer(tmp_path, axis):
    model, x = Scanned(axis=axis), jnp.ones((2, D))
    params, layouts = setup(model, x)
    adapter, base = ia3_jax.split(params)
    per_layer = ia3_jax.unstack(adapter, "layers", axis=axis, layouts=layouts)
    for i in range(L):  # layer i of the stack, now at layers.<i>
        chex.assert_trees_all_equal(per_layer["layers"][str(i)], layer(adapter["layers"], i, axis))
    chex.assert_trees_all_equal(ia3_jax.stack(per_layer, "layers", axis=axis, layouts=layouts), adapter)
    # The other axis is refused by the layouts (the shapes alone cannot tell it when layers == features).
    with pytest.raises(ia3_jax.StructureError, match=rf"axis={1 - axis} is not a layer axis of 'layers\.\w+'.*axis={axis}"):
        ia3_jax.unstack(adapter, "layers", axis=1 - axis, layouts=layouts)
    with pytest.raises(ia3_jax.StructureError, match=rf"Pass axis={axis}"):
        ia3_jax.stack(per_layer, "layers", axis=1 - axis, layouts=layouts)
    with pytest.raises(ia3_jax.StructureError, match=r"axis=-1: with layouts=, give the layer axis as"):
        ia3_jax.unstack(adapter, "layers", axis=-1, layouts=layouts)

    flat_base = ia3_jax.unstack(base, "layers", axis=axis)
    with pytest.raises(ia3_jax.LayoutError, match=r"infer_layouts.*one module per layer.*ia3_jax.unstack\(tree"):
        ia3_jax.save_peft(tmp_path, adapter, CONFIG, params=base)  # stacked: the error names the way that works
    assert not (tmp_path / "adapter_config.json").exists()
    ia3_jax.save_peft(tmp_path, per_layer, CONFIG, params=flat_base)
    tensors = safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(f"base_model.model.layers.{i}.{m}.ia3_l" for i in range(L) for m in ("up", "down"))
    np.testing.assert_array_equal(
        tensors["base_model.model.layers.2.down.ia3_l"][0], per_layer["layers"]["2"]["down"]["ia3_l"]
    )
    loaded, _ = ia3_jax.load_peft(tmp_path, flat_base)
    chex.assert_trees_all_equal(ia3_jax.stack(loaded, "layers", axis=axis), adapter)


def test_unstack_refuses_a_root_without_one_layer_axis():
    model, x = Scanned(), jnp.ones((2, D))
    params, _ = setup(model, x)
    with pytest.raises(ia3_jax.StructureError, match="no module 'layer'"):
        ia3_jax.unstack(params, "layer")
    with pytest.raises(ia3_jax.StructureError, match="layer axis 2"):
        ia3_jax.unstack(params, "layers", axis=2)
    with pytest.raises(ia3_jax.StructureError, match="not the layers"):
        ia3_jax.stack(params, "layers")
    per_layer = ia3_jax.unstack(params, "layers")
    per_layer["layers"]["1"]["up"]["kernel"] = per_layer["layers"]["1"]["up"]["kernel"][:, :1]
    with pytest.raises(ia3_jax.StructureError, match=r"layer layers\.1 differs from layers\.0"):
        ia3_jax.stack(per_layer, "layers")
