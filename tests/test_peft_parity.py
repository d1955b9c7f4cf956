"""PEFT's file format both ways, checked against PEFT itself on the PyTorch twin of each Flax model.

Base weights are identical in both frameworks: a tiny PyTorch model built from a config in code is
saved and converted with transformers' own ``from_pretrained(..., from_pt=True)``. References:
PEFT's logits (unmerged and after ``merge_and_unload``) and the files PEFT writes. Tolerance:
relative error (max |a - b| / max |b|) under 1e-5 in float32 (measured: at most 3e-7).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers as tf
from flax import traverse_util
from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

import ia3_jax
from ia3_jax import AdapterMismatchError, PeftFormatError, hf, load_peft, save_peft

pytestmark = pytest.mark.interop  # torch, peft and transformers

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names

RTOL = 1e-5
SMALL = {"vocab_size": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
LAYERS = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
          "max_position_embeddings": 32}
T5 = dict(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
          relative_attention_max_distance=16, decoder_start_token_id=0, **SMALL)


@dataclasses.dataclass(frozen=True)
class Arch:
    config: tf.PretrainedConfig
    torch_class: str
    flax_class: str
    task_type: str
    seq2seq: bool = False
    modules_to_save: tuple[str, ...] | None = None


ARCHS = {
    "gpt2": Arch(tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, **SMALL),
                 "GPT2LMHeadModel", "FlaxGPT2LMHeadModel", "CAUSAL_LM"),
    "llama": Arch(tf.LlamaConfig(num_key_value_heads=1, **LAYERS, **SMALL),
                  "LlamaForCausalLM", "FlaxLlamaForCausalLM", "CAUSAL_LM"),
    "t5": Arch(tf.T5Config(**T5), "T5ForConditionalGeneration", "FlaxT5ForConditionalGeneration", "SEQ_2_SEQ_LM",
               seq2seq=True),
    "bert": Arch(tf.BertConfig(num_labels=3, **LAYERS, **SMALL), "BertForSequenceClassification",
                 "FlaxBertForSequenceClassification", "SEQ_CLS", modules_to_save=("classifier",)),
    "roberta": Arch(tf.RobertaConfig(num_labels=3, **{**LAYERS, "max_position_embeddings": 40}, **SMALL),
                    "RobertaForSequenceClassification", "FlaxRobertaForSequenceClassification", "SEQ_CLS",
                    modules_to_save=("classifier",)),
    "bart": Arch(tf.BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                               max_position_embeddings=32, decoder_start_token_id=2, forced_eos_token_id=None, **SMALL),
                 "BartForConditionalGeneration", "FlaxBartForConditionalGeneration", "SEQ_2_SEQ_LM", seq2seq=True),
    "opt": Arch(tf.OPTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                             max_position_embeddings=32, word_embed_proj_dim=16, **SMALL),
                "OPTForCausalLM", "FlaxOPTForCausalLM", "CAUSAL_LM"),
    "gpt_neo": Arch(tf.GPTNeoConfig(hidden_size=16, num_layers=2, num_heads=2, max_position_embeddings=32,
                                    window_size=8, attention_types=[[["global", "local"], 1]], **SMALL),
                    "GPTNeoForCausalLM", "FlaxGPTNeoForCausalLM", "CAUSAL_LM"),
    "gptj": Arch(tf.GPTJConfig(n_embd=16, n_layer=1, n_head=2, n_positions=32, rotary_dim=4, **SMALL),
                 "GPTJForCausalLM", "FlaxGPTJForCausalLM", "CAUSAL_LM"),
    "gemma": Arch(tf.GemmaConfig(head_dim=8, hidden_activation="gelu_pytorch_tanh", num_key_value_heads=1,
                                 **LAYERS, **SMALL), "GemmaForCausalLM", "FlaxGemmaForCausalLM", "CAUSAL_LM"),
}
MAIN = ["gpt2", "llama", "t5", "bert"]  # the four; every direction and the merge on these


def to_flax(torch_model: torch.nn.Module, flax_class: type) -> tuple[tf.FlaxPreTrainedModel, dict]:
    """The Flax twin and its params, converted by transformers' own PyTorch -> Flax conversion.

    ``from_pretrained(..., from_pt=True)`` does the same but first initialises random params (an XLA
    compile per architecture); the conversion only needs their shapes.
    """
    model = flax_class(torch_model.config, _do_init=False)
    shapes = types.SimpleNamespace(params=model.params_shape_tree, base_model_prefix=model.base_model_prefix)
    converted = traverse_util.flatten_dict(convert_pytorch_state_dict_to_flax(dict(torch_model.state_dict()), shapes))
    expected = traverse_util.flatten_dict(model.params_shape_tree)
    assert set(expected) <= set(converted), set(expected) - set(converted)
    return model, traverse_util.unflatten_dict({k: converted[k] for k in expected})  # tied weights dropped


@dataclasses.dataclass
class Pair:
    """The same tiny model in both frameworks."""

    arch: Arch
    directory: str  # the PyTorch checkpoint

    def __post_init__(self):
        self.flax, self.params = to_flax(self.torch(), getattr(tf, self.arch.flax_class))
        self._forward = {}

    def torch(self) -> torch.nn.Module:
        """A fresh PyTorch model (PEFT's get_peft_model and merge_and_unload change it in place)."""
        return getattr(tf, self.arch.torch_class).from_pretrained(self.directory).eval()

    def inputs(self) -> dict[str, np.ndarray]:
        ids = np.array([[1, 5, 7, 9, 3, 11], [4, 8, 15, 16, 23, 42]], np.int64)
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]} if self.arch.seq2seq else {"input_ids": ids}

    def torch_logits(self, model: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in self.inputs().items()}).logits.numpy()

    def flax_logits(self, params, config: ia3_jax.IA3Config | None = None) -> np.ndarray:
        """Logits of the model's own ``__call__``, under the interceptor when a config is given."""
        if config not in self._forward:
            call = self.flax.__call__ if config is None else ia3_jax.apply_fn(self.flax.__call__, config)
            self._forward[config] = jax.jit(lambda p: call(**self.inputs(), params=p).logits)
        return np.asarray(self._forward[config](params))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    cache: dict[str, Pair] = {}

    def get(name: str) -> Pair:
        if name not in cache:
            torch.manual_seed(0)
            directory = tmp_path_factory.mktemp(name)
            getattr(tf, ARCHS[name].torch_class)(ARCHS[name].config).save_pretrained(directory)
            cache[name] = Pair(ARCHS[name], str(directory))
        return cache[name]

    return get


