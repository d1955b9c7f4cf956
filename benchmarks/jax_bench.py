"""JAX side of the benchmarks: IA3, floor and full fine-tuning steps; inference and `merge` timings.

Each public ``bench_*`` function measures one variant and returns a JSON-ready dict. Run each in a
fresh process (`benchmarks/run.py` does) so that ``peak_bytes_in_use`` belongs to that variant alone.

The three training modes share the model, the batch, the loss and one AdamW step per iteration:
  ia3    gradient w.r.t. the IA3 vectors only (the base is a non-differentiated argument);
  floor  gradient w.r.t. the first layer's input-norm weight only: the whole activation backward
         pass, no weight gradient, no adapter; IA3 cannot cost less than this;
  full   gradient w.r.t. every param (full fine-tuning).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import ia3_jax
from benchmarks import llama


def _at(tree, path):
    """The node of a nested dict at a key path."""
    return functools.reduce(operator.getitem, path, tree)


def _with(tree, path, value):
    """A copy of nested dict `tree` with the node at `path` set to `value` (missing levels created)."""
    head, *rest = path
    return {**tree, head: _with(tree.get(head, {}), rest, value) if rest else value}


def _vector_modules(tree):
    """Key paths of the modules that hold an IA3 vector."""
    return [path[:-1] for path in traverse_util.flatten_dict(tree) if path[-1] == "ia3_l"]


# PEFT's default IA3 targets for llama (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING).
IA3_CONFIG = ia3_jax.IA3Config(
    target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
)
LEARNING_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class Workload:
    """Model size, batch shape and timing repeats."""

    config: llama.LlamaConfig = llama.LlamaConfig()
    batch: int = 8
    seq: int = 1024
    warmup: int = 3
    steps: int = 12
    min_time_s: float = 10.0  # timed steps continue until at least this many seconds (issue 13)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def hf_llama_kwargs(self) -> dict[str, Any]:
        """The model as transformers' ``LlamaConfig`` arguments, for the Flax and the PyTorch HF model."""
        c = self.config
        return dict(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads,
            num_key_value_heads=c.num_kv_heads,
            rms_norm_eps=c.rms_norm_eps,
            rope_theta=c.rope_theta,
            max_position_embeddings=self.seq,  # FlaxLlama builds a (max_pos, max_pos) mask
            tie_word_embeddings=c.tie_embeddings,
        )


@dataclasses.dataclass
class Model:
    """A model reduced to what the benchmarks need."""

    apply: Callable[[Any, jax.Array], jax.Array]  # (params, ids) -> logits
    params: dict[str, Any]
    layouts: dict[str, ia3_jax.KernelLayout] | None
    floor_path: tuple[str, ...]  # the first layer's input-norm weight
    floor_stacked: bool  # the weight carries the nn.scan layer axis first
    info: dict[str, Any]


# Lean model variants: name -> (scan, remat, remat_policy).
LEAN_VARIANTS = {
    "lean": (False, False, "full"),
    "lean-hidden": (False, True, "mlp_hidden"),
    "lean-scan": (True, False, "full"),
    "lean-scan-remat": (True, True, "full"),
    "lean-scan-hidden": (True, True, "mlp_hidden"),
    # nn.remat with ia3_jax.remat_policy(): IA3's scaled activations and elementwise results recomputed
    "lean-ia3remat": (False, True, "ia3"),
    "lean-scan-ia3remat": (True, True, "ia3"),
}
# The floor that an IA3 variant is held to: the same model without remat (issue 13's memory target).
FLOOR_MODEL = {"lean-ia3remat": "lean", "lean-scan-ia3remat": "lean-scan"}


