"""The README's Quick start runs as written, and does what its comments say.

The block is executed from README.md itself, so the README cannot drift from the library. References:
Adam's first step by hand (``-lr * g / (|g| + eps)``) and the merge written out with NumPy.
"""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def quick_start_code() -> str:
    text = README.read_text()
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Quick start holds one python block"
    return blocks[0]


def test_quick_start_runs_as_written():
    scope: dict = {"__name__": "readme_quick_start"}
    exec(compile(quick_start_code(), str(README), "exec"), scope)  # its own asserts run here

    grads, base, adapter, serving, config = (scope[k] for k in ("grads", "base", "adapter", "serving", "config"))
    assert set(adapter) == {"k", "v", "wo"} and "ia3_l" not in str(jax.tree.structure(serving))
    # Adam's first step from vectors of ones: 1 - lr * g / (|g| + eps), lr 0.1, eps 1e-8
    # (measured: 7.2e-7 apart, float32 rounding of optax's bias corrections).
    for name in adapter:
        g = np.asarray(grads[name]["ia3_l"])
        assert np.abs(g).min() > 1e-6  # every entry gets a gradient, so every entry moves by ~0.1
        np.testing.assert_allclose(adapter[name]["ia3_l"], 1 - 0.1 * g / (np.abs(g) + 1e-8), rtol=1.5e-6)
    # The merge by hand: output-side vectors scale kernel columns and the bias, the feedforward
    # vector scales the rows of wo's kernel (measured: bitwise equal; 1e-6 relative allowed).
    v = {name: np.asarray(adapter[name]["ia3_l"]) for name in adapter}
    for name in ("k", "v"):
        np.testing.assert_allclose(serving[name]["kernel"], base[name]["kernel"] * v[name], rtol=1e-6)
        np.testing.assert_allclose(serving[name]["bias"], base[name]["bias"] * v[name], rtol=1e-6)
    np.testing.assert_allclose(serving["wo"]["kernel"], base["wo"]["kernel"] * v["wo"][:, None], rtol=1e-6)
    np.testing.assert_array_equal(serving["wo"]["bias"], base["wo"]["bias"])
    # Merged and unmerged outputs (the README allows TF32 GPUs' rounding; measured on CPU: 3e-7).
    np.testing.assert_allclose(scope["merged"], scope["unmerged"], rtol=0, atol=1e-6)
