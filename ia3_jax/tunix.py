"""IA3 on Tunix models (``google-tunix``), with PEFT adapters of their Hugging Face twins both ways.

Configs use PEFT's (Hugging Face) module names; Tunix's own key mapping translates them and reshapes
vectors (PEFT's ``(out, 1)`` ``k_proj`` vector <-> Tunix's ``(num_kv_heads, head_dim)``). The adapted
model trains under Tunix's unmodified ``PeftTrainer`` (`ia3_jax.IA3Vector` is an ``nnx.LoRAParam``).

Example:
  >>> config = ia3_jax.tunix.default_config(llama)              # PEFT's llama defaults
  >>> model = ia3_jax.tunix.ia3_init(llama, config)
  >>> # ... tunix.sft.PeftTrainer(model, optax.adamw(1e-2), training_config).train(data)
  >>> ia3_jax.tunix.save_peft("out/ia3", model, config)          # PeftModel.from_pretrained reads it
"""

from ia3_jax._src.tunix import (
    FAMILIES,
    Site,
    default_config,
    example_inputs,
    family,
    hf_adapter,
    ia3_init,
    key_mapping,
    load_peft,
    save_peft,
    sites,
    tunix_config,
)

__all__ = [
    "FAMILIES",
    "Site",
    "default_config",
    "example_inputs",
    "family",
    "hf_adapter",
    "ia3_init",
    "key_mapping",
    "load_peft",
    "save_peft",
    "sites",
    "tunix_config",
]
