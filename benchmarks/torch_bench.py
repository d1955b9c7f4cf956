"""PyTorch side of the benchmarks: PEFT's IA3, its floor and full fine-tuning on HF's LlamaForCausalLM.

The same workload as `benchmarks.jax_bench` (model shape, batch, float32 next-token loss, one AdamW
step per iteration), eager PyTorch with ``sdpa`` attention in bf16, as a PEFT user would run it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks.jax_bench import LEARNING_RATE, Workload


def build(workload: Workload, device: str) -> Any:
    """HF LlamaForCausalLM with random weights, made directly on `device` in the config's param dtype."""
    import jax.numpy as jnp
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    c = workload.config
    config = LlamaConfig(**workload.hf_llama_kwargs(), attn_implementation="sdpa")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, jnp.dtype(c.param_dtype).name))  # bfloat16 or float32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def causal_lm_loss(logits: Any, ids: Any) -> Any:
    """Mean next-token cross-entropy in float32 (what HF computes for ``labels=ids``)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def trainable(model: Any, mode: str) -> tuple[Any, list[Any]]:
    """The model to run and the params AdamW updates, for ia3 / floor / full."""
    if mode == "ia3":
        from peft import IA3Config, get_peft_model

        model = get_peft_model(model, IA3Config(task_type="CAUSAL_LM"))  # llama: k_proj, v_proj, down_proj
    elif mode == "floor":
        model.requires_grad_(False)
        model.model.layers[0].input_layernorm.weight.requires_grad_(True)
    elif mode != "full":
        raise ValueError(f"unknown training mode {mode!r}: use ia3, floor or full.")
    return model, [p for p in model.parameters() if p.requires_grad]


def bench_train(mode: str, workload: Workload, device: str) -> dict[str, Any]:
    """Median step time, tokens/s and peak memory (max_memory_allocated) of one training mode."""
    import torch

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model, params = trainable(build(workload, device), mode)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
    generator = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, workload.config.vocab_size, (workload.batch, workload.seq), generator=generator).to(device)
    losses: list[Any] = []

    def step() -> None:
        loss = causal_lm_loss(model(input_ids=ids).logits, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the weights stay allocated, so they count in the peak
    times = []
    for i in range(workload.warmup + workload.steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i >= workload.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    vectors = [p for n, p in model.named_parameters() if "ia3_l" in n]
    return {
        "attention": model.config._attn_implementation,
        "trainable_params": int(sum(p.numel() for p in params)),
        "ia3_vector_dtype": str(vectors[0].dtype) if vectors else None,
        "step_s": step_s,
        "step_s_all": times,
        "tokens_per_s": workload.tokens / step_s,
        "peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()) if cuda else None,
        "losses": [float(v) for v in losses],
    }


def environment() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers_torch": transformers.__version__,
        "cuda": torch.version.cuda,
        "torch_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
