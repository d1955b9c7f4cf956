"""A lean Flax Linen Llama for the benchmarks: fused attention, optional `nn.remat` and `nn.scan`.

Module names follow Hugging Face's Llama (``layers.<i>.self_attn.k_proj``, ``mlp.down_proj``, ...), so
PEFT's default IA3 targets for llama (``k_proj``, ``v_proj``, ``down_proj``) match unchanged. With
``scan=True`` the layers are one ``nn.scan`` module named ``layers`` whose kernels carry the layer
axis first: pass ``layouts=ia3_jax.infer_layouts(...)`` to `ia3_jax.ia3_init` there.

Example:
  >>> config = LlamaConfig(scan=True)                      # the ~1.1B benchmark model
  >>> model = Llama(config)
  >>> params = init_params(model, jax.random.key(0))       # bf16, no float32 copy on the way
  >>> logits = model.apply({"params": params}, ids)        # ids: (batch, seq) int32
  >>> loss = causal_lm_loss(logits, ids)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.ad_checkpoint import checkpoint_name

import ia3_jax


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama hyper-parameters; the defaults are the ~1.1B benchmark model (TinyLlama's shape).

    Attributes:
      attention: ``implementation`` of `jax.nn.dot_product_attention`: None (JAX picks), "xla" or
        "cudnn" (fused flash attention, GPU with bf16/fp16 only).
      remat: recompute each layer in the backward pass (`nn.remat`), saving what `remat_policy` says.
      remat_policy: "full" saves nothing inside a layer; "mlp_hidden" saves everything but the MLP's
        hidden activation ``silu(gate) * up``, which the backward pass recomputes from the saved
        gate and up outputs (it is only needed there for the gradient of a down_proj IA3 vector).
      scan: one `nn.scan` over the layers (compiles once per layer instead of once per model).
    """

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_layers: int = 22
    num_heads: int = 32
    num_kv_heads: int = 4
    intermediate_size: int = 5632
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.bfloat16
    attention: str | None = None
    remat: bool = False
    remat_policy: str = "full"
    scan: bool = False
    tie_embeddings: bool = False  # the PyTorch twin only (benchmarks.torch_bench); the lean model has an lm_head

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values, dtypes by name: ``TINY.to_dict()["dtype"] == "bfloat16"``."""
        return {k: jnp.dtype(v).name if k.endswith("dtype") else v for k, v in dataclasses.asdict(self).items()}


# `nn.remat` policies by name (LlamaConfig.remat_policy); None: jax.checkpoint's default, nothing saved.
REMAT_POLICIES = {
    "full": None,
    "mlp_hidden": jax.checkpoint_policies.save_anything_except_these_names("mlp_hidden"),
    "ia3": ia3_jax.remat_policy(),  # IA3's scaled activations and elementwise results recomputed
}
# Llama-3.2-1B's shape (Tunix's ModelConfig.llama3p2_1b): issue 12's PyTorch PEFT side.
LLAMA32_1B = LlamaConfig(
    vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192,
    rope_theta=500_000.0, tie_embeddings=True,
)  # fmt: skip
# Llama-3-8B's shape: how costs that do not grow with the model (a call's dispatch) weigh at a larger size.
LLAMA3_8B = LlamaConfig(
    vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
    rope_theta=500_000.0,
)  # fmt: skip
TINY = LlamaConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
TINY_F32 = dataclasses.replace(TINY, dtype=jnp.float32, param_dtype=jnp.float32)  # CPU checks: exact, and fast there


class RMSNorm(nn.Module):
    """Hugging Face's Llama RMSNorm: normalise in float32, cast, then scale by ``weight``."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(self.dtype) * normed.astype(self.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape (seq_len, head_dim), Hugging Face's rotate-half convention."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates (batch, seq, heads, head_dim) by the (seq, head_dim) tables."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def _dense(config: LlamaConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=config.dtype, param_dtype=config.param_dtype, name=name)


