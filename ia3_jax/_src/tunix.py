"""PEFT IA3 adapters on Tunix models, both ways, through the key mapping Tunix loads Hugging Face weights with.

``tunix/models/<family>/params.py`` maps each torch key of the Hugging Face twin to an NNX path with
a permute / reshape rule, e.g. ``model.layers.0.self_attn.k_proj.weight`` -> ``layers.0.attn.k_proj.w``
reshaped to ``(embed, num_kv_heads, head_dim)``. Running that rule on an array of torch feature
indices tells, for every entry of a Tunix vector (``(num_kv_heads, head_dim)`` for ``k_proj``), which
entry of PEFT's ``(out, 1)`` vector it is; so any Tunix family with such a mapping works.

Configs stay in PEFT's (Hugging Face) module names: `tunix_config` translates one to the Tunix paths
it selects, so PEFT's per-model-type defaults (`default_config`) apply to Tunix models too.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import math
import re
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ia3_jax._src import bank as _bank
from ia3_jax._src import nnx as _nnx
from ia3_jax._src import nnx_vectors, peft_io
from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config
from ia3_jax._src.errors import AdapterMismatchError, LayoutError, TargetError, UnknownModelTypeError
from ia3_jax._src.targets import Target

M = TypeVar("M", bound=nnx.Module)

# Tunix family -> (module holding its torch key mapping, PEFT's model_type of the Hugging Face twin).
FAMILIES: dict[str, tuple[str, str]] = {
    "gemma3": ("tunix.models.gemma3.params_safetensors", "gemma3_text"),
    "llama3": ("tunix.models.llama3.params", "llama"),
    "qwen2": ("tunix.models.qwen2.params", "qwen2"),
    "qwen3": ("tunix.models.qwen3.params", "qwen3"),
}
_LAYER_GROUP = "([0-9]+)"  # the only capture group Tunix's torch key patterns use
_STAGED = "tmp."  # Tunix keys that its preprocessing step fuses into other weights (Gemma 3: q, k, v)


class Site(NamedTuple):
    """A Tunix module that one or more Hugging Face modules map onto.

    Attributes:
      path: the Tunix module path, e.g. ``("layers", "0", "attn", "k_proj")``.
      hf_keys: the Hugging Face module paths whose weights make its weight, in the order of their
        output features in ``feature_index``, e.g. ``("model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj")`` for Gemma 3's ``kv_einsum``; one key for a plain mapping.
      transform: Tunix's ``(permute, reshape)`` rule from the torch weight ``(out, in)`` to the NNX
        weight, for a plain mapping; None with ``feature_index``.
      feature_index: for a weight that Tunix's preprocessing builds from several torch weights, that
        preprocessing run on torch output-feature indices: the weight's shape, each entry the index of
        its output feature in PEFT's vectors of ``hf_keys`` concatenated.
      sizes: the output features of each of ``hf_keys`` (with ``feature_index``).

    Example:
      >>> site = ia3_jax.tunix.sites(gemma)[("layers", "0", "attn", "kv_einsum")]
      >>> site.hf_keys
      ('model.layers.0.self_attn.k_proj', 'model.layers.0.self_attn.v_proj')
    """

    path: _tree.Path
    hf_keys: tuple[str, ...]
    transform: tuple[Any, Any] | None
    feature_index: np.ndarray | None = None
    sizes: tuple[int, ...] = ()

    @property
    def hf_key(self) -> str:
        return self.hf_keys[0]


def family(model: nnx.Module) -> str:
    """The Tunix family of `model` (``"llama3"``, ``"gemma3"``, ...), read from the module of its class or of
    the first base class from ``tunix.models.<family>.model`` (qwix's and ia3_jax's subclasses are skipped).

    Example:
      >>> ia3_jax.tunix.family(llama)
      'llama3'
    """
    for cls in type(model).__mro__:
        match = re.fullmatch(r"tunix\.models\.(\w+)\.model", cls.__module__)
        if match is not None and match.group(1) in FAMILIES:
            return match.group(1)
    module = nnx_vectors.base_type(type(model)).__module__
    raise UnknownModelTypeError(
        f"{type(model).__name__} (module {module}) is not a Tunix model family with a torch key mapping "
        f"that ia3_jax knows: {sorted(FAMILIES)}."
    )


def _params(model: nnx.Module) -> Any:
    return importlib.import_module(FAMILIES[family(model)][0])


def _tunix_version() -> str:
    try:
        return importlib.metadata.version("google-tunix")
    except importlib.metadata.PackageNotFoundError:
        return "of unknown version"


def key_mapping(model: nnx.Module) -> dict[str, tuple[str, Any]]:
    """Tunix's own ``{torch key regex: (nnx key, (permute, reshape))}`` for `model`'s family and config.

    Example:
      >>> mapping = ia3_jax.tunix.key_mapping(llama)    # {torch key regex: (nnx key, (permute, reshape))}
    """
    params_module = _params(model)
    # Tunix's private name: its loader's own torch -> NNX mapping, read rather than copied so that the two
    # cannot drift apart; a Tunix that renames it gets a clear error instead of an AttributeError.
    mapping = getattr(params_module, "_get_key_and_transform_mapping", None)
    if mapping is None:
        raise UnknownModelTypeError(
            f"{params_module.__name__} (google-tunix {_tunix_version()}) has no _get_key_and_transform_mapping, "
            "which ia3_jax reads for the PEFT key names of Tunix models (tested with google-tunix 0.1.7): install "
            "that version, or save the adapter with ia3_jax.nnx.save_adapter instead of the PEFT format."
        )
    return mapping(model.config)  # type: ignore[attr-defined]


def _torch_key(pattern: str, groups: tuple[str, ...]) -> str:
    """The torch key that Tunix's regex `pattern` matches with these layer indices."""
    pattern = re.sub(r"\(\?:[^()]*\)\?", "", pattern)  # optional prefixes, e.g. (?:language_model\.)?
    parts = pattern.split(_LAYER_GROUP)
    key = parts[0] + "".join(g + p for g, p in zip(groups, parts[1:]))
    return key.replace("\\", "")


