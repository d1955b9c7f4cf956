"""IA3 training on a qwix weight-only quantized base against a bf16 base: peak memory and tokens/s.

The model is the ~1.1B Llama of `benchmarks.llama` (hidden 2048, 22 layers, 32 heads, 4 KV heads,
intermediate 5632, vocab 32000), random weights, unrolled layers (qwix's ``quantize_params`` does not
handle ``nn.scan``-stacked kernels: its per-layer quantization axes would be read on the stacked
kernel). The variants:

  bf16  the bf16 base as it is;
  int8  every ``nn.Dense`` (the 7 projections of each layer and ``lm_head``) quantized by qwix PTQ,
        int8 weights with per-output-channel bf16 scales; the embedding stays bf16;
  int4  the same with int4 weights (``--variants bf16,int8,int4``).

Each variant trains PEFT's default llama IA3 adapter (``k_proj``, ``v_proj``, ``down_proj``; float32
vectors; AdamW) with the base as a non-differentiated jit argument, in its own process so that
``peak_bytes_in_use`` belongs to it alone. The quantized base is made from the bf16 one on the device
by one jitted, donating ``qwix.quantize_params``; ``setup_peak_bytes`` is the peak before training.

GPU command (one H200, from the repository root; needs jax, flax, optax, numpy and qwix, here qwix from
the carried wheel installed into /tmp/site as `benchmarks/h200.sh` does; about 5 minutes; writes JSON):

  PYTHONPATH=/tmp/site python3 benchmarks/quantized.py --out "$OUT/quantized.json"

Options: ``--batch 8 --seq 1024 --steps 10 --warmup 2 --attention cudnn`` (the defaults; a variant that
cuDNN's fused attention refuses is measured again with ``--attention xla``, and says so), ``--remat``,
``--variants bf16,int8``. ``--cpu-tiny`` runs a 1-layer model in seconds, all variants in one
process (no peak memory on the CPU); the tests use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `ia3_jax` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import optax
import qwix

import ia3_jax
from benchmarks import jax_bench, llama
from benchmarks.jax_bench import IA3_CONFIG, LEARNING_RATE, Workload

QTYPES = {"int8": jnp.int8, "int4": jnp.int4}


def quantized_model(model: llama.Llama, params: dict[str, Any], qtype: Any) -> tuple[Any, dict[str, Any]]:
    """``(qwix PTQ model, quantized params)``: every Dense weight-only quantized, per output channel.

    `params` are donated (the float copy is freed as the quantized one is written).
    """
    qmodel = qwix.quantize_model(model, qwix.PtqProvider([qwix.QuantizationRule(module_path=".*", weight_qtype=qtype)]))
    ids = jnp.zeros((1, 8), jnp.int32)
    abstract = jax.eval_shape(qmodel.init, jax.random.key(0), ids)["params"]
    quantize = jax.jit(lambda p: qwix.quantize_params(p, abstract), donate_argnums=0)
    return qmodel, quantize(params)


def memory_analysis(compiled: Any) -> dict[str, int]:
    """XLA's static memory plan of the compiled step (arguments, outputs, temporaries), any backend."""
    memory = compiled.memory_analysis()
    if memory is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    return {f: int(getattr(memory, f)) for f in fields}


def bench_variant(variant: str, workload: Workload) -> dict[str, Any]:
    """Tokens/s, step time and peak memory of IA3 training on one base."""
    model = llama.Llama(workload.config)
    params = llama.init_params(model, jax.random.key(0))
    if variant != "bf16":
        model, params = quantized_model(model, params, QTYPES[variant])
    config = IA3_CONFIG
    adapter, base = ia3_jax.split(ia3_jax.ia3_init(params, config))
    del params
    forward = ia3_jax.apply_fn(model.apply, config)

    def loss(adapter, base, ids):
        logits = forward({"params": ia3_jax.join(base, adapter)}, ids)
        return llama.causal_lm_loss(logits, ids)

    optimizer = optax.adamw(LEARNING_RATE)
    opt_state = optimizer.init(adapter)
    ids = jax_bench.batch(workload)
    start = time.perf_counter()
    compiled = jax_bench.train_step(loss, optimizer).lower(adapter, opt_state, base, ids).compile()
    compile_s = time.perf_counter() - start
    setup_peak = jax_bench.peak_bytes()
    times, losses = jax_bench.timed_steps(compiled, (adapter, opt_state), base, ids, workload)
    step_s = statistics.median(times)
    device = jax.devices()[0]
    return {
        "variant": variant,
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "attention": workload.config.attention,
        "remat": workload.config.remat,
        "base_bytes": jax_bench.nbytes(base),
        "adapter_params": int(sum(x.size for x in jax.tree.leaves(adapter))),
        "compile_s": compile_s,
        "step_s": step_s,
        "step_s_all": times,
        "tokens_per_s": workload.tokens / step_s,
        "setup_peak_bytes": setup_peak,
        "peak_bytes": jax_bench.peak_bytes(),
        "losses": losses,
        "memory_analysis": memory_analysis(compiled),
    }


def _workload(args: argparse.Namespace) -> Workload:
    if args.cpu_tiny:
        return Workload(
            config=dataclasses.replace(llama.TINY, num_layers=1), batch=2, seq=16, warmup=1, steps=2, min_time_s=0.0
        )
    attention = None if args.attention == "none" else args.attention
    config = dataclasses.replace(llama.LlamaConfig(), remat=args.remat, attention=attention)
    return Workload(config=config, batch=args.batch, seq=args.seq, warmup=args.warmup, steps=args.steps)


def _in_subprocess(variant: str, argv: list[str]) -> dict[str, Any]:
    """One variant in a fresh process; a failure is recorded, not raised, so the others still run."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--variant", variant]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"variant": variant, "error": proc.stderr[-4000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def versions() -> dict[str, str]:
    """Library versions; no device is touched (the parent process must leave the GPU to the variants)."""
    import flax

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__, "qwix": qwix.__version__}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    parser.add_argument("--variants", default="bf16,int8", help="comma-separated: bf16, int8, int4")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, JSON on stdout
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--remat", action="store_true", help="recompute each layer in the backward pass")
    parser.add_argument("--attention", default="cudnn", help="dot_product_attention implementation: cudnn, xla, none")
    parser.add_argument("--cpu-tiny", action="store_true", help="1-layer model, seconds on a CPU")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    workload = _workload(args)
    if args.variant:
        print(json.dumps(bench_variant(args.variant, workload)))
        return {}
    variants = args.variants.split(",")
    unknown = set(variants) - {"bf16", *QTYPES}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}: choose from bf16, int8, int4")
    results: dict[str, Any] = {
        "versions": versions(),
        "workload": {
            "batch": workload.batch,
            "seq": workload.seq,
            "steps": workload.steps,
            "warmup": workload.warmup,
            "config": workload.config.to_dict(),
        },
        "runs": [],
    }
    for variant in variants:
        if args.cpu_tiny:
            run = bench_variant(variant, workload)
        else:
            run = _in_subprocess(variant, argv)
            if "error" in run and args.attention == "cudnn":  # cuDNN may refuse a shape: measure with XLA's
                run = {**_in_subprocess(variant, [*argv, "--attention", "xla"]), "cudnn_error": run["error"]}
        results["runs"].append(run)
        summary = {k: run.get(k) for k in ("tokens_per_s", "peak_bytes", "base_bytes", "attention")}
        print(f"{variant}: {summary if 'error' not in run else 'error'}", file=sys.stderr)
        if args.out:  # after every variant: a run cut by a time limit keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
    if not args.out:
        print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
