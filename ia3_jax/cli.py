"""Command line: ``ia3-jax demo`` fine-tunes a small Flax model with IA3 on built-in data."""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import ia3_jax


class _TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(64, name="k")(x))
        h = nn.relu(nn.Dense(64, name="v")(h))
        return nn.Dense(2, name="wo")(h)


def demo(steps: int = 200) -> dict[str, float]:
    """Pretrain a tiny MLP on one task, then IA3-adapt it to a shifted task; returns accuracies."""
    kx, kp, kt = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (512, 16))
    model = _TinyNet()
    base = model.init(kp, x)["params"]
    labels = (x[:, 0] + x[:, 1] > 0).astype(jnp.int32)
    shifted = (x[:, 0] - 0.5 * x[:, 2] > 0.3).astype(jnp.int32)

    def fit(tree, loss_of, n):
        opt = optax.adam(1e-2)
        state = opt.init(tree)

        @jax.jit
        def step(tree, state):
            loss, grads = jax.value_and_grad(loss_of)(tree)
            updates, state = opt.update(grads, state)
            return optax.apply_updates(tree, updates), state, loss

        for _ in range(n):
            tree, state, loss = step(tree, state)
        return tree, float(loss)

    def xent(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    base, _ = fit(base, lambda p: xent(model.apply({"params": p}, x), labels), steps)
    config = ia3_jax.IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"])
    adapter, frozen = ia3_jax.split(ia3_jax.ia3_init(base, config))
    forward = ia3_jax.apply_fn(model.apply, config)
    adapter, loss = fit(
        adapter, lambda a: xent(forward({"params": ia3_jax.join(frozen, a)}, x), shifted), steps
    )
    accuracy = lambda p, y: float((model.apply({"params": p}, x).argmax(-1) == y).mean())  # noqa: E731
    merged = ia3_jax.merge(ia3_jax.join(frozen, adapter), config)
    n_vec = sum(v.size for v in jax.tree.leaves(adapter))
    n_all = sum(v.size for v in jax.tree.leaves(base))
    return {
        "trainable_share": n_vec / n_all,
        "base_accuracy_on_new_task": accuracy(base, shifted),
        "ia3_accuracy_on_new_task": accuracy(merged, shifted),
        "final_loss": loss,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ia3-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="IA3 on a tiny MLP, built-in data, CPU, seconds")
    args = parser.parse_args(argv)
    if args.command == "demo":
        for name, value in demo().items():
            print(f"{name:>28}: {value:.4f}")


if __name__ == "__main__":
    main()