def _torch_shape(transform: tuple[Any, Any]) -> tuple[int, int]:
    """The torch ``(out, in)`` shape of a staged weight: Tunix's rule transposes it and splits its out axis."""
    permute, reshape = transform
    if tuple(permute or ()) != (1, 0) or not reshape:
        raise LayoutError(f"Tunix's staged rule {transform} is not a transpose then a reshape of the output axis.")
    n_in = reshape[0]
    return math.prod(reshape) // n_in, n_in


def _staged_sites(model: nnx.Module, mapping: dict[str, tuple[str, Any]]) -> dict[_tree.Path, Site]:
    """Sites of the weights that Tunix's preprocessing fuses (Gemma 3: q, k, v into ``q_einsum`` and
    ``kv_einsum``, or ``qkv_einsum``): Tunix's own preprocessing, run on torch output-feature indices."""
    staged = [(p, nnx_key, t) for p, (nnx_key, t) in mapping.items() if nnx_key.startswith(_STAGED)]
    if not staged:
        return {}
    make_preprocess = getattr(_params(model), "_make_preprocess_fn", None)
    if make_preprocess is None:
        raise LayoutError(f"Tunix {family(model)} stages weights {staged[0][1]!r} but has no preprocessing step.")
    modules = dict(nnx_vectors.named_modules(model))
    model_config: Any = model.config  # type: ignore[attr-defined]
    out = {}
    for layer in range(model_config.num_layers):
        tensors, parts, offset = {}, [], 0  # parts: (hf key, offset, size)
        for pattern, nnx_key, transform in staged:
            n_out, n_in = _torch_shape(transform)
            index = np.broadcast_to(np.arange(offset, offset + n_out)[:, None], (n_out, n_in))
            tensors[nnx_key.replace("\\1", str(layer))] = jnp.asarray(index.T.reshape(transform[1]), jnp.int32)
            parts.append((_torch_key(pattern, (str(layer),)).removesuffix(".weight"), offset, n_out))
            offset += n_out
        for key, fused in make_preprocess(model_config)(tensors).items():
            path = tuple(key.split("."))
            module = modules.get(path[:-1])
            if module is None or nnx_vectors.weight_name(module) != path[-1]:
                continue
            fused = np.asarray(fused)
            present = [(k, o, n) for k, o, n in parts if ((fused >= o) & (fused < o + n)).any()]
            index = np.empty_like(fused)
            start = 0
            for _, o, n in present:
                mask = (fused >= o) & (fused < o + n)
                index[mask] = fused[mask] - o + start
                start += n
            out[path[:-1]] = Site(
                path[:-1], tuple(k for k, _, _ in present), None, index, tuple(n for _, _, n in present)
            )
    return out


