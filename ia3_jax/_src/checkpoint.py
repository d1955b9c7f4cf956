"""Adapter-only checkpoints on orbax: the adapter tree and its `IA3Config` (PEFT's JSON keys).

A checkpoint is one orbax composite directory plus our manifest::

    path/
      adapter/     the adapter tree (``ia3_l`` vectors and ``modules_to_save`` copies), orbax PyTree
      config/      ``IA3Config.to_dict()`` (the keys of PEFT's adapter_config.json), orbax JSON
      opt_state/   optional: the optimizer state over the adapter, to resume training (`load_opt_state`)
      ia3_jax_checkpoint.json   written last: format version, SHA-256 of the config and of every
                   array, and the list of every entry the save wrote

With ``step=`` the same directories live under ``path/<step>/`` (keep the last N, resume the latest).
A directory is an adapter checkpoint when its manifest says so; orbax's own file names are never
relied on. Saves follow the protocol of `ia3_jax._src.atomic` (one writer per path through
``<path>.ia3-lock``; staged, read back, fsynced, renamed into place; a kill between the two renames
of an overwrite is recovered by the next save, and `load_adapter` reads the copy meanwhile).

- Nothing that save_adapter did not write is deleted: `overwrite=True` and ``max_to_keep`` replace
  or delete only a directory whose entries are exactly those its manifest lists (checked again right
  before the renames), and leftovers are matched by exact name prefix.
- A load gives the saved values bit for bit, or `CheckpointError` naming the damaged or missing file.
  `load_adapter` never reads ``opt_state/``.
- Arrays are restored to host memory, checked against their hashes, then placed (`shardings`); each
  process of a multi-host job reads and checks the whole (small) adapter and places its shards.

Paths are local (or mounted) filesystem paths: the lock and the atomic renames need POSIX semantics.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ia3_jax._src import atomic
from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config
from ia3_jax._src.dtypes import dtype_of, integer_scalar
from ia3_jax._src.errors import (
    AdapterMismatchError,
    CheckpointError,
    IA3ConfigError,
    IA3Error,
    StructureError,
    TargetError,
)
from ia3_jax._src.init import ia3_init
from ia3_jax._src.interceptor import refuse_picked
from ia3_jax._src.layout import KernelLayout
from ia3_jax._src.partition import is_trainable, split, without_vectors
from ia3_jax._src.peft_io import TASK_MODULES_TO_SAVE
from ia3_jax._src.targets import check_modules_to_save_copies, modules_to_save_roots

ADAPTER_ITEM = "adapter"
CONFIG_ITEM = "config"
OPT_STATE_ITEM = "opt_state"
MANIFEST = "ia3_jax_checkpoint.json"
_FORMAT = "ia3_jax adapter checkpoint"
_VERSION = 1
_CONFIG_FILE = f"{CONFIG_ITEM}/metadata"  # where orbax's JsonSave puts the config


# --- what a checkpoint holds -------------------------------------------------------------------


def _array_hash(x: Any) -> dict[str, Any]:
    a = np.asarray(jax.device_get(x))
    return {
        "dtype": a.dtype.name,
        "shape": list(a.shape),
        "sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest(),
    }


def _tree_hashes(tree: Any) -> dict[str, dict[str, Any]]:
    """``{key path: dtype, shape, SHA-256}`` for every leaf: a load compares what it read to these."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): _array_hash(leaf) for path, leaf in flat}


def _config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class _Payload:
    """What one save writes, validated: orbax's items and the manifest (without its entry list)."""

    args: ocp.args.Composite
    manifest: dict[str, Any]
    opt_state: Any


def _adapter_leaves(adapter: Mapping[str, Any], prefix: _tree.Path = ()) -> Iterator[tuple[_tree.Path, Any]]:
    """Leaves with their key paths; refuses keys that are not str (orbax would store them as str)."""
    for key, child in adapter.items():
        if not isinstance(key, str):
            where = _tree.dotted(prefix) or "the top level"
            raise StructureError(
                f"adapter key {key!r} under {where} is a {type(key).__name__}: adapter trees are nested dicts "
                "keyed by module and param names (str), as ia3_jax.split returns them."
            )
        if isinstance(child, Mapping):
            yield from _adapter_leaves(child, prefix + (key,))
        else:
            yield prefix + (key,), child


