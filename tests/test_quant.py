"""IA3 on qwix weight-only quantized bases: init, forward, gradients, training, merge, bad input.

References: the same model run in float with the dequantized kernels (``(q - z) * s``), direct
computations of the folded scale, and the integers before and after.
"""

from __future__ import annotations

import functools
import json

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import qwix

import ia3_jax
from ia3_jax import quant

X = jax.random.normal(jax.random.key(1), (4, 8))
CONFIG = ia3_jax.IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"], init_ia3_weights=False)
OUTPUT_ONLY = CONFIG.replace(target_modules=["k", "v"], feedforward_modules=[])
# name -> (weight_qtype, calibration, tile_size): symmetric int8/int4, asymmetric int8 (zero points),
# and int8 with 4-row tiles along the input axis (subchannel scales).
SCHEMES = {
    "int8": (jnp.int8, "absmax", None),
    "int4": (jnp.int4, "absmax", None),
    "int8-asym": (jnp.int8, "minmax", None),
    "int8-tiled": (jnp.int8, "absmax", 4),
}


class Block(nn.Module):
    """Attention-like projections k, v (output-scaled) and a feedforward wo (input-scaled)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(12, name="k")(x)
        h = nn.relu(nn.Dense(20, name="v")(h))
        return nn.Dense(8, name="wo")(h)


MODEL = Block()


@functools.cache
def quantized(scheme: str):
    """(qwix model, float params, quantized params) for one scheme."""
    qtype, calibration, tile = SCHEMES[scheme]
    rule = qwix.QuantizationRule(
        module_path=".*", weight_qtype=qtype, weight_calibration_method=calibration, tile_size=tile
    )
    qmodel = qwix.quantize_model(MODEL, qwix.PtqProvider([rule]))
    fp = MODEL.init(jax.random.key(0), X)["params"]
    return qmodel, fp, qwix.quantize_params(fp, jax.eval_shape(qmodel.init, jax.random.key(0), X)["params"])


def adapted(scheme: str, config=CONFIG, seed: int = 2):
    qmodel, fp, qparams = quantized(scheme)
    adapter, qbase = ia3_jax.split(ia3_jax.ia3_init(qparams, config, rng=jax.random.key(seed)))
    adapter = jax.tree.map(lambda v: 1 + 0.3 * v, adapter)  # trained-looking vectors around 1
    return qmodel, fp, qbase, adapter


def qvalues(params):
    return {k: node["kernel"].array.qvalue for k, node in params.items()}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_init_reads_the_logical_shape_of_quantized_kernels(scheme):
    _, _, qparams = quantized(scheme)
    adapter, _ = ia3_jax.split(ia3_jax.ia3_init(qparams, CONFIG, rng=jax.random.key(0)))
    chex.assert_trees_all_equal_shapes_and_dtypes(
        adapter, {"k": {"ia3_l": jnp.zeros(12)}, "v": {"ia3_l": jnp.zeros(20)}, "wo": {"ia3_l": jnp.zeros(20)}}
    )
    assert sorted(ia3_jax.resolve_targets(qparams, CONFIG.replace(target_modules="all-linear"))) == [
        ("k",),
        ("v",),
        ("wo",),
    ]


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_forward_equals_the_dequantized_model_with_the_same_vectors(scheme):
    qmodel, fp, qbase, adapter = adapted(scheme)
    y_quant = jax.jit(ia3_jax.apply_fn(qmodel.apply, CONFIG))({"params": ia3_jax.join(qbase, adapter)}, X)
    deq = quant.dequantize(qbase)
    y_deq = jax.jit(ia3_jax.apply_fn(MODEL.apply, CONFIG))({"params": ia3_jax.join(deq, adapter)}, X)
    # qwix computes (x @ q) * s, the reference x @ (q * s): rounding order only (bitwise equal on CPU).
    chex.assert_trees_all_close(y_quant, y_deq, rtol=1e-5, atol=1e-6)
    # ... and the vectors did act: the base alone gives something else.
    assert float(jnp.abs(y_quant - qmodel.apply({"params": qbase}, X)).max()) > 1e-2
    # Against the float model with the same vectors: within the quantization error, which is real.
    y_fp = ia3_jax.apply_fn(MODEL.apply, CONFIG)({"params": ia3_jax.join(fp, adapter)}, X)
    rel = float(jnp.linalg.norm(y_quant - y_fp) / jnp.linalg.norm(y_fp))
    assert 0 < rel < (0.25 if scheme == "int4" else 0.03), rel


def test_unit_vectors_leave_the_quantized_model_unchanged():
    qmodel, _, qparams = quantized("int8")
    params = ia3_jax.ia3_init(qparams, CONFIG.replace(init_ia3_weights=True))
    chex.assert_trees_all_equal(
        ia3_jax.apply_fn(qmodel.apply, CONFIG)({"params": params}, X), qmodel.apply({"params": qparams}, X)
    )


def test_gradients_reach_the_vectors_as_in_the_dequantized_model():
    qmodel, _, qbase, adapter = adapted("int8")
    deq = quant.dequantize(qbase)

    def loss(apply, base, a):
        return jnp.sum(ia3_jax.apply_fn(apply, CONFIG)({"params": ia3_jax.join(base, a)}, X) ** 2)

    g_quant = jax.jit(jax.grad(functools.partial(loss, qmodel.apply, qbase)))(adapter)
    g_deq = jax.grad(functools.partial(loss, MODEL.apply, deq))(adapter)
    chex.assert_trees_all_close(g_quant, g_deq, rtol=1e-4, atol=1e-5)
    # Independent reference: the block written out on kernels dequantized by hand (symmetric int8:
    # q * s), differentiated by JAX without Flax or the interceptor (measured: 1.9e-6 apart on
    # gradients up to 9; atol 4e-6).
    w = {n: (qbase[n]["kernel"].array.qvalue * qbase[n]["kernel"].array.scale, qbase[n]["bias"]) for n in qbase}

    def hand_loss(a):
        k = (X @ w["k"][0] + w["k"][1]) * a["k"]["ia3_l"]
        v = nn.relu((k @ w["v"][0] + w["v"][1]) * a["v"]["ia3_l"])
        return jnp.sum(((v * a["wo"]["ia3_l"]) @ w["wo"][0] + w["wo"][1]) ** 2)

    chex.assert_trees_all_close(g_quant, jax.grad(hand_loss)(adapter), rtol=0, atol=4e-6)


def test_training_on_an_int8_base_lowers_the_loss_and_keeps_the_integers():
    qmodel, _, qbase, adapter = adapted("int8")
    target = jnp.sin(jnp.arange(8.0))[None, :] * jnp.ones((4, 1))
    forward = ia3_jax.apply_fn(qmodel.apply, CONFIG)
    optimizer = optax.adam(5e-2)

    def loss(a, base):
        return jnp.mean((forward({"params": ia3_jax.join(base, a)}, X) - target) ** 2)

    @jax.jit
    def step(a, opt_state, base):
        value, grads = jax.value_and_grad(loss)(a, base)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(a, updates), opt_state, value

    opt_state, losses, before = optimizer.init(adapter), [], qvalues(qbase)
    for _ in range(30):
        adapter, opt_state, value = step(adapter, opt_state, qbase)
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0], losses
    chex.assert_trees_all_equal(qvalues(qbase), before)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_output_vectors_fold_into_the_scale_exactly(scheme):
    qmodel, _, qbase, adapter = adapted(scheme, OUTPUT_ONLY)
    joined = ia3_jax.join(qbase, adapter)
    merged = jax.jit(functools.partial(ia3_jax.merge, config=OUTPUT_ONLY))(joined)
    assert "ia3_l" not in merged["k"] and type(merged["k"]["kernel"]) is type(qbase["k"]["kernel"])
    chex.assert_trees_all_equal(qvalues(merged), qvalues(qbase))  # never multiply the integers
    for name in ("k", "v"):
        old, new = qbase[name]["kernel"], merged[name]["kernel"]
        assert new.how == old.how
        chex.assert_trees_all_close(new.array.scale, old.array.scale * adapter[name]["ia3_l"], rtol=1e-7)
        chex.assert_trees_all_close(merged[name]["bias"], qbase[name]["bias"] * adapter[name]["ia3_l"], rtol=1e-7)
    y_unmerged = ia3_jax.apply_fn(qmodel.apply, OUTPUT_ONLY)({"params": joined}, X)
    chex.assert_trees_all_close(qmodel.apply({"params": merged}, X), y_unmerged, rtol=1e-5, atol=1e-6)


def test_unmerge_divides_the_scale_back():
    _, _, qbase, adapter = adapted("int8", OUTPUT_ONLY)
    merged = ia3_jax.merge(ia3_jax.join(qbase, adapter), OUTPUT_ONLY)
    with pytest.warns(UserWarning, match="inaccurate"):
        restored = ia3_jax.unmerge(merged, adapter, OUTPUT_ONLY)
    chex.assert_trees_all_equal(qvalues(restored), qvalues(qbase))
    chex.assert_trees_all_close(restored, qbase, rtol=1e-6)


@pytest.mark.parametrize("scheme", ["int8", "int8-tiled"])
def test_feedforward_vectors_are_refused_with_the_way_out(scheme):
    _, _, qbase, adapter = adapted(scheme)
    joined = ia3_jax.join(qbase, adapter)
    with pytest.raises(ia3_jax.QuantizedMergeError, match=r"feedforward.*'wo'.*re-round the integers") as err:
        ia3_jax.merge(joined, CONFIG)
    assert "unmerged" in str(err.value) and "ia3_jax.quant.dequantize" in str(err.value)
    assert isinstance(err.value, ia3_jax.UnsupportedKernelError)
    wo_only = {"wo": adapter["wo"]}
    with pytest.warns(UserWarning), pytest.raises(ia3_jax.QuantizedMergeError):
        ia3_jax.unmerge(qbase, wo_only, CONFIG)


def test_merging_the_dequantized_params_matches_the_quantized_forward():
    qmodel, _, qbase, adapter = adapted("int8")
    joined = ia3_jax.join(qbase, adapter)
    merged = ia3_jax.merge(quant.dequantize(joined), CONFIG)
    assert all(isinstance(node["kernel"], jax.Array) for node in merged.values())
    y_quant = ia3_jax.apply_fn(qmodel.apply, CONFIG)({"params": joined}, X)
    chex.assert_trees_all_close(MODEL.apply({"params": merged}, X), y_quant, rtol=1e-5, atol=1e-5)


@flax.struct.dataclass
class OtherQuant:
    """A quantized kernel from a scheme ia3_jax does not know."""

    codes: jax.Array
    step: jax.Array


def test_an_unknown_quantization_scheme_is_named():
    _, fp, _ = quantized("int8")
    params = jax.tree.map(lambda x: x, flax.core.unfreeze(fp))
    params["k"]["kernel"] = OtherQuant(jnp.zeros((8, 12), jnp.int8), jnp.ones((1, 12)))
    with pytest.raises(ia3_jax.UnsupportedKernelError, match="OtherQuant"):
        ia3_jax.ia3_init(params, CONFIG, rng=jax.random.key(0))
    joined = ia3_jax.join(params, {"k": {"ia3_l": jnp.ones(12)}})
    with pytest.raises(ia3_jax.UnsupportedKernelError, match="OtherQuant"):
        ia3_jax.merge(joined, OUTPUT_ONLY)


def test_vectors_of_an_integer_dtype_are_refused():
    qmodel, _, qparams = quantized("int8")
    with pytest.raises(ia3_jax.AdapterDtypeError, match="int8.*floating point"):
        ia3_jax.ia3_init(qparams, CONFIG, rng=jax.random.key(0), dtype=jnp.int8)
    _, _, qbase, adapter = adapted("int8", OUTPUT_ONLY)
    ints = ia3_jax.join(qbase, jax.tree.map(lambda v: v.astype(jnp.int32), adapter))
    with pytest.raises(ia3_jax.AdapterDtypeError, match="'k'"):
        ia3_jax.apply_fn(qmodel.apply, OUTPUT_ONLY)({"params": ints}, X)
    with pytest.raises(ia3_jax.AdapterDtypeError, match="'k'"):
        ia3_jax.merge(ints, OUTPUT_ONLY)
    with pytest.raises(ia3_jax.AdapterDtypeError, match="int32"):
        quant.cast_adapter(adapter, jnp.int32)


def test_cast_adapter_refuses_values_the_dtype_cannot_hold():
    _, _, _, adapter = adapted("int8")
    half = quant.cast_adapter(adapter, jnp.float16)
    chex.assert_trees_all_equal(half, jax.tree.map(lambda v: v.astype(jnp.float16), adapter))
    big = {**adapter, "v": {"ia3_l": adapter["v"]["ia3_l"].at[3].set(7e4)}}
    with pytest.raises(ia3_jax.AdapterDtypeError, match=r"'v'.*70000.*overflows float16"):
        quant.cast_adapter(big, jnp.float16)
    chex.assert_trees_all_equal(quant.cast_adapter(big, jnp.bfloat16)["v"]["ia3_l"][3], jnp.bfloat16(7e4))
    # The edge is where float16 rounds to inf (65520), not its maximum (65504): 65519 casts to 65504.
    edge = {**adapter, "v": {"ia3_l": adapter["v"]["ia3_l"].at[3].set(65519.0)}}
    assert float(quant.cast_adapter(edge, jnp.float16)["v"]["ia3_l"][3]) == 65504.0
    with pytest.raises(ia3_jax.AdapterDtypeError, match="65520"):
        quant.cast_adapter({**adapter, "v": {"ia3_l": adapter["v"]["ia3_l"].at[3].set(65520.0)}}, jnp.float16)
    # A broken adapter is refused, whatever the dtype.
    for bad in (jnp.nan, jnp.inf):
        broken = {**adapter, "k": {"ia3_l": adapter["k"]["ia3_l"].at[0].set(bad)}}
        with pytest.raises(ia3_jax.AdapterDtypeError, match=r"'k' holds NaN or inf.*nothing was cast"):
            quant.cast_adapter(broken, jnp.bfloat16)


def test_dequantize_without_quantized_kernels_is_the_identity():
    _, fp, _ = quantized("int8")
    chex.assert_trees_all_equal(quant.dequantize(fp), flax.core.unfreeze(fp))


@pytest.mark.slow  # the benchmark harness end to end: about 6 s
def test_benchmark_cpu_tiny(tmp_path):
    from benchmarks import quantized as bench

    out = tmp_path / "quantized.json"
    bench.main(["--cpu-tiny", "--out", str(out)])
    runs = {r["variant"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"bf16", "int8"}
    assert runs["int8"]["base_bytes"] < runs["bf16"]["base_bytes"]
    for run in runs.values():
        assert np.isfinite(run["losses"]).all() and run["losses"][-1] < run["losses"][0]
        assert run["tokens_per_s"] > 0 and run["adapter_params"] == runs["bf16"]["adapter_params"]


class Heads(nn.Module):
    """Multi-axis projections: ``nn.DenseGeneral`` kernels (8, 2, 4) and (2, 4, 8)."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((2, 4), name="k")(x)
        return nn.DenseGeneral(8, axis=(-2, -1), name="o")(h)


