"""`IA3Config`: PEFT's IA3 configuration, immutable and hashable, with PEFT's module matching.

Module paths are the '.'-joined keys of a Flax param tree, e.g. ``encoder.block.0.layer.1.DenseReluDense.wo``
(Hugging Face Flax models use the same names as their PyTorch twins, so PEFT patterns carry over).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from typing import Any

from ia3_jax._src.errors import IA3ConfigError

PatternSpec = tuple[str, ...] | str | None

TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)

# Keys PEFT writes that we recompute on save.
_PEFT_DERIVED_KEYS = ("peft_type", "peft_version")


def _as_patterns(name: str, value: Any) -> PatternSpec:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Iterable):
        items = list(value)
        bad = [v for v in items if not isinstance(v, str)]
        if bad:
            raise IA3ConfigError(f"`{name}` must hold module names (str); got {bad!r}.")
        # Sets from PEFT have no order: sort so equal configs hash and serialise alike.
        return tuple(sorted(dict.fromkeys(items)))
    raise IA3ConfigError(
        f"`{name}` must be a list of module names, a regex string or None; got {type(value).__name__}."
    )


@dataclasses.dataclass(frozen=True)
class IA3Config:
    """IA3 hyper-parameters, field for field PEFT's ``IA3Config``.

    Lists become sorted tuples so that the config is hashable (usable as a static argument of
    `jax.jit`); strings stay regexes (`re.fullmatch` on the '.'-joined module path).

    Attributes:
      target_modules: modules that get a vector. List: exact path or '.'-suffix (``"k"`` matches
        ``"...SelfAttention.k"``); str: regex, full match; ``"all-linear"``: every 2-D kernel but the
        output layer; None: the model type's default (`ia3_jax.hf`).
      exclude_modules: modules never targeted, same matching rules.
      feedforward_modules: targets whose *input* is scaled (the others have their output scaled).
        List: plain suffix match (PEFT's rule, no '.' boundary); str: regex full match.
      fan_in_fan_out: the kernels are stored (out, in), as Hugging Face's ``FlaxConv1D`` (GPT-2).
      modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head).
      init_ia3_weights: ones (identity) when True; standard normal when False (needs an ``rng``).
      task_type: PEFT task type, e.g. ``"SEQ_CLS"`` or ``"CAUSAL_LM"``.

    Example:
      >>> config = IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"])
      >>> IA3Config.from_json(config.to_json()) == config
      True
    """

    target_modules: PatternSpec = None
    exclude_modules: PatternSpec = None
    feedforward_modules: PatternSpec = None
    fan_in_fan_out: bool = False
    modules_to_save: tuple[str, ...] | None = None
    init_ia3_weights: bool = True
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self):
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            object.__setattr__(self, name, _as_patterns(name, getattr(self, name)))
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                raise IA3ConfigError(
                    f"`modules_to_save` must be a list of module names, not the string {self.modules_to_save!r}: "
                    f"write [{self.modules_to_save!r}]."
                )
            object.__setattr__(self, "modules_to_save", _as_patterns("modules_to_save", self.modules_to_save))
        for name in ("fan_in_fan_out", "init_ia3_weights", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise IA3ConfigError(f"`{name}` must be a bool; got {getattr(self, name)!r}.")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise IA3ConfigError(f"`task_type` {self.task_type!r} is not one of PEFT's task types {TASK_TYPES}.")
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as err:
                    raise IA3ConfigError(f"`{name}` is not a valid regex ({err}): {value!r}.") from None
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, tuple) and isinstance(targets, tuple) and not set(ff) <= set(targets):
            raise IA3ConfigError(
                f"`feedforward_modules` should be a subset of `target_modules`: {sorted(set(ff) - set(targets))} "
                f"are not in target_modules={list(targets)}. Add them to target_modules or drop them."
            )
        if isinstance(targets, tuple) and not targets:
            raise IA3ConfigError(
                "`target_modules` is empty: name at least one module, or leave it None for the defaults."
            )

    def replace(self, **changes: Any) -> IA3Config:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # --- matching (PEFT's rules, on '.'-joined module paths) ---

    @property
    def is_all_linear(self) -> bool:
        """``target_modules="all-linear"`` (any case, as PEFT): every 2-D kernel but the output layer."""
        return isinstance(self.target_modules, str) and self.target_modules.lower() == "all-linear"

    def is_excluded(self, key: str) -> bool:
        return _matches(self.exclude_modules, key)

    def is_module_to_save(self, key: str) -> bool:
        """Whether `key` is a ``modules_to_save`` module or lies inside one.

        Entries are plain module names, matched as whole '.'-separated components (``"lin2"``
        matches ``"lin2"`` and ``"head.lin2.inner"``, not ``"lin20"``); they are escaped, so a name
        such as ``"lin("`` means itself and never a regex.
        """
        return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in self.modules_to_save or ())

    def is_target(self, key: str) -> bool:
        """Whether PEFT would put an IA3 layer on the module at `key` (all-linear aside)."""
        if self.is_excluded(key) or self.is_module_to_save(key):
            return False
        return _matches(self.target_modules, key)

    def is_feedforward(self, key: str) -> bool:
        ff = self.feedforward_modules
        if ff is None:
            return False
        if isinstance(ff, str):
            return re.fullmatch(ff, key) is not None
        return any(key.endswith(t) for t in ff)

    # --- PEFT's adapter_config.json ---

    def to_dict(self) -> dict[str, Any]:
        """The fields as PEFT writes them in ``adapter_config.json`` (tuples as lists)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        out["peft_type"] = "IA3"
        out["auto_mapping"] = None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IA3Config:
        """Reads PEFT's ``adapter_config.json`` contents; unknown keys are an error."""
        data = dict(data)
        peft_type = data.pop("peft_type", "IA3")
        if peft_type != "IA3":
            raise IA3ConfigError(f"`peft_type` is {peft_type!r}: this is not an IA3 adapter config.")
        data.pop("peft_version", None)
        data.pop("auto_mapping", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise IA3ConfigError(
                f"Unknown IA3Config fields {unknown}; IA3 knows {sorted(known | set(_PEFT_DERIVED_KEYS))}. "
                "(LoRA-only fields such as `r` or `layers_to_transform` do not exist for IA3.)"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IA3Config:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise IA3ConfigError(f"adapter config is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise IA3ConfigError(f"adapter config must be a JSON object, got {type(data).__name__}.")
        return cls.from_dict(data)


def suffix_regex(names: Iterable[str]) -> str:
    """The regex (for `re.fullmatch`) of PEFT's `feedforward_modules` list rule: the path ends with a name.

    Lets a feedforward list that is no subset of `target_modules` keep PEFT's meaning in a valid config.
    """
    return ".*(?:" + "|".join(re.escape(n) for n in names) + ")"


def _matches(patterns: PatternSpec, key: str) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, key) is not None
    return key in patterns or any(key.endswith("." + p) for p in patterns)

