"""Dreamer 4 on Craftax, offline-first, in JAX."""
