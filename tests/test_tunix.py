"""IA3 on Tunix models: PEFT adapters both ways (compared inside Tunix), PeftTrainer training and checkpoints."""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("tunix")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.models.gemma3 import model as gemma_lib  # noqa: E402
from tunix.models.gemma3 import params_safetensors as gemma_params  # noqa: E402
from tunix.models.llama3 import model as llama_lib  # noqa: E402
from tunix.models.llama3 import params as llama_params  # noqa: E402
from tunix.models.qwen3 import model as qwen_lib  # noqa: E402
from tunix.models.qwen3 import params as qwen_params  # noqa: E402

import ia3_jax  # noqa: E402
import ia3_jax.nnx as ia3_nnx  # noqa: E402
import ia3_jax.tunix as ia3_tunix  # noqa: E402

SIZES = dict(num_layers=2, vocab_size=128, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8, num_kv_heads=2)
LLAMA = llama_lib.ModelConfig(**SIZES, rope_theta=10000, norm_eps=1e-5)
QWEN = qwen_lib.ModelConfig(**SIZES, rope_theta=10000, norm_eps=1e-6)
GEMMA = gemma_lib.ModelConfig(
    **{k: v for k, v in SIZES.items() if k != "vocab_size"},
    num_embed=SIZES["vocab_size"],
    sliding_window_size=4,
    param_dtype=jnp.float32,
)
# num_heads == num_kv_heads: Tunix fuses q, k and v into one qkv_einsum (3, N, D, H) instead.
GEMMA_QKV = dataclasses.replace(GEMMA, num_heads=2, num_kv_heads=2)
TOKENS = jnp.array([[3, 17, 5, 99, 42, 7, 64, 1]])


# The tiny Hugging Face configs (the PyTorch twins of the Tunix models) share these sizes.
TINY_SIZES = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


def _call(model):
    length = TOKENS.shape[1]
    mask = jnp.tril(jnp.ones((1, length, length), bool))
    logits, _ = model(TOKENS, jnp.arange(length)[None], None, mask)
    return np.asarray(logits)


