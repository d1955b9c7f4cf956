"""Adapter-only orbax checkpoints: round trip, steps, shardings, a base from elsewhere, atomicity, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

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
from ia3_jax import AdapterMismatchError, CheckpointError, IA3ConfigError, StructureError


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
    # Any integer scalar is a step (a JAX or NumPy one, as a training loop holds it); a string or float is not.
    chex.assert_trees_all_equal(ia3_jax.load_adapter(root, step=jnp.int32(2))[0], history[2])
    for bad in ("2", 2.0, True):
        with pytest.raises(CheckpointError, match="step must be a non-negative int"):
            ia3_jax.load_adapter(root, step=bad)
    with pytest.raises(CheckpointError, match="step 3 already exists"):
        ia3_jax.save_adapter(root, adapter, CONFIG, step=3)
    # Resume from step 2 with Adam's moments restored: one more step reproduces step 3.
    resumed, _ = ia3_jax.load_adapter(root, step=2)
    resumed_state = ia3_jax.load_opt_state(root, optimizer.init(resumed), step=2)
    assert int(resumed_state[0].count) == 3
    resumed, resumed_state, _ = step(resumed, resumed_state, base, X, Y)
    chex.assert_trees_all_close(resumed, history[3], rtol=1e-6)
    chex.assert_trees_all_close(resumed_state, opt_state, rtol=1e-6)
    with pytest.raises(StructureError, match=r"optimizer state .* does not fit.*\[0\]\.count.*'saved': \('int32', \[\]\), 'like': None"):
        ia3_jax.load_opt_state(root, optax.sgd(0.1, momentum=0.9).init(resumed))
    # AdamW's state holds Adam's arrays plus one more empty state: another optimizer, not a damaged checkpoint.
    with pytest.raises(StructureError, match=r"in other containers, at the top: saved 2 entries, like 3 entries: another "
                       r"optimizer chain.*optax.flatten"):
        ia3_jax.load_opt_state(root, optax.adamw(1e-3).init(resumed), step=2)
    # A flattened optimizer's state is one array: it loads into its own kind only.
    flat = optax.flatten(optimizer)
    ia3_jax.save_adapter(tmp_path / "flat", resumed, CONFIG, opt_state=flat.init(resumed))
    chex.assert_trees_all_equal(ia3_jax.load_opt_state(tmp_path / "flat", flat.init(resumed)), flat.init(resumed))
    with pytest.raises(StructureError, match=r"does not fit.*\[0\]\.mu.*and \d+ more\. .*optax\.flatten"):
        ia3_jax.load_opt_state(tmp_path / "flat", optimizer.init(resumed))


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


def test_cleanup_waits_out_a_directory_that_refills(tmp_path, monkeypatch):
    """A failed orbax save's other items finish writing into the staging directory from background
    threads while it is deleted (ENOTEMPTY, seen under load): the save's cleanup retries, and the
    original error is what the caller sees. Injected: rmtree's first two calls fail with ENOTEMPTY."""
    import errno
    import shutil

    a1, _ = _setup(seed=0)
    a2, _ = _setup(seed=5)
    ia3_jax.save_adapter(tmp_path / "single", a1, CONFIG)
    real_rmtree, calls = shutil.rmtree, []

    def refilling(path, *args, **kwargs):
        calls.append(path)
        if len(calls) <= 2:
            raise OSError(errno.ENOTEMPTY, "Directory not empty", path)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", refilling)
    ia3_jax.save_adapter(tmp_path / "single", a2, CONFIG, overwrite=True)  # the replaced copy is deleted
    assert len(calls) >= 3 and calls[0] == calls[2]  # the same directory, retried
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    chex.assert_trees_all_equal(ia3_jax.load_adapter(tmp_path / "single")[0], a2)
    assert sorted(os.listdir(tmp_path)) == ["single"]  # nothing left beside it

    def no_permission(path, *args, **kwargs):  # any other error is not waited out
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(shutil, "rmtree", no_permission)
    with pytest.raises(PermissionError):
        ia3_jax.save_adapter(tmp_path / "single", a1, CONFIG, overwrite=True)


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


