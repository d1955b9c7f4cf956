"""Single entry point of the IA3 benchmarks (issue 6): ia3_jax vs the floor vs PyTorch PEFT.

Usage (from the repository root):
  python benchmarks/run.py --suite all --out runs/h200                  # GPU: every variant, own process each
  python benchmarks/run.py --suite all --out runs/h200 --gpus 0,1       # two lanes, one GPU each
  python benchmarks/run.py --cpu-tiny --out /tmp/tiny                   # tiny sizes, in-process (CI)
  python benchmarks/run.py --report runs/h200                           # table + plot from saved JSON

Each GPU variant runs in a fresh process so that its peak memory is its own; a lane runs its
variants one after another on the GPU named in CUDA_VISIBLE_DEVICES. JAX processes get
``--flax-site`` prepended to PYTHONPATH (transformers 4.57, the last with Flax models); PyTorch
processes keep the machine's own transformers. Results: ``OUT/<variant>.json``, ``OUT/results.json``,
``OUT/summary.md`` and ``OUT/plot.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
START = time.perf_counter()  # this process's start, for the per-variant overhead (`process_s`)
if __package__ in (None, ""):  # run as a script: make `benchmarks` and `ia3_jax` importable
    sys.path.insert(0, str(ROOT))

# Every variant by suite. Model names: lean (the Linen Llama of benchmarks/llama.py, layers unrolled),
# lean-scan (nn.scan), lean-scan-remat (scan + nn.remat, nothing saved), lean-hidden / lean-scan-hidden
# (nn.remat that recomputes only the MLP hidden activation), hf (transformers' FlaxLlamaForCausalLM).
# jax:M:MODE is one training mode in its own process (peak memory); pair:M times ia3 and floor in
# alternating rounds in one process (their ratio); infer:M is inference and merge; decode:M is greedy
# decoding with a KV cache (M: lean or hf, FlaxLlamaForCausalLM.generate).
VARIANTS = {
    "jax": [
        "jax:lean:ia3",
        "jax:lean:floor",
        "jax:lean:full",
        "jax:lean-hidden:ia3",
        "jax:lean-scan:ia3",
        "jax:lean-scan:floor",
        "jax:lean-scan:full",
        "jax:lean-scan-remat:ia3",
        "jax:lean-scan-remat:floor",
        "jax:lean-scan-remat:full",
        "jax:lean-scan-hidden:ia3",
        "jax:hf:ia3",
        "jax:hf:floor",
        "jax:hf:full",
    ],
    "pair": ["pair:lean", "pair:lean-hidden", "pair:lean-scan", "pair:lean-scan-hidden", "pair:hf"],
    "inference": ["infer:lean", "infer:hf"],
    "torch": ["torch:peft:ia3", "torch:peft:floor", "torch:peft:full"],
    # issue 13: IA3's remat policy, compiled PyTorch, decoding with a KV cache
    "memory": [
        "jax:lean-ia3remat:ia3",
        "jax:lean-ia3remat:ia3-flat",  # AdamW under optax.flatten, as the README recommends
        "pair:lean-ia3remat",
        "jax:lean-scan-ia3remat:ia3",
        "pair:lean-scan-ia3remat",
    ],
    "compiled": [
        "torch:compile:ia3",
        "torch:compile:floor",
        "torch:compile:full",
        "torch:compile-liger:ia3",
        "torch:compile-ckpt:ia3",
    ],
    "decode": ["decode:lean", "decode:hf", "infer:lean-scan"],
    # issue 12: IA3 on Tunix's Llama-3.2-1B (NNX) against its floor and PEFT on the same configuration
    "tunix": [
        "tunix:llama32-1b:ia3",
        "tunix:llama32-1b:floor",
        "torch:peft:ia3:llama32-1b",
        "torch:compile:ia3:llama32-1b",
        "torch:compile:floor:llama32-1b",
    ],
}
# The order the lanes take them: the headline comparisons first, so that a run cut short by its
# deadline still answers the targets.
PRIORITY = [
    "jax:lean:ia3",
    "torch:peft:ia3",
    "jax:lean:floor",
    "torch:peft:floor",
    "pair:lean",
    "infer:lean",
    "pair:hf",
    "jax:hf:ia3",
    "jax:hf:floor",
    "jax:lean:full",
    "torch:peft:full",
    "jax:hf:full",
    "pair:lean-scan",
    "pair:lean-hidden",
    "pair:lean-scan-hidden",
    "jax:lean-hidden:ia3",
    "jax:lean-scan:ia3",
    "jax:lean-scan:floor",
    "jax:lean-scan-hidden:ia3",
    "jax:lean-scan-remat:ia3",
    "jax:lean-scan-remat:floor",
    "infer:hf",
    "jax:lean-scan:full",
    "jax:lean-scan-remat:full",
]
# The CPU smoke run: every code path once, smallest set.
TINY_VARIANTS = [
    "jax:lean:ia3",
    "jax:lean:floor",
    "jax:lean:full",
    "pair:lean-scan-hidden",
    "jax:hf:ia3",
    "infer:lean",
    "torch:peft:ia3",
    "torch:peft:floor",
    "torch:peft:full",
    "jax:lean-ia3remat:ia3",
    "pair:lean-ia3remat",
    "torch:compile:ia3",
    "torch:compile-ckpt:ia3",
    "decode:lean",
    "decode:hf",
]


def suite_variants(suites: list[str]) -> list[str]:
    """The variants of `suites`: those in `PRIORITY` first, in its order, then the others in suite order."""
    chosen = list(dict.fromkeys(n for s in suites for n in VARIANTS[s]))
    return [n for n in PRIORITY if n in chosen] + [n for n in chosen if n not in PRIORITY]


def workload(cpu_tiny: bool, steps: int | None, min_time_s: float | None = None, model: str = ""):
    from benchmarks import jax_bench, llama

    if cpu_tiny:  # float32: exact checks, and the CPU has no fast bf16
        w = jax_bench.Workload(config=llama.TINY_F32, batch=2, seq=32, warmup=1, steps=3, min_time_s=0.0)
    else:
        w = jax_bench.Workload(config=llama.LLAMA32_1B if model == "llama32-1b" else llama.LlamaConfig())
    w = dataclasses.replace(w, steps=steps) if steps else w
    return dataclasses.replace(w, min_time_s=min_time_s) if min_time_s is not None else w


def gpu_clocks() -> list[str] | None:
    """One nvidia-smi reading: SM and memory clocks, temperature, power, utilisation (None without a GPU)."""
    query = "index,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu,memory.used"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [query] + out.stdout.strip().splitlines() if out.returncode == 0 else None


def run_variant(
    name: str,
    *,
    cpu_tiny: bool,
    attention: str | None,
    steps: int | None,
    hlo_dir: str | None = None,
    min_time_s: float | None = None,
) -> dict[str, Any]:
    """Measures one variant in this process; never raises (errors and OOMs are results too)."""
    kind, model, *rest = name.split(":")  # torch:RUNNER:MODE[:llama32-1b], tunix:llama32-1b:MODE, KIND:MODEL[:MODE]
    w = workload(cpu_tiny, steps, min_time_s, model=rest[1] if kind == "torch" and len(rest) > 1 else model)
    if cpu_tiny and attention == "cudnn":  # the CPU has XLA's attention only
        attention = None
    result: dict[str, Any] = {"name": name, "workload": _workload_dict(w), "gpu_clocks_start": gpu_clocks()}
    try:
        if kind == "torch":
            from benchmarks import torch_bench

            device = "cpu" if cpu_tiny else "cuda"
            result.update(
                env=torch_bench.environment(),
                **torch_bench.bench_train(rest[0], w, device, runner=model, min_time_s=w.min_time_s),
            )
        elif kind == "tunix":
            from benchmarks import jax_bench, tunix_bench

            result.update(env=jax_bench.environment(), **tunix_bench.bench_train(rest[0], w, cpu_tiny))
        elif kind == "decode":
            from benchmarks import jax_bench

            result["env"] = jax_bench.environment()
            if cpu_tiny:
                result.update(jax_bench.bench_decode(model, w, batches=(1, 2), prompt_len=8, new_tokens=4))
            else:  # the lean model's prefill is not timed apart (fewer compilations)
                result.update(jax_bench.bench_decode(model, w, with_prefill=model == "hf"))
        else:
            from benchmarks import jax_bench

            result["env"] = jax_bench.environment()
            if kind == "jax":
                result.update(jax_bench.bench_train(model, rest[0], w, attention))
            elif kind == "pair":
                result.update(jax_bench.bench_pair(model, w, attention, hlo_dir=hlo_dir))
            else:
                shapes = [(w.batch, w.seq)] if cpu_tiny else [(8, 1024), (1, 128)]
                copy_bytes = 1 << 20 if cpu_tiny else 2 << 30
                result.update(jax_bench.bench_inference(model, w, attention, shapes, copy_bytes))
        result["status"] = "ok"
        result["gpu_clocks_end"] = gpu_clocks()
        result["process_s"] = time.perf_counter() - START
    except Exception as err:
        text = f"{type(err).__name__}: {err}"
        oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
        result.update(status="oom" if oom else "error", error=text[:4000], traceback=traceback.format_exc()[-4000:])
    return result


def _workload_dict(w) -> dict[str, Any]:
    return dataclasses.asdict(w) | {"config": w.config.to_dict()}


def _child_env(name: str, gpu: str | None, flax_site: str | None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT)]
    if flax_site and not name.startswith("torch:"):
        paths.insert(0, flax_site)
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    env["PYTHONUNBUFFERED"] = "1"
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def _spawn(name: str, out: Path, gpu: str | None, args, attention: str | None, timeout: float) -> dict[str, Any]:
    path = out / f"{name.replace(':', '_')}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", name, "--json", str(path)]
    cmd += ["--attention", attention or "none"] + (["--steps", str(args.steps)] if args.steps else [])
    cmd += ["--min-time-s", str(args.min_time_s)] if args.min_time_s is not None else []
    start = time.perf_counter()
    with open(out / f"{name.replace(':', '_')}.log", "w") as log:
        try:
            proc = subprocess.run(
                cmd,
                env=_child_env(name, gpu, args.flax_site),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    result = json.loads(path.read_text()) if path.exists() else {"name": name, "status": "error"}
    if code != 0 and result.get("status") == "ok":
        result["status"] = "error"
    if not path.exists():
        result["error"] = f"process ended with {code} and wrote no result; see {name.replace(':', '_')}.log"
        if code == "timeout":
            result["status"] = "timeout"
    result.update(gpu=gpu, wall_s=time.perf_counter() - start)
    path.write_text(json.dumps(result, indent=1))
    return result


def run_lanes(names: list[str], out: Path, args) -> list[dict[str, Any]]:
    """Runs `names` over one lane per GPU (fresh process per variant) within the deadline."""
    deadline = time.perf_counter() + args.deadline_s
    todo: queue.Queue[str] = queue.Queue()
    for name in names:
        todo.put(name)
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def lane(gpu: str | None) -> None:
        while True:
            try:
                name = todo.get_nowait()
            except queue.Empty:
                return
            left = deadline - time.perf_counter()
            if left < 20:
                result = {"name": name, "status": "skipped", "error": "not started: the run's deadline was near"}
            else:
                attention = None if name.startswith("torch") else args.attention
                result = _spawn(name, out, gpu, args, attention, min(args.variant_timeout_s, left))
                # cuDNN's fused attention may refuse a shape or dtype: measure with XLA's instead, and say so
                if result["status"] == "error" and attention == "cudnn" and name.split(":")[1] != "hf":
                    first_error = result.get("error", "")
                    left = deadline - time.perf_counter()
                    if left > 20:
                        result = _spawn(name, out, gpu, args, "xla", min(args.variant_timeout_s, left))
                        result["cudnn_error"] = first_error[:2000]
            with lock:
                results.append(result)
                print(f"[{time.strftime('%H:%M:%S')}] gpu {gpu}: {_line(result)}", flush=True)
                _save(out, results)

    gpus = args.gpus.split(",") if args.gpus else [None]
    threads = [threading.Thread(target=lane, args=(g,)) for g in gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _line(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"{r['name']:26s} {r.get('status')}: {str(r.get('error', ''))[:300]}"
    if "ia3_over_floor" in r:
        m = r["modes"]
        return (
            f"{r['name']:26s} ia3 {1e3 * m['ia3']['step_s']:.1f} ms, floor {1e3 * m['floor']['step_s']:.1f} ms: "
            f"{r['ia3_over_floor']:.3f}x"
        )
    if r["name"].startswith("decode:"):
        parts = []
        for key, row in r.items():
            if key.startswith("batch"):
                parts.append(f"{key}: " + ", ".join(f"{n} {1e3 * row[n]['decode_s_per_token']:.2f} ms/tok" for n in ("base", "unmerged", "merged")))
        return f"{r['name']:26s} " + "; ".join(parts)
    if "tokens_per_s" in r:
        peak = r.get("peak_bytes")
        peak_s = f"{peak / 2**30:6.2f} GiB" if peak else "   n/a"
        return f"{r['name']:26s} {r['tokens_per_s']:10.0f} tok/s {1e3 * r['step_s']:8.1f} ms {peak_s}"
    return f"{r['name']:26s} done"


def _save(out: Path, results: list[dict[str, Any]]) -> None:
    order = {n: i for i, n in enumerate(n for group in VARIANTS.values() for n in group)}
    ordered = sorted(results, key=lambda r: order.get(r["name"], len(order)))
    (out / "results.json").write_text(json.dumps({"results": ordered}, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="all", help=f"all, or a comma list of: {', '.join(VARIANTS)}")
    parser.add_argument("--only", default="", help="comma list of variant names (overrides --suite)")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--cpu-tiny", action="store_true", help="tiny sizes on the CPU, in this process")
    parser.add_argument("--gpus", default="", help="comma list of GPU ids, one lane each (default: one lane)")
    parser.add_argument("--flax-site", default=None, help="folder with transformers 4.57 for the JAX processes")
    parser.add_argument("--attention", default="cudnn", help="lean model attention: cudnn, xla or none")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 12)")
    parser.add_argument("--min-time-s", type=float, default=None, help="timed seconds per variant (default 10)")
    parser.add_argument("--deadline-s", type=float, default=540.0, help="start no variant after this")
    parser.add_argument("--variant-timeout-s", type=float, default=300.0)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: one variant, this process
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help="re-make summary.md and plot.png from a results folder")
    args = parser.parse_args(argv)
    attention = None if args.attention == "none" else args.attention
    if args.variant:
        hlo_dir = str(args.json.parent) if args.json else None
        result = run_variant(
            args.variant,
            cpu_tiny=args.cpu_tiny,
            attention=attention,
            steps=args.steps,
            hlo_dir=hlo_dir,
            min_time_s=args.min_time_s,
        )
        args.json.write_text(json.dumps(result, indent=1))
        print(_line(result))
        return 0 if result["status"] == "ok" else 1

    from benchmarks import report

    if args.report:
        report.write(args.report)
        return 0
    if args.out is None:
        parser.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only:
        names = args.only.split(",")
    elif args.cpu_tiny:
        names = TINY_VARIANTS
    else:
        names = suite_variants(list(VARIANTS) if args.suite == "all" else args.suite.split(","))
    if args.cpu_tiny:
        results = []
        for name in names:
            results.append(
                run_variant(name, cpu_tiny=True, attention=attention, steps=args.steps, min_time_s=args.min_time_s)
            )
            print(_line(results[-1]), flush=True)
        _save(args.out, results)
    else:
        run_lanes(names, args.out, argparse.Namespace(**{**vars(args), "attention": attention}))
    print(report.write(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
