"""Hugging Face Flax models: PEFT's IA3 defaults by ``model_type``, parameter counts, the FlaxT5 fix.

Hugging Face Flax models (transformers 4.57.x, the last line with Flax) name their params as their
PyTorch twins name their modules, so PEFT's per-architecture defaults carry over unchanged:

  >>> from transformers import FlaxGPT2LMHeadModel, GPT2Config
  >>> model = FlaxGPT2LMHeadModel(GPT2Config())   # GPT-2 small, 124M
  >>> config = default_config(model)          # c_attn, mlp.c_proj; fan_in_fan_out=True (FlaxConv1D)
  >>> params = ia3_jax.ia3_init(model.params, config)
  >>> print_trainable_parameters(params)
  trainable params: 64,512 || all params: 124,504,320 || trainable%: 0.0518
  >>> logits = ia3_jax.apply_fn(model.__call__, config)(input_ids, params=params).logits

The FlaxT5 fix: transformers 4.57.6's ``FlaxT5Attention._relative_position_bucket`` (and its copies in
FlaxLongT5's three attention classes; FlaxMT5 reuses FlaxT5's modules) calls
``jnp.clip(x, a_max=...)``, a keyword that JAX >= 0.10 removed, so every T5/MT5/LongT5 call fails.
Importing this module replaces that one static method, and nothing else, with an equivalent
that uses ``jnp.minimum`` -- only when the running JAX lacks ``a_max``, once (idempotent), and says
so on the ``ia3_jax.hf`` logger; `patch_flax_t5` does the same explicitly. ``jnp.clip`` itself is
never touched. ``import ia3_jax`` alone never imports transformers.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ia3_jax._src import tree as _tree
from ia3_jax._src.config import IA3Config, suffix_regex
from ia3_jax._src.errors import IA3ConfigError, StructureError, UnknownModelTypeError
from ia3_jax._src.partition import split

__all__ = [
    "FAN_IN_FAN_OUT_MODEL_TYPES",
    "FEEDFORWARD_MODULES",
    "TARGET_MODULES",
    "TORCH_BUFFERS",
    "ParameterCount",
    "default_config",
    "model_type_of",
    "needs_flax_t5_patch",
    "patch_flax_t5",
    "print_trainable_parameters",
    "resolve",
    "trainable_parameters",
]

_log = logging.getLogger(__name__)

# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING (peft 0.21), as data.
TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "t5": ("k", "v", "wo"),
    "mt5": ("k", "v", "wi_1"),
    "gpt2": ("c_attn", "mlp.c_proj"),
    "bloom": ("query_key_value", "mlp.dense_4h_to_h"),
    "roberta": ("key", "value", "output.dense"),
    "opt": ("q_proj", "k_proj", "fc2"),
    "gptj": ("q_proj", "v_proj", "fc_out"),
    "gpt_neox": ("query_key_value", "dense_4h_to_h"),
    "gpt_neo": ("q_proj", "v_proj", "c_proj"),
    "bart": ("q_proj", "v_proj", "fc2"),
    "gpt_bigcode": ("c_attn", "mlp.c_proj"),
    "llama": ("k_proj", "v_proj", "down_proj"),
    "llama4": ("q_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"),
    "mixtral": ("k_proj", "v_proj", "w2"),
    "bert": ("key", "value", "output.dense"),
    "deberta-v2": ("key_proj", "value_proj", "output.dense"),
    "deberta": ("in_proj", "output.dense"),
    "RefinedWebModel": ("query_key_value", "dense_4h_to_h"),
    "RefinedWeb": ("query_key_value", "dense_4h_to_h"),
    "falcon": ("query_key_value", "dense_4h_to_h"),
    "phi": ("q_proj", "v_proj", "fc2"),
    "gemma": ("q_proj", "v_proj", "down_proj"),
    "gemma2": ("q_proj", "v_proj", "down_proj"),
    "gemma3_text": ("q_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"),
    "qwen3": ("q_proj", "v_proj", "down_proj"),
}

# PEFT's TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING (peft 0.21), as data.
FEEDFORWARD_MODULES: dict[str, tuple[str, ...]] = {
    "t5": ("wo",),
    "mt5": (),
    "gpt2": ("mlp.c_proj",),
    "bloom": ("mlp.dense_4h_to_h",),
    "roberta": ("output.dense",),
    "opt": ("fc2",),
    "gptj": ("fc_out",),
    "gpt_neox": ("dense_4h_to_h",),
    "gpt_neo": ("c_proj",),
    "bart": ("fc2",),
    "gpt_bigcode": ("mlp.c_proj",),
    "llama": ("down_proj",),
    "llama4": ("down_proj",),
    "mistral": ("down_proj",),
    "mixtral": ("w2",),
    "bert": ("output.dense",),
    "deberta-v2": ("output.dense",),
    "deberta": ("output.dense",),
    "RefinedWebModel": ("dense_4h_to_h",),
    "RefinedWeb": ("dense_4h_to_h",),
    "falcon": ("dense_4h_to_h",),
    "phi": ("fc2",),
    "gemma": ("down_proj",),
    "gemma2": ("down_proj",),
    "gemma3_text": ("down_proj",),
    "qwen2": ("down_proj",),
    "qwen3": ("down_proj",),
}

# Model types whose Flax layers are ``FlaxConv1D``, kernel stored (out, in): GPT-2 only in 4.57.6.
FAN_IN_FAN_OUT_MODEL_TYPES: frozenset[str] = frozenset({"gpt2"})

# Flax params that PyTorch keeps as buffers, so PEFT's "all params" leaves them out.
TORCH_BUFFERS: frozenset[str] = frozenset({"final_logits_bias"})


# --- configs ---


def model_type_of(model_or_config: Any) -> str:
    """The ``model_type`` of a Hugging Face Flax model, its ``PretrainedConfig``, or the string itself.

    Example:
      >>> model_type_of(model)            # a FlaxGPT2LMHeadModel (or its config, or "gpt2")
      'gpt2'
    """
    if isinstance(model_or_config, str):
        return model_or_config
    hf_config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(hf_config, "model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise UnknownModelTypeError(
            f"expected a Hugging Face Flax model, its PretrainedConfig or a model_type string; got "
            f"{type(model_or_config).__name__}, which has no `model_type`. For other models build "
            "IA3Config(target_modules=..., feedforward_modules=...) directly."
        )
    return model_type


def _table_entry(table: Mapping[str, tuple[str, ...]], model_type: str, field: str, example: str) -> tuple[str, ...]:
    if model_type not in table:
        raise UnknownModelTypeError(
            f"model_type {model_type!r} has no IA3 defaults in PEFT's table (known: {sorted(table)}). "
            f"Set `{field}` yourself, e.g. default_config(model, {example})."
        )
    return table[model_type]


def _feedforward_pattern(feedforward: tuple[str, ...], targets: Any) -> tuple[str, ...] | str:
    """Default `feedforward` entries as a pattern `IA3Config` accepts next to user `targets`, PEFT's meaning kept.

    PEFT fills the default without its subset check: on GPT-2, ``target_modules=["c_attn", "c_proj"]``
    keeps ``feedforward_modules=["mlp.c_proj"]``, which then makes ``mlp.c_proj`` (not ``attn.c_proj``)
    feedforward. Entries that no targeted path can end with (neither is a suffix of the other) are
    dropped; if the rest is still no subset of the targets, it becomes the regex of PEFT's suffix rule.
    """
    if not isinstance(targets, tuple):
        return feedforward
    feedforward = tuple(f for f in feedforward if any(t.endswith(f) or f.endswith(t) for t in targets))
    if set(feedforward) <= set(targets):
        return feedforward
    return suffix_regex(feedforward)


def resolve(config: IA3Config, model_or_config: Any) -> IA3Config:
    """`config` with its None module fields taken from PEFT's table for the model's ``model_type``.

    As PEFT's ``_prepare_adapter_config``: ``target_modules=None`` and ``feedforward_modules=None``
    are each filled from the tables; `fan_in_fan_out` is set for ``FlaxConv1D`` families (GPT-2),
    whose kernels are stored (out, in). Fields already set are kept.

    Raises:
      UnknownModelTypeError: a None field for a ``model_type`` PEFT has no defaults for.

    Example:
      >>> config = resolve(IA3Config(task_type="CAUSAL_LM"), model)   # a FlaxLlamaForCausalLM
      >>> config.target_modules, config.feedforward_modules
      (('down_proj', 'k_proj', 'v_proj'), ('down_proj',))
    """
    model_type = model_type_of(model_or_config)
    targets = config.target_modules
    if targets is None:
        targets = _table_entry(TARGET_MODULES, model_type, "target_modules", "target_modules=['q', 'v', 'wo']")
    feedforward = config.feedforward_modules
    if feedforward is None:
        feedforward = _table_entry(
            FEEDFORWARD_MODULES, model_type, "feedforward_modules", "feedforward_modules=['wo'] (or [] for none)"
        )
        feedforward = _feedforward_pattern(feedforward, targets)
    return config.replace(
        target_modules=targets,
        feedforward_modules=feedforward,
        fan_in_fan_out=config.fan_in_fan_out or model_type in FAN_IN_FAN_OUT_MODEL_TYPES,
    )


def default_config(model_or_config: Any, **overrides: Any) -> IA3Config:
    """PEFT's default `IA3Config` for a Hugging Face Flax model (or its config), with `overrides`.

    Args:
      model_or_config: a Hugging Face Flax model, its ``PretrainedConfig``, or a ``model_type`` string.
      **overrides: any `IA3Config` field, e.g. ``task_type="SEQ_CLS", modules_to_save=["classifier"]``.

    Returns:
      The config with PEFT's default target and feedforward modules for the model type wherever the
      overrides leave them None, and ``fan_in_fan_out=True`` for GPT-2 (``FlaxConv1D``).

    Raises:
      UnknownModelTypeError: the model type is not in PEFT's table and the overrides do not name
        both ``target_modules`` and ``feedforward_modules``.
      IA3ConfigError: ``modules_to_save`` names the input embedding of a model (given as a model) whose
        output head is tied to it: see `_refuse_tied_embedding_copies`.

    Example:
      >>> config = default_config(model, init_ia3_weights=False)      # a FlaxT5ForConditionalGeneration
      >>> config.target_modules, config.feedforward_modules
      (('k', 'v', 'wo'), ('wo',))
    """
    model_type = model_type_of(model_or_config)
    _refuse_tied_embedding_copies(model_or_config, overrides.get("modules_to_save"))
    if overrides.get("fan_in_fan_out") is False and model_type in FAN_IN_FAN_OUT_MODEL_TYPES:
        # PEFT's own correction (and warning) for transformers' Conv1D layers.
        warnings.warn(
            f"fan_in_fan_out is set to False but {model_type!r} layers are FlaxConv1D (kernel stored (out, in)). "
            "Setting fan_in_fan_out to True.",
            stacklevel=2,
        )
        overrides = {**overrides, "fan_in_fan_out": True}
    return resolve(IA3Config(**overrides), model_type)


# Input embeddings by their Hugging Face module names; a language-model head may be tied to them.
INPUT_EMBEDDINGS = ("wte", "shared", "embed_tokens", "word_embeddings")
_LM_HEAD_CLASS = re.compile(r"LMHead|ForCausalLM|ForConditionalGeneration|ForMaskedLM|ForPreTraining")


def _refuse_tied_embedding_copies(model_or_config: Any, modules_to_save: Any) -> None:
    """Raises `IA3ConfigError` when ``modules_to_save`` names an input embedding that PyTorch reads elsewhere:
    one tied to a language-model head (``tie_word_embeddings``, a class with such a head: GPT-2's ``wte``), or
    T5 / BART's ``shared`` (always: their encoder and decoder embed with it).

    The hazard: the two frameworks train different models. Flax stores a tied embedding once, so its trained
    copy would also be the output head; PyTorch PEFT's copy replaces the input embedding only, the tied head
    keeps reading the original. Logits then differ both ways of the PEFT round trip, silently. (A tied head is
    known only for a model instance: a config or a model_type string does not say whether the class has one;
    `save_peft` and `load_peft` warn where the params suggest it.)
    """
    if not modules_to_save:
        return
    names = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save)
    # T5 / BART's `shared` is the encoder's and decoder's embed_tokens in PyTorch: PEFT's copy is never read.
    model = not isinstance(model_or_config, str) and hasattr(model_or_config, "config")
    tied = model and getattr(model_or_config.config, "tie_word_embeddings", False)
    tied = tied and _LM_HEAD_CLASS.search(type(model_or_config).__name__) is not None
    last = {m: str(m).split(".")[-1] for m in names}
    embeddings = [m for m in names if last[m] == "shared" or (tied and last[m] in INPUT_EMBEDDINGS)]
    if embeddings:
        raise IA3ConfigError(
            f"modules_to_save={embeddings} names an input embedding of {type(model_or_config).__name__} that PyTorch "
            "reads elsewhere: the output head tied to it (tie_word_embeddings=True), or T5 / BART's encoder and "
            "decoder, which hold `shared` itself. In Flax a trained copy of it is read everywhere; PyTorch PEFT's "
            "copy replaces the input embedding only (for `shared`, nothing), so the adapter would give other logits "
            "there (both ways of the PEFT round trip). Leave the embedding frozen (or untie the head before training)."
        )


# --- parameter counts, as PEFT's print_trainable_parameters ---


class ParameterCount(NamedTuple):
    """PEFT's ``get_nb_trainable_parameters`` plus the percentage ``print_trainable_parameters`` shows.

    Example:
      >>> count = trainable_parameters(params, config=config)
      >>> count.trainable, count.total, count.percent
    """

    trainable: int
    total: int
    percent: float

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def _count(tree: Any) -> int:
    return sum(
        math.prod(np.shape(_tree.unbox(leaf)))
        for path, leaf in _tree.leaves_with_paths(tree)
        if not (path and path[-1] in TORCH_BUFFERS)
    )


def trainable_parameters(
    params_or_adapter: Mapping[str, Any],
    base: Mapping[str, Any] | None = None,
    *,
    config: IA3Config | None = None,
) -> ParameterCount:
    """Trainable and total parameter counts, equal to PEFT's on the same architecture.

    Two ways to call it:
      - ``trainable_parameters(params, config=config)`` on the tree `ia3_init` returned; `config` is
        only needed for its ``modules_to_save``;
      - ``trainable_parameters(adapter, base)`` on the two halves of `split`.

    As in PEFT, "all params" counts the base plus the adapter: the ``ia3_l`` vectors and the trained
    ``modules_to_save`` copies next to the frozen originals. Flax params that PyTorch holds as
    buffers (BART's ``final_logits_bias``) are left out, as PEFT never sees them; a tied embedding is
    one param in both frameworks.

    Returns:
      ``ParameterCount(trainable, total, percent)``; ``str()`` of it is PEFT's printed line.

    Example:
      >>> trainable, total, percent = trainable_parameters(adapter, base)
    """
    adapter: Mapping[str, Any]
    if base is None:
        adapter, base = split(params_or_adapter, config)
    elif config is not None:
        raise StructureError(
            "trainable_parameters(adapter, base): the adapter already holds the modules_to_save copies; "
            "pass config only with the joined param tree, trainable_parameters(params, config=config)."
        )
    else:
        adapter = params_or_adapter
    trainable = _count(adapter)
    total = trainable + _count(base)
    if total == 0:
        raise StructureError("trainable_parameters: the param tree holds no arrays.")
    return ParameterCount(trainable, total, 100 * trainable / total)


def print_trainable_parameters(
    params_or_adapter: Mapping[str, Any],
    base: Mapping[str, Any] | None = None,
    *,
    config: IA3Config | None = None,
) -> None:
    """Prints PEFT's line, ``trainable params: X || all params: Y || trainable%: Z`` (`trainable_parameters`).

    Example:
      >>> print_trainable_parameters(ia3_jax.ia3_init(model.params, config))   # GPT-2 small
      trainable params: 64,512 || all params: 124,504,320 || trainable%: 0.0518
    """
    print(trainable_parameters(params_or_adapter, base, config=config))


# --- the FlaxT5 fix (see the module docstring) ---


def _relative_position_bucket(
    relative_position: jax.Array, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> jax.Array:
    """T5's relative-position bucket (Mesh TensorFlow), ``jnp.clip(x, a_max=m)`` written ``jnp.minimum(x, m)``."""
    relative_buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0) * num_buckets
        relative_position = jnp.abs(relative_position)
    else:
        relative_position = -jnp.minimum(relative_position, 0)
    # Half of the buckets are exact positions, the other half grow logarithmically up to max_distance.
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    if_large = max_exact + (
        jnp.log(relative_position / max_exact) / jnp.log(max_distance / max_exact) * (num_buckets - max_exact)
    )
    if_large = jnp.minimum(if_large, num_buckets - 1)
    relative_buckets += jnp.where(is_small, relative_position, if_large)
    return relative_buckets.astype("i4")


def _flax_t5_attention_classes() -> list[Any]:
    from transformers.models.longt5 import modeling_flax_longt5 as longt5
    from transformers.models.t5 import modeling_flax_t5 as t5

    return [
        t5.FlaxT5Attention,  # also FlaxMT5's
        longt5.FlaxLongT5Attention,
        longt5.FlaxLongT5LocalAttention,
        longt5.FlaxLongT5TransientGlobalAttention,
    ]


def needs_flax_t5_patch() -> bool:
    """Whether the running JAX lacks ``jnp.clip(a_max=...)``, which transformers' FlaxT5 calls.

    Example:
      >>> needs_flax_t5_patch()           # True where jnp.clip has no a_max= (JAX >= 0.10)
    """
    return "a_max" not in inspect.signature(jnp.clip).parameters


def patch_flax_t5() -> list[str]:
    """Replaces FlaxT5/LongT5 ``_relative_position_bucket`` when the running JAX needs it; idempotent.

    Returns the names of the classes patched by this call (empty when JAX still has ``a_max`` or the
    fix is already in place). Runs on ``import ia3_jax.hf``; each call that changes transformers says
    so once on the ``ia3_jax.hf`` logger (level INFO), naming the classes.

    Example:
      >>> patch_flax_t5()                 # already done by `import ia3_jax.hf`: nothing left to patch
      []
    """
    if not needs_flax_t5_patch():
        return []
    patched = []
    for cls in _flax_t5_attention_classes():
        if inspect.getattr_static(cls, "_relative_position_bucket").__func__ is not _relative_position_bucket:
            cls._relative_position_bucket = staticmethod(_relative_position_bucket)
            patched.append(cls.__name__)
    if patched:
        _log.info(
            "ia3_jax.hf replaced _relative_position_bucket on %s: transformers %s calls jnp.clip(a_max=...), "
            "which this JAX no longer has (nothing else is changed).",
            ", ".join(patched),
            _transformers_version(),
        )
    return patched


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


patch_flax_t5()