def _payload(adapter: Mapping[str, Any], config: IA3Config, opt_state: Any) -> _Payload:
    """Checks the adapter against its config and prepares the items; raises before anything is written."""
    if not isinstance(config, IA3Config):
        raise IA3ConfigError(f"config must be an ia3_jax.IA3Config, got {type(config).__name__}.")
    if not isinstance(adapter, Mapping) or not adapter:
        raise StructureError(
            f"adapter must be a non-empty nested dict (the first result of ia3_jax.split), got {adapter!r:.80}."
        )
    roots = modules_to_save_roots(adapter, config)
    arrays: dict[_tree.Path, Any] = {}
    joined: dict[str, _tree.Path] = {}
    leaves = list(_adapter_leaves(adapter))
    refuse_picked(leaves, "save the bank they were picked from.")
    for path, leaf in leaves:
        value = _tree.unbox(leaf)  # boxes carry sharding names only; the checkpoint holds arrays
        if not isinstance(value, (jax.Array, np.ndarray)):
            raise StructureError(f"adapter leaf {_tree.dotted(path)!r} is a {type(value).__name__}, not an array.")
        if not is_trainable(path, roots):
            raise StructureError(
                f"adapter leaf {_tree.dotted(path)!r} is neither an IA3 vector nor in config.modules_to_save="
                f"{config.modules_to_save}: these look like base params. Save the first result of "
                "ia3_jax.split(params, config)."
            )
        other = joined.setdefault(_tree.dotted(path), path)
        if other != path:  # orbax names each array by its '.'-joined path: one would load as the other
            raise StructureError(
                f"adapter paths {other} and {path} both read {_tree.dotted(path)!r} once joined with '.', the "
                "name orbax stores arrays under: one would load as the other. Rename the key with the dot."
            )
        arrays[path] = value
    check_modules_to_save_copies(adapter, config, alternatives=TASK_MODULES_TO_SAVE.get(config.task_type or "", ()))
    tree = _tree.updated({}, arrays)
    manifest: dict[str, Any] = {
        "format": _FORMAT,
        "version": _VERSION,
        "config_sha256": _config_hash(config.to_dict()),
        ADAPTER_ITEM: _tree_hashes(tree),
    }
    items = {ADAPTER_ITEM: ocp.args.StandardSave(tree), CONFIG_ITEM: ocp.args.JsonSave(config.to_dict())}
    if opt_state is not None:
        items[OPT_STATE_ITEM] = ocp.args.StandardSave(opt_state)
        manifest[OPT_STATE_ITEM] = _tree_hashes(opt_state)
    return _Payload(ocp.args.Composite(**items), manifest, opt_state)


# --- reading and checking a directory ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Contents:
    """The config and the manifest of a complete checkpoint, checked against each other."""

    config: IA3Config
    manifest: Mapping[str, Any]


def _damaged(file: str, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{file} is damaged ({problem}): this checkpoint cannot be loaded. Load another step or save again."
    )


