"""Writes notebooks/05_adapter_bank.ipynb (many adapters in one batch), executed, with outputs.

    cd notebooks && python build_bank_notebook.py      # needs the [hf] extra (transformers) and nbclient

Kept apart from build_notebooks.py (same `build` helper), like build_tunix_notebook.py.
"""

from __future__ import annotations

from build_notebooks import build

BANK = [
    """# Many adapters in one batch

IA3 adapters are tiny and act by elementwise scaling, so one batch can carry a different adapter for
every example: gather each example's vectors and scale its activations. This notebook serves five
PEFT adapters of one tiny GPT-2 (random weights, built from a config: no download) in one batch,
with a "no adapter" row, checks every row against that adapter merged into the base, and then
trains three tasks in one batch, each example updating only its own task's adapter.""",
    """import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers as tf

import ia3_jax
from ia3_jax import hf

work = Path(tempfile.mkdtemp())
V = 64
model = tf.FlaxGPT2LMHeadModel(
    tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=V, bos_token_id=0, eos_token_id=0),
    seed=0,
)
base = model.params
config = hf.default_config(model)  # PEFT's GPT-2 targets: c_attn, mlp.c_proj (feedforward)
print(config.target_modules, config.feedforward_modules)""",
    """## Five PEFT adapters on disk

Stand-ins for five customers' fine-tunes: vectors around 1, written in PEFT's format by
`ia3_jax.save_peft` (PyTorch PEFT's `save_pretrained` writes the same two files).""",
    """directories = []
for i in range(5):
    adapter = ia3_jax.split(ia3_jax.ia3_init(base, config)).adapter
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(i), len(leaves))
    adapter = treedef.unflatten([v + 0.8 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)])
    ia3_jax.save_peft(work / f"customer_{i}", adapter, config, params=base)
    directories.append(work / f"customer_{i}")
print(sorted(p.name for p in directories[0].iterdir()))""",
    """## A bank: the adapter axis last

`load_peft` returns `(adapter, config)` pairs; `stack_adapters` checks that they have the same
modules, shapes and sides (`feedforward_modules`) and stacks every vector along a new *last* axis:
`(*features, n_adapters)`. Last, because `nn.scan` models slice their stacked-layer axis (first, or
wherever `variable_axes` put it) and must never slice the adapters. The bank is a plain adapter
tree: `join` it to the base like any adapter.""",
    """loaded = [ia3_jax.load_peft(d, base) for d in directories]
bank = ia3_jax.stack_adapters(loaded, config)
print("adapters:", ia3_jax.bank_size(bank))
print(jax.tree.map(jnp.shape, bank)["transformer"]["h"]["0"])""",
    """## Serving a mixed batch

`bank_apply_fn` wraps any function that runs the model (here greedy `generate` with its KV cache)
and takes `adapter_ids=`, one per sequence: `i` for adapter `i`, `-1` (`ia3_jax.NO_ADAPTER`) for the
base model. Each row is compared with its adapter *merged* into the base and generated alone.""",
    """def greedy(tokens, params):
    return model.generate(tokens, params=params, max_new_tokens=6, do_sample=False).sequences

prompts = jax.random.randint(jax.random.key(7), (6, 5), 1, V)
ids = jnp.array([3, 0, -1, 4, 1, 2])
ia3_jax.check_adapter_ids(ids, bank)  # a jitted call cannot check id values: do it on the host
serve = jax.jit(ia3_jax.bank_apply_fn(greedy, config))
mixed = serve(prompts, ia3_jax.join(base, bank), adapter_ids=ids)
print(np.asarray(mixed[:, 5:]))

alone = jax.jit(greedy)  # plain generate on merged weights: no interceptor at all
for row, i in enumerate(np.asarray(ids)):
    params = base if i < 0 else ia3_jax.merge(ia3_jax.join(base, ia3_jax.bank_select(bank, int(i))), config)
    assert (alone(prompts[row : row + 1], params)[0] == mixed[row]).all()
print("every row equals its adapter merged and run alone")""",
    """### Pick once per batch

`bank_apply_fn` picks each example's vectors from the bank in every call, so at every decode step,
and XLA's GPU compiler keeps that gather inside the loop (5% of decode time on an H200). When the ids
are fixed for the batch, pick the rows once with `per_example_adapter` (every vector becomes
`(batch, *features)`) and apply them with `per_example_apply_fn`: the same tokens, and a decode step
as cheap as with one adapter for all (0.995x on the H200, README). A model with `nn.scan`-stacked
layers names their layer axis: `per_example_adapter(bank, ids, stack_axes={"layers": 0})`.""",
    """picked_generate = ia3_jax.per_example_apply_fn(greedy, config)


@jax.jit
def serve_picked(base, bank, prompts, ids):
    rows = ia3_jax.per_example_adapter(bank, ids)  # once, before generate's loop
    return picked_generate(prompts, ia3_jax.join(base, rows))


picked = serve_picked(base, bank, prompts, ids)
assert (picked == mixed).all()
print(jax.tree.map(jnp.shape, ia3_jax.per_example_adapter(bank, ids))["transformer"]["h"]["0"])""",
    """Adding and removing an adapter does not re-read the others: `bank_add` appends (its id is the old
size), `bank_remove` drops one (later ids shift down by one).""",
    """bank6 = ia3_jax.bank_add(bank, ia3_jax.load_peft(directories[0], base), config)
print(ia3_jax.bank_size(bank6), ia3_jax.bank_size(ia3_jax.bank_remove(bank6, 2)))""",
    """## Training three tasks in one batch

Three fresh adapters, one per task (task `k` continues a sequence counting by `k + 1`), trained
together: every batch mixes the tasks, `adapter_ids` says which example belongs to which, and the
gradient of an example reaches only its task's adapter.""",
    """tasks = 3
bank = ia3_jax.stack_adapters([ia3_jax.split(ia3_jax.ia3_init(base, config)).adapter] * tasks)

def batch(key, per_task=8, length=12):
    start = jax.random.randint(key, (tasks * per_task, 1), 0, V)
    task = jnp.repeat(jnp.arange(tasks), per_task)
    return (start + (task[:, None] + 1) * jnp.arange(length)) % V, task

forward = ia3_jax.bank_apply_fn(model.__call__, config)

def per_task_loss(bank, tokens, task):
    logits = forward(tokens[:, :-1], params=ia3_jax.join(base, bank), adapter_ids=task).logits
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(axis=1)
    return jax.ops.segment_sum(losses, task, tasks) / jnp.bincount(task, length=tasks)

def loss(bank, tokens, task):  # the sum: each task's mean loss is a function of its adapter alone
    per_task = per_task_loss(bank, tokens, task)
    return per_task.sum(), per_task

optimizer = optax.adam(0.3)
opt_state = optimizer.init(bank)

@jax.jit
def step(bank, opt_state, key):
    (_, per_task), grads = jax.value_and_grad(loss, has_aux=True)(bank, *batch(key))
    updates, opt_state = optimizer.update(grads, opt_state, bank)
    return optax.apply_updates(bank, updates), opt_state, per_task

for i in range(80):
    bank, opt_state, losses = step(bank, opt_state, jax.random.key(100 + i))
    if i % 20 == 0 or i == 79:
        print(i, np.round(np.asarray(losses), 3))""",
    """The three losses fall together (slowly: the base model has random weights, and IA3 only rescales
its activations). Each example's gradient lands in its own adapter's column only: a batch of task-0 examples leaves
the other two adapters' gradients exactly zero. The trained adapters go back to PEFT's format one
by one (`bank_select`).""",
    """tokens, task = batch(jax.random.key(0))
only_task0, _ = jax.jit(jax.grad(loss, has_aux=True))(bank, tokens[task == 0], task[task == 0])
column_norms = sum(jnp.abs(g).reshape(-1, tasks).sum(0) for g in jax.tree.leaves(only_task0))
print("gradient per adapter:", np.asarray(column_norms))

for k in range(tasks):
    ia3_jax.save_peft(work / f"task_{k}", ia3_jax.bank_select(bank, k), config, params=base)
print(ia3_jax.read_peft_config(work / "task_1").target_modules)""",
]

if __name__ == "__main__":
    build("05_adapter_bank.ipynb", BANK)
