from ia3_jax.cli import main

main()
