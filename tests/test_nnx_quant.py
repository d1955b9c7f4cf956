"""IA3 on qwix-quantized Flax NNX models: vector shapes, forward, gradients, merge into the scale, refusals.

References: numpy float64 computations from the quantized model's own integers and scales
(``(q - z) * s``, read off the arrays, not through qwix), and direct products of the scales.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

import ia3_jax
import ia3_jax.nnx as ia3_nnx
from ia3_jax import quant
from tests.models import TunixStyleEinsum as Einsum


class MLP(nnx.Module):
    """An output-scaled Linear ``k`` and Einsum ``e`` (features (2, 4)), a feedforward (input-scaled) ``wo``."""

    def __init__(self, rngs: nnx.Rngs):
        self.k = nnx.Linear(8, 12, rngs=rngs, bias_init=nnx.initializers.normal(0.5))
        self.e = Einsum("btd,dnh->btnh", (12, 2, 4), rngs)
        self.wo = nnx.Linear(8, 8, rngs=rngs, bias_init=nnx.initializers.normal(0.5))

    def __call__(self, x):
        h = self.e(self.k(x))
        return self.wo(jax.nn.relu(h.reshape(*h.shape[:-2], 8)))


X = jax.random.normal(jax.random.key(1), (2, 3, 8))
CONFIG = ia3_jax.IA3Config(target_modules=["k", "e", "wo"], feedforward_modules=["wo"], init_ia3_weights=False)
OUTPUT_ONLY = CONFIG.replace(target_modules=["k", "e"], feedforward_modules=[])
SCHEMES = {"int8": (jnp.int8, "absmax"), "int4": (jnp.int4, "absmax"), "int8-asym": (jnp.int8, "minmax")}


def _provider(scheme: str) -> qwix.PtqProvider:
    qtype, calibration = SCHEMES[scheme]
    return qwix.PtqProvider(
        [qwix.QuantizationRule(module_path=".*", weight_qtype=qtype, weight_calibration_method=calibration)]
    )


@functools.cache
def _quantized(scheme: str) -> tuple[MLP, MLP]:
    """(float model, its qwix PTQ model) for one scheme; callers adapt clones (ia3_init copies)."""
    model = MLP(nnx.Rngs(0))
    return model, qwix.quantize_model(model, _provider(scheme), X)


def _adapted(scheme: str, config=CONFIG, seed: int = 2) -> tuple[MLP, MLP]:
    _, qmodel = _quantized(scheme)
    adapted = ia3_nnx.ia3_init(qmodel, config, X, rng=jax.random.key(seed))
    vectors = nnx.state(adapted, ia3_nnx.IA3Vector)
    nnx.update(adapted, jax.tree.map(lambda v: 1 + 0.3 * v, vectors))  # trained-looking vectors around 1
    return qmodel, adapted


def _dequantized(weight) -> np.ndarray:
    """``(q - z) * s`` from a quantized weight's own arrays, in float64."""
    qarray = weight.array
    q = np.asarray(qarray.qvalue.get_value(), np.float64)
    z = 0.0 if qarray.zero_point is None else np.asarray(qarray.zero_point.get_value(), np.float64)
    return (q - z) * np.asarray(qarray.scale.get_value(), np.float64)


def _hand(model: MLP, vectors, x) -> np.ndarray:
    """The adapted model in numpy on its dequantized kernels: ``(x W + b) * l`` and ``(x * l) W + b``."""
    v = {name: np.asarray(node["ia3_l"], np.float64) for name, node in vectors.items()}
    ones = {"k": np.ones(12), "e": np.ones((2, 4)), "wo": np.ones(8)}
    v = {**ones, **v}
    x = np.asarray(x, np.float64)
    h = (x @ _dequantized(model.k.kernel) + np.asarray(model.k.bias.get_value(), np.float64)) * v["k"]
    h = np.einsum("btd,dnh->btnh", h, _dequantized(model.e.w)) * v["e"]
    h = np.maximum(h.reshape(*h.shape[:-2], 8), 0)
    return (h * v["wo"]) @ _dequantized(model.wo.kernel) + np.asarray(model.wo.bias.get_value(), np.float64)


def _scales(model: MLP) -> dict[str, np.ndarray]:
    return {"k": model.k.kernel.array.scale.get_value(), "e": model.e.w.array.scale.get_value()}


def _qvalues(model: MLP) -> dict[str, np.ndarray]:
    return {n: np.asarray(getattr(model, n).kernel.array.qvalue.get_value()) for n in ("k", "wo")} | {
        "e": np.asarray(model.e.w.array.qvalue.get_value())
    }


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_vectors_and_forward_on_a_quantized_model_match_the_dequantized_hand_computation(scheme):
    qmodel, adapted = _adapted(scheme)
    vectors = ia3_nnx.adapter(adapted)
    assert {k: v["ia3_l"].shape for k, v in vectors.items()} == {"k": (12,), "e": (2, 4), "wo": (8,)}
    assert quant.is_quantized(adapted.k.kernel) and quant.is_quantized(adapted.e.w)
    y = adapted(X)
    # measured: max |error| 6.5e-7 (int8, int4, int8-asym; outputs up to 5 in size), 4e-7 without vectors
    np.testing.assert_allclose(y, _hand(adapted, vectors, X), rtol=0, atol=1.5e-6)
    np.testing.assert_allclose(qmodel(X), _hand(qmodel, {}, X), rtol=0, atol=1e-6)  # un-adapted: same rule
    assert np.abs(np.asarray(y - qmodel(X))).max() > 0.05  # the vectors act (no silent no-op)
    assert not hasattr(qmodel.k, "ia3_l")  # ia3_init adapted a clone


