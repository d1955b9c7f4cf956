"""Adapter-only checkpoints on orbax: the adapter tree and its `IA3Config` (PEFT's JSON keys).

A checkpoint is one orbax composite directory::

    path/
      adapter/    the adapter tree (``ia3_l`` vectors and ``modules_to_save`` copies), orbax PyTree
      config/     ``IA3Config.to_dict()`` (the keys of PEFT's adapter_config.json), orbax JSON
      opt_state/  optional: the optimizer state over the adapter, to resume training (`load_opt_state`)

With ``step=`` the same directories live under ``path/<step>/`` (keep the last N, resume the latest).
``_CHECKPOINT_METADATA`` also holds a SHA-256 of every saved array and of the config, so that a
damaged file never loads as other values.

What a save guarantees (the README's promise, kept by the steps below):

- One writer per path. A save holds the lock file ``<path>.ia3-lock`` (created with ``O_CREAT |
  O_EXCL``, holding host, pid and a token) from its first write to its return; a second writer gets
  `CheckpointError` and changes nothing. A lock whose process is dead (same host) is taken over.
- A kill at any step leaves the previous checkpoint loadable. The new checkpoint is written into a
  staging directory next to `path` (``<name>.ia3-staging-<hash>-<tag>``, glob characters replaced)
  and read back (every array checked against its hash) before it is renamed into place. An
  overwrite first renames the old checkpoint to ``<name>.ia3-replaced-<hash>-<tag>``: killed between
  the two renames, `path` is missing and `load_adapter` reads that copy once it has checked that it
  is complete (with a warning); the next save moves it back before anything else. Directories are
  renamed to ``<name>.ia3-trash-<hash>-<tag>`` before they are deleted, so a half-deleted one never
  has a loadable name.
- Nothing that save_adapter did not write is deleted: only a directory holding every file that
  save_adapter writes (and a config that parses) is replaced, and leftovers are matched by exact
  name prefix, never by glob.
- A damaged or missing file gives `CheckpointError` naming it; a load gives exact values or fails.
  `load_adapter` never reads ``opt_state/``.

Paths are local (or mounted) filesystem paths: the lock and the renames need POSIX semantics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config
from ia3_jax._src.errors import AdapterMismatchError, CheckpointError, IA3Error, StructureError, TargetError
from ia3_jax._src.init import ia3_init
from ia3_jax._src.layout import KernelLayout
from ia3_jax._src.partition import is_trainable, split, without_vectors
from ia3_jax._src.targets import modules_to_save_roots

ADAPTER_ITEM = "adapter"
CONFIG_ITEM = "config"
OPT_STATE_ITEM = "opt_state"
_METADATA = "_CHECKPOINT_METADATA"
_CONFIG_FILE = f"{CONFIG_ITEM}/metadata"
_TREE_FILE = f"{ADAPTER_ITEM}/_METADATA"
# Every file that save_adapter writes at fixed names: a directory is an adapter checkpoint only with all.
_COMPLETE_MARKERS = ("commit_success.txt", _METADATA, _TREE_FILE, _CONFIG_FILE)
_HASHES = "ia3_jax"  # key of our hashes in orbax's custom metadata
_RESERVED = ".ia3-"  # names next to `path` that start with `path.name + _RESERVED` belong to its saves
_STAGING = ".ia3-staging-"
_REPLACED = ".ia3-replaced-"
_TRASH = ".ia3-trash-"
_LOCK = ".ia3-lock"
# A live writer fills its lock file microseconds after creating it: one still empty after this was
# left by a writer killed in between.
_EMPTY_LOCK_STALE_S = 10.0
_HELD_TOKENS: set[str] = set()  # tokens of the locks this process holds (a pid alone cannot tell threads)


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
    """What one save writes, validated: orbax's items and the hashes that go into its metadata."""

    args: ocp.args.Composite
    hashes: dict[str, Any]
    config: IA3Config
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


def _check_copies(adapter: Mapping[str, Any], config: IA3Config, arrays: Mapping[_tree.Path, Any]) -> None:
    """Raises `StructureError` when a ``modules_to_save`` module has no copy in an adapter with vectors.

    ``split(params)`` without the config drops the copies: saved that way, the module is never trained.
    """
    if not config.modules_to_save or not any(p[-1] == _tree.VECTOR for p in arrays):
        return
    for name in config.modules_to_save:
        if not modules_to_save_roots(adapter, config.replace(modules_to_save=[name])):
            raise StructureError(
                f"config.modules_to_save lists {name!r} but the adapter holds no copy of it, so its trained "
                "params would be lost. split(params) without the config leaves these copies out: save the first "
                "result of ia3_jax.split(params, config)."
            )