def _read_json(directory: str, name: str) -> Any:
    file = os.path.join(directory, name)
    try:
        with open(file, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise _damaged(file, f"{type(err).__name__}: {err}") from None


def _entries(directory: str) -> list[str]:
    """Every file and directory (with a trailing '/') under `directory`, relative, the manifest left out."""
    found = []
    for root, dirs, files in os.walk(directory):
        rel = os.path.relpath(root, directory)
        found += [os.path.normpath(os.path.join(rel, d)) + "/" for d in dirs]
        found += [os.path.normpath(os.path.join(rel, f)) for f in files]
    return sorted(e for e in found if e != MANIFEST)


def _valid_manifest(manifest: Any) -> bool:
    return (
        isinstance(manifest, dict)
        and manifest.get("format") == _FORMAT
        and manifest.get("version") == _VERSION
        and isinstance(manifest.get("config_sha256"), str)
        and isinstance(manifest.get(ADAPTER_ITEM), dict)
        and isinstance(manifest.get(OPT_STATE_ITEM, {}), dict)
        and isinstance(manifest.get("entries"), list)
        and all(isinstance(e, str) for e in manifest["entries"])
    )


def _contents(directory: str) -> _Contents:
    """The checked manifest and config of `directory`; `CheckpointError` naming the first missing or bad file.

    Entries under ``opt_state/`` are not required: `load_adapter` never reads them.
    """
    manifest_file = os.path.join(directory, MANIFEST)
    if not os.path.isfile(manifest_file):
        raise CheckpointError(
            f"{directory} is not a complete adapter checkpoint (no {MANIFEST}, which save_adapter writes last): a "
            "save into it was interrupted, the file was deleted, or save_adapter did not write it. Load another "
            "step or save again."
        )
    manifest = _read_json(directory, MANIFEST)
    if not _valid_manifest(manifest):
        raise _damaged(manifest_file, f"not a manifest of an {_FORMAT}, version {_VERSION}")
    needed = [e for e in manifest["entries"] if not e.startswith(OPT_STATE_ITEM + "/")]
    missing = [e for e in needed if not os.path.lexists(os.path.join(directory, e))]
    if missing:
        raise CheckpointError(
            f"{directory} is not a complete adapter checkpoint (missing {missing[:8]}): its files were deleted or "
            "damaged. Load another step or save again."
        )
    stored = _read_json(directory, _CONFIG_FILE)
    config_file = os.path.join(directory, _CONFIG_FILE)
    if _config_hash(stored) != manifest["config_sha256"]:
        raise _damaged(config_file, "its contents do not match the hash saved with them")
    try:
        config = IA3Config.from_dict(stored)
    except (IA3Error, TypeError, ValueError, KeyError, AttributeError) as err:
        raise _damaged(config_file, f"not an IA3 config: {err}") from None
    return _Contents(config, manifest)


def checkpoint_problem(directory: str) -> str | None:
    """Why `directory` is not exactly a checkpoint that save_adapter wrote, or None when it is one.

    Exactly: a complete checkpoint whose entries are the ones its manifest lists, nothing added (a
    user's ``NOTES.md`` or ``eval/scores.json``) and nothing missing. Only such a directory is ever
    replaced or deleted.

    Example:
      >>> ia3_jax.checkpoint_problem("ckpt/adapter")       # None: exactly what save_adapter wrote
    """
    try:
        listed = set(_contents(directory).manifest["entries"])
    except CheckpointError as err:
        return str(err)
    present = set(_entries(directory))
    if present - listed:
        return f"it holds {sorted(present - listed)[:8]}, which save_adapter did not write"
    if listed - present:
        return f"it lacks {sorted(listed - present)[:8]}, which save_adapter wrote"
    return None


def _unreadable(item: str, err: Exception, read: str) -> CheckpointError:
    """A failure of orbax or tensorstore under `item`, as a `CheckpointError` naming the file it names.

    `read` is the file blamed when the message names none (orbax's JSON errors do not).
    """
    text = str(err)
    named = re.search(re.escape(item) + r"[^\s\"'`,;:]*", text)
    database = os.path.join(item, "manifest.ocdbt")  # tensorstore names only the database when it is gone
    where = named.group(0) if named else os.path.join(item, read)
    return _damaged(database if not os.path.exists(database) else where, f"{type(err).__name__}: {text[:400]}")


def _saved_tree(item: str) -> Any:
    """The tree under `item` as `jax.ShapeDtypeStruct` leaves, from orbax's metadata (no array is read)."""
    handler = ocp.StandardCheckpointHandler()
    try:
        metadata = handler.metadata(epath.Path(item)).tree
    except Exception as err:  # tensorstore raises ValueError or a bare Exception for damaged data
        raise _unreadable(item, err, "_METADATA") from err  # the tree's metadata, orbax's name for it
    finally:
        handler.close()
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata)


def _containers(tree: Any) -> Any:
    """`tree`'s containers as orbax stores a state: lists, dicts, ``"*"`` for an array, None for an empty node."""
    if isinstance(tree, Mapping):
        return {k: _containers(v) for k, v in tree.items()} or None
    if isinstance(tree, list | tuple):
        return [_containers(v) for v in tree] or None
    return None if tree is None else "*"


def _first_difference(saved: Any, like: Any, at: str = "") -> str:
    """Where two `_containers` trees first differ, e.g. ``"at [1]: saved 3 entries, like 2"``."""
    if isinstance(saved, list) and isinstance(like, list) and len(saved) == len(like):
        for i, (a, b) in enumerate(zip(saved, like)):
            if a != b:
                return _first_difference(a, b, f"{at}[{i}]")
    if isinstance(saved, dict) and isinstance(like, dict) and saved.keys() == like.keys():
        for key in saved:
            if saved[key] != like[key]:
                return _first_difference(saved[key], like[key], f"{at}[{key!r}]")

    def describe(node: Any) -> str:
        if isinstance(node, list | dict):
            return f"{len(node)} entries"
        return "an empty node" if node is None else "an array"

    return f"at {at or 'the top'}: saved {describe(saved)}, like {describe(like)}"


