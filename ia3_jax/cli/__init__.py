"""The ``ia3-jax`` command line: an application built on ia3_jax's public API, not part of the library.

``ia3-jax finetune`` IA3-fine-tunes a pretrained Hugging Face Flax text encoder as a classifier on
the CPU (`ia3_jax.cli.finetune`); its data loading lives in `ia3_jax.cli.data`. It needs the
``[demo]`` extra (transformers, the MiniLM weights, the VADER lexicon, matplotlib).
"""

from ia3_jax.cli.finetune import main

__all__ = ["main"]