def _payload(adapter: Mapping[str, Any], config: IA3Config, opt_state: Any) -> _Payload:
    """Checks the adapter against its config and prepares the items; raises before anything is written."""
    if not isinstance(config, IA3Config):
        raise TypeError(f"config must be an ia3_jax.IA3Config, got {type(config).__name__}.")
    if not isinstance(adapter, Mapping) or not adapter:
        raise StructureError(
            f"adapter must be a non-empty nested dict (the first result of ia3_jax.split), got {adapter!r:.80}."
        )
    roots = modules_to_save_roots(adapter, config)
    arrays: dict[_tree.Path, Any] = {}
    joined: dict[str, _tree.Path] = {}
    for path, leaf in _adapter_leaves(adapter):
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
    _check_copies(adapter, config, arrays)
    tree = _tree.updated({}, arrays)
    hashes: dict[str, Any] = {"config": _config_hash(config.to_dict()), ADAPTER_ITEM: _tree_hashes(tree)}
    items = {
        ADAPTER_ITEM: ocp.args.StandardSave(tree),
        CONFIG_ITEM: ocp.args.JsonSave(config.to_dict()),
    }
    if opt_state is not None:
        items[OPT_STATE_ITEM] = ocp.args.StandardSave(opt_state)
        hashes[OPT_STATE_ITEM] = _tree_hashes(opt_state)
    return _Payload(ocp.args.Composite(**items), hashes, config, opt_state)


# --- reading and checking a directory ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Contents:
    """The small files of a complete checkpoint, parsed."""

    config: IA3Config
    hashes: Mapping[str, Any] | None  # None for checkpoints written before ia3_jax stored hashes


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


def _contents(directory: str) -> _Contents:
    """Parses the marker files of `directory`; `CheckpointError` naming the first missing or bad one."""
    missing = [m for m in _COMPLETE_MARKERS if not os.path.isfile(os.path.join(directory, m))]
    if missing:
        raise CheckpointError(
            f"{directory} is not a complete adapter checkpoint (missing {missing}): a save into it was "
            "interrupted or the files were damaged. Load another step or save again."
        )
    metadata = _read_json(directory, _METADATA)
    if not isinstance(metadata, dict) or not {ADAPTER_ITEM, CONFIG_ITEM} <= set(metadata.get("item_handlers") or ()):
        raise _damaged(os.path.join(directory, _METADATA), f"no {ADAPTER_ITEM} and {CONFIG_ITEM} items listed")
    tree = _read_json(directory, _TREE_FILE)
    if not isinstance(tree, dict) or not isinstance(tree.get("tree_metadata"), dict):
        raise _damaged(os.path.join(directory, _TREE_FILE), "no tree_metadata")
    stored = _read_json(directory, _CONFIG_FILE)
    config_file = os.path.join(directory, _CONFIG_FILE)
    try:
        config = IA3Config.from_dict(stored)
    except (IA3Error, TypeError, ValueError, KeyError, AttributeError) as err:
        raise _damaged(config_file, f"not an IA3 config: {err}") from None
    hashes = (metadata.get("custom_metadata") or {}).get(_HASHES)
    if hashes is not None:
        if not isinstance(hashes, dict) or not isinstance(hashes.get(ADAPTER_ITEM), dict):
            raise _damaged(os.path.join(directory, _METADATA), f"custom_metadata.{_HASHES} is malformed")
        if hashes.get("config") != _config_hash(stored):
            raise _damaged(config_file, "its contents do not match the hash saved with them")
    return _Contents(config, hashes)


def _incomplete(directory: str) -> str | None:
    """Why `directory` is not a complete adapter checkpoint, or None when it is one."""
    try:
        _contents(directory)
    except CheckpointError as err:
        return str(err)
    return None


def _unreadable(item: str, err: Exception) -> CheckpointError:
    """A failure of orbax or tensorstore under `item`, as a `CheckpointError` naming the file it names."""
    text = str(err)
    named = re.search(re.escape(item) + r"[^\s\"'`,;:]*", text)
    manifest = os.path.join(item, "manifest.ocdbt")  # tensorstore names only the database when it is gone
    where = named.group(0) if named else item
    return _damaged(manifest if not os.path.exists(manifest) else where, f"{type(err).__name__}: {text[:400]}")


