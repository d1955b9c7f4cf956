"""Where the time of an eager `ia3_jax.merge` goes (issue 13, item 3): host phases and GPU kernel time.

The lean Llama (~1.1B, bf16, unrolled: 66 targeted kernels of PEFT's llama targets; ``--size 8b``:
Llama-3-8B's shape, 96 targeted kernels, to see how the call's fixed costs weigh on a larger model). Timed, each a
median of >= `--repeats` calls after a warm-up:

- ``merge``: the documented call, outputs waited for (what `jax_bench` reports as ``eager_s``);
- ``merge_host``: the same call without waiting (the host's share), and its parts: ``flatten`` (tree
  to leaves), ``fold_dispatch`` (a jitted merge of the targeted modules alone, the same program as
  the one merge compiles), ``fold`` (that call waited for; ``fold_kernel_by_kernel``: compiled with
  XLA's command buffers off, so launched kernel by kernel instead of as one CUDA graph), ``block``
  (waiting for a merged tree that is already done: 267 leaves);
- ``gpu_kernels_per_merge``: GPU time of the kernels one merge runs (a `jax.profiler` trace);
- ``floor``: the targeted kernels read and written once, plus the vectors, at the measured copy
  bandwidth.

    python benchmarks/merge_profile.py --out merge_profile.json          # H200
    python benchmarks/merge_profile.py --size 8b --out merge_8b.json     # H200, Llama-3-8B's shape
    python benchmarks/merge_profile.py --cpu-tiny                         # seconds: tiny float32 model
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import traverse_util

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import ia3_jax  # noqa: E402
from benchmarks import bank, jax_bench, llama  # noqa: E402

IA3 = bank.IA3
SIZES = {"1b": llama.LlamaConfig(), "8b": llama.LLAMA3_8B}


def times(fn: Callable[[], Any], repeats: int, wait: bool = True) -> dict[str, Any]:
    """Wall times of `fn`, its outputs waited for or not (the host's share), after one warm-up call."""
    jax.block_until_ready(fn())
    measured = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if wait:
            jax.block_until_ready(out)
        measured.append(time.perf_counter() - start)
    return jax_bench.summary(measured)


def targeted_modules(params: dict[str, Any]) -> dict[str, Any]:
    """The modules of `params` that hold an IA3 vector (kernel, bias, vector), nothing else."""
    flat = traverse_util.flatten_dict(params)
    modules = {path[:-1] for path in flat if path[-1] == "ia3_l"}
    return traverse_util.unflatten_dict({path: leaf for path, leaf in flat.items() if path[:-1] in modules})


def profile(config: llama.LlamaConfig, repeats: int, copy_bytes: int) -> dict[str, Any]:
    model = llama.Llama(config)
    base = llama.init_params(model, jax.random.key(0))
    adapter = bank.random_adapter(base, jax.random.key(1))
    joined = ia3_jax.join(base, adapter)
    merge = functools.partial(ia3_jax.merge, joined, IA3)
    merged = jax.block_until_ready(merge())
    leaves = jax.tree.leaves(joined)
    # The fold alone: the targeted modules through one jitted merge (as merge compiles them), and the same
    # compiled with command buffers off.
    targeted_tree = targeted_modules(joined)
    merge_targeted = functools.partial(ia3_jax.merge, config=IA3)
    fold = functools.partial(jax.jit(merge_targeted), targeted_tree)
    no_graphs = {"xla_gpu_enable_command_buffer": ""}
    fold_by_kernel = functools.partial(jax.jit(merge_targeted, compiler_options=no_graphs), targeted_tree)
    targeted = [v for path, v in traverse_util.flatten_dict(targeted_tree).items() if path[-1] == "kernel"]
    floor_bytes = 2 * jax_bench.nbytes(targeted) + jax_bench.nbytes(adapter)
    bandwidth = jax_bench.copy_bandwidth(copy_bytes, 20)
    kernels = bank.kernel_times(merge, 20)
    host = bank.kernel_times(merge, 20, plane_prefix="/host:CPU")
    gpu_lines = {line: round(v["total_us"] / 20, 1) for line, v in kernels.items()}
    launches = {line: sum(c for c, _ in v["kernels"].values()) / 20 for line, v in kernels.items()}
    return {
        "device": jax.devices()[0].device_kind,
        "config": config.to_dict(),
        "targeted_kernels": len(targeted),
        "tree_leaves": len(leaves),
        "floor_s": floor_bytes / bandwidth,
        "copy_bandwidth_Bps": bandwidth,
        "merge": times(merge, repeats),
        "merge_host": times(merge, repeats, wait=False),
        "flatten": times(lambda: jax.tree_util.tree_flatten((joined, None)), repeats, wait=False),
        "fold_dispatch": times(fold, repeats, wait=False),
        "fold": times(fold, repeats),
        "fold_kernel_by_kernel": times(fold_by_kernel, repeats),
        "block": times(lambda: merged, repeats),
        "whole_tree_dispatch": times(functools.partial(jax.jit(lambda p: jax.tree.leaves(p)[0][0]), joined), repeats),
        "gpu_kernels_per_merge_us": gpu_lines,  # per profiler line (XLA ops, streams)
        "gpu_kernel_launches_per_merge": launches,
        "gpu_kernels": kernels,
        "host_events_20_merges": host,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--cpu-tiny", action="store_true", help="tiny float32 model (22 layers): host costs only")
    model.add_argument("--size", choices=sorted(SIZES), default="1b", help="the model's shape (default 1b)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    config = dataclasses.replace(llama.TINY_F32, num_layers=22) if args.cpu_tiny else SIZES[args.size]
    result = profile(config, args.repeats, (1 << 20) if args.cpu_tiny else (2 << 30))
    bank.report(result, args.out)


if __name__ == "__main__":
    main()
