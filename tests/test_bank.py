"""Adapter banks: a mixed batch equals running each example alone with its adapter.

The reference for every example is the ordinary single-adapter path: ``apply_fn`` on the example
alone with ``join(base, adapter_i)`` (unmerged), ``merge`` of that adapter (merged), and the base
model without any vector for id -1. N = 5 adapters (8 where the bank is sharded 8 ways), output
targets (multi-axis DenseGeneral k/v, Dense up with its bias) and a feedforward target (down).

Tolerances: a mixed batch and the single-example runs are the same ops per example, measured
bitwise equal in float32 and bf16 (atol 1e-6 allowed for XLA compiling a batch of another size
differently); merged vs mixed measured 9.5e-7 (values up to 5.7), 1.7e-5 through 3 scanned layers
(values up to 29), 3.1e-2 in bf16 (one bf16 step at 4); gradients measured GRAD below.
"""

from __future__ import annotations

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ia3_jax

N, B, S, D, H, L = 5, 7, 3, 8, 16, 3
IDS = jnp.array([2, -1, 0, 4, 2, 1, -1])  # two examples share adapter 2; adapter 3 is unused
CONFIG = ia3_jax.IA3Config(
    target_modules=["k", "v", "up", "down"], feedforward_modules=["down"], init_ia3_weights=False
)
TOL = {"rtol": 0, "atol": 1e-6}
MERGED_TOL = {"rtol": 0, "atol": 2e-6}
SCAN_MERGED_TOL = {"rtol": 0, "atol": 4e-5}
BF16_MERGED_TOL = {"rtol": 0, "atol": 6e-2}
GRAD_TOL = {"rtol": 0, "atol": 4e-6}


class Block(nn.Module):
    """Attention (k, v: (heads, head_dim) output vectors) and an MLP (up: output + bias, down: input)."""

    dtype: jnp.dtype = jnp.float32
    hidden: int = H

    @nn.compact
    def __call__(self, x, _=None):
        def dense(features, name, **kw):
            return nn.DenseGeneral(features, name=name, dtype=self.dtype, param_dtype=self.dtype, **kw)

        q, k, v = (dense((2, 4), name)(x) for name in ("q", "k", "v"))
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0)
        x = x + dense(D, "o", axis=(-2, -1))(jnp.einsum("bhqk,bkhd->bqhd", w, v))
        h = nn.relu(dense(self.hidden, "up")(x))
        return x + dense(D, "down")(h), None


class Model(nn.Module):
    dtype: jnp.dtype = jnp.float32
    hidden: int = H

    @nn.compact
    def __call__(self, x):
        return Block(self.dtype, self.hidden, name="block")(x)[0]


class Scanned(nn.Module):
    axis: int = 0

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Block, variable_axes={"params": self.axis}, split_rngs={"params": True}, length=L)
        return stack(name="layers")(x, None)[0]


def adapters(params, layouts, n: int = N) -> list[dict]:
    """n random adapters (standard-normal vectors: far from identity, so a wrong pick shows)."""
    return [
        ia3_jax.split(ia3_jax.ia3_init(params, CONFIG, rng=jax.random.key(10 + i), layouts=layouts)).adapter
        for i in range(n)
    ]


def setup(model, x):
    """The base params and their kernel layouts (for ia3_init, merge, PEFT I/O), built once per model."""
    return _setup(model, x.shape, jnp.dtype(x.dtype))


@functools.cache
def _setup(model, shape, dtype):
    x = jnp.zeros(shape, dtype)
    base = jax.jit(model.init)(jax.random.key(0), x)["params"]
    return base, ia3_jax.infer_layouts(model.apply, {"params": base}, x)


def reference(model, base, singles, x, ids, merged=False, layouts=None):
    """Each example alone: its adapter joined (or merged) into the base, or the base for id -1.

    All through one compiled single-adapter call: the merged model and the base model run there
    with unit vectors, which change nothing (``x * 1`` is exact).
    """
    single = jax.jit(ia3_jax.apply_fn(model.apply, CONFIG))
    fold = jax.jit(lambda adapter: ia3_jax.merge(ia3_jax.join(base, adapter), CONFIG, layouts=layouts))
    unit = jax.tree.map(jnp.ones_like, singles[0])
    rows = []
    for b, i in enumerate(np.asarray(ids)):
        if i == ia3_jax.NO_ADAPTER:
            params = ia3_jax.join(base, unit)
        elif merged:
            params = ia3_jax.join(fold(singles[i]), unit)
        else:
            params = ia3_jax.join(base, singles[i])
        rows.append(single({"params": params}, x[b : b + 1]))
    return jnp.concatenate(rows)