def _host_restore(item: str, hashes: Mapping[str, Any], like: Any) -> Any:
    """The tree under `item`, structured like `like`, as numpy arrays checked bit for bit against `hashes`."""
    target = jax.tree.map(lambda x: np.empty(np.shape(x), dtype_of(x)), like)
    handler = ocp.StandardCheckpointHandler()
    try:
        tree = handler.restore(epath.Path(item), args=ocp.args.StandardRestore(target))
    except Exception as err:
        raise _unreadable(item, err, "") from err
    finally:
        handler.close()
    got = _tree_hashes(tree)
    if got.keys() != hashes.keys():
        raise _damaged(item, f"read {sorted(got)[:8]}, saved {sorted(hashes)[:8]}")
    for key, want in hashes.items():
        if got[key] != want:
            raise _damaged(item, f"the data of {key} does not match the hash saved with it")
    return tree


def _put(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array onto `sharding`'s devices (each process places its addressable shards)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _place(tree: Any, shardings: Any) -> Any:
    """Host arrays placed by `shardings` (one `Sharding` or a tree of them; default: the first device)."""
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda a: _put(a, shardings), tree)
    try:
        return jax.tree.map(_put, tree, shardings)
    except ValueError as err:
        raise StructureError(
            f"shardings must be one jax.sharding.Sharding or a tree shaped like the adapter: {err}"
        ) from None


# --- locating checkpoints ----------------------------------------------------------------------


def _resolve(path: epath.PathLike) -> str:
    """The absolute local path, ``~`` expanded."""
    text = os.fspath(path)
    if "://" in text:
        raise CheckpointError(
            f"{text}: adapter checkpoints need a local or mounted filesystem (the lock and the atomic renames "
            "do). Save to a local directory and copy it, or mount the bucket."
        )
    return os.path.abspath(os.path.expanduser(text))


def _replaced_copy(path: str) -> str | None:
    """The complete checkpoint that an overwrite of `path`, killed between its renames, left aside."""
    complete = [d for d in atomic.leftovers(path, atomic.REPLACED) if checkpoint_problem(d) is None]
    return max(complete, key=os.path.getmtime, default=None)


def _steps(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    names = (n for n in os.listdir(root) if n.isdigit() and str(int(n)) == n)
    return sorted(int(n) for n in names if os.path.isdir(os.path.join(root, n)))


def _looks_single(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, n)) for n in (MANIFEST, ADAPTER_ITEM, CONFIG_ITEM))


def _leftovers(path: str) -> str:
    markers = (atomic.STAGING, atomic.REPLACED, atomic.TRASH)
    found = [os.path.basename(p) for marker in markers for p in atomic.leftovers(path, marker)]
    return f" Unfinished saves next to it (not loadable): {found}." if found else ""


def _checked_step(step: Any) -> int:
    """`step` as an int: a non-negative integer scalar (Python, NumPy or JAX), else `CheckpointError`."""
    value = integer_scalar(step)
    if value is None or value < 0:
        raise CheckpointError(f"step must be a non-negative int, got {step!r}.")
    return value


def _locate(path: epath.PathLike, step: int | None) -> tuple[str, _Contents]:
    """The complete checkpoint directory that a load reads, with its checked manifest and config."""
    step = None if step is None else _checked_step(step)
    path = _resolve(path)
    if not os.path.lexists(path):
        replaced = _replaced_copy(path) if step is None else None
        if replaced is None:
            raise CheckpointError(f"no adapter checkpoint at {path}: the directory does not exist.{_leftovers(path)}")
        warnings.warn(
            f"{path} is missing: an overwrite of it was interrupted. Reading the previous checkpoint, complete "
            f"at {replaced}; the next save_adapter to {path} moves it back first.",
            stacklevel=3,
        )
        return replaced, _contents(replaced)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is a file; an adapter checkpoint is a directory written by save_adapter.")
    name = os.path.basename(path)
    if ocp.step.TMP_DIR_SUFFIX in name or atomic.RESERVED in name:
        raise CheckpointError(f"{path} is the temporary directory of an unfinished save, not a checkpoint.")
    if _looks_single(path):
        if step is not None:
            raise CheckpointError(f"{path} is a single checkpoint without steps; drop step={step}.")
        return path, _contents(path)
    steps = _steps(path)
    if steps:
        chosen = steps[-1] if step is None else step
        if chosen not in steps:
            raise CheckpointError(f"no step {step} under {path}; steps there: {steps}.")
        directory = os.path.join(path, str(chosen))
        return directory, _contents(directory)
    names = sorted(os.listdir(path))
    if not names:
        raise CheckpointError(f"{path} is an empty directory, not an adapter checkpoint.")
    raise CheckpointError(
        f"{path} is not an adapter checkpoint: expected {MANIFEST} (from save_adapter) or step directories "
        f"(from save_adapter(..., step=)); found {names[:20]}."
    )


