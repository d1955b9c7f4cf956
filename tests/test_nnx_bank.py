"""Adapter banks on NNX models: a mixed batch equals each example run alone with its adapter.

`ia3_jax.nnx.set_bank` writes ``ia3_jax.stack_adapters`` of N = 5 adapters (``ia3_jax.nnx.adapter``
trees) into the model; `ia3_jax.nnx.bank_call` runs it with one adapter id per example (-1: base).
References per example: the model with that adapter written by ``set_adapter(bank_select(...))``,
the merged model (``ia3_jax.nnx.merge``), and, for the plain model, the computation by hand.
Targets: output (``nnx.Linear`` up with its bias, ``nnx.Einsum`` with a (2, 4) vector and bias;
Tunix Llama3's k_proj/v_proj einsums) and feedforward (down / down_proj: its input scaled).

Tolerances (float32, CPU), about 2x the largest error measured on this machine (outputs up to ~4,
logits up to ~0.2):
  mixed batch vs each example alone (the same ops, compiled for another batch size): measured 1.2e-7
    plain, 4.5e-8 Llama3, 7.5e-8 Gemma3.
  merged vs mixed: measured 3.6e-7 plain, 3.7e-8 Llama3; jax.jit (other compiler options) vs nnx.jit 1.2e-7.
  by hand (float64 NumPy) vs mixed: measured 4.4e-7.
  gradients vs per-adapter single-adapter gradients: measured 8.3e-7.
"""

from __future__ import annotations

import gc
import pathlib
import threading
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ia3_jax
import ia3_jax.nnx as ia3_nnx

N, B, T, D, H = 5, 7, 3, 8, 16
IDS = jnp.array([2, -1, 0, 4, 2, 1, -1])  # adapter 2 twice, adapter 3 unused, two base rows
CONFIG = ia3_jax.IA3Config(target_modules=["up", "e", "down"], feedforward_modules=["down"], init_ia3_weights=False)
SINGLE_TOL = {"rtol": 0, "atol": 3e-7}
MERGED_TOL = {"rtol": 0, "atol": 1e-6}
HAND_TOL = {"rtol": 0, "atol": 1e-6}
GRAD_TOL = {"rtol": 0, "atol": 2e-6}
LLAMA_MERGED_TOL = {"rtol": 0, "atol": 1e-7}


class Plain(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, hidden: int = H):
        self.up = nnx.Linear(D, hidden, rngs=rngs)  # output target, bias scaled too
        self.e = nnx.Einsum("btd,dnh->btnh", (D, 2, 4), (2, 4), rngs=rngs)  # output target, (2, 4) vector
        self.down = nnx.Linear(hidden, D, rngs=rngs)  # feedforward target: its (hidden,) input scaled

    def __call__(self, x):
        e = self.e(x)
        return self.down(jax.nn.relu(self.up(x))) + e.reshape(e.shape[:2] + (D,))


def _bank(adapted, n=N):
    """n random adapters of the adapted model (standard normal: far from 1, so a wrong pick shows), stacked."""
    tree = ia3_nnx.adapter(adapted)
    keys = iter(jax.random.split(jax.random.key(10), n * len(jax.tree.leaves(tree))))
    draws = [jax.tree.map(lambda v: jax.random.normal(next(keys), v.shape), tree) for _ in range(n)]
    return ia3_jax.stack_adapters(draws)


@pytest.fixture(scope="module")
def plain():
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    model = ia3_nnx.ia3_init(Plain(nnx.Rngs(0)), CONFIG, x, rng=jax.random.key(0))
    bank = _bank(model)
    ia3_nnx.set_bank(model, bank)
    return model, bank, x


def _one_by_one(model, bank, inputs, ids, call, merged=False):
    """Each example alone, with its adapter written by set_adapter (unit vectors for -1: ``x * 1`` is exact),
    merged into the weights with `merged`; through one compiled call."""
    single = nnx.clone(model)
    unit = jax.tree.map(jnp.ones_like, ia3_jax.bank_select(bank, 0))
    rows = []
    for b, i in enumerate(np.asarray(ids)):
        ia3_nnx.set_adapter(single, unit if i < 0 else ia3_jax.bank_select(bank, int(i)))
        run = ia3_nnx.merge(single) if merged else single
        rows.append(call(run, *(a[b : b + 1] for a in inputs)))
    return jnp.concatenate(rows)


