"""IA3 training throughput on 1 device against 2 (or more): tokens/s and scaling efficiency.

The workload: the ~1.1B Llama of `benchmarks.llama` (hidden 2048, 22 layers stacked with ``nn.scan``
and rematerialised with ``nn.remat``, 32 query / 4 KV heads, SwiGLU 5632, vocab 32000, RoPE,
``jax.nn.dot_product_attention``), random bfloat16 weights, IA3 on PEFT's llama targets
(`benchmarks.jax_bench.IA3_CONFIG`: k_proj, v_proj, down_proj; down_proj feedforward) with float32
vectors and AdamW, next-token loss on random tokens. Only jax, flax, optax, numpy and ia3_jax are
needed (no transformers).

Each layout runs on a mesh of 1 device and then on a mesh of N devices, in one process, with the
same per-device batch (weak scaling), so the scaling efficiency is
``tokens/s(N) / (N * tokens/s(1))``. Layouts (the IA3 vectors and Adam state always follow their
kernels through `ia3_jax.adapter_shardings` / `optimizer_shardings`):

- ``dp``: frozen base replicated, batch split; only the IA3 gradients (135,168 floats) are all-reduced.
- ``fsdp``: every base leaf split over the devices on its largest divisible axis (not the layer axis);
  weights are all-gathered layer by layer inside the scan.
- ``tp``: Megatron tensor parallelism (q/k/v/gate/up split by output, o/down by input features,
  lm_head by vocab), batch not split.

Median of ``--steps`` timed, synchronised steps after a compile-and-warm-up step.

Run on the 2-GPU machine (one invocation measures 1 and 2 GPUs and prints the efficiency; four
compilations of the 1.1B model plus 4 x 11 steps, a few minutes; a layout that fails is recorded
under "errors" in the JSON and the others still run)::

    python benchmarks/scaling.py --devices 1,2 --out benchmarks/scaling_results.json

(``--layouts dp`` alone, or ``--steps``, ``--batch``, ``--seq`` to trim or grow the run.)

Quick check on the CPU (seconds; simulates 2 devices)::

    python benchmarks/scaling.py --cpu-tiny --out /tmp/scaling_tiny.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

if "--cpu-tiny" in sys.argv:  # must precede the jax import: simulated host devices
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import json
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a bare checkout too
import ia3_jax
from benchmarks import llama
from benchmarks.jax_bench import IA3_CONFIG

# The ~1.1B model under nn.scan + full nn.remat; the tiny one in float32 for the CPU check.
MODEL = dataclasses.replace(llama.LlamaConfig(), scan=True, remat=True)
TINY = dataclasses.replace(llama.TINY_F32, scan=True, remat=True)

_TP_BY_OUTPUT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
_TP_BY_INPUT = ("o_proj", "down_proj")


def base_spec(path: tuple[str, ...], shape: tuple[int, ...], layout: str, n: int) -> P:
    """The PartitionSpec of one base leaf under `layout` on `n` devices."""
    stacked = path[0] == "layers"  # axis 0 is the scan's layer axis: never split it
    if layout in ("dp", "single"):
        return P()
    if layout == "fsdp":
        candidates = [a for a in range(int(stacked), len(shape)) if shape[a] % n == 0]
        if not candidates:
            return P()
        axis = max(candidates, key=lambda a: shape[a])
        return P(*[("data" if a == axis else None) for a in range(len(shape))])
    if layout == "tp":
        module = path[-2] if len(path) >= 2 else ""
        if path[-1] == "kernel" and module in _TP_BY_OUTPUT:
            return P(*([None] * (len(shape) - 1)), "model")
        if path[-1] == "kernel" and module in _TP_BY_INPUT:
            return P(*([None] * (len(shape) - 2)), "model", None)
        return P()
    raise ValueError(f"unknown layout {layout!r}")


def make_mesh(n: int, layout: str) -> Mesh:
    shape = (1, n) if layout == "tp" else (n, 1)
    devices = np.array(jax.devices()[:n]).reshape(shape)
    return Mesh(devices, ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))


def loss_fn(forward, adapter, base, tokens):
    logits = forward({"params": ia3_jax.join(base, adapter)}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:]).mean()


def measure(cfg: llama.LlamaConfig, layout: str, n: int, batch: int, seq: int, steps: int) -> dict:
    """One training run: compile, warm up, then `steps` timed steps; tokens/s from the median."""
    mesh = make_mesh(n, layout)
    model = llama.Llama(cfg)
    global_batch = batch if layout == "tp" else batch * n
    tokens_shape = jax.ShapeDtypeStruct((global_batch, seq + 1), jnp.int32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens_shape)["params"]
    specs = jax.tree_util.tree_map_with_path(
        lambda path, leaf: base_spec(tuple(k.key for k in path), leaf.shape, layout, n), abstract
    )
    base_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))
    base = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"], out_shardings=base_sh)(
        jax.random.key(0)
    )
    layouts = ia3_jax.infer_layouts(model.apply, {"params": abstract}, tokens_shape)
    adapter, _ = ia3_jax.split(ia3_jax.ia3_init(base, IA3_CONFIG, layouts=layouts))
    adapter_sh = ia3_jax.adapter_shardings(adapter, base, None, IA3_CONFIG, layouts=layouts)
    adapter = jax.device_put(adapter, adapter_sh)

    tx = optax.adamw(1e-3)
    replicated = NamedSharding(mesh, P())
    opt_sh = ia3_jax.optimizer_shardings(tx, adapter, adapter_sh, replicated=replicated)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(adapter)
    tokens_sh = NamedSharding(mesh, P("data", None))
    rng = np.random.default_rng(0)
    tokens = jax.device_put(rng.integers(0, cfg.vocab_size, (global_batch, seq + 1), dtype=np.int32), tokens_sh)

    forward = ia3_jax.apply_fn(model.apply, IA3_CONFIG)

    def step(adapter, opt_state, base, tokens):
        loss, grads = jax.value_and_grad(loss_fn, argnums=1)(forward, adapter, base, tokens)
        updates, opt_state = tx.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, loss

    jitted = jax.jit(
        step,
        in_shardings=(adapter_sh, opt_sh, base_sh, tokens_sh),
        out_shardings=(adapter_sh, opt_sh, replicated),
        donate_argnums=(0, 1),
    )
    t0 = time.perf_counter()
    compiled = jitted.lower(adapter, opt_state, base, tokens).compile()
    compile_s = time.perf_counter() - t0
    adapter, opt_state, loss = compiled(adapter, opt_state, base, tokens)  # warm-up
    first_loss = float(loss)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        adapter, opt_state, loss = compiled(adapter, opt_state, base, tokens)
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    stats = [d.memory_stats() or {} for d in mesh.devices.flat]
    return {
        "layout": layout,
        "devices": n,
        "global_batch": global_batch,
        "seq": seq,
        "tokens_per_s": global_batch * seq / median,
        "step_s_median": median,
        "step_s_all": times,
        "compile_s": compile_s,
        "loss_first": first_loss,
        "loss_last": float(loss),
        "base_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(base))),
        "ia3_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(adapter))),
        "peak_bytes_per_device_so_far": [s.get("peak_bytes_in_use") for s in stats],
        "adapter_specs": {
            jax.tree_util.keystr(p): str(s.spec) for p, s in jax.tree_util.tree_leaves_with_path(adapter_sh)
        },
    }


def efficiencies(runs: list[dict]) -> dict[str, float]:
    """``tokens/s(N) / (N * tokens/s(1))`` per layout and N.

    dp/fsdp grow the global batch with N (weak scaling), tp keeps it and wants an N-times faster
    step: either way the ideal is N times the single device's tokens/s.
    """
    single = [r["tokens_per_s"] for r in runs if r["devices"] == 1]
    if not single:
        return {}
    return {
        f"{r['layout']}_{r['devices']}": r["tokens_per_s"] / (r["devices"] * single[0])
        for r in runs
        if r["devices"] > 1
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,2", help="device counts to measure, e.g. '1,2' (or a single '2')")
    parser.add_argument("--layouts", default="dp,fsdp,tp", help="comma list of dp, fsdp, tp")
    parser.add_argument("--batch", type=int, default=8, help="sequences per device (dp/fsdp), per step (tp)")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="scaling_results.json")
    parser.add_argument("--cpu-tiny", action="store_true", help="tiny model on 2 simulated CPU devices")
    args = parser.parse_args(argv)
    cfg, batch, seq, steps = (TINY, 2, 16, 2) if args.cpu_tiny else (MODEL, args.batch, args.seq, args.steps)
    counts = [int(n) for n in args.devices.split(",")]
    layouts = args.layouts.split(",")
    available = jax.device_count()
    print(f"jax {jax.__version__}, {available} x {jax.devices()[0].device_kind}; model {cfg}", flush=True)
    result = {
        "config": cfg.to_dict(),
        "batch_per_device": batch,
        "seq": seq,
        "steps": steps,
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "runs": [],
        "errors": [],
        "scaling_efficiency": {},
    }

    # On one device every layout is the same program: measure it once, as the baseline of all.
    plan = [("single", 1)] * (1 in counts) + [(layout, n) for n in counts if n > 1 for layout in layouts]
    for layout, n in plan:
        if n > available:
            result["errors"].append({"layout": layout, "devices": n, "error": f"only {available} devices"})
            continue
        try:
            run = measure(cfg, layout, n, batch, seq, steps)
        except Exception as err:
            traceback.print_exc()
            result["errors"].append({"layout": layout, "devices": n, "error": f"{type(err).__name__}: {err}"[:2000]})
            continue
        result["runs"].append(run)
        result["scaling_efficiency"] = efficiencies(result["runs"])
        eff = result["scaling_efficiency"].get(f"{layout}_{n}")
        print(
            f"{layout:>6} on {n} device(s): {run['tokens_per_s']:,.0f} tokens/s, step {run['step_s_median'] * 1e3:.1f} ms "
            f"(compile {run['compile_s']:.0f} s), loss {run['loss_first']:.4f} -> {run['loss_last']:.4f}"
            + ("" if eff is None else f", scaling efficiency {eff:.3f}"),
            flush=True,
        )
        with open(args.out, "w") as f:  # after every run: a run cut short by a time limit keeps what it measured
            json.dump(result, f, indent=2)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"scaling efficiency: {result['scaling_efficiency']}; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