def _restore_item(item: str, target: Any) -> Any:
    handler = ocp.StandardCheckpointHandler()
    try:
        return handler.restore(epath.Path(item), args=ocp.args.StandardRestore(target))
    except Exception as err:  # tensorstore raises ValueError or a bare Exception for damaged data
        raise _unreadable(item, err) from err
    finally:
        handler.close()


def _item_metadata(item: str) -> Any:
    handler = ocp.StandardCheckpointHandler()
    try:
        return handler.metadata(epath.Path(item)).tree
    except Exception as err:
        raise _unreadable(item, err) from err
    finally:
        handler.close()


def _check_hashes(tree: Any, hashes: Mapping[str, Any] | None, item: str) -> None:
    """Raises `CheckpointError` unless every array read from `item` is bit-identical to the one saved."""
    if hashes is None:
        return
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    if not all(getattr(leaf, "is_fully_addressable", True) for _, leaf in flat):
        return  # another process holds part of the data; its own read checks its part
    got = {jax.tree_util.keystr(path): _array_hash(leaf) for path, leaf in flat}
    if got.keys() != hashes.keys():
        raise _damaged(item, f"read {sorted(got)[:8]}, saved {sorted(hashes)[:8]}")
    for key, want in hashes.items():
        if got[key] != want:
            raise _damaged(item, f"the data of {key} does not match the hash saved with it")


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


def _prefix(path: str, marker: str) -> str:
    """The start of the names of `path`'s temporary directories (``marker``: staging, replaced or trash).

    Glob characters are replaced (orbax globs inside the directories it writes); a hash of the exact
    name keeps ``run[0]`` and ``run_0_`` apart.
    """
    name = os.path.basename(path)
    safe = re.sub(r"[][*?]", "_", name)
    return os.path.join(os.path.dirname(path), f"{safe}{marker}{hashlib.sha256(name.encode()).hexdigest()[:8]}-")


def _siblings(path: str, marker: str) -> list[str]:
    """The entries next to `path` whose names start with ``_prefix(path, marker)`` (never a glob)."""
    start = _prefix(path, marker)
    parent, prefix = os.path.dirname(start), os.path.basename(start)
    try:
        names = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(os.path.join(parent, n) for n in names if n.startswith(prefix))


def _replaced_copy(path: str) -> str | None:
    """The newest complete checkpoint that an interrupted overwrite of `path` moved aside, if any."""
    complete = [d for d in _siblings(path, _REPLACED) if os.path.isdir(d) and _incomplete(d) is None]
    return max(complete, key=os.path.getmtime, default=None)


def _steps(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    names = (n for n in os.listdir(root) if n.isdigit() and str(int(n)) == n)
    return sorted(int(n) for n in names if os.path.isdir(os.path.join(root, n)))


def _looks_single(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, n)) for n in (ADAPTER_ITEM, CONFIG_ITEM, _METADATA))


def _leftovers(path: str) -> str:
    found = [os.path.basename(p) for marker in (_STAGING, _REPLACED, _TRASH) for p in _siblings(path, marker)]
    return f" Unfinished saves next to it (not loadable): {found}." if found else ""


def _locate(path: epath.PathLike, step: int | None) -> tuple[str, _Contents]:
    """The complete checkpoint directory that a load reads, with its parsed small files."""
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
    if ocp.step.TMP_DIR_SUFFIX in name or _RESERVED in name:
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
        f"{path} is not an adapter checkpoint: expected {ADAPTER_ITEM}/ and {CONFIG_ITEM}/ (from save_adapter) "
        f"or step directories (from save_adapter(..., step=)); found {names[:20]}."
    )


def checkpoint_directory(path: epath.PathLike, step: int | None = None) -> epath.Path:
    """The complete checkpoint directory that `load_adapter` would read: `path` itself, or a step.

    After an overwrite of `path` killed between its two renames (`path` missing), this is the
    previous checkpoint under its temporary name, with a warning. Raises `CheckpointError` for a
    missing, empty, temporary (interrupted), incomplete or damaged directory, naming the file.
    """
    return epath.Path(_locate(path, step)[0])


# --- one writer per path -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Held:
    """A lock file as read once: contents and identity (a later file at that name differs)."""

    data: bytes
    inode: int
    mtime_ns: int


def _read_held(file: str) -> _Held | None:
    try:
        with open(file, "rb") as f:
            return _Held(f.read(), os.fstat(f.fileno()).st_ino, os.fstat(f.fileno()).st_mtime_ns)
    except FileNotFoundError:
        return None


