"""IA3 on every Hugging Face Flax architecture that transformers 4.57.6 ships and PEFT's table covers.

Tiny models built from configs in code (no downloads). References: the merged model without an
interceptor (same model, same call; float32, relative 1e-5) and PEFT itself on the PyTorch twin built
from the same config (vector shapes key for key, parameter counts exactly).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf
from flax import traverse_util

import ia3_jax
from ia3_jax import hf

V = 96  # vocabulary
SMALL = dict(vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LAYERS = dict(
    hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_position_embeddings=32
)
DECODER = dict(num_key_value_heads=1, **LAYERS)
T5 = dict(
    d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
    relative_attention_max_distance=16, decoder_start_token_id=0, **SMALL,
)
BART = dict(
    d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
    encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32, decoder_start_token_id=2,
    forced_eos_token_id=None, **SMALL,
)

pytestmark = pytest.mark.interop  # transformers (and torch + peft for the PEFT comparisons)

# The core loop (-m "not slow") keeps one model of each kind: GPT-2 (transposed Conv1D kernels,
# fan_in_fan_out), T5 (seq2seq, the FlaxT5 fix, a feedforward wo) and BERT (modules_to_save); each
# of the others costs 1-2 s of compilation per test and runs in the full suite.
CORE = {"gpt2", "t5", "bert"}


def matrix(names) -> list:
    return [n if n in CORE else pytest.param(n, marks=pytest.mark.slow) for n in sorted(names)]




@dataclasses.dataclass(frozen=True)
class Arch:
    config: tf.PretrainedConfig
    flax_class: str  # the Flax model tested
    torch_class: str  # its PyTorch twin, for PEFT
    generative: bool = True
    seq2seq: bool = False
    modules_to_save: tuple[str, ...] | None = None


ARCHS = {
    "gpt2": Arch(
        tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, **SMALL),
        "FlaxGPT2LMHeadModel", "GPT2LMHeadModel",
    ),
    "gpt_neo": Arch(
        tf.GPTNeoConfig(
            hidden_size=16, num_layers=2, num_heads=2, max_position_embeddings=32, window_size=8,
            attention_types=[[["global", "local"], 1]], **SMALL,
        ),
        "FlaxGPTNeoForCausalLM", "GPTNeoForCausalLM",
    ),
    "gptj": Arch(
        tf.GPTJConfig(n_embd=16, n_layer=2, n_head=2, n_positions=32, rotary_dim=4, **SMALL),
        "FlaxGPTJForCausalLM", "GPTJForCausalLM",
    ),
    "opt": Arch(
        tf.OPTConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32, max_position_embeddings=32,
            word_embed_proj_dim=16, **SMALL,
        ),
        "FlaxOPTForCausalLM", "OPTForCausalLM",
    ),
    "bloom": Arch(
        tf.BloomConfig(hidden_size=16, n_layer=2, n_head=2, **SMALL), "FlaxBloomForCausalLM", "BloomForCausalLM"
    ),
    "llama": Arch(tf.LlamaConfig(**DECODER, **SMALL), "FlaxLlamaForCausalLM", "LlamaForCausalLM"),
    "mistral": Arch(
        tf.MistralConfig(sliding_window=None, **DECODER, **SMALL), "FlaxMistralForCausalLM", "MistralForCausalLM"
    ),
    "gemma": Arch(
        tf.GemmaConfig(head_dim=8, hidden_activation="gelu_pytorch_tanh", **DECODER, **SMALL),
        "FlaxGemmaForCausalLM", "GemmaForCausalLM",
    ),
    "bart": Arch(
        tf.BartConfig(**BART), "FlaxBartForConditionalGeneration", "BartForConditionalGeneration", seq2seq=True
    ),
    "t5": Arch(tf.T5Config(**T5), "FlaxT5ForConditionalGeneration", "T5ForConditionalGeneration", seq2seq=True),
    "mt5": Arch(tf.MT5Config(**T5), "FlaxMT5ForConditionalGeneration", "MT5ForConditionalGeneration", seq2seq=True),
    "bert": Arch(
        tf.BertConfig(num_labels=3, **LAYERS, **SMALL), "FlaxBertForSequenceClassification",
        "BertForSequenceClassification", generative=False, modules_to_save=("classifier",),
    ),
    "roberta": Arch(
        tf.RobertaConfig(num_labels=3, **{**LAYERS, "max_position_embeddings": 40}, **SMALL),
        "FlaxRobertaForSequenceClassification", "RobertaForSequenceClassification", generative=False,
        modules_to_save=("classifier",),
    ),
}


def random_base(model) -> dict:
    """Params of the model's shapes drawn with NumPy: the models' own eager init compiles an op per shape."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), model.params_shape_tree)


