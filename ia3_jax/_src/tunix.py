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

import importlib
import math
import re
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ia3_jax._src import nnx as _nnx
from ia3_jax._src import peft_io
from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config
from ia3_jax._src.errors import AdapterMismatchError, LayoutError, UnknownModelTypeError
from ia3_jax._src.targets import Target

M = TypeVar("M", bound=nnx.Module)

# Tunix family -> (module holding its torch key mapping, PEFT's model_type of the Hugging Face twin).
FAMILIES: dict[str, tuple[str, str]] = {
    "llama3": ("tunix.models.llama3.params", "llama"),
    "qwen2": ("tunix.models.qwen2.params", "qwen2"),
    "qwen3": ("tunix.models.qwen3.params", "qwen3"),
}
_LAYER_GROUP = "([0-9]+)"  # the only capture group Tunix's torch key patterns use


class Site(NamedTuple):
    """A Tunix module that a Hugging Face module maps onto.

    Attributes:
      path: the Tunix module path, e.g. ``("layers", "0", "attn", "k_proj")``.
      hf_key: the Hugging Face module path, e.g. ``"model.layers.0.self_attn.k_proj"``.
      transform: Tunix's ``(permute, reshape)`` rule from the torch weight ``(out, in)`` to the NNX weight.
    """

    path: _tree.Path
    hf_key: str
    transform: tuple[Any, Any] | None


def family(model: nnx.Module) -> str:
    """The Tunix family of `model` (``"llama3"``, ``"qwen3"``, ...), read from its class's module."""
    module = _nnx.base_type(type(model)).__module__
    match = re.fullmatch(r"tunix\.models\.(\w+)\.model", module)
    if match is None or match.group(1) not in FAMILIES:
        raise UnknownModelTypeError(
            f"{type(model).__name__} (module {module}) is not a Tunix model family with a plain torch key mapping "
            f"that ia3_jax knows: {sorted(FAMILIES)}. (Gemma 3 fuses k and v into one kv_einsum in a preprocessing "
            "step outside its key mapping, so PEFT's v_proj vector has no module of its own there.)"
        )
    return match.group(1)


def key_mapping(model: nnx.Module) -> dict[str, tuple[str, Any]]:
    """Tunix's own ``{torch key regex: (nnx key, (permute, reshape))}`` for `model`'s family and config."""
    params = importlib.import_module(FAMILIES[family(model)][0])
    return params._get_key_and_transform_mapping(model.config)  # type: ignore[attr-defined]


def _torch_key(pattern: str, groups: tuple[str, ...]) -> str:
    """The torch key that Tunix's regex `pattern` matches with these layer indices."""
    pattern = re.sub(r"\(\?:[^()]*\)\?", "", pattern)  # optional prefixes, e.g. (?:language_model\.)?
    parts = pattern.split(_LAYER_GROUP)
    key = parts[0] + "".join(g + p for g, p in zip(groups, parts[1:]))
    return key.replace("\\", "")


def sites(model: nnx.Module) -> dict[_tree.Path, Site]:
    """Every module of the Tunix `model` whose weight is a Hugging Face ``*.weight``, by Tunix path."""
    mapping = key_mapping(model)
    patterns = [
        (re.compile(_LAYER_GROUP.join(re.escape(p) for p in nnx_key.split("\\1"))), torch_pattern, transform)
        for torch_pattern, (nnx_key, transform) in mapping.items()
    ]
    out = {}
    for path, module in _nnx.named_modules(model):
        weight = _nnx.weight_name(module)
        if weight is None:
            continue
        flat = _tree.dotted(path + (weight,))
        for nnx_regex, torch_pattern, transform in patterns:
            match = nnx_regex.fullmatch(flat)
            if match is not None:
                torch_key = _torch_key(torch_pattern, match.groups())
                if torch_key.endswith(".weight"):
                    out[path] = Site(path, torch_key.removesuffix(".weight"), transform)
                break
    return out


def default_config(model: nnx.Module, **overrides: Any) -> IA3Config:
    """PEFT's default IA3 config for the Hugging Face twin of the Tunix `model` (module names as PEFT's)."""
    from ia3_jax import hf

    model_type = FAMILIES[family(model)][1]
    fields = {
        "target_modules": hf.TARGET_MODULES[model_type],
        "feedforward_modules": hf.FEEDFORWARD_MODULES[model_type],
        "task_type": "CAUSAL_LM",
    }
    return IA3Config(**{**fields, **overrides})


def tunix_config(config: IA3Config, model: nnx.Module) -> IA3Config:
    """`config` (PEFT's, on Hugging Face module names) as the config that selects the same modules in `model`.

    Example: ``k_proj``/``down_proj`` of a Llama become ``layers.N.attn.k_proj`` / ``layers.N.mlp.down_proj``.
    """
    chosen = [
        site
        for site in sites(model).values()
        if (config.is_target(site.hf_key) if not config.is_all_linear else not site.hf_key.endswith("lm_head"))
    ]
    if not chosen:
        raise AdapterMismatchError(
            f"target_modules={config.target_modules!r} selects none of the Hugging Face modules that this Tunix "
            f"{family(model)} model maps (e.g. {next(iter(sites(model).values())).hf_key!r})."
        )
    return config.replace(
        target_modules=[_tree.dotted(s.path) for s in chosen],
        feedforward_modules=[_tree.dotted(s.path) for s in chosen if config.is_feedforward(s.hf_key)],
        exclude_modules=None,
    )


