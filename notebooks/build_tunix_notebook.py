"""Writes notebooks/04_tunix.ipynb (IA3 on a tiny Tunix Llama 3 with PeftTrainer), executed, with outputs.

    python notebooks/build_tunix_notebook.py       # needs the [test] extra (tunix, torch, peft, nbclient)

Kept apart from build_notebooks.py (same `build` helper) so that the Tunix extra stays optional there.
"""

from __future__ import annotations

from build_notebooks import build

TUNIX = [
    """# IA3 on a Tunix model, trained by Tunix's own `PeftTrainer`

Tunix (Google's JAX post-training library) ships Flax NNX models (Llama 3, Qwen 3, Gemma) and a
`PeftTrainer` that trains only `nnx.LoRAParam` variables when a model has any. `ia3_jax.nnx.IA3Vector` is
such a variable, so IA3 trains under the unmodified trainer. This notebook takes a tiny Llama 3 built
from a Hugging Face config (random weights, no download) through: PEFT's default targets, training,
merge, an orbax adapter checkpoint, and PEFT's file format read back by PyTorch PEFT.""",
    """import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from flax import nnx
from tunix.models.llama3 import model as llama_lib
from tunix.models.llama3 import params as llama_params
from tunix.sft import peft_trainer

import ia3_jax
import ia3_jax.nnx as ia3_nnx
import ia3_jax.tunix as ia3_tunix

work = Path(tempfile.mkdtemp())
torch.manual_seed(0)
hf_config = transformers.LlamaConfig(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
)
transformers.LlamaForCausalLM(hf_config).save_pretrained(work / "base")  # the PyTorch twin's weights
config = llama_lib.ModelConfig(num_layers=2, vocab_size=128, embed_dim=32, hidden_dim=64, num_heads=4,
                               head_dim=8, num_kv_heads=2, rope_theta=10000, norm_eps=1e-5)
base = llama_params.create_model_from_safe_tensors(str(work / "base"), config)  # Tunix loads them""",
    """## IA3 vectors where PEFT puts them

`default_config` is PEFT's IA3 default for the Hugging Face twin (`k_proj`, `v_proj`, `down_proj`,
the last one feedforward), in PEFT's module names; `ia3_tunix.ia3_init` translates them through
Tunix's key mapping and adapts a clone (the base model is not modified). Vectors have the feature
shape of the Tunix module: `(num_kv_heads, head_dim)` for `k_proj`, the input features for `down_proj`.""",
    """ia3_config = ia3_tunix.default_config(base)
model = ia3_tunix.ia3_init(base, ia3_config)
print(ia3_config.target_modules, ia3_config.feedforward_modules)
print(jax.tree.map(jnp.shape, ia3_nnx.adapter(model))["layers"]["0"])
trainable = sum(v.size for v in jax.tree.leaves(ia3_nnx.adapter(model)))
total = sum(v.size for v in jax.tree.leaves(nnx.state(base, nnx.Param)))
print(f"trainable: {trainable} of {total} ({100 * trainable / total:.2f}%)")""",
    """## Train with `PeftTrainer`

Nothing IA3-specific: the trainer finds `nnx.LoRAParam` variables (the IA3 vectors), builds
`nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` and differentiates only them.""",
    """tokens = np.random.default_rng(0).integers(0, 128, (4, 8)).astype(np.int32)
data = [peft_trainer.TrainingInput(input_tokens=tokens, input_mask=np.ones_like(tokens, bool))] * 20


def model_inputs(batch):
    batch_size, length = batch.input_tokens.shape
    return {
        "input_tokens": batch.input_tokens,
        "input_mask": batch.input_mask,
        "positions": jnp.broadcast_to(jnp.arange(length), (batch_size, length)),
        "attention_mask": jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch_size, length, length)),
    }


def loss(m):
    return float(peft_trainer._default_loss_fn(m, **model_inputs(data[0])))


base_weights = nnx.state(model, nnx.Not(ia3_nnx.IA3Vector))
before = loss(model)
training = peft_trainer.TrainingConfig(eval_every_n_steps=1000, max_steps=20, pbar_description=None)
peft_trainer.PeftTrainer(model, optax.adam(0.1), training).with_gen_model_input_fn(model_inputs).train(data)
after = loss(model)
print(f"loss {before:.4f} -> {after:.4f}")
assert after < before
jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Not(ia3_nnx.IA3Vector)), base_weights)
print("base weights unchanged")""",
    """## Merge for serving

`ia3_nnx.merge` folds every vector into its weight (`w * l`, the same arithmetic as for Linen) and
gives back plain Tunix modules without vectors.""",
    """length = tokens.shape[1]
args = (jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(length), tokens.shape), None,
        jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (4, length, length)))
adapted_logits, _ = model(*args)
merged = ia3_nnx.merge(model)
merged_logits, _ = merged(*args)
print("max |adapted - merged|:", float(jnp.abs(adapted_logits - merged_logits).max()))
assert jnp.allclose(adapted_logits, merged_logits, atol=1e-4)
print(type(merged.layers[0].attn.k_proj).__name__, hasattr(merged.layers[0].attn.k_proj, "ia3_l"))""",
    """## Save: an orbax adapter checkpoint, and PEFT's files

`ia3_nnx.save_adapter` writes only the vectors (plus the config); `load_adapter` restores them onto
an adapted model, even one built abstractly with `nnx.eval_shape`. `ia3_tunix.save_peft` writes
PEFT's `adapter_config.json` + `adapter_model.safetensors` for the Hugging Face twin, with every
vector reshaped through Tunix's key mapping (`(2, 8)` -> PEFT's `(16, 1)` for `k_proj`).""",
    """ia3_nnx.save_adapter(work / "adapter", model, ia3_config)
restored = ia3_tunix.ia3_init(base, ia3_config)
ia3_nnx.load_adapter(work / "adapter", restored)
jax.tree.map(np.testing.assert_array_equal, ia3_nnx.adapter(restored), ia3_nnx.adapter(model))

ia3_tunix.save_peft(work / "peft", model, ia3_config)
print(sorted(p.name for p in (work / "peft").iterdir()))""",
    """## PyTorch PEFT reads it

`PeftModel.from_pretrained` loads the files into the PyTorch twin. PyTorch's and Tunix's Llama do not
compute exactly alike (about 1e-4 relative in float32 on a CPU, more once trained vectors amplify it),
so the exact check is made inside Tunix: PEFT's `merge_and_unload()` weights, loaded by Tunix, must
give the logits of the Tunix model carrying the vectors.""",
    """import peft

twin = transformers.LlamaForCausalLM.from_pretrained(work / "base").eval()
peft_model = peft.PeftModel.from_pretrained(twin, work / "peft")
with torch.no_grad():
    torch_logits = peft_model(torch.tensor(tokens)).logits.numpy()
peft_model.merge_and_unload().save_pretrained(work / "peft_merged")
tunix_from_peft = llama_params.create_model_from_safe_tensors(str(work / "peft_merged"), config)
expected, _ = tunix_from_peft(*args)
scale = float(jnp.abs(expected).max())
exact = float(jnp.abs(expected - adapted_logits).max()) / scale
print(f"Tunix + ia3_jax vs Tunix with PEFT's merged weights: {exact:.1e} (relative)")
framework = np.abs(torch_logits - adapted_logits).max() / scale
print(f"PyTorch PEFT vs Tunix + ia3_jax (framework difference): {framework:.1e}")
assert exact < 1e-5""",
]

if __name__ == "__main__":
    build("04_tunix.ipynb", TUNIX)
