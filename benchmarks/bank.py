"""Many adapters in one batch (issue 14, item 4): the lean Llama serving B sequences with B different adapters.

Three ways to serve B sequences that each have their own IA3 adapter (PEFT's llama targets: k_proj,
v_proj, down_proj):

- ``mixed``: one batch, an adapter bank, ``ia3_jax.bank_apply_fn`` with ids ``0..B-1`` (each call, so each
  decode step, picks each example's vectors from the bank);
- ``picked``: the same, the vectors picked once per batch (``ia3_jax.per_example_adapter``, inside the
  jitted call, before the decode loop) and applied by ``ia3_jax.per_example_apply_fn``: how to serve;
- ``single``: the same batch with one adapter for all (``apply_fn``, unmerged): the cost of IA3 alone;
- ``separate``: B calls of batch 1, one per adapter, each on that adapter merged into the base
  (``merge`` jitted, timed with the call: serving adapters one after another).

For each, prefill (B x prompt tokens, one forward) and greedy decoding with a KV cache
(`benchmarks.llama.generate`); tokens/s = tokens / median wall time. Decode time is generate minus
its prefill. The issue's targets: mixed decode >= 0.95x single decode, and >= 10x separate (``picked``
and ``mixed`` both reported against them).

    python benchmarks/bank.py --out bank.json                # H200: 1.1B bf16, 64 x 512, 64 adapters
    python benchmarks/bank.py --cpu-tiny --out /tmp/bank.json   # seconds: tiny float32 model, 8 adapters (a smoke
                                                                # test: CPU timings of a tiny model are noise)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import ia3_jax  # noqa: E402
from benchmarks import jax_bench, llama  # noqa: E402

IA3 = ia3_jax.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])


def timed(fn: Callable[[], Any], repeats: int, min_time_s: float) -> dict[str, Any]:
    """Wall times of `fn` after one warm-up call (compilation), outputs waited for: at least `repeats`
    calls and `min_time_s` seconds. ``{"median_s", "iqr_s", "n", "total_s"}``."""
    jax.block_until_ready(fn())
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_time_s:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return jax_bench.summary(times)


def random_adapter(base: dict[str, Any], key: jax.Array) -> dict[str, Any]:
    """An adapter with vectors near 1 (a stand-in for a fine-tune; the values do not change the cost)."""
    adapter = ia3_jax.split(ia3_jax.ia3_init(base, IA3)).adapter
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([v + 0.1 * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys)])


@dataclasses.dataclass
class Serving:
    """One benchmark setup: the base, B adapters, their bank, and the three ways to call the model."""

    config: llama.LlamaConfig
    prompt: jax.Array  # (batch, prompt_len) token ids
    ids: jax.Array  # (batch,) adapter ids: a jitted call's argument, as in serving (not a constant XLA can fold)
    new_tokens: int
    mixed_apply: Callable  # the bank: takes adapter_ids=
    picked_apply: Callable  # per_example_apply_fn: params hold the rows per_example_adapter picked
    base: Any
    bank: Any
    single_apply: Callable  # one adapter for all, unmerged
    plain_apply: Callable  # the model alone (merged adapters)
    mixed_params: Any
    single_params: Any
    separate: Callable  # jitted forward -> a no-argument call serving the B adapters one after another


def serving(config: llama.LlamaConfig, batch: int, prompt_len: int, new_tokens: int) -> Serving:
    model = llama.Llama(config)
    base = llama.init_params(model, jax.random.key(0))
    adapters = [random_adapter(base, jax.random.key(1 + i)) for i in range(batch)]
    bank = ia3_jax.stack_adapters(adapters, IA3)
    ids = jnp.arange(batch, dtype=jnp.int32)
    prompt = jax.random.randint(jax.random.key(99), (batch, prompt_len), 0, config.vocab_size, jnp.int32)
    banked = ia3_jax.bank_apply_fn(model.apply, IA3)
    merge = jax.jit(lambda adapter: ia3_jax.merge(ia3_jax.join(base, adapter), IA3))

    def separate(call):  # one adapter after another: merge it, run its sequence alone
        return lambda: [call(merge(adapters[i]), prompt[i : i + 1]) for i in range(batch)]

    return Serving(
        config=config,
        prompt=prompt,
        ids=ids,
        new_tokens=new_tokens,
        mixed_apply=banked,
        picked_apply=ia3_jax.per_example_apply_fn(model.apply, IA3),
        base=base,
        bank=bank,
        single_apply=ia3_jax.apply_fn(model.apply, IA3),
        plain_apply=model.apply,
        mixed_params=ia3_jax.join(base, bank),
        single_params=ia3_jax.join(base, adapters[0]),
        separate=separate,
    )


def with_ids(apply: Callable, ids: tuple[jax.Array, ...]) -> Callable:
    """`apply` with ``adapter_ids=ids[0]`` bound, or as it is for ``ids == ()``."""
    return functools.partial(apply, adapter_ids=ids[0]) if ids else apply


def prefill(apply: Callable) -> Callable:
    """``(params, prompt[, ids]) -> logits``."""
    return lambda p, x, *ids: with_ids(apply, ids)({"params": p}, x)


def decoder(s: Serving) -> Callable[[Callable], Callable]:
    """``apply -> ((params, prompt[, ids]) -> new tokens)``."""
    return lambda apply: lambda p, x, *ids: llama.generate(with_ids(apply, ids), p, x, s.new_tokens, s.config)


def picking(s: Serving, phase: Callable[[Callable], Callable]) -> Callable:
    """``jit((prompt, ids) -> phase(picked_apply)(rows joined to the base, prompt))``: the rows picked once per
    call, before the phase (and its decode loop) runs."""
    call = phase(s.picked_apply)
    return jax.jit(lambda base, bank, x, ids: call(ia3_jax.join(base, ia3_jax.per_example_adapter(bank, ids)), x))


def gathers_in_decode_loop(generate: Callable, *args: Any) -> int:
    """Gathers that the compiled decode loop runs each step, fused ones included (the token embedding's is one)."""
    text = generate.lower(*args).compile().as_text()
    return len(re.findall(r"= \S+ gather\(", jax_bench.loop_body(text, with_callees=True)))


def run(
    config: llama.LlamaConfig, batch: int, prompt_len: int, new_tokens: int, repeats: int, min_time_s: float
) -> dict[str, Any]:
    s = serving(config, batch, prompt_len, new_tokens)
    mixed_params, single_params, prompt, separate = s.mixed_params, s.single_params, s.prompt, s.separate
    timings = {}
    loop_gathers = {}
    for name, phase in (("prefill", prefill), ("generate", decoder(s))):
        # compiled once each
        mixed, single, plain = (jax.jit(phase(apply)) for apply in (s.mixed_apply, s.single_apply, s.plain_apply))
        picked = picking(s, phase)
        timings[name] = {
            "mixed": timed(functools.partial(mixed, mixed_params, prompt, s.ids), repeats, min_time_s),
            "picked": timed(functools.partial(picked, s.base, s.bank, prompt, s.ids), repeats, min_time_s),
            "single": timed(functools.partial(single, single_params, prompt), repeats, min_time_s),
            "separate": timed(separate(plain), repeats, min_time_s),
        }
        if name == "generate":
            loop_gathers = {
                "mixed": gathers_in_decode_loop(mixed, mixed_params, prompt, s.ids),
                "picked": gathers_in_decode_loop(picked, s.base, s.bank, prompt, s.ids),
                "single": gathers_in_decode_loop(single, single_params, prompt),
            }
    seconds = {phase: {k: t["median_s"] for k, t in row.items()} for phase, row in timings.items()}
    prefill_tps = {k: batch * prompt_len / t for k, t in seconds["prefill"].items()}
    decode_tps = {
        k: batch * new_tokens / max(seconds["generate"][k] - seconds["prefill"][k], 1e-9) for k in seconds["prefill"]
    }
    return {
        "config": config.to_dict(),
        "batch": batch,
        "adapters": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "device": jax.devices()[0].device_kind,
        "seconds": seconds,  # medians
        "timings": timings,  # median, interquartile range, number and total of the timed calls
        "decode_loop_gathers": loop_gathers,  # per step, fused ones included; 1 = the token embedding's alone
        "prefill_tokens_per_s": prefill_tps,
        "decode_tokens_per_s": decode_tps,
        "decode_picked_vs_single": decode_tps["picked"] / decode_tps["single"],  # target >= 0.95
        "decode_picked_vs_separate": decode_tps["picked"] / decode_tps["separate"],  # target >= 10
        "decode_mixed_vs_single": decode_tps["mixed"] / decode_tps["single"],
        "decode_mixed_vs_separate": decode_tps["mixed"] / decode_tps["separate"],
        "prefill_picked_vs_single": prefill_tps["picked"] / prefill_tps["single"],
        "prefill_mixed_vs_single": prefill_tps["mixed"] / prefill_tps["single"],
        "prefill_mixed_vs_separate": prefill_tps["mixed"] / prefill_tps["separate"],
    }


def kernel_times(fn: Callable[[], Any], calls: int, plane_prefix: str = "/device:GPU") -> dict[str, Any]:
    """GPU time per kernel over `calls` calls of `fn` (after one warm-up), from a `jax.profiler` trace.

    ``{line: {"total_us", "kernels": {name: [count, total_us]}}}`` for each line of each GPU plane
    (XLA's op line and the streams' kernel lines), the 60 costliest kernels of each; ``{}`` on a CPU.
    `plane_prefix` ``"/host:CPU"`` reads the host's events (the runtime's, Python's) the same way.
    """
    jax.block_until_ready(fn())
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(calls):
                jax.block_until_ready(fn())
        (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    out: dict[str, Any] = {}
    for plane in data.planes:
        if not plane.name.startswith(plane_prefix):
            continue
        for line in plane.lines:
            kernels: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
            for event in line.events:
                kernels[event.name][0] += 1
                kernels[event.name][1] += event.duration_ns / 1e3
            costliest = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:60]
            out[f"{plane.name} {line.name}"] = {
                "total_us": sum(t for _, t in kernels.values()),
                "kernels": dict(costliest),
            }
    return out


def profile(s: Serving, out_dir: Path, calls: int) -> dict[str, Any]:
    """Where mixed decoding spends the time that single-adapter decoding does not.

    For the mixed, picked and single `generate`: the optimised HLO (``OUT_DIR/<variant>.hlo.txt``), the op
    counts of its decode loop's body (top level: each fusion or custom call is a kernel), and the GPU
    time per kernel over `calls` generate calls.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    generate = decoder(s)
    result: dict[str, Any] = {}
    variants = {
        "mixed": (jax.jit(generate(s.mixed_apply)), (s.mixed_params, s.prompt, s.ids)),
        "picked": (picking(s, generate), (s.base, s.bank, s.prompt, s.ids)),
        "single": (jax.jit(generate(s.single_apply)), (s.single_params, s.prompt)),
    }
    for name, (fn, args) in variants.items():
        text = fn.lower(*args).compile().as_text()
        (out_dir / f"{name}.hlo.txt").write_text(text)
        body = jax_bench.loop_body(text)
        result[name] = {
            "loop_body_ops": dict(collections.Counter(re.findall(r"= \S+ ([\w-]+)\(", body)).most_common()),
            "kernel_times": kernel_times(functools.partial(fn, *args), calls),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-tiny", action="store_true", help="tiny float32 model, 8 adapters: seconds on a CPU")
    parser.add_argument("--batch", type=int, default=64, help="sequences = adapters (default 64)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="at least this many timed calls per variant")
    parser.add_argument("--min-time-s", type=float, default=10.0, help="and at least this many timed seconds")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--profile", type=Path, help="instead of timing: HLO and GPU kernel times of decoding, here")
    args = parser.parse_args()
    if args.profile:
        config = llama.TINY_F32 if args.cpu_tiny else llama.LlamaConfig()
        batch = 8 if args.cpu_tiny else args.batch
        s = serving(config, batch, args.prompt_len, args.new_tokens)
        result = profile(s, args.profile, args.repeats)
    elif args.cpu_tiny:
        result = run(llama.TINY_F32, batch=8, prompt_len=16, new_tokens=64, repeats=3, min_time_s=0.0)
    else:
        result = run(llama.LlamaConfig(), args.batch, args.prompt_len, args.new_tokens, args.repeats, args.min_time_s)
    report(result, args.out)


def report(result: dict[str, Any], out: Path | None) -> None:
    """Prints `result` as JSON, and writes it to `out` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
