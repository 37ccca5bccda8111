"""Pallas kernels of lragent-jax, usable on their own."""
