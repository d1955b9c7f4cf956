"""PEFT's on-disk format, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names each vector ``base_model.model.<torch module path>.ia3_l``. Hugging Face Flax models use
their PyTorch twin's module names (transformers' weight conversion relies on it), so the torch
module path of a Flax module is its '.'-joined param path. The one difference transformers' own
conversion handles is the head prefix: an adapter trained on ``LlamaForCausalLM`` (``model.layers.0...``)
loads into a bare ``FlaxLlamaModel`` (``layers.0...``) and an adapter trained on ``BertModel``
(``encoder.layer.0...``) into ``FlaxBertForSequenceClassification`` (``bert.encoder.layer.0...``);
`load_peft` finds that prefix from the keys.

Stored layouts (PEFT's): a vector of C features scaling a 2-D kernel (``nn.Linear``, transformers'
``Conv1D``) is ``(C, 1)`` for output scaling and ``(1, C)`` for input (feedforward) scaling; on an
N-D conv kernel it is ``(1, C, 1, ...)`` with N - 2 trailing ones (``Conv2d``: ``(1, C, 1, 1)``).
``modules_to_save`` params are stored under their torch names and layouts, transformers' conversion
rule inverted: a Flax ``kernel`` is torch's ``weight`` with the feature axes swapped (Dense
``(in, out)`` -> ``(out, in)``; conv ``(*spatial, in, out)`` -> ``(out, in, *spatial)``), ``scale``
and ``embedding`` are ``weight``, every other name is kept. Everything is stored float32.

Neither direction needs PyTorch; files in any float dtype (bf16 from a bf16 model) are read as float32.

Crash safety. PEFT reads two files under fixed names, which no single rename can replace together.
`save_peft` holds ``<path>.ia3-lock`` (`ia3_jax._src.atomic.locked`: one writer per directory; a
second one gets `CheckpointError`), writes both files into a staging folder inside the directory
(``.ia3-peft-partial-<random>``), fsyncs them and the folder, and renames it to ``.ia3-peft-pending``
(the commit point: from then on the new pair is complete on disk); it then moves the two files into
place, removes the empty folder and fsyncs the directory. Killed before the commit, the directory
still holds the old pair (the staging folder is ignored, and swept by the next save); killed after
it, `load_peft` reads the new pair from ``.ia3-peft-pending`` and the directory, and the next
`save_peft` (with ``overwrite=True``: a directory holding an adapter is refused without it) finishes
the move. The weights file's safetensors metadata also carries a stamp of the
config it was written with (``ia3_jax.config_sha256``) and a SHA-256 of every tensor's stored bytes
(``ia3_jax.tensor_sha256``); PEFT and transformers ignore metadata keys they do not know. A pair mixed
by any other means is reported as such, and a damaged tensor as damaged, never loaded as other
values. Files written by PyTorch PEFT carry neither: they get every other check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.flax
import safetensors.numpy

from ia3_jax._src import atomic
from ia3_jax._src import bank as _bank
from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config, suffix_regex
from ia3_jax._src.dtypes import dtype_of
from ia3_jax._src.errors import (
    AdapterDtypeError,
    AdapterMismatchError,
    CheckpointError,
    IA3ConfigError,
    LayoutError,
    PeftFormatError,
    TargetError,
)
from ia3_jax._src.layout import KernelLayout
from ia3_jax._src.partition import without_vectors
from ia3_jax._src.targets import check_modules_to_save_copies, modules_to_save_roots, targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before the module path
# The PEFT release whose files the parity tests compare against; written as `peft_version`.
PEFT_FORMAT_VERSION = "0.21.2"
# What PEFT's task wrappers add to modules_to_save by themselves, whether the model has them or not
# (alternatives: a model has one of them).
TASK_MODULES_TO_SAVE = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
# The write protocol (module docstring): a committed new pair waiting to be moved into place, and
# the staging folders of saves killed before their commit.
PENDING_NAME = ".ia3-peft-pending"
_PARTIAL_PREFIX = ".ia3-peft-partial-"
# Safetensors metadata keys: the config stamp (sha256 of the config fields that decide the tensors)
# and the per-tensor hashes (JSON ``{key: sha256 of the stored bytes}``).
STAMP_KEY = "ia3_jax.config_sha256"
HASHES_KEY = "ia3_jax.tensor_sha256"
_STAMPED_KEYS = ("peft_type", "target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
                 "modules_to_save", "task_type")
# Keys adapter_config.json may hold that IA3Config does not model (PEFT fills them in itself).
_PEFT_BOOKKEEPING_KEYS = ("peft_type", "peft_version", "auto_mapping")


# --- torch names and layouts ------------------------------------------------------------------


def _torch_leaf(name: str, ndim: int) -> tuple[str, tuple[int, ...]]:
    """Torch name of a Flax param leaf and the axis permutation Flax -> torch (transformers' rule)."""
    if name == "kernel" and ndim >= 2:
        return "weight", (ndim - 1, ndim - 2, *range(ndim - 2))
    return ("weight" if name in ("scale", "embedding") else name), tuple(range(ndim))


def _peft_vector_shape(size: int, kernel_ndim: int, feedforward: bool) -> tuple[int, ...]:
    """PEFT's stored shape of a vector of `size` features on a kernel of `kernel_ndim` axes."""
    if kernel_ndim == 2:
        return (1, size) if feedforward else (size, 1)
    return (1, size) + (1,) * (kernel_ndim - 2)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One tensor of the file as both frameworks see it.

    The stored tensor is the Flax leaf with its axes permuted by `perm`, then reshaped to
    `peft_shape` (vectors: ``(C,)`` -> ``(C, 1)``; params: a pure transpose).
    """

    path: _tree.Path  # Flax leaf path; vectors end in "ia3_l"
    shape: tuple[int, ...]  # Flax shape
    perm: tuple[int, ...]  # axes Flax -> torch
    peft_shape: tuple[int, ...]  # stored shape

    def to_peft(self, leaf: Any) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(np.asarray(leaf, np.float32), self.perm).reshape(self.peft_shape))

    def to_flax(self, tensor: np.ndarray) -> jax.Array:
        permuted = tensor.reshape([self.shape[a] for a in self.perm])
        return jnp.asarray(np.transpose(permuted, np.argsort(self.perm)), jnp.float32)


_UNSTACK_FIRST = (
    "PEFT's format has one module per layer: pass the params and adapter of layers stacked by nn.scan / nn.vmap "
    "through ia3_jax.unstack(tree, '<scanned module path>', axis=...) first (and stack back after)."
)


def _vector_entries(
    params: Mapping[str, Any], config: IA3Config, layouts: Mapping[str, KernelLayout] | None
) -> dict[str, _Entry]:
    """``{torch key: _Entry}`` for the vector of every module `config` targets in `params`."""
    entries = {}
    try:
        resolved = targets(params, config, layouts)
    except LayoutError as error:  # often stacked layers, for which layouts alone would not do: name both ways
        raise LayoutError(f"{error} {_UNSTACK_FIRST}") from error
    for path, target in resolved.items():
        if target.layout.stack_axes:
            raise LayoutError(
                f"module {target.key!r} is stacked by nn.scan/nn.vmap (kernel {target.kernel_shape}, stacked axes "
                f"{target.layout.stack_axes}). {_UNSTACK_FIRST}"
            )
        shape = target.vector_shape  # DenseGeneral: several feature axes, flattened in the file
        peft_shape = _peft_vector_shape(int(np.prod(shape)), len(target.kernel_shape), target.feedforward)
        vector_path = (*path, _tree.VECTOR)
        entries[f"{target.key}.{_tree.VECTOR}"] = _Entry(vector_path, shape, tuple(range(len(shape))), peft_shape)
    return entries


def _saved_entries(params: Mapping[str, Any], config: IA3Config) -> dict[str, _Entry]:
    """``{torch key: _Entry}`` for every param of the ``modules_to_save`` modules in `params`."""
    entries = {}
    for root in modules_to_save_roots(params, config):
        for rel, leaf in _tree.leaves_with_paths(_tree.get(params, root)):
            if rel[-1] == _tree.VECTOR:
                continue
            shape = tuple(np.shape(_tree.unbox(leaf)))
            name, perm = _torch_leaf(rel[-1], len(shape))
            key = _tree.dotted(root + rel[:-1] + (name,))
            entries[key] = _Entry(root + rel, shape, perm, tuple(shape[a] for a in perm))
    return entries


def _entries(
    params: Mapping[str, Any], config: IA3Config, layouts: Mapping[str, KernelLayout] | None
) -> dict[str, _Entry]:
    """Every tensor PEFT's file holds for an adapter made with `config` on `params`, by torch key."""
    return {**_vector_entries(params, config, layouts), **_saved_entries(params, config)}


def _check_fits(have: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Raises `AdapterMismatchError` naming the first unknown key, wrong shape or missing key."""
    unknown = sorted(set(have) - set(want))
    if unknown:
        raise AdapterMismatchError(
            f"{where} has entries that match no targeted module or modules_to_save param of these params: "
            f"{_tree.listing(unknown)}. Entries that do: {_tree.listing(sorted(want))}. The adapter "
            "is for another architecture (or was made with another config)."
        )
    for key in sorted(have):
        if tuple(have[key]) != tuple(want[key]):
            raise AdapterMismatchError(
                f"{where}: {key!r} has shape {tuple(have[key])} but these params need {tuple(want[key])}: "
                "the adapter is for a model of another size."
            )
    missing = sorted(set(want) - set(have))
    if missing:
        raise AdapterMismatchError(
            f"{where} lacks {len(missing)} entries that these params need: {_tree.listing(missing)}."
        )


# --- writing ----------------------------------------------------------------------------------


def _adapter_config(config: IA3Config, vector_keys: list[str]) -> dict[str, Any]:
    """The JSON object PEFT writes: its keys, `target_modules` resolved, ``inference_mode`` true."""
    targets = config.target_modules
    if config.is_all_linear:
        # PEFT materialises "all-linear" as the full names of the modules it adapted.
        targets = tuple(sorted(k.removesuffix("." + _tree.VECTOR) for k in vector_keys))
    feedforward = config.feedforward_modules
    if isinstance(targets, tuple) and isinstance(feedforward, tuple) and not set(feedforward) <= set(targets):
        feedforward = suffix_regex(feedforward)  # else PEFT's subset check rejects the file (as its own)
    out = config.replace(target_modules=targets, feedforward_modules=feedforward, inference_mode=True).to_dict()
    out["peft_version"] = PEFT_FORMAT_VERSION
    return out


def _free_entries(adapter: Mapping[str, Any], config: IA3Config) -> dict[str, _Entry]:
    """The entries of an adapter saved without params: 1-D vectors of 2-D kernels that `config` targets."""
    linear = config.is_all_linear
    entries = {}
    for path, node in _tree.vector_modules(adapter).items():
        key, shape = _tree.dotted(path), tuple(np.shape(_tree.unbox(node[_tree.VECTOR])))
        if len(shape) != 1:
            raise AdapterMismatchError(
                f"the vector at {key!r} has shape {shape}: without `params`, save_peft writes 1-D vectors of "
                "2-D kernels only. Pass params= (and layouts=) so that each kernel decides PEFT's shape; for layers "
                "stacked by nn.scan / nnx.vmap (one vector per layer along an axis), PEFT's format has one module "
                "per layer: pass ia3_jax.unstack(adapter, '<stacked module path>') (and unstacked params). For a bank "
                "of adapters (the adapter axis last: ia3_jax.stack_adapters, ia3_jax.nnx.set_bank), save one adapter: "
                f"ia3_jax.bank_select(bank, i), or on an NNX model {_bank.BANK_FIX}."
            )
        if not (linear or config.is_target(key)):
            raise AdapterMismatchError(
                f"the vector at {key!r} is on a module that target_modules={config.target_modules!r} does not "
                "target: PEFT would skip it. Save with the config the adapter was made with."
            )
        peft_shape = _peft_vector_shape(shape[0], 2, config.is_feedforward(key))
        entries[f"{key}.{_tree.VECTOR}"] = _Entry(path + (_tree.VECTOR,), shape, (0,), peft_shape)
    return {**entries, **_saved_entries(adapter, config)}


def _adapter_leaves(adapter: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter's leaves by torch key (vectors as they are, params renamed as torch names them)."""
    out = {}
    for path, leaf in _tree.leaves_with_paths(adapter):
        leaf = _tree.unbox(leaf)
        name = path[-1] if path[-1] == _tree.VECTOR else _torch_leaf(path[-1], np.ndim(leaf))[0]
        out[_tree.dotted(path[:-1] + (name,))] = leaf
    return out


def config_stamp(data: Mapping[str, Any]) -> str:
    """sha256 of the fields of an ``adapter_config.json`` object that decide which tensors the file holds.

    Informational fields (``base_model_name_or_path``, ``revision``, ``inference_mode``, versions)
    are left out, and lists are sorted, so that editing them by hand keeps the pair consistent.
    """
    kept = {}
    for key in _STAMPED_KEYS:
        value = data.get(key)
        kept[key] = sorted(value) if isinstance(value, list) else value
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


# --- the crash-safe write (module docstring) ---------------------------------------------------


def _write_file(path: Path, data: bytes) -> None:
    """Writes a new file and flushes it to disk (`open` with ``"xb"``: never over another file)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _finish_pending(directory: Path) -> None:
    """Moves a committed pair (``.ia3-peft-pending``) into place: completes a save that was interrupted."""
    pending = directory / PENDING_NAME
    if not pending.is_dir():
        return
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if (pending / name).exists():  # else moved before a kill
            os.replace(pending / name, directory / name)
    atomic.fsync_path(str(directory))
    os.rmdir(pending)


def _write_pair(directory: Path, files: Mapping[str, bytes], overwrite: bool) -> None:
    """Replaces `files` in `directory` so that a kill at any point leaves the old or the new pair loadable.

    An adapter already there is replaced only with `overwrite` (checked under the lock, before any write).
    """
    if not directory.parent.is_dir():
        directory.parent.mkdir(parents=True, exist_ok=True)  # exist_ok: a concurrent save may make it first
    with atomic.locked(str(directory.absolute())):
        if not directory.is_dir():
            directory.mkdir()
        if not overwrite:
            _refuse_existing_adapter(directory)
        _finish_pending(directory)
        for entry in directory.iterdir():  # under the lock, every staging folder is a dead save's
            if entry.name.startswith(_PARTIAL_PREFIX):
                shutil.rmtree(entry)
        staging = directory / f"{_PARTIAL_PREFIX}{secrets.token_hex(4)}"
        os.mkdir(staging)
        try:
            for name, data in files.items():
                _write_file(staging / name, data)
            atomic.fsync_path(str(staging))
            os.rename(staging, directory / PENDING_NAME)  # the commit point
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        atomic.fsync_path(str(directory))
        _finish_pending(directory)
        atomic.fsync_path(str(directory))


def _refuse_existing_adapter(directory: Path) -> None:
    """Raises `CheckpointError` if `directory` holds PEFT's adapter files or an interrupted save's pair."""
    found = [name for name in (CONFIG_NAME, WEIGHTS_NAME, PENDING_NAME) if os.path.lexists(directory / name)]
    if not found:
        return
    if found == [PENDING_NAME]:
        raise CheckpointError(
            f"{str(directory)!r} holds the complete new pair of an interrupted save_peft ({PENDING_NAME}/, which "
            "load_peft reads): pass overwrite=True to replace it, or choose another directory to keep it."
        )
    try:
        kind = f"an adapter of peft_type {json.loads((directory / CONFIG_NAME).read_text())['peft_type']!r}"
    except (OSError, ValueError, KeyError, TypeError):
        kind = "an adapter"
    raise CheckpointError(
        f"{str(directory)!r} already holds {kind} ({', '.join(found)}): save_peft replaces it only when asked. Pass "
        "overwrite=True to replace it, or choose another directory to keep it."
    )


def _tensor_hashes(tensors: Mapping[str, Any]) -> dict[str, str]:
    """``{key: sha256 of the tensor's stored bytes}`` (C order, as safetensors stores them)."""
    return {key: hashlib.sha256(np.ascontiguousarray(t).tobytes()).hexdigest() for key, t in tensors.items()}


def _check_savable(leaves: Mapping[str, Any]) -> None:
    """Raises `AdapterDtypeError` naming a leaf that is not floating point or holds NaN or inf."""
    for key, leaf in leaves.items():
        dtype = dtype_of(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise AdapterDtypeError(
                f"adapter tensor {key!r} has dtype {dtype}: PEFT stores IA3 vectors and modules_to_save params as "
                "floats, and ia3_jax never casts other dtypes (the values would change). Save a float adapter."
            )
        with np.errstate(over="ignore"):
            finite = np.isfinite(np.asarray(leaf, np.float32)).all()
        if not finite:
            raise AdapterDtypeError(
                f"adapter tensor {key!r} holds NaN or inf (as float32, PEFT's stored dtype): the adapter diverged "
                "in training or overflows float32. Save an earlier adapter, or train with a lower learning rate."
            )


def save_peft(
    path: str | os.PathLike,
    adapter: Mapping[str, Any],
    config: IA3Config,
    *,
    params: Mapping[str, Any] | None = None,
    layouts: Mapping[str, KernelLayout] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes `adapter` as PEFT does: ``path/adapter_config.json`` and ``path/adapter_model.safetensors``.

    ``PeftModel.from_pretrained(torch_model, path)`` then loads it into the PyTorch twin of the Flax
    model (same module names). Everything is checked before anything is written.

    Args:
      path: the directory (created if missing). Other files in it are never touched.
      adapter: the adapter tree (`split`): ``ia3_l`` vectors, plus ``modules_to_save`` copies.
      config: the config the adapter was made with. ``"all-linear"`` is written as the adapted
        modules' names, as PEFT writes it.
      params: the model's params (base or joined). Recommended: the adapter is checked against the
        modules the config targets there (every vector and copy present, with its shape), and conv
        vectors get PEFT's ``(1, C, 1, 1)``. Without them every vector must be 1-D and is written as
        the vector of a 2-D kernel (Dense, FlaxConv1D).
      layouts: per-module `KernelLayout` (as given to `ia3_init`) for kernels whose shape is ambiguous.
      overwrite: replace an adapter already in `path` (its two files, or an interrupted save's pair);
        without it such a directory is refused, whoever wrote the adapter (PEFT, a LoRA, ia3_jax).

    Returns:
      The directory.

    A kill at any point leaves the directory's previous adapter or the new one loadable by
    `load_peft`, and success is reported only once the pair is on disk (module docstring); other
    files in the directory are never touched.

    Raises:
      AdapterMismatchError: a vector on a module the config does not target, a missing vector, a
        ``modules_to_save`` module without its copy (named), a shape that does not fit the params, a
        leaf that is neither a vector nor a ``modules_to_save`` param.
      AdapterDtypeError: a tensor that is not floating point, or holds NaN or inf (named).
      CheckpointError: `path` is an existing file, not a directory, holds an adapter and `overwrite` is
        False, or another save to it is running.

    Example:
      >>> adapter, base = ia3_jax.split(trained_params, config)
      >>> ia3_jax.save_peft("out/ia3", adapter, config, params=base)
      >>> # PyTorch: PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(...), "out/ia3")
    """
    adapter = _tree.to_dict(adapter)
    if not _tree.vector_modules(adapter):
        raise AdapterMismatchError("the adapter holds no IA3 vector (`ia3_l` leaf): nothing to save.")
    base = without_vectors(params) if params is not None else None
    alternatives = TASK_MODULES_TO_SAVE.get(config.task_type or "", ())
    if base is not None:
        _check_task_heads(base, config)
        _check_peft_would_match_the_same(base, config)
        _warn_embedding_copies(base, config, "save_peft")
    check_modules_to_save_copies(adapter, config, params=base, alternatives=alternatives)
    want = _entries(base, config, layouts) if base is not None else _free_entries(adapter, config)
    have = _adapter_leaves(adapter)
    for key, entry in want.items():
        if key.endswith("." + _tree.VECTOR) and key in have:
            _bank.refuse_bank(key.removesuffix("." + _tree.VECTOR), entry.shape, np.shape(have[key]), "save_peft")
    _check_savable(have)
    _check_fits({k: np.shape(leaf) for k, leaf in have.items()}, {k: e.shape for k, e in want.items()}, "the adapter")
    tensors = {PEFT_KEY_PREFIX + key: entry.to_peft(have[key]) for key, entry in want.items()}
    vector_keys = [k for k in want if k.endswith("." + _tree.VECTOR)]
    config_data = _adapter_config(config, vector_keys)
    text = json.dumps(config_data, indent=2, sort_keys=True)
    # "format": "pt" is what PEFT writes (transformers' loaders check it); the stamp ties the pair.
    metadata = {
        "format": "pt",
        STAMP_KEY: config_stamp(config_data),
        HASHES_KEY: json.dumps(_tensor_hashes(tensors), sort_keys=True),
    }
    weights = safetensors.numpy.save(tensors, metadata=metadata)

    directory = Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{str(directory)!r} is a file: save_peft writes a directory. Choose another path.")
    _write_pair(directory, {WEIGHTS_NAME: weights, CONFIG_NAME: text.encode()}, overwrite)
    return directory


# --- reading ----------------------------------------------------------------------------------


def _pair_file(directory: Path, name: str) -> Path:
    """Where the current `name` is: in ``.ia3-peft-pending`` while an interrupted save's pair waits there."""
    pending = directory / PENDING_NAME / name
    return pending if pending.is_file() else directory / name


def _warn_if_pending(directory: Path) -> None:
    if (directory / PENDING_NAME).is_dir():
        warnings.warn(
            f"{str(directory)!r} holds a save_peft that was interrupted after it had written the new adapter "
            f"completely ({PENDING_NAME}/): ia3_jax loads the new adapter, but PEFT reads the two files in the "
            "directory alone, which may still be mixed. Run save_peft to this directory again (or load it with "
            "ia3_jax and save it) to finish the move.",
            stacklevel=3,
        )


def _is_neutral(value: Any) -> bool:
    """None, False or empty: the value by which PEFT's newer optional fields mean "not used"."""
    return value is None or value is False or (isinstance(value, (str, list, dict)) and not value)


def _known_fields(file: Path, data: dict[str, Any]) -> dict[str, Any]:
    """`data` without keys that IA3Config does not know and that are neutral (warned); others refused."""
    known = {f.name for f in dataclasses.fields(IA3Config)} | set(_PEFT_BOOKKEEPING_KEYS)
    unknown = sorted(set(data) - known)
    refused = {k: data[k] for k in unknown if not _is_neutral(data[k])}
    if refused:
        values = ", ".join(f"{k}={v!r}" for k, v in sorted(refused.items()))
        raise PeftFormatError(
            f"{str(file)!r} is not a valid IA3 config: it sets {sorted(refused)} ({values}), "
            f"which IA3 does not have. IA3 knows {sorted(known)}. A newer PEFT may write such keys; ia3_jax accepts "
            "them only at a neutral value (None, false, empty), where they cannot change the adapter's meaning. "
            "(LoRA-only fields such as `r` or `layers_to_transform` do not exist for IA3.)"
        )
    if unknown:
        warnings.warn(
            f"{str(file)!r}: ignoring keys {unknown} that IA3Config does not have (written by a newer PEFT?); "
            "each holds a neutral value (None, false or empty), so the adapter means the same without them.",
            stacklevel=4,
        )
    return {k: v for k, v in data.items() if k not in unknown}


def _read_config_data(directory: Path) -> tuple[Path, dict[str, Any]]:
    """``(file, JSON object)`` of the directory's current ``adapter_config.json``; `PeftFormatError` if unusable."""
    if directory.exists() and not directory.is_dir():
        raise PeftFormatError(f"{str(directory)!r} is a file: a PEFT adapter is a directory holding {CONFIG_NAME}.")
    file = _pair_file(directory, CONFIG_NAME)
    if not file.is_file():
        nested = sorted(p.parent.name for p in directory.glob(f"*/{CONFIG_NAME}")) if directory.is_dir() else []
        hint = (
            f" It has adapters in sub-folders {nested} (PEFT saves non-default adapters there): pass "
            f"{str(directory / nested[0])!r}." if nested else ""
        )
        raise PeftFormatError(f"no {CONFIG_NAME} in {str(directory)!r}: not a PEFT adapter directory.{hint}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PeftFormatError(f"{str(file)!r} is not valid JSON: {err}.") from None
    if not isinstance(data, dict):
        raise PeftFormatError(f"{str(file)!r} holds a JSON {type(data).__name__}, not PEFT's config object.")
    return file, data


def _parse_config(file: Path, data: dict[str, Any]) -> IA3Config:
    """The `IA3Config` of a config object read from `file`."""
    peft_type = data.get("peft_type")
    if peft_type != "IA3":
        raise PeftFormatError(
            f"{str(file)!r} has peft_type={peft_type!r}: ia3_jax reads IA3 adapters only (peft_type 'IA3')."
        )
    data = _known_fields(file, data)
    targets, feedforward = data.get("target_modules"), data.get("feedforward_modules")
    if isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets):
        # PEFT writes this itself ("all-linear" materialised next to the default feedforward suffixes)
        # and then rejects it; the regex of PEFT's suffix rule means the same and is accepted.
        data = {**data, "feedforward_modules": suffix_regex(feedforward)}
    try:
        return IA3Config.from_dict(data)
    except (IA3ConfigError, TypeError) as err:
        raise PeftFormatError(f"{str(file)!r} is not a valid IA3 config: {err}") from None


def read_peft_config(path: str | os.PathLike) -> IA3Config:
    """The `IA3Config` in ``path/adapter_config.json`` (PEFT's or ours).

    Keys that IA3Config does not have (a newer PEFT may write some) are ignored with a warning when
    their value is neutral (None, false, empty) and refused otherwise.

    Raises `PeftFormatError` for a missing directory or file, invalid JSON, a ``peft_type`` other
    than ``"IA3"``, or fields IA3 does not have set to a value that matters.

    Example:
      >>> config = ia3_jax.read_peft_config("peft_dir")      # peft_dir/adapter_config.json, no weights read
      >>> config.target_modules, config.feedforward_modules
    """
    directory = Path(path).expanduser()
    _warn_if_pending(directory)
    return _parse_config(*_read_config_data(directory))


def _read_float_tensors(file: Path) -> dict[str, Any]:
    """The file's tensors in their stored dtype; `PeftFormatError` for one that is not floating point.

    The dtype is read from the header, before any conversion (JAX would turn int64 into int32 and
    float64 into float32). numpy reads F16/F32/F64; JAX reads the floats numpy lacks (BF16: PEFT
    saves a bf16 model's adapter in bf16; F8).
    """
    tensors: dict[str, Any] = {}
    with safetensors.safe_open(file, framework="np") as f:
        stored = {key: f.get_slice(key).get_dtype() for key in f.keys()}
        for key, dtype in stored.items():
            if not (dtype.startswith("F") or dtype == "BF16"):
                raise PeftFormatError(
                    f"{str(file)!r}: tensor {key!r} has dtype {dtype}, not floating point. IA3 vectors and "
                    "modules_to_save params are floats; ia3_jax does not cast other dtypes (the values would "
                    "change). Re-save the adapter from a float model."
                )
            if dtype in ("F16", "F32", "F64"):
                tensors[key] = f.get_tensor(key)
    rest = [key for key in stored if key not in tensors]
    if rest:
        with safetensors.safe_open(file, framework="flax") as f:
            tensors.update({key: f.get_tensor(key) for key in rest})
    return {key: tensors[key] for key in stored}


def read_tensors(directory: Path) -> tuple[Path, dict[str, str], dict[str, np.ndarray]]:
    """``(file, metadata, tensors)`` of the current weights file, every tensor float32 and finite.

    Raises `PeftFormatError` for a missing or unreadable file, no tensors, a tensor that is not
    floating point (it is never cast silently), or one that holds NaN or inf.
    """
    file = _pair_file(directory, WEIGHTS_NAME)
    if not file.is_file():
        legacy = (directory / "adapter_model.bin").is_file()
        raise PeftFormatError(
            f"no {WEIGHTS_NAME} in {str(directory)!r}"
            + (
                ": only the pickled adapter_model.bin is there, which ia3_jax does not read (it would need torch). "
                "Re-save it in PyTorch with save_pretrained(..., safe_serialization=True)."
                if legacy else "."
            )
        )
    try:
        raw = _read_float_tensors(file)
        with safetensors.safe_open(file, framework="np") as f:
            metadata = dict(f.metadata() or {})
    except safetensors.SafetensorError as err:
        raise PeftFormatError(f"{str(file)!r} is not a readable safetensors file: {err}") from None
    if not raw:
        raise PeftFormatError(f"{str(file)!r} holds no tensors.")
    _check_hashes(file, metadata, raw)
    tensors = {}
    for key, tensor in raw.items():
        with np.errstate(over="ignore"):  # an overflow is reported below, naming the tensor
            value = np.asarray(tensor, np.float32)
        if not np.isfinite(value).all():
            bad = int(value.size - np.isfinite(value).sum())
            cause = (
                "the adapter diverged in training or the file is damaged"
                if not np.isfinite(np.asarray(tensor)).all() else f"its {tensor.dtype} values overflow float32"
            )
            raise PeftFormatError(
                f"{str(file)!r}: tensor {key!r} holds {bad} NaN or inf values of {value.size} ({cause}). "
                "Load an earlier checkpoint, or train again with a lower learning rate."
            )
        # PeftModel writes the `base_model.model.` prefix; `inject_adapter_in_model` + state dict does not.
        tensors[key.removeprefix(PEFT_KEY_PREFIX)] = value
    return file, metadata, tensors


def _check_hashes(file: Path, metadata: Mapping[str, str], raw: Mapping[str, Any]) -> None:
    """Raises `PeftFormatError` unless every tensor's bytes match the hash `save_peft` stored (when stored)."""
    if HASHES_KEY not in metadata:  # written by PyTorch PEFT (or by hand): nothing to check against
        return
    try:
        saved = json.loads(metadata[HASHES_KEY])
    except ValueError:
        saved = None
    if not isinstance(saved, dict) or saved.keys() != raw.keys():
        raise PeftFormatError(
            f"{str(file)!r} is damaged: its {HASHES_KEY} metadata does not list its tensors. Save the adapter again."
        )
    for key, digest in _tensor_hashes({k: np.asarray(t) for k, t in raw.items()}).items():
        if digest != saved[key]:
            raise PeftFormatError(
                f"{str(file)!r} is damaged: the data of tensor {key!r} does not match the hash saved with it. "
                "Save the adapter again, or restore the file from a copy."
            )


def _check_stamp(config_file: Path, data: Mapping[str, Any], weights_file: Path, metadata: Mapping[str, str]) -> None:
    """Raises `PeftFormatError` when the weights were written with another config (a mixed pair)."""
    stamp = metadata.get(STAMP_KEY)
    if stamp is not None and stamp != config_stamp(data):
        raise PeftFormatError(
            f"{str(config_file)!r} and {str(weights_file)!r} come from different saves: the weights were written "
            f"for another adapter config (their {STAMP_KEY} stamp does not match this config's). A save was "
            "interrupted by an earlier ia3_jax or the files were copied separately. Save the adapter again, or "
            "put back the two files of one save."
        )


@dataclasses.dataclass(frozen=True)
class _Prefix:
    """Flax path ``flax_root + rest`` is torch module path ``torch_root + rest`` (a head prefix)."""

    flax_root: _tree.Path = ()
    torch_root: _tree.Path = ()

    def torch_view(self, params: Mapping[str, Any]) -> Mapping[str, Any]:
        """`params` re-rooted so that its '.'-joined paths are the torch module paths."""
        node = _tree.get(params, self.flax_root)
        for name in reversed(self.torch_root):
            node = {name: node}
        return node

    def to_flax(self, path: _tree.Path) -> _tree.Path:
        return self.flax_root + path[len(self.torch_root) :]


def _prefix_candidates(params: Mapping[str, Any], keys: list[str]) -> list[_Prefix]:
    """Identity first, then dropping a Flax head prefix, then adding the keys' own first name."""
    candidates = [_Prefix()]
    candidates += [_Prefix(flax_root=(name,)) for name, child in params.items() if isinstance(child, Mapping)]
    firsts = {k.split(".", 1)[0] for k in keys}
    if len(firsts) == 1 and (first := firsts.pop()) not in params:
        candidates.append(_Prefix(torch_root=(first,)))
    return candidates


def _targeted_config(config: IA3Config, view: Mapping[str, Any]) -> IA3Config:
    """`config` as ia3_jax reads PEFT's file for `view`: without the modules_to_save entries that PEFT adds for
    the task and that `view` lacks, each other entry named as the modules PEFT saved for it (`_peft_suffix_names`)."""
    if not config.modules_to_save:
        return config
    auto = TASK_MODULES_TO_SAVE.get(config.task_type or "", ())
    kept = [
        m for m in config.modules_to_save
        if m not in auto or modules_to_save_roots(view, config.replace(modules_to_save=[m]))
    ]
    named = [name for m in kept for name in _peft_suffix_names(view, m)]
    return config.replace(modules_to_save=list(dict.fromkeys(named)) or None)


def _peft_suffix_names(view: Mapping[str, Any], entry: str) -> list[str]:
    """A ``modules_to_save`` entry as ia3_jax names the modules PEFT 0.21 saves for it ([entry] if none match).

    PEFT wraps every module whose path ends with the entry, with no '.' boundary (``norm`` is also each
    layer's ``input_layernorm``); ia3_jax matches whole path components. Each module PEFT's rule finds is
    named by its trailing components that hold the entry (``input_layernorm``), which ia3_jax then matches
    in every layer, as PEFT did.
    """
    depth = entry.count(".") + 1
    names = [".".join(path[-depth:]) for path in _peft_matches(view, entry)]
    return list(dict.fromkeys(names)) or [entry]


def _peft_matches(tree: Mapping[str, Any], entry: str) -> list[_tree.Path]:
    """The modules of `tree` that PEFT 0.21's ``_set_trainable`` wraps for a ``modules_to_save`` entry: every
    one whose path ends with it, no '.' boundary, nested ones included."""
    return [path for path, _ in _tree.modules(tree) if _tree.dotted(path).endswith(entry)]


def _check_task_heads(params: Mapping[str, Any], config: IA3Config) -> None:
    """Raises `AdapterMismatchError` when a head that PEFT's task wrapper adds to ``modules_to_save`` (a
    ``SEQ_CLS`` model's ``classifier``) is in `params` but not in the config: PEFT's loader expects its
    weights in the file and fails without them (``KeyError`` in ``PeftModel.from_pretrained``)."""
    for head in TASK_MODULES_TO_SAVE.get(config.task_type or "", ()):
        roots = modules_to_save_roots(params, config.replace(modules_to_save=[head]))
        unsaved = [_tree.dotted(r) for r in roots if not config.is_module_to_save(_tree.dotted(r))]
        if unsaved:
            raise AdapterMismatchError(
                f"task_type={config.task_type!r}: PEFT's wrapper for it trains and saves {head!r} with the adapter, "
                f"and its loader expects the weights of {unsaved} in the file, which this config does not save. "
                f"Add it, IA3Config(..., modules_to_save=[{head!r}]) (ia3_init then gives its trainable copy), as "
                "PEFT does; or save with another task_type."
            )


def _warn_embedding_copies(params: Mapping[str, Any], config: IA3Config, caller: str) -> None:
    """Warns when ``modules_to_save`` copies an input embedding that the model's head may read too.

    The hazard: Flax stores a tied embedding once, so its copy is the head too; PyTorch PEFT's copy replaces
    the input embedding only (and T5 / BART's ``shared`` not even that: their encoder and decoder hold the
    original), so the two frameworks would compute different logits. The params cannot tell a tied head
    from none (a classifier model): a warning when no output kernel of the transposed shape exists, or the
    module is ``shared``. `ia3_jax.hf.default_config` refuses the cases it can tell from the model.
    """
    kernels = {np.shape(leaf) for path, leaf in _tree.leaves_with_paths(params) if path[-1] == "kernel"}
    for root in modules_to_save_roots(params, config):
        for path, leaf in _tree.leaves_with_paths(_tree.get(params, root)):
            shape = np.shape(_tree.unbox(leaf))
            if path[-1] != "embedding" or len(shape) != 2:
                continue
            if root[-1] == "shared" or (shape[1], shape[0]) not in kernels:
                warnings.warn(
                    f"{caller}: modules_to_save copies {_tree.dotted(root + path[:-1])!r}, an input embedding that "
                    "the output head may read too (tied: GPT-2's wte, BERT's masked-LM head; T5 / BART's shared "
                    "always). In Flax its copy is then the head too; PyTorch PEFT's copy replaces the input "
                    "embedding only, so the two compute different logits. Leave it frozen unless the head is "
                    "separate.",
                    stacklevel=3,
                )


def _check_peft_would_match_the_same(params: Mapping[str, Any], config: IA3Config) -> None:
    """Raises `AdapterMismatchError` when PEFT would wrap other modules for a ``modules_to_save`` entry than ia3_jax.

    ia3_jax matches an entry to whole path components (``norm`` is ``model.norm``); PEFT 0.21's
    ``_set_trainable`` wraps every module whose path merely ends with it (``norm`` also catches
    ``layers.0.input_layernorm``), also inside a module it already wraps, and its loader then expects
    copies this file would not hold (``KeyError``). The entries PEFT's task wrapper adds count too.
    """
    roots = modules_to_save_roots(params, config)
    entries = [*(config.modules_to_save or ()), *TASK_MODULES_TO_SAVE.get(config.task_type or "", ())]
    for entry in dict.fromkeys(entries):
        hits = [path for path in _peft_matches(params, entry) if path not in roots]
        nested = [_tree.dotted(path) for path in hits if _tree.under(path, roots)]
        if nested:
            raise AdapterMismatchError(
                f"modules_to_save entry {entry!r}: PEFT wraps every module whose path ends with it, here also "
                f"{_tree.listing(nested, 4)} inside a module saved whole, a second copy its loader cannot read "
                f"(KeyError in PeftModel.from_pretrained). Drop {entry!r}, or the entry that saves the module "
                "holding it."
            )
        if hits:
            wanted = [*dict.fromkeys([*(config.modules_to_save or ()), *_peft_suffix_names(params, entry)])]
            raise AdapterMismatchError(
                f"modules_to_save entry {entry!r}: PEFT also saves a copy of every module whose path ends with it, "
                f"here {_tree.listing([_tree.dotted(path) for path in hits], 4)}, and its loader would look for those "
                f"copies in this file. Save them too, modules_to_save={wanted}, or name the modules you mean so "
                "that PEFT's suffix rule selects only them (e.g. 'model.norm' rather than 'norm')."
            )


def _choose_prefix(
    params: Mapping[str, Any], config: IA3Config, keys: list[str], layouts: Mapping[str, KernelLayout] | None
) -> tuple[_Prefix, dict[str, _Entry], IA3Config]:
    """The head prefix under which most keys name entries of `params` (identity first, and on ties).

    Raises `AdapterMismatchError` when the config targets nothing in `params` under any prefix.
    """
    best, first_error = None, None
    for prefix in _prefix_candidates(params, keys):
        view = prefix.torch_view(params)
        fitted = _targeted_config(config, view)
        try:
            with warnings.catch_warnings():
                if prefix != _Prefix():  # idle-pattern warnings belong to the identity mapping
                    warnings.simplefilter("ignore")
                entries = _entries(view, fitted, layouts)
        except TargetError as err:
            first_error = first_error or err
            continue
        count = len(set(keys) & set(entries))
        if best is None or count > best[0]:
            best = (count, (prefix, entries, fitted))
        if count == len(keys):
            break
    if best is None:
        raise AdapterMismatchError(f"the adapter (first key {keys[0]!r}) does not fit these params: {first_error}")
    return best[1]


def load_peft(
    path: str | os.PathLike,
    params: Mapping[str, Any],
    *,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> tuple[dict[str, Any], IA3Config]:
    """Reads a PEFT IA3 adapter directory (PEFT's ``save_pretrained`` or `save_peft`) for `params`.

    Every key and shape is checked against the modules the file's config targets in `params` before
    anything is returned.

    Args:
      path: the directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the Flax params of the model the adapter was made for (vectors already in them are
        ignored). The head prefix may differ (a ``LlamaForCausalLM`` adapter on ``FlaxLlamaModel``).
      layouts: per-module `KernelLayout` for kernels whose shape is ambiguous (as for `ia3_init`).

    Returns:
      ``(adapter, config)``: the adapter tree for ``join(base, adapter)`` (float32 ``ia3_l`` vectors
      of shape ``(out,)`` / ``(in,)`` and ``modules_to_save`` params in Flax names and layouts) and
      the file's `IA3Config` (without the ``modules_to_save`` entries that PEFT's task wrappers add,
      e.g. ``"score"`` for ``SEQ_CLS``, where the model has no such module).

    Raises:
      PeftFormatError: missing or malformed files, a ``peft_type`` other than IA3, config keys IA3
        does not have at a non-neutral value, a tensor that is not floating point or holds NaN/inf,
        a config and weights from different saves.
      AdapterMismatchError: a key that matches no module (another architecture), a shape that does not
        fit (another size), or tensors missing for modules the config targets.

    Example:
      >>> adapter, config = ia3_jax.load_peft("peft_dir", model.params)
      >>> logits = ia3_jax.apply_fn(model.__call__, config)(ids, params=ia3_jax.join(model.params, adapter))
    """
    directory = Path(path).expanduser()
    _warn_if_pending(directory)
    config_file, data = _read_config_data(directory)
    config = _parse_config(config_file, data)
    weights_file, metadata, tensors = read_tensors(directory)
    _check_stamp(config_file, data, weights_file, metadata)
    prefix, entries, config = _choose_prefix(without_vectors(params), config, sorted(tensors), layouts)
    _check_fits({k: t.shape for k, t in tensors.items()}, {k: e.peft_shape for k, e in entries.items()},
                repr(str(weights_file)))
    changes = {prefix.to_flax(e.path): e.to_flax(tensors[key]) for key, e in entries.items()}
    _warn_embedding_copies(without_vectors(params), config, "load_peft")
    return _tree.updated({}, changes), config
