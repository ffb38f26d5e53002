"""The native kernels (csrc/): the build of them that this CPU can run (native_loader.py says
how it is chosen). Replacing this module in sys.modules while it is imported makes the import
return the build itself (importlib reads sys.modules back after running the module)."""

import sys

from .native_loader import load_native

sys.modules[__name__] = load_native()
