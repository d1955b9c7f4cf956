"""Where a training step's GPU time goes, by kind of kernel, in JAX and in compiled PyTorch (issue 13).

The benchmarks' workload (Llama ~1.1B, bf16, batch 8 x 1024, float32 next-token loss, AdamW), four
training steps compared: the lean Linen model's IA3 step (``ia3_jax.remat_policy()``, ``optax.flatten(optax.adamw)``, as
the README recommends) and its floor (one norm weight trained, no remat); PEFT's IA3 step and its
floor on HF's ``LlamaForCausalLM`` under ``torch.compile`` with fused AdamW (sdpa attention). Each is
traced over `--steps` steps after warm-up, then timed (wall clock, synchronised per step), and its
kernels' GPU time summed per step into kinds: ``matmul`` (cuBLAS, CUTLASS or Triton GEMMs),
``attention`` (fused attention kernels and cuDNN's helpers of them), ``other`` (elementwise and
reduction fusions, copies, memsets, the optimizer). JAX and PyTorch share the GPU in one process:
JAX does not preallocate here. Tells whether a gap between the
frameworks is IA3's (the difference to each floor) or the base model's (the kinds of the floors).

    python benchmarks/step_profile.py --out step_profile.json     # H200 (PyTorch's own transformers will do)
    python benchmarks/step_profile.py --cpu-tiny                   # seconds: JAX only, on the CPU
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # PyTorch needs its share of the GPU

import jax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks import bank, jax_bench, llama, torch_bench  # noqa: E402

# Inductor's pointwise, reduction and persistent-reduction kernels name the ops they fuse ("mm" among them).
ELEMENTWISE = re.compile(r"^triton_(poi|red|per|for)_")
KINDS = {
    # cudnn::fusion: the flash-attention backward's helpers (dO.O, dQ's conversion, the heads' reduction)
    "attention": re.compile(r"fmha|flash|sdpa|attention|attn|cudnn::fusion", re.IGNORECASE),
    "matmul": re.compile(r"gemm|xmma|nvjet|cutlass|cublas|wgmma|^triton_tem_.*mm|bmm|matmul", re.IGNORECASE),
}


def kind_of(kernel: str) -> str:
    """``"attention"``, ``"matmul"`` or ``"other"`` for a GPU kernel's name (attention is tested first)."""
    if ELEMENTWISE.match(kernel):
        return "other"
    return next((kind for kind, pattern in KINDS.items() if pattern.search(kernel)), "other")


def by_kind(kernels: Iterable[tuple[str, int, float]], steps: int) -> dict[str, Any]:
    """Per step: GPU time (ms) and operations (kernels, memsets) per kind, and the 25 costliest kernels, from
    ``(name, count, us)``."""
    kinds = {kind: {"ms": 0.0, "launches": 0.0} for kind in (*KINDS, "other")}
    rows = [(name, kind_of(name), count / steps, us / 1e3 / steps) for name, count, us in kernels]
    rows.sort(key=lambda row: -row[3])
    for _, kind, launches, ms in rows:
        kinds[kind]["ms"] += ms
        kinds[kind]["launches"] += launches
    return {
        "gpu_ms_per_step": sum(k["ms"] for k in kinds.values()),
        "kinds": kinds,
        "costliest": [
            {"kernel": name[:160], "kind": kind, "launches": launches, "ms": ms}
            for name, kind, launches, ms in rows[:25]
        ],
    }


def jax_step(model_name: str, mode: str, workload: jax_bench.Workload) -> Callable[[], Any]:
    """One compiled training step of the lean model (`jax_bench.bench_train`'s modes), its state carried between
    calls."""
    model = jax_bench.build(model_name, workload, "cudnn" if jax.default_backend() == "gpu" else None)
    loss, trainable, frozen = jax_bench.loss_fns(model, mode.removesuffix("-flat"))
    optimizer = jax_bench.optimizer_for(mode)
    step = jax_bench.train_step(loss, optimizer)
    ids = jax_bench.batch(workload)
    state = [trainable, optimizer.init(trainable)]

    def run() -> Any:
        state[0], state[1], value = step(state[0], state[1], frozen, ids)
        return value

    return run


def jax_profile(step: Callable[[], Any], steps: int) -> dict[str, Any]:
    """GPU kernel time per step of a JAX step (the stream lines of a `jax.profiler` trace), and its wall time."""
    lines = bank.kernel_times(step, steps)
    streams = [line for name, line in lines.items() if "Stream" in name]  # not the XLA op lines: no double count
    kernels = [(name, count, us) for line in streams for name, (count, us) in line["kernels"].items()]
    return {**by_kind(kernels, steps), "wall": jax_bench.summary(jax_bench.durations(step, steps))}


def torch_profile(mode: str, workload: jax_bench.Workload, steps: int) -> dict[str, Any]:
    """GPU kernel time per step of PEFT's compiled step (`torch.profiler`, CUDA activity only)."""
    import torch

    step, _, _ = torch_bench.make_step(mode, workload, "cuda", "compile")
    for _ in range(max(3, workload.warmup)):  # the first compiles
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [
        (event.key, event.count, event.device_time_total)
        for event in prof.key_averages()
        if event.device_time_total > 0 and event.device_type == torch.autograd.DeviceType.CUDA
    ]
    wall = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
    return {**by_kind(kernels, steps), "wall": jax_bench.summary(wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-tiny", action="store_true", help="tiny float32 model, JAX only: a smoke test")
    parser.add_argument("--steps", type=int, default=10, help="traced steps per variant")
    parser.add_argument("--jax-only", action="store_true", help="leave out the PyTorch steps")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    workload = jax_bench.Workload(config=llama.TINY_F32, batch=2, seq=16) if args.cpu_tiny else jax_bench.Workload()
    result: dict[str, Any] = {
        "device": jax.devices()[0].device_kind,
        "steps": args.steps,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    result["jax:lean-ia3remat:ia3-flat"] = jax_profile(jax_step("lean-ia3remat", "ia3-flat", workload), args.steps)
    result["jax:lean:floor"] = jax_profile(jax_step("lean", "floor", workload), args.steps)
    if not (args.cpu_tiny or args.jax_only):
        for mode in ("ia3", "floor"):
            try:  # keep the JAX profiles when PyTorch fails; the error goes in the report
                result[f"torch:compile:{mode}"] = torch_profile(mode, workload, args.steps)
            except Exception as error:  # noqa: BLE001
                result[f"torch:compile:{mode}"] = {"error": repr(error)}
    bank.report(result, args.out)


if __name__ == "__main__":
    main()