def _by_hand(model, bank, x, ids):
    w = {n: np.asarray(getattr(model, n).kernel.get_value(), np.float64) for n in ("up", "e", "down")}
    b = {n: np.asarray(getattr(model, n).bias.get_value(), np.float64) for n in ("up", "e", "down")}
    rows = []
    for row, i in zip(np.asarray(x, np.float64), np.asarray(ids)):
        v = {n: np.ones(bank[n]["ia3_l"].shape[:-1]) if i < 0 else np.asarray(bank[n]["ia3_l"][..., i]) for n in w}
        h = np.maximum((row @ w["up"] + b["up"]) * v["up"], 0)
        e = (np.einsum("td,dnh->tnh", row, w["e"]) + b["e"]) * v["e"]
        rows.append((h * v["down"]) @ w["down"] + b["down"] + e.reshape(T, D))
    return np.stack(rows)


def _max_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_mixed_batch_equals_each_example_alone_merged_and_by_hand(plain):
    model, bank, x = plain
    assert model.e.ia3_l.get_value().shape == (2, 4, N) and model.down.ia3_l.get_value().shape == (H, N)
    got = nnx.jit(ia3_nnx.bank_call)(model, IDS, x)
    call = jax.jit(lambda m, x: m(x))
    single = _one_by_one(model, bank, (x,), IDS, call)
    merged = _one_by_one(model, bank, (x,), IDS, call, merged=True)
    hand = _by_hand(model, bank, x, IDS)
    print(f"\nplain: single {_max_err(got, single):.2g} merged {_max_err(got, merged):.2g} "
          f"hand {_max_err(got, hand):.2g} max |y| {np.abs(hand).max():.2g}")
    np.testing.assert_allclose(got, single, **SINGLE_TOL)
    np.testing.assert_allclose(got, merged, **MERGED_TOL)
    np.testing.assert_allclose(got, hand, **HAND_TOL)
    base_rows = _by_hand(model, bank, x, -np.ones_like(IDS))
    assert np.abs(np.asarray(got) - base_rows)[np.asarray(IDS) >= 0].max(axis=(1, 2)).min() > 1e-2  # no no-op

    # jax.jit over nnx.split state, and jax.vmap over groups of examples, give the same rows.
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, ids, x: ia3_nnx.bank_call(nnx.merge(graphdef, s), ids, x))
    np.testing.assert_allclose(jitted(state, IDS, x), got, **SINGLE_TOL)
    groups = jax.jit(jax.vmap(lambda ids, x: ia3_nnx.bank_call(model, ids, x)))
    grouped = groups(jnp.stack([IDS, IDS[::-1]]), jnp.stack([x, x[::-1]]))
    print(f"jax.jit {_max_err(jitted(state, IDS, x), got):.2g} vmap {_max_err(grouped[0], got):.2g}")
    np.testing.assert_allclose(grouped[0], got, **SINGLE_TOL)
    np.testing.assert_allclose(grouped[1], got[::-1], **SINGLE_TOL)


def test_adapter_of_a_bank_model_and_back_to_one_adapter(plain):
    model, bank, x = plain
    np.testing.assert_array_equal(ia3_jax.bank_size(ia3_nnx.adapter(model)), N)
    for got, want in zip(jax.tree.leaves(ia3_nnx.adapter(model)), jax.tree.leaves(bank)):
        np.testing.assert_array_equal(got, want)
    one = nnx.clone(model)
    ia3_nnx.set_adapter(one, ia3_jax.bank_select(ia3_nnx.adapter(model), 4))
    assert one.e.ia3_l.get_value().shape == (2, 4)
    np.testing.assert_allclose(one(x[3:4]), _by_hand(model, bank, x[3:4], [4]), **HAND_TOL)
    ia3_nnx.set_bank(one, ia3_nnx.adapter(model))  # and a bank again, also from a bank model's state
    ia3_nnx.set_bank(one, nnx.state(model, ia3_nnx.IA3Vector))
    got = ia3_nnx.bank_call(one, IDS[:2], x[:2])
    np.testing.assert_allclose(got, _by_hand(model, bank, x[:2], IDS[:2]), **HAND_TOL)