def checkpoint_directory(path: epath.PathLike, step: int | None = None) -> epath.Path:
    """The complete checkpoint directory that `load_adapter` would read: `path` itself, or a step.

    After an overwrite of `path` killed between its two renames (`path` missing), this is the
    previous checkpoint under its temporary name, with a warning. Raises `CheckpointError` for a
    missing, empty, temporary (interrupted), incomplete or damaged directory, naming the file.

    Example:
      >>> directory = ia3_jax.checkpoint_directory("ckpt/run", step=3)   # an epath.Path; raises if incomplete
    """
    return epath.Path(_locate(path, step)[0])


# --- writing -----------------------------------------------------------------------------------


def _write_verified(directory: str, payload: _Payload) -> None:
    """Writes the checkpoint into the new `directory`, reads all of it back, then writes the manifest last."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(epath.Path(directory), args=payload.args)
    manifest = {**payload.manifest, "entries": _entries(directory)}
    if _config_hash(_read_json(directory, _CONFIG_FILE)) != manifest["config_sha256"]:
        raise CheckpointError(f"{directory} does not hold the config just written to it: the save is abandoned.")
    item = os.path.join(directory, ADAPTER_ITEM)
    _host_restore(item, manifest[ADAPTER_ITEM], _saved_tree(item))
    if payload.opt_state is not None:
        _host_restore(os.path.join(directory, OPT_STATE_ITEM), manifest[OPT_STATE_ITEM], payload.opt_state)
    with open(os.path.join(directory, MANIFEST), "x", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def _check_single_target(path: str, overwrite: bool) -> None:
    """Raises `CheckpointError` unless a checkpoint may be written at `path`; reads only."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        kind = "a symbolic link" if os.path.islink(path) else "a file"
        raise CheckpointError(
            f"{path} is {kind}, not an adapter checkpoint; refusing to replace it. Choose another path."
        )
    # What is there decides the advice: overwrite=True cannot help with a directory that is not a checkpoint.
    if os.path.isdir(path) and os.listdir(path):
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(
                f"{path} exists and is not exactly an adapter checkpoint written by save_adapter; refusing to replace "
                f"it. Choose another path, or move it (or the files added to it) away. ({problem})"
            )
    if not overwrite and (os.path.isdir(path) or _replaced_copy(path) is not None):
        raise CheckpointError(f"{path} already exists: pass overwrite=True to replace it, or step= to keep versions.")


def _save_single(path: str, payload: _Payload, overwrite: bool) -> None:
    _check_single_target(path, overwrite)  # fail fast; checked again under the lock and before the renames
    if not os.path.isdir(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path))
    with atomic.replaced_directory(path, lambda target: _check_single_target(target, overwrite)) as staging:
        _write_verified(staging, payload)


def _check_step_target(root: str, step: int, max_to_keep: int | None) -> list[int]:
    """Raises `CheckpointError` unless `step` may be saved under `root`; returns the steps to delete."""
    if os.path.lexists(root) and not os.path.isdir(root):
        raise CheckpointError(f"{root} is a file; step checkpoints need a directory of their own.")
    if os.path.isdir(root) and _looks_single(root):
        raise CheckpointError(f"{root} is a single adapter checkpoint; step checkpoints need a directory of their own.")
    steps = _steps(root)
    if step in steps:
        raise CheckpointError(f"step {step} already exists under {root}; steps there: {steps}.")
    if max_to_keep is None:
        return []
    kept = sorted({*steps, step})[-max_to_keep:]
    if step not in kept:
        raise CheckpointError(
            f"step {step} is older than the {max_to_keep} newest steps under {root} ({kept}): with "
            f"max_to_keep={max_to_keep} it would be deleted at once. A restarted run needs a root of its own "
            "(or delete the old steps)."
        )
    expired = [s for s in steps if s not in kept]
    for s in expired:
        problem = checkpoint_problem(os.path.join(root, str(s)))
        if problem is not None:
            raise CheckpointError(
                f"max_to_keep={max_to_keep} would delete {root}/{s}, which is not exactly an adapter checkpoint "
                f"written by save_adapter; refusing. Move it (or the files added to it) away. ({problem})"
            )
    return expired