def test_bad_save_input_writes_nothing(tmp_path):
    adapter, _ = _setup()
    target = tmp_path / "ckpt"
    with pytest.raises(IA3ConfigError, match="IA3Config"):
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
    for overwrite in (False, True):  # without overwrite too, the advice is to move it away, not overwrite=True
        with pytest.raises(CheckpointError, match="not exactly an adapter checkpoint written by save_adapter; refusing"):
            ia3_jax.save_adapter(tmp_path / "precious", adapter, CONFIG, overwrite=overwrite)
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


# --- what a save may touch (issue 10) -----------------------------------------------------------


def _moved_aside(path):
    """The name an overwrite of `path` gives the old checkpoint before renaming the new one in.

    Written out here as the on-disk format promises it: ``<name>.ia3-replaced-<sha256(name)[:8]>-<tag>``.
    """
    digest = hashlib.sha256(path.name.encode()).hexdigest()[:8]
    return str(path.parent / f"{path.name}.ia3-replaced-{digest}-0123abcd")


def _tree_listing(root):
    return sorted((os.path.relpath(d, root), sorted(f)) for d, _, f in os.walk(root))


def test_overwrite_replaces_only_what_save_adapter_wrote(tmp_path):
    adapter, _ = _setup()
    # A project directory that merely has a `config/` (or all of orbax's names, but not its files).
    project = tmp_path / "my_project"
    (project / "config").mkdir(parents=True)
    (project / "config" / "settings.yaml").write_text("keep: me")
    (project / "data").mkdir()
    lookalike = tmp_path / "lookalike"
    for name in ("adapter", "config"):
        (lookalike / name).mkdir(parents=True)
    (lookalike / "_CHECKPOINT_METADATA").write_text("{}")
    (lookalike / "commit_success.txt").write_text("")
    # A real checkpoint whose config is no IA3 config any more.
    other = ia3_jax.save_adapter(tmp_path / "other", adapter, CONFIG)
    (other / "config" / "metadata").write_text('{"r": 8, "peft_type": "LORA"}')
    (tmp_path / "notes.txt").write_text("a file")
    for target in (project, lookalike, other, tmp_path / "notes.txt"):
        before = _tree_listing(tmp_path)
        with pytest.raises(CheckpointError, match="refusing to replace it"):
            ia3_jax.save_adapter(target, adapter, CONFIG, overwrite=True)
        assert _tree_listing(tmp_path) == before
    assert (project / "config" / "settings.yaml").read_text() == "keep: me"
    assert (tmp_path / "notes.txt").read_text() == "a file"


def test_interrupted_overwrite_reads_and_restores_the_previous_checkpoint(tmp_path):
    a1, _ = _setup(seed=0)
    a2, _ = _setup(seed=5)
    # Killed between the two renames of an overwrite: `swap` is gone, the old checkpoint moved aside.
    whole = ia3_jax.save_adapter(tmp_path / "swap", a1, CONFIG)
    os.rename(whole, _moved_aside(whole))
    with pytest.warns(
        UserWarning, match=r"interrupted.*complete at .*swap\.ia3-replaced-\w+-0123abcd"
    ):
        loaded, config = ia3_jax.load_adapter(whole)
    chex.assert_trees_all_equal(loaded, a1)
    assert config == CONFIG
    with pytest.raises(CheckpointError, match="already exists"):
        ia3_jax.save_adapter(whole, a2, CONFIG)
    ia3_jax.save_adapter(whole, a2, CONFIG, overwrite=True)
    chex.assert_trees_all_equal(ia3_jax.load_adapter(whole)[0], a2)
    assert _step_names(tmp_path) == ["swap"]
    # A moved-aside copy that is no longer complete (its deletion was interrupted) is never offered.
    ia3_jax.save_adapter(tmp_path / "half", a1, CONFIG)
    os.rename(tmp_path / "half", _moved_aside(tmp_path / "half"))
    os.unlink(os.path.join(_moved_aside(tmp_path / "half"), "config", "metadata"))
    with pytest.raises(CheckpointError, match="does not exist") as err:
        ia3_jax.load_adapter(tmp_path / "half")
    assert "complete" not in str(err.value)


