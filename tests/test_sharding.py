"""IA3 on 8 simulated CPU devices: vector shardings derived from the kernels', sharded training
(data parallel, FSDP, tensor parallel, FSDP x TP) and pmap against a single device, Flax boxes.

References: the model written out in plain jnp (no Flax, no interceptor), trained for the same steps
on one device (float32, the same sums in another order: measured at most 3.6e-7 on the vectors of ~1
under the suite's unoptimised XLA CPU backend (tests/conftest.py; 1.2e-7 optimised) and 2.4e-7 on
losses of ~3, every layout; TOL allows about twice that), hand-written PartitionSpecs, and
the collectives XLA emits without IA3.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import operator
import pathlib
import re
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ia3_jax

L, D, H, B = 2, 8, 16, 8
CONFIG = ia3_jax.IA3Config(target_modules=["up", "down"], feedforward_modules=["down"], init_ia3_weights=False)
TOL = {"rtol": 1e-7, "atol": 7e-7}  # |a - b| <= atol + rtol |b|: see the module docstring
ALL = ("data", "model")  # both mesh axes together: 8-way


class Block(nn.Module):
    up_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    down_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.gelu(nn.Dense(H, kernel_init=self.up_init, name="up")(x))
        return x + nn.Dense(D, kernel_init=self.down_init, name="down")(h), None


class Model(nn.Module):
    """Two MLP blocks stacked by nn.scan (layer axis 0), so every vector is stacked too."""

    layers: int = L
    up_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    down_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return stack(self.up_init, self.down_init, name="layers")(x, None)[0]


def mesh() -> Mesh:
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    return Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


# Base specs per layout on the (data=2, model=4) mesh; kernels are (L, in, out), biases (L, out).
LAYOUTS = {
    "dp": ({"up": {"kernel": P(), "bias": P()}, "down": {"kernel": P(), "bias": P()}}, P(ALL)),
    "fsdp": (
        {"up": {"kernel": P(None, None, ALL), "bias": P()}, "down": {"kernel": P(None, ALL), "bias": P()}},
        P(ALL),
    ),
    "tp": (
        {
            "up": {"kernel": P(None, None, "model"), "bias": P(None, "model")},
            "down": {"kernel": P(None, "model"), "bias": P()},
        },
        P("data"),
    ),
    "fsdp_tp": (
        {
            "up": {"kernel": P(None, "data", "model"), "bias": P(None, "model")},
            "down": {"kernel": P(None, "model", "data"), "bias": P()},
        },
        P("data"),
    ),
}
# What each vector must get: the mesh axes of the kernel axis it scales (up: output, down: input).
EXPECTED = {
    "dp": (P(None, None), P(None, None)),
    "fsdp": (P(None, ALL), P(None, ALL)),
    "tp": (P(None, "model"), P(None, "model")),
    "fsdp_tp": (P(None, "model"), P(None, "model")),
}


@functools.lru_cache
def problem():
    model = Model()
    x = jax.random.normal(jax.random.key(0), (B, D))
    y = jax.random.normal(jax.random.key(1), (B, D))
    params = model.init(jax.random.key(2), x)["params"]
    layouts = ia3_jax.infer_layouts(model.apply, {"params": params}, x)
    adapter, base = ia3_jax.split(ia3_jax.ia3_init(params, CONFIG, rng=jax.random.key(3), layouts=layouts))
    return model, x, y, adapter, base, layouts


def hand_forward(adapter, base, x):
    """The reference: the scanned blocks written out, up's output (bias included) and down's input scaled."""
    up, down = base["layers"]["up"], base["layers"]["down"]
    v_up, v_down = adapter["layers"]["up"]["ia3_l"], adapter["layers"]["down"]["ia3_l"]
    for i in range(L):
        h = nn.gelu((x @ up["kernel"][i] + up["bias"][i]) * v_up[i])
        x = x + (h * v_down[i]) @ down["kernel"][i] + down["bias"][i]
    return x


def hand_loss(adapter, base, x, y):
    return jnp.mean((hand_forward(adapter, base, x) - y) ** 2)


def train_step_fn(model, tx, reference: bool = False):
    forward = ia3_jax.apply_fn(model.apply, CONFIG)

    def loss(adapter, base, x, y):
        if reference:
            return hand_loss(adapter, base, x, y)
        return jnp.mean((forward({"params": ia3_jax.join(base, adapter)}, x) - y) ** 2)

    def step(adapter, opt_state, base, x, y):
        value, grads = jax.value_and_grad(loss)(adapter, base, x, y)
        updates, opt_state = tx.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, value

    return step


TX = optax.adam(0.05)
STEPS = 3


@functools.lru_cache
def single_device_run():
    """The hand-written reference trained on one device: (adapter, losses)."""
    model, x, y, adapter, base, _ = problem()
    step = jax.jit(train_step_fn(model, TX, reference=True))
    opt_state = TX.init(adapter)
    losses = []
    for _ in range(STEPS):
        adapter, opt_state, value = step(adapter, opt_state, base, x, y)
        losses.append(value)
    return adapter, losses


def full_specs(layout: str):
    base_specs, batch = LAYOUTS[layout]
    return {"layers": base_specs}, batch


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vector_specs_follow_their_kernels(layout):
    _, _, _, adapter, base, layouts = problem()
    specs, _ = full_specs(layout)
    got = ia3_jax.adapter_shardings(adapter, base, specs, CONFIG, layouts=layouts, mesh=mesh())
    up, down = EXPECTED[layout]
    assert got == {"layers": {"up": {"ia3_l": up}, "down": {"ia3_l": down}}}
    # NamedShardings in, NamedShardings on the same mesh out.
    named = jax.tree.map(lambda s: NamedSharding(mesh(), s), specs, is_leaf=lambda s: isinstance(s, P))
    got_named = ia3_jax.adapter_shardings(adapter, base, named, CONFIG, layouts=layouts)
    assert got_named["layers"]["down"]["ia3_l"] == NamedSharding(mesh(), down)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_training_matches_single_device(layout):
    model, x, y, adapter, base, layouts = problem()
    m = mesh()
    specs, batch_spec = full_specs(layout)
    named = lambda tree: jax.tree.map(lambda s: NamedSharding(m, s), tree, is_leaf=lambda s: isinstance(s, P))
    base_sh = named(specs)
    adapter_sh = named(ia3_jax.adapter_shardings(adapter, base, specs, CONFIG, layouts=layouts, mesh=m))
    opt_sh = ia3_jax.optimizer_shardings(TX, adapter, adapter_sh, replicated=NamedSharding(m, P()))
    data_sh = NamedSharding(m, batch_spec)
    step = jax.jit(
        train_step_fn(model, TX),
        in_shardings=(adapter_sh, opt_sh, base_sh, data_sh, data_sh),
        out_shardings=(adapter_sh, opt_sh, NamedSharding(m, P())),
    )
    sharded = jax.device_put(adapter, adapter_sh)
    opt_state = TX.init(sharded)
    # Adam's moments, initialised from the sharded adapter, already sit where the vectors are.
    chex.assert_trees_all_equal(
        jax.tree.map(lambda a: a.sharding, opt_state[0].mu), jax.tree.map(lambda a: a.sharding, sharded)
    )
    base_d, x_d, y_d = jax.device_put(base, base_sh), jax.device_put(x, data_sh), jax.device_put(y, data_sh)
    losses = []
    for _ in range(STEPS):
        sharded, opt_state, value = step(sharded, opt_state, base_d, x_d, y_d)
        losses.append(value)
    reference, reference_losses = single_device_run()
    chex.assert_trees_all_close(jax.device_get(sharded), reference, **TOL)
    chex.assert_trees_all_close(losses, reference_losses, **TOL)
    assert reference_losses[-1] < reference_losses[0]  # the steps did train
    assert jax.tree.map(lambda a: a.sharding.spec, sharded) == jax.tree.map(lambda s: s.spec, adapter_sh)
    assert opt_state[0].nu["layers"]["down"]["ia3_l"].sharding.spec == EXPECTED[layout][1]


def _collectives(compiled_text: str) -> dict[str, int]:
    ops = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
    return {op: len(re.findall(rf"\b{op}(?:-start)?\(", compiled_text)) for op in ops}


def test_tensor_parallel_ia3_adds_no_collective():
    """The IA3 forward under TP compiles to the base forward's collectives: the scaling stays local."""
    model, x, _, adapter, base, layouts = problem()
    m = mesh()
    specs, batch_spec = full_specs("tp")
    named = lambda tree: jax.tree.map(lambda s: NamedSharding(m, s), tree, is_leaf=lambda s: isinstance(s, P))
    base_sh, data_sh = named(specs), NamedSharding(m, batch_spec)
    forward = ia3_jax.apply_fn(model.apply, CONFIG)

    def collectives(fn, *args):
        return _collectives(jax.jit(fn).lower(*args).compile().as_text())

    base_d, x_d = jax.device_put(base, base_sh), jax.device_put(x, data_sh)
    plain = collectives(lambda b, x: model.apply({"params": b}, x), base_d, x_d)
    derived = jax.device_put(adapter, named(ia3_jax.adapter_shardings(adapter, base, specs, CONFIG, layouts=layouts)))
    with_ia3 = collectives(lambda a, b, x: forward({"params": ia3_jax.join(b, a)}, x), derived, base_d, x_d)
    assert with_ia3 == plain
    # Control: the same vectors split along the wrong mesh axis do cost communication.
    wrong = jax.device_put(adapter, jax.tree.map(lambda _: NamedSharding(m, P(None, "data")), adapter))
    misplaced = collectives(lambda a, b, x: forward({"params": ia3_jax.join(b, a)}, x), wrong, base_d, x_d)
    assert sum(misplaced.values()) > sum(plain.values())


