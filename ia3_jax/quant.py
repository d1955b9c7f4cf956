"""qwix-quantized bases, public: `dequantize` a param tree, test a leaf with `is_quantized`.

IA3 composes with qwix's weight-only quantization: `ia3_init` reads a quantized kernel's logical
shape, the interceptor scales around qwix's integer matmul, and `merge` folds output vectors into
the per-channel scale. See ``ia3_jax._src.quant`` for the arithmetic.

Example:
  >>> merged = ia3_jax.merge(ia3_jax.quant.dequantize(ia3_jax.join(qbase, adapter)), config)
"""

from ia3_jax._src.dtypes import cast_adapter
from ia3_jax._src.errors import AdapterDtypeError, QuantizedMergeError, UnsupportedKernelError
from ia3_jax._src.quant import dequantize, is_quantized, kernel_shape

__all__ = [
    "AdapterDtypeError",
    "QuantizedMergeError",
    "UnsupportedKernelError",
    "cast_adapter",
    "dequantize",
    "is_quantized",
    "kernel_shape",
]