def build_lean(workload: Workload, *, attention: str | None, scan: bool, remat: bool, remat_policy: str) -> Model:
    """The lean Linen Llama of `benchmarks.llama`, random bf16 weights."""
    if workload.config.tie_embeddings:
        raise ValueError("the lean Llama has its own lm_head: tie_embeddings=True configs are for the PyTorch twin.")
    config = dataclasses.replace(
        workload.config, attention=attention, remat=remat, remat_policy=remat_policy, scan=scan
    )
    model = llama.Llama(config)
    params = llama.init_params(model, jax.random.key(0))
    ids = jnp.zeros((1, 8), jnp.int32)
    layouts = ia3_jax.infer_layouts(model.apply, {"params": params}, ids) if scan else None
    floor_path = ("layers", "input_layernorm", "weight") if scan else ("layers", "0", "input_layernorm", "weight")
    return Model(
        apply=lambda p, x: model.apply({"params": p}, x),
        params=params,
        layouts=layouts,
        floor_path=floor_path,
        floor_stacked=scan,
        info={"attention": attention, "scan": scan, "remat": remat and remat_policy},
    )


def hf_causal_lm(workload: Workload) -> tuple[Any, dict[str, Any]]:
    """Hugging Face's FlaxLlamaForCausalLM (transformers 4.57.x) and random weights cast to ``param_dtype``."""
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    c = workload.config
    model = FlaxLlamaForCausalLM(LlamaConfig(**workload.hf_llama_kwargs()), dtype=c.dtype, _do_init=False)

    def init(key):
        return jax.tree.map(lambda x: x.astype(c.param_dtype), model.init_weights(key, (1, 8)))

    return model, flax.core.unfreeze(jax.jit(init)(jax.random.key(0)))


def build_hf(workload: Workload) -> Model:
    """`hf_causal_lm` reduced to a `Model`."""
    import transformers

    model, params = hf_causal_lm(workload)
    return Model(
        apply=lambda p, x: model(x, params=p).logits,
        params=params,
        layouts=None,
        floor_path=("model", "layers", "0", "input_layernorm", "weight"),
        floor_stacked=False,
        info={"attention": "hf-unfused", "transformers": transformers.__version__},
    )


def build(model_name: str, workload: Workload, attention: str | None) -> Model:
    if model_name == "hf":
        return build_hf(workload)
    if model_name not in LEAN_VARIANTS:
        raise ValueError(f"unknown model {model_name!r}: use hf or one of {sorted(LEAN_VARIANTS)}.")
    scan, remat, policy = LEAN_VARIANTS[model_name]
    return build_lean(workload, attention=attention, scan=scan, remat=remat, remat_policy=policy)


def batch(workload: Workload, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (workload.batch, workload.seq), 0, workload.config.vocab_size)


# ----------------------------------------------------------------------------------------- training


def loss_fns(model: Model, mode: str) -> tuple[Callable, Any, Any]:
    """``(loss(trainable, frozen, ids), trainable, frozen)`` for one training mode."""
    if mode == "ia3":
        adapter, base = ia3_jax.split(ia3_jax.ia3_init(model.params, IA3_CONFIG, layouts=model.layouts))
        forward = ia3_jax.apply_fn(model.apply, IA3_CONFIG)

        def loss(adapter, base, ids):
            return llama.causal_lm_loss(forward(ia3_jax.join(base, adapter), ids), ids)

        return loss, adapter, base
    if mode == "floor":
        stacked = _at(model.params, model.floor_path)
        first = jnp.copy(stacked[0] if model.floor_stacked else stacked)  # donated: not the base's buffer

        def loss(weight, params, ids):
            full = _at(params, model.floor_path)
            new = full.at[0].set(weight) if model.floor_stacked else weight
            return llama.causal_lm_loss(model.apply(_with(params, model.floor_path, new), ids), ids)

        return loss, first, model.params
    if mode == "full":
        return lambda params, _, ids: llama.causal_lm_loss(model.apply(params, ids), ids), model.params, {}
    raise ValueError(f"unknown training mode {mode!r}: use ia3, floor or full.")


def optimizer_for(mode: str) -> optax.GradientTransformation:
    """AdamW; for a ``-flat`` mode (``ia3-flat``) over one raveled vector (``optax.flatten``): one update
    kernel for all of IA3's vectors instead of one each, as the README recommends."""
    adamw = optax.adamw(LEARNING_RATE)
    return optax.flatten(adamw) if mode.endswith("-flat") else adamw