@functools.cache
def built(name: str):
    """(model, IA3 config, base params, params with random vectors, inputs) of one architecture, once per worker."""
    arch = ARCHS[name]
    model = getattr(tf, arch.flax_class)(arch.config, _do_init=False)
    config = hf.default_config(model, init_ia3_weights=False, modules_to_save=arch.modules_to_save)
    base = random_base(model)
    # Vectors of ones, then N(0, 1) ones (PEFT's init_ia3_weights=False) drawn with NumPy:
    # ia3_init(rng=...) would draw each eagerly (0.6-0.8 s per model, one compile per vector shape).
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(rng.standard_normal(a.shape), a.dtype)
        if path[-1].key == "ia3_l" else a,
        ia3_jax.ia3_init(base, config.replace(init_ia3_weights=True)),
    )
    ids = jnp.asarray(rng.integers(3, V, (2, 6)), jnp.int32)
    inputs = dict(input_ids=ids, attention_mask=jnp.asarray([[1] * 6, [0, 0] + [1] * 4], jnp.int32))
    if arch.seq2seq:
        inputs["decoder_input_ids"] = jnp.asarray(rng.integers(3, V, (2, 4)), jnp.int32)
    return model, config, base, params, inputs


def relative_error(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def hand_merge(params: dict, config: ia3_jax.IA3Config) -> dict:
    """The reference merge, written out: an output vector scales its kernel's output axis and its bias,
    a feedforward vector the kernel's input axis. ``nn.Dense`` kernels are (in, out); GPT-2's
    ``FlaxConv1D`` (``fan_in_fan_out``) stores (out, in). ``modules_to_save`` copies sit in place."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, leaf in flat.items():
        vector = flat.get((*path[:-1], "ia3_l"))
        if path[-1] == "ia3_l":
            continue
        if vector is not None and path[-1] == "kernel":
            assert leaf.ndim == 2, path
            feedforward = config.is_feedforward(".".join(path[:-1]))
            in_axis = 1 if config.fan_in_fan_out else 0
            leaf = leaf * (jnp.expand_dims(vector, 1 - in_axis) if feedforward else jnp.expand_dims(vector, in_axis))
        elif vector is not None and path[-1] == "bias" and not config.is_feedforward(".".join(path[:-1])):
            leaf = leaf * vector
        out[path] = leaf
    return traverse_util.unflatten_dict(out)


def with_unit_vectors(params: dict, like: dict) -> dict:
    """`params` (no vectors) with a vector of ones wherever `like` has one: the same tree as `like`,
    so the function compiled for `like` runs it; a unit vector multiplies by exactly 1.0."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: jnp.ones_like(v) if k[-1] == "ia3_l" else flat[k] for k, v in traverse_util.flatten_dict(like).items()}
    )


@functools.cache
def jitted_call(name: str):
    """The call under apply_fn, jit-ed once (eager calls compile op by op: 2-5x slower here)."""
    model, config, *_ = built(name)
    return jax.jit(
        lambda params, inputs: ia3_jax.apply_fn(model.__call__, config)(**inputs, params=params).logits,
    )


# --- every architecture: __call__ and generate under apply_fn equal the merged model ---


def test_the_matrix_is_every_flax_architecture_in_peft_table():
    from transformers.models.auto import modeling_flax_auto

    assert set(ARCHS) == set(modeling_flax_auto.FLAX_MODEL_MAPPING_NAMES) & set(hf.TARGET_MODULES)
    assert {a.config.model_type for a in ARCHS.values()} == set(ARCHS)


@pytest.mark.parametrize("name", matrix(ARCHS))
def test_call_under_apply_fn_equals_merged_model(name):
    model, config, base, params, inputs = built(name)
    call = jitted_call(name)
    got = call(params, inputs)
    chex.assert_tree_all_finite(got)
    # Independent reference: the kernels scaled by hand (float32; measured relative error at most
    # 2.1e-7 over the 13 models; 5e-7 allowed). It runs with unit vectors through the same compiled
    # function: one compilation per model instead of two.
    plain = lambda p: call(with_unit_vectors(p, params), inputs)
    by_hand = hand_merge(params, config)
    assert relative_error(got, plain(by_hand)) < 5e-7
    merged = ia3_jax.merge(params, config)
    chex.assert_trees_all_equal(merged, by_hand)  # the same products: bitwise equal
    assert relative_error(got, plain(base)) > 1e-2  # the random vectors were applied


