"""Writes the notebooks in this folder from the cell sources below, executed, with their outputs.

    python notebooks/build_notebooks.py            # needs the [test] extra (torch, peft, nbclient)

The notebooks are stored with their outputs so that they read as tutorials on GitHub; stderr
(library deprecation warnings) is left out. CI re-executes them with ``pytest --nbmake notebooks``:
every check is an ``assert`` in a cell, so a notebook whose results drift fails CI. Each one builds
its tiny models from configs (no downloads), jits every model call and runs in about 10-15 s on a
2-core CPU, most of it importing transformers and torch.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

QUICKSTART = [
    """# IA3 on a Flax Linen model in five minutes

IA3 learns one scaling vector per targeted layer while the model stays frozen. Attention-type layers get
their **output** scaled, feedforward layers their **input**. This notebook takes a tiny Linen model
through the whole loop: config, `ia3_init`, `split`/`join`, plain optax training of the adapter alone
under `apply_fn`, and `merge` into plain weights that run without any interceptor.""",
    """import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ia3_jax


class Block(nn.Module):
    \"\"\"An attention-free stand-in for a transformer block: two projections and a feedforward.\"\"\"

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(32, name="value")(x)) + nn.Dense(32, name="key")(x)
        h = nn.Dense(32, name="ff_out")(nn.gelu(nn.Dense(64, name="ff_in")(h)))
        return nn.Dense(2, name="head")(h)


model = Block()
kx, kp = jax.random.split(jax.random.key(0))
x = jax.random.normal(kx, (256, 8))
params = model.init(kp, x)["params"]""",
    """## A base model, then a new task

Pretrain the base on one rule, then ask IA3 to adapt it to a related one.""",
    """def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(params, y, forward=model.apply):
    return float((forward({"params": params}, x).argmax(-1) == y).mean())


old_task = (x[:, 0] + x[:, 1] > 0).astype(jnp.int32)
new_task = (x[:, 0] - x[:, 2] > 0).astype(jnp.int32)

opt = optax.adam(1e-2)
state = opt.init(params)


@jax.jit
def pretrain_step(params, state):
    grads = jax.grad(lambda p: xent(model.apply({"params": p}, x), old_task))(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state


for _ in range(200):
    params, state = pretrain_step(params, state)
print(f"base: old task {accuracy(params, old_task):.3f}, new task {accuracy(params, new_task):.3f}")
assert accuracy(params, old_task) > 0.95""",
    """## Config, vectors, split

`IA3Config` takes PEFT's fields. `ia3_init` inserts an `ia3_l` leaf (ones) next to every targeted kernel;
`split` separates the trainable adapter (the vectors and any `modules_to_save` copies) from the frozen base.""",
    """config = ia3_jax.IA3Config(target_modules=["key", "value", "ff_out"], feedforward_modules=["ff_out"])
adapter, base = ia3_jax.split(ia3_jax.ia3_init(params, config), config)

print(jax.tree.map(jnp.shape, adapter))
n_adapter = sum(v.size for v in jax.tree.leaves(adapter))
n_base = sum(v.size for v in jax.tree.leaves(base))
print(f"trainable: {n_adapter} of {n_adapter + n_base} ({100 * n_adapter / (n_adapter + n_base):.1f}%)")
assert adapter["ff_out"]["ia3_l"].shape == (64,)   # feedforward: its input features
assert adapter["value"]["ia3_l"].shape == (32,)    # attention-type: the output features""",
    """## Train the adapter alone with optax

`apply_fn` enters the interceptor *inside* whatever traces it (here `jax.jit` via `make_train_step`) and
raises if a vector was never applied. The optimizer state covers the adapter only.""",
    """forward = ia3_jax.apply_fn(model.apply, config)


def loss_fn(params, x, y):
    return xent(forward({"params": params}, x), y)


optimizer = optax.adam(3e-2)
opt_state = optimizer.init(adapter)
step = ia3_jax.make_train_step(loss_fn, optimizer)
losses = []
for _ in range(300):
    adapter, opt_state, loss = step(adapter, opt_state, base, x, new_task)
    losses.append(float(loss))

before = accuracy(params, new_task)
after = accuracy(ia3_jax.join(base, adapter), new_task, forward)
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; new-task accuracy {before:.3f} -> {after:.3f}")
assert losses[-1] < 0.5 * losses[0]
assert after > before + 0.1""",
    """## Merge: plain weights, same predictions

`merge` folds each vector into its kernel (and, for output vectors, the bias). The merged tree has no
`ia3_l` left and runs with plain `model.apply`.""",
    """joined = ia3_jax.join(base, adapter)
merged = ia3_jax.merge(joined, config)

unmerged_logits = forward({"params": joined}, x)
merged_logits = model.apply({"params": merged}, x)
print("max |merged - unmerged|:", float(jnp.abs(merged_logits - unmerged_logits).max()))
np.testing.assert_allclose(merged_logits, unmerged_logits, rtol=1e-5, atol=1e-5)
assert "ia3_l" not in str(jax.tree_util.tree_structure(merged))

# Without the interceptor the vectors would be ignored; apply_fn refuses such a silent no-op.
try:
    ia3_jax.apply_fn(lambda variables, x: x, config)({"params": joined}, x)
except ia3_jax.NotAppliedError as err:
    print("caught:", str(err)[:90], "...")
else:
    raise AssertionError("NotAppliedError expected")""",
]