def assert_close(actual, expected, rtol: float = RTOL):
    err = np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected))
    assert err < rtol, f"relative error {err:.2e} >= {rtol:.0e}"


def peft_model(pair: Pair, **fields) -> peft.PeftModel:
    """PEFT IA3 on the PyTorch model with its default targets and random vectors (and random heads)."""
    torch.manual_seed(1)
    config = peft.IA3Config(task_type=pair.arch.task_type, init_ia3_weights=False,
                            modules_to_save=list(pair.arch.modules_to_save or []) or None, **fields)
    model = peft.get_peft_model(pair.torch(), config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.normal_()
    return model


# --- (a) PEFT -> ia3_jax, and (c) merged, on every architecture ------------------------------


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_peft_adapter_gives_peft_logits_in_jax(pairs, name, tmp_path):
    pair = pairs(name)
    model = peft_model(pair)
    model.save_pretrained(tmp_path)
    expected = pair.torch_logits(model)

    adapter, config = load_peft(tmp_path, pair.params)
    params = ia3_jax.join(pair.params, adapter)
    # Not vacuous: the random vectors move PEFT's logits far beyond the tolerance.
    assert np.max(np.abs(pair.torch_logits(pair.torch()) - expected)) > 10 * RTOL * np.max(np.abs(expected))
    assert_close(pair.flax_logits(params, config), expected)
    if name in MAIN:  # (c): PEFT's merge_and_unload against ia3_jax.merge
        assert_close(pair.flax_logits(ia3_jax.merge(params, config)), pair.torch_logits(model.merge_and_unload()))


def test_modules_to_save_by_peft_suffix_rule_both_ways(pairs, tmp_path):
    """PEFT saves a copy of every module whose path ends with an entry: 'norm' is the final norm and each
    layer's input_layernorm and post_attention_layernorm. load_peft names them all, with PEFT's logits, and
    its config saves back into a file PEFT loads with the same logits."""
    pair = pairs("llama")
    torch.manual_seed(1)
    config = peft.IA3Config(task_type=pair.arch.task_type, init_ia3_weights=False, modules_to_save=["norm"])
    model = peft.get_peft_model(pair.torch(), config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.normal_()
    model.save_pretrained(tmp_path / "peft")
    expected = pair.torch_logits(model)

    adapter, ours = load_peft(tmp_path / "peft", pair.params)
    assert set(ours.modules_to_save) == {"norm", "input_layernorm", "post_attention_layernorm"}
    assert set(adapter["model"]["layers"]["1"]) >= {"input_layernorm", "post_attention_layernorm"}
    assert_close(pair.flax_logits(ia3_jax.join(pair.params, adapter), ours), expected)

    save_peft(tmp_path / "back", adapter, ours, params=pair.params)
    again = peft.PeftModel.from_pretrained(pair.torch(), tmp_path / "back").eval()
    assert_close(pair.torch_logits(again), expected)


# --- (b) ia3_jax -> PEFT ------------------------------------------------------------------------


@pytest.mark.parametrize("name", MAIN)
def test_jax_adapter_loads_in_peft_with_same_logits(pairs, name, tmp_path):
    pair = pairs(name)
    config = hf.default_config(pair.flax, task_type=pair.arch.task_type, init_ia3_weights=False,
                               modules_to_save=pair.arch.modules_to_save)
    adapter, base = ia3_jax.split(ia3_jax.ia3_init(pair.params, config, rng=jax.random.key(0)), config)
    noise = np.random.default_rng(3)
    for module in pair.arch.modules_to_save or ():  # a trained head differs from the base one, not by a constant
        adapter = {
            **adapter,
            module: jax.tree.map(lambda x: x + 0.5 * noise.standard_normal(x.shape).astype(x.dtype), adapter[module]),
        }
    save_peft(tmp_path, adapter, config, params=base)

    loaded = peft.PeftModel.from_pretrained(pair.torch(), tmp_path).eval()
    expected = pair.flax_logits(ia3_jax.join(base, adapter), config)
    assert_close(pair.torch_logits(loaded), expected)
    merged = ia3_jax.merge(ia3_jax.join(base, adapter), config)
    assert_close(pair.torch_logits(loaded.merge_and_unload()), pair.flax_logits(merged))


# --- the files themselves ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "target_modules"), [("gpt2", None), ("gpt2", "all-linear"), ("bert", None), ("t5", None)]
)
def test_files_match_what_peft_writes(pairs, name, target_modules, tmp_path):
    pair = pairs(name)
    model = peft_model(pair, target_modules=target_modules)
    model.save_pretrained(tmp_path / "peft")
    adapter, config = load_peft(tmp_path / "peft", pair.params)
    save_peft(tmp_path / "ours", adapter, config, params=pair.params)

    theirs = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    ours = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert sorted(ours) == sorted(theirs)
    assert (tmp_path / "ours" / CONFIG_NAME).read_text() == json.dumps(ours, indent=2, sort_keys=True)  # PEFT's layout
    for key in ("exclude_modules", "fan_in_fan_out", "inference_mode", "init_ia3_weights", "peft_type", "task_type"):
        assert ours[key] == theirs[key], key
    as_set = lambda value: value if isinstance(value, str) or value is None else set(value)
    assert as_set(ours["target_modules"]) == as_set(theirs["target_modules"])
    if as_set(theirs["feedforward_modules"]) <= as_set(theirs["target_modules"]):
        assert as_set(ours["feedforward_modules"]) == as_set(theirs["feedforward_modules"])
    else:  # PEFT's "all-linear" file fails PEFT's own subset check on load; ours says the same as a regex
        assert ours["feedforward_modules"] == r".*(?:mlp\.c_proj)"
    # PEFT adds its SEQ_CLS defaults ("classifier", "score") to modules_to_save; the model has no "score".
    assert as_set(ours["modules_to_save"]) == (((as_set(theirs["modules_to_save"]) or set()) - {"score"}) or None)

    with open(tmp_path / "peft" / WEIGHTS_NAME, "rb") as f:
        their_meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    with open(tmp_path / "ours" / WEIGHTS_NAME, "rb") as f:
        our_meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    assert len(our_meta.pop("ia3_jax.config_sha256")) == 64  # ties config and weights; PEFT ignores it
    hashes = json.loads(our_meta.pop("ia3_jax.tensor_sha256"))  # {tensor key: sha256}, checked on load
    assert all(len(digest) == 64 for digest in hashes.values()) and "base_model.model." in next(iter(hashes))
    assert our_meta == their_meta == {"format": "pt"}
    theirs_t = safetensors.numpy.load_file(tmp_path / "peft" / WEIGHTS_NAME)
    ours_t = safetensors.numpy.load_file(tmp_path / "ours" / WEIGHTS_NAME)
    assert sorted(ours_t) == sorted(theirs_t)
    for key, value in theirs_t.items():
        assert ours_t[key].dtype == np.float32
        np.testing.assert_array_equal(ours_t[key], value, err_msg=key)  # same shape, same bits
    reloaded = peft.PeftModel.from_pretrained(pair.torch(), tmp_path / "ours").eval()
    assert_close(pair.torch_logits(reloaded), pair.torch_logits(model))


def test_vector_shapes_and_values_are_peft_layout(pairs, tmp_path):
    """PEFT's (out, 1) / (1, in) shapes on GPT-2's Conv1D, read value for value into ia3_l (out,) / (in,)."""
    pair = pairs("gpt2")
    peft_model(pair).save_pretrained(tmp_path)
    tensors = safetensors.numpy.load_file(tmp_path / WEIGHTS_NAME)
    chex.assert_shape(tensors["base_model.model.transformer.h.0.attn.c_attn.ia3_l"], (48, 1))  # 3 * 16 outputs
    chex.assert_shape(tensors["base_model.model.transformer.h.0.mlp.c_proj.ia3_l"], (1, 64))  # 4 * 16 inputs
    adapter, _ = load_peft(tmp_path, pair.params)
    layer = adapter["transformer"]["h"]["1"]
    np.testing.assert_array_equal(layer["attn"]["c_attn"]["ia3_l"],
                                  tensors["base_model.model.transformer.h.1.attn.c_attn.ia3_l"][:, 0])
    np.testing.assert_array_equal(layer["mlp"]["c_proj"]["ia3_l"],
                                  tensors["base_model.model.transformer.h.1.mlp.c_proj.ia3_l"][0])


# --- head prefixes: PyTorch head class vs bare Flax model and back ----------------------------


def test_causal_lm_adapter_loads_into_bare_flax_model(pairs, tmp_path):
    """LlamaForCausalLM's ``model.layers.0...`` keys land on FlaxLlamaModel's ``layers.0...``."""
    pair = pairs("llama")
    model = peft_model(pair)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        ids = torch.from_numpy(pair.inputs()["input_ids"])
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    bare = tf.FlaxLlamaModel(pair.arch.config, _do_init=False)
    params = pair.params["model"]
    adapter, config = load_peft(tmp_path, params)
    assert set(adapter) == {"layers"}
    forward = jax.jit(lambda p: ia3_jax.apply_fn(bare.__call__, config)(pair.inputs()["input_ids"], params=p))
    assert_close(forward(ia3_jax.join(params, adapter)).last_hidden_state, expected.numpy())


def test_bare_model_adapter_loads_into_head_model(pairs, tmp_path):
    """BertModel's ``encoder.layer.0...`` keys land under FlaxBertForSequenceClassification's ``bert``."""
    pair = pairs("bert")
    torch.manual_seed(2)
    bare = peft.get_peft_model(tf.BertModel.from_pretrained(pair.directory),
                               peft.IA3Config(task_type="FEATURE_EXTRACTION", init_ia3_weights=False))
    bare.save_pretrained(tmp_path)
    tensors = safetensors.numpy.load_file(tmp_path / WEIGHTS_NAME)
    adapter, _ = load_peft(tmp_path, pair.params)
    assert set(adapter) == {"bert"}
    np.testing.assert_array_equal(adapter["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["key"]["ia3_l"],
                                  tensors["base_model.model.encoder.layer.0.attention.self.key.ia3_l"][:, 0])


# --- conv layers (PEFT's Conv2d: (1, C, 1, 1)) and modules_to_save layouts on a custom model ---


class TorchConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(8, 6, 3, padding=1)
        self.lin = torch.nn.Linear(6, 5)
        self.head = torch.nn.Linear(5, 2)
        self.norm = torch.nn.LayerNorm(2)

    def forward(self, x):  # NCHW
        h = torch.relu(self.conv1(torch.relu(self.conv0(x)))).mean(dim=(2, 3))
        return self.norm(self.head(torch.relu(self.lin(h))))


class FlaxConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # NHWC
        h = nn.relu(nn.Conv(8, (3, 3), padding=1, name="conv0")(x))
        h = nn.relu(nn.Conv(6, (3, 3), padding=1, name="conv1")(h)).mean(axis=(1, 2))
        return nn.LayerNorm(epsilon=1e-5, name="norm")(nn.Dense(2, name="head")(nn.relu(nn.Dense(5, name="lin")(h))))


def flax_params_of(torch_model: torch.nn.Module) -> dict:
    sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    params = {}
    for name in ("conv0", "conv1", "lin", "head"):
        w = sd[f"{name}.weight"]
        params[name] = {"kernel": w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T, "bias": sd[f"{name}.bias"]}
    params["norm"] = {"scale": sd["norm.weight"], "bias": sd["norm.bias"]}
    return jax.tree.map(jnp.asarray, params)


def test_conv_and_modules_to_save_both_ways(tmp_path):
    torch.manual_seed(0)
    net = TorchConvNet().eval()
    base = flax_params_of(net)
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 5)).astype(np.float32)
    fields = {"target_modules": ["conv0", "conv1", "lin"], "feedforward_modules": ["conv1", "lin"],
              "modules_to_save": ["head", "norm"]}
    model = peft.get_peft_model(copy.deepcopy(net), peft.IA3Config(init_ia3_weights=False, **fields))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.normal_()
        expected = model(torch.from_numpy(x)).numpy()
    model.save_pretrained(tmp_path / "peft")
    tensors = safetensors.numpy.load_file(tmp_path / "peft" / WEIGHTS_NAME)
    chex.assert_shape(tensors["base_model.model.conv0.ia3_l"], (1, 8, 1, 1))  # output channels
    chex.assert_shape(tensors["base_model.model.conv1.ia3_l"], (1, 8, 1, 1))  # input channels (feedforward)
    chex.assert_shape(tensors["base_model.model.head.weight"], (2, 5))  # torch (out, in)

    adapter, config = load_peft(tmp_path / "peft", base)
    chex.assert_shape(adapter["head"]["kernel"], (5, 2))  # Flax (in, out)
    assert set(adapter["norm"]) == {"scale", "bias"}
    forward = jax.jit(ia3_jax.apply_fn(FlaxConvNet().apply, config))
    assert_close(forward({"params": ia3_jax.join(base, adapter)}, jnp.asarray(x.transpose(0, 2, 3, 1))), expected)

    save_peft(tmp_path / "ours", adapter, config, params=base)
    ours = safetensors.numpy.load_file(tmp_path / "ours" / WEIGHTS_NAME)
    assert sorted(ours) == sorted(tensors)
    for key in tensors:
        np.testing.assert_array_equal(ours[key], tensors[key], err_msg=key)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "ours")
    with torch.no_grad():
        assert_close(reloaded(torch.from_numpy(x)).numpy(), expected)