def _process_start(pid: int) -> str | None:
    """Boot id and start time of live process `pid` (Linux), telling it from a later one with its pid.

    ``"dead"`` for a zombie, None where /proc cannot tell.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except (OSError, IndexError):
        return None
    return "dead" if fields[0] in ("Z", "X") else f"{boot}:{fields[19]}"


def _lock_record(token: str) -> bytes:
    pid = os.getpid()
    return json.dumps(
        {"host": socket.gethostname(), "pid": pid, "process": _process_start(pid), "token": token}
    ).encode()


def _owner(held: _Held) -> dict[str, Any] | None:
    try:
        owner = json.loads(held.data)
    except ValueError:
        return None
    return owner if isinstance(owner, dict) and {"host", "pid", "token"} <= owner.keys() else None


def _is_stale(held: _Held) -> bool:
    """Whether the process that made this lock file is gone (only decidable on the same host)."""
    owner = _owner(held)
    if owner is None:  # killed between creating and filling it
        return time.time_ns() - held.mtime_ns > _EMPTY_LOCK_STALE_S * 1e9
    if owner["host"] != socket.gethostname():
        return False
    if owner["pid"] == os.getpid():
        return owner["token"] not in _HELD_TOKENS
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    now = _process_start(owner["pid"])
    return now == "dead" or (now is not None and owner.get("process") not in (None, now))


def _busy(file: str, held: _Held | None) -> CheckpointError:
    owner = _owner(held) if held is not None else None
    who = f"pid {owner['pid']} on {owner['host']}" if owner else "a process that is still creating it"
    return CheckpointError(
        f"another save to this path holds {file} ({who}): one writer per path. Wait for it to finish or save "
        f"elsewhere; if no save is running (its process was killed on another host), delete {file}."
    )


def _create_exclusive(file: str, data: bytes) -> None:
    fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _claim(file: str, record: bytes, depth: int = 0) -> None:
    """Creates `file` holding `record`; a file left by a dead process is removed first.

    Removing a stale file is itself claimed through ``<file>.break-<identity>``, so that of several
    processes that find the same stale file only one removes it, and never a newer file at that name.
    """
    try:
        return _create_exclusive(file, record)
    except FileExistsError:
        held = _read_held(file)
    if held is not None:
        if depth == 2 or not _is_stale(held):
            raise _busy(file, held)
        identity = hashlib.sha256(held.data + f"{held.inode}:{held.mtime_ns}".encode()).hexdigest()[:16]
        breaker = f"{file}.break-{identity}"
        _claim(breaker, record, depth + 1)
        try:
            if _read_held(file) == held:
                os.unlink(file)
        finally:
            os.unlink(breaker)
    try:
        _create_exclusive(file, record)
    except FileExistsError:  # another writer came in between
        raise _busy(file, _read_held(file)) from None


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Holds ``<path>.ia3-lock`` for the body; checks at the end that it is still this save's."""
    lock, token = path + _LOCK, uuid.uuid4().hex
    record = _lock_record(token)
    _HELD_TOKENS.add(token)
    try:
        _claim(lock, record)
        try:
            yield
            held = _read_held(lock)
            if held is None or held.data != record:
                raise CheckpointError(
                    f"the lock {lock} was taken from this save while it ran (deleted by hand, or by a process that "
                    f"thought this one dead): what {path} holds now may be another writer's. Check it and save again."
                )
        finally:
            held = _read_held(lock)
            if held is not None and held.data == record:
                os.unlink(lock)
    finally:
        _HELD_TOKENS.discard(token)


# --- writing -----------------------------------------------------------------------------------


def _remove(directory: str, path: str) -> None:
    """Deletes a directory of `path`'s saves; a loadable one is renamed to a trash name first."""
    if not os.path.lexists(directory):
        return
    name = os.path.basename(directory)
    if _STAGING not in name and _TRASH not in name:
        trash = _prefix(path, _TRASH) + uuid.uuid4().hex[:8]
        os.rename(directory, trash)
        directory = trash
    if os.path.isdir(directory) and not os.path.islink(directory):
        shutil.rmtree(directory)
    else:
        os.unlink(directory)


def _discard_staging(staging: str, path: str) -> None:
    """Removes a failed save's staging directory and orbax's temporary one next to it."""
    for leftover in (staging, staging + ocp.step.TMP_DIR_SUFFIX):
        _remove(leftover, path)


def _sweep(path: str, markers: tuple[str, ...]) -> None:
    """Removes what killed saves of `path` left (called under the lock: no other save of it is running)."""
    for marker in markers:
        for leftover in _siblings(path, marker):
            _remove(leftover, path)


