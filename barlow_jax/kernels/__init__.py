"""Compiled CPU kernels called from JAX through XLA's FFI (optional; see docs/onednn.md)."""
