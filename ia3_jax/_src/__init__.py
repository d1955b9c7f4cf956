"""ia3_jax's implementation: private modules, one concept each, re-exported flat by `ia3_jax`."""