def test_config_translation_and_vector_shapes():
    model = llama_lib.Llama3(LLAMA, rngs=nnx.Rngs(0))
    config = ia3_tunix.default_config(model)  # PEFT's llama defaults: k_proj, v_proj, down_proj (feedforward)
    assert config.target_modules == ("down_proj", "k_proj", "v_proj")
    tunix_config = ia3_tunix.tunix_config(config, model)
    assert "layers.1.attn.k_proj" in tunix_config.target_modules
    assert tunix_config.feedforward_modules == ("layers.0.mlp.down_proj", "layers.1.mlp.down_proj")
    adapted = ia3_tunix.ia3_init(model, config)
    assert adapted.layers[0].attn.k_proj.ia3_l.get_value().shape == (2, 8)  # (num_kv_heads, head_dim)
    assert adapted.layers[0].mlp.down_proj.ia3_l.get_value().shape == (64,)  # input features
    with pytest.raises(ia3_jax.UnknownModelTypeError):
        ia3_tunix.family(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(ia3_jax.TargetError, match=r"selects none .*'k_proj'"):  # a GPT-2 name on a Llama
        ia3_tunix.ia3_init(model, ia3_jax.IA3Config(target_modules=["c_attn"]))


def test_a_tunix_without_its_key_mapping_gets_a_typed_error(monkeypatch):
    """The PEFT bridge reads Tunix's private torch-key mapping; a Tunix that renamed it must say so."""
    model = llama_lib.Llama3(LLAMA, rngs=nnx.Rngs(0))
    assert "k_proj" in str(ia3_tunix.key_mapping(model))
    monkeypatch.delattr(llama_params, "_get_key_and_transform_mapping")
    with pytest.raises(ia3_jax.UnknownModelTypeError, match="google-tunix .* has no _get_key_and_transform_mapping"):
        ia3_tunix.key_mapping(model)


def test_gemma3_fused_kv_einsum_sites():
    """Gemma 3: Tunix's preprocessing fuses k_proj and v_proj into kv_einsum (2, K, D, H); its vector is (2, K, H)."""
    model = gemma_lib.Gemma3(GEMMA, rngs=nnx.Rngs(0))
    kv = ia3_tunix.sites(model)[("layers", "0", "attn", "kv_einsum")]
    assert kv.hf_keys == ("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj")
    config = ia3_tunix.default_config(model, init_ia3_weights=False)  # PEFT's gemma3_text: q_proj, v_proj, down_proj
    assert config.target_modules == ("down_proj", "q_proj", "v_proj")
    adapted = ia3_tunix.ia3_init(model, config, rng=jax.random.key(0))
    vector = adapted.layers[0].attn.kv_einsum.ia3_l.get_value()
    assert vector.shape == (1, 2, 8)  # (v, num_kv_heads, head_dim): k_proj is not targeted, so not in the vector
    x = jax.random.normal(jax.random.key(2), (1, 5, 32))
    base_k, base_v = model.layers[0].attn.kv_einsum(x)
    k, v = adapted.layers[0].attn.kv_einsum(x)
    np.testing.assert_array_equal(k, base_k)  # scaled by exactly one
    np.testing.assert_allclose(v, base_v * vector[0], rtol=1e-6, atol=1e-6)
    assert adapted.layers[0].attn.q_einsum.ia3_l.get_value().shape == (4, 8)
    np.testing.assert_allclose(_call(ia3_nnx.merge(adapted)), _call(adapted), rtol=1e-5, atol=1e-5)


def _qkv(module, x):
    return np.stack([np.asarray(p) for p in module(x)])  # (3, B, T, N, H): q, k, v


def test_gemma3_fused_qkv_einsum_scales_only_the_targeted_slices():
    """Gemma 3 with num_heads == num_kv_heads: q, k, v fused into qkv_einsum (3, N, D, H). A k_proj/v_proj
    config gives a (2, N, H) vector of the k and v slices only: q is scaled by exactly one, also after
    training with weight decay (which moves every parameter it is given), and in the merged weight."""
    model = gemma_lib.Gemma3(GEMMA_QKV, rngs=nnx.Rngs(0))
    site = ia3_tunix.sites(model)[("layers", "0", "attn", "qkv_einsum")]
    assert [k.rsplit(".", 1)[1] for k in site.hf_keys] == ["q_proj", "k_proj", "v_proj"]
    config = ia3_jax.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
    )
    adapted = ia3_tunix.ia3_init(model, config, rng=jax.random.key(0))
    vector = np.asarray(adapted.layers[0].attn.qkv_einsum.ia3_l.get_value())
    assert vector.shape == (2, 2, 8)  # (k|v, num_heads, head_dim)
    x = jax.random.normal(jax.random.key(2), (1, 5, 32))
    w = np.asarray(model.layers[0].attn.qkv_einsum.w.get_value())
    base = np.einsum("BTD,SNDH->SBTNH", x, w)  # by hand
    expected = base * np.concatenate([np.ones((1, 2, 8)), vector])[:, None, None]
    assert np.abs(expected - base).max() > 0.5 * np.abs(base).max()  # a no-op could not pass
    merged = ia3_nnx.merge(adapted)
    for module in (adapted.layers[0].attn.qkv_einsum, merged.layers[0].attn.qkv_einsum):
        out = _qkv(module, x)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)  # measured ~3e-8
        np.testing.assert_array_equal(out[0], _qkv(model.layers[0].attn.qkv_einsum, x)[0])  # q: exactly
    np.testing.assert_array_equal(merged.layers[0].attn.qkv_einsum.w.get_value()[0], w[0])
    np.testing.assert_allclose(_call(merged), _call(adapted), rtol=1e-5, atol=1e-5)
    assert set(ia3_tunix.hf_adapter(adapted, config)["model"]["layers"]["0"]["self_attn"]) == {"k_proj", "v_proj"}

    # Training (AdamW, weight decay 0.1): k and v move, q has no parameter to move.
    optimizer = nnx.Optimizer(adapted, optax.adamw(0.1, weight_decay=0.1), wrt=ia3_nnx.IA3Vector)

    @nnx.jit
    def step(m, opt):
        def loss(m):
            logits, _ = m(TOKENS, jnp.arange(8)[None], None, jnp.tril(jnp.ones((1, 8, 8), bool)))
            return -jax.nn.log_softmax(logits[0, :-1]).take(TOKENS[0, 1:], axis=-1).diagonal().mean()

        opt.update(m, nnx.grad(loss)(m))

    for _ in range(3):
        step(adapted, optimizer)
    trained = np.asarray(adapted.layers[0].attn.qkv_einsum.ia3_l.get_value())
    assert np.abs(trained - vector).min() > 0.01  # every k and v entry trained
    np.testing.assert_array_equal(
        _qkv(adapted.layers[0].attn.qkv_einsum, x)[0], _qkv(model.layers[0].attn.qkv_einsum, x)[0]
    )
    np.testing.assert_array_equal(ia3_nnx.merge(adapted).layers[0].attn.qkv_einsum.w.get_value()[0], w[0])

    with pytest.raises(ia3_jax.AdapterMismatchError, match="k_proj"):  # a trained k that PEFT would drop
        ia3_tunix.hf_adapter(adapted, config.replace(target_modules=["v_proj", "down_proj"]))

    # Targeting q_proj too: one vector over all of (3, N, H), every slice PEFT's vector of its module.
    full = ia3_tunix.ia3_init(
        model,
        config.replace(target_modules=["q_proj", "k_proj", "v_proj"], feedforward_modules=[]),
        rng=jax.random.key(0),
    )
    assert full.layers[0].attn.qkv_einsum.ia3_l.get_value().shape == (3, 2, 8)
    # PEFT's gemma3 defaults (q_proj, v_proj, down_proj): the q and v slices.
    defaults = ia3_tunix.ia3_init(model, ia3_tunix.default_config(model))
    assert defaults.layers[0].attn.qkv_einsum.ia3_l.get_metadata("ia3_target").slices == (0, (0, 2))