def mixed_forward(apply, way: str, stack_axes=None):
    """``(params with a bank, x, ids) -> y`` the bank's way (``"bank"``: `bank_apply_fn` picks in every call)
    or picked once (``"picked"``: `per_example_adapter` + `per_example_apply_fn`)."""
    if way == "bank":
        banked = ia3_jax.bank_apply_fn(apply, CONFIG)
        return lambda params, x, ids: banked(params, x, adapter_ids=ids)
    picked = ia3_jax.per_example_apply_fn(apply, CONFIG)

    def forward(params, x, ids):
        parts = ia3_jax.split(params["params"])
        rows = ia3_jax.per_example_adapter(parts.adapter, ids, stack_axes=stack_axes)
        return picked({"params": ia3_jax.join(parts.base, rows)}, x)

    return forward


WAYS = ["bank", "picked"]


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mixed_batch_equals_each_example_alone(dtype, way):
    model = Model(dtype)
    x = jax.random.normal(jax.random.key(1), (B, S, D), dtype)
    base, layouts = setup(model, x)
    singles = [jax.tree.map(lambda v: v.astype(dtype), a) for a in adapters(base, layouts)]
    bank = ia3_jax.stack_adapters(singles)
    assert bank["block"]["k"]["ia3_l"].shape == (2, 4, N)  # (heads, head_dim, adapters)
    assert bank["block"]["down"]["ia3_l"].shape == (H, N)  # the input features of down

    forward = jax.jit(mixed_forward(model.apply, way))
    got = forward({"params": ia3_jax.join(base, bank)}, x, IDS)
    assert got.dtype == dtype
    chex.assert_trees_all_close(got, reference(model, base, singles, x, IDS), **TOL)
    merged_tol = MERGED_TOL if dtype == jnp.float32 else BF16_MERGED_TOL
    merged = reference(model, base, singles, x, IDS, merged=True, layouts=layouts)
    chex.assert_trees_all_close(got, merged, **merged_tol)
    # Every adapter changes its rows: they are not the base model's.
    plain = reference(model, base, singles, x, jnp.full_like(IDS, -1))
    assert np.all(np.abs(np.asarray(got - plain, np.float32))[IDS >= 0].max(axis=(1, 2)) > 1e-2)


@pytest.mark.parametrize("way", WAYS)
def test_gradients_reach_only_each_examples_adapter(way):
    model = Model()
    x = jax.random.normal(jax.random.key(1), (B, S, D))
    base, layouts = setup(model, x)
    singles = adapters(base, layouts)
    bank = ia3_jax.stack_adapters(singles)
    forward = mixed_forward(model.apply, way)

    def per_example_losses(y):
        return jnp.sum(jnp.sin(y), axis=(1, 2))

    def loss(bank):  # multi-task: one batch, each example trains its own adapter
        return jnp.sum(per_example_losses(forward({"params": ia3_jax.join(base, bank)}, x, IDS)))

    grads = jax.jit(jax.grad(loss))(bank)
    single = ia3_jax.apply_fn(model.apply, CONFIG)

    @jax.jit
    def single_grad(adapter, xs, weights):  # the gradient of adapter i's examples (weight 1) alone
        y = single({"params": ia3_jax.join(base, adapter)}, xs)
        return jax.grad(lambda a: jnp.sum(weights * per_example_losses(single({"params": ia3_jax.join(base, a)}, xs))))(
            adapter
        ), y

    expected = []
    for i in range(N):
        g, _ = single_grad(singles[i], x, (IDS == i).astype(jnp.float32))
        expected.append(g)
    chex.assert_trees_all_close(grads, ia3_jax.stack_adapters(expected), **GRAD_TOL)
    # The unused adapter 3 gets exactly zero; the used ones do not.
    for g in jax.tree.leaves(grads):
        assert np.all(np.asarray(g[..., 3]) == 0)
        assert np.all(np.abs(np.asarray(g[..., [0, 1, 2, 4]])).reshape(-1, 4).max(axis=0) > 0)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("axis", [0, 1])
def test_scan_stacked_layers(axis, way):
    """The adapter axis sits after the layer axis, so nn.scan slices the layers and keeps the adapters;
    picked rows are stacked at the layer axis the same way."""
    model = Scanned(axis)
    x = jax.random.normal(jax.random.key(1), (B, S, D))
    base, layouts = setup(model, x)
    singles = adapters(base, layouts)
    bank = ia3_jax.stack_adapters(singles)
    assert bank["layers"]["up"]["ia3_l"].shape == ((H, L, N) if axis else (L, H, N))
    stack_axes = {"layers": axis}
    rows = ia3_jax.per_example_adapter(bank, IDS, stack_axes=stack_axes)["layers"]["up"]["ia3_l"]
    assert rows.value.shape == ((B, L, H) if axis else (L, B, H)) and rows.layer_axes == (axis,)
    forward = jax.jit(mixed_forward(model.apply, way, stack_axes))
    got = forward({"params": ia3_jax.join(base, bank)}, x, IDS)
    chex.assert_trees_all_close(got, reference(model, base, singles, x, IDS), **TOL)
    chex.assert_trees_all_close(
        got, reference(model, base, singles, x, IDS, merged=True, layouts=layouts), **SCAN_MERGED_TOL
    )


