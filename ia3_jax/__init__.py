"""ia3_jax: IA3 ("Infused Adapter by Inhibiting and Amplifying Inner Activations") for Flax.

Pure functions over param trees: `ia3_init` inserts ``ia3_l`` vectors, `apply_fn` / `intercept`
apply them inside module calls, `split` / `join` separate the trainable adapter from the frozen
base, and `merge` / `unmerge` / `add_weighted_adapter` / `combine` are tree operations.

Everything public is re-exported here; the implementation lives in ``ia3_jax._src`` (private).
``ia3_jax.hf`` (Hugging Face Flax models, needs transformers) and ``ia3_jax.quant`` (qwix kernels)
are imported on their own.
"""

from ia3_jax._src.atomic import replaced_directory
from ia3_jax._src.bank import (
    bank_add,
    bank_apply_fn,
    bank_remove,
    bank_select,
    bank_size,
    check_adapter_ids,
    per_example_adapter,
    per_example_apply_fn,
    stack_adapters,
)
from ia3_jax._src.checkpoint import (
    check_adapter,
    checkpoint_directory,
    checkpoint_problem,
    load_adapter,
    load_opt_state,
    save_adapter,
)
from ia3_jax._src.config import IA3Config
from ia3_jax._src.dtypes import cast_adapter
from ia3_jax._src.errors import (
    AdapterDtypeError,
    AdapterExistsError,
    AdapterIdsError,
    AdapterMismatchError,
    AlreadyJittedError,
    CheckpointError,
    IA3ConfigError,
    IA3Error,
    LayoutError,
    NonFiniteMergeError,
    NotAppliedError,
    PeftFormatError,
    QuantizedMergeError,
    ShardingError,
    StructureError,
    TargetError,
    UnknownModelTypeError,
    UnsupportedKernelError,
    VectorShapeError,
)
from ia3_jax._src.init import ia3_init
from ia3_jax._src.interceptor import NO_ADAPTER, PickedRows, apply_fn, intercept, scale, scale_per_example
from ia3_jax._src.layout import KernelLayout, default_layout, infer_layouts
from ia3_jax._src.merge import add_weighted_adapter, combine, merge, unmerge
from ia3_jax._src.nnx_vectors import IA3Vector
from ia3_jax._src.partition import Split, join, split
from ia3_jax._src.peft_io import load_peft, read_peft_config, save_peft
from ia3_jax._src.remat import ACTIVATION_NAME, remat_policy
from ia3_jax._src.sharding import adapter_shardings, optimizer_shardings
from ia3_jax._src.stacking import stack, unstack
from ia3_jax._src.targets import Target, resolve_targets
from ia3_jax._src.training import make_train_step, trainable_mask

__version__ = "0.1.0"

__all__ = [
    "ACTIVATION_NAME",
    "AdapterDtypeError",
    "AdapterExistsError",
    "AdapterIdsError",
    "AdapterMismatchError",
    "AlreadyJittedError",
    "CheckpointError",
    "IA3Config",
    "IA3ConfigError",
    "IA3Error",
    "IA3Vector",
    "KernelLayout",
    "LayoutError",
    "NO_ADAPTER",
    "NonFiniteMergeError",
    "NotAppliedError",
    "PeftFormatError",
    "PickedRows",
    "QuantizedMergeError",
    "ShardingError",
    "Split",
    "StructureError",
    "Target",
    "TargetError",
    "UnknownModelTypeError",
    "UnsupportedKernelError",
    "VectorShapeError",
    "adapter_shardings",
    "add_weighted_adapter",
    "apply_fn",
    "bank_add",
    "bank_apply_fn",
    "bank_remove",
    "bank_select",
    "bank_size",
    "cast_adapter",
    "check_adapter",
    "check_adapter_ids",
    "checkpoint_directory",
    "checkpoint_problem",
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
    "per_example_adapter",
    "per_example_apply_fn",
    "read_peft_config",
    "remat_policy",
    "replaced_directory",
    "resolve_targets",
    "save_adapter",
    "save_peft",
    "scale",
    "scale_per_example",
    "split",
    "stack",
    "stack_adapters",
    "trainable_mask",
    "unmerge",
    "unstack",
]
