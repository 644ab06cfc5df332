"""pudnet_jax: PudNet-style parameter prediction for unseen image datasets, in JAX/Flax."""