@pytest.mark.parametrize("way", WAYS)
def test_vmap_over_groups_of_examples(way):
    model = Model()
    x = jax.random.normal(jax.random.key(1), (2, B, S, D))
    ids = jnp.stack([IDS, IDS[::-1]])
    base, layouts = setup(model, x[0])
    singles = adapters(base, layouts)
    forward = mixed_forward(model.apply, way)
    params = {"params": ia3_jax.join(base, ia3_jax.stack_adapters(singles))}
    got = jax.jit(jax.vmap(lambda x, ids: forward(params, x, ids)))(x, ids)
    for g in range(2):
        chex.assert_trees_all_close(got[g], reference(model, base, singles, x[g], ids[g]), **TOL)


@pytest.mark.parametrize(
    ("bank_axis", "way"), [(None, "bank"), ("data", "bank"), ("data", "picked")], ids=["replicated", "sharded", "picked"]
)
def test_sharded_jit(bank_axis, way):
    """Batch sharded 8 ways; the bank replicated, or its 8 adapters split 8 ways along the adapter axis."""
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    mesh = Mesh(np.array(jax.devices()), ("data",))
    model = Model()
    x = jax.random.normal(jax.random.key(1), (8, S, D))
    ids = jnp.array([7, -1, 0, 3, 3, 5, 1, 6])
    base, layouts = setup(model, x)
    bank = ia3_jax.stack_adapters(adapters(base, layouts, 8))
    bank_sharding = jax.tree.map(lambda v: NamedSharding(mesh, P(*(None,) * (v.ndim - 1), bank_axis)), bank)
    params = {"params": ia3_jax.join(base, jax.device_put(bank, bank_sharding))}
    batch = NamedSharding(mesh, P("data"))
    forward = mixed_forward(model.apply, way)
    jitted = jax.jit(forward)
    got = jitted(params, jax.device_put(x, batch), jax.device_put(ids, batch))
    assert got.sharding.spec[0] == "data"
    chex.assert_trees_all_close(got, jitted(jax.device_get(params), x, ids), **TOL)
    assert params["params"]["block"]["up"]["ia3_l"].sharding == bank_sharding["block"]["up"]["ia3_l"]
    grad = jax.jit(jax.grad(lambda bank, base, x: jnp.sum(forward({"params": ia3_jax.join(base, bank)}, x, ids) ** 2)))
    sharded_bank = jax.device_put(bank, bank_sharding)
    chex.assert_trees_all_close(
        grad(sharded_bank, base, jax.device_put(x, batch)), grad(bank, base, x), rtol=1e-6, atol=1e-6
    )


# --- Hugging Face Flax generate: the ids stay with their sequences through the KV-cached steps ---


@pytest.mark.slow
@pytest.mark.interop
def test_hf_generate_on_tiny_gpt2():
    import transformers as tf

    from ia3_jax import hf

    model = tf.FlaxGPT2LMHeadModel(
        tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, vocab_size=96, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2),
        seed=0,
    )
    config = hf.default_config(model, init_ia3_weights=False)
    singles = [
        ia3_jax.split(ia3_jax.ia3_init(model.params, config, rng=jax.random.key(10 + i))).adapter for i in range(N)
    ]
    bank = ia3_jax.stack_adapters(singles)
    ids = jnp.array([3, -1, 0, 4, 1])
    prompts = jax.random.randint(jax.random.key(1), (5, 4), 3, 96)

    def greedy(tokens, params):
        return model.generate(tokens, params=params, max_new_tokens=4, do_sample=False).sequences

    mixed = jax.jit(ia3_jax.bank_apply_fn(greedy, config))
    got = mixed(prompts, ia3_jax.join(model.params, bank), adapter_ids=ids)
    picked = jax.jit(ia3_jax.per_example_apply_fn(greedy, config))
    rows = ia3_jax.per_example_adapter(bank, ids)
    chex.assert_trees_all_equal(picked(prompts, ia3_jax.join(model.params, rows)), got)
    # Each sequence alone, with its adapter; id -1 with unit vectors (x * 1 is exact): one compilation.
    single = jax.jit(ia3_jax.apply_fn(greedy, config))
    unit = jax.tree.map(jnp.ones_like, singles[0])
    for b, i in enumerate(np.asarray(ids)):
        adapter = unit if i < 0 else singles[i]
        chex.assert_trees_all_equal(got[b], single(prompts[b : b + 1], ia3_jax.join(model.params, adapter))[0])
    assert len({tuple(row[4:]) for row in np.asarray(got)}) > 2  # the adapters steer the continuations apart


