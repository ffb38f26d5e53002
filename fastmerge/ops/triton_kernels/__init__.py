"""Triton kernels for the ops (GPU, or the CPU under TRITON_INTERPRET=1).

Importing this package needs triton; the ops import their kernel module lazily, only when the
triton backend is chosen, so the package stays usable without the `triton` extra.
"""