def test_qwix_quantized_tunix_model_is_adapted_and_merged():
    """qwix.quantize_model gives the root model a subclass from module ``abc``: still a Tunix Llama 3."""
    qwix = pytest.importorskip("qwix")
    from ia3_jax import quant

    length = TOKENS.shape[1]
    inputs = (TOKENS, jnp.arange(length)[None], None, jnp.tril(jnp.ones((1, length, length), bool)))
    rules = [qwix.QuantizationRule(module_path=r".*attn.*", weight_qtype=jnp.int8)]
    quantized = qwix.quantize_model(llama_lib.Llama3(LLAMA, rngs=nnx.Rngs(0)), qwix.PtqProvider(rules), *inputs)
    assert type(quantized) is not llama_lib.Llama3  # qwix's subclass (module "abc" in qwix 0.1)
    assert ia3_tunix.family(quantized) == "llama3"
    config = ia3_tunix.default_config(quantized)  # k_proj, v_proj (quantized Einsums), down_proj (float)
    ones = ia3_tunix.ia3_init(quantized, config)
    assert quant.is_quantized(ones.layers[0].attn.k_proj.w) and hasattr(ones.layers[0].attn.k_proj, "ia3_l")
    base = _call(quantized)
    np.testing.assert_array_equal(_call(ones), base)  # vectors at one: the quantized base exactly

    adapted = ia3_tunix.ia3_init(quantized, config.replace(init_ia3_weights=False), rng=jax.random.key(0))
    nnx.update(adapted, jax.tree.map(lambda v: 1 + 0.3 * v, nnx.state(adapted, ia3_nnx.IA3Vector)))
    y = _call(adapted)
    assert np.abs(y - base).max() > 0.1 * np.abs(base).max()  # the vectors act (measured 0.022 of logits 0.16)
    merged = ia3_nnx.merge(adapted)  # output vectors into the int8 scale, down_proj's into its float kernel
    assert quant.is_quantized(merged.layers[0].attn.k_proj.w) and not hasattr(merged.layers[0].attn.k_proj, "ia3_l")
    # measured: max |merged - adapted| 3e-8 (logits up to 0.16)
    np.testing.assert_allclose(_call(merged), y, rtol=0, atol=6e-8)


