"""ia3_jax: IA3 ("Infused Adapter by Inhibiting and Amplifying Inner Activations") for Flax.

Pure functions over param trees: `ia3_init` inserts ``ia3_l`` vectors, `apply_fn` / `intercept`
apply them inside module calls, `split` / `join` separate the trainable adapter from the frozen
base, and `merge` / `unmerge` / `add_weighted_adapter` / `combine` are tree operations.
"""

from ia3_jax.checkpoint import (
    AdapterMismatchError,
    CheckpointError,
    check_adapter,
    checkpoint_directory,
    load_adapter,
    load_opt_state,
    save_adapter,
)
from ia3_jax.config import IA3Config, IA3ConfigError
from ia3_jax.init import AdapterExistsError, ia3_init
from ia3_jax.interceptor import NotAppliedError, VectorShapeError, apply_fn, intercept, scale
from ia3_jax.layout import KernelLayout, LayoutError, default_layout, infer_layouts
from ia3_jax.merge import (
    NonFiniteMergeError,
    UnsupportedKernelError,
    add_weighted_adapter,
    combine,
    merge,
    unmerge,
)
from ia3_jax.partition import StructureError, join, split
from ia3_jax.peft_io import PeftFormatError, load_peft, read_peft_config, save_peft
from ia3_jax.quant import AdapterDtypeError, QuantizedMergeError
from ia3_jax.sharding import ShardingError, adapter_shardings, optimizer_shardings
from ia3_jax.stacking import stack, unstack
from ia3_jax.targets import TargetError, resolve_targets
from ia3_jax.training import make_train_step, trainable_mask

__version__ = "0.1.0"


def __getattr__(name: str):
    # `ia3_jax.hf` imports transformers: load it on first use, not with `import ia3_jax`.
    if name == "hf":
        import importlib

        return importlib.import_module("ia3_jax.hf")
    raise AttributeError(f"module 'ia3_jax' has no attribute {name!r}")

__all__ = [
    "AdapterDtypeError",
    "AdapterExistsError",
    "AdapterMismatchError",
    "CheckpointError",
    "IA3Config",
    "IA3ConfigError",
    "KernelLayout",
    "LayoutError",
    "NonFiniteMergeError",
    "NotAppliedError",
    "PeftFormatError",
    "QuantizedMergeError",
    "ShardingError",
    "StructureError",
    "TargetError",
    "UnsupportedKernelError",
    "VectorShapeError",
    "adapter_shardings",
    "add_weighted_adapter",
    "apply_fn",
    "check_adapter",
    "checkpoint_directory",
    "combine",
    "default_layout",
    "ia3_init",
    "infer_layouts",
    "intercept",
    "join",
    "load_adapter",
    "load_opt_state",
    "load_peft",
    "make_train_step",
    "merge",
    "optimizer_shardings",
    "read_peft_config",
    "resolve_targets",
    "save_adapter",
    "save_peft",
    "scale",
    "split",
    "stack",
    "trainable_mask",
    "unmerge",
    "unstack",
]