def train_step(loss: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """One AdamW step on the trainable tree; trainable and optimizer state are donated."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, opt_state, frozen, ids):
        value, grads = jax.value_and_grad(loss)(trainable, frozen, ids)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return step


_HLO_PATTERNS = {
    "cublas_gemms": r'custom_call_target="__cublas\$(?:lt\$matmul|gemm)[^"]*"',
    "triton_gemms": r"__triton_gemm",
    "cudnn_attention": r'custom_call_target="__cudnn\$fmha[^"]*"',
    "dots": r"\bdot\(",
    "fusions": r"\bfusion\(",
    "while_loops": r"\bwhile\(",
}


def hlo_stats(compiled: Any) -> dict[str, Any]:
    """Op counts of the optimised HLO (one scan body counts once) plus XLA's cost and memory analyses."""
    text = compiled.as_text()
    stats: dict[str, Any] = {name: len(re.findall(p, text)) for name, p in _HLO_PATTERNS.items()}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    if cost:
        stats["flops"] = float(cost.get("flops", 0.0))
        stats["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
    memory = compiled.memory_analysis()
    if memory is not None:
        stats["temp_bytes"] = int(memory.temp_size_in_bytes)
        stats["argument_bytes"] = int(memory.argument_size_in_bytes)
    return stats


def hlo_computations(compiled_text: str) -> dict[str, str]:
    """The computations of an optimised HLO module's text by name (``"%name"``): their text blocks."""
    blocks = {}
    for block in compiled_text.split("\n\n"):
        head = block.strip().split("(", 1)[0].split()
        if head:
            blocks[head[-1]] = block
    return blocks


# The computations an HLO instruction calls: calls=, to_apply=, body=, condition=, branch_computations={...}.
_CALLEES = r"(?:calls|to_apply|body|condition|_computations)=(\{[^}]*\}|%[\w.\-]+)"


def loop_body(compiled_text: str, with_callees: bool = False) -> str:
    """The text of the body of the one while loop (a scan) that a compiled program's entry computation runs:
    top-level instructions only (on a GPU each fusion or custom call there is one kernel per iteration), or
    with every computation it calls (fused computations, branches, nested loops) when `with_callees`.

    Raises ValueError unless the entry computation runs exactly one while loop.
    """
    blocks = hlo_computations(compiled_text)
    (entry,) = [block for block in blocks.values() if block.lstrip().startswith("ENTRY")]
    bodies = re.findall(r"\bwhile\(.*?body=(%[\w.\-]+)", entry)
    if len(bodies) != 1:
        raise ValueError(f"loop_body: the entry computation runs {len(bodies)} while loops, not one: {bodies}")
    seen: list[str] = []

    def reach(name: str) -> None:
        if name not in seen and name in blocks:
            seen.append(name)
            for field in re.findall(_CALLEES, blocks[name]):
                for callee in re.findall(r"%[\w.\-]+", field):
                    reach(callee)

    reach(bodies[0]) if with_callees else seen.append(bodies[0])
    return "\n\n".join(blocks[name] for name in seen)


def peak_bytes() -> int | None:
    """The device's ``peak_bytes_in_use`` (None where the backend keeps no statistics, as the CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def nbytes(tree: Any) -> int:
    """Bytes as stored, int4 counted as half a byte."""
    return int(sum(x.size * jax.dtypes.itemsize_bits(x.dtype) for x in jax.tree.leaves(tree))) // 8


def durations(fn: Callable[[], Any], n: int, min_time_s: float = 0.0) -> list[float]:
    """Durations of `n` synchronised calls of `fn`, or more until they add up to `min_time_s`."""
    times: list[float] = []
    while len(times) < n or sum(times) < min_time_s:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict[str, Any]:
    """Median and interquartile range of durations: ``{"median_s", "iqr_s": [q1, q3], "n", "total_s"}``."""
    med = statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (med, med, med)
    return {"median_s": med, "iqr_s": [q1, q3], "n": len(times), "total_s": sum(times)}


def timed_steps(
    compiled: Callable, state: tuple[Any, Any], frozen: Any, ids: jax.Array, workload: Workload
) -> tuple[list[float], list[float]]:
    """``workload.warmup`` then ``workload.steps`` timed calls of a compiled `train_step`.

    Returns the timed calls' durations and the losses of all calls. `state` (trainable, optimizer
    state) is donated to the first call.
    """
    losses = []

    def one_step():
        nonlocal state
        trainable, opt_state, value = compiled(*state, frozen, ids)
        state = (trainable, opt_state)
        losses.append(value)
        return value, trainable, opt_state

    durations(one_step, workload.warmup)
    times = durations(one_step, workload.steps, workload.min_time_s)
    return times, [float(v) for v in losses]


def bench_train(model_name: str, mode: str, workload: Workload, attention: str | None) -> dict[str, Any]:
    """Median step time, tokens/s and peak memory of one training mode on one model (`loss_fns`'s modes,
    and ``ia3-flat``: IA3 with `optimizer_for`'s flattened AdamW)."""
    model = build(model_name, workload, attention)
    loss, trainable, frozen = loss_fns(model, mode.removesuffix("-flat"))
    model.params = None  # only `frozen` / `trainable` keep the weights alive
    optimizer = optimizer_for(mode)
    opt_state = optimizer.init(trainable)
    ids = batch(workload)
    step = train_step(loss, optimizer)
    start = time.perf_counter()
    compiled = step.lower(trainable, opt_state, frozen, ids).compile()
    compile_s = time.perf_counter() - start
    times, losses = timed_steps(compiled, (trainable, opt_state), frozen, ids, workload)
    step_s = statistics.median(times)
    return {
        **model.info,
        "trainable_params": int(sum(x.size for x in jax.tree.leaves(trainable))),
        "frozen_bytes": nbytes(frozen),
        "compile_s": compile_s,
        "step_s": step_s,
        "step_s_iqr": summary(times)["iqr_s"],
        "step_s_all": times,
        "tokens_per_s": workload.tokens / step_s,
        "peak_bytes": peak_bytes(),
        "losses": losses,
        "hlo": hlo_stats(compiled),
    }


def bench_pair(
    model_name: str, workload: Workload, attention: str | None, rounds: int = 6, hlo_dir: str | None = None
) -> dict[str, Any]:
    """IA3 and floor steps timed in one process, in alternating rounds, for their ratio; ``ia3-flat`` is IA3
    with the optimizer over one raveled vector (``optax.flatten``).

    Separate processes give each variant its own peak memory, but a few-percent ratio between two of
    them also picks up drift (clocks, the neighbour GPU's work). Alternating rounds expose both steps
    to the same conditions; the shared base weights are held once. For a ``*-ia3remat`` model the
    floor runs on the same model without remat (`FLOOR_MODEL`): the target of issue 13. Each mode
    gets at least ``workload.min_time_s`` of timed steps in all. With `hlo_dir`, the optimised HLO of
    both steps is written there (``<model>.<mode>.hlo.txt``) for op-by-op comparison.
    """
    models = {"ia3": build(model_name, workload, attention)}
    floor_name = FLOOR_MODEL.get(model_name, model_name)
    models["floor"] = models["ia3"] if floor_name == model_name else build(floor_name, workload, attention)
    models["ia3-flat"] = models["ia3"]
    ids = batch(workload)
    runs: dict[str, list[Any]] = {}
    for mode in ("ia3", "ia3-flat", "floor"):
        loss, trainable, frozen = loss_fns(models[mode], mode.removesuffix("-flat"))
        optimizer = optimizer_for(mode)
        opt_state = optimizer.init(trainable)
        compiled = train_step(loss, optimizer).lower(trainable, opt_state, frozen, ids).compile()
        runs[mode] = [compiled, (trainable, opt_state), frozen]
        if hlo_dir:
            Path(hlo_dir, f"{model_name}.{mode}.hlo.txt").write_text(compiled.as_text())

    def one_step(mode: str):
        compiled, state, frozen = runs[mode]
        trainable, opt_state, value = compiled(*state, frozen, ids)
        runs[mode][1] = (trainable, opt_state)
        return value, trainable, opt_state

    times: dict[str, list[float]] = {mode: [] for mode in runs}
    for mode in runs:
        durations(lambda: one_step(mode), workload.warmup)
    per_round = max(2, workload.steps // 3)
    for _ in range(rounds):
        for mode in runs:
            times[mode] += durations(lambda: one_step(mode), per_round, workload.min_time_s / rounds)
    out: dict[str, Any] = {**models["ia3"].info, "floor_model": floor_name, "modes": {}}
    for mode, t in times.items():
        out["modes"][mode] = {
            "step_s": statistics.median(t),
            "step_s_iqr": summary(t)["iqr_s"],
            "tokens_per_s": workload.tokens / statistics.median(t),
            "step_s_all": t,
        }
    out["ia3_over_floor"] = out["modes"]["ia3"]["step_s"] / out["modes"]["floor"]["step_s"]
    out["ia3_flat_over_floor"] = out["modes"]["ia3-flat"]["step_s"] / out["modes"]["floor"]["step_s"]
    return out


# ------------------------------------------------------------------------------------------- decoding


@dataclasses.dataclass(frozen=True)
class Decoder:
    """One model's greedy decoding with a KV cache, reduced to what `bench_decode` times.

    ``generate(params, prompt, new_tokens)`` returns the ``(batch, new_tokens)`` new token ids; it is
    not jitted, so that the unmerged variant can wrap it whole in `ia3_jax.apply_fn`. A call with
    ``prefill_tokens`` new tokens runs the prefill alone (the lean model's scan takes 0 steps; Hugging
    Face's generate emits the prefill's token, so 1): ``new_tokens - prefill_tokens`` decode steps
    separate the two calls.
    """

    generate: Callable[[Any, jax.Array, int], jax.Array]
    params: dict[str, Any]  # the base model's weights, no vectors
    vocab_size: int
    prefill_tokens: int
    info: dict[str, Any]


def lean_decoder(workload: Workload, max_len: int) -> Decoder:
    """`llama.generate` on the lean model, layers unrolled (the cache holds `max_len` positions by itself)."""
    del max_len
    config = dataclasses.replace(workload.config, scan=False, remat=False)
    model = llama.Llama(config)

    def generate(params, prompt, new_tokens):
        return llama.generate(model.apply, params, prompt, new_tokens, config)

    params = llama.init_params(model, jax.random.key(0))
    return Decoder(generate, params, config.vocab_size, 0, {"attention": "xla (masked, cache)"})


def hf_decoder(workload: Workload, max_len: int) -> Decoder:
    """FlaxLlamaForCausalLM's own greedy ``generate`` (``max_position_embeddings`` >= `max_len`).

    The end-of-sequence id is set outside the vocabulary, so that greedy decoding on random weights
    never stops early (transformers' Flax generate falls back to the config's eos for ``None``).
    """
    import transformers

    model, params = hf_causal_lm(dataclasses.replace(workload, seq=max(workload.seq, max_len)))
    vocab_size = workload.config.vocab_size

    def generate(params, prompt, new_tokens):
        out = model.generate(
            prompt, params=params, max_new_tokens=new_tokens, do_sample=False, eos_token_id=vocab_size, pad_token_id=0
        )
        return out.sequences[:, prompt.shape[1] :]

    info = {"attention": "hf-unfused", "transformers": transformers.__version__}
    return Decoder(generate, params, vocab_size, 1, info)


DECODERS = {"lean": lean_decoder, "hf": hf_decoder}


def decode_variants(decoder: Decoder) -> dict[str, tuple[Callable, Any]]:
    """Base, unmerged IA3 and merged IA3 as ``name -> (generate, params)``, each generate jitted whole.

    ``generate(params, prompt, new_tokens)`` (`new_tokens` static); base and merged share one
    compiled function, the unmerged variant runs it under `ia3_jax.apply_fn`.
    """
    adapter, base = ia3_jax.split(ia3_jax.ia3_init(decoder.params, IA3_CONFIG))
    joined = ia3_jax.join(base, _random_adapter(adapter, jax.random.key(3)))
    plain = jax.jit(decoder.generate, static_argnums=2)
    unmerged = jax.jit(ia3_jax.apply_fn(decoder.generate, IA3_CONFIG), static_argnums=2)
    return {"base": (plain, base), "unmerged": (unmerged, joined), "merged": (plain, ia3_jax.merge(joined, IA3_CONFIG))}


def _decode_row(
    variants: dict[str, tuple[Callable, Any]],
    prompt: jax.Array,
    new_tokens: int,
    prefill_tokens: int | None,
    steps: int,
    min_time_s: float,
    rounds: int = 5,
) -> dict[str, Any]:
    """One batch size: each variant's generate (and prefill, unless `prefill_tokens` is None) timed.

    Interleaved rounds (drift hits every variant alike), at least `min_time_s` of generate calls per
    variant; the time per token is ``(generate - prefill) / steps`` (no prefill: ``generate / steps``).
    Raises if a variant does not return exactly `new_tokens` tokens per prompt.
    """
    tokens = {name: np.asarray(fn(params, prompt, new_tokens)) for name, (fn, params) in variants.items()}
    for name, t in tokens.items():
        if t.shape != (prompt.shape[0], new_tokens):
            raise ValueError(f"{name} generated {t.shape} tokens, expected {(prompt.shape[0], new_tokens)}.")
    calls = {"generate": new_tokens} | ({"prefill": prefill_tokens} if prefill_tokens is not None else {})
    for fn, params in variants.values():  # every call compiled and warm before the timed rounds
        for n in calls.values():
            jax.block_until_ready(fn(params, prompt, n))
    times: dict[str, dict[str, list[float]]] = {name: {call: [] for call in calls} for name in variants}
    for _ in range(rounds):
        for name, (fn, params) in variants.items():
            times[name]["generate"] += durations(
                functools.partial(fn, params, prompt, new_tokens), 1, min_time_s / rounds
            )
            if prefill_tokens is not None:
                times[name]["prefill"] += durations(functools.partial(fn, params, prompt, prefill_tokens), 3)
    row: dict[str, Any] = {}
    for name, t in times.items():
        generate, prefill = summary(t["generate"]), summary(t["prefill"]) if "prefill" in t else None
        per_token = (generate["median_s"] - (prefill["median_s"] if prefill else 0.0)) / steps
        row[name] = {
            "generate": generate,
            "prefill": prefill,
            "decode_s_per_token": per_token,
            "decode_tokens_per_s": prompt.shape[0] / per_token,
        }
    row["merged_vs_unmerged_same_tokens"] = float(np.mean(tokens["merged"] == tokens["unmerged"]))
    return row


def bench_decode(
    model_name: str,
    workload: Workload,
    batches: tuple[int, ...] = (1, 16),
    prompt_len: int = 128,
    new_tokens: int = 256,
    with_prefill: bool = True,
) -> dict[str, Any]:
    """Greedy decoding with a KV cache: base, unmerged IA3, merged IA3 (`decode_variants`).

    `model_name`: ``lean`` (`llama.generate`, unrolled) or ``hf`` (FlaxLlamaForCausalLM.generate).
    Per batch size, each variant's whole generate (prefill + decode steps) is jitted and timed in
    interleaved rounds. With `with_prefill`, the prefill alone is timed too and the time per token is
    ``(generate - prefill) / decode_steps`` (``decode_steps = new_tokens - prefill_tokens`` of the
    `Decoder`); without it (fewer compilations), ``generate / new_tokens``, prefill included
    (``prefill_included: true``).
    """
    if model_name not in DECODERS:
        raise ValueError(f"unknown decode model {model_name!r}: use one of {sorted(DECODERS)}.")
    decoder = DECODERS[model_name](workload, prompt_len + new_tokens)
    variants = decode_variants(decoder)
    prefill_tokens = decoder.prefill_tokens if with_prefill else None
    steps = new_tokens - decoder.prefill_tokens if with_prefill else new_tokens
    out: dict[str, Any] = {
        **decoder.info,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "decode_steps": steps,
        "prefill_included": not with_prefill,
    }
    for b in batches:
        prompt = jax.random.randint(jax.random.key(5), (b, prompt_len), 0, decoder.vocab_size)
        out[f"batch{b}"] = _decode_row(variants, prompt, new_tokens, prefill_tokens, steps, workload.min_time_s)
    out["peak_bytes"] = peak_bytes()
    return out


# ---------------------------------------------------------------------------------------- inference


def _random_adapter(adapter: Any, key: jax.Array) -> Any:
    """Vectors near 1 (as after training) so that the merged model differs from the base."""
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([1 + 0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def copy_bandwidth(n_bytes: int, repeats: int) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written (``-x`` on bf16)."""
    x = jax.random.normal(jax.random.key(2), (n_bytes // 2,), jnp.bfloat16)
    negate = jax.jit(jnp.negative)
    jax.block_until_ready(negate(x))
    return 2 * n_bytes / statistics.median(durations(lambda: negate(x), repeats))


def _relative_error(a: jax.Array, b: jax.Array) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def bench_inference(
    model_name: str, workload: Workload, attention: str | None, shapes: list[tuple[int, int]], copy_bytes: int
) -> dict[str, Any]:
    """Forward latency of base / unmerged IA3 / merged IA3 (interleaved rounds), and `merge` timings."""
    model = build(model_name, workload, attention)
    adapter, base = ia3_jax.split(ia3_jax.ia3_init(model.params, IA3_CONFIG, layouts=model.layouts))
    adapter = _random_adapter(adapter, jax.random.key(3))
    joined = ia3_jax.join(base, adapter)
    merge = jax.jit(lambda p: ia3_jax.merge(p, IA3_CONFIG, layouts=model.layouts))
    merged = merge(joined)
    forward = jax.jit(model.apply)
    forward_ia3 = jax.jit(ia3_jax.apply_fn(model.apply, IA3_CONFIG))
    variants = {"base": (forward, base), "unmerged": (forward_ia3, joined), "merged": (forward, merged)}
    out: dict[str, Any] = {**model.info, "forward": {}}
    for b, s in shapes:
        ids = jax.random.randint(jax.random.key(4), (b, s), 0, workload.config.vocab_size)
        logits = {name: jax.block_until_ready(fn(p, ids)) for name, (fn, p) in variants.items()}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(workload.steps):  # interleaved rounds: drifts hit all variants alike
            for name, (fn, p) in variants.items():
                times[name] += durations(lambda: fn(p, ids), 5)
        out["forward"][f"{b}x{s}"] = {
            name: {"latency_s": statistics.median(t), "tokens_per_s": b * s / statistics.median(t)}
            for name, t in times.items()
        } | {"merged_vs_unmerged_rel_err": _relative_error(logits["merged"], logits["unmerged"])}
        del logits
    targeted = [_at(base, path)["kernel"] for path in _vector_modules(joined)]
    floor_bytes = 2 * nbytes(targeted) + nbytes(adapter)  # each targeted kernel read once and written once
    bandwidth = copy_bandwidth(copy_bytes, max(5, workload.steps))
    merge_times = durations(lambda: merge(joined), max(10, 3 * workload.steps))
    donated_times = _donated_times(model.layouts, joined, max(5, workload.steps))
    # The documented way (issue 13): eager `merge`, the targeted arrays alone through one compiled call.
    eager = lambda: ia3_jax.merge(joined, IA3_CONFIG, layouts=model.layouts)  # noqa: E731
    jax.block_until_ready(eager())
    eager_times = durations(eager, max(20, 3 * workload.steps), min(2.0, workload.min_time_s))
    merged_once = eager()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unmerge's PEFT warning
        unmerge = lambda: ia3_jax.unmerge(merged_once, adapter, IA3_CONFIG, layouts=model.layouts)  # noqa: E731
        jax.block_until_ready(unmerge())
        unmerge_times = durations(unmerge, max(20, 3 * workload.steps), min(2.0, workload.min_time_s))
    shared = _shared_leaves(joined, merged_once)
    # The host's share: a jitted call that takes the whole tree and does (almost) nothing.
    touch = jax.jit(lambda p: jax.tree.leaves(p)[0][0])
    dispatch_times = durations(lambda: touch(joined), max(10, 3 * workload.steps))
    # Only the targeted modules (kernel + vector) go through jit; the rest of the tree is reused as is.
    paths = _vector_modules(joined)
    targeted_tree = functools.reduce(lambda tree, path: _with(tree, path, _at(joined, path)), paths, {})
    merge_targeted = jax.jit(lambda t: ia3_jax.merge(t, IA3_CONFIG, layouts=model.layouts))
    jax.block_until_ready(merge_targeted(targeted_tree))

    def targeted_then_assembled():
        merged_part = merge_targeted(targeted_tree)
        return functools.reduce(lambda tree, path: _with(tree, path, _at(merged_part, path)), paths, base)

    targeted_times = durations(targeted_then_assembled, max(10, 3 * workload.steps))
    embed_in = jax.tree.leaves(joined)[0]
    embed_out = jax.tree.leaves(merge(joined))[0]
    aliased = _buffer(embed_in) == _buffer(embed_out)
    out["merge"] = {
        "targeted_kernels": len(targeted),
        "targeted_bytes": nbytes(targeted),
        "floor_bytes": floor_bytes,
        "copy_bandwidth_Bps": bandwidth,
        "floor_s": floor_bytes / bandwidth,
        "jit_s": statistics.median(merge_times),
        "jit_donated_s": statistics.median(donated_times),
        "eager_s": statistics.median(eager_times),
        "eager": summary(eager_times),
        "unmerge_eager": summary(unmerge_times),
        "eager_untouched_leaves_shared": shared,
        "targeted_jit_s": statistics.median(targeted_times),
        "whole_tree_dispatch_s": statistics.median(dispatch_times),
        "tree_leaves": len(jax.tree.leaves(joined)),
        "untouched_leaves_forwarded": aliased,
        "hlo": hlo_stats(merge.lower(joined).compile()),
    }
    out["merge"]["jit_over_floor"] = out["merge"]["jit_s"] / out["merge"]["floor_s"]
    out["merge"]["jit_donated_over_floor"] = out["merge"]["jit_donated_s"] / out["merge"]["floor_s"]
    out["merge"]["targeted_jit_over_floor"] = out["merge"]["targeted_jit_s"] / out["merge"]["floor_s"]
    out["merge"]["eager_over_floor"] = out["merge"]["eager_s"] / out["merge"]["floor_s"]
    out["merge"]["unmerge_eager_over_floor"] = out["merge"]["unmerge_eager"]["median_s"] / out["merge"]["floor_s"]
    out["peak_bytes"] = peak_bytes()
    return out


def _donated_times(layouts: Any, joined: Any, repeats: int) -> list[float]:
    """`merge` jitted with the input donated: untouched leaves alias their input, nothing is copied.

    Each call gets a fresh copy of the tree (made and finished outside the timed region).
    """
    merge = jax.jit(lambda p: ia3_jax.merge(p, IA3_CONFIG, layouts=layouts), donate_argnums=0)
    times = []
    for _ in range(repeats + 1):
        fresh = jax.block_until_ready(jax.tree.map(jnp.copy, joined))
        with warnings.catch_warnings():  # the vectors are donated too but have no output to alias
            warnings.filterwarnings("ignore", "Some donated buffers were not usable")
            times += durations(lambda: merge(fresh), 1)
    return times[1:]  # the first call compiles


def _shared_leaves(joined: Any, merged: Any) -> dict[str, int]:
    """How many leaves of `merged` are `joined`'s own arrays (shared) and how many are new."""
    inputs = {id(x) for x in jax.tree.leaves(joined)}
    outputs = jax.tree.leaves(merged)
    shared = sum(id(x) in inputs for x in outputs)
    return {"shared": shared, "new": len(outputs) - shared}


def _buffer(x: jax.Array) -> int | None:
    try:
        return x.unsafe_buffer_pointer()
    except Exception:
        return None


def environment() -> dict[str, Any]:
    import flax

    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "device_count": jax.device_count(),
    }