HF_GENERATE = [
    """# IA3 on a Hugging Face Flax GPT-2, with `generate`

Needs the `[hf]` extra (`pip install "ia3_jax[hf]"`: transformers 4.57, the last release with Flax models).

The vectors live in `params`, so a Hugging Face Flax model's own `__call__(params=...)` and
`generate(params=...)` apply them once wrapped by `apply_fn`. `ia3_jax.hf.default_config` gives PEFT's
defaults for the model type (GPT-2: `c_attn`, `mlp.c_proj`; `fan_in_fan_out=True` for its `FlaxConv1D`).
The model here is tiny and random, built from a config: no download. Every model call is `jax.jit`-ed:
a Flax model called eagerly compiles one operation at a time.""",
    """import jax
import jax.numpy as jnp
import numpy as np
import optax
from transformers import GPT2Config, FlaxGPT2LMHeadModel

import ia3_jax
from ia3_jax import hf

gpt2_config = GPT2Config(
    vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=63, pad_token_id=63
)
model = FlaxGPT2LMHeadModel(gpt2_config, _do_init=False)
params = jax.jit(model.init_weights, static_argnums=1)(jax.random.key(0), (1, 1))   # random weights
config = hf.default_config(model, task_type="CAUSAL_LM")
print(config.target_modules, config.feedforward_modules, config.fan_in_fan_out)
adapter, base = ia3_jax.split(ia3_jax.ia3_init(params, config), config)
hf.print_trainable_parameters(adapter, base)""",
    """## A few training steps

Teach the frozen model to continue a counting sequence, training the vectors only (448 numbers).""",
    """sequence = jnp.arange(1, 17)[None, :]          # 1, 2, ..., 16
call = ia3_jax.apply_fn(model.__call__, config)


def loss_fn(params, tokens):
    logits = call(tokens[:, :-1], params=params).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


optimizer = optax.adam(0.3)
opt_state = optimizer.init(adapter)
step = ia3_jax.make_train_step(loss_fn, optimizer)   # jitted: the model is traced once
losses = []
for _ in range(40):
    adapter, opt_state, loss = step(adapter, opt_state, base, sequence)
    losses.append(float(loss))
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")   # a random 2-layer model: the scales alone go only so far
assert losses[-1] < losses[0] - 0.4""",
    """## `generate` with the interceptor, and with merged weights

`apply_fn(greedy, config)` traces greedy search (a `lax.while_loop` around the model call) under the
interceptor. The merged params need nothing: plain `model.generate`, here the same function jitted
without `apply_fn`.""",
    """def greedy(prompt, params):
    return model.generate(prompt, params=params, max_length=12, do_sample=False).sequences


prompt = sequence[:, :4]
params = ia3_jax.join(base, adapter)
with_vectors = jax.jit(ia3_jax.apply_fn(greedy, config))(prompt, params)

merged = ia3_jax.merge(params, config)
with_merged = jax.jit(greedy)(prompt, merged)
print("IA3 (interceptor):", np.asarray(with_vectors)[0])
print("IA3 (merged):     ", np.asarray(with_merged)[0])
np.testing.assert_array_equal(with_vectors, with_merged)
np.testing.assert_array_equal(with_vectors[0], np.arange(1, 13))   # the count continues""",
    """The logits agree too, the merged tree holds no vectors, and the frozen base alone does not count:""",
    """ids, targets = sequence[:, :-1], sequence[:, 1:]
logits = jax.jit(lambda params: model(ids, params=params).logits)   # one compilation: merged and base trees match
merged_logits = logits(merged)
ia3_logits = jax.jit(lambda params: call(ids, params=params).logits)(params)
print("max |merged - unmerged|:", float(jnp.abs(merged_logits - ia3_logits).max()))
np.testing.assert_allclose(merged_logits, ia3_logits, rtol=1e-5, atol=1e-5)
assert jax.tree.structure(merged) == jax.tree.structure(base)

base_hits = float((logits(base).argmax(-1) == targets).mean())
ia3_hits = float((merged_logits.argmax(-1) == targets).mean())
print(f"next-token accuracy on the count: base {base_hits:.2f}, IA3 {ia3_hits:.2f}")
assert ia3_hits > base_hits""",
]

