"""Adapter-only checkpoints on orbax: the adapter tree and its `IA3Config` (PEFT's JSON keys).

A checkpoint is one orbax composite directory::

    path/
      adapter/    the adapter tree (``ia3_l`` vectors and ``modules_to_save`` copies), orbax PyTree
      config/     ``IA3Config.to_dict()`` (the keys of PEFT's adapter_config.json), orbax JSON
      opt_state/  optional: the optimizer state over the adapter, to resume training (`load_opt_state`)

With ``step=`` the same directories live under ``path/<step>/``, written by an orbax
``CheckpointManager`` (keep the last N, resume the latest).

Saves are atomic. Orbax writes into ``<name>.orbax-checkpoint-tmp*`` and renames it to its final
name once complete (after writing ``commit_success.txt``); a single checkpoint is moreover written
next to `path` and renamed over it, because orbax's own overwrite deletes the old one first. An
interrupted save therefore leaves the previous checkpoint as it was, and `load_adapter` refuses
temporary and incomplete directories. One writer per path; the next save sweeps the leftovers.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config
from ia3_jax._src.errors import AdapterMismatchError, CheckpointError, StructureError, TargetError
from ia3_jax._src.init import ia3_init
from ia3_jax._src.layout import KernelLayout
from ia3_jax._src.partition import is_trainable, split, without_vectors
from ia3_jax._src.targets import modules_to_save_roots

ADAPTER_ITEM = "adapter"
CONFIG_ITEM = "config"
OPT_STATE_ITEM = "opt_state"
# Files orbax writes last, before the final rename: their absence marks an unfinished directory.
_COMPLETE_MARKERS = (
    "commit_success.txt",
    "_CHECKPOINT_METADATA",
    f"{ADAPTER_ITEM}/_METADATA",
    f"{CONFIG_ITEM}/metadata",
)
_STAGING = ".ia3-staging-"
_REPLACED = ".ia3-replaced-"


def _checkpointer() -> ocp.Checkpointer:
    handler = ocp.CompositeCheckpointHandler(
        **{
            ADAPTER_ITEM: ocp.StandardCheckpointHandler(),
            CONFIG_ITEM: ocp.JsonCheckpointHandler(),
            OPT_STATE_ITEM: ocp.StandardCheckpointHandler(),
        }
    )
    return ocp.Checkpointer(handler)


def _save_args(adapter: Mapping[str, Any], config: IA3Config, opt_state: Any) -> ocp.args.Composite:
    if not isinstance(config, IA3Config):
        raise TypeError(f"config must be an ia3_jax.IA3Config, got {type(config).__name__}.")
    if not isinstance(adapter, Mapping) or not adapter:
        raise StructureError(
            f"adapter must be a non-empty nested dict (the first result of ia3_jax.split), got {adapter!r:.80}."
        )
    roots = modules_to_save_roots(adapter, config)
    arrays = {}
    for path, leaf in _tree.leaves_with_paths(adapter):
        value = _tree.unbox(leaf)  # boxes carry sharding names only; the checkpoint holds arrays
        if not isinstance(value, (jax.Array, np.ndarray)):
            raise StructureError(f"adapter leaf {_tree.dotted(path)!r} is a {type(value).__name__}, not an array.")
        if not is_trainable(path, roots):
            raise StructureError(
                f"adapter leaf {_tree.dotted(path)!r} is neither an IA3 vector nor in config.modules_to_save="
                f"{config.modules_to_save}: these look like base params. Save the first result of "
                "ia3_jax.split(params, config)."
            )
        arrays[path] = value
    items = {
        ADAPTER_ITEM: ocp.args.StandardSave(_tree.updated({}, arrays)),
        CONFIG_ITEM: ocp.args.JsonSave(config.to_dict()),
    }
    if opt_state is not None:
        items[OPT_STATE_ITEM] = ocp.args.StandardSave(opt_state)
    return ocp.args.Composite(**items)


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

    Only the adapter is written (a few hundred KB for T5-base), never the base model.

    Args:
      path: the checkpoint directory; with `step`, the root that holds one directory per step.
      adapter: the first result of `split` (``ia3_l`` leaves, ``modules_to_save`` copies).
      config: the `IA3Config` the adapter was made with; stored as PEFT's adapter_config keys.
      step: save as step ``step`` under `path` through an orbax ``CheckpointManager``.
      max_to_keep: with `step`, keep only the newest ``max_to_keep`` steps (None keeps all).
      overwrite: without `step`, replace an existing checkpoint at `path`. The new one is written
        completely before the old one is moved away.
      opt_state: the optimizer state (``optimizer.init(adapter)`` and its updates), stored next to
        the adapter so that training resumes exactly; read it back with `load_opt_state`.

    Example:
      >>> save_adapter("ckpt/adapter", adapter, config)
      >>> for step in range(n):
      ...     adapter, opt_state, loss = train_step(adapter, opt_state, base, batch)
      ...     save_adapter("ckpt/run", adapter, config, step=step, max_to_keep=3, opt_state=opt_state)
    """
    args = _save_args(adapter, config, opt_state)
    path = epath.Path(path).absolute()  # orbax refuses relative paths
    if step is None:
        if max_to_keep is not None:
            raise ValueError("max_to_keep applies to step checkpoints: pass step= as well.")
        return _save_single(path, args, overwrite)
    if not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}.")
    return _save_step(path, int(step), args, max_to_keep)