@pytest.mark.parametrize("name", matrix(n for n, a in ARCHS.items() if a.generative))
def test_generate_under_apply_fn_equals_merged_model(name):
    model, config, base, params, inputs = built(name)

    def greedy(ids, params):  # jit-ed whole: generate's own eager cache init would compile op by op
        return model.generate(ids, params=params, max_new_tokens=3, do_sample=False).sequences

    ids = inputs["input_ids"]
    generate = jax.jit(ia3_jax.apply_fn(greedy, config))
    got = generate(ids, params)
    # The kernels scaled by hand, with unit vectors through the same compiled function (see above).
    chex.assert_trees_all_equal(got, generate(ids, with_unit_vectors(hand_merge(params, config), params)))
    prompt = 1 if ARCHS[name].seq2seq else ids.shape[1]  # the decoder start token, or the prompt
    chex.assert_shape(got, (2, prompt + 3))


# --- against PEFT itself, on the PyTorch twin built from the same config ---


def peft_twin(name: str):
    """PEFT's IA3 model with PEFT's own defaults (target_modules=None) on the PyTorch twin."""
    import peft
    import torch

    arch = ARCHS[name]
    torch.manual_seed(0)
    twin = getattr(tf, arch.torch_class)(arch.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out correction for GPT-2's Conv1D
        return peft.get_peft_model(twin, peft.IA3Config(modules_to_save=arch.modules_to_save))


def peft_vector_shapes(peft_model) -> dict[str, tuple[int, ...]]:
    prefix, suffix = "base_model.model.", ".ia3_l.default"
    return {
        k[len(prefix) : -len(suffix)]: tuple(p.shape) for k, p in peft_model.named_parameters() if k.endswith(suffix)
    }


@pytest.mark.parametrize("name", matrix(ARCHS))
def test_vectors_and_parameter_counts_match_peft(name, capsys):
    model, config, base, params, inputs = built(name)
    peft_model = peft_twin(name)
    # PEFT's vectors are (out, 1) when the output is scaled and (1, in) for feedforward layers.
    vectors = {".".join(p[:-1]): np.size(v) for p, v in traverse_util.flatten_dict(params).items() if p[-1] == "ia3_l"}
    ours = {key: (1, n) if config.is_feedforward(key) else (n, 1) for key, n in vectors.items()}
    assert ours == peft_vector_shapes(peft_model)

    count = hf.trainable_parameters(params, config=config)
    assert (count.trainable, count.total) == peft_model.get_nb_trainable_parameters()
    assert hf.trainable_parameters(*ia3_jax.split(params, config)) == count
    peft_model.print_trainable_parameters()
    peft_line = capsys.readouterr().out
    hf.print_trainable_parameters(params, config=config)
    assert capsys.readouterr().out == peft_line


def test_peft_table_and_gpt2_vector_sizes():
    from peft.utils import constants

    tables = (
        constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
        constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    )
    ours = (hf.TARGET_MODULES, hf.FEEDFORWARD_MODULES)
    for peft_table, table in zip(tables, ours):
        assert table == {k: tuple(v) for k, v in peft_table.items()}
    assert len(hf.TARGET_MODULES) == 27
    model, config, base, params, inputs = built("gpt2")
    d = ARCHS["gpt2"].config.n_embd
    assert config.fan_in_fan_out and not hf.default_config("llama").fan_in_fan_out
    block = params["transformer"]["h"]["0"]
    chex.assert_shape([block["attn"]["c_attn"]["ia3_l"], block["mlp"]["c_proj"]["ia3_l"]], [(3 * d,), (4 * d,)])
    assert "ia3_l" not in block["attn"]["c_proj"]  # "mlp.c_proj", not every c_proj


# --- default_config / resolve ---


def test_default_config_follows_peft_prepare_adapter_config():
    t5 = hf.default_config(ARCHS["t5"].config, task_type="SEQ_2_SEQ_LM")
    assert (t5.target_modules, t5.feedforward_modules, t5.task_type) == (("k", "v", "wo"), ("wo",), "SEQ_2_SEQ_LM")
    assert hf.default_config("mt5").feedforward_modules == ()
    # Own targets keep the table's feedforward entries that can still match, with PEFT's suffix rule.
    assert hf.default_config("llama", target_modules=["q_proj"]).feedforward_modules == ()
    gpt2 = hf.default_config("gpt2", target_modules=["c_attn", "c_proj"])
    assert gpt2.is_feedforward("transformer.h.0.mlp.c_proj") and not gpt2.is_feedforward("transformer.h.0.attn.c_proj")
    # resolve fills only the None fields.
    mine = ia3_jax.IA3Config(target_modules=["v_proj"], feedforward_modules=[])
    assert hf.resolve(mine, "llama") == mine
    assert hf.resolve(ia3_jax.IA3Config(), "llama") == hf.default_config("llama")
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        assert hf.default_config("gpt2", fan_in_fan_out=False).fan_in_fan_out


def test_a_tied_input_embedding_as_module_to_save_is_refused():
    """GPT-2's head reads wte: a Flax copy of it would train the head too, PEFT's copy the input side only."""
    lm = tf.FlaxGPT2LMHeadModel(ARCHS["gpt2"].config, _do_init=False)
    with pytest.raises(ia3_jax.IA3ConfigError, match=r"\['wte'\].*FlaxGPT2LMHeadModel.*tied.*PEFT"):
        hf.default_config(lm, modules_to_save=["wte"])
    with pytest.raises(ia3_jax.IA3ConfigError, match="transformer.wte"):
        hf.default_config(lm, modules_to_save=["ln_f", "transformer.wte"])
    assert hf.default_config(lm, modules_to_save=["ln_f"]).modules_to_save == ("ln_f",)
    # No tied head: the body alone, or the head untied.
    assert hf.default_config(tf.FlaxGPT2Model(ARCHS["gpt2"].config, _do_init=False), modules_to_save=["wte"])
    untied = tf.GPT2Config(**{**ARCHS["gpt2"].config.to_dict(), "tie_word_embeddings": False})
    assert hf.default_config(tf.FlaxGPT2LMHeadModel(untied, _do_init=False), modules_to_save=["wte"])
    # T5's shared is its encoder's and decoder's embed_tokens in PyTorch: refused even by model_type.
    with pytest.raises(ia3_jax.IA3ConfigError, match=r"\['shared'\].*encoder and decoder"):
        hf.default_config("t5", modules_to_save=["shared"])


def test_unknown_model_type_says_what_to_set():
    xglm = tf.XGLMConfig(vocab_size=V, d_model=16, num_layers=1, attention_heads=2, ffn_dim=32)
    with pytest.raises(hf.UnknownModelTypeError, match=r"model_type 'xglm'.*Set `target_modules`"):
        hf.default_config(xglm)
    with pytest.raises(hf.UnknownModelTypeError, match=r"'xglm'.*Set `feedforward_modules`"):
        hf.default_config(xglm, target_modules=["k_proj", "fc2"])
    config = hf.default_config(xglm, target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"])
    assert config.target_modules == ("fc2", "k_proj") and not config.fan_in_fan_out
    with pytest.raises(hf.UnknownModelTypeError, match="no `model_type`"):
        hf.default_config({"params": {}})


def test_trainable_parameters_bad_input():
    model, config, base, params, inputs = built("llama")
    adapter, frozen = ia3_jax.split(params)
    with pytest.raises(ia3_jax.StructureError, match="pass config only with the joined param tree"):
        hf.trainable_parameters(adapter, frozen, config=config)
    with pytest.raises(ia3_jax.StructureError, match="no arrays"):
        hf.trainable_parameters({})


# --- the FlaxT5 fix ---


def test_flax_t5_fix_matches_pytorch_t5_buckets():
    import torch
    from transformers.models.longt5 import modeling_flax_longt5
    from transformers.models.t5 import modeling_flax_t5, modeling_t5

    assert hf.needs_flax_t5_patch()  # jax >= 0.10 has no jnp.clip(a_max=...)
    assert hf.patch_flax_t5() == []  # applied on import, idempotent
    assert "a_max" not in inspect.signature(jnp.clip).parameters  # jnp.clip itself untouched
    relative = np.arange(-300, 300)[None, :] - np.arange(0, 6)[:, None]
    classes = [
        modeling_flax_t5.FlaxT5Attention,
        modeling_flax_longt5.FlaxLongT5Attention,
        modeling_flax_longt5.FlaxLongT5LocalAttention,
        modeling_flax_longt5.FlaxLongT5TransientGlobalAttention,
    ]
    for bidirectional, buckets, distance in [(True, 32, 128), (False, 32, 128), (True, 8, 16), (False, 8, 16)]:
        expected = modeling_t5.T5Attention._relative_position_bucket(
            torch.as_tensor(relative), bidirectional, buckets, distance
        ).numpy()
        for cls in classes:
            got = cls._relative_position_bucket(jnp.asarray(relative), bidirectional, buckets, distance)
            chex.assert_trees_all_equal(np.asarray(got), expected)