def test_infer_layouts_reads_quantized_dense_general_kernels():
    model = Heads()
    qmodel = qwix.quantize_model(model, qwix.PtqProvider([qwix.QuantizationRule(weight_qtype=jnp.int8)]))
    fp = model.init(jax.random.key(0), X)["params"]
    qparams = qwix.quantize_params(fp, jax.eval_shape(qmodel.init, jax.random.key(0), X)["params"])
    layouts = ia3_jax.infer_layouts(qmodel.apply, {"params": qparams}, X)
    assert layouts == ia3_jax.infer_layouts(model.apply, {"params": fp}, X)
    config = ia3_jax.IA3Config(target_modules=["k", "o"], feedforward_modules=["o"], init_ia3_weights=False)
    params = ia3_jax.ia3_init(qparams, config, rng=jax.random.key(1), layouts=layouts)
    assert params["k"]["ia3_l"].shape == (2, 4) and params["o"]["ia3_l"].shape == (2, 4)
    y = ia3_jax.apply_fn(qmodel.apply, config)({"params": params}, X)
    y_deq = ia3_jax.apply_fn(model.apply, config)({"params": quant.dequantize(params)}, X)
    chex.assert_trees_all_close(y, y_deq, rtol=1e-5, atol=1e-6)
    # The (2, 4) output vector folds into the (1, 2, 4) scale.
    out_only = config.replace(target_modules=["k"], feedforward_modules=[])
    k_only = ia3_jax.join(qparams, {"k": {"ia3_l": params["k"]["ia3_l"]}})
    merged = ia3_jax.merge(k_only, out_only, layouts=layouts)
    chex.assert_trees_all_equal(merged["k"]["kernel"].array.qvalue, qparams["k"]["kernel"].array.qvalue)
    y_k = ia3_jax.apply_fn(qmodel.apply, out_only)({"params": k_only}, X)
    chex.assert_trees_all_close(qmodel.apply({"params": merged}, X), y_k, rtol=1e-5, atol=1e-6)