def test_gradients_reach_only_the_vectors_and_match_a_jnp_reference():
    _, adapted = _adapted("int8")
    deq = {n: jnp.asarray(_dequantized(w), jnp.float32) for n, w in (("k", adapted.k.kernel), ("e", adapted.e.w))}
    deq["wo"] = jnp.asarray(_dequantized(adapted.wo.kernel), jnp.float32)
    bk, bo = adapted.k.bias.get_value(), adapted.wo.bias.get_value()

    def reference(v):
        h = (X @ deq["k"] + bk) * v["k"]
        h = jax.nn.relu((jnp.einsum("btd,dnh->btnh", h, deq["e"]) * v["e"]).reshape(2, 3, 8))
        return jnp.sum(((h * v["wo"]) @ deq["wo"] + bo) ** 2)

    grads = nnx.grad(lambda m: jnp.sum(m(X) ** 2), argnums=nnx.DiffState(0, ia3_nnx.IA3Vector))(adapted)
    flat = dict(nnx.to_flat_state(grads))
    assert {tuple(map(str, p)) for p in flat} == {("k", "ia3_l"), ("e", "ia3_l"), ("wo", "ia3_l")}
    expected = jax.grad(reference)({n: v["ia3_l"] for n, v in ia3_nnx.adapter(adapted).items()})
    for name in ("k", "e", "wo"):
        # measured: 0 (bitwise equal on CPU); the bound allows float32 reassociation elsewhere
        got, want = np.asarray(flat[(name, "ia3_l")].get_value()), np.asarray(expected[name])
        assert np.abs(want).max() > 1  # a gradient that a wrong rule would change
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("scheme", ["int8", "int8-asym"])
def test_merge_folds_output_vectors_into_the_scale_and_unmerge_divides_them_out(scheme):
    qmodel, adapted = _adapted(scheme, OUTPUT_ONLY)
    y = adapted(X)
    vectors = ia3_nnx.adapter(adapted)
    l_k, l_e = np.asarray(vectors["k"]["ia3_l"]), np.asarray(vectors["e"]["ia3_l"])
    merged = ia3_nnx.merge(adapted)
    assert type(merged.k) is nnx.Linear and not hasattr(merged.k, "ia3_l") and type(merged.e) is Einsum
    before, after = _scales(qmodel), _scales(merged)
    np.testing.assert_allclose(after["k"], before["k"] * l_k[None], rtol=1e-6)  # scale (1, 12) * l
    np.testing.assert_allclose(after["e"], before["e"] * l_e[None], rtol=1e-6)  # scale (1, 2, 4) * l
    np.testing.assert_allclose(merged.k.bias.get_value(), qmodel.k.bias.get_value() * l_k, rtol=1e-6)
    for name, q in _qvalues(merged).items():
        np.testing.assert_array_equal(q, _qvalues(qmodel)[name])  # the integers never change
    # measured: max |merged - adapted| 9.5e-7 (the product s * l rounded once), |merged - hand| 1.1e-6
    np.testing.assert_allclose(merged(X), y, rtol=0, atol=2e-6)
    np.testing.assert_allclose(merged(X), _hand(merged, {}, X), rtol=0, atol=2.5e-6)

    # The same fold on the model's state alone: it fits the un-adapted quantized model.
    plain = nnx.clone(qmodel)
    nnx.update(plain, ia3_nnx.merge(nnx.split(adapted)[1]))
    np.testing.assert_allclose(plain(X), y, rtol=0, atol=2e-6)

    with pytest.warns(UserWarning, match="inaccurate"):
        restored = ia3_nnx.unmerge(merged, adapted)
    for name, scale in _scales(restored).items():
        np.testing.assert_allclose(scale, before[name], rtol=3e-7)  # measured: 1.2e-7 (one float32 ulp)
    np.testing.assert_allclose(restored.k.bias.get_value(), qmodel.k.bias.get_value(), rtol=3e-7, atol=1e-7)
    np.testing.assert_allclose(restored(X), qmodel(X), rtol=0, atol=1e-6)  # measured: 4.8e-7


