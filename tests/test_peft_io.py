"""PEFT I/O without PyTorch: the save's checks, the reader's refusals, and crash safety under SIGKILL.

The model is a tiny param tree of numpy arrays (no transformers, no torch), so these tests are fast;
PEFT's own reading of our files is covered in test_peft_parity.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

import ia3_jax
from ia3_jax import AdapterMismatchError, CheckpointError, PeftFormatError, load_peft, save_peft

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PENDING = ".ia3-peft-pending"
REPO = Path(__file__).resolve().parents[1]

# Shared with the child process of the kill test, which imports nothing but ia3_jax and numpy.
BUILD = textwrap.dedent(
    """
    import numpy as np
    import ia3_jax

    def build(seed):
        rng = np.random.default_rng(seed)
        normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
        base = {
            "enc": {"q": {"kernel": normal(4, 6), "bias": normal(6)}, "ff": {"kernel": normal(6, 4)}},
            "classifier": {"kernel": normal(4, 2), "bias": normal(2)},
        }
        config = ia3_jax.IA3Config(target_modules=["q", "ff"], feedforward_modules=["ff"],
                                   modules_to_save=["classifier"])
        vectors = {"enc": {"q": {"ia3_l": 1 + normal(6)}, "ff": {"ia3_l": 1 + normal(6)}}}
        head = {"classifier": {"kernel": normal(4, 2), "bias": normal(2)}}
        return {**vectors, **head}, config, base
    """
)
_namespace: dict = {}
exec(BUILD, _namespace)
build = _namespace["build"]


def assert_identical(got, want):
    """Same tree, same dtypes, same bits."""
    got_leaves, want_leaves = jax.tree.leaves_with_path(got), jax.tree.leaves_with_path(want)
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
    for (path, a), (_, b) in zip(got_leaves, want_leaves):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape, jax.tree_util.keystr(path)
        assert a.tobytes() == b.tobytes(), jax.tree_util.keystr(path)


@pytest.fixture
def saved(tmp_path):
    adapter, config, base = build(0)
    directory = save_peft(tmp_path / "adapter", adapter, config, params=base)
    return directory, adapter, config, base


def test_round_trip_is_bit_identical_and_leaves_only_the_two_files(saved):
    directory, adapter, config, base = saved
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded, loaded_config = load_peft(directory, base)
    assert_identical(loaded, adapter)
    assert loaded_config == config.replace(inference_mode=True)


# --- item 8: a listed modules_to_save module must have its copy -------------------------------


def test_save_refuses_adapter_without_its_modules_to_save_copy(tmp_path):
    adapter, config, base = build(0)
    vectors_only = {"enc": adapter["enc"]}  # what split(params) without the config returns
    with pytest.raises(AdapterMismatchError, match=r"no copy of module 'classifier'.*split\(params, config\)"):
        save_peft(tmp_path / "with_params", vectors_only, config, params=base)
    with pytest.raises(AdapterMismatchError, match=r"no copy of module 'classifier'.*split\(params, config\)"):
        save_peft(tmp_path / "without_params", vectors_only, config)
    assert not any(tmp_path.iterdir())


def test_save_without_params_accepts_one_of_peft_task_defaults(tmp_path):
    """For SEQ_CLS, PEFT lists both "classifier" and "score": the model has one of them."""
    adapter, config, base = build(0)
    config = config.replace(modules_to_save=["classifier", "score"], task_type="SEQ_CLS")
    save_peft(tmp_path / "a", adapter, config)
    with pytest.raises(AdapterMismatchError, match=r"no copy of module 'classifier'"):
        save_peft(tmp_path / "b", {"enc": adapter["enc"]}, config)


def test_a_task_head_peft_saves_itself_must_be_saved(tmp_path):
    """PEFT's SEQ_CLS wrapper trains and saves the classifier whatever the config lists, and its loader fails
    (KeyError) on a file without it: such a save is refused, naming the head, before anything is written."""
    adapter, config, base = build(0)
    bare = config.replace(modules_to_save=None, task_type="SEQ_CLS")
    with pytest.raises(AdapterMismatchError, match=r"task_type='SEQ_CLS'.*'classifier'.*modules_to_save=\['classifier'\]"):
        save_peft(tmp_path / "bare", {"enc": adapter["enc"]}, bare, params=base)
    assert not any(tmp_path.iterdir())
    save_peft(tmp_path / "with_head", adapter, config.replace(task_type="SEQ_CLS"), params=base)
    save_peft(tmp_path / "causal", {"enc": adapter["enc"]}, bare.replace(task_type="CAUSAL_LM"), params=base)


def test_modules_to_save_that_peft_would_match_more_widely_are_refused(tmp_path):
    """PEFT wraps every module whose path ends with an entry ('norm' catches 'input_layernorm'): its loader would
    look for copies the file does not hold. Refused before writing; the full name saves."""
    rng = np.random.default_rng(0)
    base = {
        "layers": {"0": {"input_layernorm": {"weight": np.ones(4, np.float32)},
                         "q": {"kernel": rng.standard_normal((4, 4)).astype(np.float32)}}},
        "norm": {"weight": np.ones(4, np.float32)},
    }
    config = ia3_jax.IA3Config(target_modules=["q"], feedforward_modules=[], modules_to_save=["norm"])
    adapter = {"layers": {"0": {"q": {"ia3_l": np.ones(4, np.float32)}}}, "norm": {"weight": np.ones(4, np.float32)}}
    with pytest.raises(AdapterMismatchError, match=r"entry 'norm'.*layers\.0\.input_layernorm.*"
                       r"modules_to_save=\['norm', 'input_layernorm'\]"):
        save_peft(tmp_path / "a", adapter, config, params=base)
    # Inside a module saved whole, PEFT would nest a second copy its loader cannot read.
    head = {"proj": {"kernel": np.ones((4, 2), np.float32)}}
    nested = config.replace(modules_to_save=["head", "proj"])
    with pytest.raises(AdapterMismatchError, match=r"entry 'proj'.*head\.proj inside a module saved whole"):
        save_peft(tmp_path / "n", {**adapter, "head": head}, nested, params={**base, "head": head})
    assert not any(tmp_path.iterdir())
    # The suggested list saves a copy of every module PEFT's rule selects, and reads back as written.
    both = config.replace(modules_to_save=["norm", "input_layernorm"])
    layer = {**adapter["layers"]["0"], "input_layernorm": {"weight": np.full(4, 2.0, np.float32)}}
    copies = {**adapter, "layers": {"0": layer}}
    save_peft(tmp_path / "b", copies, both, params=base)
    loaded, read = load_peft(tmp_path / "b", base)
    assert read.modules_to_save == ("input_layernorm", "norm")
    jax.tree.map(np.testing.assert_array_equal, loaded, copies)


def test_an_embedding_copy_the_head_may_read_warns_both_ways(tmp_path):
    """No output kernel (vocab out) next to a copied embedding: the head may be tied to it, where PEFT's copy
    would replace the input embedding only. A separate head (an lm_head kernel) is quiet."""
    rng = np.random.default_rng(0)
    emb = {"embedding": rng.standard_normal((10, 4)).astype(np.float32)}
    base = {"wte": emb, "q": {"kernel": rng.standard_normal((4, 4)).astype(np.float32)}}
    config = ia3_jax.IA3Config(target_modules=["q"], feedforward_modules=[], modules_to_save=["wte"])
    adapter = {"q": {"ia3_l": np.ones(4, np.float32)}, "wte": emb}
    with pytest.warns(UserWarning, match=r"save_peft: modules_to_save copies 'wte', an input embedding.*tied"):
        save_peft(tmp_path / "tied", adapter, config, params=base)
    with pytest.warns(UserWarning, match=r"load_peft: modules_to_save copies 'wte'"):
        load_peft(tmp_path / "tied", base)
    separate = {**base, "lm_head": {"kernel": rng.standard_normal((4, 10)).astype(np.float32)}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_peft(tmp_path / "separate", adapter, config, params=separate)
        load_peft(tmp_path / "separate", separate)


def test_save_onto_a_file_is_refused(tmp_path):
    adapter, config, base = build(0)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(CheckpointError, match="is a file"):
        save_peft(tmp_path / "file", adapter, config, params=base)
    assert (tmp_path / "file").read_text() == "mine"


def test_save_replaces_the_pair_and_keeps_other_files(saved):
    directory, _, config, base = saved
    (directory / "README.md").write_text("notes")
    new, _, _ = build(1)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(ia3_jax.CheckpointError, match="already holds an adapter of peft_type 'IA3'.*overwrite=True"):
        save_peft(directory, new, config, params=base)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # refused before any write
    save_peft(directory, new, config, params=base, overwrite=True)
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    assert_identical(load_peft(directory, base)[0], new)


def test_save_refuses_a_directory_holding_another_adapter(tmp_path):
    """A LoRA (or any) adapter's files are not replaced unless asked: PEFT's save_pretrained would have."""
    adapter, config, base = build(0)
    directory = tmp_path / "lora"
    directory.mkdir()
    (directory / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": 8}')
    with pytest.raises(ia3_jax.CheckpointError, match="peft_type 'LORA'"):
        save_peft(directory, adapter, config, params=base)
    assert (directory / CONFIG_NAME).read_text() == '{"peft_type": "LORA", "r": 8}'
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME]  # no staging folder left either
    (directory / CONFIG_NAME).unlink()
    (directory / WEIGHTS_NAME).write_bytes(b"not safetensors")  # a weights file alone counts too
    with pytest.raises(ia3_jax.CheckpointError, match=r"already holds an adapter \(adapter_model.safetensors\)"):
        save_peft(directory, adapter, config, params=base)
    (directory / WEIGHTS_NAME).unlink()
    (directory / CONFIG_NAME).symlink_to(tmp_path / "gone.json")  # dangling: still someone's file name
    with pytest.raises(ia3_jax.CheckpointError, match=r"already holds an adapter \(adapter_config.json\)"):
        save_peft(directory, adapter, config, params=base)
    assert (directory / CONFIG_NAME).is_symlink()
    (directory / CONFIG_NAME).unlink()
    (directory / PENDING).mkdir()  # what a save killed after its commit leaves: load_peft reads it
    with pytest.raises(ia3_jax.CheckpointError, match="interrupted save_peft"):
        save_peft(directory, adapter, config, params=base)


# --- item 13: the reader refuses what it would otherwise cast or accept silently --------------


def _rewrite_tensors(directory: Path, change) -> None:
    """Changes the tensors as a hand edit (or PyTorch PEFT) would write them: no per-tensor hashes."""
    tensors = safetensors.numpy.load_file(directory / WEIGHTS_NAME)
    with open(directory / WEIGHTS_NAME, "rb") as f:
        metadata = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    del metadata["ia3_jax.tensor_sha256"]
    change(tensors)
    safetensors.numpy.save_file(tensors, directory / WEIGHTS_NAME, metadata=metadata)


KEY = "base_model.model.enc.q.ia3_l"


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.uint8])
def test_load_refuses_integer_and_bool_tensors(saved, dtype):
    directory, _, _, base = saved
    _rewrite_tensors(directory, lambda t: t.__setitem__(KEY, np.ones(t[KEY].shape, dtype)))
    stored = {np.int32: "I32", np.int64: "I64", np.bool_: "BOOL", np.uint8: "U8"}[dtype]
    with pytest.raises(PeftFormatError, match=rf"tensor {KEY!r} has dtype {stored}, not floating point"):
        load_peft(directory, base)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_load_refuses_nan_and_inf(saved, bad):
    directory, _, _, base = saved

    def poison(tensors):
        tensors[KEY] = tensors[KEY].copy()
        tensors[KEY][2, 0] = bad

    _rewrite_tensors(directory, poison)
    with pytest.raises(PeftFormatError, match=rf"tensor {KEY!r} holds 1 NaN or inf values of 6"):
        load_peft(directory, base)


def test_load_refuses_float64_that_overflows_float32(saved):
    directory, _, _, base = saved
    _rewrite_tensors(directory, lambda t: t.__setitem__(KEY, np.full(t[KEY].shape, 1e300)))
    with pytest.raises(PeftFormatError, match=rf"{KEY!r}.*float64 values overflow float32"):
        load_peft(directory, base)


def test_unknown_config_keys_at_neutral_values_are_ignored_with_a_warning(saved):
    directory, adapter, config, base = saved
    data = json.loads((directory / CONFIG_NAME).read_text())
    newer = {"target_parameters": None, "use_new_thing": False, "layer_replication": [], "extra_map": {}}
    (directory / CONFIG_NAME).write_text(json.dumps({**data, **newer}))
    with pytest.warns(UserWarning, match=r"ignoring keys \['extra_map', 'layer_replication', 'target_parameters', "
                                         r"'use_new_thing'\]"):
        loaded, loaded_config = load_peft(directory, base)
    assert_identical(loaded, adapter)
    assert loaded_config == config.replace(inference_mode=True)


@pytest.mark.parametrize(("key", "value"), [("target_parameters", ["enc.q.kernel"]), ("use_new_thing", True),
                                            ("r", 8)])
def test_unknown_config_keys_that_matter_are_refused(saved, key, value):
    directory, _, _, base = saved
    data = json.loads((directory / CONFIG_NAME).read_text())
    (directory / CONFIG_NAME).write_text(json.dumps({**data, key: value, "harmless": None}))
    with pytest.raises(PeftFormatError, match=rf"not a valid IA3 config: it sets \['{key}'\] \({key}="):
        load_peft(directory, base)
    with pytest.raises(PeftFormatError, match=rf"\['{key}'\]"):
        ia3_jax.read_peft_config(directory)


# --- item 13: a mixed pair is named as such ---------------------------------------------------


def test_config_and_weights_of_different_saves_are_named(saved, tmp_path):
    directory, _, config, base = saved
    other = save_peft(tmp_path / "other", build(1)[0], config.replace(task_type="SEQ_CLS"),
                      params=base)
    shutil.copy(other / WEIGHTS_NAME, directory / WEIGHTS_NAME)
    with pytest.raises(PeftFormatError, match="come from different saves"):
        load_peft(directory, base)


def test_hand_edited_informational_fields_keep_the_pair(saved):
    directory, adapter, _, base = saved
    data = json.loads((directory / CONFIG_NAME).read_text())
    data.update(base_model_name_or_path="me/my-model", revision="v2", inference_mode=False)
    data["target_modules"] = list(reversed(data["target_modules"]))
    (directory / CONFIG_NAME).write_text(json.dumps(data, indent=4))
    assert_identical(load_peft(directory, base)[0], adapter)


# --- crash safety -----------------------------------------------------------------------------


def test_interrupted_after_commit_loads_the_new_pair_and_the_next_save_finishes(saved):
    """The state a kill between the two moves leaves: new weights in place, new config still pending."""
    directory, _, config, base = saved
    new = build(1)[0]
    staging = save_peft(directory.parent / "new", new, config, params=base)
    (directory / PENDING).mkdir()
    shutil.copy(staging / CONFIG_NAME, directory / PENDING / CONFIG_NAME)
    shutil.copy(staging / WEIGHTS_NAME, directory / WEIGHTS_NAME)
    with pytest.warns(UserWarning, match="interrupted after it had written the new adapter completely"):
        assert_identical(load_peft(directory, base)[0], new)
    newer = build(2)[0]
    save_peft(directory, newer, config, params=base, overwrite=True)
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert_identical(load_peft(directory, base)[0], newer)


def test_a_failing_save_leaves_the_old_pair_and_no_leftovers(saved, monkeypatch):
    directory, adapter, config, base = saved
    real_rename = os.rename

    def failing_rename(src, dst):
        if str(dst).endswith(PENDING):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="No space left"):
        save_peft(directory, build(1)[0], config, params=base, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert_identical(load_peft(directory, base)[0], adapter)


def test_staging_folders_of_killed_saves_are_swept(saved):
    """Under the lock every staging folder is a dead save's: all of them go, nothing else does."""
    directory, _, config, base = saved
    for name in (".ia3-peft-partial-0000abcd", ".ia3-peft-partial-elsewhere-1-00000000"):
        (directory / name).mkdir()
        (directory / name / WEIGHTS_NAME).write_bytes(b"partial")
    (directory / ".ia3-peft-partials-mine").mkdir()
    save_peft(directory, build(1)[0], config, params=base, overwrite=True)
    assert sorted(p.name for p in directory.iterdir()) == [".ia3-peft-partials-mine", CONFIG_NAME, WEIGHTS_NAME]