# --- building banks: from adapters, orbax checkpoints and PEFT directories; add, remove, select ---


def test_bank_from_checkpoints_and_peft_directories(tmp_path):
    model = Model()
    x = jnp.ones((1, S, D))
    base, layouts = setup(model, x)
    singles = adapters(base, layouts, 3)
    ia3_jax.save_adapter(tmp_path / "orbax", singles[0], CONFIG)
    ia3_jax.save_peft(tmp_path / "peft1", singles[1], CONFIG, params=base, layouts=layouts)
    ia3_jax.save_peft(tmp_path / "peft2", singles[2], CONFIG, params=base, layouts=layouts)
    loaded = [
        ia3_jax.load_adapter(tmp_path / "orbax"),
        ia3_jax.load_peft(tmp_path / "peft1", base, layouts=layouts),
        ia3_jax.load_peft(tmp_path / "peft2", base, layouts=layouts),
    ]
    bank = ia3_jax.stack_adapters(loaded[:2], CONFIG)
    bank = ia3_jax.bank_add(bank, loaded[2], CONFIG)
    assert ia3_jax.bank_size(bank) == 3
    for i in range(3):
        chex.assert_trees_all_close(ia3_jax.bank_select(bank, i), singles[i], rtol=0, atol=0)
    smaller = ia3_jax.bank_remove(bank, 1)
    chex.assert_trees_all_equal(smaller, ia3_jax.stack_adapters([singles[0], singles[2]]))


def test_stacking_refuses_adapters_that_differ():
    model = Model()
    a, b = adapters(*setup(model, jnp.ones((1, S, D))), 2)
    fewer = {"block": {k: v for k, v in b["block"].items() if k != "up"}}
    with pytest.raises(ia3_jax.StructureError, match=r"adapter 1 .*missing \['block\.up'\]"):
        ia3_jax.stack_adapters([a, fewer])
    wider = jax.tree.map(lambda v: jnp.concatenate([v, v], -1), b)
    with pytest.raises(ia3_jax.StructureError, match=r"adapter 1 has a vector of shape \(32,\) at 'block.down'"):
        ia3_jax.stack_adapters([a, wider])
    saved = {**b, "head": {"kernel": jnp.ones((D, 2))}}  # a modules_to_save copy
    with pytest.raises(ia3_jax.StructureError, match="'head.kernel'.*modules_to_save"):
        ia3_jax.stack_adapters([a, saved])
    other_side = CONFIG.replace(feedforward_modules=["down", "up"])
    with pytest.raises(ia3_jax.IA3ConfigError, match=r"adapter 1 scales the input \(feedforward\) of 'block.up'"):
        ia3_jax.stack_adapters([(a, CONFIG), (b, other_side)])
    with pytest.raises(ia3_jax.IA3ConfigError, match="fan_in_fan_out"):
        ia3_jax.bank_add(ia3_jax.stack_adapters([a]), (b, CONFIG.replace(fan_in_fan_out=True)), CONFIG)
    two = ia3_jax.stack_adapters([a, b])
    with pytest.raises(ia3_jax.AdapterIdsError, match="index 2 is not one of the bank's 0..1"):
        ia3_jax.bank_select(two, 2)
    # Any integer scalar selects (a JAX or NumPy one too); a bool is not an index.
    chex.assert_trees_all_equal(ia3_jax.bank_select(two, jnp.int32(1)), ia3_jax.bank_select(two, np.int64(1)))
    chex.assert_trees_all_equal(ia3_jax.bank_select(two, jnp.int32(1)), b)
    with pytest.raises(ia3_jax.AdapterIdsError, match="index True is not one of"):
        ia3_jax.bank_select(two, True)


# --- calls that cannot be right: refused before anything runs ---


@pytest.fixture(scope="module")
def served():
    model = Model()
    x = jax.random.normal(jax.random.key(1), (B, S, D))
    base, layouts = setup(model, x)
    return model, base, ia3_jax.stack_adapters(adapters(base, layouts)), x