def sites(model: nnx.Module) -> dict[_tree.Path, Site]:
    """Every module of the Tunix `model` whose weight is made of Hugging Face ``*.weight``s, by Tunix path.

    Example:
      >>> ia3_jax.tunix.sites(llama)[("layers", "0", "attn", "k_proj")].hf_keys
      ('model.layers.0.self_attn.k_proj',)
    """
    mapping = key_mapping(model)
    patterns = [
        (re.compile(_LAYER_GROUP.join(re.escape(p) for p in nnx_key.split("\\1"))), torch_pattern, transform)
        for torch_pattern, (nnx_key, transform) in mapping.items()
        if not nnx_key.startswith(_STAGED)
    ]
    out = {}
    for path, module in nnx_vectors.named_modules(model):
        weight = nnx_vectors.weight_name(module)
        if weight is None:
            continue
        flat = _tree.dotted(path + (weight,))
        for nnx_regex, torch_pattern, transform in patterns:
            match = nnx_regex.fullmatch(flat)
            if match is not None:
                torch_key = _torch_key(torch_pattern, match.groups())
                if torch_key.endswith(".weight"):
                    out[path] = Site(path, (torch_key.removesuffix(".weight"),), transform)
                break
    out.update(_staged_sites(model, mapping))
    return out


def default_config(model: nnx.Module, **overrides: Any) -> IA3Config:
    """PEFT's default IA3 config for the Hugging Face twin of the Tunix `model` (module names as PEFT's).

    Example:
      >>> config = ia3_jax.tunix.default_config(llama)      # PEFT's llama defaults: k_proj, v_proj, down_proj
      >>> config = ia3_jax.tunix.default_config(llama, init_ia3_weights=False)
    """
    from ia3_jax import hf

    model_type = FAMILIES[family(model)][1]
    fields = {
        "target_modules": hf.TARGET_MODULES[model_type],
        "feedforward_modules": hf.FEEDFORWARD_MODULES[model_type],
        "task_type": "CAUSAL_LM",
    }
    return IA3Config(**{**fields, **overrides})


def _targeted(config: IA3Config, hf_key: str) -> bool:
    return config.is_target(hf_key) if not config.is_all_linear else not hf_key.endswith("lm_head")


def tunix_config(config: IA3Config, model: nnx.Module) -> IA3Config:
    """`config` (PEFT's, on Hugging Face module names) as the config that selects the same modules in `model`.

    Example: ``k_proj``/``down_proj`` of a Llama become ``layers.N.attn.k_proj`` / ``layers.N.mlp.down_proj``.
    A Tunix weight fused from several Hugging Face weights (Gemma 3's ``kv_einsum``: k_proj and v_proj, or
    ``qkv_einsum``: q_proj, k_proj and v_proj) is selected when any of them is; `ia3_init` then gives it a
    vector of the targeted parts only.
    """
    known = sites(model).values()
    chosen = [site for site in known if any(_targeted(config, k) for k in site.hf_keys)]
    if not chosen:
        names = sorted({key.rsplit(".", 1)[-1] for site in known for key in site.hf_keys})
        raise TargetError(
            f"target_modules={config.target_modules!r} selects none of the Hugging Face modules that this Tunix "
            f"{family(model)} model maps; their names: {names}. Name some of them (on Hugging Face's names), or take "
            "PEFT's defaults with ia3_jax.tunix.default_config(model)."
        )
    feedforward = []
    for site in chosen:
        flags = {config.is_feedforward(k) for k in site.hf_keys if _targeted(config, k)}
        if True in flags and (site.feature_index is not None or len(flags) > 1):
            raise LayoutError(
                f"{_tree.dotted(site.path)!r} is fused by Tunix from {list(site.hf_keys)}: IA3 can scale its output "
                "features, not its input as feedforward_modules asks."
            )
        if True in flags:
            feedforward.append(_tree.dotted(site.path))
    return config.replace(
        target_modules=[_tree.dotted(s.path) for s in chosen], feedforward_modules=feedforward, exclude_modules=None
    )


