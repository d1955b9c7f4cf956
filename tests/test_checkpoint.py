"""Adapter-only orbax checkpoints: round trip, steps, shardings, a base from elsewhere, atomicity, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

import ia3_jax
from ia3_jax import AdapterMismatchError, CheckpointError, StructureError


class Block(nn.Module):
    """T5-like names: attention projections k, v and a feedforward wi -> wo; a classifier head."""

    width: int = 16

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.width, name="k")(x) * nn.Dense(self.width, name="v")(x)
        h = nn.Dense(self.width, name="wo")(nn.relu(nn.Dense(2 * self.width, name="wi")(h)))
        return nn.Dense(3, name="head")(h)


CONFIG = ia3_jax.IA3Config(
    target_modules=["k", "v", "wo"], feedforward_modules=["wo"], modules_to_save=["head"], task_type="SEQ_CLS"
)
X = jax.random.normal(jax.random.key(1), (4, 8))
Y = jnp.array([0, 1, 2, 0])


def _random_like(tree, rng):
    return jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype), tree)


def _setup(width: int = 16, seed: int = 0):
    """(adapter, base) with random values (vectors too, so that equality checks mean something).

    Filled from numpy: no XLA compilation of initialisers, which would dominate the test time.
    """
    rng = np.random.default_rng(seed)
    params = _random_like(jax.eval_shape(Block(width).init, jax.random.key(0), X)["params"], rng)
    adapter, base = ia3_jax.split(ia3_jax.ia3_init(params, CONFIG), CONFIG)
    return _random_like(adapter, rng), base


@jax.jit
def _predict(base, adapter):
    return ia3_jax.apply_fn(Block().apply, CONFIG)({"params": ia3_jax.join(base, adapter)}, X)


def _step_names(root):
    return sorted(os.listdir(root))


def test_round_trip(tmp_path):
    adapter, _ = _setup()
    adapter["k"]["ia3_l"] = adapter["k"]["ia3_l"].astype(jnp.bfloat16)
    path = ia3_jax.save_adapter(tmp_path / "ckpt", adapter, CONFIG)
    assert path == tmp_path / "ckpt" and _step_names(tmp_path) == ["ckpt"]  # no temporary left behind
    loaded, config = ia3_jax.load_adapter(path)
    chex.assert_trees_all_equal(loaded, adapter)
    chex.assert_trees_all_equal_dtypes(loaded, adapter)
    assert config == CONFIG
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        ia3_jax.load_opt_state(path, optax.adam(1e-3).init(adapter))
    # The config is stored as PEFT's adapter_config.json keys.
    stored = json.loads((path / "config" / "metadata").read_text())
    assert stored == json.loads(CONFIG.to_json()) and stored["peft_type"] == "IA3"
    # Only the adapter is stored: the base kernels are not in the checkpoint.
    loaded_paths = set(traverse_util.flatten_dict(loaded))
    assert ("wi", "kernel") not in loaded_paths and ("k", "kernel") not in loaded_paths


def test_boxed_adapter_is_saved_as_arrays(tmp_path):
    adapter, _ = _setup()
    boxed = dict(adapter, k={"ia3_l": nn.Partitioned(adapter["k"]["ia3_l"], names=("mlp",))})
    ia3_jax.save_adapter(tmp_path / "ckpt", boxed, CONFIG)
    loaded, _ = ia3_jax.load_adapter(tmp_path / "ckpt")
    chex.assert_trees_all_equal(loaded, adapter)


def test_load_checks_params_and_joins(tmp_path):
    adapter, base = _setup()
    ia3_jax.save_adapter(tmp_path / "ckpt", adapter, CONFIG)
    loaded, _ = ia3_jax.load_adapter(tmp_path / "ckpt", params=base)
    chex.assert_trees_all_close(_predict(base, loaded), _predict(base, adapter), rtol=0, atol=0)
    # Full params (vectors already inside) are accepted too, and abstract ones.
    ia3_jax.load_adapter(tmp_path / "ckpt", params=ia3_jax.join(base, adapter))
    ia3_jax.load_adapter(tmp_path / "ckpt", params=jax.eval_shape(lambda: base))


def test_overwrite_replaces_atomically(tmp_path):
    a1, _ = _setup(seed=0)
    a2, _ = _setup(seed=5)
    ia3_jax.save_adapter(tmp_path / "ckpt", a1, CONFIG)
    with pytest.raises(CheckpointError, match="already exists.*overwrite=True"):
        ia3_jax.save_adapter(tmp_path / "ckpt", a2, CONFIG)
    ia3_jax.save_adapter(tmp_path / "ckpt", a2, CONFIG, overwrite=True)
    chex.assert_trees_all_equal(ia3_jax.load_adapter(tmp_path / "ckpt")[0], a2)
    assert _step_names(tmp_path) == ["ckpt"]


def test_manager_keeps_last_n_and_resumes(tmp_path):
    root = tmp_path / "run"
    adapter, base = _setup()
    optimizer = optax.adam(1e-2)
    step = ia3_jax.make_train_step(
        lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
            ia3_jax.apply_fn(Block().apply, CONFIG)({"params": p}, x), y
        ).mean(),
        optimizer,
    )
    history = []
    opt_state = optimizer.init(adapter)
    for i in range(4):
        adapter, opt_state, _ = step(adapter, opt_state, base, X, Y)
        history.append(adapter)
        path = ia3_jax.save_adapter(root, adapter, CONFIG, step=i, max_to_keep=2, opt_state=opt_state)
        assert path == root / str(i)
    assert _step_names(root) == ["2", "3"]
    latest, config = ia3_jax.load_adapter(root, params=base)
    chex.assert_trees_all_equal(latest, history[3])
    assert config == CONFIG
    chex.assert_trees_all_equal(ia3_jax.load_adapter(root, step=2)[0], history[2])
    with pytest.raises(CheckpointError, match=r"no step 0 .*steps there: \[2, 3\]"):
        ia3_jax.load_adapter(root, step=0)
    with pytest.raises(CheckpointError, match="step 3 already exists"):
        ia3_jax.save_adapter(root, adapter, CONFIG, step=3)
    # Resume from step 2 with Adam's moments restored: one more step reproduces step 3.
    resumed, _ = ia3_jax.load_adapter(root, step=2)
    resumed_state = ia3_jax.load_opt_state(root, optimizer.init(resumed), step=2)
    assert int(resumed_state[0].count) == 3
    resumed, resumed_state, _ = step(resumed, resumed_state, base, X, Y)
    chex.assert_trees_all_close(resumed, history[3], rtol=1e-6)
    chex.assert_trees_all_close(resumed_state, opt_state, rtol=1e-6)
    with pytest.raises(StructureError, match="optimizer state .* does not fit"):
        ia3_jax.load_opt_state(root, optax.sgd(0.1, momentum=0.9).init(resumed))


def test_restore_with_shardings(tmp_path):
    adapter, base = _setup()
    ia3_jax.save_adapter(tmp_path / "ckpt", adapter, CONFIG)
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("x",), devices=devices)
    sharded, replicated = NamedSharding(mesh, PartitionSpec("x")), NamedSharding(mesh, PartitionSpec())
    # Vectors (16 or 32 features) are split over the devices, the head is replicated.
    shardings = jax.tree.map(lambda a: sharded if a.shape[0] % len(devices) == 0 else replicated, adapter)
    shardings["head"] = jax.tree.map(lambda _: replicated, adapter["head"])
    loaded, _ = ia3_jax.load_adapter(tmp_path / "ckpt", params=base, shardings=shardings)
    chex.assert_trees_all_equal(loaded, adapter)
    for leaf, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == want
    assert len(loaded["wo"]["ia3_l"].addressable_shards) == len(devices)
    assert loaded["wo"]["ia3_l"].addressable_shards[0].data.shape == (32 // len(devices),)
    # One sharding for every leaf.
    everywhere, _ = ia3_jax.load_adapter(tmp_path / "ckpt", shardings=replicated)
    assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(everywhere))
    with pytest.raises(StructureError, match="tree shaped like the adapter"):
        ia3_jax.load_adapter(tmp_path / "ckpt", shardings={"k": replicated})


def test_adapter_into_base_from_another_checkpoint(tmp_path):
    adapter, base = _setup()
    reference = _predict(base, adapter)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "base", base)
    ia3_jax.save_adapter(tmp_path / "adapter", adapter, CONFIG)
    del base
    with ocp.StandardCheckpointer() as checkpointer:
        restored_base = checkpointer.restore(tmp_path / "base")
    loaded, config = ia3_jax.load_adapter(tmp_path / "adapter", params=restored_base)
    chex.assert_trees_all_close(_predict(restored_base, loaded), reference, rtol=0, atol=0)
    assert config == CONFIG


# --- atomicity ---------------------------------------------------------------------------------


def test_save_that_raises_leaves_previous_checkpoint(tmp_path, monkeypatch):
    a1, _ = _setup(seed=0)
    a2, _ = _setup(seed=5)
    ia3_jax.save_adapter(tmp_path / "run", a1, CONFIG, step=1)
    ia3_jax.save_adapter(tmp_path / "single", a1, CONFIG)

    def disk_full(self, *args, **kwargs):
        raise OSError("disk full")

    # The array writer fails after the save has started (its directory exists, the config may be written).
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", disk_full)
    with pytest.raises(OSError, match="disk full"):
        ia3_jax.save_adapter(tmp_path / "run", a2, CONFIG, step=2)
    with pytest.raises(OSError, match="disk full"):
        ia3_jax.save_adapter(tmp_path / "single", a2, CONFIG, overwrite=True)
    monkeypatch.undo()

    chex.assert_trees_all_equal(ia3_jax.load_adapter(tmp_path / "run")[0], a1)
    chex.assert_trees_all_equal(ia3_jax.load_adapter(tmp_path / "single")[0], a1)
    assert _step_names(tmp_path / "run")[0] == "1" and "2" not in _step_names(tmp_path / "run")
    with pytest.raises(CheckpointError, match="no step 2"):
        ia3_jax.load_adapter(tmp_path / "run", step=2)
    # The next saves go through and sweep the leftovers of the failed ones.
    ia3_jax.save_adapter(tmp_path / "run", a2, CONFIG, step=2)
    ia3_jax.save_adapter(tmp_path / "single", a2, CONFIG, overwrite=True)
    chex.assert_trees_all_equal(ia3_jax.load_adapter(tmp_path / "run")[0], a2)
    chex.assert_trees_all_equal(ia3_jax.load_adapter(tmp_path / "single")[0], a2)
    assert _step_names(tmp_path / "run") == ["1", "2"] and _step_names(tmp_path) == ["run", "single"]


_KILLED_SAVE = textwrap.dedent(
    """
    import pathlib, sys, time
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    import ia3_jax

    root, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
    config = ia3_jax.IA3Config(target_modules=["k"])
    old = {"k": {"ia3_l": jnp.full((1 << 20,), 1.0)}}   # 4 MB of vectors
    new = {"k": {"ia3_l": jnp.full((1 << 20,), 2.0)}}
    ia3_jax.save_adapter(root / "run", old, config, step=1)
    ia3_jax.save_adapter(root / "single", old, config)

    def hang(self, directory):
        # Every array and the config are written; the commit (marker file + rename) is next.
        (root / "writing").write_text(str(directory))
        time.sleep(600)

    ocp.CompositeCheckpointHandler.finalize = hang
    if mode == "step":
        ia3_jax.save_adapter(root / "run", new, config, step=2)
    else:
        ia3_jax.save_adapter(root / "single", new, config, overwrite=True)
    """
)


@pytest.mark.parametrize("mode", ["step", "single"])
def test_save_killed_midway_leaves_previous_checkpoint(tmp_path, mode):
    script = tmp_path / "save.py"
    script.write_text(_KILLED_SAVE)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), mode], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (tmp_path / "writing").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the child never reached the commit"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()

    written = (tmp_path / "writing").read_text()
    unfinished = ocp.step.TMP_DIR_SUFFIX in os.path.basename(written)
    assert unfinished and os.path.isdir(written), written  # killed with the new checkpoint on disk, uncommitted

    target = tmp_path / ("run" if mode == "step" else "single")
    loaded, _ = ia3_jax.load_adapter(target)
    chex.assert_trees_all_equal(loaded["k"]["ia3_l"], jnp.full((1 << 20,), 1.0))  # the previous checkpoint
    with pytest.raises(CheckpointError, match="temporary directory of an unfinished save"):
        ia3_jax.load_adapter(written)
    # Even under a final name, the uncommitted directory is refused: it lacks orbax's commit marker.
    fake = tmp_path / "renamed"
    shutil.copytree(written, fake)
    with pytest.raises(CheckpointError, match=r"not a complete adapter checkpoint \(missing \['commit_success.txt'"):
        ia3_jax.load_adapter(fake)
    if mode == "step":
        assert "2" not in _step_names(target)
        with pytest.raises(CheckpointError, match="no step 2"):
            ia3_jax.load_adapter(target, step=2)
    # The next save succeeds and sweeps the leftover of the killed one.
    new = {"k": {"ia3_l": jnp.full((1 << 20,), 3.0)}}
    config = ia3_jax.IA3Config(target_modules=["k"])
    if mode == "step":
        ia3_jax.save_adapter(target, new, config, step=2)
        assert _step_names(target) == ["1", "2"]
    else:
        ia3_jax.save_adapter(target, new, config, overwrite=True)
    assert not os.path.exists(written)
    chex.assert_trees_all_equal(ia3_jax.load_adapter(target)[0], new)


# --- bad input ---------------------------------------------------------------------------------


def test_checkpoint_into_another_architecture(tmp_path):
    adapter, _ = _setup(width=16)
    ia3_jax.save_adapter(tmp_path / "ckpt", adapter, CONFIG)
    _, wider = _setup(width=24)
    with pytest.raises(AdapterMismatchError, match=r"k\.ia3_l: adapter \(16,\) but params expect \(24,\)") as err:
        ia3_jax.load_adapter(tmp_path / "ckpt", params=wider)
    assert "wo.ia3_l: adapter (32,) but params expect (48,)" in str(err.value)
    assert "head.kernel: adapter (16, 3) but params expect (24, 3)" in str(err.value)

    class Other(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="head")(nn.Dense(16, name="q")(x))

    other = jax.eval_shape(Other().init, jax.random.key(0), X)["params"]
    with pytest.raises(AdapterMismatchError, match=r"config does not fit these params.*matches no module"):
        ia3_jax.load_adapter(tmp_path / "ckpt", params=other)


def test_config_that_does_not_match_params(tmp_path):
    # The vectors were made with wo as feedforward (32 input features), the stored config says otherwise.
    adapter, base = _setup()
    ia3_jax.save_adapter(tmp_path / "ckpt", adapter, CONFIG.replace(feedforward_modules=None))
    with pytest.raises(AdapterMismatchError, match=r"wo\.ia3_l: adapter \(32,\) but params expect \(16,\)"):
        ia3_jax.load_adapter(tmp_path / "ckpt", params=base)
    # A vector on a module the config does not target.
    ia3_jax.save_adapter(tmp_path / "narrow", adapter, CONFIG.replace(target_modules=["k", "wo"]))
    with pytest.raises(AdapterMismatchError, match=r"v\.ia3_l: not in these params, or not targeted"):
        ia3_jax.load_adapter(tmp_path / "narrow", params=base)


def test_missing_empty_and_half_written_directories(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ia3_jax.load_adapter(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty directory"):
        ia3_jax.load_adapter(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        ia3_jax.load_adapter(tmp_path / "file")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "weights.bin").write_bytes(b"0")
    with pytest.raises(CheckpointError, match=r"not an adapter checkpoint.*weights\.bin"):
        ia3_jax.load_adapter(tmp_path / "other")

    adapter, _ = _setup()
    path = ia3_jax.save_adapter(tmp_path / "half", adapter, CONFIG)
    (path / "config" / "metadata").unlink()  # as if the copy or the write stopped midway
    with pytest.raises(CheckpointError, match=r"not a complete adapter checkpoint \(missing \['config/metadata'\]\)"):
        ia3_jax.load_adapter(path)
    with pytest.raises(CheckpointError, match="single checkpoint without steps"):
        ia3_jax.load_adapter(tmp_path / "half", step=1)
    # Killed between the two renames of an overwrite: the error says where the old checkpoint is.
    whole = ia3_jax.save_adapter(tmp_path / "swap", adapter, CONFIG)
    os.rename(whole, tmp_path / "swap.ia3-replaced-0123abcd")
    with pytest.raises(CheckpointError, match=r"overwrite was interrupted.*swap\.ia3-replaced-0123abcd: rename it"):
        ia3_jax.load_adapter(whole)


def test_bad_save_input_writes_nothing(tmp_path):
    adapter, _ = _setup()
    target = tmp_path / "ckpt"
    with pytest.raises(TypeError, match="IA3Config"):
        ia3_jax.save_adapter(target, adapter, CONFIG.to_dict())
    with pytest.raises(StructureError, match="non-empty nested dict"):
        ia3_jax.save_adapter(target, {}, CONFIG)
    with pytest.raises(StructureError, match=r"'k\.ia3_l' is a float"):
        ia3_jax.save_adapter(target, {"k": {"ia3_l": 1.0}}, CONFIG)
    _, base = _setup()
    with pytest.raises(StructureError, match=r"'k\.bias' is neither an IA3 vector nor in config\.modules_to_save"):
        ia3_jax.save_adapter(target, ia3_jax.join(base, adapter), CONFIG)  # the whole model by mistake
    with pytest.raises(ValueError, match="max_to_keep applies to step checkpoints"):
        ia3_jax.save_adapter(target, adapter, CONFIG, max_to_keep=2)
    with pytest.raises(ValueError, match="non-negative int"):
        ia3_jax.save_adapter(target, adapter, CONFIG, step=-1)
    assert not target.exists()
    # Never replace a directory that is not an adapter checkpoint.
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not an adapter checkpoint; refusing"):
        ia3_jax.save_adapter(tmp_path / "precious", adapter, CONFIG, overwrite=True)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
    # Step checkpoints need their own root.
    ia3_jax.save_adapter(target, adapter, CONFIG)
    with pytest.raises(CheckpointError, match="single adapter checkpoint; step checkpoints need"):
        ia3_jax.save_adapter(target, adapter, CONFIG, step=0)
    np.testing.assert_array_equal(ia3_jax.load_adapter(target)[0]["k"]["ia3_l"], adapter["k"]["ia3_l"])


def test_relative_paths(tmp_path, monkeypatch):
    adapter, _ = _setup()
    monkeypatch.chdir(tmp_path)
    path = ia3_jax.save_adapter("runs/ckpt", adapter, CONFIG)
    assert path == tmp_path / "runs" / "ckpt"
    loaded, config = ia3_jax.load_adapter("runs/ckpt")
    chex.assert_trees_all_equal(loaded, adapter)
    assert config == CONFIG