def _save_step(root: str, step: int, payload: _Payload, max_to_keep: int | None) -> None:
    _check_step_target(root, step, max_to_keep)
    if not os.path.isdir(os.path.dirname(root)):
        os.makedirs(os.path.dirname(root))
    with atomic.locked(root):
        atomic.sweep(root)
        expired = _check_step_target(root, step, max_to_keep)
        staging = atomic.new_staging(root)
        try:
            _write_verified(staging, payload)
            if not os.path.isdir(root):
                os.mkdir(root)
                atomic.fsync_path(os.path.dirname(root))
            final = os.path.join(root, str(step))
            atomic.commit(staging, final, lambda _: _check_step_target(root, step, max_to_keep))
        finally:
            atomic.sweep(root)
        for s in expired:
            problem = checkpoint_problem(os.path.join(root, str(s)))
            if problem is None:
                atomic.discard(os.path.join(root, str(s)), root)
            else:  # changed since the check before the save: keep it
                warnings.warn(f"max_to_keep: kept {root}/{s}, changed during this save ({problem}).", stacklevel=3)


def save_adapter(
    path: epath.PathLike,
    adapter: Mapping[str, Any],
    config: IA3Config,
    *,
    step: int | None = None,
    max_to_keep: int | None = None,
    overwrite: bool = False,
    opt_state: Any = None,
) -> epath.Path:
    """Writes the adapter tree and its config as one orbax checkpoint; returns its directory.

    Only the adapter is written (a few hundred KB for T5-base), never the base model. The
    checkpoint is written next to `path`, read back in full, flushed to disk, and only then renamed
    into place; a second save to the same path while this one runs fails with `CheckpointError`.

    Args:
      path: the checkpoint directory (``~`` expanded); with `step`, the root that holds one directory
        per step.
      adapter: the first result of ``split(params, config)`` (``ia3_l`` leaves, ``modules_to_save`` copies).
      config: the `IA3Config` the adapter was made with; stored as PEFT's adapter_config keys.
      step: save as step ``step`` (a non-negative int) under `path`.
      max_to_keep: with `step`, keep only the newest ``max_to_keep`` steps (None keeps all). A step
        older than all of those is refused, as it would be deleted at once.
      overwrite: without `step`, replace an existing checkpoint at `path` (only a directory holding
        exactly what save_adapter wrote). The old one is moved away only once the new one is complete.
      opt_state: the optimizer state (``optimizer.init(adapter)`` and its updates), stored next to
        the adapter so that training resumes exactly; read it back with `load_opt_state`.

    Raises:
      IA3ConfigError: `config` is not an `IA3Config`.
      StructureError: the adapter is not what ``split(params, config)`` gives (base params, leaves
        that are not arrays, keys that are not str or collide once joined with '.', a
        ``modules_to_save`` module without its copy: `AdapterMismatchError`).
      CheckpointError: `path` holds something that is not exactly an adapter checkpoint, the step
        exists or would be deleted at once, another save to `path` is running, or `step` /
        `max_to_keep` are not valid.

    Example:
      >>> save_adapter("ckpt/adapter", adapter, config)
      >>> for step in range(n):
      ...     adapter, opt_state, loss = train_step(adapter, opt_state, base, batch)
      ...     save_adapter("ckpt/run", adapter, config, step=step, max_to_keep=3, opt_state=opt_state)
    """
    payload = _payload(adapter, config, opt_state)
    path = _resolve(path)
    if atomic.RESERVED in os.path.basename(path) or ocp.step.TMP_DIR_SUFFIX in os.path.basename(path):
        raise CheckpointError(
            f"{path}: names containing {atomic.RESERVED!r} or orbax's temporary suffix are reserved."
        )
    if glob.has_magic(os.path.dirname(path)):
        raise CheckpointError(
            f"{os.path.dirname(path)}: orbax cannot write below a directory whose path holds glob characters "
            "([, *, ?); choose another directory (the checkpoint's own name may hold them)."
        )
    if jax.process_count() > 1:
        raise CheckpointError(
            "save_adapter writes from one process: gather the adapter (it is small) with "
            "jax.experimental.multihost_utils.process_allgather and save it from process 0."
        )
    if step is None:
        if max_to_keep is not None:
            raise CheckpointError("max_to_keep applies to step checkpoints: pass step= as well.")
        _save_single(path, payload, overwrite)
        return epath.Path(path)
    step = _checked_step(step)
    if max_to_keep is not None and (
        isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
    ):
        raise CheckpointError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}.")
    _save_step(path, int(step), payload, max_to_keep)
    return epath.Path(path) / str(int(step))