def example_inputs(length: int = 4) -> tuple[Any, ...]:
    """``(tokens, positions, cache, attention_mask)`` of one short sequence: a Tunix LM's call arguments.

    Example:
      >>> tokens, positions, cache, mask = ia3_jax.tunix.example_inputs()     # tokens: (1, 4)
      >>> logits, _ = llama(tokens, positions, cache, mask)
    """
    tokens = jnp.zeros((1, length), jnp.int32)
    return tokens, jnp.arange(length)[None], None, jnp.tril(jnp.ones((1, length, length), bool))


def ia3_init(model: M, config: IA3Config, *inputs: Any, **kwargs: Any) -> M:
    """`ia3_jax.nnx.ia3_init` on a Tunix model with PEFT's `config` (Hugging Face module names).

    Without `inputs`, a short token sequence is used for the shape trace (`example_inputs`).

    A weight that Tunix fuses from several Hugging Face weights gets a vector of the parts that `config`
    targets only, as PEFT has vectors on those modules only: Gemma 3's ``qkv_einsum`` (num_heads ==
    num_kv_heads) under ``k_proj``/``v_proj`` gets a ``(2, num_heads, head_dim)`` vector (k, v) and q is
    scaled by exactly one however the vector trains; under PEFT's gemma3 defaults (q_proj, v_proj,
    down_proj) ``kv_einsum`` gets ``(1, num_kv_heads, head_dim)`` (v) and ``qkv_einsum`` ``(2, ...)``
    (q, v). The vector's `Target` records which indices it covers (``Target.slices``).

    Example:
      >>> model = ia3_jax.tunix.ia3_init(llama, ia3_jax.tunix.default_config(llama))
    """
    adapted = _nnx.ia3_init(model, tunix_config(config, model), *(inputs or example_inputs()), **kwargs)
    modules = dict(nnx_vectors.named_modules(adapted))
    variables = nnx_vectors.vector_variables(adapted)
    for path, (site, target, vector) in _vectors(adapted).items():
        slices = _fused_slices(site, target, config)
        if slices is None:
            continue
        axis, kept = slices
        module, narrowed_target = modules[path], dataclasses.replace(target, slices=slices)
        kernel = getattr(module, variables[path].get_metadata(nnx_vectors.WEIGHT_META))
        placement, sharding = _nnx.vector_sharding(kernel, narrowed_target)
        metadata = {**variables[path].get_metadata(), **placement, nnx_vectors.TARGET_META: narrowed_target}
        narrowed = jnp.take(vector, jnp.asarray(kept), axis=target.vector_axes.index(axis))
        if sharding is not None:  # placed like the kernel axes it follows, as `ia3_jax.nnx.ia3_init` places it
            narrowed = jax.device_put(narrowed, sharding)
        setattr(module, nnx_vectors.VECTOR, nnx_vectors.IA3Vector(narrowed, **metadata))
    return adapted


def _fused_slices(site: Site, target: Target, config: IA3Config) -> tuple[int, tuple[int, ...]] | None:
    """For a weight fused from Hugging Face weights of which `config` targets some but not all: the kernel
    axis that stacks them (Gemma 3's S of ``qkv_einsum`` (S, N, D, H)) and its indices of the targeted ones."""
    if site.feature_index is None:
        return None
    targeted = np.array([_targeted(config, k) for k in site.hf_keys])
    if targeted.all():
        return None
    part = np.searchsorted(np.cumsum(site.sizes), site.feature_index, side="right")  # which hf key, per entry
    for axis in target.layout.out_axes:
        line = part[tuple(slice(None) if a == axis else slice(0, 1) for a in range(part.ndim))]
        if (part == line).all():
            return axis, tuple(int(i) for i in np.flatnonzero(targeted[line.ravel()]))
    raise LayoutError(
        f"{target.key!r} is fused by Tunix from {list(site.hf_keys)} along no single output axis: IA3 cannot "
        f"scale only the targeted ones {list(np.asarray(site.hf_keys)[targeted])}; target all of them."
    )