def test_pmap_matches_single_device():
    model, x, y, adapter, base, _ = problem()
    n = jax.local_device_count()
    forward = ia3_jax.apply_fn(model.apply, CONFIG)
    tx = optax.sgd(0.1)

    def loss(adapter, base, x, y):
        return jnp.mean((forward({"params": ia3_jax.join(base, adapter)}, x) - y) ** 2)

    def update(adapter, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state

    def replica_step(adapter, opt_state, base, x, y):
        grads = jax.lax.pmean(jax.grad(loss)(adapter, base, x, y), "batch")  # equal shards: the global mean
        return update(adapter, opt_state, grads)

    @jax.jit
    def single_step(adapter, opt_state, base, x, y):  # the reference: the hand-written model
        return update(adapter, opt_state, jax.grad(hand_loss)(adapter, base, x, y))

    replicate = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), tree)
    shard = lambda a: a.reshape(n, a.shape[0] // n, *a.shape[1:])
    p_step = jax.pmap(replica_step, axis_name="batch")
    p_adapter, p_opt, p_base = replicate(adapter), replicate(tx.init(adapter)), replicate(base)
    s_adapter, s_opt = adapter, tx.init(adapter)
    for _ in range(2):
        p_adapter, p_opt = p_step(p_adapter, p_opt, p_base, shard(x), shard(y))
        s_adapter, s_opt = single_step(s_adapter, s_opt, base, x, y)
    for i in range(n):  # every replica holds the same, single-device result
        chex.assert_trees_all_close(jax.tree.map(operator.itemgetter(i), p_adapter), s_adapter, **TOL)
    assert not np.allclose(s_adapter["layers"]["up"]["ia3_l"], adapter["layers"]["up"]["ia3_l"])


def test_flax_boxes_carry_vector_partitioning():
    """ia3_init boxes a vector with its kernel's axis names; nn.get_partition_spec and our derivation agree."""
    up = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    down = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed"))
    model, x = Model(up_init=up, down_init=down), jnp.ones((B, D))
    boxed = model.init(jax.random.key(0), x)["params"]
    layouts = ia3_jax.infer_layouts(model.apply, {"params": boxed}, x)
    params = ia3_jax.ia3_init(boxed, CONFIG, rng=jax.random.key(1), layouts=layouts)
    assert isinstance(params["layers"]["up"]["ia3_l"], nn.LogicallyPartitioned)
    specs = nn.get_partition_spec(params)["layers"]
    assert specs["up"]["ia3_l"] == P("layers", "mlp")  # output features of up
    assert specs["down"]["ia3_l"] == P("layers", "mlp")  # input features of down
    adapter, base = ia3_jax.split(params)
    derived = ia3_jax.adapter_shardings(adapter, base, nn.get_partition_spec(base), CONFIG, layouts=layouts)
    assert derived == nn.get_partition_spec(adapter)
    rules = (("layers", None), ("embed", "data"), ("mlp", "model"))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(adapter), mesh(), rules)
    assert shardings["layers"]["down"]["ia3_l"] == NamedSharding(mesh(), P(None, "model"))