# The child imports ia3_jax and numpy only, then forks one grandchild per filesystem step: each
# counts the filesystem calls (tests/_checkpoint_child.instrument), runs save_peft, and SIGKILLs
# itself at its step.
KILL_CHILD = BUILD + textwrap.dedent(
    """
    import json, os, shutil, signal, sys
    from tests._checkpoint_child import instrument

    root = sys.argv[1]
    new, config, base = build(1)

    def run(kill_at, directory):
        pid = os.fork()
        if pid == 0:
            log = instrument(kill_at)
            ia3_jax.save_peft(directory, new, config, params=base, overwrite=True)
            with open(os.path.join(root, "steps.json"), "w") as f:  # after the save: counted, harmless
                json.dump(log, f)
            os._exit(0)
        return os.waitpid(pid, 0)[1]

    shutil.copytree(os.path.join(root, "old"), os.path.join(root, "count"))
    assert run(0, os.path.join(root, "count")) == 0
    with open(os.path.join(root, "steps.json")) as f:
        steps = json.load(f)[:-1]
    for k in range(1, len(steps) + 1):
        directory = os.path.join(root, str(k))
        shutil.copytree(os.path.join(root, "old"), directory)
        status = run(k, directory)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, status)
    print(json.dumps(steps))
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_at_every_filesystem_step_leaves_old_or_new_pair(tmp_path):
    """A save killed before any one of its filesystem steps: the previous adapter loads bit-identical
    up to the commit (the rename to .ia3-peft-pending), the new one after it; the next save cleans up."""
    old, config, base = build(0)
    new = build(1)[0]
    save_peft(tmp_path / "old", old, config, params=base)
    result = subprocess.run([sys.executable, "-c", KILL_CHILD, str(tmp_path)], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = json.loads(result.stdout.strip().splitlines()[-1])
    ops = [s.split()[0] for s in steps]
    # lock (opened, its owner written), staging folder, the two files, the commit, the two moves, the empty
    # folder, the lock's unlink
    expected = ["os.open", "write", "mkdir", "open", "open", "rename", "replace", "replace", "rmdir", "unlink"]
    assert ops == expected, steps
    commit = next(i for i, s in enumerate(steps, start=1) if s.startswith("rename") and s.endswith(PENDING))
    assert_identical(load_peft(tmp_path / "count", base)[0], new)
    for k in range(1, len(steps) + 1):
        directory = tmp_path / str(k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the pending-save warning, for the kills after the commit
            loaded, loaded_config = load_peft(directory, base)
        assert_identical(loaded, old if k <= commit else new)
        assert loaded_config == config.replace(inference_mode=True)
        save_peft(directory, new, config, params=base, overwrite=True)  # the next save finishes or sweeps what the kill left
        assert sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME], k
        assert_identical(load_peft(directory, base)[0], new)


# --- one writer per directory: writer 2 started at each filesystem step of writer 1 -------------


def test_second_writer_at_every_step_of_the_first_is_refused(saved, monkeypatch):
    """In-process and enumerated: flock locks conflict between two opens of the file in one process too."""
    import builtins

    directory, old, config, base = saved
    first, second = build(1)[0], build(2)[0]
    template = directory.parent / "template"
    shutil.copytree(directory, template)
    state = {"count": 0, "at": None, "nested": False, "outcome": None}

    def counted(real, is_write=lambda *a, **k: True):
        def call(*args, **kwargs):
            if not state["nested"] and is_write(*args, **kwargs):
                state["count"] += 1
                if state["count"] == state["at"]:
                    state["nested"] = True
                    try:
                        save_peft(directory, second, config, params=base, overwrite=True)
                        state["outcome"] = "ok"
                    except CheckpointError as err:
                        state["outcome"] = str(err)
                    finally:
                        state["nested"] = False
            return real(*args, **kwargs)

        return call

    for name in ("replace", "rename", "mkdir", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, counted(getattr(os, name)))
    monkeypatch.setattr(os, "open", counted(os.open, lambda path, flags, *a, **k: bool(flags & os.O_CREAT)))
    monkeypatch.setattr(builtins, "open", counted(builtins.open, lambda f, mode="r", *a, **k: "x" in mode))
    save_peft(directory, first, config, params=base, overwrite=True)
    steps = state["count"]
    assert steps == 9
    for at in range(1, steps + 1):
        shutil.rmtree(directory)
        shutil.copytree(template, directory)
        state.update(count=0, at=at, outcome=None)
        save_peft(directory, first, config, params=base, overwrite=True)  # writer 1 always succeeds: it reports last
        if at == 1:  # before writer 1 opened the lock: writer 2 ran to the end first
            assert state["outcome"] == "ok"
        else:
            assert state["outcome"].startswith(f"another save to {directory} is running (pid {os.getpid()} on"), at
        assert sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME], at
        assert sorted(p.name for p in directory.parent.iterdir()) == ["adapter", "template"], at  # no lock left
        assert_identical(load_peft(directory, base)[0], first)


# --- saving refuses what the file must not hold ------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.arange(6, dtype=np.int32), r"'enc\.q\.ia3_l' has dtype int32"),
        (np.array([1, 2, np.nan, 1, 1, 1], np.float32), r"'enc\.q\.ia3_l' holds NaN or inf"),
        (np.array([1, 2, 1e300, 1, 1, 1], np.float64), r"'enc\.q\.ia3_l' holds NaN or inf \(as float32"),
    ],
)
def test_save_refuses_integer_and_non_finite_tensors(tmp_path, value, message):
    adapter, config, base = build(0)
    adapter["enc"]["q"]["ia3_l"] = value
    with pytest.raises(ia3_jax.AdapterDtypeError, match=message):
        save_peft(tmp_path / "adapter", adapter, config, params=base)
    assert not any(tmp_path.iterdir())


# --- damaged files: PeftFormatError naming the file, or the exact values ----------------------


def _damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "delete":
        file.unlink()
        return
    middle = len(data) // 2
    file.write_bytes(
        {
            "truncate": data[:middle],
            "zero": bytes(len(data)),
            "flip": data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :],
        }[how]
    )


def _flip_positions(file: Path) -> list[int]:
    """The middle byte, and one byte inside each tensor's data (the part that would load as other values)."""
    data = file.read_bytes()
    header = int.from_bytes(data[:8], "little")
    offsets = [v["data_offsets"] for k, v in json.loads(data[8 : 8 + header]).items() if k != "__metadata__"]
    return [len(data) // 2] + [8 + header + (start + end) // 2 for start, end in offsets]


def test_damaged_files_give_peft_format_error_or_exact_values(saved, tmp_path):
    directory, adapter, config, base = saved
    cases = [(name, how) for name in (CONFIG_NAME, WEIGHTS_NAME) for how in ("truncate", "zero", "flip", "delete")]
    middle, *in_data = _flip_positions(directory / WEIGHTS_NAME)
    cases += [(WEIGHTS_NAME, position) for position in (middle, *in_data)]
    cases += [("both", "delete")]
    errors, loaded_cases = 0, []
    for name, how in cases:
        case = tmp_path / "case"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(directory, case)
        for target in ((CONFIG_NAME, WEIGHTS_NAME) if name == "both" else (name,)):
            if isinstance(how, int):  # one bit pattern changed inside a tensor's data
                data = bytearray((case / target).read_bytes())
                data[how] ^= 0x01
                (case / target).write_bytes(bytes(data))
            else:
                _damage(case / target, how)
        try:
            loaded, _ = load_peft(case, base)
        except PeftFormatError as err:
            assert (CONFIG_NAME if name == "both" else name) in str(err), (name, how, str(err))
            errors += 1
        else:
            assert_identical(loaded, adapter)
            loaded_cases.append((name, how))
    # The middle byte lies in the header, whose metadata order safetensors varies: a flip there may
    # rename a metadata key (the values then load exactly). A flip in any tensor's data is always caught.
    assert errors >= len(cases) - 2 and not any(how in in_data for _, how in loaded_cases), loaded_cases
