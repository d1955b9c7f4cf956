"""The benchmark harness on the CPU at tiny sizes: it runs end to end and measures the right things.

No timing is asserted. What is checked: the lean Llama is Hugging Face's Llama (same logits as
transformers' PyTorch model on converted weights), scanning it changes nothing, the IA3, floor and
full variants start from the same loss, IA3 trains, PEFT adapts the same modules with as many
parameters, the merged model matches the unmerged one, and the report judges targets correctly.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import ia3_jax
from benchmarks import jax_bench, llama, report, run


def _lean_params_from_torch(model, config: llama.LlamaConfig) -> dict:
    """transformers' LlamaForCausalLM state dict -> the unrolled lean Llama's params (kernels transposed)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    dense = lambda name: {"kernel": jnp.asarray(sd[f"{name}.weight"].T)}
    layers = {}
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        layers[str(i)] = {
            "input_layernorm": {"weight": jnp.asarray(sd[f"{p}.input_layernorm.weight"])},
            "post_attention_layernorm": {"weight": jnp.asarray(sd[f"{p}.post_attention_layernorm.weight"])},
            "self_attn": {n: dense(f"{p}.self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp": {n: dense(f"{p}.mlp.{n}") for n in ("gate_proj", "up_proj", "down_proj")},
        }
    return {
        "embed_tokens": {"embedding": jnp.asarray(sd["model.embed_tokens.weight"])},
        "layers": layers,
        "norm": {"weight": jnp.asarray(sd["model.norm.weight"])},
        "lm_head": dense("lm_head"),
    }


@pytest.mark.slow  # the harness at tiny sizes: 6 s
@pytest.mark.interop
def test_lean_llama_matches_transformers_llama():
    torch = pytest.importorskip("torch")
    from benchmarks import torch_bench

    workload = jax_bench.Workload(config=llama.TINY_F32, batch=2, seq=16)
    model = torch_bench.build(workload, "cpu")
    with torch.no_grad():
        torch.nn.init.normal_(model.model.layers[0].input_layernorm.weight, 1.0, 0.2)  # not all ones
    ids = np.random.default_rng(0).integers(0, llama.TINY_F32.vocab_size, (2, 16))
    with torch.no_grad():
        expected = model(input_ids=torch.as_tensor(ids)).logits.numpy()
    params = _lean_params_from_torch(model, llama.TINY_F32)
    got = llama.Llama(llama.TINY_F32).apply({"params": params}, jnp.asarray(ids))
    chex.assert_trees_all_close(got, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.slow  # 6 s
def test_scanned_lean_llama_equals_unrolled_with_ia3():
    unrolled = llama.Llama(llama.TINY_F32)
    scanned = llama.Llama(dataclasses.replace(llama.TINY_F32, scan=True))
    params = llama.init_params(unrolled, jax.random.key(0))
    stacked = dict(params, layers=jax.tree.map(lambda *x: jnp.stack(x), *params["layers"].values()))
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, llama.TINY_F32.vocab_size)
    config = jax_bench.IA3_CONFIG
    layouts = ia3_jax.infer_layouts(scanned.apply, {"params": stacked}, ids)
    _, base_u = ia3_jax.split(ia3_jax.ia3_init(params, config))
    adapter_s, base_s = ia3_jax.split(ia3_jax.ia3_init(stacked, config, layouts=layouts))
    adapter_s = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(2), v.shape), adapter_s)
    # the unrolled model gets layer i's row of each stacked vector
    adapter_u = {"layers": {str(i): jax.tree.map(lambda v: v[i], adapter_s["layers"]) for i in range(2)}}

    def loss(model, base, adapter):
        logits = ia3_jax.apply_fn(model.apply, config)({"params": ia3_jax.join(base, adapter)}, ids)
        return llama.causal_lm_loss(logits, ids)

    value_u, grads_u = jax.jit(jax.value_and_grad(lambda a: loss(unrolled, base_u, a)))(adapter_u)
    value_s, grads_s = jax.jit(jax.value_and_grad(lambda a: loss(scanned, base_s, a)))(adapter_s)
    chex.assert_trees_all_close(value_s, value_u, rtol=1e-5)
    restacked = jax.tree.map(lambda *x: jnp.stack(x), *grads_u["layers"].values())
    chex.assert_trees_all_close(grads_s["layers"], restacked, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # every harness process end to end: 13 s
@pytest.mark.interop
def test_cpu_tiny_run_end_to_end(tmp_path):
    pytest.importorskip("torch")
    names = ["jax:lean:ia3", "jax:lean:floor", "infer:lean", "torch:peft:ia3", "torch:peft:floor"]
    assert run.main(["--cpu-tiny", "--out", str(tmp_path), "--only", ",".join(names)]) == 0
    results = report.load(tmp_path)
    assert sorted(results) == sorted(names)
    for name, r in results.items():
        assert r["status"] == "ok", (name, r.get("error"))
    ia3, floor = results["jax:lean:ia3"], results["jax:lean:floor"]
    # vectors start at one, so IA3 starts exactly where the floor (untouched model) is
    assert ia3["losses"][0] == pytest.approx(floor["losses"][0], rel=1e-6)
    assert ia3["losses"][-1] < ia3["losses"][0]  # the vectors train
    peft_ia3, peft_floor = results["torch:peft:ia3"], results["torch:peft:floor"]
    assert peft_ia3["losses"][0] == pytest.approx(peft_floor["losses"][0], rel=1e-6)
    # PEFT adapts the same modules: k_proj, v_proj (2 x 32 per layer), down_proj input (128 per layer)
    assert ia3["trainable_params"] == peft_ia3["trainable_params"] == 2 * (32 + 32 + 128)
    assert floor["trainable_params"] == llama.TINY_F32.hidden_size
    assert ia3["workload"]["config"]["dtype"] == "float32"  # dtypes by name in the JSON
    infer = results["infer:lean"]
    for shape in infer["forward"].values():
        assert shape["merged_vs_unmerged_rel_err"] < 1e-5  # float32: merge is exact up to rounding
    merge = infer["merge"]
    assert merge["targeted_kernels"] == 3 * llama.TINY_F32.num_layers
    assert merge["floor_bytes"] >= 2 * merge["targeted_bytes"]
    assert (tmp_path / "plot.png").stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "lean: IA3 step / floor step" in summary and "jax:lean:ia3" in summary


@pytest.mark.slow  # 5 s
def test_tunix_bench_trains_only_the_vectors_or_the_floor_weight():
    pytest.importorskip("tunix")
    from benchmarks import tunix_bench

    workload = jax_bench.Workload(config=llama.TINY_F32, batch=2, seq=16, warmup=1, steps=2, min_time_s=0.0)
    ia3, floor = (tunix_bench.bench_train(mode, workload, cpu_tiny=True) for mode in ("ia3", "floor"))
    assert ia3["losses"][0] == pytest.approx(floor["losses"][0], rel=1e-6)  # vectors start at one
    assert ia3["losses"][-1] < ia3["losses"][0] and floor["losses"][-1] < floor["losses"][0]
    config = tunix_bench.tunix_config(cpu_tiny=True)
    kv = config.num_kv_heads * config.head_dim  # PEFT's llama targets: k_proj, v_proj outputs, down_proj input
    assert ia3["trainable_params"] == config.num_layers * (2 * kv + config.hidden_dim)
    assert floor["trainable_params"] == config.embed_dim


def _hand_merged_llama(joined: dict) -> dict:
    """`jax_bench.IA3_CONFIG`'s merge written out for Llama's (in, out) kernels: the k_proj and v_proj
    vectors scale their kernel's output axis, down_proj's (feedforward) its input axis; vectors dropped."""
    flat = traverse_util.flatten_dict(joined)
    merged = {}
    for path, leaf in flat.items():
        vector = flat.get((*path[:-1], "ia3_l"))
        if path[-1] == "kernel" and vector is not None:
            leaf = leaf * (vector[:, None] if path[-2] == "down_proj" else vector[None, :])
        if path[-1] != "ia3_l":
            merged[path] = leaf
    return traverse_util.unflatten_dict(merged)


@pytest.mark.slow  # transformers' FlaxLlamaForCausalLM.generate at tiny size: 16 s
@pytest.mark.interop
def test_hf_decode_tokens_match_hand_merged_model_and_bench_reports_per_variant():
    workload = jax_bench.Workload(config=llama.TINY_F32, seq=32, min_time_s=0.0)
    decoder = jax_bench.hf_decoder(workload, max_len=24)
    variants = jax_bench.decode_variants(decoder)
    prompt = jax.random.randint(jax.random.key(5), (4, 8), 0, decoder.vocab_size)
    tokens = {name: np.asarray(generate(params, prompt, 16)) for name, (generate, params) in variants.items()}
    base_generate, _ = variants["base"]
    expected = np.asarray(base_generate(_hand_merged_llama(variants["unmerged"][1]), prompt, 16))
    assert expected.shape == (4, 16)  # exactly the new tokens, no prompt
    # The vectors (1 + 0.1 N(0, 1)) change the greedy tokens here (by the 9th of 16 at the latest):
    # an unmerged variant that skipped IA3 would fail.
    assert not np.array_equal(expected, tokens["base"])
    np.testing.assert_array_equal(tokens["unmerged"], expected)  # float32: the same argmax
    np.testing.assert_array_equal(tokens["merged"], expected)

    result = jax_bench.bench_decode("hf", workload, batches=(1,), prompt_len=8, new_tokens=4)
    assert result["decode_steps"] == 3 and not result["prefill_included"]  # the prefill emits the first token
    row = result["batch1"]
    for name in ("base", "unmerged", "merged"):
        assert row[name]["prefill"]["n"] >= 1 and row[name]["generate"]["n"] >= 1  # both timed (no speed asserted)
        assert row[name]["decode_tokens_per_s"] == pytest.approx(1 / row[name]["decode_s_per_token"])
    assert row["merged_vs_unmerged_same_tokens"] == 1.0
    table = report.decode_table({"decode:hf": {**result, "status": "ok"}})
    assert "| decode:hf | 1 |" in table and "(generate - prefill) / 3 |" in table


def test_suite_runs_its_variants_not_only_the_prioritised_ones():
    assert run.suite_variants(["decode"]) == ["decode:lean", "decode:hf", "infer:lean-scan"]
    prioritised_first = ["infer:lean", "infer:hf", "decode:lean", "decode:hf", "infer:lean-scan"]
    assert run.suite_variants(["decode", "inference"]) == prioritised_first


def _train(name: str, step_s: float, peak: float | None = None, tokens: int = 8192) -> dict:
    return {"name": name, "status": "ok", "step_s": step_s, "tokens_per_s": tokens / step_s, "peak_bytes": peak}


def _by_name(*results: dict) -> dict[str, dict]:
    return {r["name"]: r for r in results}


def test_report_targets_and_table():
    results = _by_name(
        _train("jax:lean:ia3", 0.080, 10.0),
        _train("jax:lean:floor", 0.075, 9.0),
        _train("torch:peft:ia3", 0.140, 20.0),
        {
            "name": "pair:lean",
            "status": "ok",
            "ia3_over_floor": 1.02,
            "modes": {"ia3": {"step_s": 0.0765}, "floor": {"step_s": 0.075}},
        },
        {"name": "jax:hf:full", "status": "oom", "error": "RESOURCE_EXHAUSTED: out of memory"},
    )
    rows = {what: (value, verdict) for what, value, verdict in report.target_rows(results)}
    # the pair (same process, alternating rounds) is preferred over separate processes (0.080 / 0.075)
    assert rows["lean: IA3 step / floor step <= 1.03 (alternating rounds, one process)"] == ("1.020", "met")
    assert rows["lean IA3 tokens/s / PEFT IA3 tokens/s >= 1.25"] == ("1.750", "met")
    assert rows["lean IA3 peak memory / PEFT IA3 peak <= 1.0"] == ("0.500", "met")
    results["pair:lean"]["ia3_over_floor"] = 1.05
    rows = {what: verdict for what, _, verdict in report.target_rows(results)}
    assert rows["lean: IA3 step / floor step <= 1.03 (alternating rounds, one process)"] == "MISSED"
    table = report.training_table(results)
    assert "| jax:hf:full | oom |" in table


def test_report_tunix_comparison_has_its_own_table_and_targets():
    results = _by_name(
        _train("jax:lean:ia3", 0.080, 10.0),
        _train("tunix:llama32-1b:ia3", 0.103, 12.0),
        _train("tunix:llama32-1b:floor", 0.100, 11.0),
        _train("torch:compile:ia3:llama32-1b", 0.110, 24.0),
        _train("torch:compile:floor:llama32-1b", 0.100, 22.0),
    )
    rows = {what: (value, verdict) for what, value, verdict in report.issue12_rows(results)}
    assert rows["tunix:llama32-1b:ia3 step / its floor (tunix:llama32-1b:floor) <= 1.03"] == ("1.030", "met")
    assert rows["tunix:llama32-1b:ia3 peak / torch:compile:ia3:llama32-1b peak"] == ("0.500", "reported")
    assert rows["tunix:llama32-1b:ia3 tokens/s / torch:peft:ia3:llama32-1b tokens/s"][0] == "not measured"
    tunix_table, main_table = report.training_table(results, tunix=True), report.training_table(results)
    assert "| torch:compile:ia3:llama32-1b |" in tunix_table and "1.100x" in tunix_table  # vs its own floor
    assert "llama32-1b" not in main_table and "| jax:lean:ia3 |" in main_table
    assert "Tunix's Llama-3.2-1B" in report.markdown(results)


def test_step_profile_sorts_kernels_into_kinds_per_step():
    """Real kernel names of both frameworks (H200 traces) land in their kind; totals are per step."""
    from benchmarks import step_profile

    kernels = [
        ("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", 4, 400.0),  # cuBLAS (JAX and PyTorch)
        ("gemm_fusion_dot_12", 2, 100.0),  # XLA's Triton GEMM
        ("triton_tem_fused_mm_1", 2, 100.0),  # Inductor's GEMM template
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", 2, 200.0),
        ("void cudnn::fusion::fmha_reduce_head<true>(void const*)", 2, 20.0),  # the backward's helpers
        ("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*)", 2, 16.0),
        ("void cudnn::fusion::convert_dq_to_16bits<true>(void const*)", 2, 14.0),
        ("triton_poi_fused__to_copy__unsafe_view_add_bmm_cat", 2, 60.0),  # names "bmm" but is elementwise
        ("triton_for_fused_0", 1, 10.0),  # Inductor's foreach kernel (the optimizer)
        ("input_add_multiply_reduce_fusion_21", 2, 80.0),
        ("Memset (Device)", 4, 40.0),
    ]
    profile = step_profile.by_kind(kernels, steps=2)
    assert {k: round(v["ms"], 6) for k, v in profile["kinds"].items()} == {
        "attention": 0.125,  # (200 + 20 + 16 + 14) us / 2 steps
        "matmul": 0.3,  # (400 + 100 + 100) / 2
        "other": 0.095,  # (60 + 10 + 80 + 40) / 2
    }
    assert profile["kinds"]["matmul"]["launches"] == 4.0
    assert profile["gpu_ms_per_step"] == pytest.approx(sum(us for *_, us in kernels) / 1e3 / 2)
    assert [row["kernel"] for row in profile["costliest"]][:2] == [kernels[0][0], kernels[3][0]]


def test_flat_modes_run_adamw_over_one_raveled_vector():
    """``ia3-flat`` (the README's advice) keeps AdamW's moments as one array of all the values; ``ia3`` one per leaf."""
    tree = {"k": {"ia3_l": jnp.ones(3)}, "down": {"ia3_l": jnp.ones((2, 2))}}
    shapes = lambda mode: sorted(x.shape for x in jax.tree.leaves(jax_bench.optimizer_for(mode).init(tree)) if x.ndim)
    assert shapes("ia3-flat") == [(7,), (7,)]  # mu and nu over 3 + 4 values
    assert shapes("ia3") == [(2, 2), (2, 2), (3,), (3,)]