def test_mesh_axis_that_does_not_divide_a_vector_is_named():
    model, x = Model(), jnp.ones((B, D))
    params = model.init(jax.random.key(0), x)["params"]
    layouts = ia3_jax.infer_layouts(model.apply, {"params": params}, x)
    adapter, base = ia3_jax.split(ia3_jax.ia3_init(params, CONFIG, rng=jax.random.key(1), layouts=layouts))
    m = Mesh(np.array(jax.devices()[:6]).reshape(1, 6), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    specs = {"layers": LAYOUTS["tp"][0]}  # H=16 over 6 devices
    with pytest.raises(ia3_jax.ShardingError, match=r"'layers\.(up|down)'.*'model' \(6 devices\).*size 16"):
        ia3_jax.adapter_shardings(adapter, base, specs, CONFIG, layouts=layouts, mesh=m)


def test_stacked_vector_with_another_layer_count_is_refused():
    adapter = problem()[3]  # 2 layers
    deeper, x = Model(layers=3), jnp.ones((B, D))
    base3 = deeper.init(jax.random.key(0), x)["params"]
    layouts3 = ia3_jax.infer_layouts(deeper.apply, {"params": base3}, x)
    with pytest.raises(ia3_jax.VectorShapeError, match=r"'layers\.(up|down)' has 2 layers.*stacks 3"):
        ia3_jax.adapter_shardings(adapter, base3, {"layers": LAYOUTS["tp"][0]}, CONFIG, layouts=layouts3)


def test_shardings_for_another_tree_are_refused():
    _, _, _, adapter, base, layouts = problem()
    with pytest.raises(ia3_jax.StructureError, match="different tree"):
        ia3_jax.adapter_shardings(adapter, base, LAYOUTS["tp"][0], CONFIG, layouts=layouts)  # missing 'layers'
    with pytest.raises(ia3_jax.StructureError, match=r"different tree.*'layers\.up\.kernel'"):
        ia3_jax.adapter_shardings(
            adapter, base, {"layers": {"up": {"bias": P()}, "down": LAYOUTS["tp"][0]["down"]}}, CONFIG, layouts=layouts
        )


@pytest.mark.slow  # the benchmark harness end to end: about 20 s
def test_scaling_benchmark_cpu_tiny(tmp_path, monkeypatch):
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"
    spec = importlib.util.spec_from_file_location("scaling_benchmark", path)
    scaling = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, scaling)  # dataclasses look their module up there
    spec.loader.exec_module(scaling)
    out = tmp_path / "scaling.json"
    result = scaling.main(["--cpu-tiny", "--layouts", "fsdp", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert not result["errors"]
    assert [(r["layout"], r["devices"]) for r in result["runs"]] == [("single", 1), ("fsdp", 2)]
    for run in result["runs"]:
        assert np.isfinite(run["tokens_per_s"]) and run["loss_last"] < run["loss_first"]
    assert result["runs"][1]["adapter_specs"]["['layers']['mlp']['down_proj']['ia3_l']"] == str(P(None, "data"))
    assert set(result["scaling_efficiency"]) == {"fsdp_2"}