def test_feedforward_fold_is_refused_naming_the_module_and_the_fix_which_works():
    qmodel, adapted = _adapted("int8")
    with pytest.raises(ia3_jax.QuantizedMergeError, match=r"'wo'.*ia3_jax\.nnx\.set_adapter") as refused:
        ia3_nnx.merge(adapted)
    assert "feedforward" in str(refused.value)
    with pytest.raises(ia3_jax.QuantizedMergeError, match="'wo'"):
        ia3_nnx.merge(nnx.split(adapted)[1])
    assert quant.is_quantized(adapted.k.kernel) and hasattr(adapted.wo, "ia3_l")  # nothing changed
    np.testing.assert_array_equal(_scales(adapted)["k"], _scales(qmodel)["k"])

    # The fix the message gives: fold into the float model, then quantize that.
    float_model, _ = _quantized("int8")
    float_adapted = ia3_nnx.ia3_init(float_model, CONFIG, X, rng=jax.random.key(0))
    ia3_nnx.set_adapter(float_adapted, ia3_nnx.adapter(adapted))
    requantized = qwix.quantize_model(ia3_nnx.merge(float_adapted), _provider("int8"), X)
    assert quant.is_quantized(requantized.wo.kernel)
    # Both are int8 roundings of the same float adapted model (outputs up to 5 in size): measured max |difference|
    # 0.040 to the adapted quantized model, 0.041 to the float one, against 1.1 that the vectors change the output.
    np.testing.assert_allclose(requantized(X), adapted(X), rtol=0, atol=0.08)
    np.testing.assert_allclose(requantized(X), float_adapted(X), rtol=0, atol=0.08)


def test_dequantize_refuses_an_nnx_state_instead_of_passing_it_over():
    """`ia3_jax.quant.dequantize` reads Linen params of qwix arrays; an NNX model's state holds the quantized
    weight as a {qvalue, scale} dict, which it would have returned unchanged."""
    import ia3_jax.quant

    _, qmodel = _quantized("int8")
    for form in (nnx.state(qmodel), nnx.to_pure_dict(nnx.state(qmodel))):
        with pytest.raises(ia3_jax.UnsupportedKernelError, match="'e.w.array' is a quantized weight flattened to a dict"):
            ia3_jax.quant.dequantize(form)


def test_adapt_then_quantize_equals_quantize_then_adapt():
    float_model, _ = _quantized("int8")
    adapted_first = ia3_nnx.ia3_init(float_model, OUTPUT_ONLY, X, rng=jax.random.key(2))
    quantized_after = qwix.quantize_model(adapted_first, _provider("int8"), X)
    assert quant.is_quantized(quantized_after.k.kernel) and hasattr(quantized_after.k, "ia3_l")
    _, qmodel = _quantized("int8")
    quantized_first = ia3_nnx.ia3_init(qmodel, OUTPUT_ONLY, X, rng=jax.random.key(2))
    np.testing.assert_array_equal(quantized_after(X), quantized_first(X))
    merged = ia3_nnx.merge(quantized_after)  # the model holds the quantized weights' structure: it folds
    np.testing.assert_allclose(merged(X), quantized_first(X), rtol=0, atol=2e-6)
    # Its state alone does not (the vectors were made for float weights): a typed error says what to do.
    with pytest.raises(ia3_jax.StructureError, match=r"IA3 vector at '(e|k)'.*Merge the model"):
        ia3_nnx.merge(nnx.split(quantized_after)[1])


class Scanned(nnx.Module):
    """3 MLPs created by ``nnx.vmap`` (params stacked at axis 0) and run by ``nnx.scan``."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return MLP(rngs)

        self.layers = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.layers)


def test_quantized_weights_inside_nnx_scan_merge_into_the_stacked_scales():
    qmodel = qwix.quantize_model(Scanned(nnx.Rngs(0)), _provider("int8"), X)
    assert quant.is_quantized(qmodel.layers.k.kernel) and quant.is_quantized(qmodel.layers.e.w)
    adapted = ia3_nnx.ia3_init(qmodel, OUTPUT_ONLY, X, rng=jax.random.key(2))
    shapes = {k: v["ia3_l"].shape for k, v in ia3_nnx.adapter(adapted)["layers"].items()}
    assert shapes == {"k": (3, 12), "e": (3, 2, 4)}
    nnx.update(adapted, jax.tree.map(lambda v: 1 + 0.3 * v, nnx.state(adapted, ia3_nnx.IA3Vector)))
    y = adapted(X)
    assert np.abs(np.asarray(y - qmodel(X))).max() > 0.2  # the vectors act (measured 0.60, outputs up to 0.83)
    merged = ia3_nnx.merge(adapted)
    assert quant.is_quantized(merged.layers.k.kernel) and not hasattr(merged.layers.k, "ia3_l")
    l_k = np.asarray(ia3_nnx.adapter(adapted)["layers"]["k"]["ia3_l"])  # (3, 12): layer i's scale times l[i]
    before, after = qmodel.layers.k.kernel.array.scale.get_value(), merged.layers.k.kernel.array.scale.get_value()
    np.testing.assert_allclose(after, before * l_k[:, None], rtol=1e-6)
    # measured: max |merged - adapted| 2.7e-7, model and state alike
    np.testing.assert_allclose(merged(X), y, rtol=0, atol=6e-7)
    plain = nnx.clone(qmodel)  # the same fold on the state alone
    nnx.update(plain, ia3_nnx.merge(nnx.split(adapted)[1]))
    np.testing.assert_allclose(plain(X), y, rtol=0, atol=6e-7)