PEFT_ROUND_TRIP = [
    """# The PEFT round trip

`save_peft` writes PEFT's two files (`adapter_config.json`, `adapter_model.safetensors`) so that
`PeftModel.from_pretrained` loads an adapter trained in JAX into the PyTorch twin of the model, and
`load_peft` reads what PEFT saved. Here both directions on a tiny GPT-2 built from a config, with the
same weights in both frameworks (converted by transformers), random (non-identity) vectors so that
every one of them matters, and logits compared at float32 precision.

Needs PyTorch and PEFT next to the `[hf]` extra: `pip install "ia3_jax[test]"` (or
`pip install "ia3_jax[hf]" torch peft`).""",
    """import tempfile
from pathlib import Path

import jax
import numpy as np
import torch
from peft import IA3Config as PeftIA3Config, PeftModel, get_peft_model
from transformers import FlaxGPT2LMHeadModel, GPT2Config, GPT2LMHeadModel

import ia3_jax
from ia3_jax import hf

work = Path(tempfile.mkdtemp())
torch.manual_seed(0)
gpt2_config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
torch_model = GPT2LMHeadModel(gpt2_config).eval()
torch_model.save_pretrained(work / "base")
flax_model = FlaxGPT2LMHeadModel.from_pretrained(work / "base", from_pt=True)   # the same weights
flax_params = flax_model.params
ids = np.arange(1, 13)[None, :]


def jax_logits(params, config=None):
    # The Flax model's logits on `ids`, jitted (an eager Flax model compiles op by op);
    # under the interceptor when an IA3 config is given.
    logits = lambda params: flax_model(ids, params=params).logits
    return np.asarray(jax.jit(ia3_jax.apply_fn(logits, config) if config else logits)(params))""",
    """## JAX -> PEFT""",
    """config = hf.default_config(flax_model, task_type="CAUSAL_LM", init_ia3_weights=False)
adapter, base = ia3_jax.split(ia3_jax.ia3_init(flax_params, config, rng=jax.random.key(1)), config)
ours = jax_logits(ia3_jax.join(base, adapter), config)

ia3_jax.save_peft(work / "from_jax", adapter, config, params=base)
print(sorted(p.name for p in (work / "from_jax").iterdir()))

peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(work / "base"), work / "from_jax").eval()
with torch.no_grad():
    torch_logits = peft_model(torch.tensor(ids)).logits.numpy()
print("max |PEFT - JAX|:", float(np.abs(torch_logits - ours).max()))
np.testing.assert_allclose(torch_logits, ours, rtol=1e-5, atol=1e-5)""",
    """Merging agrees across frameworks as well: PEFT's `merge_and_unload` against `ia3_jax.merge`.""",
    """merged_torch = peft_model.merge_and_unload()
with torch.no_grad():
    merged_torch_logits = merged_torch(torch.tensor(ids)).logits.numpy()
merged_jax = ia3_jax.merge(ia3_jax.join(base, adapter), config)
print("max |PEFT merged - JAX merged|:", float(np.abs(merged_torch_logits - jax_logits(merged_jax)).max()))
np.testing.assert_allclose(merged_torch_logits, jax_logits(merged_jax), rtol=1e-5, atol=1e-5)""",
    """## PEFT -> JAX

PEFT makes and saves its own random IA3 vectors; `load_peft` maps them onto the Flax params.""",
    """torch.manual_seed(2)
peft_config = PeftIA3Config(task_type="CAUSAL_LM", init_ia3_weights=False)
theirs = get_peft_model(GPT2LMHeadModel.from_pretrained(work / "base"), peft_config).eval()
theirs.save_pretrained(work / "from_peft")
with torch.no_grad():
    their_logits = theirs(torch.tensor(ids)).logits.numpy()

loaded, loaded_config = ia3_jax.load_peft(work / "from_peft", base)
print(loaded_config.target_modules, loaded_config.feedforward_modules)
ours = jax_logits(ia3_jax.join(base, loaded), loaded_config)
print("max |PEFT - JAX|:", float(np.abs(their_logits - ours).max()))
np.testing.assert_allclose(their_logits, ours, rtol=1e-5, atol=1e-5)""",
    """And back again: the adapter that came from PEFT, saved by `save_peft`, holds the same tensors.""",
    """from safetensors.numpy import load_file

ia3_jax.save_peft(work / "again", loaded, loaded_config, params=base)
first = load_file(work / "from_peft" / "adapter_model.safetensors")
second = load_file(work / "again" / "adapter_model.safetensors")
assert first.keys() == second.keys(), sorted(set(first) ^ set(second))
for key in first:
    np.testing.assert_array_equal(first[key], second[key])
print(len(first), "tensors identical")""",
]


def build(name: str, cells: list[str]) -> None:
    """Writes `name` from `cells`, which alternate markdown, code, markdown, code, ..."""
    if len(cells) % 2:
        raise ValueError(f"{name}: cells must come in (markdown, code) pairs.")
    notebook = new_notebook(
        cells=[  # fixed cell ids: rebuilding an unchanged notebook changes no byte
            (new_markdown_cell if i % 2 == 0 else new_code_cell)(c, id=f"cell-{i}") for i, c in enumerate(cells)
        ],
        metadata={
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
    )
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", record_timing=False, resources={"metadata": {"path": str(HERE)}}
    ).execute()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    nbformat.validate(notebook)
    nbformat.write(notebook, HERE / name)


NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_hf_generate.ipynb": HF_GENERATE,
    "03_peft_round_trip.ipynb": PEFT_ROUND_TRIP,
}

if __name__ == "__main__":
    import sys

    for name in sys.argv[1:] or NOTEBOOKS:  # a notebook's file name rebuilds that one only
        build(name, NOTEBOOKS[name])