def _torch_index(target: Target, site: Site) -> np.ndarray:
    """For each entry of the Tunix vector, the index of its entry in PEFT's flattened vector(s) of the site.

    The torch weight is ``(out, in)``; an array of its output (or input) feature indices goes through
    Tunix's permute and reshape like the weight (or its preprocessing, for fused weights), and is
    then read along the vector's axes.
    """
    layout, shape, feedforward = target.layout, target.kernel_shape, target.feedforward
    if site.feature_index is not None:
        if feedforward:
            raise LayoutError(f"module {target.key!r} is fused by Tunix from {list(site.hf_keys)}: no input vector.")
        index = site.feature_index
    else:
        n_out = math.prod(layout.feature_shape(shape, False))
        n_in = math.prod(layout.feature_shape(shape, True))
        index = np.broadcast_to(np.arange(n_in)[None, :] if feedforward else np.arange(n_out)[:, None], (n_out, n_in))
        permute, reshape = site.transform or (None, None)
        if permute:
            index = np.transpose(index, permute)
        if reshape:
            index = index.reshape(reshape)
    if index.shape != shape or layout.stack_axes or layout.in_features is not None:
        raise LayoutError(
            f"module {target.key!r}: Tunix's rule {site.transform} maps the torch weight(s) of {list(site.hf_keys)} "
            f"to {index.shape}, not to its weight {shape}."
        )
    axes = layout.in_axes if feedforward else layout.out_axes
    rest = tuple(a for a in range(len(shape)) if a not in axes)
    moved = np.transpose(index, axes + rest)
    read = moved[(Ellipsis,) + (0,) * len(rest)]
    if not (moved == read.reshape(read.shape + (1,) * len(rest))).all():
        raise LayoutError(f"module {target.key!r}: Tunix's rule mixes the features IA3 scales with others.")
    if target.slices is not None:  # a vector of some parts of a fused weight (`ia3_init`)
        axis, kept = target.slices
        read = np.take(read, kept, axis=target.vector_axes.index(axis))
    return read


def _vectors(model: nnx.Module) -> dict[_tree.Path, tuple[Site, Target, Any]]:
    known = sites(model)
    out = {}
    for path, variable in nnx_vectors.vector_variables(model).items():
        if path not in known:
            raise AdapterMismatchError(
                f"IA3 vector at {_tree.dotted(path)!r} is on a module with no Hugging Face twin."
            )
        out[path] = (known[path], variable.get_metadata(nnx_vectors.TARGET_META), variable.get_value())
    return out


def _flat_size(site: Site, index: np.ndarray) -> int:
    """The length of PEFT's vectors of the site's Hugging Face modules, concatenated (`index` from `_torch_index`)."""
    return sum(site.sizes) if site.sizes else index.size


def _split(site: Site, target: Target, flat: np.ndarray) -> dict[str, np.ndarray]:
    bounds = np.cumsum((0,) + (site.sizes or (math.prod(target.vector_shape),)))
    return {k: flat[a:b] for k, a, b in zip(site.hf_keys, bounds[:-1], bounds[1:])}