def _save_single(path: epath.Path, args: ocp.args.Composite, overwrite: bool) -> epath.Path:
    if path.exists():
        if not overwrite:
            raise CheckpointError(
                f"{path} already exists: pass overwrite=True to replace it, or step= to keep versions."
            )
        if any(path.iterdir()) and not _is_single_checkpoint(path):
            raise CheckpointError(f"{path} exists and is not an adapter checkpoint; refusing to replace it.")
    # Write next to `path`, then rename into place: `path` is never half-written, and an old checkpoint
    # there is only moved away once the new one is complete (orbax's force=True deletes it first).
    tag = uuid.uuid4().hex[:8]
    staging = path.parent / f"{path.name}{_STAGING}{tag}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _checkpointer() as checkpointer:
        checkpointer.save(staging, args=args)
    if path.exists():
        path.rename(path.parent / f"{path.name}{_REPLACED}{tag}")
    staging.rename(path)
    # Leftovers of earlier interrupted saves of this path (and the replaced checkpoint) go now.
    for leftover in (*path.parent.glob(f"{path.name}{_STAGING}*"), *path.parent.glob(f"{path.name}{_REPLACED}*")):
        leftover.rmtree()
    return path


def _save_step(root: epath.Path, step: int, args: ocp.args.Composite, max_to_keep: int | None) -> epath.Path:
    if root.exists() and _is_single_checkpoint(root):
        raise CheckpointError(f"{root} is a single adapter checkpoint; step checkpoints need a directory of their own.")
    if step in _steps(root):
        raise CheckpointError(f"step {step} already exists under {root}; steps there: {sorted(_steps(root))}.")
    # cleanup_tmp_directories: the manager removes leftovers of interrupted saves when it opens.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False, cleanup_tmp_directories=True
    )
    with ocp.CheckpointManager(root, options=options) as manager:
        manager.save(step, args=args)
        manager.wait_until_finished()
    return root / str(step)


def _is_single_checkpoint(path: epath.Path) -> bool:
    return any((path / name).exists() for name in (ADAPTER_ITEM, CONFIG_ITEM, "_CHECKPOINT_METADATA"))


def _steps(root: epath.Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def _leftovers(path: epath.Path) -> str:
    parent = path.parent
    found = sorted(p.name for p in parent.iterdir() if p.name.startswith(path.name + ".")) if parent.is_dir() else []
    replaced = [name for name in found if _REPLACED in name]
    if replaced:
        # Killed between the two renames of an overwrite: the old checkpoint is whole, under another name.
        return (
            f" An overwrite was interrupted; the previous checkpoint is complete at {parent / replaced[0]}: "
            f"rename it to {path}."
        )
    return f" Unfinished saves next to it (not loadable): {found}." if found else ""


def _check_complete(directory: epath.Path) -> epath.Path:
    missing = [m for m in _COMPLETE_MARKERS if not (directory / m).exists()]
    if missing:
        raise CheckpointError(
            f"{directory} is not a complete adapter checkpoint (missing {missing}): a save into it was "
            "interrupted or the files were damaged. Load another step or save again."
        )
    return directory


def checkpoint_directory(path: epath.PathLike, step: int | None = None) -> epath.Path:
    """The complete checkpoint directory that `load_adapter` would read: `path` itself, or a step.

    Raises `CheckpointError` for a missing, empty, temporary (interrupted) or incomplete directory.
    """
    path = epath.Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"no adapter checkpoint at {path}: the directory does not exist.{_leftovers(path)}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; an adapter checkpoint is a directory written by save_adapter.")
    if ocp.step.TMP_DIR_SUFFIX in path.name or _STAGING in path.name or _REPLACED in path.name:
        raise CheckpointError(f"{path} is the temporary directory of an unfinished save, not a checkpoint.")
    if _is_single_checkpoint(path):
        if step is not None:
            raise CheckpointError(f"{path} is a single checkpoint without steps; drop step={step}.")
        return _check_complete(path)
    steps = _steps(path)
    if steps:
        chosen = steps[-1] if step is None else step
        if chosen not in steps:
            raise CheckpointError(f"no step {step} under {path}; steps there: {steps}.{_leftovers(path / str(step))}")
        return _check_complete(path / str(chosen))
    names = sorted(p.name for p in path.iterdir())
    if not names:
        raise CheckpointError(f"{path} is an empty directory, not an adapter checkpoint.")
    raise CheckpointError(
        f"{path} is not an adapter checkpoint: expected {ADAPTER_ITEM}/ and {CONFIG_ITEM}/ (from save_adapter) "
        f"or step directories (from save_adapter(..., step=)); found {names[:20]}."
    )


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


