"""gm_jax: likelihood-based generative models of images in JAX/Flax."""
