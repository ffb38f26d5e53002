"""fastmerge: native-accelerated merging of neural-network checkpoints."""

from .errors import FastmergeError

__version__ = "0.1.0"

__all__ = ["FastmergeError", "__version__"]
