"""IA3 on every Hugging Face Flax architecture that transformers 4.57.6 ships and PEFT's table covers.

Tiny models built from configs in code (no downloads). References: the merged model without an
interceptor (same model, same call; float32, relative 1e-5) and PEFT itself on the PyTorch twin built
from the same config (vector shapes key for key, parameter counts exactly).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf

import ia3_jax
from ia3_jax import hf

V = 96  # vocabulary
SMALL = dict(vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LAYERS = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
DECODER = dict(num_key_value_heads=1, **LAYERS)
T5 = dict(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
          relative_attention_max_distance=16, decoder_start_token_id=0, **SMALL)


@dataclasses.dataclass(frozen=True)
class Arch:
    config: tf.PretrainedConfig
    flax_class: str
    torch_class: str
    generative: bool = True
    seq2seq: bool = False
    overrides: tuple = ()  # IA3Config fields on top of the model type's defaults


ARCHS = {
    "gpt2": Arch(tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, **SMALL), "FlaxGPT2LMHeadModel", "GPT2LMHeadModel"),
    "gpt_neo": Arch(
        tf.GPTNeoConfig(hidden_size=16, num_layers=2, num_heads=2, max_position_embeddings=32, window_size=8,
                        attention_types=[[["global", "local"], 1]], **SMALL),
        "FlaxGPTNeoForCausalLM", "GPTNeoForCausalLM",
    ),
    "gptj": Arch(tf.GPTJConfig(n_embd=16, n_layer=2, n_head=2, n_positions=32, rotary_dim=4, **SMALL), "FlaxGPTJForCausalLM", "GPTJForCausalLM"),
    "opt": Arch(
        tf.OPTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32, max_position_embeddings=32,
                     word_embed_proj_dim=16, **SMALL),
        "FlaxOPTForCausalLM", "OPTForCausalLM",
    ),
    "bloom": Arch(tf.BloomConfig(hidden_size=16, n_layer=2, n_head=2, **SMALL), "FlaxBloomForCausalLM", "BloomForCausalLM"),
    "llama": Arch(tf.LlamaConfig(**DECODER, **SMALL), "FlaxLlamaForCausalLM", "LlamaForCausalLM"),
    "mistral": Arch(tf.MistralConfig(sliding_window=None, **DECODER, **SMALL), "FlaxMistralForCausalLM", "MistralForCausalLM"),
    "gemma": Arch(
        tf.GemmaConfig(head_dim=8, hidden_activation="gelu_pytorch_tanh", **DECODER, **SMALL),
        "FlaxGemmaForCausalLM", "GemmaForCausalLM",
    ),
    "bart": Arch(
        tf.BartConfig(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                      encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32, decoder_start_token_id=2,
                      forced_eos_token_id=None, **SMALL),
        "FlaxBartForConditionalGeneration", "BartForConditionalGeneration", seq2seq=True,
    ),
    "t5": Arch(tf.T5Config(**T5), "FlaxT5ForConditionalGeneration", "T5ForConditionalGeneration", seq2seq=True),
    "mt5": Arch(tf.MT5Config(**T5), "FlaxMT5ForConditionalGeneration", "MT5ForConditionalGeneration", seq2seq=True),
    "bert": Arch(
        tf.BertConfig(num_labels=3, **LAYERS, **SMALL), "FlaxBertForSequenceClassification",
        "BertForSequenceClassification", generative=False, overrides=(("modules_to_save", ("classifier",)),),
    ),
    "roberta": Arch(
        tf.RobertaConfig(num_labels=3, **{**LAYERS, "max_position_embeddings": 40}, **SMALL),
        "FlaxRobertaForSequenceClassification", "RobertaForSequenceClassification", generative=False,
        overrides=(("modules_to_save", ("classifier",)),),
    ),
}


def flax_model_types() -> set[str]:
    """Model types with a Flax model in the installed transformers."""
    from transformers.models.auto import modeling_flax_auto

    return set(modeling_flax_auto.FLAX_MODEL_MAPPING_NAMES)


@functools.cache
def built(name: str):
    """(model, IA3 config, params with random vectors, inputs) for one architecture, built once per worker."""
    arch = ARCHS[name]
    model = getattr(tf, arch.flax_class)(arch.config, seed=0)
    config = hf.default_config(model, init_ia3_weights=False, **dict(arch.overrides))
    params = ia3_jax.ia3_init(model.params, config, rng=jax.random.key(1))
    ids = jax.random.randint(jax.random.key(2), (2, 6), 3, V)
    inputs = dict(input_ids=ids, attention_mask=jnp.ones_like(ids).at[1, :2].set(0))
    if arch.seq2seq:
        inputs["decoder_input_ids"] = jax.random.randint(jax.random.key(3), (2, 4), 3, V)
    return model, config, params, inputs


def logits(output):
    return output.logits


def relative_error(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_call_under_apply_fn_equals_merged_model(name):
    model, config, params, inputs = built(name)
    got = logits(ia3_jax.apply_fn(model.__call__, config)(**inputs, params=params))
    merged = logits(model(**inputs, params=ia3_jax.merge(params, config)))
    base = logits(model(**inputs, params=model.params))
    assert relative_error(got, merged) < 1e-5
    assert relative_error(got, base) > 1e-2  # the random vectors were applied
    chex.assert_tree_all_finite(got)


@pytest.mark.parametrize("name", sorted(n for n, a in ARCHS.items() if a.generative))
def test_generate_under_apply_fn_equals_merged_model(name):
    model, config, params, inputs = built(name)
    kwargs = dict(max_new_tokens=3, do_sample=False)
    ids = inputs["input_ids"]
    got = ia3_jax.apply_fn(model.generate, config)(ids, params=params, **kwargs).sequences
    merged = model.generate(ids, params=ia3_jax.merge(params, config), **kwargs).sequences
    chex.assert_trees_all_equal(got, merged)