def test_ids_out_of_range_or_malformed(served):
    model, base, bank, x = served
    forward = ia3_jax.bank_apply_fn(model.apply, CONFIG)
    params = {"params": ia3_jax.join(base, bank)}
    bad = IDS.at[3].set(N).at[5].set(-2)
    with pytest.raises(ia3_jax.AdapterIdsError, match=r"positions \{3: 5, 5: -2\}.*0\.\.4 for a bank of 5"):
        forward(params, x, adapter_ids=bad)  # concrete ids: checked on the host before the call
    with pytest.raises(ia3_jax.AdapterIdsError, match="positions"):
        ia3_jax.check_adapter_ids(bad, bank)
    ia3_jax.check_adapter_ids(IDS, bank)
    with pytest.raises(ia3_jax.AdapterIdsError, match="wrapped by bank_apply_fn needs adapter_ids="):
        forward(params, x)
    with pytest.raises(ia3_jax.AdapterIdsError, match="1-D signed integer array"):
        forward(params, x, adapter_ids=IDS.astype(jnp.float32))
    with pytest.raises(ia3_jax.AdapterIdsError, match="1-D signed integer array"):
        forward(params, x, adapter_ids=IDS[:, None])
    # Unsigned: under jit 2**32 - 1 would compare equal to NO_ADAPTER (-1) and serve the base model silently.
    with pytest.raises(ia3_jax.AdapterIdsError, match=r"signed integer array \(NO_ADAPTER is -1\).*uint32"):
        jax.jit(forward)(params, x, adapter_ids=IDS.astype(jnp.uint32))
    # Under jit the values are tracers: an out-of-range id poisons its own row only (NaN), never
    # silently picks another adapter (-2 would wrap around to adapter N - 2 in numpy indexing).
    got = jax.jit(forward)(params, x, adapter_ids=bad)
    rows = np.isnan(np.asarray(got)).any(axis=(1, 2))
    np.testing.assert_array_equal(rows, np.isin(np.arange(B), [3, 5]))
    # The context manager checks the same, where the values are known.
    with pytest.raises(ia3_jax.AdapterIdsError, match=r"positions \{3: 5, 5: -2\}"):
        with ia3_jax.intercept(CONFIG, adapter_ids=bad):
            model.apply(params, x)
    with pytest.raises(ia3_jax.AdapterIdsError, match="1-D signed integer array"):
        with ia3_jax.intercept(CONFIG, adapter_ids=IDS.astype(jnp.float32)):
            model.apply(params, x)


def test_batch_size_and_base_mismatches_fail_at_trace_time(served):
    model, base, bank, x = served
    forward = ia3_jax.bank_apply_fn(model.apply, CONFIG)
    params = {"params": ia3_jax.join(base, bank)}
    with pytest.raises(ia3_jax.AdapterIdsError, match=r"adapter_ids has 6 entries.*'block.k'.*jnp.repeat"):
        jax.eval_shape(lambda p, x, ids: forward(p, x, adapter_ids=ids), params, x, IDS[:6])
    # A bank for another base (a wider MLP): the features do not fit, named at trace time.
    wide_model = Model(hidden=2 * H)
    wide = {"params": ia3_jax.join(setup(wide_model, x)[0], bank)}
    wide_forward = ia3_jax.bank_apply_fn(wide_model.apply, CONFIG)
    with pytest.raises(ia3_jax.VectorShapeError, match=r"bank vector at 'block.up'.*\(16, 5\).*another base model"):
        jax.eval_shape(lambda p: wide_forward(p, x, adapter_ids=IDS), wide)
    # A single adapter given to a bank call, and a bank given to the single-adapter call.
    single = ia3_jax.bank_select(bank, 0)
    with pytest.raises(ia3_jax.StructureError, match="a single adapter's vectors.*stack_adapters"):
        forward({"params": ia3_jax.join(base, single)}, x, adapter_ids=IDS)
    ups = {"block": {"up": single["block"]["up"], "down": single["block"]["up"]}}  # all (16,): looks like a bank
    with pytest.raises(ia3_jax.VectorShapeError, match="bank vector at 'block.up' has shape \\(16,\\).*stack_adapters"):
        jax.eval_shape(lambda p: forward(p, x, adapter_ids=IDS), {"params": ia3_jax.join(base, ups)})
    with pytest.raises(ia3_jax.VectorShapeError):
        jax.eval_shape(ia3_jax.apply_fn(model.apply, CONFIG), params, x)
    with pytest.raises(ia3_jax.VectorShapeError, match=r"5 vectors along the last axis. A bank.*bank_select\(bank, i\)"):
        ia3_jax.merge(ia3_jax.join(base, {"block": {"up": bank["block"]["up"]}}), CONFIG)
    # Vectors of two bank sizes in one call.
    mixed = ia3_jax.join(base, {"block": {**bank["block"], "up": ia3_jax.bank_remove(bank, 0)["block"]["up"]}})
    with pytest.raises(ia3_jax.StructureError, match="different sizes"):
        forward({"params": mixed}, x, adapter_ids=IDS)
    with pytest.raises(ia3_jax.AlreadyJittedError, match="bank_apply_fn"):
        ia3_jax.bank_apply_fn(jax.jit(model.apply), CONFIG)