def test_narrowed_fused_vector_keeps_the_kernel_placement():
    """A sharded qkv_einsum (3, N, D, H), heads over "model": the (k|v, N, H) vector is placed like N (ia3_init
    re-places the narrowed vector from the kernel; jnp.take alone also keeps this placement on jax 0.10)."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
    model = gemma_lib.Gemma3(GEMMA_QKV, rngs=nnx.Rngs(0))
    w = model.layers[0].attn.qkv_einsum.w
    w.set_value(jax.device_put(w.get_value(), NamedSharding(mesh, P(None, "model", None, None))))
    config = ia3_jax.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[])
    vector = ia3_tunix.ia3_init(model, config).layers[0].attn.qkv_einsum.ia3_l
    assert vector.get_value().shape == (2, 2, 8)
    assert vector.get_value().sharding == NamedSharding(mesh, P(None, "model", None))
    assert vector.get_metadata("out_sharding") == (None, "tp", None)  # Tunix's names, read at the kept axes


@pytest.mark.interop
@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_peft_adapters_both_ways_match_inside_tunix(tmp_path, family):
    """PEFT -> Tunix and Tunix -> PEFT, each against the Tunix model loaded from PEFT's merge_and_unload()."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(
        **TINY_SIZES,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    if family == "llama3":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rms_norm_eps=1e-5))
        config, load = LLAMA, llama_params.create_model_from_safe_tensors
    else:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, rms_norm_eps=1e-6))
        config, load = QWEN, qwen_params.create_model_from_safe_tensors
    hf.eval().save_pretrained(tmp_path / "base")
    base = load(str(tmp_path / "base"), config)

    # PEFT -> Tunix: random vectors (init_ia3_weights=False) change the logits by about their own size.
    peft_model = peft.get_peft_model(hf, peft.IA3Config(init_ia3_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "peft_merged")
    adapted, peft_config = ia3_tunix.load_peft(tmp_path / "peft", base)
    assert peft_config.target_modules == ia3_tunix.default_config(base).target_modules
    expected = _call(load(str(tmp_path / "peft_merged"), config))
    scale = np.abs(expected).max()
    assert np.abs(expected - _call(base)).max() > 0.1 * scale  # a no-op could not pass
    assert np.abs(_call(adapted) - expected).max() <= 1e-5 * scale  # measured ~2e-7

    # Tunix -> PEFT: ia3_jax's random vectors, read by PeftModel.from_pretrained, merged by PEFT.
    ours_config = ia3_tunix.default_config(base, init_ia3_weights=False)
    ours = ia3_tunix.ia3_init(base, ours_config, rng=jax.random.key(0))
    ia3_tunix.save_peft(tmp_path / "ours", ours, ours_config)
    twin = type(hf).from_pretrained(tmp_path / "base").eval()
    peft.PeftModel.from_pretrained(twin, tmp_path / "ours").merge_and_unload().save_pretrained(tmp_path / "ours_merged")
    expected = _call(load(str(tmp_path / "ours_merged"), config))
    assert np.abs(expected - _call(base)).max() > 0.1 * scale
    assert np.abs(_call(ours) - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.interop
@pytest.mark.parametrize("fused", ["kv_einsum", "qkv_einsum"])
def test_gemma3_peft_adapters_both_ways_match_inside_tunix(tmp_path, fused):
    """Gemma 3, whose q/k/v projections Tunix fuses (kv_einsum with 4 heads and 2 kv heads: PEFT's gemma3
    defaults q_proj, v_proj, down_proj; qkv_einsum with 2 and 2: k_proj, v_proj, down_proj, q untouched):
    PEFT -> Tunix and Tunix -> PEFT, each against the Tunix model loaded from PEFT's merge_and_unload()."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    heads = 4 if fused == "kv_einsum" else 2
    hf_config = transformers.Gemma3TextConfig(**{**TINY_SIZES, "num_attention_heads": heads}, sliding_window=4)
    hf = transformers.Gemma3ForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path / "base")
    tunix_config = GEMMA if fused == "kv_einsum" else GEMMA_QKV
    targets = {} if fused == "kv_einsum" else dict(target_modules=["k_proj", "v_proj", "down_proj"])

    def load(directory):
        return gemma_params.create_model_from_safe_tensors(str(directory), tunix_config, dtype=jnp.float32)

    base = load(tmp_path / "base")
    base_logits = _call(base)
    x = jax.random.normal(jax.random.key(2), (1, 5, 32))
    base_attn = base.layers[0].attn

    # PEFT -> Tunix, random vectors.
    peft_model = peft.get_peft_model(hf, peft.IA3Config(**targets, init_ia3_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "peft_merged")
    adapted, peft_config = ia3_tunix.load_peft(tmp_path / "peft", base)
    assert set(peft_config.target_modules) == set(targets.get("target_modules", ("q_proj", "v_proj", "down_proj")))
    module = getattr(adapted.layers[0].attn, fused)
    assert module.ia3_l.get_value().shape == ((1, 2, 8) if fused == "kv_einsum" else (2, 2, 8))
    untouched = 0  # k of kv_einsum, q of qkv_einsum: scaled by exactly one
    np.testing.assert_array_equal(module(x)[untouched], getattr(base_attn, fused)(x)[untouched])
    merged = load(tmp_path / "peft_merged")
    expected = _call(merged)
    if fused == "qkv_einsum":  # q_proj kept its weight in PEFT's merge, as in ours
        np.testing.assert_array_equal(
            merged.layers[0].attn.qkv_einsum.w.get_value()[0], base_attn.qkv_einsum.w.get_value()[0]
        )
    scale = np.abs(expected).max()
    assert np.abs(expected - base_logits).max() > 0.1 * scale  # a no-op could not pass
    assert np.abs(_call(adapted) - expected).max() <= 1e-5 * scale  # measured 4e-7 (qkv) to 6e-7 (kv)

    # Tunix -> PEFT: ia3_jax's random vectors, read by PeftModel.from_pretrained, merged by PEFT.
    ours_config = ia3_tunix.default_config(base, init_ia3_weights=False, **targets)
    ours = ia3_tunix.ia3_init(base, ours_config, rng=jax.random.key(0))
    ia3_tunix.save_peft(tmp_path / "ours", ours, ours_config)
    twin = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path / "base").eval()
    read = peft.PeftModel.from_pretrained(twin, tmp_path / "ours")
    assert set(read.peft_config["default"].target_modules) == set(ours_config.target_modules)
    read.merge_and_unload().save_pretrained(tmp_path / "ours_merged")
    merged = load(tmp_path / "ours_merged")
    expected = _call(merged)
    assert np.abs(expected - base_logits).max() > 0.1 * scale
    assert np.abs(_call(ours) - expected).max() <= 1e-5 * np.abs(expected).max()  # measured 4e-7 (qkv) to 6e-7 (kv)
    if fused == "qkv_einsum":  # PEFT got no q_proj vector: its merge keeps q_proj's weight
        np.testing.assert_array_equal(
            merged.layers[0].attn.qkv_einsum.w.get_value()[0], base_attn.qkv_einsum.w.get_value()[0]
        )
    reloaded, _ = ia3_tunix.load_peft(tmp_path / "ours", base)  # and back: the same vectors
    jax.tree.map(np.testing.assert_allclose, ia3_nnx.adapter(reloaded), ia3_nnx.adapter(ours))


@pytest.mark.slow
def test_peft_trainer_trains_only_vectors_and_checkpoint_restores(tmp_path):
    """Tunix's unmodified PeftTrainer: IA3Vector is an nnx.LoRAParam, so only the vectors train and are saved."""
    from tunix.sft import checkpoint_manager, peft_trainer

    base = llama_lib.Llama3(LLAMA, rngs=nnx.Rngs(0))
    model = ia3_tunix.ia3_init(base, ia3_tunix.default_config(base))
    base_before = nnx.state(model, nnx.Not(ia3_nnx.IA3Vector))
    tokens = np.random.default_rng(0).integers(0, 128, (4, 8)).astype(np.int32)
    data = [peft_trainer.TrainingInput(input_tokens=tokens, input_mask=np.ones_like(tokens, bool))] * 8

    def model_inputs(batch):
        batch_size, length = batch.input_tokens.shape
        return {
            "input_tokens": batch.input_tokens,
            "input_mask": batch.input_mask,
            "positions": jnp.broadcast_to(jnp.arange(length), (batch_size, length)),
            "attention_mask": jnp.broadcast_to(
                jnp.tril(jnp.ones((length, length), bool)), (batch_size, length, length)
            ),
        }

    def loss(m):
        return float(peft_trainer._default_loss_fn(m, **model_inputs(data[0])))

    first = loss(model)
    training = peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=8, checkpoint_root_directory=str(tmp_path))
    trainer = peft_trainer.PeftTrainer(model, optax.adam(0.1), training).with_gen_model_input_fn(model_inputs)
    trainer.train(data)
    assert loss(model) < first
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Not(ia3_nnx.IA3Vector)), base_before)
    trained = ia3_nnx.adapter(model)
    assert np.abs(trained["layers"]["0"]["attn"]["k_proj"]["ia3_l"] - 1).max() > 0.01

    fresh = ia3_tunix.ia3_init(base, ia3_tunix.default_config(base))
    step, _ = checkpoint_manager.CheckpointManager(str(tmp_path)).maybe_restore(fresh, restore_only_lora_params=True)
    assert step == 8
    jax.tree.map(np.testing.assert_array_equal, ia3_nnx.adapter(fresh), trained)
    merged = ia3_nnx.merge(model)  # the trained model, served without vectors
    np.testing.assert_allclose(_call(merged), _call(model), rtol=1e-4, atol=1e-4)