def example_inputs(length: int = 4) -> tuple[Any, ...]:
    """``(tokens, positions, cache, attention_mask)`` of one short sequence: a Tunix LM's call arguments."""
    tokens = jnp.zeros((1, length), jnp.int32)
    return tokens, jnp.arange(length)[None], None, jnp.tril(jnp.ones((1, length, length), bool))


def ia3_init(model: M, config: IA3Config, *inputs: Any, **kwargs: Any) -> M:
    """`ia3_jax.nnx.ia3_init` on a Tunix model with PEFT's `config` (Hugging Face module names).

    Without `inputs`, a short token sequence is used for the shape trace (`example_inputs`).

    Example:
      >>> model = ia3_jax.tunix.ia3_init(llama, ia3_jax.tunix.default_config(llama))
    """
    return _nnx.ia3_init(model, tunix_config(config, model), *(inputs or example_inputs()), **kwargs)


def _torch_index(target: Target, transform: tuple[Any, Any] | None) -> np.ndarray:
    """For each entry of the Tunix vector, the index of its entry in PEFT's flattened vector.

    The torch weight is ``(out, in)``; an array of its output (or input) feature indices goes through
    Tunix's permute and reshape like the weight, and is then read along the vector's axes.
    """
    layout, shape, feedforward = target.layout, target.kernel_shape, target.feedforward
    n_out, n_in = math.prod(layout.feature_shape(shape, False)), math.prod(layout.feature_shape(shape, True))
    index = np.broadcast_to(np.arange(n_in)[None, :] if feedforward else np.arange(n_out)[:, None], (n_out, n_in))
    permute, reshape = transform or (None, None)
    if permute:
        index = np.transpose(index, permute)
    if reshape:
        index = index.reshape(reshape)
    if index.shape != shape or layout.stack_axes or layout.in_features is not None:
        raise LayoutError(
            f"module {target.key!r}: Tunix's rule {transform} maps a torch (out, in) = ({n_out}, {n_in}) weight to "
            f"{index.shape}, not to its weight {shape}."
        )
    axes = layout.in_axes if feedforward else layout.out_axes
    rest = tuple(a for a in range(len(shape)) if a not in axes)
    return np.transpose(index, axes + rest)[(Ellipsis,) + (0,) * len(rest)]


def _vectors(model: nnx.Module) -> dict[_tree.Path, tuple[Site, Target, Any]]:
    known = sites(model)
    out = {}
    for path, variable in _nnx.vector_variables(model).items():
        if path not in known:
            raise AdapterMismatchError(
                f"IA3 vector at {_tree.dotted(path)!r} is on a module with no Hugging Face twin."
            )
        out[path] = (known[path], variable.get_metadata(_nnx.TARGET_META), variable.get_value())
    return out


def hf_adapter(model: nnx.Module) -> dict[str, Any]:
    """The adapted Tunix model's vectors as an adapter tree on Hugging Face module paths (flat 1-D vectors)."""
    changes = {}
    for site, target, vector in _vectors(model).values():
        flat = np.empty(math.prod(target.vector_shape), np.float32)
        flat[_torch_index(target, site.transform)] = np.asarray(vector, np.float32)
        changes[tuple(site.hf_key.split(".")) + (_tree.VECTOR,)] = flat
    return _tree.updated({}, changes)


def save_peft(path: str | Path, model: nnx.Module, config: IA3Config) -> Path:
    """Writes the adapted Tunix model's vectors as PEFT's adapter for its Hugging Face twin.

    `config` is PEFT's (Hugging Face names), as given to `ia3_init`. ``PeftModel.from_pretrained(
    LlamaForCausalLM(...), path)`` then gives the Tunix model's logits.
    """
    return peft_io.save_peft(path, hf_adapter(model), config)


def load_peft(path: str | Path, model: M, *inputs: Any) -> tuple[M, IA3Config]:
    """A clone of the Tunix `model` carrying the PEFT adapter at `path`; returns ``(model, PEFT's config)``.

    Each PEFT vector (``(out, 1)`` / ``(1, in)``) is mapped onto its Tunix module through Tunix's
    key mapping and reshaped to the Tunix vector (``(num_kv_heads, head_dim)`` for ``k_proj``).

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
    by_hf = {site.hf_key: (path_, site, target) for path_, (site, target, _) in _vectors(adapted).items()}
    if set(vectors) != set(by_hf):
        raise AdapterMismatchError(
            f"{str(directory)!r}: the file's vectors {sorted(set(vectors) - set(by_hf))[:4]} have no target in this "
            f"Tunix model, or its targets {sorted(set(by_hf) - set(vectors))[:4]} have no vector in the file."
        )
    changes = {}
    for key, flat in vectors.items():
        path_, site, target = by_hf[key]
        index = _torch_index(target, site.transform)
        if flat.size != index.size:
            raise AdapterMismatchError(
                f"{key!r}: {flat.size} entries in the file, the Tunix module needs {index.size}."
            )
        changes[path_ + (_tree.VECTOR,)] = flat[index]
    _nnx.set_adapter(adapted, _tree.updated({}, changes))
    return adapted, config