def test_picked_rows_refuse_what_does_not_fit(served, tmp_path):
    model, base, bank, x = served
    forward = ia3_jax.per_example_apply_fn(model.apply, CONFIG)
    with pytest.raises(ia3_jax.StructureError, match="'layers', which holds no vector of the bank"):
        ia3_jax.per_example_adapter(bank, IDS, stack_axes={"layers": 0})
    # up's vector (16,) of 5 adapters has no axis to spare for layers: one feature axis must remain.
    with pytest.raises(ia3_jax.StructureError, match=r"stack_axes\['block.up'\] = 0.*shape \(16, 5\)"):
        ia3_jax.per_example_adapter(bank, IDS, stack_axes={"block.up": 0})
    with pytest.raises(ia3_jax.AdapterIdsError, match=r"positions \{3: 5\}"):
        ia3_jax.per_example_adapter(bank, IDS.at[3].set(N))
    rows = ia3_jax.per_example_adapter(bank, IDS)
    assert rows["block"]["k"]["ia3_l"].value.shape == (B, 2, 4)
    up = rows["block"]["up"]["ia3_l"].value
    np.testing.assert_array_equal(up[1], np.ones(H))  # id -1: the base model
    np.testing.assert_array_equal(up[3], bank["block"]["up"]["ia3_l"][:, 4])
    params = {"params": ia3_jax.join(base, rows)}
    # Rows picked for another batch.
    with pytest.raises(ia3_jax.VectorShapeError, match=r"picked for 7 examples.*shape \(6, 3, 2, 4\)"):
        jax.eval_shape(forward, params, x[:6])
    # Each kind of vector runs with its own wrapper only, whatever the shapes (B == S here: the rows
    # (3, 16) would also fit the trailing axes of up's output (3, 3, 16) in a single-adapter call).
    x3 = x[:3, :, :]
    rows3 = {"params": ia3_jax.join(base, ia3_jax.per_example_adapter(bank, IDS[:3]))}
    for wrong in (ia3_jax.apply_fn(model.apply, CONFIG), functools.partial(ia3_jax.bank_apply_fn(model.apply, CONFIG),
                                                                          adapter_ids=IDS[:3])):
        with pytest.raises(ia3_jax.VectorShapeError, match="per-example rows.*run them with ia3_jax.per_example_apply_fn"):
            jax.eval_shape(wrong, rows3, x3)
    for other in (bank, ia3_jax.bank_select(bank, 0)):
        with pytest.raises(ia3_jax.VectorShapeError, match="was not picked by ia3_jax.per_example_adapter"):
            jax.eval_shape(forward, {"params": ia3_jax.join(base, other)}, x)
    # A layer axis named where nothing is stacked is never sliced: refused at the call.
    marked = ia3_jax.per_example_adapter(bank, IDS, stack_axes={"block.k": 0})
    with pytest.raises(ia3_jax.VectorShapeError, match=r"'block.k'.*layer axes \(0,\) that no nn.scan"):
        jax.eval_shape(forward, {"params": ia3_jax.join(base, marked)}, x)
    with pytest.raises(ia3_jax.AlreadyJittedError, match="per_example_apply_fn"):
        ia3_jax.per_example_apply_fn(jax.jit(model.apply), CONFIG)
    # Picked rows are one batch's, not adapters: no bank function and no checkpoint takes them.
    for bank_fn in (ia3_jax.stack_adapters, ia3_jax.bank_size, lambda r: ia3_jax.per_example_adapter(r, IDS)):
        with pytest.raises(ia3_jax.StructureError, match=r"block.down.ia3_l.*holds per-example rows.*stack, size and pick from the bank"):
            bank_fn([rows] if bank_fn is ia3_jax.stack_adapters else rows)
    with pytest.raises(ia3_jax.StructureError, match=r"block.down.ia3_l.*holds per-example rows.*save the bank"):
        ia3_jax.save_adapter(tmp_path / "rows", rows, CONFIG)
    with pytest.raises(ia3_jax.StructureError, match=r"block.down.*holds per-example rows.*bank_select"):
        ia3_jax.merge(ia3_jax.join(base, rows), CONFIG)
    # A bank's checkpoint is checked against no base: loading it with params= says so.
    ia3_jax.save_adapter(tmp_path / "bank", bank, CONFIG)
    with pytest.raises(ia3_jax.AdapterMismatchError, match="It is a bank of 5 adapters.*without params="):
        ia3_jax.load_adapter(tmp_path / "bank", params=base, layouts=setup(model, x)[1])
    chex.assert_trees_all_equal(ia3_jax.load_adapter(tmp_path / "bank")[0], bank)
    assert not (tmp_path / "rows").exists()


