"""Merge primitives. Each op has one signature and several backends (reference, native, triton,
cuda); `backend=None` picks one by device (DESIGN.md "Backends and dispatch")."""

from .blend import blend

__all__ = ["blend"]
