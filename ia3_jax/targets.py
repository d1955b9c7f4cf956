"""Which modules of a param tree an `IA3Config` targets, with PEFT's rules and loud failures."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from ia3_jax import _tree
from ia3_jax.config import IA3Config
from ia3_jax.quant import kernel_shape

# Hugging Face names of output layers that "all-linear" leaves alone, as PEFT does.
_OUTPUT_LAYERS = ("lm_head",)
_CLASSIFIER_LAYERS = ("classifier", "score")


class TargetError(ValueError):
    """The config's module patterns do not fit the param tree."""


def _listing(paths, limit: int = 40) -> str:
    keys = [_tree.dotted(p) for p in paths]
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _all_linear(layers: dict[_tree.Path, Mapping[str, Any]], config: IA3Config) -> set[_tree.Path]:
    linear = {p for p, node in layers.items() if len(kernel_shape(node["kernel"])) == 2}
    skip = set(_OUTPUT_LAYERS)
    if config.task_type == "SEQ_CLS":
        skip |= set(_CLASSIFIER_LAYERS)
    return {p for p in linear if p[-1] not in skip}


def resolve_targets(params: Mapping[str, Any], config: IA3Config) -> dict[_tree.Path, bool]:
    """Targeted module paths, each mapped to whether it is feedforward (input-scaled).

    Raises `TargetError` naming the problem: no `target_modules`, nothing matched (with the paths
    that exist), a match that is not a layer with a kernel, or a `modules_to_save` entry that
    matches nothing. Warns for list entries or patterns that match nothing while others do.
    """
    if config.target_modules is None:
        raise TargetError(
            "IA3Config.target_modules is None. Name the modules to adapt, e.g. target_modules=['k', 'v', 'wo'], "
            "or take a Hugging Face model's defaults with ia3_jax.hf.default_config(model)."
        )
    all_modules = dict(_tree.modules(params))
    layers = {p: node for p, node in all_modules.items() if "kernel" in node}
    if config.is_all_linear:
        chosen = {
            p for p in _all_linear(layers, config) if not config.is_excluded(_tree.dotted(p))
            and not config.is_module_to_save(_tree.dotted(p))
        }
    else:
        chosen = {p for p in all_modules if config.is_target(_tree.dotted(p))}
    not_layers = sorted(p for p in chosen if p not in layers)
    if not_layers:
        raise TargetError(
            f"target_modules={config.target_modules!r} matches modules that are not layers with a kernel "
            f"(an embedding, a norm or a block): {_listing(not_layers)}. Target their Dense/Conv children instead."
        )
    if not chosen:
        raise TargetError(
            f"target_modules={config.target_modules!r} matches no module "
            f"(exclude_modules={config.exclude_modules!r}, modules_to_save={config.modules_to_save!r}). "
            f"Layers with a kernel in these params: {_listing(sorted(layers))}."
        )
    keys = [_tree.dotted(p) for p in chosen]
    if isinstance(config.target_modules, tuple):
        idle = [t for t in config.target_modules if not any(k == t or k.endswith("." + t) for k in keys)]
        if idle:
            warnings.warn(f"IA3 target_modules entries {idle} match no module and are ignored.", stacklevel=3)
    if config.exclude_modules is not None and not any(config.is_excluded(_tree.dotted(p)) for p in all_modules):
        warnings.warn(f"exclude_modules={config.exclude_modules!r} excludes no module.", stacklevel=3)
    ff_keys = [k for k in keys if config.is_feedforward(k)]
    if isinstance(config.feedforward_modules, tuple):
        idle = [f for f in config.feedforward_modules if not any(k.endswith(f) for k in keys)]
        if idle:
            warnings.warn(f"IA3 feedforward_modules entries {idle} match no targeted module.", stacklevel=3)
    elif isinstance(config.feedforward_modules, str) and not ff_keys:
        warnings.warn(f"feedforward_modules={config.feedforward_modules!r} matches no targeted module.", stacklevel=3)
    for entry in config.modules_to_save or ():
        if not modules_to_save_roots(params, config.replace(modules_to_save=[entry])):
            raise TargetError(
                f"modules_to_save entry {entry!r} matches no module; modules in these params: "
                f"{_listing(sorted(all_modules))}."
            )
    return {p: config.is_feedforward(_tree.dotted(p)) for p in sorted(chosen)}


def modules_to_save_roots(params: Mapping[str, Any], config: IA3Config) -> list[_tree.Path]:
    """The outermost modules that `config.modules_to_save` selects."""
    roots: list[_tree.Path] = []
    for path, _ in _tree.modules(params):
        if _tree.under(path, roots):
            continue
        if config.is_module_to_save(_tree.dotted(path)):
            roots.append(path)
    return roots