def _parts(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every vector of the adapted Tunix model as PEFT's flat vectors, by Hugging Face module path (of a
    fused weight, the parts its vector covers)."""
    out = {}
    for site, target, vector in _vectors(model).values():
        _bank.refuse_bank(target.key, target.vector_shape, np.shape(vector), "a PEFT export (hf_adapter / save_peft)")
        index = _torch_index(target, site)
        size = _flat_size(site, index)
        flat = np.ones(size, np.float32)
        flat[index] = np.asarray(vector, np.float32)
        covered = _split(site, target, np.isin(np.arange(size), index))
        out.update({k: v for k, v in _split(site, target, flat).items() if covered[k].any()})
    return out


def _write_parts(model: nnx.Module, parts: dict[str, np.ndarray]) -> None:
    """Sets the model's vectors from PEFT's flat vectors by Hugging Face path (a missing part: ones)."""
    changes = {}
    for path, (site, target, _) in _vectors(model).items():
        index = _torch_index(target, site)
        pieces = []
        size = _flat_size(site, index)
        for key, piece in _split(site, target, np.ones(size, np.float32)).items():
            given = parts.get(key, piece)
            if given.size != piece.size:
                raise AdapterMismatchError(f"{key!r}: {given.size} entries, the Tunix module needs {piece.size}.")
            pieces.append(np.asarray(given, np.float32).ravel())
        changes[path + (_tree.VECTOR,)] = np.concatenate(pieces)[index]
    _nnx.set_adapter(model, _tree.updated({}, changes))


def hf_adapter(model: nnx.Module, config: IA3Config | None = None) -> dict[str, Any]:
    """The adapted Tunix model's vectors as an adapter tree on Hugging Face module paths (flat 1-D vectors).

    With `config`, parts of fused weights that it does not target are left out where they are ones (a
    model adapted by `ia3_jax.nnx.ia3_init` has vectors over whole fused weights), and raise
    `AdapterMismatchError` where they are not: PEFT would have no module to put them on.

    Example:
      >>> tree = ia3_jax.tunix.hf_adapter(model, config)    # model.layers.0.self_attn.k_proj.ia3_l: (out,), ...
    """
    parts = _parts(model)
    if config is not None:
        stray = sorted(k for k, v in parts.items() if not _targeted(config, k) and not (v == 1).all())
        if stray:
            raise AdapterMismatchError(
                f"the model's vectors of {stray[:4]} are not ones, but target_modules={config.target_modules!r} does "
                "not target them, so PEFT would drop them: save with the config the model was adapted with."
            )
        parts = {k: v for k, v in parts.items() if _targeted(config, k)}
    return _tree.updated({}, {tuple(k.split(".")) + (_tree.VECTOR,): v for k, v in parts.items()})


def save_peft(path: str | Path, model: nnx.Module, config: IA3Config, *, overwrite: bool = False) -> Path:
    """Writes the adapted Tunix model's vectors as PEFT's adapter for its Hugging Face twin.

    `config` is PEFT's (Hugging Face names), as given to `ia3_init`. ``PeftModel.from_pretrained(
    LlamaForCausalLM(...), path)`` then gives the Tunix model's logits. An adapter already in `path` is
    replaced only with `overwrite` (`ia3_jax.save_peft`).

    Example:
      >>> ia3_jax.tunix.save_peft("peft_out", model, config)    # config: PEFT's, as given to ia3_init
      >>> # PyTorch: PeftModel.from_pretrained(LlamaForCausalLM(...), "peft_out")
    """
    return peft_io.save_peft(path, hf_adapter(model, config), config, overwrite=overwrite)


def load_peft(path: str | Path, model: M, *inputs: Any) -> tuple[M, IA3Config]:
    """A clone of the Tunix `model` carrying the PEFT adapter at `path`; returns ``(model, PEFT's config)``.

    Each PEFT vector (``(out, 1)`` / ``(1, in)``) is mapped onto its Tunix module through Tunix's
    key mapping and reshaped to the Tunix vector (``(num_kv_heads, head_dim)`` for ``k_proj``; for
    Gemma 3's fused ``kv_einsum`` / ``qkv_einsum``, a vector of the parts the adapter targets, in
    q, k, v order, e.g. ``(2, num_heads, head_dim)`` for k_proj and v_proj on ``qkv_einsum``).

    Example:
      >>> model, config = ia3_jax.tunix.load_peft("peft_out", llama)
      >>> logits, _ = model(tokens, positions, None, mask)
    """
    directory = Path(path).expanduser()
    config = peft_io.read_peft_config(directory)
    _, _, tensors = peft_io.read_tensors(directory)
    vectors = {
        key.removeprefix(peft_io.PEFT_KEY_PREFIX).removesuffix("." + _tree.VECTOR): np.asarray(t, np.float32).ravel()
        for key, t in tensors.items()
    }
    adapted = ia3_init(model, config.replace(init_ia3_weights=True), *inputs)  # ones, then the file's values
    targeted = {k for site, _, _ in _vectors(adapted).values() for k in site.hf_keys if _targeted(config, k)}
    if set(vectors) != targeted:
        raise AdapterMismatchError(
            f"{str(directory)!r}: the file's vectors {sorted(set(vectors) - targeted)[:4]} have no target in this "
            f"Tunix model, or its targets {sorted(targeted - set(vectors))[:4]} have no vector in the file."
        )
    _write_parts(adapted, vectors)
    return adapted, config