def test_names_with_glob_characters(tmp_path):
    a1, _ = _setup(seed=0)
    a2, _ = _setup(seed=5)
    # `run1`'s overwrite was interrupted: its only complete copy is the moved-aside one.
    ia3_jax.save_adapter(tmp_path / "run1", a1, CONFIG)
    os.rename(tmp_path / "run1", _moved_aside(tmp_path / "run1"))
    for _ in range(2):  # `run[0-9]` as a glob would match `run1`'s leftovers
        ia3_jax.save_adapter(tmp_path / "run[0-9]", a2, CONFIG, overwrite=True)
        ia3_jax.save_adapter(tmp_path / "run*", a2, CONFIG, step=len(os.listdir(tmp_path)), max_to_keep=1)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["run*", os.path.basename(_moved_aside(tmp_path / "run1")), "run[0-9]"]
    )
    with pytest.warns(UserWarning, match="interrupted"):
        chex.assert_trees_all_equal(ia3_jax.load_adapter(tmp_path / "run1")[0], a1)
    chex.assert_trees_all_equal(ia3_jax.load_adapter(tmp_path / "run[0-9]")[0], a2)
    with pytest.raises(CheckpointError, match="reserved"):
        ia3_jax.save_adapter(tmp_path / "x.ia3-replaced-1", a2, CONFIG)


