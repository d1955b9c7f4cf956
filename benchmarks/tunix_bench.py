"""IA3 on a Tunix model (issue 12): Tunix's Llama-3.2-1B, random bf16 weights, one AdamW step per iteration.

Modes, each trained through ``nnx.split`` states under one donated `jax.jit` step:
  ia3    ``ia3_jax.tunix.ia3_init`` with PEFT's llama defaults (k_proj, v_proj, down_proj), the
         `ia3_jax.nnx.IA3Vector`s trained;
  floor  the same model without vectors, one weight trained (layer 0's input RMSNorm scale): the
         cost of the frozen forward and backward pass that any adapter pays.

The weights are drawn directly in bf16 from the model's abstract state (`nnx.eval_shape`), so the
peak memory holds no float32 copy. The PyTorch side of the comparison is `benchmarks.torch_bench`
on the same configuration (``LLAMA32_1B``), run by ``benchmarks/run.py`` as ``torch:*:*:llama32-1b``.

    python benchmarks/tunix_bench.py --mode ia3              # GPU: 8 x 1024
    python benchmarks/tunix_bench.py --mode ia3 --cpu-tiny   # seconds: a 2-layer float32 model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `ia3_jax` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ia3_jax.nnx  # noqa: E402
import ia3_jax.tunix  # noqa: E402
from benchmarks import jax_bench  # noqa: E402

MODES = ("ia3", "floor")


def tunix_config(cpu_tiny: bool) -> Any:
    """Tunix's own Llama-3.2-1B configuration, or a 2-layer model of the same kind for the CPU."""
    from tunix.models.llama3 import model as llama3

    if not cpu_tiny:
        return llama3.ModelConfig.llama3p2_1b()
    return llama3.ModelConfig(
        num_layers=2, vocab_size=256, embed_dim=64, hidden_dim=128, num_heads=4, head_dim=16, num_kv_heads=2,
        rope_theta=500_000, norm_eps=1e-5, weight_tying=True,
    )  # fmt: skip


def build(config: Any, dtype: Any, seed: int = 0) -> nnx.Module:
    """The Tunix Llama3 with N(0, 0.02) weights drawn in `dtype` (norm scales at one), no float32 copy made."""
    from tunix.models.llama3 import model as llama3

    abstract = nnx.eval_shape(lambda: llama3.Llama3(config, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    leaves, treedef = jax.tree.flatten(state)

    @jax.jit
    def draw(key):
        keys = jax.random.split(key, len(leaves))
        return [
            jnp.ones(x.shape, dtype) if len(x.shape) == 1 else 0.02 * jax.random.normal(k, x.shape, dtype)
            for x, k in zip(leaves, keys)
        ]

    return nnx.merge(graphdef, treedef.unflatten(draw(jax.random.key(seed))))


def _floor_weight(path: tuple[Any, ...], _value: Any) -> bool:
    return tuple(path[:3]) == ("layers", 0, "input_layernorm")


def causal_lm_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in float32 (as `benchmarks.torch_bench.causal_lm_loss`)."""
    logits = logits[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def split_for(model: nnx.Module, mode: str) -> tuple[Any, Any, Any, Any]:
    """``(model, graphdef, trainable, frozen)`` for one mode; ia3 adds the vectors in place (no clone)."""
    if mode == "ia3":
        model = ia3_jax.tunix.ia3_init(model, ia3_jax.tunix.default_config(model), copy=False)
        wrt: Any = ia3_jax.nnx.IA3Vector
    elif mode == "floor":
        wrt = _floor_weight
    else:
        raise ValueError(f"unknown mode {mode!r}: use one of {MODES}.")
    graphdef, trainable, frozen = nnx.split(model, wrt, ...)
    return model, graphdef, trainable, frozen


def loss_fn(graphdef: Any, seq: int):
    """``loss(trainable, frozen, ids)``: the Tunix model's float32 next-token loss on ``(batch, seq)`` ids."""
    positions = jnp.arange(seq)[None]
    mask = jnp.tril(jnp.ones((1, seq, seq), bool))

    def loss(trainable, frozen, ids):
        model = nnx.merge(graphdef, trainable, frozen)
        batch = ids.shape[0]
        logits, _ = model(ids, jnp.broadcast_to(positions, ids.shape), None, jnp.broadcast_to(mask, (batch, seq, seq)))
        return causal_lm_loss(logits, ids)

    return loss


def bench_train(mode: str, workload: jax_bench.Workload, cpu_tiny: bool = False) -> dict[str, Any]:
    """Median step time (IQR), tokens/s and peak memory of one mode on the Tunix Llama3."""
    config = tunix_config(cpu_tiny)
    _, graphdef, trainable, frozen = split_for(build(config, workload.config.param_dtype), mode)
    optimizer = optax.adamw(jax_bench.LEARNING_RATE)
    opt_state = optimizer.init(trainable)
    ids = jax.random.randint(jax.random.key(1), (workload.batch, workload.seq), 0, config.vocab_size)
    start = time.perf_counter()
    step = jax_bench.train_step(loss_fn(graphdef, workload.seq), optimizer)  # trainable, opt_state donated
    compiled = step.lower(trainable, opt_state, frozen, ids).compile()
    compile_s = time.perf_counter() - start
    times, losses = jax_bench.timed_steps(compiled, (trainable, opt_state), frozen, ids, workload)
    step_s = statistics.median(times)
    return {
        "model": "tunix:llama3p2_1b" if not cpu_tiny else "tunix:tiny",
        "tunix_config": {
            k: v for k, v in dataclasses.asdict(config).items() if k not in ("shd_config", "remat_config")
        },
        "trainable_params": int(sum(x.size for x in jax.tree.leaves(trainable))),
        "frozen_bytes": jax_bench.nbytes(frozen),
        "compile_s": compile_s,
        "step_s": step_s,
        "step_s_iqr": jax_bench.summary(times)["iqr_s"],
        "step_s_all": times,
        "tokens_per_s": workload.tokens / step_s,
        "peak_bytes": jax_bench.peak_bytes(),
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="ia3")
    parser.add_argument("--cpu-tiny", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    workload = jax_bench.Workload()
    if args.cpu_tiny:
        workload = jax_bench.Workload(
            config=jax_bench.llama.TINY_F32, batch=2, seq=16, warmup=1, steps=2, min_time_s=0.0
        )
    result = bench_train(args.mode, workload, args.cpu_tiny)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(
        f"{args.mode}: {result['tokens_per_s']:.0f} tok/s, {1e3 * result['step_s']:.1f} ms, peak {result['peak_bytes']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
