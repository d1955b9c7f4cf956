"""PyTorch side of the benchmarks: PEFT's IA3, its floor and full fine-tuning on HF's LlamaForCausalLM.

The same workload as `benchmarks.jax_bench` (model shape, batch, float32 next-token loss, one AdamW
step per iteration), ``sdpa`` attention in bf16. Ways of running it (`RUNNERS`):
  peft          eager PyTorch, ``torch.optim.AdamW`` defaults, as a PEFT user runs it off the shelf;
  compile       ``torch.compile`` of model + loss (default mode), fused AdamW; the first step's extra
                time is reported as ``compile_s``;
  compile-liger as compile, with Liger kernels' fused linear cross-entropy (no logits materialised);
  compile-ckpt  as compile, with HF gradient checkpointing (the memory-constrained PyTorch setting).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
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


RUNNERS = ("peft", "compile", "compile-liger", "compile-ckpt")


def _loss_fn(model: Any, runner: str) -> Any:
    """``loss(ids)`` for a runner: model + float32 next-token loss, compiled unless eager."""
    import torch

    if runner == "compile-liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        lce = LigerFusedLinearCrossEntropyLoss()
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model

        def liger_loss(ids: Any) -> Any:
            hidden = inner.model(input_ids=ids).last_hidden_state[:, :-1]
            out = lce(inner.lm_head.weight, hidden.flatten(0, 1), ids[:, 1:].flatten())
            return out[0] if isinstance(out, tuple) else getattr(out, "loss", out)

        inner.model.compile()  # the decoder compiled; Liger's kernel runs the lm_head + loss
        return liger_loss

    def loss(ids: Any) -> Any:
        return causal_lm_loss(model(input_ids=ids).logits, ids)

    return loss if runner == "peft" else torch.compile(loss)


def fused_adamw(runner: str, device: str) -> bool:
    """Whether a runner's AdamW is the fused CUDA kernel (compiled runners on a GPU; eager PEFT keeps the default)."""
    return runner != "peft" and device.startswith("cuda")


def make_step(
    mode: str, workload: Workload, device: str, runner: str = "peft"
) -> tuple[Callable[[], Any], Any, list[Any]]:
    """``(step, model, params)``: ``step()`` runs one AdamW step of `mode` on a fixed random batch and
    returns the loss (not synchronised); `params` are the tensors AdamW updates."""
    import torch

    if runner not in RUNNERS:
        raise ValueError(f"unknown runner {runner!r}: use one of {RUNNERS}.")
    model, params = trainable(build(workload, device), mode)
    model.train()
    if runner == "compile-ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, fused=fused_adamw(runner, device) or None)
    generator = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, workload.config.vocab_size, (workload.batch, workload.seq), generator=generator).to(device)
    loss_fn = _loss_fn(model, runner)

    def step() -> Any:
        loss = loss_fn(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, model, params


def bench_train(
    mode: str, workload: Workload, device: str, runner: str = "peft", min_time_s: float = 0.0
) -> dict[str, Any]:
    """Median (and IQR) step time, tokens/s and peak memory (max_memory_allocated) of one training mode.

    Times ``workload.steps`` steps, or more until `min_time_s` seconds of timed steps, after
    ``workload.warmup`` warm-up steps (the first of which compiles, for compiled runners).
    """
    import torch

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    run_step, model, params = make_step(mode, workload, device, runner)
    fused = fused_adamw(runner, device)
    losses: list[Any] = []

    def step() -> None:
        losses.append(run_step())

    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the weights stay allocated, so they count in the peak
    warmup = []
    for _ in range(max(1, workload.warmup)):
        sync()
        start = time.perf_counter()
        step()
        sync()
        warmup.append(time.perf_counter() - start)
    times: list[float] = []
    while len(times) < workload.steps or sum(times) < min_time_s:
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    vectors = [p for n, p in model.named_parameters() if "ia3_l" in n]
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (step_s, step_s, step_s)
    return {
        "runner": runner,
        "fused_adamw": bool(fused),
        "attention": model.config._attn_implementation,
        "trainable_params": int(sum(p.numel() for p in params)),
        "ia3_vector_dtype": str(vectors[0].dtype) if vectors else None,
        "compile_s": (warmup[0] - step_s) if runner != "peft" else None,
        "warmup_s_all": warmup,
        "step_s": step_s,
        "step_s_iqr": [q1, q3],
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