def test_gradients_reach_only_each_examples_adapter(plain):
    model, bank, x = plain

    def losses(y):
        return jnp.sum(jnp.sin(y), axis=(1, 2))

    @nnx.jit
    def bank_grads(model):
        diff = nnx.DiffState(0, ia3_nnx.IA3Vector)
        return nnx.grad(lambda m: jnp.sum(losses(ia3_nnx.bank_call(m, IDS, x))), argnums=diff)(model)

    grads = ia3_nnx.adapter(bank_grads(model))

    single = nnx.clone(model)
    graphdef, vectors, rest = nnx.split(single, ia3_nnx.IA3Vector, ...)

    @jax.jit
    def single_grads(vectors, weights):  # adapter i's examples (weight 1) alone, on the single-adapter model
        return jax.grad(lambda v: jnp.sum(weights * losses(nnx.merge(graphdef, v, rest)(x))))(vectors)

    expected = []
    for i in range(N):
        ia3_nnx.set_adapter(single, ia3_jax.bank_select(bank, i))
        expected.append(ia3_nnx.adapter(single_grads(nnx.state(single, ia3_nnx.IA3Vector), (IDS == i) * 1.0)))
    expected = ia3_jax.stack_adapters(expected)
    print(f"\ngrad err {max(_max_err(g, e) for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected))):.2g}")
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(g, e, **GRAD_TOL)
        assert np.all(np.asarray(g[..., 3]) == 0)  # the unused adapter: exactly zero
        assert np.abs(np.asarray(g[..., [0, 1, 2, 4]])).reshape(-1, 4).max(axis=0).min() > 0