@pytest.mark.parametrize("batch", [B, L], ids=["batch!=layers", "batch==layers"])
def test_stacked_layers_picked_without_their_axis_are_refused(batch):
    """Without stack_axes the rows of a scanned module are (batch, layers, ...): the scan would slice the examples
    as layers, silently when batch == layers. The scan's slice of an axis not picked as a layer axis raises."""
    model = Scanned(0)
    x = jax.random.normal(jax.random.key(1), (batch, S, D))
    base, layouts = setup(model, x)
    bank = ia3_jax.stack_adapters(adapters(base, layouts))
    rows = ia3_jax.per_example_adapter(bank, IDS[:batch])
    forward = ia3_jax.per_example_apply_fn(model.apply, CONFIG)
    with pytest.raises(ia3_jax.VectorShapeError, match=r"slices axis 0 of the per-example vectors at 'layers.down'.*"
                       r"no layer axis given.*stack_axes=\{'<stacked module>': 0\}"):
        jax.eval_shape(forward, {"params": ia3_jax.join(base, rows)}, x)


class Nested(nn.Module):
    """Five groups of three layers: nn.scan over an nn.scan (lengths unlike any kernel dimension)."""

    @nn.compact
    def __call__(self, x):
        class Group(nn.Module):
            @nn.compact
            def __call__(self, x, _):
                inner = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
                return inner(name="inner")(x, None)[0], None

        outer = nn.scan(Group, variable_axes={"params": 0}, split_rngs={"params": True}, length=5)
        return outer(name="outer")(x, None)[0]


def test_nested_stacks():
    """Picked rows of an nn.scan inside an nn.scan, one stack_axes key per transform, against each example alone."""
    model = Nested()
    x = jax.random.normal(jax.random.key(1), (B, S, D))
    base, layouts = setup(model, x)
    singles = adapters(base, layouts)
    bank = ia3_jax.stack_adapters(singles)
    assert bank["outer"]["inner"]["up"]["ia3_l"].shape == (5, 3, H, N)  # outer layers, inner layers, features
    stack_axes = {"outer": 0, "outer.inner": 0}
    rows = ia3_jax.per_example_adapter(bank, IDS, stack_axes=stack_axes)["outer"]["inner"]["up"]["ia3_l"]
    assert rows.value.shape == (5, 3, B, H) and rows.layer_axes == (0, 1)
    got = jax.jit(mixed_forward(model.apply, "picked", stack_axes))({"params": ia3_jax.join(base, bank)}, x, IDS)
    chex.assert_trees_all_close(got, reference(model, base, singles, x, IDS), **TOL)


class RematScanned(nn.Module):
    """nn.remat_scan: 5 x 3 layers, both stacked axes at one module path (`layers`)."""

    @nn.compact
    def __call__(self, x):
        class Carry(nn.Module):  # remat_scan's body maps the carry to the carry
            @nn.compact
            def __call__(self, x):
                return Block(name="Block_0")(x)[0]

        return nn.remat_scan(Carry, lengths=(5, 3))(name="layers")(x)


def test_remat_scan_takes_the_longer_path_as_its_second_key():
    """nn.remat_scan's two levels: `layers` for the outer one, `layers.Block_0` for the inner (README), against
    each example alone; the outer key alone is refused when the inner level slices."""
    model = RematScanned()
    x = jax.random.normal(jax.random.key(1), (B, S, D))
    base, layouts = setup(model, x)
    singles = adapters(base, layouts)
    bank = ia3_jax.stack_adapters(singles)
    assert bank["layers"]["Block_0"]["up"]["ia3_l"].shape == (5, 3, H, N)
    stack_axes = {"layers": 0, "layers.Block_0": 0}
    got = jax.jit(mixed_forward(model.apply, "picked", stack_axes))({"params": ia3_jax.join(base, bank)}, x, IDS)
    chex.assert_trees_all_close(got, reference(model, base, singles, x, IDS), **TOL)
    outer_only = mixed_forward(model.apply, "picked", {"layers": 0})
    with pytest.raises(ia3_jax.VectorShapeError, match=r"slices axis 0 of the per-example vectors at 'layers.Block_0"):
        jax.eval_shape(outer_only, {"params": ia3_jax.join(base, bank)}, x, IDS)


@pytest.mark.parametrize("way", WAYS)
def test_strict_mode_catches_an_unapplied_bank_vector(served, way):
    model, base, bank, x = served
    extra = ia3_jax.join({**base, "unused": {"kernel": jnp.ones((D, D))}}, {"unused": {"ia3_l": jnp.ones((D, N))}})
    with pytest.raises(ia3_jax.NotAppliedError, match="'unused'"):
        mixed_forward(model.apply, way)({"params": ia3_jax.join(extra, bank)}, x, IDS)