class Attention(nn.Module):
    """Grouped-query causal self-attention through `jax.nn.dot_product_attention`.

    With ``cache=(k, v)`` (each ``(batch, max_len, kv_heads, head_dim)``) and ``index`` (the position
    of ``x[:, 0]``), the new keys and values are written at ``index`` and the queries attend to every
    cached position up to their own (XLA attention with a mask); returns ``(out, new_cache)``.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], cache: Any = None, index: Any = None) -> Any:
        c = self.config
        batch, seq, _ = x.shape
        q = _dense(c, c.num_heads * c.head_dim, "q_proj")(x).reshape(batch, seq, c.num_heads, c.head_dim)
        k = _dense(c, c.num_kv_heads * c.head_dim, "k_proj")(x).reshape(batch, seq, c.num_kv_heads, c.head_dim)
        v = _dense(c, c.num_kv_heads * c.head_dim, "v_proj")(x).reshape(batch, seq, c.num_kv_heads, c.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=c.attention)
            return _dense(c, c.hidden_size, "o_proj")(out.reshape(batch, seq, c.hidden_size))
        k_cache = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, index, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, index, 0, 0))
        positions = index + jnp.arange(seq)
        mask = jnp.arange(k_cache.shape[1])[None, :] <= positions[:, None]  # (seq, max_len)
        out = jax.nn.dot_product_attention(q, k_cache, v_cache, mask=mask[None, None], implementation="xla")
        return _dense(c, c.hidden_size, "o_proj")(out.reshape(batch, seq, c.hidden_size)), (k_cache, v_cache)


class MLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        hidden = nn.silu(_dense(c, c.intermediate_size, "gate_proj")(x)) * _dense(c, c.intermediate_size, "up_proj")(x)
        hidden = checkpoint_name(hidden, "mlp_hidden")
        return _dense(c, c.hidden_size, "down_proj")(hidden)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; ``(x, rope) -> (x, None)`` so that `nn.scan` can carry x.

    With a KV ``cache`` (and ``index``): ``(x, new_cache)``.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array], cache: Any = None, index: Any = None
    ) -> tuple[jax.Array, Any]:
        c = self.config
        norm = functools.partial(RMSNorm, c.rms_norm_eps, c.dtype, c.param_dtype)
        attention = Attention(c, name="self_attn")
        if cache is None:
            x = x + attention(norm(name="input_layernorm")(x), rope)
        else:
            out, cache = attention(norm(name="input_layernorm")(x), rope, cache, index)
            x = x + out
        x = x + MLP(c, name="mlp")(norm(name="post_attention_layernorm")(x))
        return x, cache


class Unrolled(nn.Module):
    """The layers one after another, named ``0``, ``1``, ... as in Hugging Face's param tree."""

    config: LlamaConfig
    layer: Any

    @nn.compact
    def __call__(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array], caches: Any = None, index: Any = None
    ) -> tuple[jax.Array, Any]:
        new = []
        for i in range(self.config.num_layers):
            if caches is None:
                x, _ = self.layer(self.config, name=str(i))(x, rope)
            else:
                x, cache = self.layer(self.config, name=str(i))(x, rope, caches[i], index)
                new.append(cache)
        return x, (tuple(new) if caches is not None else None)


class Llama(nn.Module):
    """Causal LM: ``(batch, seq) int32 -> (batch, seq, vocab)`` logits in ``config.dtype``.

    Decoding (unrolled layers only): ``model.apply(v, ids, cache=init_cache(...), index=i)`` returns
    ``(logits, new_cache)``, ``ids`` being the tokens at positions ``i, i + 1, ...``; see `generate`.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, cache: Any = None, index: Any = None) -> Any:
        c = self.config
        x = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype, name="embed_tokens")(
            input_ids
        )
        if cache is None:
            rope = rope_tables(input_ids.shape[1], c.head_dim, c.rope_theta)
        else:
            cos, sin = rope_tables(cache[0][0].shape[1], c.head_dim, c.rope_theta)
            seq = input_ids.shape[1]
            rope = (jax.lax.dynamic_slice_in_dim(cos, index, seq), jax.lax.dynamic_slice_in_dim(sin, index, seq))
        layer = DecoderLayer
        if c.remat:
            layer = nn.remat(layer, prevent_cse=not c.scan, policy=REMAT_POLICIES[c.remat_policy])
        if c.scan:
            if cache is not None:
                raise ValueError("the KV cache path is for unrolled layers (scan=False)")
            stack = nn.scan(
                layer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=c.num_layers,
            )(c, name="layers")
            x, _ = stack(x, rope)
        else:
            x, cache = Unrolled(c, layer, name="layers")(x, rope, cache, index)
        x = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="norm")(x)
        logits = _dense(c, c.vocab_size, "lm_head")(x)
        return logits if cache is None else (logits, cache)


def init_cache(config: LlamaConfig, batch: int, max_len: int) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """An empty KV cache: per layer ``(k, v)``, each ``(batch, max_len, kv_heads, head_dim)`` in ``config.dtype``."""
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    return tuple((jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype)) for _ in range(config.num_layers))


def generate(apply: Any, params: Any, prompt: jax.Array, new_tokens: int, config: LlamaConfig) -> jax.Array:
    """Greedy decoding with a KV cache: ``(batch, prompt_len)`` -> ``(batch, new_tokens)`` token ids.

    `apply` is ``model.apply`` (or ``ia3_jax.apply_fn(model.apply, config)``). One prefill call over the
    prompt, then one call per new token inside a `jax.lax.scan` (jit the whole function).

    Example:
      >>> out = jax.jit(lambda p, x: generate(model.apply, p, x, 256, config))(params, prompt)
    """
    batch, prompt_len = prompt.shape
    cache = init_cache(config, batch, prompt_len + new_tokens)
    logits, cache = apply({"params": params}, prompt, cache=cache, index=0)
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def step(carry, i):
        token, cache = carry
        logits, cache = apply({"params": params}, token[:, None], cache=cache, index=prompt_len + i)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return (nxt, cache), token

    (_, _), tokens = jax.lax.scan(step, (token, cache), jnp.arange(new_tokens))
    return tokens.T


def init_params(model: nn.Module, rng: jax.Array, seq_len: int = 8) -> dict[str, Any]:
    """Random params, made on the device in ``param_dtype`` by one jitted init (no host copy)."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return jax.jit(lambda key: model.init(key, ids)["params"])(rng)


def causal_lm_loss(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy, in float32 (as Hugging Face's ``labels=`` loss)."""
    logits = logits[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, input_ids[:, 1:]).mean()