# --- loading -----------------------------------------------------------------------------------


def check_adapter(
    adapter: Mapping[str, Any],
    params: Mapping[str, Any],
    config: IA3Config,
    *,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> None:
    """Raises `AdapterMismatchError` unless `adapter` is exactly what `config` gives for `params`.

    Every vector must sit on a module of `params` that `config` targets, with the shape `ia3_init`
    would give it, and every ``modules_to_save`` copy must match the module's params. Only shapes
    are read (`jax.eval_shape`): `params` and `adapter` may hold ``jax.ShapeDtypeStruct`` leaves.

    Example:
      >>> check_adapter(adapter, base_params, config)   # before join(base_params, adapter)
    """
    init_config = config.replace(init_ia3_weights=True)  # same shapes, no rng needed

    def expected_adapter(base: Mapping[str, Any]) -> dict[str, Any]:
        return split(ia3_init(without_vectors(base), init_config, layouts=layouts), config)[0]

    try:
        expected = jax.eval_shape(expected_adapter, params)
    except TargetError as err:
        raise AdapterMismatchError(f"the adapter's config does not fit these params: {err}") from None
    want = {p: np.shape(_tree.unbox(x)) for p, x in _tree.leaves_with_paths(expected)}
    have = {p: np.shape(_tree.unbox(x)) for p, x in _tree.leaves_with_paths(adapter)}
    problems = []
    for p in sorted(have.keys() | want.keys()):
        if p not in want:
            problems.append(f"{_tree.dotted(p)}: not in these params, or not targeted by the config")
        elif p not in have:
            problems.append(f"{_tree.dotted(p)}: missing from the adapter (params expect {want[p]})")
        elif have[p] != want[p]:
            problems.append(f"{_tree.dotted(p)}: adapter {have[p]} but params expect {want[p]}")
    if problems:
        listing = "; ".join(problems[:12]) + (f"; ... ({len(problems) - 12} more)" if len(problems) > 12 else "")
        # A bank (ia3_jax.stack_adapters): every vector has the expected shape plus one adapter axis, last.
        sizes = {have[p][-1] if have[p] and have[p][:-1] == want.get(p) else None for p in have}
        hint = (
            f"It is a bank of {sizes.pop()} adapters, which is checked against no base: load it without params=, or "
            "check one adapter, ia3_jax.bank_select(bank, i)."
            if have.keys() == want.keys() and len(sizes) == 1 and None not in sizes
            else "Was it trained on another architecture or with another config?"
        )
        raise AdapterMismatchError(
            f"the adapter does not fit these params ({len(problems)} problems): {listing}. {hint}"
        )


def load_adapter(
    path: epath.PathLike,
    *,
    step: int | None = None,
    params: Mapping[str, Any] | None = None,
    shardings: jax.sharding.Sharding | Any = None,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> tuple[dict[str, Any], IA3Config]:
    """Reads an adapter checkpoint written by `save_adapter`; returns ``(adapter, config)``.

    The arrays are read into host memory and checked against the hashes saved with them before
    they are placed: the result is bit-identical to what was saved, or `CheckpointError` names the
    damaged file. ``opt_state/`` is never read. In a multi-host job every process reads the whole
    adapter (it is small) and places its own shards.

    Args:
      path: a checkpoint directory, or a root of step checkpoints (the latest step is read).
      step: the step to read under a root of step checkpoints.
      params: the params the adapter will be joined to (base or full); when given, the adapter and
        its config are checked against them (`check_adapter`) before any array is read.
      shardings: where the arrays go: one ``jax.sharding.Sharding`` for all leaves or a tree of
        them shaped like the adapter. Default: the first device, unsharded.
      layouts: kernel layouts for the check, as passed to `ia3_init`.

    Raises:
      CheckpointError: the path is missing, empty, an interrupted save, incomplete or damaged. If an
        overwrite of `path` was killed between its renames (`path` missing), the previous checkpoint
        is read from its temporary name instead, with a warning.
      AdapterMismatchError: with `params`, the adapter does not fit them (paths and shapes named).

    Example:
      >>> base = ocp.StandardCheckpointer().restore("ckpt/base")        # the base from its own checkpoint
      >>> adapter, config = load_adapter("ckpt/run", params=base)       # latest step
      >>> params = join(base, adapter)
    """
    directory, contents = _locate(path, step)
    item = os.path.join(directory, ADAPTER_ITEM)
    saved = _saved_tree(item)
    if params is not None:
        check_adapter(saved, params, contents.config, layouts=layouts)
    adapter = _tree.to_dict(_host_restore(item, contents.manifest[ADAPTER_ITEM], saved))
    return _place(adapter, shardings), contents.config


def saved_adapter(path: epath.PathLike, *, step: int | None = None) -> tuple[dict[str, Any], IA3Config]:
    """``(adapter, config)`` of a checkpoint with `jax.ShapeDtypeStruct` leaves: its structure, no array read.

    Example:
      >>> shapes, config = saved_adapter("ckpt/run")        # check a model against it before loading
    """
    directory, contents = _locate(path, step)
    return _tree.to_dict(_saved_tree(os.path.join(directory, ADAPTER_ITEM))), contents.config


def load_opt_state(path: epath.PathLike, like: Any, *, step: int | None = None) -> Any:
    """Reads the optimizer state saved by ``save_adapter(..., opt_state=)``, to resume training.

    Args:
      path: as for `load_adapter` (a checkpoint, or a root of steps: the latest is read).
      like: a state of the same optimizer over the same adapter, e.g. ``optimizer.init(adapter)``;
        it gives the tree structure, and its arrays' shardings place the restored ones.
      step: the step to read under a root of step checkpoints.

    Raises:
      CheckpointError: the checkpoint holds no optimizer state, or is incomplete or damaged.
      StructureError: the saved state is not shaped like `like` (another optimizer or adapter).

    Example:
      >>> adapter, config = load_adapter("ckpt/run", params=base)
      >>> opt_state = load_opt_state("ckpt/run", optimizer.init(adapter))
    """
    directory, contents = _locate(path, step)
    item = os.path.join(directory, OPT_STATE_ITEM)
    saved = contents.manifest.get(OPT_STATE_ITEM)
    if saved is None or not os.path.isdir(item):
        raise CheckpointError(
            f"{directory} holds no optimizer state: it was saved without save_adapter(..., opt_state=). "
            "Start from optimizer.init(adapter) instead."
        )
    flat, _ = jax.tree_util.tree_flatten_with_path(like)
    wanted = {jax.tree_util.keystr(p): (dtype_of(x).name, list(np.shape(x))) for p, x in flat}
    have = {k: (h["dtype"], h["shape"]) for k, h in saved.items()}
    fix = (
        "Pass the initial state of the optimizer it was saved with (the same chain, wrappers such as optax.flatten "
        "included) over the same adapter."
    )
    if wanted != have:
        differ = sorted(k for k in wanted.keys() | have.keys() if wanted.get(k) != have.get(k))
        shown = {k: {"saved": have.get(k), "like": wanted.get(k)} for k in differ[:4]}
        raise StructureError(
            f"the optimizer state in {directory} does not fit `like`: entries (dtype, shape) differ: {shown}"
            f"{f' and {len(differ) - 4} more' if len(differ) > 4 else ''}. {fix}"
        )
    saved_nodes = _containers(_saved_tree(item))
    like_nodes = _containers(ocp.tree.serialize_tree(like, keep_empty_nodes=True))
    if saved_nodes != like_nodes:  # the same arrays in other containers: another optimizer chain
        raise StructureError(
            f"the optimizer state in {directory} holds the arrays of `like` in other containers, "
            f"{_first_difference(saved_nodes, like_nodes)}: another optimizer chain. {fix}"
        )
    restored = _host_restore(item, saved, like)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a, x: _put(a, x.sharding if isinstance(x, jax.Array) else default), restored, like)
