"""Tiny Flax models shared by the core tests (PEFT's IA3 test matrix: MLP, Conv1D-style, Conv2d, Conv3d; an NNX
module of Tunix's ``Einsum`` kind)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class MLP(nn.Module):
    """PEFT's test MLP: lin0 -> relu -> drop -> lin1 -> relu -> lin2 (classifier)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(20, name="lin0", param_dtype=self.dtype, dtype=self.dtype)(x))
        h = nn.relu(nn.Dense(12, name="lin1", param_dtype=self.dtype, dtype=self.dtype)(h))
        return nn.Dense(3, name="lin2", param_dtype=self.dtype, dtype=self.dtype)(h)


class TransposedDense(nn.Module):
    """A dense layer whose kernel is stored (out, in), as Hugging Face's FlaxConv1D (GPT-2)."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.3), (self.features, x.shape[-1]))
        bias = self.param("bias", nn.initializers.normal(0.3), (self.features,))
        return x @ kernel.T + bias


class GPT2StyleMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(TransposedDense(24, name="c_fc")(x))
        return TransposedDense(8, name="c_proj")(h)


class ConvNet(nn.Module):
    """Conv layers of 1, 2 or 3 spatial dims (channels last), the middle one grouped."""

    spatial: int = 2

    @nn.compact
    def __call__(self, x):
        k = (3,) * self.spatial
        h = nn.relu(nn.Conv(8, k, name="conv0")(x))
        h = nn.relu(nn.Conv(12, k, feature_group_count=4, name="conv1")(h))
        h = nn.Conv(6, k, name="conv2")(h)
        return nn.Dense(2, name="head")(h.reshape(h.shape[0], -1))


class Attention(nn.Module):
    """Multi-axis DenseGeneral projections: (d) -> (heads, head_dim) -> (d)."""

    heads: int = 2
    head_dim: int = 4

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((self.heads, self.head_dim), name="q")(x)
        k = nn.DenseGeneral((self.heads, self.head_dim), name="k")(x)
        v = nn.DenseGeneral((self.heads, self.head_dim), name="v")(x)
        w = jax.nn.softmax(jnp.einsum("...qhd,...khd->...hqk", q, k) / self.head_dim**0.5)
        o = jnp.einsum("...hqk,...khd->...qhd", w, v)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="o")(o)


def init(model: nn.Module, x: jax.Array, seed: int = 0):
    return model.init(jax.random.key(seed), x)["params"]


def init_from_numpy(model: nn.Module, x: jax.Array, seed: int = 0):
    """Params of `model`'s shapes drawn with numpy, N(0, 1/fan_in) (lecun-normal-like).

    For models whose XLA initialisers take seconds to compile on a CPU (3-D convs: ~15 s).
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(seed), x)["params"]

    def draw(s: jax.ShapeDtypeStruct) -> jax.Array:
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
        return jnp.asarray(rng.normal(0.0, fan_in**-0.5, s.shape), s.dtype)

    return jax.tree.map(draw, shapes)


class TunixStyleEinsum(nnx.Module):
    """Tunix's ``Einsum``: one weight ``w`` (not ``kernel``), ``jnp.einsum(einsum_str, x, w)``."""

    def __init__(self, einsum_str: str, shape: tuple[int, ...], rngs: nnx.Rngs):
        self.einsum_str = einsum_str
        self.w = nnx.Param(nnx.initializers.normal(0.3)(rngs.params(), shape))

    def __call__(self, x):
        return jnp.einsum(self.einsum_str, x, self.w.value)
