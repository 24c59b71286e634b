"""Kernels with their references; research.kernels.dispatch picks the implementation
(docs/kernels.md)."""
