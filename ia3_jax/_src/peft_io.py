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
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
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

from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config, suffix_regex
from ia3_jax._src.errors import AdapterMismatchError, IA3ConfigError, LayoutError, PeftFormatError, TargetError
from ia3_jax._src.layout import KernelLayout
from ia3_jax._src.partition import without_vectors
from ia3_jax._src.targets import modules_to_save_roots, targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before the module path
# The PEFT release whose files the parity tests compare against; written as `peft_version`.
PEFT_FORMAT_VERSION = "0.21.2"
# What PEFT's task wrappers add to modules_to_save by themselves, whether the model has them or not.
_AUTO_MODULES_TO_SAVE = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
_SHOWN = 8  # keys listed in an error message


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


def _vector_entries(
    params: Mapping[str, Any], config: IA3Config, layouts: Mapping[str, KernelLayout] | None
) -> dict[str, _Entry]:
    """``{torch key: _Entry}`` for the vector of every module `config` targets in `params`."""
    entries = {}
    for path, target in targets(params, config, layouts).items():
        if target.layout.stack_axes:
            raise LayoutError(
                f"module {target.key!r} is stacked by nn.scan/nn.vmap (kernel {target.kernel_shape}, stacked axes "
                f"{target.layout.stack_axes}): PEFT's format has one module per layer. Pass params and adapter "
                "through ia3_jax.unstack(tree, '<scanned module path>', axis=...) first (and stack back after)."
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


def _listing(keys, limit: int = _SHOWN) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_fits(have: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Raises `AdapterMismatchError` naming the first unknown key, wrong shape or missing key."""
    unknown = sorted(set(have) - set(want))
    if unknown:
        raise AdapterMismatchError(
            f"{where} has entries that match no targeted module or modules_to_save param of these params: "
            f"{_listing(unknown)}. Entries that do: {_listing(want)}. The adapter is for another "
            "architecture (or was made with another config)."
        )
    for key in sorted(have):
        if tuple(have[key]) != tuple(want[key]):
            raise AdapterMismatchError(
                f"{where}: {key!r} has shape {tuple(have[key])} but these params need {tuple(want[key])}: "
                "the adapter is for a model of another size."
            )
    missing = sorted(set(want) - set(have))
    if missing:
        raise AdapterMismatchError(f"{where} lacks {len(missing)} entries that these params need: {_listing(missing)}.")


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
                "2-D kernels only. Pass params= (and layouts=) so that each kernel decides PEFT's shape."
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


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_peft(
    path: str | os.PathLike,
    adapter: Mapping[str, Any],
    config: IA3Config,
    *,
    params: Mapping[str, Any] | None = None,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> Path:
    """Writes `adapter` as PEFT does: ``path/adapter_config.json`` and ``path/adapter_model.safetensors``.

    ``PeftModel.from_pretrained(torch_model, path)`` then loads it into the PyTorch twin of the Flax
    model (same module names). Everything is checked before anything is written.

    Args:
      path: the directory (created if missing; PEFT's two files in it are replaced).
      adapter: the adapter tree (`split`): ``ia3_l`` vectors, plus ``modules_to_save`` copies.
      config: the config the adapter was made with. ``"all-linear"`` is written as the adapted
        modules' names, as PEFT writes it.
      params: the model's params (base or joined). Recommended: the adapter is checked against the
        modules the config targets there (every vector and copy present, with its shape), and conv
        vectors get PEFT's ``(1, C, 1, 1)``. Without them every vector must be 1-D and is written as
        the vector of a 2-D kernel (Dense, FlaxConv1D).
      layouts: per-module `KernelLayout` (as given to `ia3_init`) for kernels whose shape is ambiguous.

    Returns:
      The directory.

    Raises:
      AdapterMismatchError: a vector on a module the config does not target, a missing vector or copy,
        a shape that does not fit the params, a leaf that is neither a vector nor a ``modules_to_save`` param.

    Example:
      >>> adapter, base = ia3_jax.split(trained_params, config)
      >>> ia3_jax.save_peft("out/ia3", adapter, config, params=base)
      >>> # PyTorch: PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(...), "out/ia3")
    """
    adapter = _tree.to_dict(adapter)
    if not _tree.vector_modules(adapter):
        raise AdapterMismatchError("the adapter holds no IA3 vector (`ia3_l` leaf): nothing to save.")
    want = _entries(without_vectors(params), config, layouts) if params is not None else _free_entries(adapter, config)
    have = _adapter_leaves(adapter)
    _check_fits({k: np.shape(leaf) for k, leaf in have.items()}, {k: e.shape for k, e in want.items()}, "the adapter")
    tensors = {PEFT_KEY_PREFIX + key: entry.to_peft(have[key]) for key, entry in want.items()}
    vector_keys = [k for k in want if k.endswith("." + _tree.VECTOR)]
    text = json.dumps(_adapter_config(config, vector_keys), indent=2, sort_keys=True)

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}  # what PEFT writes; transformers' loaders check it
    _atomic_write(directory / WEIGHTS_NAME, lambda f: safetensors.numpy.save_file(tensors, f, metadata=metadata))
    _atomic_write(directory / CONFIG_NAME, lambda f: Path(f).write_text(text))
    return directory


# --- reading ----------------------------------------------------------------------------------


def read_peft_config(path: str | os.PathLike) -> IA3Config:
    """The `IA3Config` in ``path/adapter_config.json`` (PEFT's or ours).

    Raises `PeftFormatError` for a missing directory or file, invalid JSON, a ``peft_type`` other
    than ``"IA3"``, or fields IA3 does not have.
    """
    directory = Path(path)
    file = directory / CONFIG_NAME
    if not file.is_file():
        nested = sorted(p.parent.name for p in directory.glob(f"*/{CONFIG_NAME}")) if directory.is_dir() else []
        hint = (
            f" It has adapters in sub-folders {nested} (PEFT saves non-default adapters there): pass "
            f"{str(directory / nested[0])!r}." if nested else ""
        )
        raise PeftFormatError(f"no {CONFIG_NAME} in {str(directory)!r}: not a PEFT adapter directory.{hint}")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PeftFormatError(f"{str(file)!r} is not valid JSON: {err}.") from None
    if not isinstance(data, dict):
        raise PeftFormatError(f"{str(file)!r} holds a JSON {type(data).__name__}, not PEFT's config object.")
    peft_type = data.get("peft_type")
    if peft_type != "IA3":
        raise PeftFormatError(
            f"{str(file)!r} has peft_type={peft_type!r}: ia3_jax reads IA3 adapters only (peft_type 'IA3')."
        )
    targets, feedforward = data.get("target_modules"), data.get("feedforward_modules")
    if isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets):
        # PEFT writes this itself ("all-linear" materialised next to the default feedforward suffixes)
        # and then rejects it; the regex of PEFT's suffix rule means the same and is accepted.
        data = {**data, "feedforward_modules": suffix_regex(feedforward)}
    try:
        return IA3Config.from_dict(data)
    except (IA3ConfigError, TypeError) as err:
        raise PeftFormatError(f"{str(file)!r} is not a valid IA3 config: {err}") from None


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    file = directory / WEIGHTS_NAME
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
        # The flax reader, as numpy's has no bfloat16: PEFT saves a bf16 model's adapter in bf16.
        tensors = safetensors.flax.load_file(file)
    except safetensors.SafetensorError as err:
        raise PeftFormatError(f"{str(file)!r} is not a readable safetensors file: {err}") from None
    if not tensors:
        raise PeftFormatError(f"{str(file)!r} holds no tensors.")
    # PeftModel writes the `base_model.model.` prefix; `inject_adapter_in_model` + state dict does not.
    return {k.removeprefix(PEFT_KEY_PREFIX): np.asarray(v, np.float32) for k, v in tensors.items()}


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
    """`config` without the modules_to_save entries that PEFT adds for the task and that `view` lacks."""
    if not config.modules_to_save:
        return config
    auto = _AUTO_MODULES_TO_SAVE.get(config.task_type or "", ())
    kept = [
        m for m in config.modules_to_save
        if m not in auto or modules_to_save_roots(view, config.replace(modules_to_save=[m]))
    ]
    return config.replace(modules_to_save=kept or None)


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
      PeftFormatError: missing or malformed files, a ``peft_type`` other than IA3.
      AdapterMismatchError: a key that matches no module (another architecture), a shape that does not
        fit (another size), or tensors missing for modules the config targets.

    Example:
      >>> adapter, config = ia3_jax.load_peft("peft_dir", model.params)
      >>> logits = ia3_jax.apply_fn(model.__call__, config)(ids, params=ia3_jax.join(model.params, adapter))
    """
    directory = Path(path)
    config = read_peft_config(directory)
    tensors = _read_tensors(directory)
    prefix, entries, config = _choose_prefix(without_vectors(params), config, sorted(tensors), layouts)
    _check_fits({k: t.shape for k, t in tensors.items()}, {k: e.peft_shape for k, e in entries.items()},
                repr(str(directory / WEIGHTS_NAME)))
    changes = {prefix.to_flax(e.path): e.to_flax(tensors[key]) for key, e in entries.items()}
    return _tree.updated({}, changes), config
