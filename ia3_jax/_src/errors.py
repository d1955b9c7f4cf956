"""Every error ia3_jax raises: one base, `IA3Error`, and one class per failure family.

Each family also subclasses the built-in exception that Python code would expect for it
(`ValueError` for bad values, `TypeError` for bad types, `RuntimeError` for a guard that caught a
silent no-op), so ``except ValueError`` keeps working; ``except ia3_jax.IA3Error`` catches them all.
"""

from __future__ import annotations


class IA3Error(Exception):
    """Base class of every error raised by ia3_jax."""


class IA3ConfigError(IA3Error, ValueError):
    """An `IA3Config` field has a value that PEFT or ia3_jax cannot use."""


class TargetError(IA3Error, ValueError):
    """The config's module patterns do not fit the param tree."""


class LayoutError(IA3Error, ValueError):
    """A kernel's layout cannot be told from the params: pass `layouts=` (see `infer_layouts`)."""


class VectorShapeError(IA3Error, ValueError):
    """An IA3 vector does not fit the kernel or the activation it scales, or fits both sides."""


class AdapterIdsError(IA3Error, ValueError):
    """The ``adapter_ids`` of a bank call do not fit: not a 1-D integer array, a value out of range,
    or another number of examples than the activations' batch axis."""


class NotAppliedError(IA3Error, RuntimeError):
    """IA3 vectors in the arguments were never applied: a silent no-op was caught."""


class AlreadyJittedError(IA3Error, TypeError):
    """`apply_fn` was given a function that `jax.jit` / `jax.pmap` already wraps.

    Such a function keeps its own trace cache, which the interceptor is not part of: IA3 traces
    would leak into plain calls of it, or be skipped. Jit the wrapper instead.
    """


class AdapterExistsError(IA3Error, ValueError):
    """The params already hold IA3 vectors."""


class StructureError(IA3Error, ValueError):
    """A tree has not the structure an operation needs (no vectors, a non-string key), or two trees
    that should fit together do not (adapter and base, adapters of one bank and their weights)."""


class AdapterMismatchError(StructureError):
    """An adapter or its config does not fit the params it is to be joined to."""


class NonFiniteMergeError(IA3Error, ValueError):
    """NaN or inf where a merge would write it: an array that `merge(safe_merge=True)` or
    `unmerge(safe_unmerge=True)` wrote, or a weight given to `add_weighted_adapter`."""


class UnsupportedKernelError(IA3Error, TypeError):
    """A kernel is neither a float array nor a quantized kernel that ia3_jax can rescale exactly."""


class QuantizedMergeError(UnsupportedKernelError):
    """An IA3 vector cannot be folded into a quantized kernel without changing its integers."""


class AdapterDtypeError(IA3Error, TypeError):
    """IA3 vectors of a dtype that cannot hold them (integers, or a float that overflows)."""


class CheckpointError(IA3Error, ValueError):
    """A path is not a complete adapter checkpoint, is damaged, or a save would clobber something."""


class PeftFormatError(IA3Error, ValueError):
    """A directory is not a readable PEFT IA3 adapter (missing or malformed file, another PEFT type)."""


class ShardingError(IA3Error, ValueError):
    """A sharding does not fit the vector or tree it is meant for."""


class UnknownModelTypeError(IA3ConfigError):
    """PEFT has no IA3 defaults for this ``model_type`` (or the object has none): name the modules."""
