"""Capsule networks with inverted dot-product attention routing in JAX."""