def _write_verified(directory: str, payload: _Payload) -> None:
    """Writes the checkpoint into the new `directory`, then reads all of it back and checks every hash."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(epath.Path(directory), args=payload.args, custom_metadata={_HASHES: payload.hashes})
    contents = _contents(directory)
    if contents.config != payload.config or contents.hashes != payload.hashes:
        raise CheckpointError(f"{directory} does not hold what was just written to it: the save is abandoned.")
    item = os.path.join(directory, ADAPTER_ITEM)
    _check_hashes(_restore_item(item, _restore_target(_item_metadata(item), None)), payload.hashes[ADAPTER_ITEM], item)
    if payload.opt_state is not None:
        item = os.path.join(directory, OPT_STATE_ITEM)
        like = jax.tree.map(ocp.utils.to_shape_dtype_struct, payload.opt_state)
        _check_hashes(_restore_item(item, like), payload.hashes[OPT_STATE_ITEM], item)


def _check_renamed(directory: str, inode: int) -> None:
    """Raises unless `directory` is the verified one just renamed there (never report another's data)."""
    if os.stat(directory).st_ino != inode:
        raise CheckpointError(
            f"{directory} changed during the save: another process wrote to it. Check it and save again."
        )


def _check_single_target(path: str, overwrite: bool) -> None:
    """Raises `CheckpointError` unless a checkpoint may be written at `path`; reads only."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise CheckpointError(
            f"{path} is a file, not an adapter checkpoint; refusing to replace it. Choose another path."
        )
    if not overwrite and (os.path.isdir(path) or _replaced_copy(path) is not None):
        raise CheckpointError(f"{path} already exists: pass overwrite=True to replace it, or step= to keep versions.")
    if os.path.isdir(path) and os.listdir(path):
        problem = _incomplete(path)
        if problem is not None:
            raise CheckpointError(
                f"{path} exists and is not an adapter checkpoint written by save_adapter; refusing to replace it. "
                f"Choose another path, or move it away. ({problem})"
            )


def _save_single(path: str, payload: _Payload, overwrite: bool) -> None:
    _check_single_target(path, overwrite)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _locked(path):
        if not os.path.lexists(path) and (replaced := _replaced_copy(path)) is not None:
            os.rename(replaced, path)  # an overwrite killed between its renames: put the old checkpoint back
        _check_single_target(path, overwrite)
        tag = uuid.uuid4().hex[:8]
        staging, replaced = _prefix(path, _STAGING) + tag, _prefix(path, _REPLACED) + tag
        moved = False
        try:
            _write_verified(staging, payload)
            inode = os.stat(staging).st_ino
            if os.path.lexists(path):
                os.rename(path, replaced)
                moved = True
            os.rename(staging, path)
        except BaseException:
            if moved and not os.path.lexists(path):
                os.rename(replaced, path)
            _discard_staging(staging, path)
            raise
        _check_renamed(path, inode)
        _sweep(path, (_REPLACED, _STAGING, _TRASH))


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
        problem = _incomplete(os.path.join(root, str(s)))
        if problem is not None:
            raise CheckpointError(
                f"max_to_keep={max_to_keep} would delete {root}/{s}, which is not an adapter checkpoint written by "
                f"save_adapter; refusing. Move it away. ({problem})"
            )
    return expired


def _save_step(root: str, step: int, payload: _Payload, max_to_keep: int | None) -> None:
    _check_step_target(root, step, max_to_keep)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with _locked(root):
        expired = _check_step_target(root, step, max_to_keep)
        staging, final = _prefix(root, _STAGING) + uuid.uuid4().hex[:8], os.path.join(root, str(step))
        try:
            _write_verified(staging, payload)
            inode = os.stat(staging).st_ino
            os.makedirs(root, exist_ok=True)
            os.rename(staging, final)
        except BaseException:
            _discard_staging(staging, root)
            raise
        _check_renamed(final, inode)
        for s in expired:
            _remove(os.path.join(root, str(s)), root)
        _sweep(root, (_STAGING, _TRASH))


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
    checkpoint is written next to `path`, read back in full, and only then renamed into place; a
    second save to the same path while this one runs fails with `CheckpointError` (module docstring).

    Args:
      path: the checkpoint directory (``~`` expanded); with `step`, the root that holds one directory
        per step.
      adapter: the first result of ``split(params, config)`` (``ia3_l`` leaves, ``modules_to_save`` copies).
      config: the `IA3Config` the adapter was made with; stored as PEFT's adapter_config keys.
      step: save as step ``step`` (a non-negative int) under `path`.
      max_to_keep: with `step`, keep only the newest ``max_to_keep`` steps (None keeps all). A step
        older than all of those is refused, as it would be deleted at once.
      overwrite: without `step`, replace an existing checkpoint at `path` (only a directory that
        save_adapter wrote). The old one is moved away only once the new one is complete.
      opt_state: the optimizer state (``optimizer.init(adapter)`` and its updates), stored next to
        the adapter so that training resumes exactly; read it back with `load_opt_state`.

    Raises:
      StructureError: the adapter is not what ``split(params, config)`` gives (base params, leaves
        that are not arrays, keys that are not str or collide once joined with '.', a
        ``modules_to_save`` module without its copy).
      CheckpointError: `path` holds something that is not an adapter checkpoint, the step exists or
        would be deleted at once, or another save to `path` is running.

    Example:
      >>> save_adapter("ckpt/adapter", adapter, config)
      >>> for step in range(n):
      ...     adapter, opt_state, loss = train_step(adapter, opt_state, base, batch)
      ...     save_adapter("ckpt/run", adapter, config, step=step, max_to_keep=3, opt_state=opt_state)
    """
    payload = _payload(adapter, config, opt_state)
    path = _resolve(path)
    if _RESERVED in os.path.basename(path) or ocp.step.TMP_DIR_SUFFIX in os.path.basename(path):
        raise CheckpointError(f"{path}: names containing {_RESERVED!r} or orbax's temporary suffix are reserved.")
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
            raise ValueError("max_to_keep applies to step checkpoints: pass step= as well.")
        _save_single(path, payload, overwrite)
        return epath.Path(path)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}.")
    if max_to_keep is not None and (
        isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
    ):
        raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}.")
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
        raise AdapterMismatchError(
            f"the adapter does not fit these params ({len(problems)} problems): {listing}. "
            "Was it trained on another architecture or with another config?"
        )