def test_errors(plain):
    model, bank, x = plain
    with pytest.raises(ia3_jax.VectorShapeError, match=r"'e' holds a bank of 5 adapters.*bank_call"):
        model(x)
    single = ia3_nnx.ia3_init(Plain(nnx.Rngs(0)), CONFIG, x, rng=jax.random.key(0))
    with pytest.raises(ia3_jax.VectorShapeError, match=r"bank_call: the IA3 vector at .* not a bank.*set_bank"):
        ia3_nnx.bank_call(single, IDS, x)
    with pytest.raises(ia3_jax.AdapterIdsError, match=r"adapter_ids has 6 entries.*'e'"):
        ia3_nnx.bank_call(model, IDS[:6], x)
    bad = IDS.at[3].set(N).at[5].set(-2)
    with pytest.raises(ia3_jax.AdapterIdsError, match=r"positions \{3: 5, 5: -2\}.*0\.\.4 for a bank of 5"):
        ia3_nnx.bank_call(model, bad, x)
    with pytest.raises(ia3_jax.AdapterIdsError, match="1-D signed integer array"):
        ia3_nnx.bank_call(model, IDS.astype(jnp.float32), x)
    # set_bank: a single adapter, a bank for another model, other modules: refused, nothing written.
    before = ia3_nnx.adapter(single)
    with pytest.raises(ia3_jax.VectorShapeError, match=r"has shape \([0-9, ]+\), a single adapter's.*stack_adapters"):
        ia3_nnx.set_bank(single, ia3_jax.bank_select(bank, 0))
    wide = _bank(ia3_nnx.ia3_init(Plain(nnx.Rngs(0), hidden=2 * H), CONFIG, x, rng=jax.random.key(0)), 2)
    with pytest.raises(ia3_jax.VectorShapeError, match=r"'down' has shape \(32, 2\).*another model"):
        ia3_nnx.set_bank(single, wide)
    with pytest.raises(ia3_jax.StructureError, match=r"bank's vectors do not fit the model: the model's \['up'\] are missing from them"):
        ia3_nnx.set_bank(single, {n: bank[n] for n in ("e", "down")})
    for got, want in zip(jax.tree.leaves(ia3_nnx.adapter(single)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(got, want)


class JittedCall(nnx.Module):
    """A model whose own __call__ is nnx.jit-ed: bank_call must not bake the first call's ids into its cache."""

    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(4, 4, rngs=rngs)

    @nnx.jit
    def __call__(self, x):
        return self.up(x)


def test_jitted_method_gets_each_calls_ids():
    x = jnp.ones((2, 4))
    model = ia3_nnx.ia3_init(JittedCall(nnx.Rngs(0)), ia3_jax.IA3Config(target_modules=["up"]), x)
    ia3_nnx.set_bank(model, {"up": {"ia3_l": jnp.stack([jnp.full((4,), 2.0), jnp.full((4,), 3.0)], -1)}})
    base = JittedCall(nnx.Rngs(0))(x)
    np.testing.assert_allclose(ia3_nnx.bank_call(model, jnp.array([0, 0]), x) / base, 2.0, rtol=1e-6)
    np.testing.assert_allclose(
        ia3_nnx.bank_call(model, jnp.array([1, -1]), x) / base, np.repeat([[3.0], [1.0]], 4, 1), rtol=1e-6
    )
    ran = nnx.jit(ia3_nnx.bank_call)(model, jnp.array([-1, 1]), x)
    np.testing.assert_allclose(ran / base, np.repeat([[1.0], [3.0]], 4, 1), rtol=1e-6)
    assert not hasattr(model.up, "ia3_adapter_ids")
    with pytest.raises(ia3_jax.VectorShapeError, match="without adapter ids"):  # and no stale ids afterwards
        model(x)
    with pytest.raises(ia3_jax.AdapterIdsError):  # a call that raises leaves no ids behind either
        ia3_nnx.bank_call(model, jnp.array([0, 1, 0]), x)
    assert not hasattr(model.up, "ia3_adapter_ids")


class Peeking(Plain):
    """Plain, recording what the NNX filters and ia3_jax.nnx.adapter see in the middle of a bank_call."""

    seen: dict = {}

    def __call__(self, x):
        if not isinstance(getattr(self.up, "ia3_l", None), ia3_nnx.IA3Vector):  # ia3_init's trace
            return super().__call__(x)
        Peeking.seen = {
            "param": [p for p, _ in nnx.to_flat_state(nnx.state(self, nnx.Param))],
            "lora": [p for p, _ in nnx.to_flat_state(nnx.state(self, nnx.LoRAParam))],
            "adapter": jax.tree.leaves(ia3_nnx.adapter(self)),
            "ids": [p for p, _ in nnx.to_flat_state(nnx.state(self))],
        }
        return super().__call__(x)


def test_ids_are_no_param_and_gone_after_the_call(plain):
    _, bank, x = plain
    model = ia3_nnx.ia3_init(Peeking(nnx.Rngs(0)), CONFIG, x, rng=jax.random.key(0))
    ia3_nnx.set_bank(model, bank)
    ia3_nnx.bank_call(model, IDS, x)
    assert any("ia3_adapter_ids" in p for p in Peeking.seen["ids"])  # they were there, as module state
    assert not any("ia3_adapter_ids" in p for key in ("param", "lora") for p in Peeking.seen[key])
    assert len(Peeking.seen["adapter"]) == 3
    assert not any("ia3_adapter_ids" in p for p, _ in nnx.to_flat_state(nnx.state(model)))


class Gated(Plain):
    """Plain whose call first runs `Gated.gate` (a class attribute, no module state): the tests' hook for
    stopping a thread inside a bank_call, its ids set, before any module reads them."""

    gate = None

    def __call__(self, x):
        if Gated.gate is not None:
            Gated.gate()
        return super().__call__(x)


def _in_thread(name, run, results, timeout=20.0):
    """run() in a daemon thread named `name` (a deadlock fails the test instead of hanging it); its result or
    exception into results[name]."""

    def target():
        try:
            results[name] = run()
        except Exception as e:  # noqa: BLE001 - reported by the test
            results[name] = e

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def test_concurrent_bank_calls_on_one_model_keep_their_own_ids(plain):
    """Two threads' eager bank_calls on one model: B starts while A is inside its call (ids set, not read yet).
    Unlocked, B overwrites A's ids (A's examples scaled by B's adapters, silently) and A's cleanup drops B's.
    With the per-model lock, B waits: A's gate sees B not reach its call within a bounded wait, then goes on."""
    _, bank, x = plain
    model = ia3_nnx.ia3_init(Gated(nnx.Rngs(0)), CONFIG, x, rng=jax.random.key(0))
    ia3_nnx.set_bank(model, bank)
    ids = {"a": IDS, "b": IDS[::-1]}
    want = {k: _by_hand(model, bank, x, v) for k, v in ids.items()}
    assert np.abs(want["a"] - _by_hand(model, bank, x, ids["b"])).max() > 1e-2  # B's ids would show in A's rows
    ia3_nnx.bank_call(model, ids["b"], x)  # warm: B's eager ops compiled, so unlocked B is quick to reach its call
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def gate():
        name = threading.current_thread().name
        if name == "a":
            a_inside.set()
            seen["b reached its call while A's ids were set"] = b_inside.wait(1.0)  # bounded: locked, B waits
        elif name == "b":
            b_inside.set()
            a_done.wait(1.0)  # unlocked: hold B's ids in place while A reads them

    def run_a():
        try:
            return ia3_nnx.bank_call(model, ids["a"], x)
        finally:
            a_done.set()

    def run_b():
        a_inside.wait(5.0)  # B starts once A is inside its call
        return ia3_nnx.bank_call(model, ids["b"], x)

    results = {}
    Gated.gate = gate
    try:
        threads = [_in_thread("a", run_a, results), _in_thread("b", run_b, results)]
        for thread in threads:
            thread.join(20.0)
    finally:
        Gated.gate = None
    assert not any(thread.is_alive() for thread in threads), "deadlock"
    for name in ("a", "b"):
        assert not isinstance(results[name], Exception), f"thread {name}: {results[name]!r}"
        np.testing.assert_allclose(results[name], want[name], **HAND_TOL, err_msg=f"thread {name}")
    assert seen == {"b reached its call while A's ids were set": False}
    assert not any("ia3_adapter_ids" in p for p, _ in nnx.to_flat_state(nnx.state(model)))


def test_a_plain_call_on_another_thread_does_not_meet_a_bank_calls_ids(plain):
    """Thread A is inside bank_call (its ids set on the shared model) when thread B calls the model plainly:
    B is refused as any plain call of a bank model is, instead of running silently with A's ids."""
    _, bank, x = plain
    model = ia3_nnx.ia3_init(Gated(nnx.Rngs(0)), CONFIG, x, rng=jax.random.key(0))
    ia3_nnx.set_bank(model, bank)
    a_inside, b_done = threading.Event(), threading.Event()
    seen = {}

    def gate():
        if threading.current_thread().name == "a":
            a_inside.set()
            seen["b called while A's ids were set"] = b_done.wait(10.0)  # hold A's ids in place while B calls

    def run_b():
        seen["a inside"] = a_inside.wait(10.0)
        try:
            return model(x)
        finally:
            b_done.set()

    results = {}
    Gated.gate = gate
    try:
        threads = [_in_thread("a", lambda: ia3_nnx.bank_call(model, IDS, x), results), _in_thread("b", run_b, results)]
        for thread in threads:
            thread.join(20.0)
    finally:
        Gated.gate = None
    assert seen == {"a inside": True, "b called while A's ids were set": True}  # else the test proves nothing
    assert isinstance(results["b"], ia3_jax.VectorShapeError) and "without adapter ids" in str(results["b"])
    np.testing.assert_allclose(results["a"], _by_hand(model, bank, x, IDS), **HAND_TOL)


def test_nested_bank_call_in_the_same_thread_and_the_model_can_die(plain):
    """A bank_call inside the model's call under bank_call (jax.jit closing over the model: the copy path), on
    the same thread: the lock is re-entrant (no deadlock), each call gets its ids; and the lock keeps no model alive."""
    _, bank, x = plain
    model = ia3_nnx.ia3_init(Gated(nnx.Rngs(0)), CONFIG, x, rng=jax.random.key(0))
    ia3_nnx.set_bank(model, bank)
    inner_ids = IDS[::-1]
    inner = {}

    def gate():
        if not inner:  # once: the inner call runs Gated's call (its copy's) too
            inner["out"] = None
            inner["out"] = jax.jit(lambda x: ia3_nnx.bank_call(model, inner_ids, x))(x)

    results = {}
    Gated.gate = gate
    try:
        thread = _in_thread("outer", lambda: ia3_nnx.bank_call(model, IDS, x), results)
        thread.join(20.0)
    finally:
        Gated.gate = None
    assert not thread.is_alive(), "deadlock"
    assert not isinstance(results["outer"], Exception), repr(results["outer"])
    np.testing.assert_allclose(results["outer"], _by_hand(model, bank, x, IDS), **HAND_TOL)
    np.testing.assert_allclose(inner["out"], _by_hand(model, bank, x, inner_ids), **HAND_TOL)

    one = ia3_nnx.ia3_init(Plain(nnx.Rngs(0)), CONFIG, x, rng=jax.random.key(0))  # the lock keeps it not alive
    ia3_nnx.set_bank(one, bank)
    ia3_nnx.bank_call(one, IDS, x)
    dead = weakref.ref(one)
    del one
    gc.collect()
    assert dead() is None


def test_single_adapter_verbs_on_a_bank_name_the_fix(plain, tmp_path: pathlib.Path):
    model, bank, x = plain
    fix = r"holds a bank of 5 adapters.*ia3_jax\.nnx\.set_adapter\(model, ia3_jax\.bank_select\(ia3_jax\.nnx\.adapter"
    for verb, run in [
        ("merge", lambda: ia3_nnx.merge(model)),
        ("merge", lambda: ia3_nnx.merge(nnx.split(model)[1])),
        ("unmerge", lambda: ia3_nnx.unmerge(Plain(nnx.Rngs(0)), model)),
        ("unmerge", lambda: ia3_nnx.unmerge(nnx.split(Plain(nnx.Rngs(0)))[1], nnx.state(model, ia3_nnx.IA3Vector))),
    ]:
        with pytest.raises(ia3_jax.VectorShapeError, match=f"{verb}: .*{fix}"):
            run()
    with pytest.raises(ia3_jax.AdapterMismatchError, match=r"bank of adapters.*bank_select"):
        ia3_jax.save_peft(tmp_path / "peft", ia3_nnx.adapter(model), CONFIG)
    # an orbax checkpoint of a bank model loads back as a bank: into the bank model and into a single one
    ia3_nnx.save_adapter(tmp_path / "ckpt", model, CONFIG)
    for into in (nnx.clone(model), ia3_nnx.ia3_init(Plain(nnx.Rngs(0)), CONFIG, x, rng=jax.random.key(3))):
        ia3_nnx.load_adapter(tmp_path / "ckpt", into)
        for got, want in zip(jax.tree.leaves(ia3_nnx.adapter(into)), jax.tree.leaves(bank)):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(ia3_nnx.bank_call(into, IDS, x), ia3_nnx.bank_call(model, IDS, x), **SINGLE_TOL)


# --- a tiny Tunix Llama3: k_proj / v_proj einsums (output, (kv_heads, head_dim) vectors), down_proj (input) ---


def _lm_inputs(length: int = 6, vocab: int = 128):
    """A Tunix LM's (tokens, positions, attention mask) for B causal sequences."""
    tokens = jax.random.randint(jax.random.key(1), (B, length), 0, vocab)
    positions = jnp.broadcast_to(jnp.arange(length), (B, length))
    return tokens, positions, jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (B, length, length))


def test_tunix_llama3(tmp_path: pathlib.Path):
    pytest.importorskip("tunix")
    from tunix.models.llama3 import model as llama_lib

    import ia3_jax.tunix as ia3_tunix

    config = llama_lib.ModelConfig(
        num_layers=2, vocab_size=128, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8, num_kv_heads=2,
        rope_theta=10000, norm_eps=1e-5,
    )
    base = llama_lib.Llama3(config, rngs=nnx.Rngs(0))
    ia3_config = ia3_tunix.default_config(base, init_ia3_weights=False)
    model = ia3_tunix.ia3_init(base, ia3_config, rng=jax.random.key(0))
    bank = _bank(model)
    ia3_nnx.set_bank(model, bank)
    assert model.layers[0].attn.k_proj.ia3_l.get_value().shape == (2, 8, N)
    assert model.layers[0].mlp.down_proj.ia3_l.get_value().shape == (64, N)

    tokens, positions, mask = _lm_inputs()
    run = nnx.jit(ia3_nnx.bank_call)
    got, _ = run(model, IDS, tokens, positions, None, mask)
    call = jax.jit(lambda m, t, p, a: m(t, p, None, a)[0])
    single = _one_by_one(model, bank, (tokens, positions, mask), IDS, call)
    merged = _one_by_one(model, bank, (tokens, positions, mask), IDS, call, merged=True)
    print(f"\nllama3: single {_max_err(got, single):.2g} merged {_max_err(got, merged):.2g} "
          f"max |logit| {np.abs(np.asarray(got)).max():.2g}")
    np.testing.assert_allclose(got, single, **SINGLE_TOL)
    np.testing.assert_allclose(got, merged, **LLAMA_MERGED_TOL)
    base_logits, _ = run(model, jnp.full_like(IDS, ia3_jax.NO_ADAPTER), tokens, positions, None, mask)
    print(f"llama3: all -1 vs the un-adapted model {_max_err(base_logits, call(base, tokens, positions, mask)):.2g}")
    np.testing.assert_allclose(base_logits, call(base, tokens, positions, mask), **SINGLE_TOL)
    assert np.abs(np.asarray(got - base_logits))[np.asarray(IDS) >= 0].max(axis=(1, 2)).min() > 1e-2
    with pytest.raises(ia3_jax.VectorShapeError, match=r"holds a bank of 5 adapters.*ia3_jax\.nnx\.set_adapter"):
        ia3_tunix.save_peft(tmp_path / "peft", model, ia3_config)


def test_tunix_gemma3_fused_kv_einsum():
    """Gemma 3's kv_einsum 'BSD,CKDH->CBSKH': its (C, K, H) features sit around the batch axis, not trailing."""
    pytest.importorskip("tunix")
    from tunix.models.gemma3 import model as gemma_lib

    import ia3_jax.tunix as ia3_tunix

    config = gemma_lib.ModelConfig(
        num_layers=1, num_embed=128, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8, num_kv_heads=2,
        sliding_window_size=4, param_dtype=jnp.float32,
    )
    base = gemma_lib.Gemma3(config, rngs=nnx.Rngs(0))
    model = ia3_tunix.ia3_init(base, ia3_tunix.default_config(base, init_ia3_weights=False), rng=jax.random.key(0))
    bank = _bank(model)
    ia3_nnx.set_bank(model, bank)
    # PEFT's gemma3 defaults target v_proj, not k_proj: the vector holds the v slice only
    assert model.layers[0].attn.kv_einsum.ia3_l.get_value().shape == (1, 2, 8, N)
    tokens, positions, mask = _lm_inputs()
    run = nnx.jit(ia3_nnx.bank_call)
    got, _ = run(model, IDS, tokens, positions, None, mask)
    call = jax.jit(lambda m, t, p, a: m(t, p, None, a)[0])
    single = _one_by_one(model, bank, (tokens, positions, mask), IDS, call)
    print(f"\ngemma3: single {_max_err(got, single):.2g} max |logit| {np.abs(np.asarray(got)).max():.2g}")
    np.testing.assert_allclose(got, single, **SINGLE_TOL)
    base_logits = call(base, tokens, positions, mask)  # the un-adapted model
    rows = np.asarray(IDS) < 0
    print(f"gemma3: -1 rows vs the un-adapted model {_max_err(got[rows], base_logits[rows]):.2g}")
    np.testing.assert_allclose(got[rows], base_logits[rows], **SINGLE_TOL)
    assert np.abs(np.asarray(got - base_logits))[np.asarray(IDS) >= 0].max(axis=(1, 2)).min() > 1e-2
