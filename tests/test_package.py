"""The package's shape: what `import ia3_jax` loads, one error hierarchy, no private imports across modules."""

from __future__ import annotations

import ast
import inspect
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import ia3_jax

ROOT = Path(__file__).resolve().parents[1]
INTEGRATIONS = ("transformers", "tqdm", "matplotlib", "torch", "qwix", "chex", "peft")


def test_import_loads_no_integration():
    # A fresh interpreter: this test process has imported all of them already.
    code = "import json, sys, ia3_jax; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert "ia3_jax" in loaded and "jax" in loaded and "orbax" in loaded  # the probe itself works
    assert not loaded & set(INTEGRATIONS), sorted(loaded & set(INTEGRATIONS))


def test_every_error_is_an_ia3_error_and_exported():
    errors = sys.modules[ia3_jax.IA3Error.__module__]  # the one module that defines them
    defined = {name for name, obj in vars(errors).items() if inspect.isclass(obj) and issubclass(obj, Exception)}
    assert len(defined) >= 15
    for name in defined:
        assert issubclass(getattr(errors, name), errors.IA3Error), name
        assert getattr(ia3_jax, name) is getattr(errors, name), f"{name} is not exported from ia3_jax"
    exported = {name for name in ia3_jax.__all__ if inspect.isclass(getattr(ia3_jax, name))}
    exported_errors = {name for name in exported if issubclass(getattr(ia3_jax, name), Exception)}
    assert exported_errors == defined


def test_public_names_are_the_documented_ones():
    for name in ia3_jax.__all__:
        assert hasattr(ia3_jax, name), name
    # Functions no longer shadow modules: there is one `merge`, and it is the function.
    assert callable(ia3_jax.merge) and not inspect.ismodule(ia3_jax.merge)


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from X import name` in a Python file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    return [(node.module or "", alias.name) for node in nodes for alias in node.names]


def _python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def _private_attributes(path: Path) -> list[str]:
    """``alias._name`` uses, where `alias` is bound by an import from ia3_jax (``from ia3_jax._src import merge``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ia3_jax")
        for alias in node.names
    }
    return [
        f"{node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
        and node.attr.startswith("_") and not node.attr.startswith("__")
    ]


def test_no_module_imports_another_modules_private_names():
    files = _python_files("ia3_jax", "tests", "benchmarks", "notebooks")
    offenders = [
        f"{p.relative_to(ROOT)}: from {module} import {name}"
        for p in files
        for module, name in _imports(p)
        if module.startswith("ia3_jax") and name.startswith("_")
    ] + [f"{p.relative_to(ROOT)}: {use}" for p in files for use in _private_attributes(p)]
    assert not offenders, offenders


def test_tests_benchmarks_and_the_cli_use_the_public_api_only():
    offenders = [
        f"{p.relative_to(ROOT)}: from {module} import {name}"
        for p in _python_files("tests", "benchmarks", "notebooks", "ia3_jax/cli")
        for module, name in _imports(p)
        if module.startswith("ia3_jax._src")
    ]
    assert not offenders, offenders


def test_flax_t5_fix_says_once_what_it_changed(caplog):
    hf = pytest.importorskip("ia3_jax.hf")
    if not hf.needs_flax_t5_patch():
        pytest.skip("this JAX still has jnp.clip(a_max=...): no fix is applied")
    from transformers.models.t5 import modeling_flax_t5

    cls = modeling_flax_t5.FlaxT5Attention
    original = inspect.getattr_static(cls, "_relative_position_bucket")
    cls._relative_position_bucket = staticmethod(lambda *args, **kwargs: None)  # as transformers ships it
    try:
        with caplog.at_level(logging.INFO, logger="ia3_jax.hf"):
            assert hf.patch_flax_t5() == ["FlaxT5Attention"]
            assert hf.patch_flax_t5() == []  # idempotent, and silent when nothing changes
        messages = [r.getMessage() for r in caplog.records if r.name == "ia3_jax.hf"]
        assert len(messages) == 1 and "FlaxT5Attention" in messages[0] and "a_max" in messages[0]
    finally:
        cls._relative_position_bucket = original