class Heads(nn.Module):
    """k and v of 4 heads of size 4: every vector is (4, 4), so a single adapter's last axes all share size 4."""

    @nn.compact
    def __call__(self, x):
        k, v = (nn.DenseGeneral((4, 4), name=name)(x) for name in ("k", "v"))
        return jnp.einsum("bshd,bshd->bsh", k, v)


def test_a_single_adapter_whose_last_axes_look_like_a_bank_is_refused():
    """(4, 4) vectors read as a bank would be features (4,) of 4 adapters, which also fit the (.., 4, 4)
    output's trailing axis; the kernel (8, 4, 4) says the module's output features are (4, 4)."""
    model, config = Heads(), ia3_jax.IA3Config(target_modules=["k", "v"], init_ia3_weights=False)
    x = jnp.ones((4, S, D))
    base, layouts = setup(model, x)
    params = ia3_jax.ia3_init(base, config, rng=jax.random.key(1), layouts=layouts)
    assert params["k"]["ia3_l"].shape == (4, 4)
    forward = ia3_jax.bank_apply_fn(model.apply, config)
    with pytest.raises(ia3_jax.VectorShapeError, match=r"bank vector at 'k' has shape \(4, 4\).*features \[\(4, 4\)\]"):
        jax.eval_shape(lambda p: forward({"params": p}, x, adapter_ids=jnp.array([0, 1, 2, 3])), params)
    # A real bank of those adapters runs.
    bank = ia3_jax.stack_adapters([ia3_jax.split(params).adapter] * 2)
    out = jax.eval_shape(lambda b: forward({"params": ia3_jax.join(params, b)}, x, adapter_ids=IDS[:4] % 2), bank)
    assert out.shape == (4, S, 4)


def test_picked_rows_leave_no_bank_gather_in_the_decode_loop():
    """KV-cached decoding with a bank (the benchmarks' lean Llama, 2 layers, 3 targets each), counted in the
    program's loop before any compiler (XLA's GPU compiler keeps in the loop what the program puts there: an
    H200 run counts 67 gathers per step with bank_apply_fn, benchmarks/bank.py's ``decode_loop_gathers``).
    bank_apply_fn gathers from the bank in every step; rows picked once by per_example_adapter leave only the
    token embedding's gather: fails if the pick moves into the step."""
    from benchmarks import jax_bench, llama

    config = llama.TINY_F32
    model = llama.Llama(config)
    base = llama.init_params(model, jax.random.key(0))
    ia3 = ia3_jax.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    adapter = ia3_jax.split(ia3_jax.ia3_init(base, ia3)).adapter
    bank = ia3_jax.stack_adapters([adapter] * 3, ia3)
    banked = ia3_jax.bank_apply_fn(model.apply, ia3)
    prompt = jnp.zeros((3, 4), jnp.int32)

    picked = ia3_jax.per_example_apply_fn(model.apply, ia3)

    def decode_picked(base, bank, ids):  # as a server would: pick once per batch, then decode
        params = ia3_jax.join(base, ia3_jax.per_example_adapter(bank, ids))
        return llama.generate(picked, params, prompt, 3, config)

    ids = jnp.arange(3, dtype=jnp.int32)

    # Picked once, the program asks for no gather in the loop at all (the jaxpr, before any compiler: the
    # GPU's keeps whatever the program puts in the loop); bank_apply_fn asks for one per vector and step.
    def gathers(jaxpr) -> int:  # in `jaxpr` and the jaxprs its equations call
        inner = [getattr(p, "jaxpr", p) for e in jaxpr.eqns for p in e.params.values() if hasattr(p, "eqns") or
                 hasattr(getattr(p, "jaxpr", None), "eqns")]
        return sum(e.primitive.name == "gather" for e in jaxpr.eqns) + sum(gathers(j) for j in inner)

    def gathers_in_scan(jaxpr) -> int:
        (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
        return gathers(scan.params["jaxpr"].jaxpr)

    banked_program = jax.make_jaxpr(lambda p, x, i: llama.generate(functools.partial(banked, adapter_ids=i), p, x, 3,
                                                                   config))(ia3_jax.join(base, bank), prompt, ids)
    assert gathers_in_scan(jax.make_jaxpr(decode_picked)(base, bank, ids).jaxpr) == 1  # the embedding lookup
    assert gathers_in_scan(banked_program.jaxpr) == 1 + 2 * 3  # and one per vector: 2 layers x 3 targets
    # The benchmarks' reader of a compiled loop (benchmarks/bank.py's decode_loop_gathers) agrees.
    compiled = jax.jit(decode_picked).lower(base, bank, ids).compile().as_text()
    assert len(re.findall(r"= \S+ gather\(", jax_bench.loop_body(compiled, with_callees=True))) == 1