# --- bad input: a clear error, nothing written ------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_dir(pairs, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2_adapter")
    peft_model(pairs("gpt2")).save_pretrained(directory)
    return directory


def copy_adapter(src, dst, *, config=None, tensors=None):
    dst.mkdir(parents=True)
    config = config if config is not None else json.loads((src / CONFIG_NAME).read_text())
    (dst / CONFIG_NAME).write_text(json.dumps(config))
    data = tensors if tensors is not None else safetensors.numpy.load_file(src / WEIGHTS_NAME)
    safetensors.numpy.save_file(data, dst / WEIGHTS_NAME, metadata={"format": "pt"})
    return dst


def test_missing_or_malformed_config(pairs, gpt2_dir, tmp_path):
    params = pairs("gpt2").params
    with pytest.raises(PeftFormatError, match="no adapter_config.json"):
        load_peft(tmp_path / "nowhere", params)
    nested = copy_adapter(gpt2_dir, tmp_path / "top" / "other").parent
    with pytest.raises(PeftFormatError, match=r"sub-folders \['other'\]"):
        load_peft(nested, params)
    bad = copy_adapter(gpt2_dir, tmp_path / "bad")
    (bad / CONFIG_NAME).write_text("{not json")
    with pytest.raises(PeftFormatError, match="not valid JSON"):
        load_peft(bad, params)
    (bad / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(PeftFormatError, match="JSON list"):
        load_peft(bad, params)


def test_other_peft_type_or_fields(pairs, gpt2_dir, tmp_path):
    params = pairs("gpt2").params
    config = json.loads((gpt2_dir / CONFIG_NAME).read_text())
    with pytest.raises(PeftFormatError, match="peft_type='LORA'.*IA3 adapters only"):
        load_peft(copy_adapter(gpt2_dir, tmp_path / "lora", config={**config, "peft_type": "LORA"}), params)
    with pytest.raises(PeftFormatError, match=r"not a valid IA3 config.*\['r'\]"):
        load_peft(copy_adapter(gpt2_dir, tmp_path / "r", config={**config, "r": 8}), params)


def test_missing_weights(pairs, gpt2_dir, tmp_path):
    directory = copy_adapter(gpt2_dir, tmp_path / "bin")
    (directory / WEIGHTS_NAME).rename(directory / "adapter_model.bin")
    with pytest.raises(PeftFormatError, match="safe_serialization=True"):
        load_peft(directory, pairs("gpt2").params)
    (directory / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(PeftFormatError, match="not a readable safetensors"):
        load_peft(directory, pairs("gpt2").params)


def test_bfloat16_file(pairs, gpt2_dir, tmp_path):
    """PEFT keeps a bf16 model's dtype in the file; numpy cannot read bf16, the adapter must still load."""
    tensors = safetensors.numpy.load_file(gpt2_dir / WEIGHTS_NAME)
    bf16 = copy_adapter(gpt2_dir, tmp_path / "bf16")
    safetensors.torch.save_file({k: torch.from_numpy(v).bfloat16() for k, v in tensors.items()},
                                bf16 / WEIGHTS_NAME, metadata={"format": "pt"})
    adapter, _ = load_peft(bf16, pairs("gpt2").params)
    expected, _ = load_peft(gpt2_dir, pairs("gpt2").params)
    chex.assert_trees_all_equal(adapter, jax.tree.map(lambda v: v.astype(jnp.bfloat16).astype(jnp.float32), expected))


def test_adapter_for_another_architecture(pairs, gpt2_dir):
    with pytest.raises(AdapterMismatchError, match=r"first key 'transformer\.h\.0\.attn\.c_attn\.ia3_l'.*k_proj"):
        load_peft(gpt2_dir, pairs("llama").params)


def zeros_like_model(config: tf.GPT2Config) -> dict:
    shapes = tf.FlaxGPT2LMHeadModel(config, _do_init=False).params_shape_tree
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def test_adapter_for_another_size(pairs, gpt2_dir):
    wider = zeros_like_model(tf.GPT2Config(n_embd=24, n_layer=2, n_head=2, n_positions=32, **SMALL))
    with pytest.raises(AdapterMismatchError, match=r"'transformer\.h\.0\.attn\.c_attn\.ia3_l'.*\(48, 1\).*\(72, 1\)"):
        load_peft(gpt2_dir, wider)
    deeper = zeros_like_model(tf.GPT2Config(n_embd=16, n_layer=3, n_head=2, n_positions=32, **SMALL))
    with pytest.raises(AdapterMismatchError, match=r"lacks 2 entries.*transformer\.h\.2\.attn\.c_attn\.ia3_l"):
        load_peft(gpt2_dir, deeper)


def test_unknown_and_missing_keys(pairs, gpt2_dir, tmp_path):
    params = pairs("gpt2").params
    tensors = safetensors.numpy.load_file(gpt2_dir / WEIGHTS_NAME)
    extra = {**tensors, "base_model.model.transformer.h.0.attn.bogus.ia3_l": np.ones((16, 1), np.float32)}
    with pytest.raises(AdapterMismatchError, match=r"match no targeted module.*attn\.bogus\.ia3_l.*do: transformer"):
        load_peft(copy_adapter(gpt2_dir, tmp_path / "extra", tensors=extra), params)
    missing = {k: v for k, v in tensors.items() if ".h.1.mlp" not in k}
    with pytest.raises(AdapterMismatchError, match=r"lacks 1 entries.*transformer\.h\.1\.mlp\.c_proj\.ia3_l"):
        load_peft(copy_adapter(gpt2_dir, tmp_path / "missing", tensors=missing), params)


def test_save_checks_before_writing(pairs, tmp_path):
    pair = pairs("gpt2")
    config = hf.default_config(pair.flax)
    adapter, base = ia3_jax.split(ia3_jax.ia3_init(pair.params, config))
    other = config.replace(target_modules=["c_attn"], feedforward_modules=[])
    with pytest.raises(AdapterMismatchError, match=r"mlp\.c_proj\.ia3_l"):
        save_peft(tmp_path / "a", adapter, other, params=base)
    with pytest.raises(AdapterMismatchError, match=r"does not target"):
        save_peft(tmp_path / "b", adapter, other)
    with pytest.raises(AdapterMismatchError, match=r"match no targeted module or modules_to_save.*lm_extra\.weight"):
        save_peft(tmp_path / "c", {**adapter, "lm_extra": {"kernel": jnp.ones((2, 2))}}, config, params=base)
    assert not any(tmp_path.iterdir())


def test_save_without_params_matches_save_with_params(pairs, tmp_path):
    pair = pairs("gpt2")
    config = hf.default_config(pair.flax, init_ia3_weights=False)
    adapter, base = ia3_jax.split(ia3_jax.ia3_init(pair.params, config, rng=jax.random.key(3)))
    save_peft(tmp_path / "with", adapter, config, params=base)
    save_peft(tmp_path / "without", adapter, config)
    with_t = safetensors.numpy.load_file(tmp_path / "with" / WEIGHTS_NAME)
    without_t = safetensors.numpy.load_file(tmp_path / "without" / WEIGHTS_NAME)
    assert sorted(with_t) == sorted(without_t)
    for key in with_t:
        np.testing.assert_array_equal(with_t[key], without_t[key])
    assert (tmp_path / "with" / CONFIG_NAME).read_text() == (tmp_path / "without" / CONFIG_NAME).read_text()
    loaded, loaded_config = load_peft(tmp_path / "without", base)
    chex.assert_trees_all_equal(loaded, adapter)
    assert loaded_config == config.replace(inference_mode=True)


def test_stacked_layers_must_be_unstacked(tmp_path):
    """An nn.scan kernel (L, in, out) has no PEFT counterpart: a clear error pointing to `unstack`."""
    base = {"layers": {"k": {"kernel": jnp.zeros((3, 4, 5)), "bias": jnp.zeros((3, 5))}}}
    layouts = {"layers.k": ia3_jax.KernelLayout(in_axes=(1,), out_axes=(2,), stack_axes=(0,))}
    config = ia3_jax.IA3Config(target_modules=["k"])
    adapter, _ = ia3_jax.split(ia3_jax.ia3_init(base, config, layouts=layouts))
    with pytest.raises(ia3_jax.LayoutError, match=r"'layers\.k' is stacked.*ia3_jax\.unstack"):
        save_peft(tmp_path / "stacked", adapter, config, params=base, layouts=layouts)
    with pytest.raises(AdapterMismatchError, match=r"shape \(3, 5\).*Pass params="):
        save_peft(tmp_path / "stacked", adapter, config)
    assert not (tmp_path / "stacked").exists()
