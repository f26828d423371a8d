"""Pallas kernels for the GPU (Triton lowering), each with a pure-jnp reference beside it."""
