"""Adapter checkpoint size on disk for T5-base with PEFT's default IA3 targets, next to the full model.

The base is never allocated: its shapes come from `jax.eval_shape`, and only the adapter is
written, with `ia3_jax.save_adapter`.

    python benchmarks/checkpoint_size.py
"""

from __future__ import annotations

import math
import os
import tempfile

import jax
from transformers import FlaxT5ForConditionalGeneration, T5Config

import ia3_jax
from ia3_jax import hf

# t5-base: d_model 768, 12 + 12 layers, 12 heads of 64, d_ff 3072, vocabulary 32128, tied embeddings.
T5_BASE = T5Config(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12)


def _size(tree) -> tuple[int, int]:
    """(number of values, bytes) of a tree of arrays or ShapeDtypeStructs."""
    leaves = jax.tree.leaves(tree)
    return sum(math.prod(x.shape) for x in leaves), sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)


def _bytes_on_disk(directory: str) -> tuple[int, int]:
    """(sum of file sizes, allocated bytes) under `directory`."""
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    return sum(os.path.getsize(f) for f in files), sum(os.stat(f).st_blocks * 512 for f in files)


def main() -> None:
    model = FlaxT5ForConditionalGeneration(T5_BASE, _do_init=False)
    base = jax.eval_shape(lambda rng: model.init_weights(rng, (1, 1)), jax.random.key(0))
    config = hf.default_config(model)
    abstract = jax.eval_shape(lambda p: ia3_jax.split(ia3_jax.ia3_init(p, config))[0], base)
    # Trained-looking vectors (1 + noise): orbax compresses, and the all-ones vectors of a fresh
    # adapter would understate the size.
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    adapter = treedef.unflatten(
        [1 + 0.05 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)]
    )

    n_base, base_bytes = _size(base)
    n_adapter, adapter_bytes = _size(adapter)
    with tempfile.TemporaryDirectory() as tmp:
        path = ia3_jax.save_adapter(os.path.join(tmp, "adapter"), adapter, config)
        file_bytes, allocated = _bytes_on_disk(str(path))
        n_files = sum(len(names) for _, _, names in os.walk(path))

    print(f"T5-base, IA3 targets {list(config.target_modules)}, feedforward {list(config.feedforward_modules)}")
    n_leaves = len(jax.tree.leaves(adapter))
    print(f"  IA3 vectors: {n_leaves} leaves, {n_adapter:,d} values ({adapter_bytes / 1e3:.1f} kB float32)")
    print(f"  adapter checkpoint on disk: {file_bytes / 1e3:.1f} kB in {n_files} files", end="")
    print(f" ({allocated / 1e3:.1f} kB allocated)")
    print(f"  full model: {n_base:,d} params = {base_bytes / 1e6:.1f} MB float32")
    print(f"  adapter / full model: {n_adapter / n_base:.4%} of the params, {file_bytes / base_bytes:.4%} of the bytes")


if __name__ == "__main__":
    main()