def test_max_to_keep_refuses_a_step_it_would_delete(tmp_path):
    adapter, _ = _setup()
    root = tmp_path / "run"
    for step in (5, 6):
        ia3_jax.save_adapter(root, adapter, CONFIG, step=step, max_to_keep=2)
    with pytest.raises(CheckpointError, match=r"step 0 is older than the 2 newest steps .*\[5, 6\].*deleted at once"):
        ia3_jax.save_adapter(root, adapter, CONFIG, step=0, max_to_keep=2)  # a restarted run
    assert _step_names(root) == ["5", "6"]
    path = ia3_jax.save_adapter(root, adapter, CONFIG, step=7, max_to_keep=2)
    assert path.exists() and _step_names(root) == ["6", "7"]
    # A step directory that save_adapter did not write is never deleted by max_to_keep.
    (root / "3").mkdir()
    (root / "3" / "mine.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"would delete .*run/3, which is not exactly an adapter checkpoint"):
        ia3_jax.save_adapter(root, adapter, CONFIG, step=8, max_to_keep=2)
    assert (root / "3" / "mine.txt").exists() and _step_names(root) == ["3", "6", "7"]
    with pytest.raises(ValueError, match="positive int"):
        ia3_jax.save_adapter(root, adapter, CONFIG, step=9, max_to_keep=0)


def test_adapter_keys_that_collide_or_are_not_str(tmp_path):
    x = np.ones(4, np.float32)
    config = ia3_jax.IA3Config(target_modules=["b"])
    with pytest.raises(StructureError, match=r"\('a\.b', 'ia3_l'\) and \('a', 'b', 'ia3_l'\) both read 'a\.b\.ia3_l'"):
        ia3_jax.save_adapter(tmp_path / "ckpt", {"a.b": {"ia3_l": x}, "a": {"b": {"ia3_l": 2 * x}}}, config)
    with pytest.raises(StructureError, match=r"key 0 .*under '?layers"):
        ia3_jax.save_adapter(tmp_path / "ckpt", {"layers": {0: {"ia3_l": x}}}, config)
    assert not (tmp_path / "ckpt").exists()


def test_modules_to_save_copy_is_required(tmp_path):
    adapter, base = _setup()
    params = ia3_jax.join(base, adapter)
    without_copy = ia3_jax.split(params)[0]  # no config: the head's copy is left out
    assert "head" not in without_copy
    with pytest.raises(StructureError, match=r"no copy of module 'head'.*split\(params, config\)"):
        ia3_jax.save_adapter(tmp_path / "ckpt", without_copy, CONFIG)
    assert not (tmp_path / "ckpt").exists()


def test_step_must_be_an_int_and_home_is_expanded(tmp_path, monkeypatch):
    adapter, _ = _setup()
    with pytest.raises(ValueError, match="non-negative int, got True"):
        ia3_jax.save_adapter(tmp_path / "run", adapter, CONFIG, step=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    path = ia3_jax.save_adapter("~/ckpt", adapter, CONFIG)
    assert path == tmp_path / "home" / "ckpt" and not (tmp_path / "~").exists()
    chex.assert_trees_all_equal(ia3_jax.load_adapter("~/ckpt")[0], adapter)


def test_second_writer_is_refused_until_the_first_one_exits(tmp_path):
    """The lock is flock(2) on <path>.ia3-lock: held by a live process, released by the kernel when it dies."""
    adapter, _ = _setup()
    lock = tmp_path / "ckpt.ia3-lock"
    holder = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid %d on elsewhere' % os.getpid()); print(flush=True); "
        "time.sleep(60)"
    )
    with subprocess.Popen([sys.executable, "-c", holder, str(lock)], stdout=subprocess.PIPE) as writer:
        writer.stdout.readline()  # it holds the lock now
        refused = rf"another save .*\(pid {writer.pid} on elsewhere holds .*one writer"
        with pytest.raises(CheckpointError, match=refused):
            ia3_jax.save_adapter(tmp_path / "ckpt", adapter, CONFIG)
        assert _step_names(tmp_path) == ["ckpt.ia3-lock"]
        writer.kill()  # as SIGKILL does: the kernel releases the lock, the file stays
    ia3_jax.save_adapter(tmp_path / "ckpt", adapter, CONFIG)
    assert _step_names(tmp_path) == ["ckpt"]
    chex.assert_trees_all_equal(ia3_jax.load_adapter(tmp_path / "ckpt")[0], adapter)


def test_files_added_to_a_checkpoint_are_never_deleted(tmp_path):
    """overwrite=True and max_to_keep replace or delete only exactly what save_adapter wrote."""
    a1, _ = _setup(seed=0)
    a2, _ = _setup(seed=5)
    single = ia3_jax.save_adapter(tmp_path / "ckpt", a1, CONFIG)
    (single / "NOTES.md").write_text("mine")
    with pytest.raises(CheckpointError, match=r"refusing to replace it.*holds \['NOTES\.md'\], which save_adapter"):
        ia3_jax.save_adapter(single, a2, CONFIG, overwrite=True)
    (single / "NOTES.md").unlink()
    (single / "adapter" / "eval").mkdir()
    (single / "adapter" / "eval" / "scores.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"holds \['adapter/eval/', 'adapter/eval/scores\.json'\]"):
        ia3_jax.save_adapter(single, a2, CONFIG, overwrite=True)
    assert (single / "adapter" / "eval" / "scores.json").read_text() == "{}"
    chex.assert_trees_all_equal(ia3_jax.load_adapter(single)[0], a1)  # still loads: the added files are ignored
    root = tmp_path / "run"
    step = ia3_jax.save_adapter(root, a1, CONFIG, step=1, max_to_keep=1)
    (step / "NOTES.md").write_text("mine")
    with pytest.raises(CheckpointError, match=r"would delete .*run/1, which is not exactly.*NOTES\.md"):
        ia3_jax.save_adapter(root, a2, CONFIG, step=2, max_to_keep=1)
    assert (step / "NOTES.md").read_text() == "mine" and _step_names(root) == ["1"]
