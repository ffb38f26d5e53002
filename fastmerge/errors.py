"""One exception family for everything a user can get wrong.

Every message names the file, tensor or parameter at fault and says what to do, because the
CLI prints only the message (exit code 2) unless run with -v.
"""


class FastmergeError(Exception):
    """Base class: bad input, bad config, or a merge that cannot be done as asked."""


class ConfigError(FastmergeError):
    """The merge config (YAML or dict) is malformed or asks for something unsupported."""


class CheckpointError(FastmergeError):
    """A model directory or tensor file is missing, corrupt, unsafe or inconsistent."""


class PlanError(FastmergeError):
    """The models cannot be merged together (missing tensors, shape mismatches, ...)."""


class OutputError(FastmergeError):
    """The output location is unusable (exists, inside an input, not writable, ...)."""


class KernelError(FastmergeError):
    """A kernel was called with arguments it cannot handle (dtype, shape, backend)."""


class MissingExtraError(FastmergeError):
    """An optional dependency is needed; the message names the pip extra to install."""