def _restore_target(abstract: Any, shardings: Any) -> Any:
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

    Args:
      path: a checkpoint directory, or a root of step checkpoints (the latest step is read).
      step: the step to read under a root of step checkpoints.
      params: the params the adapter will be joined to (base or full); when given, the adapter and
        its config are checked against them (`check_adapter`) before any array is read.
      shardings: where the arrays go: one ``jax.sharding.Sharding`` for all leaves or a tree of
        them shaped like the adapter. Default: the first device, unsharded.
      layouts: kernel layouts for the check, as passed to `ia3_init`.

    Raises:
      CheckpointError: the path is missing, empty, an interrupted save, or not a complete checkpoint.
      AdapterMismatchError: with `params`, the adapter does not fit them (paths and shapes named).

    Example:
      >>> base = ocp.StandardCheckpointer().restore("ckpt/base")        # the base from its own checkpoint
      >>> adapter, config = load_adapter("ckpt/run", params=base)       # latest step
      >>> params = join(base, adapter)
    """
    directory = checkpoint_directory(path, step)
    with _checkpointer() as checkpointer:
        stored = checkpointer.restore(directory, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
        config = IA3Config.from_dict(stored[CONFIG_ITEM])
        metadata = checkpointer.metadata(directory).item_metadata[ADAPTER_ITEM].tree
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata)
        if params is not None:
            check_adapter(abstract, params, config, layouts=layouts)
        target = ocp.args.StandardRestore(_restore_target(abstract, shardings))
        restored = checkpointer.restore(directory, args=ocp.args.Composite(**{ADAPTER_ITEM: target}))
    return _tree.to_dict(restored[ADAPTER_ITEM]), config


def load_opt_state(path: epath.PathLike, like: Any, *, step: int | None = None) -> Any:
    """Reads the optimizer state saved by ``save_adapter(..., opt_state=)``, to resume training.

    Args:
      path: as for `load_adapter` (a checkpoint, or a root of steps: the latest is read).
      like: a state of the same optimizer over the same adapter, e.g. ``optimizer.init(adapter)``;
        it gives the tree structure, and its arrays' shardings place the restored ones.
      step: the step to read under a root of step checkpoints.

    Raises:
      CheckpointError: the checkpoint holds no optimizer state, or is not a complete checkpoint.
      StructureError: the saved state is not shaped like `like` (another optimizer or adapter).

    Example:
      >>> adapter, config = load_adapter("ckpt/run", params=base)
      >>> opt_state = load_opt_state("ckpt/run", optimizer.init(adapter))
    """
    directory = checkpoint_directory(path, step)
    if not (directory / OPT_STATE_ITEM).exists():
        raise CheckpointError(
            f"{directory} holds no optimizer state: it was saved without save_adapter(..., opt_state=). "
            "Start from optimizer.init(adapter) instead."
        )
    target = ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, like))
    try:
        with _checkpointer() as checkpointer:
            restored = checkpointer.restore(directory, args=ocp.args.Composite(**{OPT_STATE_ITEM: target}))
    except ValueError as err:  # orbax's message lists the differing tree entries
        raise StructureError(f"the optimizer state in {directory} does not fit `like`: {err}") from None
    return restored[OPT_STATE_ITEM]