def _restore_target(metadata: Any, shardings: Any) -> Any:
    """Abstract arrays shaped like the saved ones, placed by `shardings` (default: the first device)."""
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), abstract)
    try:
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    except ValueError as err:
        raise StructureError(
            f"shardings must be one jax.sharding.Sharding or a tree shaped like the adapter: {err}"
        ) from None


def load_adapter(
    path: epath.PathLike,
    *,
    step: int | None = None,
    params: Mapping[str, Any] | None = None,
    shardings: jax.sharding.Sharding | Any = None,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> tuple[dict[str, Any], IA3Config]:
    """Reads an adapter checkpoint written by `save_adapter`; returns ``(adapter, config)``.

    Every array is checked against the hash saved with it: the result is bit-identical to what was
    saved, or `CheckpointError` names the damaged file. ``opt_state/`` is never read.

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
    metadata = _item_metadata(item)
    if params is not None:
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata)
        check_adapter(abstract, params, contents.config, layouts=layouts)
    adapter = _tree.to_dict(_restore_item(item, _restore_target(metadata, shardings)))
    _check_hashes(adapter, contents.hashes[ADAPTER_ITEM] if contents.hashes else None, item)
    return adapter, contents.config


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
    if not os.path.isdir(item):
        raise CheckpointError(
            f"{directory} holds no optimizer state: it was saved without save_adapter(..., opt_state=). "
            "Start from optimizer.init(adapter) instead."
        )
    saved = contents.hashes.get(OPT_STATE_ITEM) if contents.hashes else None
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    if saved is not None:
        flat, _ = jax.tree_util.tree_flatten_with_path(like)
        wanted = {jax.tree_util.keystr(p): (np.result_type(x).name, list(np.shape(x))) for p, x in flat}
        have = {k: (h["dtype"], h["shape"]) for k, h in saved.items()}
        if wanted != have:
            differ = sorted(k for k in wanted.keys() | have.keys() if wanted.get(k) != have.get(k))
            raise StructureError(
                f"the optimizer state in {directory} does not fit `like`: entries {differ[:8]} differ."
            )
        restored = _restore_item(item, target)
        _check_hashes(restored, saved, item)
        return restored
    try:  # saved before ia3_jax stored hashes: orbax's message lists the differing tree entries
        return _restore_item(item, target)
    except CheckpointError as err:
        raise StructureError(f"the optimizer state in {directory} does not fit `like`: {err.__cause__}") from None
